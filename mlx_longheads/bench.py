"""Speed and memory of LongHeads against mlx-lm's stock attention: one run, one machine.

Model level (default): the whole model (the embedded SmolLM2 unless --model) at each
context C. Prefilling 64k+ real tokens takes hours on a CPU, so every layer's cache is
filled up to C with random keys and values (and, for LongHeads, random chunk
representations): one random block of FILL_TOKENS tokens repeated, which costs the
attention what real data would. Then, per method and context:
  decode: median time of single-token steps appended at C (after one warm-up step),
    and their mean;
  prefill: tokens/s of one --prefill-block of tokens appended at C;
  memory: MLX's peak during those steps (weights and cache included), next to the
    weights plus the K/V part of the cache (`longheads-q8` stores K/V in 8 bits: on the
    CPU that is for memory, MLX's CPU quantized matmul being far slower than float32);
  reads: the bytes a decoded token reads (`traffic.decode_reads`), for the bench's model
    and, at 32k and 128k, for Llama-3-8B with 4-bit weights and float16 K/V: what sets
    decode speed where decoding is bound by memory traffic (Apple silicon).
Methods take turns at each context, so a drifting machine load hits them alike.

Kernel level (--kernel): one attention layer at Llama-3-8B shapes (32 query heads,
8 KV heads, head dim 128, trained length 8192 so LongHeads' defaults are chunk 256,
attention length 2048), LongHeads' `longheads_attention` against
`mx.fast.scaled_dot_product_attention` over the whole cache (after mlx-lm's cache
update), for a decode step and a prefill block, with the bytes of K/V each reads and
writes, the GB/s that makes, and the machine's measured read bandwidth to hold it to.

  python -m mlx_longheads.bench --contexts 4k,8k,16k,32k,64k,128k --output results/bench
  python -m mlx_longheads.bench --kernel --contexts 4k,8k,16k,32k,64k,128k --output results/kernel
"""

import argparse
import gc
import json
import platform
import statistics
import sys
import time
from dataclasses import asdict, replace
from functools import partial
from pathlib import Path
from typing import Callable, Dict, List, Optional

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
from mlx_lm.models.cache import KVCache, make_prompt_cache

from .cache import LongHeadsCache
from .config import LongHeadsConfig
from .eval import code_version
from .generation import format_context_length, parse_context_length
from .longheads import longheads_attention
from .memory import WORKSPACE_BYTES, available_bytes, cache_bytes, kv_element_bytes, weight_bytes
from .models import apply_longheads, head_dim, longheads_config, make_cache, make_relay, with_linked_call
from .traffic import PARTS, decode_reads, shape_of
from . import traffic

METHODS: Dict[str, Optional[LongHeadsConfig]] = {
    "longheads": LongHeadsConfig(),  # the default: one_pass_reread, a prompt chunk once, a token once
    "longheads-head": LongHeadsConfig(selection="query_head"),  # each query head selects
    "longheads-kv": LongHeadsConfig(selection="kv_head"),  # each KV head selects
    "full": None,  # mlx-lm's stock attention over the whole cache
    "longheads-q8": LongHeadsConfig(kv_bits=8),  # keys and values in 8 bits
    "longheads-filter": LongHeadsConfig(selection="one_pass_filter"),  # one pass, a calibrated filter layer
    "longheads-carry": LongHeadsConfig(selection="two_pass_carry"),  # each group twice past F, a token too
    "longheads-prompt": LongHeadsConfig(selection="two_pass_prompt"),  # a prompt chunk twice, a token once
    "longheads-one-pass": LongHeadsConfig(selection="one_pass_prompt"),  # the default without the question read again
}
DEFAULT_METHODS = "longheads,longheads-head,full"
FILL_TOKENS = 8192  # the random block a filled cache repeats
READS_CONTEXTS = (32768, 131072)  # where the reads at Llama-3-8B shapes are reported
LLAMA3_8B = dict(heads=32, kv_heads=8, head_dim=128, trained_length=8192, rope_base=500000.0)


def log(message: str) -> None:
    print(message, file=sys.stderr, flush=True)


