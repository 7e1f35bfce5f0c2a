"""Is a needle whose chunk every head holds at the question lost while the answer is decoded?

Some misses of the two-pass selections answered wrong with the needle's chunk in every
head of every layer at the prompt's last token (the eval's `key_chunk_selected` 1.0):
" 1." for 931103 at 16k, " 2992233." for 299223 at 32k. Each decoded token selects its
chunks anew, from its own query: a digit's query may not lead back to the needle.

Prefills the eval's prompt but its last token with the given selection, then decodes
greedily and records, per step (the prompt's last token, then each answer token), the
share of all heads (the second pass's) whose window holds the answer's
chunk. The cache is then trimmed back to the prompt without its last token and the same
steps rerun with that chunk pinned into every head's first shared slot wherever absent
(the two-pass selections' slots; `longheads.select_chunks_pooled` wrapped): if that answers,
what the answer tokens select is the loss.

  python scripts/answer_decode_study.py --task needle --length 16384 --samples 5 --selection two_pass_carry --output F
"""

import argparse
from typing import List

import mlx_longheads  # noqa: F401  (loads OpenBLAS before MLX on Linux)
import mlx.core as mx

import mlx_longheads.longheads as longheads
from mlx_longheads import LongHeadsConfig, load
from mlx_longheads.eval import prefilled, selection_replaced
from needle_oracle import greedy, studied_samples, write_report  # scripts/ is on the path when run


def decode(model, cache, last: int, steps: int, chunk: int, pin: bool):
    """Greedy tokens after the prompt's `last` token (`needle_oracle.greedy`), and per
    step the share of the heads (of the pass whose output is kept) holding `chunk`."""
    original, selected = longheads.select_chunks_pooled, []

    def select(query_sums, representations, pooled, own, k, shared):
        slots = original(query_sums, representations, pooled, own, k, shared)
        if pin:
            first = slots[..., 1:2]
            held = (slots == chunk).any(axis=-1, keepdims=True)
            slots = mx.concatenate([slots[..., :1], mx.where(held, first, chunk), slots[..., 2:]], axis=-1)
        selected.append((slots == chunk).any(axis=-1).mean().item())
        return slots

    layers, passes = len(model.layers), 2 if model.layers[0].self_attn.config.runs_twice else 1
    with selection_replaced(select, "select_chunks_pooled"):
        tokens = greedy(model, model(mx.array([[last]]), cache=cache), cache, steps)
    per_step = passes * layers  # greedy feeds the last token too: steps + 1 calls, steps reported
    kept = [selected[start + per_step - layers : start + per_step] for start in range(0, steps * per_step, per_step)]
    return tokens, [sum(step) / len(step) for step in kept]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="needle", choices=["needle", "multikey", "passkey"])
    parser.add_argument("--samples", default="5")
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--selection", default="two_pass_carry", choices=["two_pass_carry"])
    parser.add_argument("--steps", type=int, default=8, help="tokens decoded")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    model, tokenizer = load(longheads=LongHeadsConfig(selection=args.selection))
    w = model.layers[0].self_attn.config.chunk_size
    rows: List[str] = [
        f"# Does the answer keep the needle's chunk? ({args.task}, {args.length} tokens, selection {args.selection})",
        "",
        f"Command: `python scripts/answer_decode_study.py --task {args.task} --length {args.length} --samples"
        f" {args.samples} --selection {args.selection} --steps {args.steps}`. Per step (the prompt's last"
        " token, then each decoded token): the share of all heads whose window holds the answer's chunk;"
        " 'pinned': the same steps with the chunk put into every head's first shared slot where absent.",
        "",
        "| sample | depth | expected | run | answer | share of heads per step |",
        "|---|---|---|---|---|---|",
    ]
    for index, sample, prompt, chunk, own in studied_samples(args.task, tokenizer, args.length, args.samples, w, rows):
        cache = prefilled(model, prompt[:-1])
        for run, pin in (("library", False), ("pinned", True)):
            tokens, shares = decode(model, cache, prompt[-1], args.steps, chunk, pin)
            if any(layer_cache.trim(args.steps + 1) != args.steps + 1 for layer_cache in cache):
                raise SystemExit("the cache could not be trimmed back exactly: use fewer --steps")
            rows.append(
                f"| {index} | {sample.depths[0]:.0%} | {sample.expected[0]} | {run} | {tokenizer.decode(tokens)!r}"
                f" | {' '.join(f'{s:.2f}' for s in shares)} |"
            )
            print(rows[-1], flush=True)
    write_report(rows, args.output)


if __name__ == "__main__":
    main()
