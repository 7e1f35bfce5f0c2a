"""Is a missed needle lost by the chunk selection or by the short window? An oracle.

Runs the eval's needle prompt (greedy, like `python -m mlx_longheads.eval needle`) with
`longheads.select_chunks` wrapped so that, for the question's last tokens and the answer,
every head's retrieved chunks include the needle's chunk (it replaces the lowest-numbered
retrieved one). The text before is prefilled as usual. If the answer becomes right, the
window was long enough and the score (q . rep) did not rank the needle's chunk.

With `--tail-selection exact` nothing is forced: the last tokens are fed one at a time, so each
selects its own chunks with the library's rule (exact selection) instead of sharing its chunk
group's summed query (grouped prefill). Does the question's own query find the needle?

  python scripts/needle_oracle.py --samples 3,4,9 --output results/needle_oracle.md
  python scripts/needle_oracle.py --samples 3,4,9 --tail-selection exact --output results/needle_exact_tail.md
"""

import argparse
from contextlib import nullcontext
from pathlib import Path
from typing import Callable, List, Optional

import mlx_longheads  # noqa: F401  (loads OpenBLAS before MLX on Linux)
import mlx.core as mx

import mlx_longheads.longheads as longheads
from mlx_longheads import LongHeadsConfig, load
from mlx_longheads.eval import prefilled, select_chunks_replaced
from mlx_longheads.models import apply_longheads
from mlx_longheads.tasks import make_sample


def forcing(chunk: int, rule: Optional[Callable[..., mx.array]] = None):
    """A selection rule (`rule`, `longheads.select_chunks` unless given) with `chunk` among
    every head's retrieved slots (when a candidate): it replaces the lowest-numbered one."""
    rule = rule or longheads.select_chunks

    def select(*args, **kwargs):
        slots = rule(*args, **kwargs)  # [..., k]: [0, retrieved, own-1, own]
        k = slots.shape[-1]
        retrieved, own = slots[..., 1 : k - 2], slots[..., -1:].astype(mx.int32)
        first = mx.full(retrieved[..., :1].shape, chunk, retrieved.dtype)
        swapped = mx.sort(mx.concatenate([first, retrieved[..., 1:]], axis=-1), axis=-1)
        keep = (retrieved == chunk).any(axis=-1, keepdims=True) | (own - 2 < chunk)
        retrieved = mx.where(keep, retrieved, swapped)
        return mx.concatenate([slots[..., :1], retrieved, slots[..., k - 2 :]], axis=-1)

    return select


def paper_threshold_model(attention_length: Optional[int] = None):
    """The embedded model with the paper's rule (per-head selection from F = L on), as
    these studies of that selection inside the trained length need."""
    model, tokenizer = load(longheads=None)
    if attention_length is None:
        trained = model.args.max_position_embeddings
        attention_length = LongHeadsConfig().resolve(trained).attention_length
    config = LongHeadsConfig(
        attention_length=attention_length, selection="query_head", full_attention_length=attention_length
    )
    apply_longheads(model, config)
    return model, tokenizer


def candidate_samples(task: str, tokenizer, length: int, indices: str, w: int):
    """(index, sample, prompt tokens, answer chunk, own chunk of the last token) per sample
    index ("3,4,9"); the answer chunk is None where it is forced (the first chunk or the
    last two), so that no selection rule can miss it."""
    for index in map(int, indices.split(",")):
        sample = make_sample(task, tokenizer, length, index)
        prompt = tokenizer.encode(sample.prompt)
        chunk, own = sample.answer_chunk(tokenizer, w), (len(prompt) - 1) // w
        yield index, sample, prompt, (chunk if 1 <= chunk <= own - 2 else None), own


def studied_samples(task: str, tokenizer, length: int, indices: str, w: int, rows: List[str]):
    """`candidate_samples` whose answer chunk is a candidate; for each other one a line in
    the report's `rows` says why it was left out."""
    for index, sample, prompt, chunk, own in candidate_samples(task, tokenizer, length, indices, w):
        if chunk is None:
            rows.append(f"- sample {index}: the answer's chunk is forced (first or last), not a candidate")
        else:
            yield index, sample, prompt, chunk, own


def write_report(rows: List[str], output: Optional[str]) -> None:
    """The markdown table to `output` (when given) and to stdout."""
    report = "\n".join(rows) + "\n"
    if output:
        Path(output).write_text(report)
    print(report)


def answer(model, tokenizer, prompt, tail: int, max_tokens: int, chunk: Optional[int]) -> str:
    """Greedy answer; `chunk` forced for the last `tail` prompt tokens and the answer, or
    (chunk None) those tokens fed one at a time with the library's own selection."""
    cache, rest = prefilled(model, prompt[:-tail]), prompt[-tail:]
    forced = chunk is not None
    with select_chunks_replaced(forcing(chunk)) if forced else nullcontext():
        for step in [rest] if forced else [[token] for token in rest]:
            logits = model(mx.array([step]), cache=cache)
            mx.eval(logits)
        return tokenizer.decode(greedy(model, logits, cache, max_tokens))


def greedy(model, logits: mx.array, cache, max_tokens: int) -> List[int]:
    """The greedy answer's tokens after the prompt's last `logits`."""
    tokens = []
    for _ in range(max_tokens):
        tokens.append(logits[0, -1].argmax().item())
        logits = model(mx.array([tokens[-1:]]), cache=cache)
    return tokens


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--samples", default="3,4,9", help="needle sample indices")
    parser.add_argument("--length", type=int, default=8192)
    parser.add_argument("--attention-length", type=int, default=None)
    parser.add_argument("--tail", type=int, default=40, help="last prompt tokens forced")
    parser.add_argument("--tail-selection", default="forced", choices=["forced", "exact"])
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    model, tokenizer = paper_threshold_model(args.attention_length)
    config = model.layers[0].self_attn.config
    forced = args.tail_selection == "forced"
    title = {
        "forced": f"the needle's chunk forced into every head for the last {args.tail} prompt tokens and the answer",
        "exact": f"the last {args.tail} prompt tokens fed one at a time (exact selection), nothing forced",
    }[args.tail_selection]
    rows = [
        f"# Needle oracle: {title}",
        "",
        f"Command: `python scripts/needle_oracle.py --samples {args.samples} --length {args.length}"
        f" --tail {args.tail} --tail-selection {args.tail_selection}`"
        f" (L {config.attention_length}, chunk {config.chunk_size}, grouped prefill before the tail)",
        "",
        f"| sample | depth | needle chunk | expected | answer ({args.tail_selection} tail) | found |",
        "|---|---|---|---|---|---|",
    ]
    for index in map(int, args.samples.split(",")):
        sample = make_sample("needle", tokenizer, args.length, index)
        chunk = sample.answer_chunk(tokenizer, config.chunk_size)
        prompt = tokenizer.encode(sample.prompt)
        text = answer(model, tokenizer, prompt, args.tail, sample.max_tokens, chunk if forced else None)
        shown = repr(text.strip()[:30]).replace("|", "\\|")  # a table cell
        found = "yes" if sample.score(text) >= 1 else "no"
        rows.append(f"| {index} | {sample.depths[0]:.0%} | {chunk} | {sample.expected[0]} | {shown} | {found} |")
        print(rows[-1], flush=True)
    write_report(rows, args.output)


if __name__ == "__main__":
    main()
