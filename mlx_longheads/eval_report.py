"""The evaluation's markdown tables and PNG plots, from its JSON-lines results only
(so `python -m mlx_longheads.eval report` redraws them without a model)."""

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Dict, List, Tuple

from .generation import format_context_length

TASK_ORDER = ["passkey", "needle", "multikey", "multivalue", "aggregation", "perplexity"]

SCORING = {
    "passkey": "1 when the greedy answer starts with the pass key (a whole number)",
    "needle": "1 when the answer contains the needle's number",
    "multikey": "1 when the answer contains the asked key's number (3 other keys planted)",
    "multivalue": "share of the key's 4 numbers in the answer",
    "aggregation": "hits / (6 planted animals + wrong animals named)",
}
NOTES = [
    "- `window`: stock attention over mlx-lm's RotatingKVCache (4 kept tokens + the most "
    "recent L). RoPE positions stay absolute, so past the trained length its queries sit "
    "at positions the model never saw; within a multi-token prefill step mlx-lm's mask "
    "also hides the 4 kept tokens from queries more than L tokens after them.",
    "- `score=rotated` and `forced=...` are ablations applied by wrapping "
    "`longheads.select_chunks`: the chunk score with R(q, w) instead of the raw query; "
    "only the first (`forced=first`) or previous (`forced=prev`) chunk forced besides "
    "the own one, one more chunk retrieved.",
    "- `F=`: the full attention length: a query with at most F tokens up to it attends to "
    "all of them (stock attention); a LongHeads name without `F=` has F = L, the paper's "
    "threshold. `sel=pooled`: half the retrieved slots hold the chunks the layer's heads "
    "attend to most together; `sel=peak`: those of the most peaked layer so far in the "
    "forward call; `sel=two_pass`: those of the most peaked layer of a first pass through "
    "the whole model, in every layer of a second.",
    "- `kv=8` / `kv=4`: keys and values stored quantized from the first token (kv_bits; "
    "`kvg=` the group size, default 64); a name without `kv=` has float K/V.",
    "- Cells: mean (number of samples); `skipped`: full attention beyond --max-length-full.",
]

Results = Dict[str, Dict[str, List[dict]]]  # task -> method -> records


def results_path(output: Path, task: str, method: str) -> Path:
    slug = method.replace(":", "_").replace(",", "_").replace("=", "-")
    return output / task / f"{slug}.jsonl"


def read_results(output: Path) -> Results:
    results: Results = defaultdict(lambda: defaultdict(list))
    for path in sorted(output.glob("*/*.jsonl")):
        for line in path.read_text().splitlines():
            try:
                record = json.loads(line)
            except json.JSONDecodeError:  # cut off by an interrupted run
                continue
            results[record["task"]][record["method"]].append(record)
    return results


def method_key(name: str) -> Tuple[int, str]:
    return (["full", "window", "longheads"].index(name.split(":")[0]), name)


def ran(records: List[dict]) -> List[dict]:
    return [r for r in records if "skipped" not in r]


def mean(values: List[float]) -> float:
    return sum(values) / len(values)


def cell(records: List[dict], field: str, digits: int) -> str:
    done = ran(records)
    if done:
        return f"{mean([r[field] for r in done]):.{digits}f} ({len(done)})"
    return "skipped" if records else ""


def table(methods: Dict[str, List[dict]], field: str, digits: int) -> List[str]:
    """Rows methods, columns lengths."""
    lengths = sorted({r["length"] for records in methods.values() for r in records})
    lines = [
        "| method | " + " | ".join(format_context_length(n) for n in lengths) + " |",
        "|---" * (len(lengths) + 1) + "|",
    ]
    for name in sorted(methods, key=method_key):
        cells = [cell([r for r in methods[name] if r["length"] == n], field, digits) for n in lengths]
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    return lines


