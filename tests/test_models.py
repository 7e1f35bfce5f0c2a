"""LongHeads inside mlx-lm's llama, qwen2 and qwen3 models."""

import mlx.core as mx
import mlx.nn as nn
import numpy as np
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.models import gpt2

from conftest import clone, tiny_model
from mlx_longheads.cache import LongHeadsCache
from mlx_longheads.config import SELECTIONS, ConfigError, LongHeadsConfig
from mlx_longheads.models import apply_longheads

CONFIG = LongHeadsConfig(chunk_size=8, attention_length=64)


def longheads_copy(model, config=CONFIG):
    copy = clone(model)
    apply_longheads(copy, config)
    return copy


def tokens(n, seed=0):
    return mx.array(np.random.default_rng(seed).integers(0, 97, size=(1, n)))


def test_below_attention_length_logits_equal_stock_attention(arch):
    stock = tiny_model(arch)
    x = tokens(64)
    np.testing.assert_allclose(
        np.array(longheads_copy(stock)(x)), np.array(stock(x)), atol=1e-4
    )


def test_below_attention_length_generate_step_equals_stock(arch):
    """Through mlx-lm's generate_step: stock's logits within 1e-4, so stock's greedy
    tokens, every step's margin (top-1 minus top-2) being more than twice that."""
    stock = tiny_model(arch)
    prompt = tokens(30)[0]
    runs = [
        list(generate_step(prompt, model, max_tokens=30, prefill_step_size=7))
        for model in (stock, longheads_copy(stock))
    ]
    top2 = np.sort(np.array([lp for _, lp in runs[0]]), axis=-1)[:, -2:]
    assert (top2[:, 1] - top2[:, 0]).min() > 2e-4  # no near-tie for rounding to decide
    assert [t for t, _ in runs[0]] == [t for t, _ in runs[1]]
    for (_, a), (_, b) in zip(*runs):
        np.testing.assert_allclose(np.array(a), np.array(b), atol=1e-4)


# Every selection on one architecture, and every architecture on the default.
SELECTIONS_AND_ARCHITECTURES = [
    *[("llama", s) for s in SELECTIONS],
    ("qwen2", LongHeadsConfig.selection),
    ("qwen3", LongHeadsConfig.selection),
]


@pytest.mark.parametrize("n", [63, 64, 65, 130])
@pytest.mark.parametrize("arch, selection", SELECTIONS_AND_ARCHITECTURES)
def test_exact_prefill_logits_equal_token_by_token_decode(arch, selection, n):
    """At the shipped shape (F = 64 > L = 32, chunks of 8), on both sides of F: the
    selections that link layers run each group past F alone ("two_pass_carry" twice),
    reading the choices noted in the cache by the tokens before."""
    config = LongHeadsConfig(8, 32, selection=selection, prefill="exact", full_attention_length=64)
    model = longheads_copy(tiny_model(arch), config)
    x = tokens(n, seed=n)
    prefill = model(x)
    cache = model.make_cache()
    decode = mx.concatenate([model(x[:, i : i + 1], cache=cache) for i in range(n)], axis=1)
    np.testing.assert_allclose(np.array(prefill), np.array(decode), atol=1e-4)


def test_two_pass_prefill_in_one_call_equals_one_chunk_per_call(monkeypatch):
    """Grouped prefill under "two_pass_carry", one call of 300 tokens: stock attention up
    to F, then each chunk past F is its own group, run twice (the cache rolled back in
    between), so the call gives the logits of feeding one chunk per call."""
    config = LongHeadsConfig(8, 32, selection="two_pass_carry", full_attention_length=64)
    model = longheads_copy(tiny_model("llama"), config)
    x = tokens(300, seed=3)
    relay, groups = model.relay, []
    between = relay.between_passes
    monkeypatch.setattr(relay, "between_passes", lambda cache, n: groups.append(n) or between(cache, n))
    whole = model(x)
    assert groups == [8] * 29 + [4]  # the chunks 64..295 and the last 4 tokens
    cache, bounds = model.make_cache(), [0, 64, *range(72, 300, 8), 300]
    pieces = [model(x[:, a:b], cache=cache) for a, b in zip(bounds, bounds[1:])]
    assert cache[0].offset == 300
    np.testing.assert_allclose(np.array(whole), np.array(mx.concatenate(pieces, axis=1)), atol=1e-4)


