"""The evaluation's markdown tables and PNG plots, from its JSON-lines results only
(so `python -m mlx_longheads.eval report` redraws them without a model)."""

import json
import math
from collections import defaultdict
from pathlib import Path
from typing import Dict, Iterable, List, Tuple

from .config import SELECTIONS, LongHeadsConfig
from .generation import format_context_length

TASK_ORDER = ["passkey", "needle", "multikey", "multivalue", "aggregation", "fact", "fact_multi", "perplexity"]

SCORING = {
    "passkey": "1 when the greedy answer starts with the pass key (a whole number)",
    "needle": "1 when the answer contains the needle's number",
    "multikey": "1 when the answer contains the asked key's number (3 other keys planted)",
    "multivalue": "share of the key's 4 numbers in the answer",
    "aggregation": "hits / (6 planted animals + wrong animals named)",
    "fact": "1 when the answer contains the number of a plain fact asked in other words (no intro)",
    "fact_multi": "1 when the answer contains the asked fact's number (3 facts of its template planted)",
}
KIND_NOTES = {  # the kinds of method, and the LongHeads terms every name has
    "full": "- `full`: stock attention over every token (mlx-lm's KV cache).",
    "window": "- `window:L=`: stock attention over mlx-lm's RotatingKVCache (4 kept tokens + the most "
    "recent L). RoPE positions stay absolute, so past the trained length its queries sit "
    "at positions the model never saw; within a multi-token prefill step mlx-lm's mask "
    "also hides the 4 kept tokens from queries more than L tokens after them.",
    "longheads": "- `longheads:L=,w=`: LongHeads: past F every head attends to L tokens, k = L / w "
    "chunks of w tokens: the first, the previous, its own and k - 3 retrieved by the selection.",
    "F": "- `F=`: the full attention length: a query with at most F tokens up to it attends to "
    "all of them (stock attention); a LongHeads name without `F=` has F = L, the paper's threshold.",
}
OPTION_NOTES = {  # LongHeads options a name may carry
    "prefill": "- `prefill=grouped`: the queries of one chunk within one forward call share a "
    "selection; `prefill=exact`: each query selects its own.",
    "score": "- `score=rotated`: an ablation of the per-head selection (`longheads.select_chunks` "
    "wrapped): the chunk score with R(q, w) instead of the raw query.",
    "forced": "- `forced=first` / `forced=prev`: an ablation of the per-head selection: only the "
    "first / the previous chunk forced besides the own one, one more chunk retrieved.",
    "kv": "- `kv=8` / `kv=4`: keys and values stored quantized from the first token (kv_bits; "
    "`kvg=` the group size, default 64); a name without `kv=` has float K/V.",
}
SELECTION_NOTES = {
    "query_head": "the paper's rule: each query head retrieves the chunks whose representation "
    "scores highest against its query (q . rep).",
    "kv_head": "the paper's rule per KV head: the scores of a GQA group's query heads summed, one "
    "choice per KV head.",
    "two_pass_carry": "each group of queries past F goes through the model twice; in the second "
    "pass half the retrieved slots of every layer hold the chunks of the first pass's most peaked "
    "layer (pooled attention), or an earlier group's choice within the w tokens before it where "
    "that was more peaked, so a question's choice carries into the answer; the other half per "
    "query head.",
    "one_pass_filter": "one pass; one layer (the filter layer, calibrated on the model, named by "
    "filter= or the records' filter_layer) measures its pooled attention; its choice, or an earlier "
    "group's within the w tokens before it where that was more peaked, fills the shared slots of it "
    "and the layers after it, and the layers before it take the earlier group's choice.",
    "two_pass_prompt": "a group of several queries (a prompt's chunk) as two_pass_carry, a group of "
    "one (a decoded token, and the prompt's last) as one_pass_filter; each carries the other's choice.",
    "one_pass_prompt": "as two_pass_prompt, but a prompt's chunk in one pass: each layer follows the most "
    "peaked of the layers up to it, or an earlier group's choice within the w tokens before it where "
    "that was more peaked (records of 27593ad: the layers before the filter layer took the earlier "
    "group's choice, those from it on the most peaked since it).",
    "one_pass_reread": "as one_pass_prompt, and at the prompt's last token past F, where that token "
    "chose anew, the tokens from the chunk before its own on read again, every layer's shared slots "
    "following its choice, before the token is read again.",
    "two_pass_reuse": "as two_pass_carry, but a decoded token with a choice noted in the w tokens "
    "before it takes that choice without a first pass (a faster decode).",
    "pooled": "half the retrieved slots hold the chunks the layer's heads attend to most together "
    "(pooled attention), the other half per query head.",
    "peak": "one pass; every layer's shared slots (as pooled's) hold the chunks of the most peaked "
    "pooled attention among the layers so far in the forward call.",
    "two_pass": "two_pass_carry without the carry: the shared slots follow the most peaked layer "
    "of the group's own first pass.",
    "two_pass_topk": "as two_pass, but the most peaked layer is the one whose top chunks, as many "
    "as it shares, hold the largest share of its pooled attention.",
    "two_pass_tail": "as two_pass_prompt, but of a prompt's chunk only the last quarter of its "
    "queries in two_pass_carry's two passes; the queries before them in one pass, at f091fb3 every "
    "layer with the chunk before's choice, at 688c56d as one_pass_filter.",
    "two_pass_checked": "as two_pass_prompt, but a prompt chunk's first pass had the chunk before's "
    "choice in every layer, and its second pass ran only where the chunk's choice was another (fef0a07).",
}
NO_COMMIT = "†"
CELLS_NOTE = "- Cells: mean (number of samples); `skipped`: full attention beyond --max-length-full."
NO_COMMIT_NOTE = (
    f"- {NO_COMMIT}: made before records carried their commit (some or all of the row's "
    "records); the git history of their files tells which code made them."
)
REMOVED_NOTE = (
    "- Selections the library no longer has (not in `config.SELECTIONS`) have their own tables, "
    "\"removed selections\", under each task; their records stay for comparison, and the plots "
    "mark them \"(removed)\"."
)

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


