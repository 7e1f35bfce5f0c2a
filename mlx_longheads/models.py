"""LongHeads attention inside mlx-lm's llama (and mistral), qwen2 and qwen3 models.

The attention module of every layer is replaced by one that keeps the original
projections, norms and RoPE (so quantized weights and parameter names are unchanged)
and attends with `longheads_attention` over a `LongHeadsCache`.
"""

from functools import partial
from typing import Any, Callable, List, Optional, Tuple

import mlx.core as mx
import mlx.nn as nn

from .cache import LongHeadsCache
from .config import ConfigError, LongHeadsConfig
from .longheads import CarryRelay, ReuseRelay, longheads_attention
from .support import ARCHITECTURES

SUPPORTED_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


class LongHeadsAttention(nn.Module):
    def __init__(
        self,
        attention: nn.Module,
        config: LongHeadsConfig,
        relay: Optional[Callable[[int, mx.array], mx.array]] = None,
    ):
        """relay: the link to the model's other layers of a selection that has one
        (the relay's `most_peaked` bound to this layer); None for the other selections."""
        super().__init__()
        self.n_heads = attention.n_heads
        self.n_kv_heads = attention.n_kv_heads
        self.scale = attention.scale
        self.q_proj = attention.q_proj
        self.k_proj = attention.k_proj
        self.v_proj = attention.v_proj
        self.o_proj = attention.o_proj
        if "q_norm" in attention:
            self.q_norm = attention.q_norm
            self.k_norm = attention.k_norm
        self.rope = attention.rope
        self.config = config
        self.relay = relay

    def __call__(
        self, x: mx.array, mask: Any = None, cache: Optional[LongHeadsCache] = None
    ) -> mx.array:
        B, T, _ = x.shape
        queries = self.q_proj(x).reshape(B, T, self.n_heads, -1)
        keys = self.k_proj(x).reshape(B, T, self.n_kv_heads, -1)
        values = self.v_proj(x).reshape(B, T, self.n_kv_heads, -1)
        if "q_norm" in self:
            queries, keys = self.q_norm(queries), self.k_norm(keys)
        if cache is None:
            cache = make_cache(self.config)
        out = longheads_attention(
            queries.transpose(0, 2, 1, 3),
            keys.transpose(0, 2, 1, 3),
            values.transpose(0, 2, 1, 3),
            cache,
            self.rope,
            self.scale,
            self.config,
            self.relay,
        )
        return self.o_proj(out.transpose(0, 2, 1, 3).reshape(B, T, -1))


class TwoPassCall:
    """The forward call of a model under a two-pass selection, mixed into its class.

    Each group of queries past F goes through the model twice: the first pass leaves
    the most peaked layer's pooled attention in the `CarryRelay`; the cache is trimmed
    back (and the relay told, `between_passes`) and the second pass, whose keys, values
    and logits are kept, gives every layer that choice's shared chunks. A group's
    second pass must read the second-pass keys of the groups before it, so a call is
    cut into one piece per group (a chunk, or a token with prefill "exact") past F:
    a prompt prefilled in one call is computed as when fed one group per call. With
    "two_pass_reuse" a decoded token may skip its first pass (`ReuseRelay`).
    """

    def __call__(self, inputs: mx.array, cache: Optional[List[LongHeadsCache]] = None) -> mx.array:
        cache = self.make_cache() if cache is None else cache
        config, relay = self.layers[0].self_attn.config, self.two_pass_relay
        logits = []
        for first, last, twice in two_pass_pieces(config, cache[0].offset, inputs.shape[1]):
            forward = partial(super().__call__, inputs[:, first:last], cache=cache)
            logits.append(run_twice(forward, cache, relay, last - first) if twice else forward())
        return mx.concatenate(logits, axis=1)


def run_twice(forward: Callable[[], Any], cache: List[LongHeadsCache], relay: CarryRelay, tokens: int) -> Any:
    """One group's two passes through `forward` (the model's, or layers', call on its
    `tokens` queries): the first, where the relay asks for it, then the cache rolled
    back and the second, whose result is returned."""
    if relay.first_pass_needed(cache[0], tokens):
        relay.replaying = False
        forward()
        # Evaluated before the roll-back: no read of the first pass is pending
        # when the second writes over its keys and values (no buffer copies).
        mx.eval([best for best, _ in relay.best.values()], [c.buffers for c in cache])
        if [layer_cache.trim(tokens) for layer_cache in cache] != [tokens] * len(cache):
            raise RuntimeError("the first pass could not be rolled back exactly")
        relay.between_passes(cache[0], tokens)
    else:
        relay.without_first_pass(cache[0], tokens)
    relay.replaying = True
    try:
        return forward()
    finally:
        relay.replaying = False


