"""Does the default lose a fact at the answer, or in the question's keys and values?

The default here is "one_pass_prompt", the default until 2026-12-04 (this study led to the one
after it, "one_pass_reread"). On the plain-fact task at 16k the default often misses a fact that stock attention reads from a
bare window (chunk 0, the fact's chunk, the question's two chunks). Past F the question's tokens
were themselves read through LongHeads windows, which in many layers did not hold the fact's
chunk; their keys and values then carry no trace of it, where the bare window's do. This study
takes the default's prefill of the prompt but its last token (saved once, as
`scripts/answer_rule_study.py` does) and answers in up to five ways:
  - the eval's answer: the last token and the answer from the saved cache;
  - question read again following the last token's choice: the cache cut back to the start of
    the question's first chunk (own - 1), and those tokens fed again with every layer following
    the choice the eval's last token made at the filter layer (its shared chunks); then the last
    token and the answer as the default. No oracle: a rule could do this once the prompt's end is
    known, at the cost of reading two chunks again once per prompt.
With --oracle, where the answer's chunk is a candidate (not chunk 0 or the question's), the answer's
chunk forced into every head's retrieved slots of every layer (`needle_oracle.forcing`, for both
selection rules):
  - forced at the answer: for the last token and the answer only;
  - question read again: the cut, the question fed again by the default, nothing forced (the
    control: it should give the eval's answer);
  - forced from the question on: the cut, forced from the question's first token on.
Right only when forced from the question on: the question's keys and values lose the fact.
Right when forced at the answer: the answer's choice loses it. Wrong both ways: neither.
Each sample's answers are kept beside its prefill, so a run per sample (in the background) is
gathered into the table by a last run over all of them.

  python scripts/question_window_study.py --task fact --length 16384 --samples 12,19 --oracle --output results/question_window_fact_16k.md
"""

import argparse
import json
from contextlib import ExitStack, contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Iterator, List, Optional, Tuple

import mlx_longheads  # noqa: F401  (loads OpenBLAS before MLX on Linux)
import mlx.core as mx

import mlx_longheads.longheads as longheads
from mlx_longheads.longheads import note_choice, peakedness, top_chunks
from mlx_longheads import LongHeadsConfig, load
from mlx_longheads.eval import code_version, selection_replaced
from mlx_longheads.models import make_relay
from mlx_longheads.prompt_cache import load_prompt_cache
from answer_rule_study import saved_prefill  # scripts/ is on the path when run
from needle_oracle import candidate_samples, forcing, greedy, write_report
from perplexity_gap_study import swap_relay

SELECTION = "one_pass_prompt"  # the default's prompt reading
RULES = ("select_chunks", "select_chunks_pooled")


@contextmanager
def fact_forced(chunk: Optional[int]) -> Iterator[None]:
    """Every selection rule keeps `chunk` in every head's retrieved slots (None: unchanged)."""
    with ExitStack() as stack:
        if chunk is not None:
            for name in RULES:
                stack.enter_context(selection_replaced(forcing(chunk, getattr(longheads, name)), name))
        yield


class FollowingRelay:
    """Every layer of a prompt's groups follows one given choice: the pooled attention
    [B, 1, C] another query made (the prompt's last token's), noted for the groups after."""

    def __init__(self, pooled: mx.array, shared: int):
        self.pooled, self.shared = pooled, shared

    def run(self, forward, caches, tokens: int):
        out = forward()
        note_choice(caches[0], tokens, self.pooled, peakedness(self.pooled), self.shared)
        return out

    def choose(self, layer: int, block: int, measure) -> mx.array:
        return self.pooled[..., : measure().shape[-1]]  # the chunks complete at this group


def answer(
    model, tokenizer, saved: Path, prompt: List[int], start: Optional[int], forced: Optional[int],
    max_tokens: int, follow: Optional[mx.array] = None,
) -> Tuple[str, mx.array]:
    """Greedy answer by the default from the saved prefill, and the choice its last token's
    filter layer (and the layers after it) followed. From token `start` on (None: the last
    token only) the prompt is fed again after the cache is cut back there, following `follow`
    in every layer (None: the default's own choice); `forced` is kept in every window
    throughout. The last token is a call of its own, as in the eval."""
    config = model.layers[0].self_attn.config
    default = lambda: make_relay(replace(config, selection=SELECTION))  # fresh: no state carried over
    cache = load_prompt_cache(str(saved), model, config)
    with fact_forced(forced):
        if start is not None:
            for layer in cache:
                layer.trim(layer.offset - start)
            swap_relay(model, default() if follow is None else FollowingRelay(follow, config.shared_slots))
            model(mx.array([prompt[start:-1]]), cache=cache)
        swap_relay(model, default())
        logits = model(mx.array([prompt[-1:]]), cache=cache)
        choice = model.relay.filter.kept
        return tokenizer.decode(greedy(model, logits, cache, max_tokens)), choice