def method_options(name: str) -> Dict[str, str]:
    """'longheads:L=2048,sel=kv_head' -> {'L': '2048', 'sel': 'kv_head'}."""
    return dict(item.partition("=")[::2] for item in filter(None, name.partition(":")[2].split(",")))


def removed(name: str) -> bool:
    """Whether the method's selection has left the library (its records stay)."""
    selection = method_options(name).get("sel")
    return selection is not None and selection not in SELECTIONS


def label(name: str, separator: str = " ") -> str:
    """A plot's name for the method: removed selections marked."""
    return f"{name}{separator}(removed)" if removed(name) else name


def line_style(name: str) -> str:
    return "o--" if removed(name) else "o-"


def row_name(name: str, records: List[dict]) -> str:
    """The method in backticks, marked when any of its records predates the commit field."""
    mark = f" {NO_COMMIT}" if any("commit" not in r for r in records) else ""
    return f"`{name}`{mark}"


def selection_note(selection: str) -> str:
    if selection not in SELECTIONS:
        status = " (removed from the library)"
    elif selection == LongHeadsConfig.selection:
        status = " (the default)"
    else:
        status = ""
    return f"- `sel={selection}`{status}: {SELECTION_NOTES[selection]}"


def method_notes(names: Iterable[str]) -> List[str]:
    """One line for each kind, selection and option that the tables' methods use."""
    terms, selections = set(), set()
    for name in names:
        kind = name.partition(":")[0]
        options = method_options(name)
        terms.update([kind, *options])
        if kind == "longheads":
            terms.add("F")
        if "sel" in options:
            selections.add(options["sel"])
    return (
        [note for term, note in KIND_NOTES.items() if term in terms]
        + [selection_note(s) for s in SELECTION_NOTES if s in selections]
        + [note for term, note in OPTION_NOTES.items() if term in terms]
    )


def ran(records: List[dict]) -> List[dict]:
    return [r for r in records if "skipped" not in r]


def mean(values: List[float]) -> float:
    return sum(values) / len(values)


def cell(records: List[dict], field: str, digits: int) -> str:
    done = ran(records)
    if done:
        return f"{mean([r[field] for r in done]):.{digits}f} ({len(done)})"
    return "skipped" if records else ""


def table(methods: Dict[str, List[dict]], field: str, digits: int, lengths: List[int]) -> List[str]:
    """Rows methods, columns lengths (those of the whole task, so its tables line up)."""
    lines = [
        "| method | " + " | ".join(format_context_length(n) for n in lengths) + " |",
        "|---" * (len(lengths) + 1) + "|",
    ]
    for name in sorted(methods, key=method_key):
        cells = [cell([r for r in methods[name] if r["length"] == n], field, digits) for n in lengths]
        lines.append(f"| {row_name(name, methods[name])} | " + " | ".join(cells) + " |")
    return lines


def score_tables(methods: Dict[str, List[dict]], lengths: List[int]) -> List[str]:
    """Score, the share of heads holding the answer's chunk where recorded, prefill seconds."""
    lines = [*table(methods, "score", 2, lengths), ""]
    selecting = {name: [r for r in rs if "key_chunk_selected" in r] for name, rs in methods.items()}
    if any(selecting.values()):
        lines += [
            "Share of heads (all layers) whose window holds the answer's chunk at the prompt's "
            "last token (LongHeads samples that recorded it):", "",
            *table({name: rs for name, rs in selecting.items() if rs}, "key_chunk_selected", 2, lengths), "",
        ]
    return lines + ["Prefill seconds per sample:", "", *table(methods, "prefill_s", 0, lengths)]


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


