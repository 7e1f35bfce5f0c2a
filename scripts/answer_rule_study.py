"""Is an answer one_pass_filter misses lost in the prompt or in the answer's own choices?

one_pass_filter answered multikey 16k sample 5 with a distractor key's number where
two_pass_carry answered right, both with the asked key's chunk in every head of every
layer. This study prefills the prompt but its last token with one selection
(--prefill-selection; as the eval does: 2048-token blocks, the last token a call of its
own), then answers from that same cache under several rules for the answer's tokens (groups of one query): one_pass_filter
itself, with the calibration's best three layers filtering, and two_pass_carry's two
passes. A rule that answers right from the same prefill says the loss is in what the
answer's tokens choose; none says it is in the prompt's cache. Per step it lists the
shared chunks the rule followed, beside the asked key's and the distractors' chunks.

With --prefill-selection one_pass_prompt (the default's prompt reading) it also answers by
one_pass_filter's pass run again where the filter layer's own choice replaced the one the
layers before it followed (`ChangedChoiceFilterRelay`): on the plain-fact prompts the default
missed with the fact's chunk in layers 18-29 only, the layers before the filter layer had
followed the carried choice at the prompt's last token, whose logits give the answer's
first token.

  python scripts/answer_rule_study.py --task multikey --length 16384 --sample 5 --prefill-selection one_pass_filter --output F
"""

import argparse
from dataclasses import replace
from pathlib import Path

import mlx_longheads  # noqa: F401  (loads OpenBLAS before MLX on Linux)
import mlx.core as mx

from mlx_longheads import LongHeadsConfig, load
from mlx_longheads.eval import code_version, prefilled
from mlx_longheads.longheads import CarryRelay, FilterRelay, top_chunks
from mlx_longheads.models import make_relay
from mlx_longheads.prompt_cache import load_prompt_cache, save_prompt_cache
from mlx_longheads.tasks import make_sample
from perplexity_gap_study import MultiFilterRelay, RerunFilterRelay, best_layers, swap_relay  # scripts/ is on the path
from needle_oracle import write_report


class ChangedChoiceFilterRelay(RerunFilterRelay):
    """one_pass_filter's pass for a group, and a second pass where the filter layer's own
    choice replaced the carried one that the layers before it followed (or where none was
    carried): then every layer follows it. Counts the groups run twice."""

    reruns = 0

    def run(self, forward, caches, tokens):
        out = super().run(forward, caches, tokens)
        if self.carried is not None and not mx.any(self.fresh[1] >= self.carried[1]).item():
            return out
        self.reruns += 1
        return self.run_again(forward, caches, tokens, self.fresh)


def followed(relay) -> mx.array:
    """The pooled attention [B, 1, C] the relay's shared slots followed in the last call."""
    return relay.best[0][0] if isinstance(relay, CarryRelay) else relay.kept


def answer(model, tokenizer, cache, last: int, max_tokens: int, shared: int):
    """Greedy tokens after the prompt's `last` token, and each step's shared chunks."""
    tokens, steps = [last], []
    for _ in range(max_tokens):
        logits = model(mx.array([tokens[-1:]]), cache=cache)
        steps.append(sorted(top_chunks(followed(model.relay)[:, 0], shared)[0].tolist()))
        tokens.append(logits[0, -1].argmax().item())
    return tokenizer.decode(tokens[1:]), steps


def chunk_of(tokenizer, text: str, needle: str, w: int) -> int:
    """The chunk of the first occurrence of `needle` in the prompt `text`."""
    return len(tokenizer.encode(text[: text.index(needle)])) // w


def saved_prefill(model, prompt, selection: str, stem: Path) -> Path:
    """The prompt but its last token prefilled with `selection` (as the eval does: 2048-token
    blocks), saved at `stem`_`selection`.safetensors once and read from there after. The model
    is loaded with one_pass_filter (the saved file names it); the prefill swaps in the relay
    of `selection`."""
    saved = stem.with_name(f"{stem.name}_{selection}.safetensors")
    config = model.layers[0].self_attn.config
    if not saved.exists():
        swap_relay(model, make_relay(replace(config, selection=selection)))
        cache = prefilled(model, prompt[:-1], lambda done, total: print(f"prefill {done}/{total}", flush=True))
        saved.parent.mkdir(parents=True, exist_ok=True)
        save_prompt_cache(str(saved), cache, model, config)
    return saved


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="multikey")
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--sample", type=int, default=5)
    parser.add_argument("--prefill-selection", default="one_pass_filter", choices=["one_pass_filter", "two_pass_carry", "one_pass_prompt"])
    parser.add_argument("--cache-dir", type=Path, default=Path("/tmp/answer_rule"), help="prefilled prompts, kept for reruns")
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args()
    version = code_version()
    model, tokenizer = load(longheads=LongHeadsConfig(selection="one_pass_filter"))
    config = model.layers[0].self_attn.config  # calibrated: the filter layer the rules below use
    w, shared, F = config.chunk_size, config.shared_slots, config.full_attention_length
    sample = make_sample(args.task, tokenizer, args.length, args.sample)
    prompt = tokenizer.encode(sample.prompt)
    saved = saved_prefill(model, prompt, args.prefill_selection, args.cache_dir / f"{args.task}_{args.length}_{args.sample}")
    marks = {"asked": sample.expected[0]}
    marks.update({key: str(value) for key, value in sample.params.get("distractors", {}).items()})
    chunks = {name: chunk_of(tokenizer, sample.prompt, number, w) for name, number in marks.items()}
    rules = {
        f"one_pass_filter (layer {config.filter_layer})": FilterRelay(shared, w, F, config.filter_layer),
        "one_pass_filter, the calibration's best three layers filtering": MultiFilterRelay(shared, w, F, best_layers(model, 3)),
        "two_pass_carry": CarryRelay(shared, w),
    }
    rerun = ChangedChoiceFilterRelay(shared, w, F, config.filter_layer)
    if args.prefill_selection == "one_pass_prompt":
        rules["one_pass_filter, run again where the filter layer's choice replaced the carried one"] = rerun
    rows = []
    for name, relay in rules.items():
        swap_relay(model, relay)
        cache = load_prompt_cache(str(saved), model, config)
        text, steps = answer(model, tokenizer, cache, prompt[-1], sample.max_tokens, shared)
        if relay is rerun:
            name += f" ({rerun.reruns} of {len(steps)} steps run again)"
        rows.append((name, text, sample.score(text), steps))
        print(rows[-1], flush=True)
    lines = [
        f"# Which rule for the answer's tokens answers {args.task} {args.length} sample {args.sample} from {args.prefill_selection}'s prefill",
        "",
        f"Commit {version}; SmolLM2-135M-Instruct, float32, greedy, the CPU. The prompt but its last token "
        f"prefilled once with {args.prefill_selection} (one_pass_filter's filter layer: {config.filter_layer}); each "
        "rule then feeds the last token and decodes from a copy of that cache.",
        "",
        f"`python scripts/answer_rule_study.py --task {args.task} --length {args.length} --sample {args.sample} "
        f"--prefill-selection {args.prefill_selection} --output {args.output}`",
        "",
        "Chunks: " + ", ".join(f"{name} {number} in chunk {chunks[name]}" for name, number in marks.items()) + ".",
        "",
        "| rule for the answer's tokens | answer | score | shared chunks followed, per step (the prompt's last token first) |",
        "|---|---|---|---|",
        *[f"| {n} | {t!r} | {s} | {'; '.join(map(str, st))} |" for n, t, s, st in rows],
    ]
    write_report(lines, args.output)


if __name__ == "__main__":
    main()
