"""Which chunk score would find the needle? The paper's q . rep against alternatives.

Prefills the eval's prompt (passkey or needle) with LongHeads, then, at the prompt's last
token, scores every candidate chunk of every layer and query head with several rules and
counts the heads whose top k-3 candidates (the retrieved slots) hold the answer's chunk.
The rules see the same cache: keys rotated inside their chunk (k~), the representations,
and the last token's raw query q (before RoPE); q' = R(q, w) places the query one chunk
after the key's chunk (the rotated score of the ablations).

  paper     q . rep                   (the library's rule)
  rotated   q' . rep
  mean key  q' . mean_j k~_j
  bound     sum_d max(q'_d min_d k~, q'_d max_d k~)   (Quest's upper bound)
  max key   max_j q' . k~_j
  mass      logsumexp_j q' . k~_j     (the attention the chunk would get)

  python scripts/chunk_score_study.py --task needle --samples 1,2,3,4,5,6,7,8,9 --output results/chunk_scores_needle.md
"""

import argparse
from typing import Dict, List

import mlx_longheads  # noqa: F401  (loads OpenBLAS before MLX on Linux)
import mlx.core as mx

import mlx_longheads.longheads as longheads
from mlx_longheads.eval import prefilled, select_chunks_replaced
from needle_oracle import candidate_samples, paper_threshold_model, write_report  # scripts/ is on the path when run

RULES = ["paper", "rotated", "mean key", "bound", "max key", "mass"]


def last_token_queries(model, prompt: List[int]) -> tuple:
    """The caches after the prompt and, per layer, the last token's raw query [H, D]."""
    cache, queries = prefilled(model, prompt[:-1]), []
    original = longheads.select_chunks

    def record(query_sums, *args, **kwargs):
        queries.append(query_sums[0, :, 0])
        return original(query_sums, *args, **kwargs)

    with select_chunks_replaced(record):
        mx.eval(model(mx.array([prompt[-1:]]), cache=cache))
    return cache, queries


def chunk_scores(q: mx.array, cache, rope, scale: float) -> Dict[str, mx.array]:
    """Each rule's score [H, C] of the C complete chunks for one layer's query q [H, D]."""
    w, C = cache.chunk_size, cache.complete_chunks
    H, D = q.shape
    Hk = cache.kv_heads
    keys = cache.keys[0, :, : C * w].reshape(Hk, C, w, D).astype(mx.float32)
    keys = mx.repeat(keys, H // Hk, axis=0)  # [H, C, w, D]
    reps = cache.representations[0, :, :C].astype(mx.float32)  # [H, C, D]
    rotated = rope(q[:, None, None], offset=w)[:, 0, 0]  # [H, D]
    key_scores = (keys @ rotated[:, None, :, None])[..., 0] * scale  # [H, C, w]
    low, high = keys.min(axis=2), keys.max(axis=2)
    return {
        "paper": (reps @ q[:, :, None])[..., 0],
        "rotated": (reps @ rotated[:, :, None])[..., 0],
        "mean key": (keys.mean(axis=2) @ rotated[:, :, None])[..., 0],
        "bound": mx.maximum(low * rotated[:, None], high * rotated[:, None]).sum(axis=-1),
        "max key": key_scores.max(axis=-1),
        "mass": mx.logsumexp(key_scores, axis=-1),
    }


def share_selecting(scores: mx.array, chunk: int, own: int, k: int) -> float:
    """Share of heads whose top k-3 of chunks 1..own-2 holds `chunk`."""
    candidates = scores[:, 1 : own - 1]
    rank = (candidates > candidates[:, chunk - 1 : chunk]).sum(axis=-1)
    return (rank < k - 3).astype(mx.float32).mean().item()


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="needle", choices=["needle", "passkey"])
    parser.add_argument("--samples", default="3,4,9")
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    model, tokenizer = paper_threshold_model()
    attention = model.layers[0].self_attn
    config = attention.config
    w, k = config.chunk_size, config.num_chunks
    rows = [
        f"# Chunk scores at the last prompt token: share of heads that would retrieve the answer's chunk ({args.task}, {args.length} tokens)",
        "",
        f"Command: `python scripts/chunk_score_study.py --task {args.task} --samples {args.samples}"
        f" --length {args.length}` (L {config.attention_length}, chunk {w}: {k - 3} retrieved slots)",
        "",
        f"| sample | depth | answer chunk | chance | {' | '.join(RULES)} |",
        "|---|---|---|---|" + "---|" * len(RULES),
    ]
    for index, sample, prompt, chunk, own in candidate_samples(args.task, tokenizer, args.length, args.samples, w):
        if chunk is None:
            rows.append(f"| {index} | {sample.depths[0]:.0%} | - | - | forced chunk, not a candidate |")
            continue
        cache, queries = last_token_queries(model, prompt)
        shares = {rule: [] for rule in RULES}
        for layer, layer_cache, q in zip(model.layers, cache, queries):
            scores = chunk_scores(q, layer_cache, layer.self_attn.rope, attention.scale)
            for rule in RULES:
                shares[rule].append(share_selecting(scores[rule], chunk, own, k))
        means = " | ".join(f"{sum(s) / len(s):.2f}" for s in shares.values())
        rows.append(f"| {index} | {sample.depths[0]:.0%} | {chunk} | {(k - 3) / (own - 2):.2f} | {means} |")
        print(rows[-1], flush=True)
    write_report(rows, args.output)


if __name__ == "__main__":
    main()
