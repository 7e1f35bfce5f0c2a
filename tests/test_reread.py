""""one_pass_reread": a prompt read as "one_pass_prompt" reads it, and at its last token past F
the question (the tokens from the chunk before the last token's on) read again, every layer
following the choice the last token made."""

import mlx.core as mx
import numpy as np
import pytest

from conftest import clone, tiny_model
from mlx_longheads import longheads
from mlx_longheads.config import LongHeadsConfig
from mlx_longheads.models import apply_longheads
from mlx_longheads.prompt_cache import load_prompt_cache, save_prompt_cache

W, F = 8, 64  # chunks of 8, stock attention up to 64 tokens (L = 32 < F: the shipped shape)


def model_with(selection: str, stock=None):
    model = clone(stock if stock is not None else tiny_model("llama"))
    apply_longheads(model, LongHeadsConfig(W, 32, selection=selection, full_attention_length=F, filter_layer=1))
    return model


def tokens(n: int, seed: int = 1) -> mx.array:
    return mx.array(np.random.default_rng(seed).integers(0, 97, size=(1, n)))


def prompt_then_token(model, x: mx.array, decoded: int = 0):
    """The prompt but its last token in one call, the last token alone (as mlx-lm's generate
    feeds them), then `decoded` tokens one per call: the last logits of each call, and the cache."""
    cache = model.make_cache()
    model(x[:, :-1], cache=cache)
    logits = [model(x[:, -1:], cache=cache)]
    logits += [model(mx.array([[5 + i]]), cache=cache) for i in range(decoded)]
    return [np.array(a[0, -1]) for a in logits], cache


def layer_keys(cache) -> list:
    return [np.array(c.keys[0, :, : c.offset]) for c in cache]


def last_token_with_peaks(model, x, first_background: float, cache=None):
    """The prompt but its last token read (unless `cache` holds it), then the last token with
    its filter layer's pooled attention made to peak on chunk 3 at its first pass (the other
    chunks at `first_background`) and on chunk 10 at every measurement after it, sharply
    (0.001): the last token's logits, the windows every layer chose in that call, the peaks
    measured, the choices noted before the call, and the cache."""
    if cache is None:
        cache = model.make_cache()
        model(x[:, :-1], cache=cache)
    noted = np.array(cache[0].choices[0, : cache[0].offset])
    windows, select, measure, peaks = [], longheads.select_chunks_pooled, longheads.pooled_attention, []

    def recording(query_sums, representations, pooled, own, k, shared):
        slots = select(query_sums, representations, pooled, own, k, shared)
        windows.append(np.array(slots))
        return slots

    def peaked(queries, cache, own, rope, scale):
        pooled = measure(queries, cache, own, rope, scale)
        peaks.append(3 if not peaks else 10)
        background = first_background if peaks[-1] == 3 else 0.001
        return mx.where(mx.arange(pooled.shape[-1]) == peaks[-1], 1.0, background) + 0 * pooled

    with pytest.MonkeyPatch.context() as patch:
        patch.setattr(longheads, "select_chunks_pooled", recording)
        patch.setattr(longheads, "pooled_attention", peaked)
        logits = np.array(model(x[:, -1:], cache=cache)[0, -1])
    return logits, windows, peaks, noted, cache


