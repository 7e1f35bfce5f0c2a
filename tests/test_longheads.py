"""The attention rule against a naive numpy implementation of the design note."""

from dataclasses import replace
from functools import partial

import mlx.core as mx
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from mlx import nn

from mlx_longheads import longheads
from mlx_longheads.cache import LongHeadsCache
from mlx_longheads.config import FILTERING_SELECTIONS, LINKED_SELECTIONS, SELECTIONS, LongHeadsConfig
from mlx_longheads.longheads import (
    chunk_representations,
    longheads_attention,
    rotate_in_chunks,
    select_chunks,
)
from mlx_longheads.models import group_pieces, make_cache, make_relay

import reference

BASE = 10000.0
H, HK, D = 4, 2, 16
SCALE = D**-0.5


def random_qkv(n: int, seed: int = 0, d: int = D):
    rng = np.random.default_rng(seed)
    q = rng.normal(size=(H, n, d)).astype(np.float32) * 2
    k = rng.normal(size=(HK, n, d)).astype(np.float32) * 2
    v = rng.normal(size=(HK, n, d)).astype(np.float32)
    return q, k, v


def run_layers(layers, config, steps, scale=SCALE, rope=None):
    """Several layers' longheads_attention ((q, k, v) each) over the tokens in calls of
    the given sizes, each call going through the layers in order as a model's forward
    call does (linked by the selection's relay, `models.make_relay`; with a selection
    that links layers each call cut into `models.group_pieces` and a piece past F run
    by the relay, as `models.LinkedCall` does).
    Returns each layer's outputs and cache."""
    relay = make_relay(config)
    caches = [make_cache(config) for _ in layers]
    rope = nn.RoPE(layers[0][0].shape[-1], base=BASE) if rope is None else rope
    outputs, start = [[] for _ in layers], 0

    def forward(sl):
        return [
            longheads_attention(
                *(mx.array(a[None, :, sl]) for a in (q, k, v)),
                caches[index], rope, scale, config,
                partial(relay.choose, index) if config.links_layers else None,
            )
            for index, (q, k, v) in enumerate(layers)
        ]

    for size in steps:
        pieces = group_pieces(config, start, size) if config.links_layers else [(0, size, False)]
        for first, last, linked in pieces:
            call = partial(forward, slice(start + first, start + last))
            for index, out in enumerate(relay.run(call, caches, last - first) if linked else call()):
                outputs[index].append(out)
        start += size
    return [np.array(mx.concatenate(out, axis=2)[0]) for out in outputs], caches


def run(q, k, v, config, steps, scale=SCALE):
    """One layer's longheads_attention over the tokens in calls of the given sizes."""
    (out,), (cache,) = run_layers([(q, k, v)], config, steps, scale)
    return out, cache


def expected_outputs(layers, config, group_of=None, scale=SCALE):
    """The numpy rule's outputs of each layer under `config`'s selection, and the
    smallest margin of its choices: between two shares or two chunks' scores it
    ranked (inf where it ranked none)."""
    w, L, F = config.chunk_size, config.attention_length, config.full_attention_length
    if config.links_layers:
        return reference.linked_layers(
            layers, w, L, scale, BASE, config.selection, config.filter_layer or 0, group_of=group_of, F=F
        )
    per_kv_head, gaps = config.selection == "kv_head", [np.inf]
    outputs = [
        reference.longheads(q, k, v, w, L, scale, BASE, group_of=group_of, per_kv_head=per_kv_head, F=F, gaps=gaps)
        for q, k, v in layers
    ]
    return outputs, min(gaps)


def groups_of_calls(steps, w, prefill):
    """group_of for `reference.longheads`: a token alone (exact), or a chunk's tokens
    within one call (grouped)."""
    n = sum(steps)
    if prefill == "exact":
        return None
    call_of = np.searchsorted(np.cumsum(steps), np.arange(n), side="right")
    return call_of * 1000 + np.arange(n) // w


def assert_layers_follow_the_rule(config, steps, seed, n_layers):
    """n_layers random layers of 120 tokens run in calls of `steps` give the numpy rule's
    outputs, none of its choices a near-tie for rounding to decide."""
    layers = [random_qkv(120, seed=seed + layer) for layer in range(n_layers)]
    expected, gap = expected_outputs(layers, config, groups_of_calls(steps, config.chunk_size, config.prefill))
    assert gap > 1e-4
    for out, want in zip(run_layers(layers, config, steps)[0], expected):
        np.testing.assert_allclose(out, want, atol=2e-5)


