"""What kv_bits costs in quality: the same prompt through float K/V and quantized K/V.

usage: python scripts/kv_bits_quality.py [--text perplexity|passkey|needle] [--length 16k]
           [--index 0] [--settings float,8,4,4/32] [--real] [--check 2048]
           [--selection pooled] [--output results/kv_bits_quality.md]

One model (the default configuration, `--selection` aside: L 2048, w 256, F the trained
length), one cache per setting, fed the same tokens in mlx-lm's 2048-token prefill steps
in lockstep: per block the float cache's logits are compared with each quantized one's
and dropped, so a 16k text needs no 16k x vocabulary arrays.

--text perplexity: the eval's perplexity text `--index` (python -m mlx_longheads.eval
perplexity, same tokens and blocks): per position bucket, each setting's perplexity and,
against float, the mean and largest max-|logit difference| of a token and how often the
greedy (top-1) token agrees. --text passkey / needle: the eval's prompt `--index`: the
last prompt token's logit difference, top-1 agreement and float's top-1 margin, and each
setting's greedy answer (scored as the eval scores it).

Quantized settings ("8", "4", bits/group as "4/32") are simulated by default: the cache
keeps float32 buffers holding mx.dequantize(mx.quantize(x)), exactly the values the real
kv_bits path reads, without MLX's CPU quantized matmuls (4.5x slower prefill,
results/bench_kv8.md). --real uses the library's quantized cache instead. --check N
first runs N tokens through both and reports their largest logit difference (the
simulation's error against the real path).
"""

import argparse
import math
import sys
import time
from typing import List, Optional, Tuple

import mlx_longheads  # noqa: F401  (loads OpenBLAS before MLX on Linux)
import mlx.core as mx
from mlx_lm.models.cache import make_prompt_cache

from mlx_longheads.config import DEFAULT_KV_GROUP_SIZE, SELECTIONS, LongHeadsConfig
from mlx_longheads.eval import PREFILL_STEP, position_buckets
from mlx_longheads.generation import format_context_length, parse_context_length
from mlx_longheads.load import load
from mlx_longheads.tasks import make_sample, perplexity_text

Setting = Optional[Tuple[int, int, bool]]  # (bits, group size, keys per channel); None: float


def parse_setting(text: str) -> Setting:
    """"float", "8", "4", "4/32" (bits/group), "4c" or "4c/32": keys per channel."""
    if text == "float":
        return None
    bits, _, group = text.partition("/")
    per_channel = bits.endswith("c")
    return int(bits.rstrip("c")), int(group or DEFAULT_KV_GROUP_SIZE), per_channel


def setting_name(setting: Setting) -> str:
    if setting is None:
        return "float"
    bits, group, per_channel = setting
    name = f"kv_bits {bits}" + (f", group {group}" if group != DEFAULT_KV_GROUP_SIZE else "")
    return name + (", keys per channel (KIVI)" if per_channel else "")


def fake_quantized(x: mx.array, bits: int, group: int) -> mx.array:
    """x as the real cache reads it back: groups of `group` along the last axis."""
    return mx.dequantize(*mx.quantize(x, group_size=group, bits=bits), group_size=group, bits=bits)


def per_channel(x: mx.array, bits: int, group: int) -> mx.array:
    """KIVI's keys (Liu et al. 2024): each channel quantized over groups of `group`
    consecutive tokens of one append. A last partial group is padded with its last
    token (KIVI keeps it in float until it fills; in this script's prefill only each
    block's last group is partial)."""
    T = x.shape[2]
    pad = -T % group
    if pad:
        x_padded = mx.concatenate([x, mx.repeat(x[:, :, -1:], pad, axis=2)], axis=2)
    else:
        x_padded = x
    quantized = fake_quantized(mx.contiguous(x_padded.swapaxes(-1, -2)), bits, group)
    return quantized.swapaxes(-1, -2)[:, :, :T]


def caches_for(model, setting: Setting, real: bool) -> list:
    """A fresh cache per layer storing K/V as `setting` says."""
    cache = make_prompt_cache(model)
    if setting is None:
        return cache
    bits, group, keys_per_channel = setting
    if real and keys_per_channel:
        raise SystemExit("keys per channel: simulated only (the library quantizes along the head dim)")
    for layer in cache:
        if real:
            layer.bits, layer.group_size = bits, group
        elif keys_per_channel:
            layer.append = lambda q, k, v, b=bits, g=group, append=layer.append: append(
                q, per_channel(k, b, g), fake_quantized(v, b, g)
            )
        else:
            layer.encode = lambda x, b=bits, g=group: fake_quantized(x, b, g)
    return cache


