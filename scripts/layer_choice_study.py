"""Which layer's pooled attention should the two-pass selections share? Rules compared on saved prompts.

two_pass_carry shares with every layer the top ceil((k-3)/2) chunks of the first pass's
most peaked layer, "most peaked" being the largest share of a layer's candidate mass on
one chunk (`longheads.CarryRelay`). On the 32k needle at depth 70% that chose layer 8, which
does not hold the needle, over layer 18, which ranks it first
(results/shortlist_needle_32k_sample10.md). This study records, per prompt, every
layer's pooled attention at the last token (the first pass, as `shortlist_study.py`
does; saved to --store, so a prompt is prefilled once) and asks of each rule whether
the chunks it shares hold the answer's:

  share   today's: the layer with the largest max / sum
  margin  the layer with the largest (first - second) / sum
  ratio   the layer with the largest first / second
  topk    the layer whose shared chunks hold the largest share of its mass
  entropy the layer with the lowest entropy of its mass
  spread  one slot each to the top chunk of the most peaked layers (by share), distinct
  mixture the top chunks of the layers' normalised masses summed
  calibrated  one fixed layer: the one ranking the answer's chunk best (mean reciprocal
          rank) on the other saved prompts, leave one out (what a calibration run on
          prompts with known answers would find)

  python scripts/layer_choice_study.py --task needle --length 16384 --samples 0,1,2 --store results/layer_choice --output F
"""

import argparse
from pathlib import Path
from typing import Callable, Dict, List, Tuple

import mlx_longheads  # noqa: F401  (loads OpenBLAS before MLX on Linux)
import numpy as np

from mlx_longheads import LongHeadsConfig, load
from needle_oracle import candidate_samples, write_report  # scripts/ is on the path when run
from shortlist_study import first_pass

Masses = np.ndarray  # [layers, candidates]: each layer's pooled attention, candidates 1..own-2


def normalised(masses: Masses) -> Masses:
    return masses / masses.sum(axis=1, keepdims=True)


Rule = Callable[[Masses, int], Tuple[np.ndarray, str]]  # -> shared chunks, the layer(s) they are from


def by_layer(peakedness: Callable[[Masses, int], np.ndarray]) -> Rule:
    """A rule sharing the top `shared` chunks of the layer `peakedness` (of the layers'
    normalised masses and `shared`) ranks first (ties to the later layer, as in `CarryRelay`)."""

    def rule(masses: Masses, shared: int) -> Tuple[np.ndarray, str]:
        score = peakedness(normalised(masses), shared)
        layer = len(score) - 1 - int(np.argmax(score[::-1]))
        return np.argsort(-masses[layer])[:shared], str(layer)

    return rule


def sorted_desc(p: Masses) -> Masses:
    return -np.sort(-p, axis=1)


def entropy(p: Masses) -> np.ndarray:
    return -(p * np.log(np.maximum(p, 1e-30))).sum(axis=1)


def spread(masses: Masses, shared: int) -> Tuple[np.ndarray, str]:
    p = normalised(masses)
    chosen: List[int] = []
    layers: List[str] = []
    for layer in np.argsort(-p.max(axis=1), kind="stable"):
        top = int(np.argmax(p[layer]))
        if top not in chosen:
            chosen.append(top)
            layers.append(str(layer))
        if len(chosen) == shared:
            break
    return np.array(chosen), ",".join(layers)


def mixture(masses: Masses, shared: int) -> Tuple[np.ndarray, str]:
    return np.argsort(-normalised(masses).sum(axis=0))[:shared], "all"


RULES: Dict[str, Rule] = {
    "share": by_layer(lambda p, s: p.max(axis=1)),
    "margin": by_layer(lambda p, s: sorted_desc(p)[:, 0] - sorted_desc(p)[:, 1]),
    "ratio": by_layer(lambda p, s: sorted_desc(p)[:, 0] / sorted_desc(p)[:, 1]),
    "topk": by_layer(lambda p, s: sorted_desc(p)[:, :s].sum(axis=1)),
    "entropy": by_layer(lambda p, s: -entropy(p)),
    "spread": spread,
    "mixture": mixture,
}