def test_chunk_representations_match_the_formula():
    w, n = 8, 3
    q, k, v = random_qkv(w * n)
    rope = nn.RoPE(D, base=BASE)
    keys_in_chunks = rotate_in_chunks(mx.array(k[None]), 0, rope, w)
    reps = chunk_representations(
        mx.array(q[None]), keys_in_chunks, mx.array(v[None]), rope, SCALE, w
    )
    for h in range(H):
        for c in range(n):
            chunk = slice(c * w, (c + 1) * w)
            expected = reference.representation(
                q[h, chunk], k[h // 2, chunk], v[h // 2, chunk], SCALE, BASE
            )
            np.testing.assert_allclose(np.array(reps[0, h, c]), expected, atol=2e-5)


@pytest.mark.parametrize("selection", ["query_head", "kv_head"])
@pytest.mark.parametrize("n", [95, 96, 97, 120])
def test_exact_mode_matches_the_rule_token_by_token(selection, n):
    """Prefill (one call) and decode (one token per call) both equal the numpy rule."""
    config = LongHeadsConfig(8, 32, selection=selection, prefill="exact", full_attention_length=32)
    q, k, v = random_qkv(n, seed=n)
    (expected,), gap = expected_outputs([(q, k, v)], config)
    assert gap > 1e-4  # no near-tie of two chunks' scores for rounding to decide
    prefill, _ = run(q, k, v, config, [n])
    decode, _ = run(q, k, v, config, [1] * n)
    np.testing.assert_allclose(prefill, expected, atol=2e-5)
    np.testing.assert_allclose(decode, expected, atol=2e-5)


@pytest.mark.parametrize("selection", ["query_head", "kv_head"])
def test_grouped_mode_shares_one_selection_per_chunk_and_call(selection):
    """Calls of 20 tokens over chunks of 8: a group is a chunk's queries within one call."""
    w, n, step = 8, 100, 20
    config = LongHeadsConfig(w, 32, selection=selection, prefill="grouped", full_attention_length=32)
    q, k, v = random_qkv(n, seed=3)
    steps = [step] * (n // step)
    (expected,), gap = expected_outputs([(q, k, v)], config, groups_of_calls(steps, w, "grouped"))
    assert gap > 1e-4
    out, _ = run(q, k, v, config, steps)
    np.testing.assert_allclose(out, expected, atol=2e-5)


@pytest.mark.parametrize("selection", ["two_pass_carry", "query_head", "kv_head"])
@pytest.mark.parametrize("prefill, steps", [("grouped", [64] + [1] * 36), ("exact", [100])])
def test_products_on_copied_out_chunks_are_the_same_attention(monkeypatch, selection, prefill, steps):
    """The CUDA path (chunks taken out, then an ordinary matmul), forced on this device."""
    monkeypatch.setattr(longheads, "products_in_place", lambda: False)
    config = LongHeadsConfig(8, 32, selection=selection, prefill=prefill, full_attention_length=48)
    layers = [random_qkv(100, seed=4)]
    (expected,), gap = expected_outputs(layers, config, groups_of_calls(steps, 8, prefill))
    assert gap > 1e-4  # no near-tie for rounding to decide
    out, _ = run(*layers[0], config, steps)
    np.testing.assert_allclose(out, expected, atol=2e-5)


@pytest.mark.parametrize("selection", SELECTIONS)
def test_grouped_and_exact_agree_where_groups_have_one_query(selection):
    config = LongHeadsConfig(8, 32, selection, filter_layer=0 if selection in FILTERING_SELECTIONS else None)
    q, k, v = random_qkv(70, seed=5)
    grouped, _ = run(q, k, v, config, [1] * 70)
    exact, _ = run(q, k, v, replace(config, prefill="exact"), [70])
    np.testing.assert_allclose(grouped, exact, atol=2e-5)


def test_below_attention_length_it_is_ordinary_causal_attention():
    q, k, v = random_qkv(40, seed=7)
    out, _ = run(q, k, v, LongHeadsConfig(8, 64), [13, 27])
    rope = nn.RoPE(D, base=BASE)
    qr, kr = rope(mx.array(q[None])), rope(mx.array(k[None]))
    # On the CPU stream: MLX's CUDA attention rounds float32 to about 3 digits (an H200).
    expected = mx.fast.scaled_dot_product_attention(
        qr, kr, mx.array(v[None]), scale=SCALE, mask="causal", stream=mx.cpu
    )
    np.testing.assert_allclose(out, np.array(expected[0]), atol=2e-5)


def test_below_the_full_attention_length_it_is_stock_attention_past_attention_length():
    """F = 64 > L = 32: every query of a 64-token prompt sees all tokens before it."""
    q, k, v = random_qkv(64, seed=8)
    out, _ = run(q, k, v, LongHeadsConfig(8, 32, full_attention_length=64), [13, 27, 24])
    rope = nn.RoPE(D, base=BASE)
    qr, kr = rope(mx.array(q[None])), rope(mx.array(k[None]))
    expected = mx.fast.scaled_dot_product_attention(
        qr, kr, mx.array(v[None]), scale=SCALE, mask="causal", stream=mx.cpu
    )
    np.testing.assert_allclose(out, np.array(expected[0]), atol=2e-5)


@pytest.mark.parametrize("selection", SELECTIONS)
@pytest.mark.parametrize(
    "prefill, steps",
    [("exact", [120]), ("exact", [1] * 120), ("grouped", [50, 30] + [1] * 40), ("grouped", [20] * 6)],
)
def test_past_the_full_attention_length_heads_select(selection, prefill, steps):
    """The shipped shape, F > L (F = 48, L = 32, chunks of 8): stock attention below F
    and the selection past it, also inside one call, as the numpy rule gives it (two
    layers where the selection links them; the filter layer the second)."""
    config = LongHeadsConfig(8, 32, selection=selection, prefill=prefill, full_attention_length=48,
                             filter_layer=1 if selection in FILTERING_SELECTIONS else None)
    assert_layers_follow_the_rule(config, steps, seed=9, n_layers=2 if config.links_layers else 1)


@pytest.mark.parametrize("L, F", [(32, 32), (56, 56), (32, 56)])
@pytest.mark.parametrize("prefill, steps", [("exact", [1] * 120), ("grouped", [4, 4] + [8] * 11 + [1] * 24)])
def test_two_pass_selection_follows_the_most_peaked_layer_of_the_first_pass(L, F, prefill, steps):
    """Three layers, calls of one group each (as `models.LinkedCall` cuts them): in
    the second pass every layer's shared chunks come from the pooled attention of the
    most peaked of all layers, by the share of its top chunk, or from a more peaked
    group's within the chunk before (the numpy rule)."""
    config = LongHeadsConfig(8, L, selection="two_pass_carry", prefill=prefill, full_attention_length=F)
    assert_layers_follow_the_rule(config, steps, seed=20, n_layers=3)


# The paper's shape (F = L) and the shipped one (F > L) with the middle layer filtering; at the
# shipped shape the first and the last layer too (no layer before it, none after it).
@pytest.mark.parametrize("L, F, filter_layer", [(32, 32, 1), (56, 56, 1), (32, 56, 0), (32, 56, 1), (32, 56, 2)])
@pytest.mark.parametrize("prefill, steps", [("exact", [1] * 120), ("grouped", [4, 4] + [8] * 11 + [1] * 24), ("grouped", [120])])
def test_one_pass_filter_shares_the_filter_layers_choice(L, F, filter_layer, prefill, steps):
    """Three layers, one pass: the filter layer's pooled attention, or a more peaked
    group's noted within the chunk before, gives the shared chunks of it and the layers
    after it; the layers before it take that earlier group's (each head its own where
    none was noted, at the first group past F), as the numpy rule gives it."""
    config = LongHeadsConfig(8, L, selection="one_pass_filter", prefill=prefill, full_attention_length=F,
                             filter_layer=filter_layer)
    assert_layers_follow_the_rule(config, steps, seed=40, n_layers=3)


# Calls that give groups of several queries and groups of one, inside a prompt too (a call
# starting on a chunk's last token), at the paper's shape and the shipped one.
@pytest.mark.parametrize("L, F, filter_layer", [(32, 32, 1), (32, 56, 0), (32, 56, 2)])
@pytest.mark.parametrize("prefill, steps", [("exact", [1] * 120), ("grouped", [47, 17, 25, 31]), ("grouped", [61, 30] + [1] * 29)])
def test_two_pass_prompt_reads_chunks_as_two_pass_carry_and_tokens_as_one_pass_filter(L, F, filter_layer, prefill, steps):
    """Three layers: a group of several queries (a prompt's chunk) gives every layer the
    most peaked layer's choice, as "two_pass_carry"; a group of one (a decoded token)
    the filter layer's, as "one_pass_filter"; each kept against the choice noted by the
    groups in the chunk before, whichever rule noted it (the numpy rule)."""
    config = LongHeadsConfig(8, L, selection="two_pass_prompt", prefill=prefill, full_attention_length=F,
                             filter_layer=filter_layer)
    assert_layers_follow_the_rule(config, steps, seed=63, n_layers=3)


@pytest.mark.parametrize("L, F, filter_layer", [(32, 32, 1), (32, 56, 0), (32, 56, 2)])
@pytest.mark.parametrize("prefill, steps", [("exact", [1] * 120), ("grouped", [47, 17, 25, 31]), ("grouped", [61, 30] + [1] * 29)])
def test_one_pass_prompt_reads_a_chunk_once_following_the_most_peaked_layer_so_far(L, F, filter_layer, prefill, steps):
    """Three layers: in a group of several queries (a prompt's chunk) each layer follows
    the most peaked of it and the layers before it; a group of one (a decoded token)
    the filter layer's choice, as "one_pass_filter"; each kept against the choice noted
    by the groups in the chunk before, whichever rule noted it (the numpy rule)."""
    config = LongHeadsConfig(8, L, selection="one_pass_prompt", prefill=prefill, full_attention_length=F,
                             filter_layer=filter_layer)
    assert_layers_follow_the_rule(config, steps, seed=63, n_layers=3)


@pytest.mark.parametrize("selection", LINKED_SELECTIONS)
def test_the_linked_selections_need_the_models_other_layers(selection):
    q, k, v = (mx.array(a[None]) for a in random_qkv(8))
    config = LongHeadsConfig(8, 32, selection=selection)
    with pytest.raises(ValueError, match="apply it with apply_longheads"):
        longheads_attention(q, k, v, make_cache(config), nn.RoPE(D, base=BASE), SCALE, config)


def layer_attending_to(chunks, strength, w, n, seed):
    """A layer's (q, k, v) whose last query matches every key of `chunks` along dim 0,
    with `strength` setting how much of its attention they take."""
    q, k, v = random_qkv(n, seed=seed)
    for chunk in chunks:
        k[:, chunk * w : (chunk + 1) * w] = 0
        k[:, chunk * w : (chunk + 1) * w, 0] = strength
    q[:, n - 1] = 0
    q[:, n - 1, 0] = strength
    return q, k, v


def peaked_and_flat_layers(w, n, needle):
    """Two layers' (q, k, v): in the peaked one the last query matches the keys of the
    needle's chunk; the flat one's attention is nearly uniform and its own pooled
    attention ranks another chunk first."""
    q, k, v = layer_attending_to([needle], 8, w, n, seed=30)
    flat_q, flat_k, flat_v = random_qkv(n, seed=31)
    flat_q *= 0.01
    own_mass = reference.pooled_mass(flat_q[:, n - 1], flat_k, (n - 1) // w, w, SCALE, BASE)
    assert 1 + np.argmax(own_mass) != needle
    peaked = reference.pooled_mass(q[:, n - 1], k, (n - 1) // w, w, SCALE, BASE)
    assert peaked.max() / peaked.sum() > 2 * own_mass.max() / own_mass.sum()
    return (q, k, v), (flat_q, flat_k, flat_v)


def recorded_pooled_slots(monkeypatch):
    """The list every later call of `select_chunks_pooled` appends its slots to."""
    slots, select = [], longheads.select_chunks_pooled

    def recording(*args):
        chosen = select(*args)
        slots.append(np.array(chosen))
        return chosen

    monkeypatch.setattr(longheads, "select_chunks_pooled", recording)
    return slots


def test_two_pass_gives_a_flat_layer_the_chunk_of_a_peaked_one_after_it(monkeypatch):
    """Layer 0 flat, layer 1 peaked: with "two_pass_carry", every head of both layers
    attends to the needle's chunk in the second pass, where in the first layer 0 had
    nothing of what a later layer finds."""
    w, L, n, needle = 8, 32, 96, 5
    peaked, flat = peaked_and_flat_layers(w, n, needle)
    slots = recorded_pooled_slots(monkeypatch)
    run_layers([flat, peaked], LongHeadsConfig(w, L, selection="two_pass_carry"), [1] * n)
    first_pass, second_pass = slots[-4:-2], slots[-2:]  # at the last token
    assert not (first_pass[0][0, :, -1] == needle).any(axis=-1).all()
    for layer_slots in second_pass:
        assert (layer_slots[0, :, -1] == needle).any(axis=-1).all()


@pytest.mark.parametrize("selection", LINKED_SELECTIONS)
def test_a_questions_chunk_is_kept_for_the_tokens_after_it(monkeypatch, selection):
    """A prompt whose last query (a question's last token) attends to the needle's
    chunk, then a decoded token attending nearly uniformly, its pooled attention
    ranking another chunk first: every head keeps the needle's chunk at the decoded
    token too (one layer: the filter layer of the filtering selections)."""
    w, L, n, needle = 8, 32, 96, 5
    q, k, v = layer_attending_to([needle], 8, w, n, seed=30)
    q[:, n - 2] = q[:, n - 1]
    q[:, n - 1] = random_qkv(n, seed=31)[0][:, n - 1] * 0.01
    own = reference.pooled_mass(q[:, n - 1], k, (n - 1) // w, w, SCALE, BASE)
    question = reference.pooled_mass(q[:, n - 2], k, (n - 2) // w, w, SCALE, BASE)
    assert 1 + np.argmax(own) != needle and 1 + np.argmax(question) == needle
    assert question.max() / question.sum() > 2 * own.max() / own.sum()
    slots = recorded_pooled_slots(monkeypatch)
    filter_layer = 0 if selection in FILTERING_SELECTIONS else None
    run_layers([(q, k, v)], LongHeadsConfig(w, L, selection=selection, filter_layer=filter_layer), [n - 1, 1])
    last = slots[-1][0, :, -1]  # the last pass at the last token: [H, k]
    assert (last == needle).any(axis=-1).all()


def counted_measurements(monkeypatch):
    """The list each later measurement of a layer's pooled attention appends the
    cache it reads to."""
    calls, measure = [], longheads.pooled_attention
    monkeypatch.setattr(longheads, "pooled_attention", lambda q, cache, *a: calls.append(cache) or measure(q, cache, *a))
    return calls


def test_one_pass_filter_measures_one_layer_once_per_group(monkeypatch):
    """"one_pass_filter" reads every key of the filter layer alone, once per group past
    F (a prompt's chunk, a decoded token): no other layer's pooled attention, no second pass."""
    w, L, prompt, decoded = 8, 32, 64, 11
    calls = counted_measurements(monkeypatch)
    config = LongHeadsConfig(w, L, selection="one_pass_filter", filter_layer=1)
    layers = [random_qkv(prompt + decoded, seed=40 + layer) for layer in range(3)]
    _, caches = run_layers(layers, config, [prompt] + [1] * decoded)
    assert len(calls) == (prompt - L) // w + decoded
    assert all(cache is caches[1] for cache in calls)


@pytest.mark.parametrize("selection, chunk_passes", [("two_pass_prompt", 2), ("one_pass_prompt", 1)])
def test_prompt_selections_measure_every_layer_per_prompt_chunk_and_the_filter_layer_per_token(
    monkeypatch, selection, chunk_passes
):
    """A prompt's chunk past F: every layer's pooled attention, in the first of its
    passes (two, or one); a decoded token: the filter layer's alone, in its one pass."""
    w, L, prompt, decoded = 8, 32, 64, 11
    calls = counted_measurements(monkeypatch)
    appended, append = [], LongHeadsCache.append
    monkeypatch.setattr(LongHeadsCache, "append", lambda cache, *a: appended.append(cache) or append(cache, *a))
    config = LongHeadsConfig(w, L, selection=selection, filter_layer=1)
    layers = [random_qkv(prompt + decoded, seed=40 + layer) for layer in range(3)]
    _, caches = run_layers(layers, config, [prompt] + [1] * decoded)
    chunks = (prompt - L) // w
    assert [calls[i * 3 : i * 3 + 3] for i in range(chunks)] == [caches] * chunks
    assert calls[3 * chunks :] == [caches[1]] * decoded
    assert appended.count(caches[0]) == 1 + chunks * chunk_passes + decoded  # below F: one call


@settings(max_examples=60, deadline=None)
@given(
    w=st.sampled_from([2, 4, 8]),
    k=st.integers(4, 9),
    extra=st.integers(0, 60),
    per_kv_head=st.booleans(),
    seed=st.integers(0, 1000),
)
def test_selection_invariants(w, k, extra, per_kv_head, seed):
    """First and previous chunk always in, sorted, distinct, nothing from the future."""
    complete = k + extra  # chunks before the query's own one (own >= k)
    rng = np.random.default_rng(seed)
    own = mx.array(rng.integers(k, complete + 1, size=5))
    query_sums = mx.array(rng.normal(size=(1, H, 5, D)).astype(np.float32))
    reps = mx.array(rng.normal(size=(1, H, complete, D)).astype(np.float32))
    slots = np.array(select_chunks(query_sums, reps, own, k, HK if per_kv_head else None))
    assert slots.shape == (1, HK if per_kv_head else H, 5, k)
    for g, own_chunk in enumerate(np.array(own)):
        for s in slots[0, :, g]:
            assert s[0] == 0 and s[-2] == own_chunk - 1 and s[-1] == own_chunk
            assert np.all(np.diff(s) > 0), s
            assert s[1:-2].min() >= 1 and s[1:-2].max() <= own_chunk - 2


class RecordingRoPE(nn.RoPE):
    """The model's RoPE, noting the largest position it is asked to give."""

    largest = -1

    def __call__(self, x, offset=0):
        last = mx.max(mx.array(offset)).item() + x.shape[-2] - 1
        self.largest = max(self.largest, last)
        return super().__call__(x, offset)


@settings(max_examples=25, deadline=None)
@given(
    w=st.sampled_from([2, 4, 8]),
    k=st.integers(4, 6),
    full_extra=st.integers(0, 3),
    n=st.integers(1, 90),
    step=st.integers(1, 40),
    prefill=st.sampled_from(["exact", "grouped"]),
    selection=st.sampled_from(["two_pass_carry", "query_head"]),
)
def test_no_position_reaches_the_full_attention_length(w, k, full_extra, n, step, prefill, selection):
    L, F = w * k, w * (k + full_extra)
    config = LongHeadsConfig(w, L, selection, prefill, full_attention_length=F)
    rope = RecordingRoPE(D, base=BASE)
    steps = [min(step, n - start) for start in range(0, n, step)]
    (out,), (cache,) = run_layers([random_qkv(n, seed=n)], config, steps, rope=rope)
    assert not np.isnan(out).any()
    assert min(n, F) - 1 <= rope.largest < F
    assert cache.complete_chunks == n // w


def quantization_round_trip(k, v, w, bits, group):
    """Pre-RoPE keys and values whose rotated-in-chunk keys and values are exactly what
    a cache quantized to `bits` gives back (rotation undone in float64)."""
    d = k.shape[-1]
    rotated = rotate_in_chunks(mx.array(k[None]), 0, nn.RoPE(d, base=BASE), w)[0]

    def round_trip(x):
        return np.array(mx.dequantize(*mx.quantize(x, group, bits), group, bits), np.float64)

    local = np.arange(k.shape[1]) % w
    return reference.rope(round_trip(rotated), -local, BASE), round_trip(mx.array(v))


@pytest.mark.parametrize("selection", SELECTIONS)
@pytest.mark.parametrize("bits", [8, 4])
@pytest.mark.parametrize("prefill, steps", [("exact", [120]), ("exact", [1] * 120), ("grouped", [20] * 6)])
def test_quantized_kv_is_the_rule_on_dequantized_keys_and_values(bits, prefill, steps, selection):
    """kv_bits changes nothing but the stored keys and values (representations and the
    two-pass selections' pooled attention included), at the shipped shape F > L."""
    w, L, F, d, n = 8, 32, 48, 32, 120
    config = LongHeadsConfig(w, L, selection, prefill, kv_bits=bits, full_attention_length=F,
                             filter_layer=0 if selection in FILTERING_SELECTIONS else None).resolve(None, d)
    assert config.kv_group_size == 32  # the head dim, under 64
    q, k, v = random_qkv(n, seed=11, d=d)
    kq, vq = quantization_round_trip(k, v, w, bits, 32)
    (expected,), gap = expected_outputs([(q, kq, vq)], config, groups_of_calls(steps, w, prefill), d**-0.5)
    assert gap > 1e-4
    out, cache = run(q, k, v, config, steps, scale=d**-0.5)
    assert cache.bits == bits and cache.keys[0].dtype == mx.uint32
    np.testing.assert_allclose(out, expected, atol=2e-5)
