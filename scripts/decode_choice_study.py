"""What a bounded-reads selection could take from the default's choices while it decodes.

two_pass_carry's first pass measures every layer's pooled attention over every key, at
every decoded token: the reads that make its decode grow with the context. This study
records, on an eval prompt prefilled (but its last token) with the default, the first
pass of the prompt's last token and of each greedily decoded token: per layer the pooled
attention over the candidate chunks and the newest raw query, and the chunk
representations. It saves them to --store (one .npz a prompt, so a prompt is prefilled
once) and reports, over every saved prompt and step:

  peaked layers  which layers are the most peaked (the choice two_pass_carry shares)
  changes        how often a step's choice (that layer's top shared chunks) differs from
                 the step before's, and the query drift (cosine, the chosen layer's
                 queries against the step before's, mean over heads) when it does and not
  filter layers  per layer, the share of the choice that its own top chunks hold: would
                 one fixed layer (found by a calibration) do, or two?
  shortlist      at the chosen layer, the share of the choice among the top M candidates
                 by the cheap score (each head's softmax of q . rep over the candidates,
                 summed over heads): reads of M chunks' keys instead of every key

  python scripts/decode_choice_study.py --task multikey --length 16384 --sample 2 --store results/decode_choice
  python scripts/decode_choice_study.py --report-only --store results/decode_choice --output results/decode_choice.md
"""

import argparse
from pathlib import Path
from typing import Dict, List

import mlx_longheads  # noqa: F401  (loads OpenBLAS before MLX on Linux)
import mlx.core as mx
import numpy as np

import mlx_longheads.longheads as longheads
from mlx_longheads import LongHeadsConfig, load
from mlx_longheads.eval import prefilled
from mlx_longheads.prompt_cache import load_prompt_cache, save_prompt_cache
from mlx_longheads.tasks import make_sample
from needle_oracle import greedy  # scripts/ is on the path when run

SHORTLISTS = (8, 16, 32)


def record_first_passes(model, cache, last: int, steps: int) -> Dict[str, np.ndarray]:
    """Feed the prompt's last token and decode `steps` greedy tokens, recording each first
    pass: masses [steps + 1, layers, C], queries [steps + 1, layers, H, D] and the final
    representations [layers, H, C, D] (a chunk's never changes once complete)."""
    relay, original, seen = model.relay, longheads.pooled_attention, []

    def recording(queries, layer_cache, own, rope, scale):
        mass = original(queries, layer_cache, own, rope, scale)
        if not relay.replaying:
            seen.append((np.array(mass[0, 0], np.float32), np.array(queries[0, :, 0], np.float32)))
        return mass

    longheads.pooled_attention = recording
    try:
        tokens = greedy(model, model(mx.array([[last]]), cache=cache), cache, steps)
    finally:
        longheads.pooled_attention = original
    layers = len(model.layers)
    steps_seen = len(seen) // layers
    width = min(m.shape[-1] for m, _ in seen)  # a chunk completed while decoding: keep the first ones
    masses = np.array([m[:width] for m, _ in seen]).reshape(steps_seen, layers, width)
    queries = np.array([q for _, q in seen]).reshape(steps_seen, layers, *seen[0][1].shape)
    reps = np.array(mx.stack([c.representations[0, :, :width] for c in cache]), np.float32)
    return dict(masses=masses, queries=queries, representations=reps, tokens=np.array(tokens))


def choice(mass: np.ndarray, shared: int) -> set:
    """The top `shared` chunks of a pooled attention (as `longheads.top_chunks`)."""
    return set(np.argsort(-mass, kind="stable")[:shared].tolist())