def random_buffer(heads: int, tokens: int, head_dim: int, dtype: mx.Dtype) -> mx.array:
    """[1, heads, tokens, head_dim]: one random block of FILL_TOKENS repeated."""
    block = mx.random.normal((1, heads, min(tokens, FILL_TOKENS), head_dim)).astype(dtype)
    repeats = -(-tokens // block.shape[2])
    return mx.contiguous(mx.tile(block, (1, 1, repeats, 1))[:, :, :tokens])


def fill(cache, context: int, capacity: int, heads: int, kv_heads: int, head_dim: int, dtype):
    """Make a cache hold `context` random tokens, with room up to `capacity`."""
    if isinstance(cache, LongHeadsCache):
        w = cache.chunk_size
        capacity = -(-capacity // w) * w
        cache.max_size = capacity
        cache.representations = random_buffer(heads, capacity // w, head_dim, dtype)
        cache.queries = mx.zeros((1, heads, w, head_dim), dtype)
    keys, values = (random_buffer(kv_heads, capacity, head_dim, dtype) for _ in range(2))
    if isinstance(cache, LongHeadsCache):
        keys, values = cache.encode(keys), cache.encode(values)
    cache.keys, cache.values = keys, values
    cache.offset = context
    mx.eval(cache.keys, cache.values, getattr(cache, "representations", None))


def release() -> None:
    gc.collect()
    mx.clear_cache()
    mx.reset_peak_memory()


def timed(step: Callable[[], mx.array]) -> float:
    start = time.perf_counter()
    mx.eval(step())
    return time.perf_counter() - start


def read_bandwidth(gigabytes: float = 1.0) -> float:
    """GB/s of one MLX reduction over a large array: what this machine reads at."""
    a = mx.ones((int(gigabytes * 2**30) // 4,), mx.float32)
    mx.eval(a)
    seconds = min(timed(lambda: a.sum()) for _ in range(3))
    return a.nbytes / seconds / 1e9


def machine() -> dict:
    return dict(
        platform=platform.platform(),
        processor=platform.processor() or platform.machine(),
        device=str(mx.default_device()),
        mlx=mx.__version__,
        mlx_lm=mlx_lm.__version__,
    )


# Model level


def model_shapes(model: nn.Module) -> dict:
    args = model.args
    heads, kv_heads = args.num_attention_heads, args.num_key_value_heads
    return dict(
        layers=len(model.layers),
        heads=heads,
        kv_heads=kv_heads,
        head_dim=head_dim(args),
        dtype=str(model.layers[0].input_layernorm.weight.dtype),
        trained_length=args.max_position_embeddings,
    )


def prefill_times(caches, context: int, block: Callable[[], mx.array], args) -> List[float]:
    """Seconds of --prefill-repeats prefill blocks, each appended at `context`."""
    times = []
    for _ in range(args.prefill_repeats):
        for cache in caches:
            cache.offset = context
        times.append(timed(block))
    return times


def bench_model_at(model, shapes, context: int, args, prefill: bool) -> dict:
    """Decode steps, then a prefill block, both appended at `context`."""
    caches = make_prompt_cache(model)
    room = max(args.decode_steps + 1, args.prefill_block)
    dtype = getattr(mx, shapes["dtype"].split(".")[-1])
    for cache in caches:
        fill(cache, context, context + room, shapes["heads"], shapes["kv_heads"], shapes["head_dim"], dtype)
    vocab = model.args.vocab_size
    release()

    def step(tokens: int) -> mx.array:
        return model(mx.random.randint(0, vocab, (1, tokens)), cache=caches)

    times = [timed(lambda: step(1)) for _ in range(args.decode_steps + 1)][1:]
    row = dict(
        decode_ms=1000 * statistics.median(times),
        decode_mean_ms=1000 * statistics.mean(times),
        decode_ms_all=[round(1000 * t, 2) for t in times],
        peak_decode_bytes=mx.get_peak_memory(),
    )
    if prefill:
        mx.reset_peak_memory()
        seconds = statistics.median(prefill_times(caches, context, lambda: step(args.prefill_block), args))
        row.update(
            prefill_tokens=args.prefill_block,
            prefill_seconds=seconds,
            prefill_tokens_per_s=args.prefill_block / seconds,
            peak_prefill_bytes=mx.get_peak_memory(),
        )
    tokens = context + args.decode_steps + 1
    element = kv_element_bytes(dtype.size, longheads_config(model))
    row.update(
        kv_bytes=2 * shapes["layers"] * shapes["kv_heads"] * tokens * shapes["head_dim"] * element,
        cache_bytes=sum(c.nbytes for c in caches),
    )
    del caches
    release()
    return row


def use_method(model: nn.Module, stock: List[nn.Module], config: Optional[LongHeadsConfig]) -> None:
    """Give the model stock attention (config None) or LongHeads, sharing the weights."""
    for layer, attention in zip(model.layers, stock):
        layer.self_attn = attention
    vars(model).pop("make_cache", None)  # apply_longheads' instance attribute
    model.__class__ = with_linked_call(type(model), None)
    if config is not None:
        apply_longheads(model, config)


def model_bench(args) -> dict:
    from .load import load

    # One model whose attention is switched: peak memory then holds one copy of the weights.
    model = load(args.model, longheads=None)[0]
    stock = [layer.self_attn for layer in model.layers]
    shapes, weights = model_shapes(model), weight_bytes(model)
    rows = []
    for context in args.contexts:
        for method in args.methods:
            full = METHODS[method] is None
            needed = weights + cache_bytes(model, context, None) + WORKSPACE_BYTES
            if full and (context > args.full_max or needed > available_bytes()):
                log(f"{context:>7} {method}: skipped (full attention past --full-max or memory)")
                continue
            use_method(model, stock, METHODS[method])
            prefill = not full or context <= args.full_prefill_max
            log(f"{context:>7} {method}: filling, {args.decode_steps} decode steps"
                + (f", a {args.prefill_block}-token prefill block" if prefill else ""))
            row = dict(context=context, method=method, weights_bytes=weights)
            row.update(bench_model_at(model, shapes, context, args, prefill))
            row["decode_read_bytes"] = sum(decode_reads(shape_of(model), longheads_config(model), context).values())
            peak = row["peak_bytes"] = max(row["peak_decode_bytes"], row.get("peak_prefill_bytes", 0))
            row["peak_over_weights_kv"] = peak / (weights + row["kv_bytes"])
            rows.append(row)
            log(f"{context:>7} {method}: decode {row['decode_ms']:.1f} ms/token"
                + (f", prefill {row['prefill_tokens_per_s']:.1f} tok/s" if prefill else "")
                + f", peak {peak / 1e9:.2f} GB")
    config = METHODS["longheads"].resolve(shapes["trained_length"])
    return dict(
        kind="model",
        model=args.model or "embedded SmolLM2-135M-Instruct",
        shapes=shapes,
        weights_bytes=weights,
        longheads=asdict(config),
        decode_steps=args.decode_steps,
        prefill_block=args.prefill_block,
        prefill_repeats=args.prefill_repeats,
        fill=f"random keys/values (and representations): one {FILL_TOKENS}-token random block repeated",
        results=rows,
        reads_llama3_8b=llama3_8b_reads(args.methods),
    )


def llama3_8b_reads(methods: List[str]) -> List[dict]:
    """What each method's decoded token reads at Llama-3-8B shapes, by part (bytes)."""
    rows = []
    for context in READS_CONTEXTS:
        for method in methods:
            config = METHODS[method]
            if config is not None:
                config = config.resolve(traffic.LLAMA3_8B.trained_length, traffic.LLAMA3_8B.head_dim)
            reads = decode_reads(traffic.LLAMA3_8B, config, context)
            rows.append(dict(context=context, method=method, total=sum(reads.values()), **reads))
    return rows


# Kernel level


def kernel_bytes(method: str, shape: dict, config: LongHeadsConfig, context: int, tokens: int) -> int:
    """K/V bytes one call reads and writes (representations included for LongHeads).

    Full attention reads the whole cache once (a lower bound for a prefill block);
    LongHeads reads, per group of queries sharing a selection, its window's chunks (and,
    with a selection that links layers, every key once per group and pass, for the
    layer's pooled attention: the layer is the filter layer of a filtering selection).
    """
    H, Hk, D, item = shape["heads"], shape["kv_heads"], shape["head_dim"], shape["itemsize"]
    if method == "full":
        return 2 * Hk * (context + 2 * tokens) * D * item
    kv_item = kv_element_bytes(item, config)
    written = 2 * Hk * tokens * D * kv_item
    w, k = config.chunk_size, config.num_chunks
    selecting = Hk if config.selection == "kv_head" else H
    groups = -(-tokens // w)
    window = 2 * selecting * k * w * D * kv_item * groups
    representations = H * (context // w) * D * item
    pooled = Hk * context * D * kv_item * groups if config.links_layers else 0
    return window + representations + pooled + written + H * tokens * D * item  # + queries kept


def kernel_bench(args) -> dict:
    shape = dict(LLAMA3_8B, itemsize=4)
    H, Hk, D = shape["heads"], shape["kv_heads"], shape["head_dim"]
    rope = nn.RoPE(D, base=shape["rope_base"])
    scale = D**-0.5
    bandwidth = read_bandwidth()
    log(f"read bandwidth {bandwidth:.1f} GB/s")

    def inputs(tokens: int):
        q = mx.random.normal((1, H, tokens, D))
        kv = [mx.random.normal((1, Hk, tokens, D)) for _ in range(2)]
        mx.eval(q, *kv)
        return q, *kv

    rows = []
    for context in args.contexts:
        for method in args.methods:
            config = METHODS[method]
            prefill = config is not None or context <= args.full_prefill_max
            if config is not None:
                config = config.resolve(shape["trained_length"], D)
                cache = make_cache(config)
                # One layer linked to itself (the filter layer of a filtering selection): a
                # linked selection's cost per pass.
                linked = make_relay(replace(config, filter_layer=0) if config.filters else config)
                relay = None if linked is None else partial(linked.choose, 0)

                def attend(q, k, v):
                    return longheads_attention(q, k, v, cache, rope, scale, config, relay)
            else:
                cache = KVCache()

                def attend(q, k, v):
                    keys, values = cache.update_and_fetch(rope(k, offset=context), v)
                    mask = "causal" if q.shape[2] > 1 else None
                    q = rope(q, offset=context)
                    return mx.fast.scaled_dot_product_attention(q, keys, values, scale=scale, mask=mask)

            room = max(args.decode_steps, args.prefill_block)
            fill(cache, context, context + room, H, Hk, D, mx.float32)
            release()
            log(f"{context:>7} {method}: kernel decode" + (" and prefill" if prefill else ""))

            def decode_step() -> float:
                cache.offset = context
                q, k, v = inputs(1)
                return timed(lambda: attend(q, k, v))

            times = [decode_step() for _ in range(args.decode_steps + 1)][1:]
            byte_config = config or LongHeadsConfig().resolve(shape["trained_length"], D)
            row = dict(context=context, method=method, decode_ms=1000 * statistics.median(times))
            row["decode_bytes"] = kernel_bytes(method, shape, byte_config, context, 1)
            row["decode_gb_per_s"] = row["decode_bytes"] / (row["decode_ms"] / 1000) / 1e9
            if prefill:
                q, k, v = inputs(args.prefill_block)
                seconds = statistics.median(prefill_times([cache], context, lambda: attend(q, k, v), args))
                row.update(prefill_tokens=args.prefill_block, prefill_seconds=seconds,
                           prefill_tokens_per_s=args.prefill_block / seconds)
                row["prefill_bytes"] = kernel_bytes(method, shape, byte_config, context, args.prefill_block)
                row["prefill_gb_per_s"] = row["prefill_bytes"] / seconds / 1e9
            rows.append(row)
            log(f"{context:>7} {method}: decode {row['decode_ms']:.2f} ms, "
                f"{row['decode_gb_per_s']:.2f} GB/s"
                + (f"; prefill {row['prefill_tokens_per_s']:.0f} tok/s" if prefill else ""))
            del cache, attend
            release()
    return dict(
        kind="kernel",
        shapes=shape,
        dtype="float32" if mx.default_device() == mx.cpu else "float32 (set by the bench)",
        longheads=asdict(LongHeadsConfig().resolve(shape["trained_length"])),
        read_bandwidth_gb_per_s=bandwidth,
        decode_steps=args.decode_steps,
        prefill_block=args.prefill_block,
        prefill_repeats=args.prefill_repeats,
        fill=f"random keys/values (and representations): one {FILL_TOKENS}-token random block repeated",
        results=rows,
    )


# Goals, report, plot


def value(results: List[dict], method: str, context: int, key: str) -> Optional[float]:
    for r in results:
        if r["method"] == method and r["context"] == context and key in r:
            return r[key]
    return None


def goals(report: dict) -> List[dict]:
    """The targets this bench holds the methods to, each with the figure reached (None
    where not measured)."""
    results, out = report["results"], []

    def add(goal: str, figure: Optional[float], target: float, at_least: bool = True, **extra):
        met = None if figure is None else (figure >= target if at_least else figure <= target)
        out.append(dict(goal=goal, figure=figure, target=target, met=met, **extra))

    def ratio(a, b):
        return None if a is None or b is None else a / b

    methods = [m for m in METHODS if m in {r["method"] for r in results}]
    for method in [m for m in methods if m != "full"]:
        for context, target in ((32768, 5), (131072, 15)):
            # Kernel level: the speed-up that moving fewer bytes alone would give.
            bound = ratio(value(results, "full", context, "decode_bytes"), value(results, method, context, "decode_bytes"))
            add(f"{method}: decode at {format_context_length(context)}, times faster than full",
                ratio(value(results, "full", context, "decode_ms"), value(results, method, context, "decode_ms")),
                target, **({"bytes_ratio": bound} if report["kind"] == "kernel" else {}))
        add(f"{method}: decode ms at 128k / at 8k",
            ratio(value(results, method, 131072, "decode_ms"), value(results, method, 8192, "decode_ms")),
            1.5, at_least=False)
        if report["kind"] == "model":
            add(f"{method}: mean decode ms at 128k / at 8k",
                ratio(value(results, method, 131072, "decode_mean_ms"), value(results, method, 8192, "decode_mean_ms")),
                1.5, at_least=False)
        add(f"{method}: prefill tok/s at 64k / at 8k",
            ratio(value(results, method, 65536, "prefill_tokens_per_s"), value(results, method, 8192, "prefill_tokens_per_s")),
            0.7)
        add(f"{method}: prefill at 32k, times faster than full",
            ratio(value(results, method, 32768, "prefill_tokens_per_s"), value(results, "full", 32768, "prefill_tokens_per_s")),
            4)
        if report["kind"] == "model":
            add(f"{method}: peak memory at 128k / (weights + K/V)",
                value(results, method, 131072, "peak_over_weights_kv"), 1.1, at_least=False)
    reads = {(r["context"], r["method"]): r["total"] for r in report.get("reads_llama3_8b", [])}
    for method in [m for m in methods if m not in ("full", "longheads-head") and report["kind"] == "model"]:
        add(f"{method}: bytes a token reads at 128k (Llama-3-8B shapes) / longheads-head's",
            ratio(reads.get((131072, method)), reads.get((131072, "longheads-head"))), 1.15, at_least=False)
        add(f"{method}: mean decode ms at 32k / longheads-head's",
            ratio(value(results, method, 32768, "decode_mean_ms"), value(results, "longheads-head", 32768, "decode_mean_ms")),
            1.2, at_least=False)
        add(f"{method}: prefill tok/s at 32k / longheads-head's",
            ratio(value(results, method, 32768, "prefill_tokens_per_s"), value(results, "longheads-head", 32768, "prefill_tokens_per_s")),
            0.75)
    if report["kind"] == "model" and "longheads-q8" in methods:
        # What 8-bit K/V saves at 128k: its bytes, and the measured peak above the weights.
        weights = report["weights_bytes"]
        for key, what, base in (("kv_bytes", "K/V bytes", 0), ("peak_bytes", "peak memory above the weights", weights)):
            q8, unquantized = (value(results, m, 131072, key) for m in ("longheads-q8", "longheads"))
            add(f"longheads-q8: {what} at 128k / longheads'",
                None if q8 is None or unquantized is None else (q8 - base) / (unquantized - base),
                0.5, at_least=False)
    return out


def fmt(x: Optional[float], digits: int = 1) -> str:
    return "-" if x is None else f"{x:,.{digits}f}"


def markdown(report: dict, command: str) -> str:
    results = report["results"]
    methods = list(dict.fromkeys(r["method"] for r in results))
    contexts = sorted({r["context"] for r in results})
    lines = [
        f"# {'Model' if report['kind'] == 'model' else 'Kernel (one attention layer)'}-level benchmark",
        "",
        f"Command: `{command}`, at commit {report.get('commit', 'not recorded')}.",
        "",
        f"Machine: {report['machine']['platform']}, {report['machine']['processor']}, "
        f"{report['machine']['device']}, MLX {report['machine']['mlx']}, mlx-lm {report['machine']['mlx_lm']}. "
        "Methods took turns at each context, in one run.",
        f"Caches: {report['fill']}, then {report['decode_steps']} single-token decode steps (median) and "
        f"{report['prefill_block']}-token prefill blocks appended at the context "
        f"(median of {report['prefill_repeats']}).",
        f"LongHeads: {report['longheads']}; `longheads-head` selects per query head (the paper's rule), "
        "`longheads-kv` per KV head; "
        "`longheads-q8` stores keys and values in 8 bits (kv_bits=8); `longheads-filter` is one_pass_filter, "
        "`longheads-carry` two_pass_carry (a decoded token in two passes too), `longheads-prompt` "
        "two_pass_prompt (a prompt's chunk in two passes).",
    ]
    if report["kind"] == "kernel":
        lines.append(
            "The two-pass selections run as one layer linked to itself: one pass of the two they "
            "make per token past F (the model-level bench times both)."
        )
    if report["kind"] == "model":
        s = report["shapes"]
        lines.append(
            f"Model: {report['model']}, {s['layers']} layers, {s['heads']} heads, {s['kv_heads']} KV heads, "
            f"head dim {s['head_dim']}, {s['dtype']}; weights {report['weights_bytes'] / 1e9:.2f} GB."
        )
        columns = [("decode ms/token", "decode_ms", 1), ("decode mean ms", "decode_mean_ms", 1),
                   ("decode reads MB", "decode_read_bytes", 1), ("prefill tok/s", "prefill_tokens_per_s", 1),
                   ("peak GB", None, 2), ("peak / (weights + K/V)", "peak_over_weights_kv", 2)]
    else:
        s = report["shapes"]
        lines.append(
            f"Shapes: Llama-3-8B layer, {s['heads']} heads, {s['kv_heads']} KV heads, head dim {s['head_dim']}, "
            f"{report['dtype']}. Bytes = K/V read and written per call (full: the whole cache; LongHeads: "
            f"the selected chunks, representations, writes). Machine read bandwidth (one MLX reduction): "
            f"{report['read_bandwidth_gb_per_s']:.1f} GB/s."
        )
        columns = [("decode ms", "decode_ms", 2), ("decode MB", "decode_bytes", 1), ("decode GB/s", "decode_gb_per_s", 2),
                   ("prefill tok/s", "prefill_tokens_per_s", 1), ("prefill MB", "prefill_bytes", 1),
                   ("prefill GB/s", "prefill_gb_per_s", 2)]
    header = ["context", "method"] + [c[0] for c in columns]
    lines += ["", "| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
    for context in contexts:
        for method in methods:
            r = next((r for r in results if r["context"] == context and r["method"] == method), None)
            if r is None:
                continue
            cells = []
            for _, key, digits in columns:
                if key is None:
                    x = max(r["peak_decode_bytes"], r.get("peak_prefill_bytes", 0)) / 1e9
                elif key.endswith("_bytes"):
                    x = r[key] / 1e6 if key in r else None
                else:
                    x = r.get(key)
                cells.append(fmt(x, digits))
            lines.append(f"| {format_context_length(context)} | {method} | " + " | ".join(cells) + " |")
    lines += reads_table(report)
    lines += ["", "## Goals (ratios within this run)", "", "| goal | figure | target | met |", "|---|---|---|---|"]
    for g in report["goals"]:
        met = {None: "not measured", True: "yes", False: "no"}[g["met"]]
        bound = f" (K/V bytes ratio {fmt(g['bytes_ratio'], 1)})" if g.get("bytes_ratio") else ""
        lines.append(f"| {g['goal']} | {fmt(g['figure'], 2)}{bound} | {g['target']} | {met} |")
    return "\n".join(lines) + "\n"


def reads_table(report: dict) -> List[str]:
    """The bytes a decoded token reads at Llama-3-8B shapes, beside this run's times."""
    rows = report.get("reads_llama3_8b")
    if not rows:
        return []
    lines = [
        "", "## Bytes a decoded token reads, Llama-3-8B shapes", "",
        "32 layers, 32 heads, 8 KV heads, head dim 128, 4-bit weights (4.5 bits with scales and biases, "
        f"{traffic.LLAMA3_8B.weight_bytes / 1e9:.2f} GB read a pass), float16 K/V; `traffic.decode_reads`. "
        "Decoding bound by memory traffic "
        "(Apple silicon) takes about these bytes over the bandwidth. The time is this run's (the "
        "bench's model, on this machine) at the same context.",
        "",
        "| context | method | " + " | ".join(f"{p} GB" for p in PARTS) + " | total GB | / longheads-head | decode mean ms here |",
        "|" + "---|" * (len(PARTS) + 5),
    ]
    per_head = {r["context"]: r["total"] for r in rows if r["method"] == "longheads-head"}
    for r in rows:
        ratio = fmt(r["total"] / per_head[r["context"]], 2) if r["context"] in per_head else "-"
        here = fmt(value(report["results"], r["method"], r["context"], "decode_mean_ms"), 1)
        parts = " | ".join(fmt(r[p] / 1e9, 2) for p in PARTS)
        lines.append(f"| {format_context_length(r['context'])} | {r['method']} | {parts} | {fmt(r['total'] / 1e9, 2)} | {ratio} | {here} |")
    return lines


def plot(report: dict, path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    results = report["results"]
    panels = [("decode ms / token", lambda r: r.get("decode_ms")),
              ("prefill tokens / s", lambda r: r.get("prefill_tokens_per_s"))]
    if report["kind"] == "model":
        panels.append(("peak memory GB", lambda r: max(r["peak_decode_bytes"], r.get("peak_prefill_bytes", 0)) / 1e9))
    else:
        panels.append(("decode GB/s", lambda r: r.get("decode_gb_per_s")))
    fig, axes = plt.subplots(1, len(panels), figsize=(5 * len(panels), 4))
    for ax, (label, get) in zip(axes, panels):
        for method in dict.fromkeys(r["method"] for r in results):
            points = [(r["context"], get(r)) for r in results if r["method"] == method and get(r) is not None]
            if points:
                ax.plot(*zip(*points), "o-", label=method)
        if report["kind"] == "kernel" and label == "decode GB/s":
            ax.axhline(report["read_bandwidth_gb_per_s"], color="gray", ls="--", label="read bandwidth")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.set_xlabel("context (tokens)")
        ax.set_ylabel(label)
        ax.legend()
    fig.suptitle(f"{'Model' if report['kind'] == 'model' else 'Kernel'}-level: LongHeads vs full attention")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def parse_args(argv=None):
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--kernel", action="store_true", help="one attention layer at Llama-3-8B shapes")
    parser.add_argument("--contexts", default="4k,8k,16k,32k,64k,128k",
                        type=lambda s: [parse_context_length(c) for c in s.split(",")])
    parser.add_argument("--methods", default=DEFAULT_METHODS, type=lambda s: s.split(","),
                        help=f"from {', '.join(METHODS)} (default {DEFAULT_METHODS})")
    parser.add_argument("--model", default=None, help="model level: model to load (default: embedded)")
    parser.add_argument("--decode-steps", type=int, default=5)
    parser.add_argument("--prefill-block", type=int, default=512)
    parser.add_argument("--prefill-repeats", type=int, default=1, help="prefill blocks timed (median)")
    parser.add_argument("--full-max", type=parse_context_length, default="1m",
                        help="largest context for full attention (also limited by memory)")
    parser.add_argument("--full-prefill-max", type=parse_context_length, default="32k",
                        help="largest context for a full-attention prefill block")
    parser.add_argument("--output", type=Path, default=Path("results/bench"))
    args = parser.parse_args(argv)
    unknown = set(args.methods) - set(METHODS)
    if unknown:
        parser.error(f"unknown methods {sorted(unknown)}: use {', '.join(METHODS)}")
    return args


def main(argv=None) -> dict:
    args = parse_args(argv)
    command = "python -m mlx_longheads.bench " + " ".join(sys.argv[1:] if argv is None else argv)
    report = kernel_bench(args) if args.kernel else model_bench(args)
    report.update(machine=machine(), command=command, commit=code_version())
    report["goals"] = goals(report)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.with_suffix(".json").write_text(json.dumps(report, indent=1) + "\n")
    text = markdown(report, command)
    args.output.with_suffix(".md").write_text(text)
    plot(report, args.output.with_suffix(".png"))
    print(text)
    return report


if __name__ == "__main__":
    main()
