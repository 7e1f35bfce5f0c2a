"""Does pooling over a layer's heads and the question's tokens find the answer's chunk?

Prefills the eval's prompt with LongHeads (default configuration, but the paper's per-head
selection) except its last Q tokens, feeds those one at a time and records each layer's raw queries. Then, per layer,
the rank (1 = best) of the answer's chunk among the candidates 1..own-2 under:

  share   the share of heads whose own top k-3 by q . rep holds it (today's rule, last token)
  rep     sum over heads and the Q tokens of softmax_c(scale q . rep_c): cheap, O(chunks)
  mass    sum over heads and the Q tokens of the attention mass each chunk's keys get,
          with the query placed one chunk after the key's chunk (R(q, w) . k~): O(keys)
  mass 1  the same at the last token only
  bound   sum over heads and the Q tokens of softmax_c(scale * Quest's bound), the bound
          sum_d max(q'_d min_j k~_jd, q'_d max_j k~_jd) from per-chunk key minima and maxima

Cells are `share/rank rep/rank mass/rank mass 1`; the last lines say at which layers each pooled rank is
1 and the rank when a band of layers is pooled together (each layer's scores normalised).

  python scripts/pooled_score_study.py --task needle --length 16384 --samples 3,4 --output F
"""

import argparse
from typing import List

import mlx_longheads  # noqa: F401  (loads OpenBLAS before MLX on Linux)
import mlx.core as mx
import numpy as np

from mlx_longheads import LongHeadsConfig, load
from mlx_longheads.eval import prefilled, select_chunks_replaced
import mlx_longheads.longheads as longheads
from needle_oracle import studied_samples, write_report  # scripts/ is on the path when run


def tail_queries(model, prompt: List[int], tail: int):
    """The caches after the prompt and, per layer, the tail's raw queries [H, Q, D]."""
    cache, per_call = prefilled(model, prompt[:-tail]), []
    original = longheads.select_chunks

    def record(query_sums, *args, **kwargs):
        per_call.append(query_sums[0, :, 0])
        return original(query_sums, *args, **kwargs)

    with select_chunks_replaced(record):
        for token in prompt[-tail:]:
            mx.eval(model(mx.array([[token]]), cache=cache))
    layers = len(model.layers)
    queries = [mx.stack(per_call[i::layers], axis=1) for i in range(layers)]
    return cache, queries


def layer_scores(q: mx.array, cache, rope, scale: float, own: int) -> dict:
    """Per-head shares and pooled scores [C-candidates] of one layer; q [H, Q, D]."""
    w, C = cache.chunk_size, cache.complete_chunks
    H, Q, D = q.shape
    Hk = cache.kv_heads
    reps = cache.representations[0, :, :C].astype(mx.float32)  # [H, C, D]
    rep_scores = (q @ reps.swapaxes(-1, -2))[:, :, 1 : own - 1] * scale  # [H, Q, cand]
    keys = cache.keys[0, :, : C * w].astype(mx.float32)  # [Hk, C*w, D]
    keys = mx.repeat(keys, H // Hk, axis=0)
    rotated = rope(q[:, None], offset=w)[:, 0]  # [H, Q, D]
    key_scores = (rotated @ keys.swapaxes(-1, -2)) * scale  # [H, Q, C*w]
    low = keys.reshape(H, C, w, D).min(axis=2)[:, None]  # [H, 1, C, D]
    high = keys.reshape(H, C, w, D).max(axis=2)[:, None]
    bound = mx.maximum(low * rotated[:, :, None], high * rotated[:, :, None]).sum(-1) * scale
    bound = bound[:, :, 1 : own - 1]  # [H, Q, candidates]
    key_mass = mx.softmax(key_scores, axis=-1).reshape(H, Q, C, w).sum(-1)[:, :, 1 : own - 1]
    return {
        "last": np.array(rep_scores[:, -1]),
        "rep": np.array(mx.softmax(rep_scores, axis=-1).sum(axis=(0, 1))),
        "mass": np.array(key_mass.sum(axis=(0, 1))),
        "mass 1": np.array(key_mass[:, -1].sum(axis=0)),
        "bound": np.array(mx.softmax(bound, axis=-1).sum(axis=(0, 1))),
    }


def rank(scores: np.ndarray, column: int) -> int:
    return int((scores > scores[column]).sum()) + 1


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="needle", choices=["needle", "multikey", "passkey"])
    parser.add_argument("--samples", default="3,4")
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--tail", type=int, default=40, help="question tokens pooled (Q)")
    parser.add_argument("--band", default="0.45-0.8", help="layers pooled together, as fractions of depth")
    parser.add_argument("--full-attention-length", type=int, default=None)
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    # The paper's per-head selection builds the cache (its hook records the tail's queries).
    config = LongHeadsConfig(selection="query_head", full_attention_length=args.full_attention_length)
    model, tokenizer = load(longheads=config)
    attention = model.layers[0].self_attn
    w, k = attention.config.chunk_size, attention.config.num_chunks
    n_layers = len(model.layers)
    low, high = (float(x) for x in args.band.split("-"))
    band = [i for i in range(n_layers) if low <= i / n_layers <= high]
    rows = [
        f"# Pooled chunk scores: rank of the answer's chunk ({args.task}, {args.length} tokens, last {args.tail} tokens pooled)",
        "",
        f"Command: `python scripts/pooled_score_study.py --task {args.task} --samples {args.samples}"
        f" --length {args.length} --tail {args.tail} --band {args.band}"
        + (f" --full-attention-length {args.full_attention_length}" if args.full_attention_length else "")
        + f"` (L {attention.config.attention_length}, F {attention.config.full_attention_length},"
        f" chunk {w}: {k - 3} retrieved slots per head). Cells: layer: share of heads / rank under pooled"
        " q . rep / pooled attention mass / the same at the last token / pooled Quest bound.",
        "",
    ]
    for index, sample, prompt, chunk, own in studied_samples(args.task, tokenizer, args.length, args.samples, w, rows):
        column, candidates = chunk - 1, own - 2
        cache, queries = tail_queries(model, prompt, args.tail)
        cells, firsts = [], {"rep": [], "mass": [], "mass 1": [], "bound": []}
        pooled = {name: np.zeros(candidates) for name in firsts}
        for layer_index, (layer, layer_cache, q) in enumerate(zip(model.layers, cache, queries)):
            scores = layer_scores(q, layer_cache, layer.self_attn.rope, attention.scale, own)
            share = float(np.mean([rank(s, column) <= k - 3 for s in scores["last"]]))
            ranks = {name: rank(scores[name], column) for name in firsts}
            cells.append(f"{layer_index}: {share:.2f}/" + "/".join(map(str, ranks.values())))
            for name in firsts:
                if ranks[name] == 1:
                    firsts[name].append(layer_index)
                if layer_index in band:
                    pooled[name] += scores[name] / scores[name].sum()
        rows += [
            f"## Sample {index}: depth {sample.depths[0]:.0%}, {len(prompt)} tokens, answer chunk {chunk}"
            f" of {candidates} candidates (chance of a head's top {k - 3}: {(k - 3) / candidates:.2f})",
            "",
            " · ".join(cells),
            "",
            "- rank 1 at layers: " + "; ".join(f"{name}: {layers or 'none'}" for name, layers in firsts.items()),
            f"- layers {band[0]}-{band[-1]} pooled together: rank "
            + ", ".join(f"{rank(pooled[name], column)} ({name})" for name in firsts),
            "",
        ]
        print("\n".join(rows[-7:]), flush=True)
    write_report(rows, args.output)


if __name__ == "__main__":
    main()
