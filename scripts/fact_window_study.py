"""Is a plain fact that every head selects lost by the window or by the model?

On the plain-fact task at 16k the selections often hold the fact's chunk in every head's
window (the eval's `key_chunk_selected` 1.0) and still answer wrong. This study gives the
model, with its own (stock) attention, only what such a window holds: the first chunk, the
fact's chunk, and the prompt's last two chunks (the question), in order, at contiguous
positions, as LongHeads places them. If stock attention answers wrong from these few hundred
tokens too, the loss is the model's reading of the fact, not the selection or the positions.

`--others` adds that many other chunks of the prompt, drawn at random (the same draw, one
more chunk at a time, for every count of a sample), to the window: a selecting head's window
(L = 2048, 256-token chunks) holds five retrieved chunks, so five others is what the fact's
chunk shares it with when it is selected. If the answer goes as chunks are added, the other
chunks a window holds draw it away.

  python scripts/fact_window_study.py --length 16384 --samples 0,1,2,3,4 --output results/fact_window_study.md
"""

import argparse
import random
from pathlib import Path
from typing import List, Sequence

import mlx_longheads  # noqa: F401  (loads OpenBLAS before MLX on Linux)
import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache

from mlx_longheads import load
from mlx_longheads.eval import code_version
from mlx_longheads.tasks import make_sample
from needle_oracle import greedy  # scripts/ is on the path when run


def window_tokens(tokens: Sequence[int], fact_chunk: int, w: int, others: Sequence[int] = ()) -> List[int]:
    """Chunk 0, the fact's chunk, the `others` and the last two chunks of `tokens` (the
    question's), in the prompt's order."""
    own = (len(tokens) - 1) // w
    chunks = sorted({0, fact_chunk, own - 1, own, *others})
    return [t for c in chunks for t in tokens[c * w : (c + 1) * w]]


def other_chunks(n_tokens: int, fact_chunk: int, w: int, index: int) -> List[int]:
    """The prompt's chunks outside the bare window, in a random order drawn from `index`."""
    own = (n_tokens - 1) // w
    rest = [c for c in range(1, own - 1) if c != fact_chunk]
    random.Random(index).shuffle(rest)
    return rest


def cell(answer: str) -> str:
    """An answer's first 40 characters as a table cell (its '|' escaped)."""
    return repr(answer.strip()[:40]).replace("|", "\\|")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--samples", default="0,1,2,3,4")
    parser.add_argument("--chunk-size", type=int, default=256)
    parser.add_argument("--others", default="0", help="counts of other chunks added, e.g. 0,2,5")
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args()
    version = code_version()
    model, tokenizer = load(None, longheads=None)
    w, counts = args.chunk_size, [int(n) for n in args.others.split(",")]
    rows = []
    for index in map(int, args.samples.split(",")):
        sample = make_sample("fact", tokenizer, args.length, index)
        tokens = tokenizer.encode(sample.prompt)
        chunk = sample.answer_chunk(tokenizer, w)
        draw = other_chunks(len(tokens), chunk, w, index)
        answers = []
        for n in counts:
            window = window_tokens(tokens, chunk, w, draw[:n])
            cache = make_prompt_cache(model)  # stock attention: mlx-lm's cache
            answer = tokenizer.decode(greedy(model, model(mx.array([window]), cache=cache), cache, sample.max_tokens))
            answers.append((len(window), answer, sample.score(answer)))
        rows.append((index, sample.expected[0], chunk, answers))
        print(rows[-1], flush=True)
    command = f"python scripts/fact_window_study.py --length {args.length} --samples {args.samples}"
    if counts != [0]:
        command += f" --others {args.others}"
    header = "| sample | expected | fact's chunk |" + "".join(
        f" {n} others: tokens | answer | right |" for n in counts)
    lines = [
        "# A plain fact from what a selecting head's window holds, with stock attention",
        "",
        f"Commit {version}; SmolLM2-135M-Instruct, float32, greedy; the eval's fact prompts at "
        f"{args.length} tokens, cut to chunk 0, the fact's chunk and the last two chunks ({w} tokens "
        "each), and as many other chunks of the prompt as a column says (a random draw per sample, "
        "one chunk more at a time), in the prompt's order.",
        "",
        f"`{command} --output {args.output}`",
        "",
        header,
        "|---|---|---|" + "---|---|---|" * len(counts),
    ]
    for index, expected, chunk, answers in rows:
        cells = "".join(f" {n} | {cell(answer)} | {score:.0f} |" for n, answer, score in answers)
        lines.append(f"| {index} | {expected} | {chunk} |{cells}")
    totals = ", ".join(
        f"{n} others {sum(r[3][i][2] for r in rows):.0f} / {len(rows)}" for i, n in enumerate(counts))
    lines.append(f"\nRight: {totals}.")
    args.output.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
