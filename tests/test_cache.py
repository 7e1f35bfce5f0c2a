"""The chunked KV cache: what it stores, how it grows, saving and loading."""

from dataclasses import replace

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.generate import generate_step
from mlx_lm.models.cache import load_prompt_cache, save_prompt_cache, trim_prompt_cache

from conftest import tiny_model
from mlx_longheads.cache import LongHeadsCache
from mlx_longheads.config import LINKED_SELECTIONS, SELECTIONS, LongHeadsConfig
from mlx_longheads.memory import cache_bytes
from mlx_longheads.models import apply_longheads

# The shipped shape, F > L: caches of 150 tokens hold chunks that heads select past F.
CONFIG = LongHeadsConfig(chunk_size=8, attention_length=32, full_attention_length=64)
KV8 = replace(CONFIG, kv_bits=8)


def longheads_model(arch="llama", max_size=None, config=CONFIG, **shape):
    model = tiny_model(arch, **shape)
    return model, apply_longheads(model, config, max_size=max_size)


def quantizable_model(config, max_size=None):
    """Head dim 32, the smallest MLX quantizes; kv_bits then groups by 32."""
    return longheads_model("qwen3", max_size, config, head_dim=32)


def prompt(n, seed=0):
    return mx.array(np.random.default_rng(seed).integers(0, 97, size=n))


def fill(model, n):
    cache = model.make_cache()
    model(prompt(n)[None], cache=cache)
    mx.eval([c.state for c in cache])
    return cache