@pytest.mark.parametrize("n", [130, 136])  # the last token inside a chunk, and its chunk's first
def test_the_question_is_read_again_and_nothing_before_it(n):
    """Where the last token chooses anew (its filter layer's measure made sharply peaked,
    `last_token_with_peaks`): keys before the chunk preceding the last token's are the
    default's; from there on every layer's keys were made again, and the last token's logits
    differ (not a test of quality)."""
    stock, x = tiny_model("llama"), tokens(n)
    default, *_, default_cache = last_token_with_peaks(model_with("one_pass_prompt", stock), x, 0.01)
    reread, *_, reread_cache = last_token_with_peaks(model_with("one_pass_reread", stock), x, 0.01)
    start = ((n - 1) // W - 1) * W
    assert reread_cache[0].offset == n
    for ours, theirs in zip(layer_keys(reread_cache), layer_keys(default_cache)):
        np.testing.assert_array_equal(ours[:, :start], theirs[:, :start])
    assert np.abs(layer_keys(reread_cache)[1][:, start:] - layer_keys(default_cache)[1][:, start:]).max() > 1e-3
    assert np.abs(reread - default).max() > 1e-3


def test_every_layer_of_the_reread_follows_the_last_tokens_choice():
    """The last token's first pass measures chunk 3, sharply (a share of 1 / (1 + 15 * 0.01)):
    a choice of its own, more peaked than those the prompt's last groups noted. Chunk 3 is then
    in every head's window of every layer while the question is read again, and noted as its
    groups' choice with that share; the last pass follows its own, sharper peak."""
    _, windows, peaks, _, cache = last_token_with_peaks(model_with("one_pass_reread"), tokens(130), 0.01)
    assert peaks == [3, 10]  # the filter layer at the last token's two passes, none in the re-read
    reread = windows[2:-2]  # after the last token's first pass (2 layers), before its last
    assert len(reread) == 2 * 2  # two groups (chunk 15, and chunk 16's first token) of 2 layers
    assert all((slots == 3).any(axis=-1).all() for slots in reread)
    assert not (windows[-1] == 3).any(axis=-1).all()
    for row in (127, 128):  # the groups' newest tokens
        share, chunk = np.array(cache[0].choices[0, row]).tolist()
        assert chunk == 3 and share == pytest.approx(1 / (1 + 15 * 0.01))


def test_where_the_last_token_keeps_the_questions_choice_nothing_is_read_again():
    """The last token's first pass measures chunk 3 barely peaked (1 / (1 + 15 * 0.99)): it
    keeps the more peaked choice the prompt's last groups noted, which the question's tokens
    followed when they were read. Nothing is read again: one pass, and the default's logits."""
    stock, x = tiny_model("llama"), tokens(130)
    runs = {s: last_token_with_peaks(model_with(s, stock), x, 0.99) for s in ("one_pass_prompt", "one_pass_reread")}
    logits, windows, peaks, noted, cache = runs["one_pass_reread"]
    assert noted[121:129, 0].max() > 1 / (1 + 15 * 0.99)  # a more peaked choice noted in the w tokens before
    assert peaks == [3] and len(windows) == 2  # the last token's one pass
    np.testing.assert_allclose(logits, runs["one_pass_prompt"][0], atol=1e-5)
    for ours, theirs in zip(layer_keys(cache), layer_keys(runs["one_pass_prompt"][4])):
        np.testing.assert_array_equal(ours, theirs)


@pytest.mark.parametrize("n", [40, 65])  # a prompt inside F, and one whose last token is F's first past
def test_where_there_is_no_question_past_f_it_is_the_default(n):
    """Nothing to read again (the question's chunks inside F), and decoded tokens after a
    prompt: the logits of "one_pass_prompt"."""
    stock, x = tiny_model("llama"), tokens(n)
    default, _ = prompt_then_token(model_with("one_pass_prompt", stock), x, decoded=3)
    reread, _ = prompt_then_token(model_with("one_pass_reread", stock), x, decoded=3)
    np.testing.assert_allclose(np.stack(reread), np.stack(default), atol=1e-5)


def test_decoded_tokens_are_not_read_again():
    """After the re-read at the prompt's end, each decoded token is one call of one pass:
    the cache grows by one token per token and the question's keys stay as they are."""
    model, x = model_with("one_pass_reread"), tokens(130)
    _, cache = prompt_then_token(model, x)
    after_prompt = layer_keys(cache)
    for i in range(3):
        model(mx.array([[7 + i]]), cache=cache)
        assert cache[0].offset == 131 + i
    for before, now in zip(after_prompt, layer_keys(cache)):
        np.testing.assert_array_equal(now[:, :130], before)


def test_a_saved_prompt_reads_its_question_again_after_loading(tmp_path):
    """The token ids and the prompt's end travel with a saved cache: the last token fed after
    loading reads the question again (its choice made sharply, `last_token_with_peaks`) and
    gives the logits of feeding it at once."""
    model, x = model_with("one_pass_reread"), tokens(130)
    direct, _, peaks, _, _ = last_token_with_peaks(model, x, 0.01)
    assert peaks == [3, 10]  # read again
    cache = model.make_cache()
    model(x[:, :-1], cache=cache)
    config = model.layers[0].self_attn.config
    path = str(tmp_path / "prompt.safetensors")
    save_prompt_cache(path, cache, model, config)
    loaded = load_prompt_cache(path, model, config)
    assert loaded[0].prompt_end == 129
    np.testing.assert_array_equal(np.array(loaded[0].tokens[:, :129]), np.array(x[:, :-1]))
    again, _, peaks, _, _ = last_token_with_peaks(model, x, 0.01, cache=loaded)
    assert peaks == [3, 10]
    np.testing.assert_allclose(again, direct, atol=1e-5)


def test_a_cut_before_the_prompts_end_forgets_it():
    """Trimmed back into the prompt (a prompt cache reused for another turn) and then given a
    single token, there is no question to read again: the default's logits."""
    stock, x = tiny_model("llama"), tokens(130)
    runs = []
    for selection in ("one_pass_prompt", "one_pass_reread"):
        model = model_with(selection, stock)
        cache = model.make_cache()
        model(x[:, :-1], cache=cache)
        assert [c.trim(1) for c in cache] == [1, 1]
        runs.append(np.array(model(x[:, -2:-1], cache=cache)[0, -1]))
    np.testing.assert_allclose(runs[1], runs[0], atol=1e-5)
