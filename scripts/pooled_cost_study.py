"""What a prompt chunk's pooled attention costs, layer by layer, as the context grows.

"one_pass_prompt" (and the default, which reads a prompt as it does) measures every layer's
pooled attention once per prompt chunk past F: one query per head against every key, a softmax
over them all. The bench put its prefill past F at 0.85x the per-head rule's at 32k and 0.70x at
128k (README). This times `longheads.pooled_attention` alone, and the exponentials of its
softmax alone, on caches of random keys at the bench's shapes (the embedded model's heads), and
sets them beside the bench's difference per chunk: whether the gap is the softmax's
exponentials, which this CPU computes at 50-90 M/s and a GPU at a rate that makes them vanish.

  python scripts/pooled_cost_study.py --contexts 8k,32k,128k --output results/pooled_cost_study.md
"""

import argparse
import statistics
from pathlib import Path

import mlx_longheads  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx

from mlx_longheads.bench import fill, model_shapes, timed
from mlx_longheads.cache import LongHeadsCache
from mlx_longheads.eval import code_version
from mlx_longheads.generation import parse_context_length
from mlx_longheads.load import load
from mlx_longheads.longheads import pooled_attention


def median_seconds(step, repeats: int) -> float:
    """The median of `repeats` timed calls after one that warms up."""
    timed(step)
    return statistics.median(timed(step) for _ in range(repeats))


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--contexts", default="8k,32k,128k")
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args()

    model, _ = load()
    shapes = model_shapes(model)
    H, Hk, D, layers = shapes["heads"], shapes["kv_heads"], shapes["head_dim"], shapes["layers"]
    rope = model.layers[0].self_attn.rope
    commit = code_version()
    rows = []
    for context in [parse_context_length(c) for c in args.contexts.split(",")]:
        cache = LongHeadsCache(256)
        fill(cache, context, context + 512, H, Hk, D, mx.float32)
        queries = mx.random.normal((1, H, 2, D))  # a 512-token block: two groups, one call a layer
        own = mx.array([context // 256, context // 256 + 1])
        pooled = median_seconds(lambda: pooled_attention(queries, cache, own, rope, D**-0.5), args.repeats)
        scores = mx.random.normal((1, H, 2, context))
        mx.eval(scores)
        exps = median_seconds(lambda: mx.exp(scores), args.repeats)
        rows.append(
            f"| {context // 1024}k | {pooled * 1e3:.1f} | {exps * 1e3:.1f} | {H * 2 * context / exps / 1e6:.0f} |"
            f" {pooled * layers:.2f} |"
        )
        print(rows[-1], flush=True)
        del cache
    lines = [
        "# The cost of a prompt chunk's pooled attention",
        "",
        f"Commit {commit}; the embedded model's shapes ({layers} layers, {H} heads, {Hk} KV heads, head dim {D}),"
        f" float32, the CPU; random keys (`bench.fill`); medians of {args.repeats} calls after one to warm up.",
        "",
        f"`python scripts/pooled_cost_study.py --contexts {args.contexts} --repeats {args.repeats} --output {args.output}`",
        "",
        "| context | `pooled_attention`, one layer, a 512-token block (two groups), ms |"
        " its exponentials alone (`mx.exp` of a score per head, group and key), ms | M exponentials / s |"
        " every layer, one block, s |",
        "|---|---|---|---|---|",
        *rows,
        "",
    ]
    args.output.write_text("\n".join(lines))


if __name__ == "__main__":
    main()