def perplexity_by_position(records: List[dict]) -> Dict[Tuple[int, int], float]:
    """(first position, end) -> perplexity of one method over its texts.

    Text i at a shorter length is a prefix of text i at a longer one, so each text
    counts once, at the longest length run: methods run to different lengths (full
    attention stops at --max-length-full) compare on the same tokens in each bucket.
    """
    longest: Dict[int, dict] = {}
    for r in ran(records):
        if r["index"] not in longest or r["tokens"] > longest[r["index"]]["tokens"]:
            longest[r["index"]] = r
    sums: Dict[Tuple[int, int], List[float]] = defaultdict(lambda: [0.0, 0])
    for r in longest.values():
        for lo, hi, total, count in r["buckets"]:
            sums[(lo, hi)][0] += total
            sums[(lo, hi)][1] += count
    return {b: math.exp(total / count) for b, (total, count) in sorted(sums.items())}


def perplexity_table(methods: Dict[str, List[dict]]) -> List[str]:
    curves = {name: perplexity_by_position(methods[name]) for name in sorted(methods, key=method_key)}
    buckets = sorted({b for curve in curves.values() for b in curve})
    lines = [
        "| method | " + " | ".join(f"{format_context_length(lo)}-{format_context_length(hi)}" for lo, hi in buckets) + " |",
        "|---" * (len(buckets) + 1) + "|",
    ]
    for name, curve in curves.items():
        cells = [f"{curve[b]:.2f}" if b in curve else "" for b in buckets]
        lines.append(f"| `{name}` | " + " | ".join(cells) + " |")
    return lines


def pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def mark_trained_length(ax, methods: Dict[str, List[dict]], longest: int) -> None:
    """A dotted line at the model's trained length, when the runs reach it."""
    trained = next(r["trained_length"] for rs in methods.values() for r in rs)
    if trained <= longest:
        ax.axvline(trained, color="gray", ls=":", label="trained length")