def step(model, tokens: List[int], cache) -> mx.array:
    logits = model(mx.array([tokens]), cache=cache)[0].astype(mx.float32)
    mx.eval(logits, [c.state for c in cache])
    return logits


def nll_of(logits: mx.array, targets: List[int]) -> mx.array:
    picked = mx.take_along_axis(logits, mx.array(targets)[:, None], axis=-1)[:, 0]
    return mx.logsumexp(logits, axis=-1) - picked


def check(model, tokens: List[int], settings: List[Setting]) -> List[str]:
    lines = []
    for setting in settings:
        if setting is None or setting[2]:
            continue
        tic = time.perf_counter()
        real = step(model, tokens, caches_for(model, setting, True))
        real_s = time.perf_counter() - tic
        tic = time.perf_counter()
        simulated = step(model, tokens, caches_for(model, setting, False))
        simulated_s = time.perf_counter() - tic
        diff = mx.abs(real - simulated).max().item()
        agree = (real.argmax(-1) == simulated.argmax(-1)).mean().item()
        lines.append(
            f"| {setting_name(setting)} | {len(tokens)} | {diff:.2e} | {agree:.4f} | {real_s:.0f} s | {simulated_s:.0f} s |"
        )
        print(lines[-1], flush=True)
    return lines


def perplexity_run(model, tokens: List[int], settings: List[Setting], real: bool) -> List[str]:
    caches = [caches_for(model, s, real) for s in settings]
    inputs, targets = tokens[:-1], tokens[1:]
    buckets = position_buckets(len(tokens))
    # per setting and bucket: summed nll, count; per quantized setting and bucket: summed
    # max-|diff|, largest max-|diff|, top-1 agreements
    nll = [[0.0, 0] for _ in settings for _ in buckets]
    diff = [[0.0, 0.0, 0] for _ in settings for _ in buckets]
    nb = len(buckets)
    tic = time.perf_counter()
    for start in range(0, len(inputs), PREFILL_STEP):
        block, block_targets = inputs[start : start + PREFILL_STEP], targets[start : start + PREFILL_STEP]
        positions = range(start + 1, start + 1 + len(block))  # position p's loss is nll[p - 1]
        bucket_of = [next(b for b, (lo, hi) in enumerate(buckets) if lo <= p < hi) for p in positions]
        reference = None
        for s, (setting, cache) in enumerate(zip(settings, caches)):
            logits = step(model, block, cache)
            losses = nll_of(logits, block_targets).tolist()
            for b, loss in zip(bucket_of, losses):
                nll[s * nb + b][0] += loss
                nll[s * nb + b][1] += 1
            if setting is None:
                reference = logits
            elif reference is not None:
                largest = mx.abs(logits - reference).max(axis=-1).tolist()
                agrees = (logits.argmax(-1) == reference.argmax(-1)).tolist()
                for b, d, a in zip(bucket_of, largest, agrees):
                    cell = diff[s * nb + b]
                    cell[0] += d
                    cell[1] = max(cell[1], d)
                    cell[2] += a
            del logits
        mx.clear_cache()
        so_far = []
        for s, setting in enumerate(settings):
            total, count = map(sum, zip(*nll[s * nb : (s + 1) * nb]))
            part = f"{setting_name(setting)}: ppl {math.exp(total / count):.3f}"
            if setting is not None and settings[0] is None:
                summed, largest, agrees = (f(c[i] for c in diff[s * nb : (s + 1) * nb]) for i, f in enumerate((sum, max, sum)))
                part += f", diff {summed / count:.3f} (max {largest:.2f}), top-1 {agrees / count:.4f}"
            so_far.append(part)
        print(f"{start + len(block)}/{len(inputs)} tokens, {time.perf_counter() - tic:.0f} s; " + "; ".join(so_far), flush=True)

    lines = [
        "| positions | setting | perplexity | mean max-abs logit diff | largest | top-1 agrees |",
        "|---|---|---|---|---|---|",
    ]
    for b, (lo, hi) in enumerate(buckets):
        for s, setting in enumerate(settings):
            total, count = nll[s * nb + b]
            if not count:
                continue
            row = f"| {format_context_length(lo)}-{format_context_length(hi)} | {setting_name(setting)} | {math.exp(total / count):.3f} |"
            if setting is None or settings[0] is not None:
                row += " - | - | - |"
            else:
                summed, largest, agrees = diff[s * nb + b]
                row += f" {summed / count:.3f} | {largest:.2f} | {agrees / count:.4f} ({count - agrees}/{count} differ) |"
            lines.append(row)
    return lines