def two_pass_pieces(config: LongHeadsConfig, start: int, tokens: int) -> List[Tuple[int, int, bool]]:
    """How a two-pass selection cuts a call of `tokens` queries after `start` cached ones:
    (first, last, twice) per piece. Queries up to F are one piece, run once; past F one
    piece per group (a chunk, or a token with prefill "exact"), run twice."""
    below = min(max(config.full_chunks * config.chunk_size - start, 0), tokens)
    group = 1 if config.prefill == "exact" else config.chunk_size
    cuts = [i for i in range(below + 1, tokens) if (start + i) % group == 0]
    bounds = sorted({0, below, *cuts, tokens})
    return [(first, last, first >= below) for first, last in zip(bounds, bounds[1:])]


def with_two_pass(cls: type, two_pass: bool) -> type:
    """A model class with `TwoPassCall` mixed in, or taken out again."""
    base = cls.__bases__[1] if issubclass(cls, TwoPassCall) else cls
    return type(base.__name__, (TwoPassCall, base), {}) if two_pass else base


def check_supported(model: nn.Module) -> None:
    """Refuse what LongHeads cannot handle correctly, naming the rule."""
    args = model.args
    if args.model_type not in ARCHITECTURES:
        raise ConfigError(
            f"model type {args.model_type!r} is not supported by LongHeads: "
            f"use one of {', '.join(ARCHITECTURES)}"
        )
    scaling = getattr(args, "rope_scaling", None) or {}
    rope_type = scaling.get("type") or scaling.get("rope_type") or "default"
    if rope_type not in SUPPORTED_ROPE_TYPES:
        raise ConfigError(
            f"rope scaling {rope_type!r} is not supported by LongHeads "
            f"(positions must not depend on sequence length): use one of "
            f"{', '.join(SUPPORTED_ROPE_TYPES)}"
        )
    if any(t != "full_attention" for t in getattr(args, "layer_types", None) or []):
        raise ConfigError(
            "models with sliding-window layers are not supported by LongHeads"
        )


def head_dim(args: Any) -> int:
    """A model's attention head dim from its args: set, or hidden size / heads."""
    return getattr(args, "head_dim", None) or args.hidden_size // args.num_attention_heads


def make_cache(config: LongHeadsConfig, max_size: Optional[int] = None) -> LongHeadsCache:
    """One layer's cache for a resolved configuration."""
    return LongHeadsCache(config.chunk_size, max_size, config.kv_bits, config.kv_group_size)


def make_relay(config: LongHeadsConfig) -> Optional[CarryRelay]:
    """The link between a model's layers that the selection needs (None: unlinked)."""
    relays = {"two_pass_carry": CarryRelay, "two_pass_reuse": ReuseRelay}
    relay = relays.get(config.selection)
    return relay(config.shared_slots, config.chunk_size) if relay else None


def apply_longheads(
    model: nn.Module,
    config: Optional[LongHeadsConfig] = None,
    max_size: Optional[int] = None,
) -> LongHeadsConfig:
    """Swap every layer's attention for LongHeads in place; return the resolved config.

    max_size: tokens each layer's cache allocates at once (for example the maximum
    context), so long runs never reallocate.
    """
    check_supported(model)
    config = (config or LongHeadsConfig()).resolve(
        model.args.max_position_embeddings, head_dim(model.args)
    )
    relay = make_relay(config)
    for index, layer in enumerate(model.layers):
        link = None if relay is None else partial(relay.most_peaked, index)
        layer.self_attn = LongHeadsAttention(layer.self_attn, config, link)
    model.__class__ = with_two_pass(type(model), config.runs_twice)
    if config.runs_twice:
        model.two_pass_relay = relay
    # An instance attribute: mlx-lm's make_prompt_cache calls model.make_cache().
    model.make_cache = lambda: [make_cache(config, max_size) for _ in model.layers]
    return config


def longheads_config(model: nn.Module) -> Optional[LongHeadsConfig]:
    """The resolved configuration of a LongHeads model; None for stock attention."""
    attention = model.layers[0].self_attn
    return attention.config if isinstance(attention, LongHeadsAttention) else None
