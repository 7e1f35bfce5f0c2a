"""Would passing one layer's (or the whole model's) pooled choice on find a missed needle?

The pooled selection lets every layer pick its shared chunks from its own pooled attention.
In the needle prompts it misses at 16k, one middle layer still ranks the needle's chunk near
the top (results/pooled_scores_needle_16k_misses.md), many others do not. This study
prefills each prompt but its last `tail` tokens with the default configuration and the
pooled selection (the default when it ran; cache saved under --cache-dir, so reruns take
seconds), then feeds the tail as mlx-lm's
generate_step does (all but its last token in one call, the last token alone) and answers
greedily, with the shared slots changed, layer by layer, by a variant:

  default        the library's pooled selection, unchanged
  oracle>=s      the needle's chunk forced into every head's retrieved slots from layer s
                 on ("last": only from the last prompt token on)
  relay s        layers after s take layer s's pooled attention as theirs
  peak           every layer takes the pooled attention of the most peaked layer so far
                 (the largest share of its mass on one chunk), its own included
  chain A n      n shared slots pinned, in every layer, to the chunks the previous forward
                 call's newest query attended to most over all layers (A = sum: each
                 layer's pooled mass normalised and summed; top1: layers ranking a chunk
                 first; peak: the most peaked layer's); the rest as the library does

and records, per layer at the newest query of the tail's first call (the prompt's
second-to-last token), the rank of the needle's chunk under the layer's own pooled
attention and the share of that attention on its top chunk.

  python scripts/relay_study.py --samples 9,5,4,3 --length 16384 --output results/relay_needle_16k.md
"""

import argparse
from pathlib import Path
from typing import Callable, Dict, List, Optional

import mlx_longheads  # noqa: F401  (loads OpenBLAS before MLX on Linux)
import mlx.core as mx
from mlx_lm.models.cache import load_prompt_cache, save_prompt_cache

import mlx_longheads.longheads as longheads
import mlx_longheads.models as models
from mlx_longheads import load
from mlx_longheads.config import LongHeadsConfig
from mlx_longheads.eval import prefilled, selection_replaced
from mlx_longheads.tasks import make_sample
from needle_oracle import greedy, write_report  # scripts/ is on the path when run


class Layers:
    """The index of the layer whose attention runs: mlx-lm calls them in order, once per
    forward call each."""

    def __init__(self, n_layers: int):
        self.n_layers, self.calls = n_layers, -1
        self.original = models.longheads_attention

    def counting(self, *args, **kwargs):
        self.calls += 1
        return self.original(*args, **kwargs)

    @property
    def current(self) -> int:
        return self.calls % self.n_layers


def cached_prefix(model, tokens: List[int], path: Path) -> list:
    if path.exists():
        return load_prompt_cache(str(path))
    cache = prefilled(model, tokens)
    save_prompt_cache(str(path), cache)
    return cache


def pooled_rule(layers: Layers, variant: str, chunk: int, record: Dict[int, tuple]) -> Callable:
    """select_chunks_pooled under `variant`, recording (rank of chunk, top share) per layer."""
    original = longheads.select_chunks_pooled
    kept: Dict[str, object] = {"call": [], "votes": None}
    if variant.startswith("chain"):
        _, aggregate, pins = variant.split()

    def select(query_sums, representations, pooled, own, k):
        layer = layers.current
        allowed = longheads.candidate_chunks(pooled.shape[-1], own)
        candidates = mx.where(allowed, pooled, 0)
        last = candidates[0, -1]
        share = (last.max() / last.sum()).item()
        record.setdefault(layer, (int((last > last[chunk]).sum().item()) + 1, round(share, 3)))
        if variant.startswith("relay"):
            source = int(variant.split()[1])
            if layer == source:
                kept["pooled"] = pooled
            elif layer > source:
                pooled = kept["pooled"]
        elif variant == "peak":
            if layer == 0 or share >= kept["share"]:
                kept["share"], kept["pooled"] = share, pooled
            pooled = kept["pooled"]
        elif variant.startswith("chain"):
            # Votes of the previous forward call's last query, all layers: pinned first.
            if layer == 0 and kept["call"]:
                calls = mx.stack(kept["call"])  # [layers, C']
                if aggregate == "sum":
                    votes = calls.sum(axis=0)
                elif aggregate == "peak":  # the layer with the largest share on one chunk
                    votes = calls[mx.argmax(calls.max(axis=1))]
                else:  # top1: layers ranking a chunk first, ties by summed mass
                    votes = (calls == calls.max(axis=1, keepdims=True)).sum(axis=0) + calls.sum(axis=0) / len(calls)
                kept["votes"], kept["call"] = votes, []
            normalised = candidates / candidates.sum(axis=-1, keepdims=True)
            kept["call"].append(normalised[0, -1])
            votes = kept["votes"]
            if votes is not None:
                C = pooled.shape[-1]
                votes = mx.pad(votes, [(0, C - votes.shape[0])])
                top = mx.argsort(-votes)[: int(pins)]
                pinned = (mx.arange(C)[:, None] == top[None]).any(axis=1)
                pooled = normalised + 10 * pinned
        slots = original(query_sums, representations, pooled, own, k)
        if variant.startswith("oracle") and layer >= int(variant.split()[0][len("oracle>="):]) and (
            "last" not in variant or kept.setdefault("calls", 0) > 0
        ):
            retrieved = slots[..., 1 : k - 2]
            first = mx.full(retrieved[..., :1].shape, chunk, retrieved.dtype)
            swapped = mx.sort(mx.concatenate([first, retrieved[..., 1:]], axis=-1), axis=-1)
            keep = (retrieved == chunk).any(axis=-1, keepdims=True) | (own[:, None] - 2 < chunk)
            retrieved = mx.where(keep, retrieved, swapped)
            slots = mx.concatenate([slots[..., :1], retrieved, slots[..., k - 2 :]], axis=-1)
        if layer == layers.n_layers - 1:
            kept["calls"] = kept.get("calls", 0) + 1
        return slots

    return select