def perplexity_buckets(methods: Dict[str, List[dict]]) -> List[Tuple[int, int]]:
    return sorted({b for records in methods.values() for b in perplexity_by_position(records)})


def perplexity_table(methods: Dict[str, List[dict]], buckets: List[Tuple[int, int]]) -> List[str]:
    curves = {name: perplexity_by_position(methods[name]) for name in sorted(methods, key=method_key)}
    lines = [
        "| method | " + " | ".join(f"{format_context_length(lo)}-{format_context_length(hi)}" for lo, hi in buckets) + " |",
        "|---" * (len(buckets) + 1) + "|",
    ]
    for name, curve in curves.items():
        cells = [f"{curve[b]:.2f}" if b in curve else "" for b in buckets]
        lines.append(f"| {row_name(name, methods[name])} | " + " | ".join(cells) + " |")
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
        ax.plot([n for n, _ in points], [s for _, s in points], line_style(name), label=label(name))
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
        ax.set_title(label(name, "\n"), fontsize=8)
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
        ax.plot(
            [math.sqrt(max(lo, hi / 2) * hi) for lo, hi in curve], list(curve.values()), line_style(name),
            label=label(name),
        )
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


def split_removed(methods: Dict[str, List[dict]]) -> Tuple[Dict[str, List[dict]], Dict[str, List[dict]]]:
    """(methods of the library's selections, methods of removed ones)."""
    kept = {name: rs for name, rs in methods.items() if not removed(name)}
    return kept, {name: rs for name, rs in methods.items() if removed(name)}


def removed_heading(task: str) -> List[str]:
    return ["", f"### {task}: removed selections", ""]


def perplexity_section(methods: Dict[str, List[dict]], folder: Path) -> List[str]:
    plot_perplexity(methods, folder / "perplexity_vs_position.png")
    records = [r for rs in methods.values() for r in ran(rs)]
    buckets = perplexity_buckets(methods)
    kept, gone = split_removed(methods)
    lines = [
        f"Perplexity per position bucket, each text (index) once at the longest length "
        f"run; texts of {', '.join(format_context_length(n) for n in sorted({r['length'] for r in records}))} "
        f"tokens, pydoc_data.topics from a random start, repeating itself after "
        f"{records[0]['repeats_at']} tokens (copying, not language modelling, past that).",
        "",
    ]
    if kept:
        lines += perplexity_table(kept, buckets)
    if gone:
        lines += [*removed_heading("perplexity"), *perplexity_table(gone, buckets)]
    return lines + ["", "![perplexity](perplexity/perplexity_vs_position.png)"]


def question_section(task: str, methods: Dict[str, List[dict]], folder: Path) -> List[str]:
    plot_scores(task, methods, folder / "score_vs_length.png")
    lengths = sorted({r["length"] for records in methods.values() for r in records})
    kept, gone = split_removed(methods)
    lines = [f"Score: {SCORING[task]}.", ""]
    if kept:
        lines += score_tables(kept, lengths)
    if gone:
        lines += [*removed_heading(task), *score_tables(gone, lengths)]
    lines += ["", f"![{task}]({task}/score_vs_length.png)"]
    if task == "needle":
        plot_needle_heatmaps(methods, folder / "heatmap.png")
        lines += ["", "![needle heatmap](needle/heatmap.png)"]
    return lines


def notes(results: Results) -> List[str]:
    records = [r for methods in results.values() for rs in methods.values() for r in rs]
    names = {name for methods in results.values() for name in methods}
    lines = [*method_notes(names), CELLS_NOTE]
    if any("commit" not in r for r in records):
        lines.append(NO_COMMIT_NOTE)
    if any(removed(name) for name in names):
        lines.append(REMOVED_NOTE)
    return lines


def write_report(output: Path) -> Path:
    """report.md under output and each task's PNGs in its folder; returns report.md."""
    results = read_results(output)
    if not results:
        raise ValueError(f"no results under {output}: run a task first")
    lines = ["# Long-context evaluation", "", *notes(results)]
    for task in [t for t in TASK_ORDER if t in results]:
        methods = results[task]
        lines += ["", f"## {task}", ""]
        if not any(ran(records) for records in methods.values()):
            lines.append("Every sample was skipped.")
        elif task == "perplexity":
            lines += perplexity_section(methods, output / task)
        else:
            lines += question_section(task, methods, output / task)
    path = output / "report.md"
    path.write_text("\n".join(lines) + "\n")
    return path
