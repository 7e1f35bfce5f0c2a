"""LongHeads attention inside mlx-lm's llama (and mistral), qwen2 and qwen3 models.

The attention module of every layer is replaced by one that keeps the original
projections, norms and RoPE (so quantized weights and parameter names are unchanged)
and attends with `longheads_attention` over a `LongHeadsCache`.
"""

from dataclasses import replace
from functools import partial
from typing import Any, Callable, List, Optional, Tuple, Union

import mlx.core as mx
import mlx.nn as nn

from .cache import LongHeadsCache
from .config import ConfigError, LongHeadsConfig
from .calibrate import filter_layer
from .longheads import CarryRelay, FilterRelay, PeakedRelay, PromptRelay, RereadRelay, longheads_attention
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
        (the relay's `choose` bound to this layer); None for the other selections."""
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


class LinkedCall:
    """The forward call of a model whose selection links its layers, mixed into its class.

    A layer past F takes a choice made in another layer (the relay's, `longheads.CarryRelay`,
    `longheads.FilterRelay` or `longheads.PromptRelay`), and a group takes the one
    noted by the groups before it, so a call is cut into one piece per group (a chunk, or
    a token with prefill "exact") past F, each run by the relay (`run`: twice or once, as
    the selection has it): a prompt prefilled in one call is computed as when fed one
    group per call.
    """

    def __call__(self, inputs: mx.array, cache: Optional[List[LongHeadsCache]] = None) -> mx.array:
        cache = self.make_cache() if cache is None else cache
        config, relay = self.layers[0].self_attn.config, self.relay
        logits = []
        for first, last, linked in group_pieces(config, cache[0].offset, inputs.shape[1]):
            forward = partial(super().__call__, inputs[:, first:last], cache=cache)
            logits.append(relay.run(forward, cache, last - first) if linked else forward())
        return mx.concatenate(logits, axis=1)


def group_pieces(config: LongHeadsConfig, start: int, tokens: int) -> List[Tuple[int, int, bool]]:
    """How a selection that links layers cuts a call of `tokens` queries after `start`
    cached ones: (first, last, linked) per piece. Queries up to F are one piece, run as
    they are; past F one piece per group (a chunk, or a token with prefill "exact"),
    run by the relay."""
    below = min(max(config.full_chunks * config.chunk_size - start, 0), tokens)
    group = 1 if config.prefill == "exact" else config.chunk_size
    cuts = [i for i in range(below + 1, tokens) if (start + i) % group == 0]
    bounds = sorted({0, below, *cuts, tokens})
    return [(first, last, first >= below) for first, last in zip(bounds, bounds[1:])]


class RereadCall(LinkedCall):
    """The forward call under "one_pass_reread": `LinkedCall`'s, through the relay's
    `answer`, which reads a question again at a prompt's last token."""

    def __call__(self, inputs: mx.array, cache: Optional[List[LongHeadsCache]] = None) -> mx.array:
        cache = self.make_cache() if cache is None else cache
        return self.relay.answer(partial(LinkedCall.__call__, self, cache=cache), inputs, cache)


def with_linked_call(cls: type, call: Optional[type]) -> type:
    """A model class with `call` (`LinkedCall` or `RereadCall`) mixed in, or none (None)."""
    base = cls.__bases__[1] if issubclass(cls, LinkedCall) else cls
    return base if call is None else type(base.__name__, (call, base), {})


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


Relay = Union[CarryRelay, FilterRelay, PromptRelay, RereadRelay]


def make_relay(config: LongHeadsConfig) -> Optional[Relay]:
    """The link between a model's layers that the selection needs (None: unlinked)."""
    F = config.full_chunks * config.chunk_size
    carry = CarryRelay(config.shared_slots, config.chunk_size)
    filter = FilterRelay(config.shared_slots, config.chunk_size, F, config.filter_layer)
    peaked = PeakedRelay(config.shared_slots, config.chunk_size)
    relays = {
        "two_pass_carry": carry,
        "one_pass_filter": filter,
        "two_pass_prompt": PromptRelay(carry, filter),
        "one_pass_prompt": PromptRelay(peaked, filter),
        "one_pass_reread": RereadRelay(peaked, filter),
    }
    return relays.get(config.selection)


def filter_relay(relay: Relay) -> FilterRelay:
    """The part of a relay that follows a filter layer."""
    return relay.filter if isinstance(relay, PromptRelay) else relay


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
    if config.filter_layer is not None and config.filter_layer >= len(model.layers):
        raise ConfigError(
            f"filter_layer {config.filter_layer} is past the model's last layer "
            f"({len(model.layers) - 1}): use one from 0 to {len(model.layers) - 1}, or None to calibrate"
        )
    relay = make_relay(config)
    for index, layer in enumerate(model.layers):
        link = None if relay is None else partial(relay.choose, index)
        layer.self_attn = LongHeadsAttention(layer.self_attn, config, link)
    call = RereadCall if isinstance(relay, RereadRelay) else LinkedCall if config.links_layers else None
    model.__class__ = with_linked_call(type(model), call)
    if config.links_layers:
        model.relay = relay
    # An instance attribute: mlx-lm's make_prompt_cache calls model.make_cache().
    model.make_cache = lambda: [make_cache(config, max_size) for _ in model.layers]
    if config.filters and config.filter_layer is None:
        # Calibrated with the model's own attention (`calibrate.own_attention`): no relay asked.
        config = replace(config, filter_layer=filter_layer(model, config))
        filter_relay(relay).layer = config.filter_layer
        for layer in model.layers:
            layer.self_attn.config = config
    return config


def longheads_config(model: nn.Module) -> Optional[LongHeadsConfig]:
    """The resolved configuration of a LongHeads model; None for stock attention."""
    attention = model.layers[0].self_attn
    return attention.config if isinstance(attention, LongHeadsAttention) else None
