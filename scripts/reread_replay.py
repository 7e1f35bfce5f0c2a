"""The "one_pass_reread" selection answering the prompts "one_pass_prompt" has prefilled.

"one_pass_reread" reads a prompt as "one_pass_prompt" (the default until 2026-12-04) does, and differs only at
its last token, where it reads the question again (`longheads.RereadRelay`). A 16k prompt past
F takes minutes to prefill here; `scripts/question_window_study.py` saved one_pass_prompt's prefill
of each prompt but its last token (prompt-cache format 4, before the token ids were noted). This
loads those caches into the current format (the ids, which the prefill would have noted, from
the prompt itself), then answers with the eval's own call (`eval.answer_question`: the last
token alone, then greedy decoding) under "one_pass_reread", and sets the answer beside the
study's arm that read the question again following the last token's choice by hand.

  python scripts/reread_replay.py --task fact --length 16384 --samples 0,1,...,19 --output results/reread_replay_fact_16k.md
"""

import json
from pathlib import Path
from typing import List

import mlx_longheads  # noqa: F401  (loads OpenBLAS before MLX on Linux)
import mlx.core as mx
from mlx.utils import tree_unflatten

from mlx_longheads import LongHeadsConfig, load
from mlx_longheads.eval import answer_question, code_version
from needle_oracle import candidate_samples, write_report  # scripts/ is on the path when run
from question_window_study import sample_arguments

STUDY_ARM = "question read again following the last token's choice"


def format_4_cache(model, path: Path, prompt: List[int]) -> list:
    """A format-4 prompt cache of `prompt` but its last token as a current one: the token ids
    and the prompt's end added to layer 0's cache, as a prefill under "one_pass_reread" notes them."""
    arrays, metadata = mx.load(str(path), return_metadata=True)
    _, _, scalars = tree_unflatten(list(metadata.items()))
    for position, kind in scalars[1:]:
        arrays[position] = None if kind == "none" else arrays[position].item()
    states = tree_unflatten(list(arrays.items()))
    cache = model.make_cache()
    for layer, state in zip(cache, states):
        layer.state = (*state[:6], None, None, *state[6:])  # format 5: tokens, prompt_end
    first = cache[0]
    ids = mx.zeros((1, first.capacity), mx.int32)
    ids[0, : first.offset] = mx.array(prompt[:-1], dtype=mx.int32)
    first.tokens, first.prompt_end = ids, first.offset
    return cache


def main() -> None:
    args = sample_arguments(__doc__.splitlines()[0]).parse_args()
    version = code_version()
    model, tokenizer = load(longheads=LongHeadsConfig(selection="one_pass_reread"))
    w = model.layers[0].self_attn.config.chunk_size
    rows, same, right = [], 0, 0
    for index in map(int, args.samples.split(",")):
        ((_, sample, prompt, _, _),) = candidate_samples(args.task, tokenizer, args.length, str(index), w)
        stem = args.cache_dir / f"{args.task}_{args.length}_{index}"
        cache = format_4_cache(model, stem.with_name(f"{stem.name}_one_pass_prompt.safetensors"), prompt)
        text, _ = answer_question(model, tokenizer, prompt[-1:], sample.max_tokens, cache, lambda done, total: None)
        study = json.loads(stem.with_name(f"{stem.name}_question_window.json").read_text())["answers"][STUDY_ARM][0]
        score = sample.score(text)
        right += score >= 1
        # The study decoded the tokens at once (a leading space) and past the end of the turn.
        agrees = text.strip() == study.split(tokenizer.eos_token)[0].strip()
        same += agrees
        print(index, repr(text), "same as the study" if agrees else f"the study: {study!r}", flush=True)
        cell = lambda t: repr(t.strip()[:30]).replace("|", "\\|")
        rows.append(f"| {index} | {sample.expected[0]} | {cell(text)} ({'right' if score >= 1 else 'wrong'}) | {'same' if agrees else cell(study)} |")
    lines = [
        f"# one_pass_reread on {args.task} {args.length}, from one_pass_prompt's saved prefills",
        "",
        f"Commit {version}; SmolLM2-135M-Instruct, float32, greedy, the CPU; the eval's {args.task} prompts "
        f"at {args.length} tokens, the prompt but its last token prefilled by one_pass_prompt (the default until 2026-12-04) "
        "in 2048-token blocks and saved by scripts/question_window_study.py; then the eval's answer call "
        "under one_pass_reread.",
        "",
        f"`python scripts/reread_replay.py --task {args.task} --length {args.length} --samples {args.samples} --output {args.output}`",
        "",
        "| sample | expected | one_pass_reread | the study's re-read by hand |",
        "|---|---|---|---|",
        *rows,
        "",
        f"Right: {right} / {len(rows)}; the same answer as the study's: {same} / {len(rows)}.",
    ]
    write_report(lines, args.output)


if __name__ == "__main__":
    main()
