"""LongHeads attention of an earlier commit against the working tree's, one layer, one run.

The old `longheads.py` is read from git (`git show REV:mlx_longheads/longheads.py`)
and imported beside the current one; both attend over the same random cache (see
mlx_longheads.bench.fill), taking turns step by step, so machine load hits them alike.
Reports the median decode step and prefill block at each context, as markdown.

  python benchmarks/before_after.py --rev 289355a --output results/kernel_before_after.md
"""

import argparse
import statistics
import subprocess
import sys
import types
from pathlib import Path

import mlx_longheads  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx
from mlx import nn

from mlx_longheads import bench, longheads
from mlx_longheads.cache import LongHeadsCache
from mlx_longheads.config import LongHeadsConfig
from mlx_longheads.generation import format_context_length, parse_context_length

SHAPES = {  # heads, KV heads, head dim, RoPE base; trained length 8192 for both
    "smollm2-135m": (9, 3, 64, 100000.0),
    "llama-3-8b": (32, 8, 128, 500000.0),
}


def old_module(rev: str) -> types.ModuleType:
    source = subprocess.run(
        ["git", "show", f"{rev}:mlx_longheads/longheads.py"], check=True, capture_output=True, text=True
    ).stdout
    module = types.ModuleType(f"longheads_{rev}")
    module.__package__ = "mlx_longheads"  # its relative imports resolve to today's cache and config
    exec(compile(source, f"{rev}:mlx_longheads/longheads.py", "exec"), module.__dict__)
    return module


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--rev", required=True, help="the commit to compare with")
    parser.add_argument("--shapes", choices=SHAPES, default="llama-3-8b")
    parser.add_argument("--contexts", default="8k,32k,128k",
                        type=lambda s: [parse_context_length(c) for c in s.split(",")])
    parser.add_argument("--selections", default="query_head,kv_head", type=lambda s: s.split(","))
    parser.add_argument("--decode-steps", type=int, default=10)
    parser.add_argument("--prefill-block", type=int, default=512)
    parser.add_argument("--prefill-repeats", type=int, default=2)
    parser.add_argument("--output", type=Path, default=None)
    args = parser.parse_args()

    H, Hk, D, base = SHAPES[args.shapes]
    rope, scale = nn.RoPE(D, base=base), D**-0.5
    versions = {args.rev: old_module(args.rev), "now": longheads}
    lines = [
        f"# LongHeads attention, {args.rev} against the working tree: one {args.shapes} layer, CPU float32",
        "",
        "Command: `python benchmarks/before_after.py " + " ".join(sys.argv[1:]) + "`",
        "",
        f"Median of {args.decode_steps} decode steps and {args.prefill_repeats} prefill blocks of "
        f"{args.prefill_block} tokens appended at the context, the versions taking turns; cache filled "
        "at random as in `mlx_longheads.bench`.",
        "",
        f"| selection | context | decode ms {args.rev} | decode ms now | speed-up "
        f"| prefill tok/s {args.rev} | prefill tok/s now | speed-up |",
        "|---|---|---|---|---|---|---|---|",
    ]
    for selection in args.selections:
        config = LongHeadsConfig(selection=selection).resolve(8192)
        for context in args.contexts:
            cache = LongHeadsCache(config.chunk_size)
            bench.fill(cache, context, context + args.prefill_block, H, Hk, D, mx.float32)
            times = {(name, tokens): [] for name in versions for tokens in (1, args.prefill_block)}
            runs = [(1, args.decode_steps + 1), (args.prefill_block, args.prefill_repeats)]
            for tokens, repeats in runs:
                for _ in range(repeats):
                    for name, module in versions.items():
                        cache.offset = context
                        q = mx.random.normal((1, H, tokens, D))
                        k, v = (mx.random.normal((1, Hk, tokens, D)) for _ in range(2))
                        mx.eval(q, k, v)
                        seconds = bench.timed(
                            lambda: module.longheads_attention(q, k, v, cache, rope, scale, config)
                        )
                        times[name, tokens].append(seconds)
            old, new = args.rev, "now"
            decode = {n: 1000 * statistics.median(times[n, 1][1:]) for n in versions}
            prefill = {n: args.prefill_block / statistics.median(times[n, args.prefill_block]) for n in versions}
            lines.append(
                f"| {selection} | {format_context_length(context)} | {decode[old]:.2f} | {decode[new]:.2f} "
                f"| {decode[old] / decode[new]:.2f}x | {prefill[old]:.1f} | {prefill[new]:.1f} "
                f"| {prefill[new] / prefill[old]:.2f}x |"
            )
            bench.log(lines[-1])
    text = "\n".join(lines) + "\n"
    print(text)
    if args.output:
        args.output.write_text(text)


if __name__ == "__main__":
    main()