def report(store: Path, shared: int, scale: float) -> List[str]:
    files = sorted(store.glob("*.npz"))
    peaked, changed, drift_changed, drift_kept = [], 0, [], []
    holds: Dict[int, List[float]] = {}
    recall: Dict[int, List[float]] = {m: [] for m in SHORTLISTS}
    answer: Dict[str, List[bool]] = {"the choice": [], **{f"layer {i}'s top": [] for i in range(100)}}
    answer.update({f"the top {m} by the cheap score": [] for m in SHORTLISTS})
    steps = 0
    for path in files:
        data = np.load(path)
        masses, queries, reps = data["masses"], data["queries"], data["representations"]
        answer_chunk = int(data["answer_chunk"])
        candidates = slice(1, masses.shape[-1] - 1)  # 1..own-2: 0 and own-1 are in every window
        previous = None
        for step, (mass, query) in enumerate(zip(masses, queries)):
            shares = mass.max(axis=-1) / mass.sum(axis=-1)
            layer = max(range(len(shares)), key=lambda i: (shares[i], i))
            peaked.append(layer)
            chosen = choice(mass[layer], shared)
            answer["the choice"].append(answer_chunk in chosen)
            for other in range(len(mass)):
                holds.setdefault(other, []).append(len(chosen & choice(mass[other], shared)) / shared)
                answer[f"layer {other}'s top"].append(answer_chunk in choice(mass[other], shared))
            cheap = softmax(np.einsum("hd,hcd->hc", query[layer], reps[layer][:, candidates]) * scale).sum(0)
            ranked = 1 + np.argsort(-cheap, kind="stable")
            for m in SHORTLISTS:
                recall[m].append(len(chosen & set(ranked[:m].tolist())) / shared)
                answer[f"the top {m} by the cheap score"].append(answer_chunk in ranked[:m].tolist())
            if previous is not None:
                before_layer, before_choice, before_query = previous
                cosine = np.mean(np.sum(query[layer] * before_query[layer], -1)
                                 / np.linalg.norm(query[layer], axis=-1) / np.linalg.norm(before_query[layer], axis=-1))
                (drift_changed if chosen != before_choice else drift_kept).append(cosine)
                changed += chosen != before_choice
            previous = (layer, chosen, query)
            steps += 1
    counts = np.bincount(peaked)
    top_layers = sorted(range(len(counts)), key=lambda i: -counts[i])[:5]
    best = sorted(holds, key=lambda i: -np.mean(holds[i]))[:5]
    lines = [
        f"Prompts: {', '.join(p.stem for p in files)}; {steps} steps (the prompt's last token and the decoded"
        f" ones), {shared} shared chunks a choice.",
        "",
        "| measure | figure |",
        "|---|---|",
        "| most peaked layer (steps) | " + ", ".join(f"{i}: {counts[i]}" for i in top_layers) + " |",
        f"| choice changed from the step before | {changed} of {steps - len(files)} |",
        f"| query drift (cosine) where it changed / kept | {fmt(drift_changed)} / {fmt(drift_kept)} |",
        "| share of the choice a fixed layer's own top chunks hold (best layers) | "
        + ", ".join(f"{i}: {np.mean(holds[i]):.2f}" for i in best) + " |",
    ]
    lines += [f"| share of the choice among the top {m} by the cheap score | {np.mean(recall[m]):.2f} |" for m in SHORTLISTS]
    layers = sorted((k for k in answer if k.startswith("layer") and answer[k]), key=lambda k: -np.mean(answer[k]))[:4]
    for where in ["the choice", *layers, *(f"the top {m} by the cheap score" for m in SHORTLISTS)]:
        lines.append(f"| steps with the answer's chunk in {where} | {sum(answer[where])} of {len(answer[where])} |")
    return lines


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def fmt(values: List[float]) -> str:
    return f"{np.mean(values):.3f} (n {len(values)})" if values else "-"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="multikey", choices=["needle", "multikey", "passkey", "fact"])
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--sample", type=int, default=0)
    parser.add_argument("--steps", type=int, default=8, help="tokens decoded")
    parser.add_argument("--store", type=Path, required=True)
    parser.add_argument("--cache-dir", default="/tmp/decode_choice", help="prefilled prompts, kept for reruns")
    parser.add_argument("--report-only", action="store_true")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    model, tokenizer = load(longheads=LongHeadsConfig(selection="two_pass_carry"))
    config = model.layers[0].self_attn.config
    if not args.report_only:
        sample = make_sample(args.task, tokenizer, args.length, args.sample)
        prompt = tokenizer.encode(sample.prompt)
        name = f"{args.task}_{args.length}_{args.sample}"
        saved = Path(args.cache_dir) / f"{name}.safetensors"
        if saved.exists():
            cache = load_prompt_cache(str(saved), model, config)
        else:
            cache = prefilled(model, prompt[:-1], lambda done, total: print(f"prefill {done}/{total}", flush=True))
            saved.parent.mkdir(parents=True, exist_ok=True)
            save_prompt_cache(str(saved), cache, model, config)
        data = record_first_passes(model, cache, prompt[-1], args.steps)
        args.store.mkdir(parents=True, exist_ok=True)
        np.savez(args.store / f"{name}.npz", **data,
                 answer_chunk=sample.answer_chunk(tokenizer, config.chunk_size), expected=sample.expected[0])
        print(f"answer {tokenizer.decode(data['tokens'].tolist())!r}, expected {sample.expected[0]!r}")
    lines = ["# What the default chooses while it decodes (first passes, two_pass_carry)", "",
             f"Command: `python scripts/decode_choice_study.py --report-only --store {args.store}` over the prompts"
             " saved there (each by a run with --task, --length, --sample, --steps).", ""]
    lines += report(args.store, config.shared_slots, model.layers[0].self_attn.scale)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.output:
        Path(args.output).write_text(text)


if __name__ == "__main__":
    main()
