"""Where does one_pass_filter's perplexity past F lose to two_pass_carry's?

On the eval's 16k text, positions 8-16k, one_pass_filter scored 9.50 and two_pass_carry
9.37. They differ in two ways within a prompt's chunk (a group):
  - the layers before the filter layer take the choice noted by the group before (the
    chunk before), where two_pass_carry's second pass gives them the group's own;
  - the shared choice is the filter layer's, where two_pass_carry takes the most peaked
    of every layer's.
A third rule separates them: one_pass_filter whose multi-token groups run twice, the
second pass giving the layers before the filter layer the group's own choice (the
first pass's). Its cost is not the point; where its perplexity lands is: near
two_pass_carry's, the first difference is the gap; near one_pass_filter's, the second.

All three score the same tokens after the same prefix (inside F, the model's own
attention, prefilled once), fed in the eval's 2048-token blocks.

  python scripts/perplexity_gap_study.py --index 0 --tokens 4096 --output results/perplexity_gap_study.md
"""

import argparse
import math
import time
from functools import partial
from pathlib import Path

import mlx_longheads  # noqa: F401  (loads OpenBLAS before MLX on Linux)
import mlx.core as mx
from mlx.utils import tree_map

from mlx_longheads import LongHeadsConfig, load
from mlx_longheads.eval import code_version, prefilled, token_nll
from mlx_longheads.longheads import FilterRelay, peakedness, top_chunks
from mlx_longheads.tasks import perplexity_text


class OwnChoiceFilterRelay(FilterRelay):
    """one_pass_filter, but a group of several queries runs twice: the layers before the
    filter layer take, in the second pass, the group's own choice from the first."""

    def run(self, forward, caches, tokens):
        if tokens == 1:
            return super().run(forward, caches, tokens)
        super().run(forward, caches, tokens)
        mx.eval(self.kept, [c.buffers for c in caches])
        if [cache.trim(tokens) for cache in caches] != [tokens] * len(caches):
            raise RuntimeError("the first pass could not be rolled back exactly")
        self.carried = (self.kept, peakedness(self.kept))
        out = forward()
        pooled, share = self.fresh
        caches[0].record_choice(caches[0].offset - tokens, tokens, share[:, 0], top_chunks(pooled[:, 0], self.shared))
        return out


def with_own_choice(model) -> None:
    """Swap a one_pass_filter model's relay for `OwnChoiceFilterRelay`."""
    old = model.relay
    relay = OwnChoiceFilterRelay(old.shared, old.span, old.full_length, old.layer)
    for index, layer in enumerate(model.layers):
        layer.self_attn.relay = partial(relay.choose, index)
    model.relay = relay


RULES = {
    "one_pass_filter": (LongHeadsConfig(selection="one_pass_filter"), None),
    "one_pass_filter, the group's own choice before the filter layer (two passes)": (
        LongHeadsConfig(selection="one_pass_filter"), with_own_choice),
    "two_pass_carry": (LongHeadsConfig(selection="two_pass_carry"), None),
}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", type=int, default=0, help="the eval's perplexity text")
    parser.add_argument("--tokens", type=int, default=4096, help="positions scored after F")
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args()
    version = code_version()
    rows, prefix = [], None
    for name, (config, adapt) in RULES.items():
        model, tokenizer = load(None, longheads=config)
        if adapt:
            adapt(model)
        F = model.layers[0].self_attn.config.full_attention_length
        tokens, _ = perplexity_text(tokenizer, F + args.tokens + 1, args.index)
        if prefix is None:
            print(f"prefilling the {F}-token prefix", flush=True)
            prefix = [c.state for c in prefilled(model, tokens[:F])]
        cache = model.make_cache()
        for layer, kept in zip(cache, prefix):
            layer.state = tree_map(lambda a: mx.array(a) if isinstance(a, mx.array) else a, kept)
        tic = time.perf_counter()
        nll = token_nll(model, tokens[F:], cache, lambda done, total: print(f"\r{name}: {done}/{total}", end="", flush=True))
        seconds = time.perf_counter() - tic
        halves = [nll[: len(nll) // 2], nll[len(nll) // 2 :]]
        rows.append((name, math.exp(sum(nll) / len(nll)), *[math.exp(sum(h) / len(h)) for h in halves], sum(nll), seconds))
        print(f"\n{rows[-1]}", flush=True)
    lines = [
        "# Where one_pass_filter's perplexity past F differs from two_pass_carry's",
        "",
        f"Commit {version}; SmolLM2-135M-Instruct, float32, the CPU; the eval's perplexity text "
        f"{args.index}, positions {F + 1} to {F + args.tokens} (after a {F}-token prefix, F), in the "
        "eval's 2048-token blocks.",
        "",
        f"`python scripts/perplexity_gap_study.py --index {args.index} --tokens {args.tokens} --output {args.output}`",
        "",
        "| rule | perplexity | first half | second half | summed loss (nats) | seconds |",
        "|---|---|---|---|---|---|",
        *[f"| {n} | {p:.3f} | {a:.3f} | {b:.3f} | {s:.1f} | {t:.0f} |" for n, p, a, b, s, t in rows],
        "",
    ]
    args.output.write_text("\n".join(lines))
    print(args.output.read_text())


if __name__ == "__main__":
    main()
