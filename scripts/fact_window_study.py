"""Is a plain fact that every head selects lost by the window or by the model?

On the plain-fact task at 16k the selections often hold the fact's chunk in every head's
window (the eval's `key_chunk_selected` 1.0) and still answer wrong. This study gives the
model, with its own (stock) attention, only what such a window holds: the first chunk, the
fact's chunk, and the prompt's last two chunks (the question), in order, at contiguous
positions, as LongHeads places them. If stock attention answers wrong from these few hundred
tokens too, the loss is the model's reading of the fact, not the selection or the positions.

  python scripts/fact_window_study.py --length 16384 --samples 0,1,2,3,4 --output results/fact_window_study.md
"""

import argparse
from pathlib import Path

import mlx_longheads  # noqa: F401  (loads OpenBLAS before MLX on Linux)
import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache

from mlx_longheads import load
from mlx_longheads.eval import code_version
from mlx_longheads.tasks import make_sample
from needle_oracle import greedy  # scripts/ is on the path when run


def window_tokens(tokens, fact_chunk: int, w: int):
    """Chunk 0, the fact's chunk and the last two chunks of `tokens` (the question's), in order."""
    own = (len(tokens) - 1) // w
    chunks = sorted({0, fact_chunk, own - 1, own})
    return [t for c in chunks for t in tokens[c * w : (c + 1) * w]]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--samples", default="0,1,2,3,4")
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args()
    version = code_version()
    model, tokenizer = load(None, longheads=None)
    w = args.chunk_size
    rows = []
    for index in map(int, args.samples.split(",")):
        sample = make_sample("fact", tokenizer, args.length, index)
        tokens = tokenizer.encode(sample.prompt)
        chunk = sample.answer_chunk(tokenizer, w)
        window = window_tokens(tokens, chunk, w)
        cache = make_prompt_cache(model)  # stock attention: mlx-lm's cache
        answer = tokenizer.decode(greedy(model, model(mx.array([window]), cache=cache), cache, sample.max_tokens))
        rows.append((index, sample.expected[0], chunk, len(window), answer, sample.score(answer)))
        print(rows[-1], flush=True)
    lines = [
        "# A plain fact from what a selecting head's window holds, with stock attention",
        "",
        f"Commit {version}; SmolLM2-135M-Instruct, float32, greedy; the eval's fact prompts at "
        f"{args.length} tokens, cut to chunk 0, the fact's chunk and the last two chunks ({w} tokens each).",
        "",
        f"`python scripts/fact_window_study.py --length {args.length} --samples {args.samples} --output {args.output}`",
        "",
        "| sample | expected | fact's chunk | window tokens | answer | right |",
        "|---|---|---|---|---|---|",
    ]
    for index, expected, chunk, n, answer, score in rows:
        lines.append(f"| {index} | {expected} | {chunk} | {n} | {answer.strip()[:40]!r} | {score:.0f} |")
    lines.append(f"\nRight: {sum(r[-1] for r in rows):.0f} / {len(rows)}.")
    args.output.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
