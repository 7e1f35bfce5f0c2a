"""Soak: one generation past 64k tokens of context on the embedded model, logged.

Prefills a passkey prompt in mlx-lm's 2048-token steps, then generates greedily with
EOS ignored (so the context really grows), writing one JSON line per prefill step and
per generated token: context length, seconds, cache bytes, MLX active and peak memory,
process RSS. Every token's log-probabilities are checked finite. At the end each
layer's cache is checked (one finite representation per complete chunk, none past
them) and a summary (markdown + PNG) compares per-token time and memory at the start
and the end of generation.

  python scripts/soak.py --prompt-tokens 64000 --max-tokens 1536 --output results/soak_64k
"""

import argparse
import json
import random
import statistics
import subprocess
import time
from pathlib import Path

import mlx_longheads  # noqa: F401  (OpenBLAS before mlx)
import mlx.core as mx
from mlx_lm.generate import generate_step

from mlx_longheads.config import LongHeadsConfig
from mlx_longheads.load import load
from mlx_longheads.models import longheads_config
from mlx_longheads.passkey import random_passkey


def rss_bytes() -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    return 0


def commit() -> str:
    """The git commit the run's code came from (the soak takes over an hour)."""
    try:
        return subprocess.run(
            ["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, check=True
        ).stdout.strip()
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def check_caches(caches) -> str:
    """Raise if a cache is inconsistent; describe it otherwise."""
    for layer, cache in enumerate(caches):
        complete = cache.complete_chunks
        reps = cache.representations
        if not mx.isfinite(reps[:, :, :complete]).all().item():
            raise AssertionError(f"layer {layer}: non-finite representation")
        if (mx.abs(reps[:, :, :complete]).sum(axis=-1) == 0).any().item():
            raise AssertionError(f"layer {layer}: a complete chunk has no representation")
        if (reps[:, :, complete:] != 0).any().item():
            raise AssertionError(f"layer {layer}: a representation past the complete chunks")
        if not mx.isfinite(cache.keys[:, :, : cache.offset]).all().item():
            raise AssertionError(f"layer {layer}: non-finite key")
    c = caches[0]
    return f"{len(caches)} layers, offset {c.offset}, {c.complete_chunks} complete chunks each"


def plot(records, path: Path) -> None:
    """Prefill speed, decode time per token and memory, each against the context."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    prefill = [r for r in records if r["phase"] == "prefill" and r["tokens"] > 1]
    decode = [r for r in records if r["phase"] == "decode"][1:]  # the first ends prefill
    fig, (speed, step, memory) = plt.subplots(1, 3, figsize=(15, 4.2))
    speed.plot([r["context"] for r in prefill], [r["tokens"] / r["seconds"] for r in prefill], "o-")
    speed.set(xlabel="context (tokens)", ylabel="tokens/s", title="prefill, per 2048-token step")
    speed.set_ylim(bottom=0)
    step.plot([r["context"] for r in decode], [1000 * r["seconds"] for r in decode], ".", ms=2)
    step.set(xlabel="context (tokens)", ylabel="ms", title="decode, per token")
    step.set_ylim(bottom=0)
    for key, label in (("cache_bytes", "cache"), ("active_bytes", "MLX active"), ("rss_bytes", "RSS")):
        memory.plot([r["context"] for r in records], [r[key] / 1e9 for r in records], label=label)
    memory.set(xlabel="context (tokens)", ylabel="GB", title="memory")
    memory.set_ylim(bottom=0)
    memory.legend()
    fig.suptitle("Soak: SmolLM2-135M with LongHeads, one run")
    fig.tight_layout()
    fig.savefig(path, dpi=110)


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default=None)
    parser.add_argument("--prompt-tokens", type=int, default=64000)
    parser.add_argument("--max-tokens", type=int, default=1536)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--output", type=Path, default=Path("results/soak_64k"))
    parser.add_argument("--replot", action="store_true", help="redraw the PNG from the log only")
    args = parser.parse_args()
    if args.replot:
        records = [json.loads(line) for line in args.output.with_suffix(".jsonl").open()]
        plot(records, args.output.with_suffix(".png"))
        return

    model, tokenizer = load(args.model, LongHeadsConfig(), args.prompt_tokens + args.max_tokens)
    config = longheads_config(model)
    task = random_passkey(tokenizer, args.prompt_tokens, random.Random(args.seed))
    prompt = tokenizer.encode(task.prompt)
    caches = model.make_cache()
    log = args.output.with_suffix(".jsonl").open("w")
    records = []

    def record(phase: str, context: int, tokens: int, seconds: float) -> None:
        r = dict(
            phase=phase,
            context=context,
            tokens=tokens,
            seconds=round(seconds, 4),
            cache_bytes=sum(c.nbytes for c in caches),
            active_bytes=mx.get_active_memory(),
            peak_bytes=mx.get_peak_memory(),
            rss_bytes=rss_bytes(),
        )
        records.append(r)
        log.write(json.dumps(r) + "\n")
        log.flush()

    last = {"done": 0, "time": time.perf_counter()}

    def progress(done: int, total: int) -> None:
        now = time.perf_counter()
        if done > last["done"]:
            record("prefill", done, done - last["done"], now - last["time"])
            print(f"prefill {done}/{total} {(done - last['done']) / (now - last['time']):.1f} tok/s", flush=True)
        last.update(done=done, time=now)

    started = time.perf_counter()
    answer = []
    tic = time.perf_counter()
    steps = generate_step(
        mx.array(prompt),
        model,
        max_tokens=args.max_tokens,
        prompt_cache=caches,
        prompt_progress_callback=progress,
    )
    for n, (token, logprobs) in enumerate(steps):
        if not mx.isfinite(logprobs).all().item():
            raise AssertionError(f"non-finite log-probabilities at generated token {n}")
        now = time.perf_counter()
        record("decode", len(prompt) + n + 1, 1, now - tic)
        tic = now
        if n < 8:
            answer.append(token)
        if n % 100 == 0:
            print(f"decode {n}/{args.max_tokens} context {len(prompt) + n + 1}", flush=True)
    total_s = time.perf_counter() - started
    state = check_caches(caches)

    decode = [r for r in records if r["phase"] == "decode"][1:]  # the first includes prefill's end
    head, tail = decode[:200], decode[-200:]
    median_ms = lambda rows: 1000 * statistics.median(r["seconds"] for r in rows)  # noqa: E731
    # Whole steps only: the last prompt token is processed with the first decode step.
    prefill = [r for r in records if r["phase"] == "prefill" and r["tokens"] > 1]
    text = tokenizer.decode(answer)
    lines = [
        f"# Soak: {len(prompt)}-token prompt + {args.max_tokens} generated tokens, one run",
        "",
        f"Command: `python scripts/soak.py --prompt-tokens {args.prompt_tokens} "
        f"--max-tokens {args.max_tokens} --seed {args.seed} --output {args.output}`",
        f"(log: `{args.output.with_suffix('.jsonl').name}`, plot: `{args.output.with_suffix('.png').name}`)",
        "",
        f"- Code: commit {commit()}",
        f"- Model: embedded SmolLM2-135M, device {mx.default_device()}, config {config}",
        f"- Final context: {len(prompt) + args.max_tokens} tokens; total {total_s / 60:.1f} min",
        f"- Cache check at the end: {state}; every token's log-probabilities finite",
        f"- Passkey at depth {task.depth:.2f}: key {task.key}, answer {text!r}, "
        f"{'correct' if task.is_correct(text) else 'wrong'}",
        f"- Prefill: {len(prefill)} steps, tokens/s first step {prefill[0]['tokens'] / prefill[0]['seconds']:.1f}, "
        f"median {statistics.median(r['tokens'] / r['seconds'] for r in prefill):.1f}, "
        f"last {prefill[-1]['tokens'] / prefill[-1]['seconds']:.1f}",
        f"- Decode ms/token, median of the first 200 tokens (context {head[0]['context']}-{head[-1]['context']}): "
        f"{median_ms(head):.0f}; of the last 200 ({tail[0]['context']}-{tail[-1]['context']}): {median_ms(tail):.0f}; "
        f"max {1000 * max(r['seconds'] for r in decode):.0f}",
        f"- Memory (GB) at prefill start / decode start / end: cache "
        + " / ".join(f"{r['cache_bytes'] / 1e9:.2f}" for r in (records[0], decode[0], decode[-1]))
        + ", MLX active "
        + " / ".join(f"{r['active_bytes'] / 1e9:.2f}" for r in (records[0], decode[0], decode[-1]))
        + ", RSS "
        + " / ".join(f"{r['rss_bytes'] / 1e9:.2f}" for r in (records[0], decode[0], decode[-1]))
        + f"; MLX peak {max(r['peak_bytes'] for r in records) / 1e9:.2f}",
    ]
    report = "\n".join(lines) + "\n"
    print(report)
    args.output.with_suffix(".md").write_text(report)
    plot(records, args.output.with_suffix(".png"))


if __name__ == "__main__":
    main()