def answer(model, tokenizer, prefix_path: Path, rest: List[int], max_tokens: int, rule) -> str:
    """Greedy answer: the tail but its last token in one call, then the last token alone
    (as mlx-lm's generate_step feeds a prompt), then the answer token by token."""
    cache = load_prompt_cache(str(prefix_path))
    with selection_replaced(rule, "select_chunks_pooled"):
        model(mx.array([rest[:-1]]), cache=cache)
        logits = model(mx.array([rest[-1:]]), cache=cache)
        return tokenizer.decode(greedy(model, logits, cache, max_tokens))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--task", default="needle")
    parser.add_argument("--samples", default="9,5,4,3")
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--tail", type=int, default=40)
    parser.add_argument("--variants", default="default,oracle>=0,oracle>=0 last,oracle>=12,relay 18,peak,chain sum 1,chain sum 3,chain top1 1,chain top1 3")
    parser.add_argument("--cache-dir", default="/tmp/relay_study")
    parser.add_argument("--output", default=None)
    args = parser.parse_args()
    model, tokenizer = load(longheads=LongHeadsConfig(selection="pooled"))  # the study's base
    config = models.longheads_config(model)
    layers = Layers(len(model.layers))
    models.longheads_attention = layers.counting
    Path(args.cache_dir).mkdir(parents=True, exist_ok=True)
    rows = [
        f"# Relaying one layer's pooled choice: {args.task} {args.length}",
        "",
        f"Command: `python scripts/relay_study.py --task {args.task} --samples {args.samples} --length {args.length} --tail {args.tail}`"
        f" (default configuration: L {config.attention_length}, F {config.full_attention_length}, chunk {config.chunk_size}, pooled; the variants apply to the last {args.tail} prompt tokens and the answer)",
        "",
    ]
    for index in map(int, args.samples.split(",")):
        sample = make_sample(args.task, tokenizer, args.length, index)
        prompt = tokenizer.encode(sample.prompt)
        chunk = sample.answer_chunk(tokenizer, config.chunk_size)
        path = Path(args.cache_dir) / f"{args.task}_{args.length}_{index}_{args.tail}.safetensors"
        cached_prefix(model, prompt[: -args.tail], path)
        rows += [f"## Sample {index}: depth {sample.depths[0]:.0%}, answer chunk {chunk}, expected {sample.expected[0]}", "",
                 "| variant | answer | found |", "|---|---|---|"]
        ranks: Optional[Dict[int, tuple]] = None
        for variant in args.variants.split(","):
            record: Dict[int, tuple] = {}
            text = answer(model, tokenizer, path, prompt[-args.tail :], sample.max_tokens, pooled_rule(layers, variant, chunk, record))
            if variant == "default":
                ranks = record  # each layer's first call: the tail, ending at the last prompt token
            shown = repr(text.strip()[:24]).replace("|", "\\|")
            rows.append(f"| {variant} | {shown} | {'yes' if sample.score(text) >= 1 else 'no'} |")
            print(rows[-1], flush=True)
        if ranks:
            rows += ["", "Per layer at the second-to-last prompt token (default): rank of the answer's chunk / share of the top chunk in the pooled mass: "
                     + " · ".join(f"{layer}: {r}/{s}" for layer, (r, s) in sorted(ranks.items())), ""]
        write_report(rows, args.output)


if __name__ == "__main__":
    main()