@pytest.mark.parametrize("full_attention_length, stock_up_to", [(64, 64), (None, 256)])
def test_past_the_full_attention_length_it_differs_from_stock(full_attention_length, stock_up_to):
    """The paper's threshold (F = L = 64) and the default (F = the trained length, 256):
    stock attention up to F, the long-context path after it (not a test of quality)."""
    stock = tiny_model("llama")
    config = LongHeadsConfig(8, 64, full_attention_length=full_attention_length)
    model = longheads_copy(stock, config)
    assert model.layers[0].self_attn.config.full_attention_length == stock_up_to
    x = tokens(stock_up_to + 136)
    diff = mx.abs(model(x) - stock(x))
    assert diff[:, :stock_up_to].max().item() < 1e-4
    assert diff[:, stock_up_to:].max().item() > 1e-2


def test_quantized_weights_keep_working():
    stock = tiny_model("llama")
    nn.quantize(stock, group_size=32, bits=4)
    model = type(stock)(stock.args)
    nn.quantize(model, group_size=32, bits=4)
    model.update(stock.parameters())
    apply_longheads(model, CONFIG)
    assert isinstance(model.layers[0].self_attn.q_proj, nn.QuantizedLinear)
    x = tokens(40)
    np.testing.assert_allclose(np.array(model(x)), np.array(stock(x)), atol=1e-4)


def test_other_architectures_are_refused():
    args = gpt2.ModelArgs(
        model_type="gpt2", n_ctx=64, n_embd=32, n_head=2, n_layer=1, n_positions=64,
        layer_norm_epsilon=1e-5, vocab_size=50,
    )
    with pytest.raises(
        ConfigError,
        match="model type 'gpt2' is not supported by LongHeads: use one of llama, mistral, qwen2, qwen3",
    ):
        apply_longheads(gpt2.Model(args), CONFIG)


def test_dynamic_ntk_rope_is_refused():
    model = tiny_model("llama", rope_scaling={"type": "dynamic", "factor": 2.0})
    with pytest.raises(ConfigError) as refused:
        apply_longheads(model, CONFIG)
    assert "rope scaling 'dynamic' is not supported" in str(refused.value)
    assert "use one of default, linear, llama3, yarn" in str(refused.value)


@pytest.mark.parametrize(
    "config, rule, fix",
    [
        (LongHeadsConfig(8, 512), "exceeds the model's trained length 256", "use at most 256"),
        (LongHeadsConfig(24, 64), "must be a multiple of chunk_size 24", "choose a chunk_size that divides it"),
        (LongHeadsConfig(32, 96), "at least 4 are needed", "lower chunk_size or raise attention_length"),
        (LongHeadsConfig(8, 64, selection="head"), "selection must be", "'two_pass_carry', 'one_pass_filter', 'two_pass_prompt', 'one_pass_prompt', 'one_pass_reread', 'query_head', 'kv_head'"),
        (LongHeadsConfig(8, 64, selection="pooled"), "selection 'pooled' was removed", "use one of 'two_pass_carry'"),
        (LongHeadsConfig(8, 64, full_attention_length=32), "at least attention_length 64", "use 64 for the paper's rule"),
        (LongHeadsConfig(8, 64, full_attention_length=100), "must be a multiple of chunk_size 8", "or the trained length"),
        (LongHeadsConfig(8, 64, full_attention_length=512), "full_attention_length 512 exceeds", "use at most 256"),
        (LongHeadsConfig(8, 64, prefill="fast"), "prefill must be", "'grouped' or 'exact'"),
        (LongHeadsConfig(8, 64, kv_bits=3), "kv_bits must be one of (4, 8)", "or None for float K/V"),
        (LongHeadsConfig(8, 64, kv_bits=8), "kv_group_size must be one of (32, 64, 128)", "got 16 (the head dim 16)"),
        (LongHeadsConfig(8, 64, kv_bits=8, kv_group_size=64), "must divide the head dim 16", "use one of none"),
        (LongHeadsConfig(8, 64, kv_group_size=32), "only applies to quantized K/V", "set kv_bits too"),
    ],
)
def test_invalid_configurations_fail_at_load_time(config, rule, fix):
    """Each message names the broken rule and the way to fix it."""
    with pytest.raises(ConfigError) as refused:
        apply_longheads(tiny_model("llama"), config)
    assert rule in str(refused.value) and fix in str(refused.value)


