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
Two more rules ask whether more filter layers close the second (the calibration's
best two and three layers, the most peaked of them chosen, as OmniKV uses three), and
two_pass_carry's run counts which layer was the most peaked one for each group.
results/perplexity_gap_one_pass.md ran "one_pass_prompt" at e670f16 (a prompt's chunk in
one pass, each layer following the most peaked of every layer up to it): 0.3% behind
two_pass_carry on these 4,096 tokens, and 6.6% on the eval's 8-16k, so this window does
not rank rules reliably. results/perplexity_gap_tail.md ran, at 688c56d, a rule that has left the library
("two_pass_tail": a chunk's last quarter of queries in two passes, the rest in one): on
positions 8193-10240 all three rules it ran were within 0.8%, where the eval's 8-16k put
it 8% behind two_pass_prompt. results/perplexity_gap_checked.md ran, at fef0a07, a third
("two_pass_checked": a chunk's second pass only where its choice changed), 0.3% ahead of
two_pass_prompt there and 1.4% behind on the eval's 8-16k.

The table also scores a chunk's first three quarters and its last quarter apart, and counts
the token passes a scored token took (a chunk run twice counts twice); the rules
"two_pass_prompt" (the default) and "query_head" (the per-head rule) give the default's and
the paper's cost on real text beside the others.

All rules score the same tokens after the same prefix (inside F, the model's own
attention, prefilled once), fed in the eval's 2048-token blocks.

With --decoded N the text is fed in periods of --period tokens instead: each period's
tokens but its last N in one call (read as a prompt), then those N one at a time, as
decoded tokens are. The eval's perplexity scores a chunk's queries on the choice its
newest query made after reading the tokens scored, a look-ahead a decoded token never
has; the N tokens' loss has none, and it reads a cache the rule's prompt reading built.
results/decoded_loss.md and decoded_loss_1.md ran so at b2b3e07 (texts 0 and 1),
results/decoded_loss_tail.md the removed "two_pass_tail" at f091fb3, and
results/decoded_loss_one_pass_prompt.md "one_pass_prompt" at e670f16 (its rule today).

  python scripts/perplexity_gap_study.py --index 0 --tokens 4096 --output results/perplexity_gap_study.md
  (--rule NAME, repeated: only those rules)
  python scripts/perplexity_gap_study.py --index 0 --tokens 8192 --decoded 64 --output results/decoded_loss.md \
      --rule two_pass_prompt --rule one_pass_filter --rule query_head --rule two_pass_carry
"""

import argparse
import json
import math
import time
from collections import Counter
from functools import partial
from pathlib import Path

import mlx_longheads  # noqa: F401  (loads OpenBLAS before MLX on Linux)
import mlx.core as mx
from mlx.utils import tree_map

from mlx_longheads import LongHeadsConfig, load
from mlx_longheads.eval import call_nll, code_version, prefilled, token_nll
from mlx_longheads.calibrate import fingerprint
from mlx_longheads.models import filter_relay
from mlx_longheads.longheads import CarryRelay, FilterRelay, note_choice, peakedness, roll_back, top_chunks
from mlx_longheads.resolve import cache_dir
from mlx_longheads.tasks import perplexity_text
from needle_oracle import write_report  # scripts/ is on the path when run


class RerunFilterRelay(FilterRelay):
    """one_pass_filter, with a way to run a group's pass again from its start."""

    def run_again(self, forward, caches, tokens, carried):
        """The group's pass rolled back and run again, the layers before the filter layer
        taking `carried` (pooled [B, 1, C], share [B, 1]); its own choice noted after."""
        roll_back(caches, tokens, carried)
        self.carried = carried
        out = forward()
        note_choice(caches[0], tokens, *self.fresh, self.shared)
        return out


class OwnChoiceFilterRelay(RerunFilterRelay):
    """one_pass_filter, but a group of several queries runs twice: the layers before the
    filter layer take, in the second pass, the group's own choice from the first."""

    def run(self, forward, caches, tokens):
        if tokens == 1:
            return super().run(forward, caches, tokens)
        super().run(forward, caches, tokens)
        return self.run_again(forward, caches, tokens, (self.kept, peakedness(self.kept)))


class MultiFilterRelay(FilterRelay):
    """one_pass_filter with several filter layers: from the first on, the layers follow
    the most peaked choice of the filter layers so far (or the carried one, where more
    peaked); the group notes the most peaked of the filter layers'."""

    def __init__(self, shared, span, full_length, layers):
        super().__init__(shared, span, full_length, min(layers))
        self.layers = sorted(layers)

    def choose(self, layer, block, measure):
        if layer < self.layer:
            return None if self.carried is None else self.carried[0]
        if layer in self.layers:
            pooled = measure()
            share = peakedness(pooled)
            if layer > self.layer:
                best, best_share = self.fresh
                own = share >= best_share
                pooled, share = mx.where(own[..., None], pooled, best), mx.where(own, share, best_share)
            self.fresh = (pooled, share)
            self.kept = pooled
            if self.carried is not None:
                carried, carried_share = self.carried
                self.kept = mx.where((carried_share > share)[..., None], carried, pooled)
        return self.kept


class CountingCarryRelay(CarryRelay):
    """two_pass_carry, counting which layer was each group's most peaked, and the groups
    whose shared chunks came out as the recent choice (the chunks noted in the chunk
    before): a first pass given that choice in every layer would have needed no second."""

    def __init__(self, shared, span):
        super().__init__(shared, span)
        self.counts = Counter()
        self.winner = None
        self.unchanged = self.groups = 0

    def choose(self, layer, block, measure):
        if self.replaying:
            return super().choose(layer, block, measure)
        measured = []
        pooled = super().choose(layer, block, lambda: measured.append(measure()) or measured[0])
        share = peakedness(measured[0])
        won = share >= self.best[block][1]
        self.winner = mx.full(share.shape, layer) if layer == 0 else mx.where(won, layer, self.winner)
        return pooled

    def between_passes(self, cache, tokens):
        self.counts.update(self.winner.reshape(-1).tolist())
        if cache.choices is None:  # the first group past F: no choice noted before it
            self.groups += 1
            return super().between_passes(cache, tokens)
        share, recent = cache.recent_choice(cache.offset, self.span)
        super().between_passes(cache, tokens)
        kept = top_chunks(self.best[0][0][:, 0], self.shared)
        same = (mx.sort(kept, axis=-1) == mx.sort(recent, axis=-1)).all(axis=-1) & (share >= 0)
        self.unchanged += int(same.sum().item())
        self.groups += same.size


def swap_relay(model, relay) -> None:
    """Give a linked model's layers another relay."""
    for index, layer in enumerate(model.layers):
        layer.self_attn.relay = partial(relay.choose, index)
    model.relay = relay


def with_own_choice(model) -> None:
    old = model.relay
    swap_relay(model, OwnChoiceFilterRelay(old.shared, old.span, old.full_length, old.layer))


def best_layers(model, n: int):
    """The calibration's n layers with the largest shares, from its file in the cache folder."""
    config = model.layers[0].self_attn.config
    shares = json.loads((cache_dir() / "calibration" / f"{fingerprint(model, config)}.json").read_text())["shares"]
    return sorted(range(len(shares)), key=lambda i: -shares[i])[:n]


def with_filter_layers(n: int):
    def adapt(model) -> None:
        old = model.relay
        swap_relay(model, MultiFilterRelay(old.shared, old.span, old.full_length, best_layers(model, n)))
    return adapt


def counting(model) -> None:
    old = model.relay
    swap_relay(model, CountingCarryRelay(old.shared, old.span))


FILTER = LongHeadsConfig(selection="one_pass_filter")
RULES = {
    "one_pass_filter": (FILTER, None),
    "one_pass_filter, the group's own choice before the filter layer (two passes)": (FILTER, with_own_choice),
    "one_pass_filter, the calibration's best two layers filtering": (FILTER, with_filter_layers(2)),
    "one_pass_filter, the calibration's best three layers filtering": (FILTER, with_filter_layers(3)),
    "two_pass_carry": (LongHeadsConfig(selection="two_pass_carry"), counting),
    "two_pass_prompt": (LongHeadsConfig(selection="two_pass_prompt"), None),
    "one_pass_prompt": (LongHeadsConfig(selection="one_pass_prompt"), None),
    "one_pass_reread": (LongHeadsConfig(selection="one_pass_reread"), None),
    "query_head": (LongHeadsConfig(selection="query_head"), None),
}


def layers_of(relay) -> str:
    """Which layers chose: the filter layers, or how often each was the most peaked."""
    if relay is None:
        return "each head its own"
    if isinstance(relay, CountingCarryRelay):
        return (
            "most peaked (groups): " + ", ".join(f"{layer} ({n})" for layer, n in relay.counts.most_common())
            + f"; shared chunks = the chunk before's in {relay.unchanged} of {relay.groups} groups"
        )
    return ", ".join(map(str, getattr(relay, "layers", [filter_relay(relay).layer])))


def period_nll(model, tokens, cache, period: int, decoded: int, progress):
    """-log p(token i | tokens < i) for i = 1..n-1, each period's inputs but its last
    `decoded` in one call, those one at a time; and which were fed one at a time."""
    nll, fed_alone = [], []
    for start in range(0, len(tokens) - 1, period):
        stop = min(start + period, len(tokens) - 1)
        calls = [(start, max(start, stop - decoded))] + [(i, i + 1) for i in range(max(start, stop - decoded), stop)]
        for lo, hi in calls:
            if lo == hi:
                continue
            nll += call_nll(model, tokens[lo:hi], tokens[lo + 1 : hi + 1], cache)
            fed_alone += [hi - lo == 1] * (hi - lo)
        progress(stop, len(tokens) - 1)
    return nll, fed_alone


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--index", type=int, default=0, help="the eval's perplexity text")
    parser.add_argument("--tokens", type=int, default=4096, help="positions scored after F")
    parser.add_argument("--output", type=Path, required=True)
    parser.add_argument("--rule", action="append", choices=RULES, help="run this rule (repeat; default: all)")
    parser.add_argument("--decoded", type=int, default=0, help="the last N tokens of each period fed one at a time")
    parser.add_argument("--period", type=int, default=512, help="tokens a period (with --decoded)")
    args = parser.parse_args()
    rules = {name: RULES[name] for name in args.rule or RULES}
    version = code_version()
    rows, prefix, scored_apart = [], None, []
    for name, (config, adapt) in rules.items():
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
        appended, append = [], cache[0].append
        cache[0].append = lambda q, *a: appended.append(q.shape[2]) or append(q, *a)  # token passes, counted
        tic = time.perf_counter()
        progress = lambda done, total: print(f"\r{name}: {done}/{total}", end="", flush=True)
        if args.decoded:
            nll, fed_alone = period_nll(model, tokens[F:], cache, args.period, args.decoded, progress)
        else:
            nll, fed_alone = token_nll(model, tokens[F:], cache, progress), []
        seconds = time.perf_counter() - tic
        halves = [nll[: len(nll) // 2], nll[len(nll) // 2 :]]
        w = model.layers[0].self_attn.config.chunk_size
        # scored apart: with --decoded the tokens fed one at a time, else a chunk's last quarter
        apart = fed_alone or [(F + i) % w >= w - w // 4 for i in range(len(nll))]
        parts = [[x for x, a in zip(nll, apart) if not a], [x for x, a in zip(nll, apart) if a]]
        scored_apart.append(parts[1])
        rows.append((name, math.exp(sum(nll) / len(nll)), *[math.exp(sum(h) / len(h)) for h in halves + parts], sum(appended) / len(nll), sum(nll), seconds, layers_of(getattr(model, "relay", None))))
        print(f"\n{rows[-1]}", flush=True)
    if args.decoded:
        fed = f"in periods of {args.period} tokens: all but the last {args.decoded} in one call, those one at a time"
        columns = ("read in one call", "fed one at a time")
        options = f" --decoded {args.decoded} --period {args.period}"
    else:
        fed, columns, options = "in the eval's 2048-token blocks", ("chunk's first 3/4", "chunk's last 1/4"), ""
    first = scored_apart[0]
    differences = []  # each rule's mean loss on the tokens scored apart, less the first rule's, paired by token
    for name, losses in zip(rules, scored_apart):
        d = [b - a for a, b in zip(first, losses)]
        mean = sum(d) / len(d)
        spread = math.sqrt(sum((x - mean) ** 2 for x in d) / max(len(d) - 1, 1) / len(d))
        differences.append(f"- {name}: {mean:+.4f} ± {2 * spread:.4f} nats a token ({len(d)} tokens)")
    lines = [
        "# Where one_pass_filter's perplexity past F differs from two_pass_carry's",
        "",
        f"Commit {version}; SmolLM2-135M-Instruct, float32, the CPU; the eval's perplexity text "
        f"{args.index}, positions {F + 1} to {F + args.tokens} (after a {F}-token prefix, F), fed {fed}.",
        "",
        f"`python scripts/perplexity_gap_study.py --index {args.index} --tokens {args.tokens}{options} --output {args.output}"
        + "".join(f" --rule '{name}'" for name in args.rule or []) + "`",
        "",
        f"| rule | perplexity | first half | second half | {columns[0]} | {columns[1]} | passes a token | summed loss (nats) | seconds | choosing layers |",
        "|---|---|---|---|---|---|---|---|---|---|",
        *[f"| {n} | {p:.3f} | {a:.3f} | {b:.3f} | {h:.3f} | {q:.3f} | {r:.2f} | {s:.1f} | {t:.0f} | {c} |" for n, p, a, b, h, q, r, s, t, c in rows],
        "",
        f"The tokens of the column \"{columns[1]}\", each rule's mean loss less the first rule's on the same "
        "tokens (± two standard errors of the paired differences):",
        "",
        *differences,
    ]
    write_report(lines, args.output)


if __name__ == "__main__":
    main()