def question_run(model, tokenizer, task: str, n: int, index: int, settings: List[Setting], real: bool) -> List[str]:
    sample = make_sample(task, tokenizer, n, index)
    prompt = tokenizer.encode(sample.prompt)
    lines = [
        f"Prompt: {task} {format_context_length(n)} #{index} ({len(prompt)} tokens), expected {sample.expected[0]!r}.",
        "",
        "| setting | max-abs logit diff (last prompt token) | top-1 | float's top-1 margin | greedy answer | score |",
        "|---|---|---|---|---|---|",
    ]
    reference = None
    for setting in settings:
        cache = caches_for(model, setting, real)
        tic = time.perf_counter()
        for start in range(0, len(prompt), PREFILL_STEP):
            logits = step(model, prompt[start : start + PREFILL_STEP], cache)[-1]
        print(f"{setting_name(setting)}: prefill {time.perf_counter() - tic:.0f} s", flush=True)
        answer_ids, token = [], logits.argmax().item()
        for _ in range(sample.max_tokens):
            if token in tokenizer.eos_token_ids:
                break
            answer_ids.append(token)
            token = step(model, [token], cache)[-1].argmax().item()
        answer = tokenizer.decode(answer_ids)
        if reference is None and setting is None:
            reference = logits
            top2 = mx.sort(logits)[-2:].tolist()
            row = f"| float | - | {tokenizer.decode([logits.argmax().item()])!r} | {top2[1] - top2[0]:.2f} |"
        else:
            diff = mx.abs(logits - reference).max().item() if reference is not None else float("nan")
            same = reference is not None and logits.argmax().item() == reference.argmax().item()
            row = f"| {setting_name(setting)} | {diff:.3f} | {'same' if same else 'differs'} | - |"
        lines.append(row + f" {answer!r} | {sample.score(answer):.2f} |")
        print(lines[-1], flush=True)
        del cache
        mx.clear_cache()
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--text", default="perplexity", choices=["perplexity", "passkey", "needle"])
    parser.add_argument("--length", default="16k")
    parser.add_argument("--index", type=int, default=0)
    parser.add_argument("--settings", default="float,8,4", help="float first: the reference")
    parser.add_argument("--real", action="store_true", help="the library's quantized cache, not the simulation")
    parser.add_argument("--check", type=int, default=0, help="tokens to compare the simulation with the real path on first")
    parser.add_argument("--selection", default=LongHeadsConfig.selection, choices=SELECTIONS)
    parser.add_argument("--output", default=None, help="markdown file to append the table to")
    args = parser.parse_args()
    settings = [parse_setting(s.strip()) for s in args.settings.split(",")]
    n = parse_context_length(args.length)
    model, tokenizer = load(None, longheads=LongHeadsConfig(selection=args.selection))
    command = "python scripts/kv_bits_quality.py " + " ".join(sys.argv[1:])
    lines = [f"### `{command}`", ""]
    tic = time.perf_counter()
    if args.check:
        tokens, _ = perplexity_text(tokenizer, args.check, args.index)
        lines += [
            f"Simulated against the real quantized cache, perplexity text {args.index}, first {args.check} tokens (one call):",
            "",
            "| setting | tokens | largest logit diff | top-1 agrees | real | simulated |",
            "|---|---|---|---|---|---|",
            *check(model, tokens, settings),
            "",
        ]
    if args.text == "perplexity":
        tokens, _ = perplexity_text(tokenizer, n, args.index)
        lines.append(f"Perplexity text {args.index}, {len(tokens)} tokens ({'real' if args.real else 'simulated'} quantization):")
        lines += ["", *perplexity_run(model, tokens, settings, args.real)]
    else:
        lines += question_run(model, tokenizer, args.text, n, args.index, settings, args.real)
    lines += ["", f"{time.perf_counter() - tic:.0f} s on {mx.default_device()}.", ""]
    text = "\n".join(lines)
    print(text)
    if args.output:
        with open(args.output, "a") as out:
            out.write(text + "\n")


if __name__ == "__main__":
    main()