def record(task: str, length: int, samples: str, store: Path) -> List[Path]:
    """The saved masses of each studied prompt, prefilling those not saved yet."""
    model, tokenizer = load(longheads=LongHeadsConfig(selection="two_pass_carry"))
    config = model.layers[0].self_attn.config
    store.mkdir(parents=True, exist_ok=True)
    paths = []
    for index, sample, prompt, chunk, own in candidate_samples(task, tokenizer, length, samples, config.chunk_size):
        path = store / f"{task}_{length}_{index}.npz"
        paths.append(path)
        if path.exists() or chunk is None:
            continue
        _, calls = first_pass(model, prompt)
        masses = np.stack([np.array(pooled)[1 : own - 1] for _, pooled in calls])
        np.savez(path, masses=masses, answer=chunk - 1, depth=sample.depths[0], shared=config.shared_slots)
        print(f"saved {path}", flush=True)
    return [p for p in paths if p.exists()]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="needle", choices=["needle", "multikey", "passkey"])
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--samples", default="0")
    parser.add_argument("--store", default="results/layer_choice")
    parser.add_argument("--report-only", action="store_true", help="evaluate every saved prompt, prefill nothing")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    store = Path(args.store)
    paths = sorted(store.glob("*.npz")) if args.report_only else record(args.task, args.length, args.samples, store)
    rows = [
        "# Which layer's pooled attention to share: rules on saved prompts (last token, first pass)",
        "",
        f"Command: `python scripts/layer_choice_study.py --report-only --store {args.store}` over the prompts"
        " saved there (each saved by a run with --task, --length and --samples; two_pass_carry's first pass, L 2048, F 8192,"
        " chunk 256). Cells: the rank (1 = first) of the answer's chunk among the chunks the rule shares,"
        " '-' when it is not shared, and (the layer or layers they are from); 'layers at 1': the layers whose own pooled attention ranks it first.",
        "",
        "| prompt | depth | layers at 1 | " + " | ".join(RULES) + " | calibrated |",
        "|---|---|---|" + "---|" * (len(RULES) + 1),
    ]
    saved_prompts = [np.load(path) for path in paths]
    reciprocal = [1.0 / (1 + (s["masses"] > s["masses"][:, [int(s["answer"])]]).sum(axis=1)) for s in saved_prompts]
    found = {name: 0 for name in [*RULES, "calibrated"]}
    details = ["", "The layers chosen by one rule (share of the layer's mass on its top chunk / on its top shared; the answer's share and rank):", ""]
    for i, (path, saved) in enumerate(zip(paths, saved_prompts)):
        masses, answer, shared = saved["masses"], int(saved["answer"]), int(saved["shared"])
        others = [r for j, r in enumerate(reciprocal) if j != i and len(r) == len(masses)]
        layer = int(np.argmax(np.mean(others, axis=0))) if others else 0
        rules = dict(RULES, calibrated=lambda m, s, layer=layer: (np.argsort(-m[layer])[:s], str(layer)))
        results = {name: rule(masses, shared) for name, rule in rules.items()}
        cells = []
        for name, (chosen, where) in results.items():
            chosen = list(chosen)
            cells.append(f"{chosen.index(answer) + 1 if answer in chosen else '-'} ({where})")
            found[name] += answer in chosen
        firsts = [str(layer) for layer in np.flatnonzero(masses.argmax(axis=1) == answer)]
        p = normalised(masses)
        chosen_layers = sorted({int(where) for _, where in results.values() if where.isdigit()})
        details.append(
            f"- {path.stem}: "
            + "; ".join(
                f"layer {layer} {sorted_desc(p)[layer, 0]:.3f} / {sorted_desc(p)[layer, :shared].sum():.3f}"
                f" (answer {p[layer, answer]:.3f}, rank {int((p[layer] > p[layer, answer]).sum()) + 1})"
                for layer in chosen_layers
            )
        )
        rows.append(f"| {path.stem} | {float(saved['depth']):.0%} | {', '.join(firsts) or 'none'} | " + " | ".join(cells) + " |")
    rows.append(f"| shared (of {len(paths)}) | | | " + " | ".join(str(found[name]) for name in found) + " |")
    rows += details
    write_report(rows, args.output)


if __name__ == "__main__":
    main()