# Measured on seeds 0-2 of the three architectures: at most 0.083 inside L, 1.4% of the
# largest logit past it, every argmax the same, 98.9% of the selected chunks the same.
@pytest.mark.parametrize(
    "arch, shape",  # head dim 32: the smallest MLX quantizes
    [("llama", dict(head_dim=32)), ("qwen2", dict(hidden_size=128)), ("qwen3", dict(head_dim=32))],
)
def test_kv_bits_8_stays_close_to_float(arch, shape, monkeypatch):
    """Prefill and decode past L: logits and selections nearly those of float K/V."""
    from mlx_longheads import longheads

    select_chunks, selections = longheads.select_chunks, []

    def recording(*args, **kwargs):
        slots = select_chunks(*args, **kwargs)
        selections.append(np.array(slots))
        return slots

    monkeypatch.setattr(longheads, "select_chunks", recording)
    stock, x = tiny_model(arch, **shape), tokens(300)
    runs = {}
    for bits in (None, 8):
        selections.clear()
        model = longheads_copy(stock, LongHeadsConfig(8, 64, "query_head", kv_bits=bits, full_attention_length=64))
        cache = model.make_cache()
        logits = [model(x[:, :250], cache=cache)]
        logits += [model(x[:, t : t + 1], cache=cache) for t in range(250, 300)]
        runs[bits] = np.array(mx.concatenate(logits, axis=1))[0], list(selections)
    assert cache[0].bits == 8 and cache[0].group_size == 32
    (exact, exact_slots), (quantized, slots) = runs[None], runs[8]
    diff = np.abs(quantized - exact)
    assert diff[:64].max() < 0.15
    assert diff.max() < 0.03 * np.abs(exact).max()
    assert (quantized.argmax(-1) == exact.argmax(-1)).mean() >= 0.95
    same = np.concatenate([(a == b).ravel() for a, b in zip(slots, exact_slots)])
    assert same.mean() >= 0.98


def test_defaults_come_from_the_trained_length():
    config = apply_longheads(tiny_model("llama"))
    assert config.attention_length == 64  # a quarter of max_position_embeddings 256
    assert config.chunk_size == 16  # 256 capped so that at least 4 chunks fit
    big = LongHeadsConfig().resolve(8192)
    assert (big.chunk_size, big.attention_length) == (256, 2048)


def test_make_cache_gives_longheads_caches():
    model = longheads_copy(tiny_model("qwen3"))
    caches = model.make_cache()
    assert len(caches) == 2 and all(isinstance(c, LongHeadsCache) for c in caches)


def test_smollm2_below_attention_length_equals_stock_attention(embedded):
    """The embedded model: 150 tokens (past two chunk boundaries) inside L = 256."""
    from conftest import with_longheads

    stock, tokenizer = embedded
    model = with_longheads(stock, LongHeadsConfig(64, 256))
    x = mx.array(tokenizer.encode("The grass is green. The sky is blue. " * 15)[:150])[None]
    assert x.shape[1] == 150
    np.testing.assert_allclose(np.array(model(x)), np.array(stock(x)), atol=2e-3)