def test_memory_is_keys_values_representations_and_three_chunks_of_queries():
    """Per layer; layer 0 also notes the default selection's choices (below)."""
    n = 203
    cache = fill(longheads_model(max_size=n)[0], n)[1]
    B, Hk, H, D, w = 1, 2, 4, 16, 8
    capacity = 208  # n rounded up to whole chunks
    kv = 2 * B * Hk * capacity * D * 4
    representations = B * H * (capacity // w) * D * 4
    queries = 3 * B * H * w * D * 4  # the incomplete chunk's and the last 2 complete ones'
    assert cache.nbytes == kv + representations + queries
    assert cache.complete_chunks == 25 and cache.offset == n


def test_buffers_grow_by_steps_not_per_token():
    model, _ = longheads_model()
    cache = model.make_cache()
    capacities = set()
    for token in prompt(300):
        model(token[None, None], cache=cache)
        capacities.add(cache[0].keys.shape[2])
    assert capacities == {2048}
    cache[0].append(*(mx.zeros((1, h, 2000, 16)) for h in (4, 2, 2)))
    assert cache[0].keys.shape[2] == 4096  # grew by at least 2048 tokens at once


@pytest.mark.parametrize("selection", SELECTIONS)
def test_saved_prompt_cache_continues_generation_identically(tmp_path, selection):
    """With the selections that link layers the choices noted in the cache carry over too."""
    model, _ = longheads_model("qwen3", config=replace(CONFIG, selection=selection))
    text = prompt(150)
    cache = model.make_cache()
    # Prefill in steps that end mid-chunk, then save.
    for start in range(0, 150, 37):
        model(text[None, start : start + 37], cache=cache)
    mx.eval([c.state for c in cache])
    path = str(tmp_path / "prompt.safetensors")
    save_prompt_cache(path, cache)
    loaded = load_prompt_cache(path)
    assert all(isinstance(c, LongHeadsCache) for c in loaded)
    assert [c.offset for c in loaded] == [150, 150]

    def continue_from(c):  # the log-probabilities of 40 greedy steps
        return np.array([lp for _, lp in generate_step(prompt(3, seed=9), model, max_tokens=40, prompt_cache=c)])

    # Logits, not tokens: this tiny model's greedy tokens are the same from any cache.
    np.testing.assert_allclose(continue_from(loaded), continue_from(cache), atol=1e-4)


@pytest.mark.parametrize("selection", ["two_pass_carry", "one_pass_filter", "query_head"])
def test_decoding_holds_no_memory_per_token(selection):
    """mlx-lm's generate loop evaluates only the logits. The queries, kept queries and
    representations a step writes must be evaluated with them: an unevaluated write
    holds the one before it, so each token's queries would stay in memory (the 64k soak
    grew by 69 KB a token). Buffers preallocated: active memory is flat from step 100
    to 700, within a tenth of what the queries alone would add."""
    config = LongHeadsConfig(8, 64, selection=selection, full_attention_length=64)
    model, _ = longheads_model("llama", 1024, config, hidden_size=256, num_attention_heads=8)
    per_token = len(model.layers) * 8 * 32 * 4  # one float32 query per head and layer
    used = {}
    for step, _ in zip(range(701), generate_step(prompt(20), model, max_tokens=701)):
        if step in (100, 700):
            used[step] = mx.get_active_memory()
    assert used[700] - used[100] < 600 * per_token / 10


def test_mlx_lm_kv_bits_is_refused_not_ignored():
    """mlx-lm would quantize after quantized_kv_start; LongHeads quantizes by its config."""
    model, _ = longheads_model()
    steps = generate_step(prompt(20), model, max_tokens=5, kv_bits=8, quantized_kv_start=0)
    with pytest.raises(ValueError, match=r"set LongHeadsConfig\(kv_bits=...\) in load\(\)"):
        next(steps)


def test_kv_bits_8_stores_a_quarter_of_float32_plus_scales_and_biases():
    n = 203
    caches = {}
    for config in (CONFIG, KV8):
        model, resolved = quantizable_model(config, max_size=n)
        caches[config.kv_bits] = fill(model, n)
        assert cache_bytes(model, 208, resolved) == sum(c.nbytes for c in caches[config.kv_bits])
    float32, kv8 = caches[None][1], caches[8][1]  # layer 1: no noted choices
    assert kv8.bits == 8 and kv8.group_size == 32 and kv8.capacity == 208
    representations_and_queries = sum(
        a.nbytes for a in (float32.representations, float32.queries, float32.undo_queries)
    )
    float_kv = float32.nbytes - representations_and_queries
    # 8 bits per element, plus a float32 scale and bias (64 bits) per group of 32.
    assert kv8.nbytes - representations_and_queries == float_kv * (8 + 64 / 32) / 32


@pytest.mark.parametrize("selection", LINKED_SELECTIONS)
def test_noted_choices_take_a_row_per_token_in_layer_0_and_are_counted(selection):
    """Past F, layer 0's cache notes each token's choice (a share and the shared
    chunks, float32), and where the selection reads a question again its id (int32);
    the other layers note nothing; the memory check counts it."""
    config = replace(CONFIG, selection=selection)
    model, resolved = longheads_model(max_size=203, config=config)
    cache = fill(model, 203)
    assert cache[0].choices.shape == (1, 208, 1 + resolved.shared_slots)
    assert (cache[0].tokens is not None) == resolved.notes_tokens
    assert all(c.choices is None and c.tokens is None for c in cache[1:])
    assert cache_bytes(model, 208, resolved) == sum(c.nbytes for c in cache)


def test_representations_count_equals_complete_chunks():
    model, _ = longheads_model()
    cache = model.make_cache()
    for size in (5, 3, 8, 17, 1, 30):
        model(prompt(size)[None], cache=cache)
        c = cache[0]
        n = c.complete_chunks
        assert n == c.offset // 8
        reps = np.array(c.representations)
        assert np.all(np.abs(reps[:, :, :n]).sum(axis=-1) > 0)
        assert np.all(reps[:, :, n:] == 0)


def test_a_prompt_cache_from_another_configuration_is_refused_by_name(tmp_path):
    from mlx_longheads.prompt_cache import PromptCacheError, load_prompt_cache, save_prompt_cache

    model, _ = longheads_model()
    cache = fill(model, 40)
    path = str(tmp_path / "doc.safetensors")
    save_prompt_cache(path, cache, model, CONFIG)
    assert load_prompt_cache(path, model, CONFIG)[0].offset == 40
    other = LongHeadsConfig(chunk_size=16, attention_length=64)
    fix = "use the same one, or delete it and run the prompt again to rebuild it"
    with pytest.raises(PromptCacheError, match=f"another attention configuration.*{fix}"):
        load_prompt_cache(path, model, other)
    with pytest.raises(PromptCacheError, match=f"another model.*{fix}"):
        load_prompt_cache(path, longheads_model("qwen3")[0], CONFIG)


def test_a_prompt_cache_of_a_removed_selection_is_refused_by_name(tmp_path):
    """"pooled", "peak", "two_pass" and "two_pass_topk" left the library: a cache one
    of them made is refused with the selections there are and the fix."""
    from mlx_lm.models import cache as mlx_lm_cache

    from mlx_longheads.prompt_cache import PromptCacheError, describe, load_prompt_cache

    model, config = longheads_model()
    path = str(tmp_path / "old.safetensors")
    mlx_lm_cache.save_prompt_cache(path, fill(model, 40), describe(model, replace(config, selection="pooled")))
    with pytest.raises(PromptCacheError) as refused:
        load_prompt_cache(path, model, config)
    message = str(refused.value)
    assert "\n" not in message
    assert "selection 'pooled', which this version no longer has" in message
    assert ", ".join(SELECTIONS) in message
    assert message.endswith("delete it and run the prompt again to rebuild it")


def test_a_quantized_prompt_cache_continues_identically_and_needs_the_same_kv_bits(tmp_path):
    from mlx_longheads.prompt_cache import PromptCacheError, load_prompt_cache, save_prompt_cache

    model, config = quantizable_model(KV8)
    cache = model.make_cache()
    for start in range(0, 150, 37):  # steps ending mid-chunk
        model(prompt(150)[None, start : start + 37], cache=cache)
    path = str(tmp_path / "doc.safetensors")
    save_prompt_cache(path, cache, model, config)
    loaded = load_prompt_cache(path, model, config)
    assert [(c.bits, c.group_size, c.offset) for c in loaded] == [(8, 32, 150)] * 2
    assert all(isinstance(c.keys, tuple) and c.keys[0].dtype == mx.uint32 for c in loaded)

    def continue_from(c):  # the log-probabilities of 40 greedy steps
        return np.array([lp for _, lp in generate_step(prompt(3, seed=9), model, max_tokens=40, prompt_cache=c)])

    # Logits, not tokens: this tiny model's greedy tokens are the same from any cache.
    np.testing.assert_allclose(continue_from(loaded), continue_from(cache), atol=1e-4)
    with pytest.raises(PromptCacheError, match='another attention configuration.*"kv_bits": 8'):
        load_prompt_cache(path, model, quantizable_model(CONFIG)[1])


def test_an_interrupted_prompt_cache_write_leaves_the_old_file(tmp_path, monkeypatch):
    from mlx_lm.models import cache as mlx_lm_cache

    from mlx_longheads.prompt_cache import load_prompt_cache, save_prompt_cache

    model, _ = longheads_model()
    path = tmp_path / "doc.safetensors"
    save_prompt_cache(str(path), fill(model, 40), model, CONFIG)

    def killed(file_name, *args):
        open(file_name, "wb").write(b"half a file")
        raise KeyboardInterrupt

    monkeypatch.setattr(mlx_lm_cache, "save_prompt_cache", killed)
    with pytest.raises(KeyboardInterrupt):
        save_prompt_cache(str(path), fill(model, 80), model, CONFIG)
    assert load_prompt_cache(str(path), model, CONFIG)[0].offset == 40


def log_probabilities(model, cache, tokens) -> np.ndarray:
    logits = model(tokens[None], cache=cache)[0]
    return np.array(logits - mx.logsumexp(logits, axis=-1, keepdims=True))


# (tokens fed first, tokens then trimmed): the cut lands in the incomplete chunk, in the
# last complete chunk, in the one before it, and on a chunk boundary 5 chunks back.
EXACT_CUTS = [(150, 1), (150, 5), (150, 12), (144, 40)]


@pytest.mark.parametrize(
    "selection, kv_bits", [*[(s, None) for s in SELECTIONS], ("two_pass_carry", 8), ("query_head", 8)]
)
@pytest.mark.parametrize("kept, trimmed", EXACT_CUTS)
def test_trimmed_tokens_are_undone_exactly(kept, trimmed, selection, kv_bits):
    """Feed A then B, trim B, feed C: the same log-probabilities for C as feeding A then
    C (grouped prefill selects per call, so the reference makes the same calls; with
    "two_pass_carry" B's noted choices are not carried into C), with float keys and
    values or 8-bit ones."""
    if selection == "one_pass_reread" and trimmed == 1:
        pytest.skip("a single token after a prompt reads its question again, which a cut does not undo")
    config = replace(CONFIG, selection=selection, kv_bits=kv_bits)
    model, _ = longheads_model(config=config) if kv_bits is None else quantizable_model(config)
    a, b, c = prompt(kept), prompt(trimmed, seed=1), prompt(20, seed=2)
    cache = model.make_cache()
    model(a[None], cache=cache)
    model(b[None], cache=cache)
    assert cache[0].is_trimmable() and trim_prompt_cache(cache, trimmed) == trimmed
    assert cache[0].offset == kept
    reference = model.make_cache()
    model(a[None], cache=reference)
    np.testing.assert_allclose(
        log_probabilities(model, cache, c), log_probabilities(model, reference, c), atol=1e-4
    )
    for layer, expected in zip(cache, reference):  # the cut chunk's representation too
        n = expected.complete_chunks
        np.testing.assert_allclose(
            layer.representations[:, :, :n], expected.representations[:, :, :n], atol=1e-5
        )


def test_a_cut_in_an_older_chunk_goes_back_to_its_start_and_says_so():
    """Chunk 18's raw queries are gone once chunks 19-21 complete: a cut at 150 (chunk 18,
    token 6) cuts back to 144, and feeding tokens 144.. again gives what a call from 144
    would have (chunk boundaries are clean: a group never spans two chunks)."""
    model, _ = longheads_model()
    a, b, c = prompt(150), prompt(30, seed=1), prompt(20, seed=2)
    cache = model.make_cache()
    model(a[None], cache=cache)
    model(b[None], cache=cache)
    assert trim_prompt_cache(cache, 30) == 36 and cache[0].offset == 144
    again = mx.concatenate([a[144:], c])
    reference = model.make_cache()
    model(a[None, :144], cache=reference)
    np.testing.assert_allclose(
        log_probabilities(model, cache, again), log_probabilities(model, reference, again), atol=1e-4
    )


def test_trimming_keeps_the_saved_state_consistent(tmp_path):
    from mlx_longheads.prompt_cache import inconsistency, load_prompt_cache, save_prompt_cache

    model, _ = longheads_model()
    cache = fill(model, 150)
    for n, left in ((3, 147), (10, 137), (50, 80), (200, 0)):
        trim_prompt_cache(cache, n)
        assert cache[0].offset == left and inconsistency(cache, model) is None
        reps = np.array(cache[0].representations)
        assert np.all(reps[:, :, left // 8 :] == 0)  # none past the complete chunks
        if left:
            path = str(tmp_path / f"{left}.safetensors")
            save_prompt_cache(path, cache, model, CONFIG)
            assert load_prompt_cache(path, model, CONFIG)[0].offset == left
