"""Can the pooled attention read a fixed number of chunks' keys and still find the answer?

The two-pass selections score a layer's candidate chunks by the
attention its heads give each chunk's keys together (`longheads.pooled_attention`): a
product with every key, per decoded token and layer, so decoding is not flat in context.
A shortlist would bound it: rank the candidates by a cheap per-chunk score, the heads'
softmax of q . rep summed over the heads (a product with one representation per chunk),
and take the pooled attention over the keys of the top M chunks only (M w keys).

Prefills the eval's prompt, but its last token, with two_pass_carry (the default when this study ran),
then feeds the last token and records each layer's first-pass query and pooled attention.
Per layer, the rank (1 = best) of the answer's chunk among the candidates 1..own-2 under
the pooled attention over all keys (today's), the cheap score, and the pooled attention
over the cheap score's top M (rank "-" when the chunk is not shortlisted). Then as
the two-pass selections use them: the most peaked layer under each score (the largest share of its mass
on one chunk) and the answer chunk's rank there; they share that layer's top
ceil((k-3)/2) chunks with every layer.

  python scripts/shortlist_study.py --task needle --length 16384 --samples 3,4 --sizes 8,16,32 --output F
"""

import argparse
from typing import Dict, List

import mlx_longheads  # noqa: F401  (loads OpenBLAS before MLX on Linux)
import mlx.core as mx
import numpy as np

import mlx_longheads.longheads as longheads
from mlx_longheads import LongHeadsConfig, load
from mlx_longheads.eval import prefilled, selection_replaced
from needle_oracle import studied_samples, write_report  # scripts/ is on the path when run


def first_pass(model, prompt: List[int]):
    """The caches after the whole prompt and, per layer, its last token's first-pass query
    [H, D] and pooled attention over the candidates, as `longheads.pooled_attention` gives."""
    cache, calls = prefilled(model, prompt[:-1]), []
    original = longheads.pooled_attention

    def record(queries, layer_cache, own, rope, scale):
        pooled = original(queries, layer_cache, own, rope, scale)
        calls.append((queries[0, :, 0], pooled[0, 0]))
        return pooled

    with selection_replaced(record, "pooled_attention"):
        mx.eval(model(mx.array([prompt[-1:]]), cache=cache))
    return cache, calls[: len(model.layers)]


def shortlist_scores(q: mx.array, cache, rope, scale: float, own: int, sizes: List[int]) -> Dict[str, np.ndarray]:
    """One layer's scores of the candidates 1..own-2: the cheap one, and the pooled
    attention over all their keys and over the keys of the cheap score's top M."""
    w, Hk = cache.chunk_size, cache.kv_heads
    H, D = q.shape
    n = own - 2
    reps = cache.representations[0, :, 1 : own - 1].astype(mx.float32)  # [H, n, D]
    cheap = mx.softmax((reps @ q[:, :, None])[..., 0] * scale, axis=-1).sum(axis=0)
    keys = mx.repeat(cache.keys[0, :, w : (own - 1) * w].astype(mx.float32), H // Hk, axis=0)
    rotated = rope(mx.contiguous(q[:, None, None]), offset=w)[:, 0, 0]  # one chunk after the key's
    key_scores = (keys @ rotated[:, :, None])[..., 0] * scale  # [H, n*w]
    scores = {"cheap": np.array(cheap)}
    order = np.argsort(-scores["cheap"])
    for name, chunks in [("all", np.arange(n))] + [(f"M={m}", order[:m]) for m in sizes]:
        allowed = np.zeros(n, bool)
        allowed[chunks] = True
        masked = mx.where(mx.repeat(mx.array(allowed), w)[None], key_scores, -mx.inf)
        mass = mx.softmax(masked, axis=-1).reshape(H, n, w).sum(axis=(0, 2))
        scores[name] = np.where(allowed, np.array(mass), -np.inf)
    return scores


def rank(scores: np.ndarray, column: int) -> str:
    return "-" if scores[column] == -np.inf else str(int((scores > scores[column]).sum()) + 1)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="needle", choices=["needle", "multikey", "passkey"])
    parser.add_argument("--samples", default="3,4")
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--sizes", default="8,16,32", help="shortlist sizes M, in chunks")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    sizes = [int(m) for m in args.sizes.split(",")]
    model, tokenizer = load(longheads=LongHeadsConfig(selection="two_pass_carry"))
    attention = model.layers[0].self_attn
    config, scale = attention.config, attention.scale
    w, shared = config.chunk_size, config.shared_slots
    names = ["all", "cheap"] + [f"M={m}" for m in sizes]
    rows = [
        f"# Shortlisted pooled attention: rank of the answer's chunk ({args.task}, {args.length} tokens, last token)",
        "",
        f"Command: `python scripts/shortlist_study.py --task {args.task} --samples {args.samples}"
        f" --length {args.length} --sizes {args.sizes}` (two_pass_carry, L {config.attention_length},"
        f" F {config.full_attention_length}, chunk {w}: {shared} shared slots). Cells: layer: rank under"
        " " + " / ".join(names) + " (all: pooled attention over every candidate's keys, today's;"
        " cheap: heads' softmax of q . rep summed; M=m: pooled attention over the keys of cheap's top m)."
        " '-': not shortlisted.",
        "",
    ]
    for index, sample, prompt, chunk, own in studied_samples(args.task, tokenizer, args.length, args.samples, w, rows):
        column = chunk - 1
        cache, calls = first_pass(model, prompt)
        cells, peaked = [], {name: (-1.0, 0, "") for name in names}
        for layer_index, (layer, layer_cache, (q, pooled)) in enumerate(zip(model.layers, cache, calls)):
            scores = shortlist_scores(q, layer_cache, layer.self_attn.rope, scale, own, sizes)
            library = np.array(pooled)[1 : own - 1]
            assert np.allclose(scores["all"], library, rtol=1e-3, atol=1e-4), "differs from pooled_attention"
            ranks = {name: rank(scores[name], column) for name in names}
            cells.append(f"{layer_index}: " + "/".join(ranks[name] for name in names))
            for name in names:
                finite = scores[name][np.isfinite(scores[name])]
                share = float(finite.max() / finite.sum())
                if share >= peaked[name][0]:
                    peaked[name] = (share, layer_index, ranks[name])
        rows += [
            f"## Sample {index}: depth {sample.depths[0]:.0%}, {len(prompt)} tokens, answer chunk {chunk}"
            f" of {own - 2} candidates",
            "",
            " · ".join(cells),
            "",
            "- most peaked layer (share; the answer's rank there): "
            + "; ".join(f"{name}: {layer} ({share:.2f}; {r})" for name, (share, layer, r) in peaked.items()),
            f"- the answer's chunk in the {shared} shared slots: "
            + ", ".join(f"{name} {'yes' if r != '-' and int(r) <= shared else 'no'}" for name, (_, _, r) in peaked.items()),
            "",
        ]
        print("\n".join(rows[-6:]), flush=True)
    write_report(rows, args.output)


if __name__ == "__main__":
    main()