ARMS = {  # column: (fed again from the question's first token, fact's chunk forced, re-read following the last token's choice)
    "the eval's answer": (False, False, False),
    "forced at the answer": (False, True, False),
    "question read again": (True, False, False),
    "forced from the question on": (True, True, False),
    "question read again following the last token's choice": (True, False, True),
}
ORACLE = ("forced at the answer", "question read again", "forced from the question on")


def sample_row(model, tokenizer, task: str, length: int, index: int, oracle: bool, cache_dir: Path) -> dict:
    """One sample's answers under each arm (the oracle arms where asked and the answer's chunk is
    a candidate), kept in `cache_dir` so that a run per sample can be gathered by a last run."""
    kept = cache_dir / f"{task}_{length}_{index}_question_window.json"
    if kept.exists():
        row = json.loads(kept.read_text())
        if not oracle or all(arm in row["answers"] for arm in ORACLE) or row["chunk"] is None:
            return row
    config = model.layers[0].self_attn.config
    w = config.chunk_size
    ((_, sample, prompt, chunk, own),) = candidate_samples(task, tokenizer, length, str(index), w)
    saved = saved_prefill(model, prompt, SELECTION, cache_dir / f"{task}_{length}_{index}")
    answers, choice = {}, None
    for arm, (again, forced, follow) in ARMS.items():
        if (arm in ORACLE and not oracle) or (forced and chunk is None):
            continue
        text, last_choice = answer(
            model, tokenizer, saved, prompt, (own - 1) * w if again else None, chunk if forced else None,
            sample.max_tokens, choice if follow else None,
        )
        choice = last_choice if choice is None else choice  # the eval's last token's
        answers[arm] = (text, sample.score(text))
        print(index, arm, repr(text), flush=True)
    row = {
        "index": index, "expected": sample.expected[0], "chunk": chunk, "own": own, "answers": answers,
        "followed": sorted(top_chunks(choice[:, 0], config.shared_slots)[0].tolist()),
        "answer_chunk": sample.answer_chunk(tokenizer, w),
    }
    kept.write_text(json.dumps(row))
    return row


def sample_arguments(description: str) -> argparse.ArgumentParser:
    """The arguments of a study over saved prefills: which prompts, where they are kept, the table."""
    parser = argparse.ArgumentParser(description=description)
    parser.add_argument("--task", default="fact")
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--samples", required=True, help="comma-separated sample indices")
    parser.add_argument("--cache-dir", type=Path, default=Path("/tmp/answer_rule"), help="prefilled prompts and answers, kept for reruns")
    parser.add_argument("--output", type=Path, required=True)
    return parser


def main() -> None:
    parser = sample_arguments(__doc__.splitlines()[0])
    parser.add_argument("--oracle", action="store_true", help="also the arms that force the answer's chunk")
    args = parser.parse_args()
    version = code_version()
    model, tokenizer = load(longheads=LongHeadsConfig(selection="one_pass_filter"))
    w = model.layers[0].self_attn.config.chunk_size
    args.cache_dir.mkdir(parents=True, exist_ok=True)
    rows = [sample_row(model, tokenizer, args.task, args.length, i, args.oracle, args.cache_dir) for i in map(int, args.samples.split(","))]
    arms = [arm for arm in ARMS if any(arm in row["answers"] for row in rows)]

    def cell(row: dict, arm: str) -> str:
        if arm not in row["answers"]:
            return "—"
        text, score = row["answers"][arm]
        return f"{repr(text.strip()[:30])} ({'right' if score >= 1 else 'wrong'})".replace("|", "\\|")

    right = {arm: sum(row["answers"][arm][1] >= 1 for row in rows if arm in row["answers"]) for arm in arms}
    ran = {arm: sum(arm in row["answers"] for row in rows) for arm in arms}
    oracle = " --oracle" if args.oracle else ""
    lines = [
        f"# The default on {args.task} {args.length}: the question's keys and values read again by the last token's choice",
        "",
        f"Commit {version}; SmolLM2-135M-Instruct, float32, greedy, the CPU; the eval's {args.task} prompts at "
        f"{args.length} tokens, the prompt but its last token prefilled once with {SELECTION} (the default) "
        f"in 2048-token blocks; chunks of {w} tokens. Forced: the answer's chunk in every head's retrieved slots "
        "of every layer (only where it is a candidate, not chunk 0 or the question's).",
        "",
        f"`python scripts/question_window_study.py --task {args.task} --length {args.length} --samples {args.samples}{oracle} --output {args.output}`",
        "",
        "| sample | expected | answer's chunk | question's chunks | " + " | ".join(arms) + " | the last token's shared chunks |",
        "|---|---|---|---|" + "---|" * len(arms) + "---|",
        *[
            f"| {r['index']} | {r['expected']} | {r['answer_chunk']} | {r['own'] - 1}, {r['own']} | "
            + " | ".join(cell(r, arm) for arm in arms) + f" | {r['followed']} |"
            for r in rows
        ],
        "",
        "Right: " + "; ".join(f"{arm} {right[arm]} / {ran[arm]}" for arm in arms) + ".",
    ]
    write_report(lines, args.output)


if __name__ == "__main__":
    main()