def plot_scores(task: str, methods: Dict[str, List[dict]], path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    lengths = sorted({r["length"] for rs in methods.values() for r in ran(rs)})
    for name in sorted(methods, key=method_key):
        points = [(n, [r["score"] for r in ran(methods[name]) if r["length"] == n]) for n in lengths]
        points = [(n, mean(s)) for n, s in points if s]
        ax.plot([n for n, _ in points], [s for _, s in points], "o-", label=name)
    mark_trained_length(ax, methods, max(lengths))
    ax.set_xscale("log", base=2)
    ax.set_xticks(lengths, [format_context_length(n) for n in lengths])
    ax.set_ylim(-0.05, 1.05)
    ax.set_xlabel("prompt tokens")
    ax.set_ylabel("mean score")
    ax.set_title(f"{task}: {SCORING[task]}", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_needle_heatmaps(methods: Dict[str, List[dict]], path: Path) -> None:
    """Depth (rows, 0% at the top) x length, mean score, one panel per method."""
    plt = pyplot()
    names = sorted(methods, key=method_key)
    lengths = sorted({r["length"] for rs in methods.values() for r in rs})
    depths = sorted({r["depths"][0] for rs in methods.values() for r in ran(rs)})
    cols = min(3, len(names))
    rows = -(-len(names) // cols)
    fig, axes = plt.subplots(
        rows, cols, figsize=(4.5 * cols, 4 * rows), squeeze=False, constrained_layout=True
    )
    for ax in axes.flat[len(names):]:
        ax.axis("off")
    for ax, name in zip(axes.flat, names):
        grid = [[math.nan] * len(lengths) for _ in depths]
        for i, d in enumerate(depths):
            for j, n in enumerate(lengths):
                scores = [r["score"] for r in ran(methods[name]) if r["length"] == n and r["depths"][0] == d]
                if scores:
                    grid[i][j] = mean(scores)
                    ax.text(j, i, f"{grid[i][j]:.1f}", ha="center", va="center", fontsize=7)
                elif any(r["length"] == n and "skipped" in r for r in methods[name]):
                    ax.text(j, i, "skipped", ha="center", va="center", fontsize=6, color="gray")
        image = ax.imshow(grid, cmap="RdYlGn", vmin=0, vmax=1, aspect="auto")
        ax.set_xticks(range(len(lengths)), [format_context_length(n) for n in lengths])
        ax.set_yticks(range(len(depths)), [f"{d:.0%}" for d in depths])
        ax.set_xlabel("prompt tokens")
        ax.set_ylabel("needle depth")
        ax.set_title(name, fontsize=8)
    fig.colorbar(image, ax=axes, shrink=0.8, label="mean score")
    fig.savefig(path, dpi=120)
    plt.close(fig)


def plot_perplexity(methods: Dict[str, List[dict]], path: Path) -> None:
    plt = pyplot()
    fig, ax = plt.subplots(figsize=(8, 4.5))
    edges = set()
    for name in sorted(methods, key=method_key):
        curve = perplexity_by_position(methods[name])
        # Each bucket at its geometric middle, between its edges on the log axis.
        ax.plot([math.sqrt(max(lo, hi / 2) * hi) for lo, hi in curve], list(curve.values()), "o-", label=name)
        edges.update(hi for _, hi in curve)
    records = [r for rs in methods.values() for r in ran(rs)]
    mark_trained_length(ax, methods, max(r["tokens"] for r in records))
    repeats = min((r["repeats_at"] for r in records if r["tokens"] > r["repeats_at"]), default=None)
    if repeats:
        ax.axvline(repeats, color="red", ls="--", label="text repeats from here")
    ax.set_xscale("log", base=2)
    ax.set_xticks(sorted(edges), [format_context_length(n) for n in sorted(edges)])
    ax.set_yscale("log")  # past the trained length stock attention goes off by orders
    ax.set_xlabel("token position (buckets between the ticks; the first from 0)")
    ax.set_ylabel("perplexity")
    ax.set_title("Perplexity by position, pydoc_data.topics", fontsize=9)
    ax.legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def write_report(output: Path) -> Path:
    """report.md under output and each task's PNGs in its folder; returns report.md."""
    results = read_results(output)
    if not results:
        raise ValueError(f"no results under {output}: run a task first")
    lines = ["# Long-context evaluation", "", *NOTES]
    for task in [t for t in TASK_ORDER if t in results]:
        methods = results[task]
        if not any(ran(records) for records in methods.values()):
            lines += ["", f"## {task}", "", "Every sample was skipped."]
            continue
        folder = output / task
        lines += ["", f"## {task}", ""]
        if task == "perplexity":
            plot_perplexity(methods, folder / "perplexity_vs_position.png")
            records = [r for rs in methods.values() for r in ran(rs)]
            lines += [
                f"Perplexity per position bucket, each text (index) once at the longest length "
                f"run; texts of {', '.join(format_context_length(n) for n in sorted({r['length'] for r in records}))} "
                f"tokens, pydoc_data.topics from a random start, repeating itself after "
                f"{records[0]['repeats_at']} tokens (copying, not language modelling, past that).",
                "",
                *perplexity_table(methods),
                "",
                "![perplexity](perplexity/perplexity_vs_position.png)",
            ]
            continue
        plot_scores(task, methods, folder / "score_vs_length.png")
        lines += [f"Score: {SCORING[task]}.", "", *table(methods, "score", 2), ""]
        selecting = {name: [r for r in rs if "key_chunk_selected" in r] for name, rs in methods.items()}
        if any(selecting.values()):
            lines += [
                "Share of heads (all layers) whose window holds the answer's chunk at the prompt's "
                "last token (LongHeads samples that recorded it):", "",
                *table({name: rs for name, rs in selecting.items() if rs}, "key_chunk_selected", 2), "",
            ]
        lines += [
            "Prefill seconds per sample:", "", *table(methods, "prefill_s", 0), "",
            f"![{task}]({task}/score_vs_length.png)",
        ]
        if task == "needle":
            plot_needle_heatmaps(methods, folder / "heatmap.png")
            lines += ["", "![needle heatmap](needle/heatmap.png)"]
    path = output / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
