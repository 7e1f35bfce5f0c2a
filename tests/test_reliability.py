"""Reliability: what holds at any length, how bad input is refused, and
saved state that never loads wrong.

The property tests run the tiny float32 models of conftest through mlx-lm's
generate_step with chunk sizes, attention lengths, prompt lengths and generation
lengths that hypothesis picks, and check every layer's cache as it goes.
"""

import json
import re
import shutil
import subprocess
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, List, Optional

import mlx.core as mx
import numpy as np
import pytest
from gguf import GGUFReader
from hypothesis import given, settings, strategies as st
from mlx_lm.generate import generate_step
from mlx_lm.models import cache as mlx_lm_cache

from conftest import ARCHITECTURES, TINY, assert_one_line_error, run_module, tiny_model
from gguf_files import byte_level_vocab, write_gguf
from hf_files import VOCAB, write_hf_folder
from leftovers import no_folder_left
from mlx_longheads import prompt_cache
from mlx_longheads.cache import MIN_GROWTH, UNDO_CHUNKS, LongHeadsCache
from mlx_longheads.config import FILTERING_SELECTIONS, SELECTIONS, LongHeadsConfig
from mlx_longheads.generation import LimitError, generate
from mlx_longheads.gguf import convert_gguf
from mlx_longheads.models import apply_longheads
from mlx_longheads.prompt_cache import PromptCacheError, load_prompt_cache, save_prompt_cache
from mlx_longheads.support import ModelError

HEAD_DIM = TINY["hidden_size"] // TINY["num_attention_heads"]  # 16, qwen3's head_dim too
FLOAT32 = 4
REBUILD = "delete it and run the prompt again to rebuild it"
CONFIG = LongHeadsConfig(chunk_size=8, attention_length=32)


def filter_layer(selection: str):
    """The filter layer a filtering selection is given here: the tiny models' second (of
    two), so one layer takes the carried choice; F of a few chunks leaves too few to calibrate."""
    return 1 if selection in FILTERING_SELECTIONS else None


def random_tokens(n: int, seed: int = 0, rows: int = 1) -> mx.array:
    return mx.array(np.random.default_rng(seed).integers(0, TINY["vocab_size"], (rows, n)))


def round_up(n: int, w: int) -> int:
    return -(-n // w) * w


# --- the cache after every step ---


class GrowthWatch(LongHeadsCache):
    """A LongHeadsCache that checks, at every append, that it grew by one step at most."""

    def append(self, queries: mx.array, keys: mx.array, values: mx.array):
        before = 0 if self.keys is None else self.keys.shape[2]
        completed = super().append(queries, keys, values)
        assert_one_growth_step(before, self.keys.shape[2], self.offset, self)
        return completed


def assert_one_growth_step(before: int, after: int, tokens: int, cache: LongHeadsCache) -> None:
    """Buffers are reallocated only when the tokens no longer fit, and then to max_size
    (when they fit in it) or by max(MIN_GROWTH, capacity // 8) tokens, or to exactly the
    tokens needed if that is more: appending is amortised O(1) and spare room bounded."""
    assert after % cache.chunk_size == 0 and after >= tokens
    if after == before:
        return
    assert before < tokens, f"reallocated from {before} with room for {tokens} tokens"
    if cache.max_size is not None and tokens <= cache.max_size:
        step = cache.max_size
    else:
        step = max(tokens, before + max(MIN_GROWTH, before // 8))
    assert after == round_up(step, cache.chunk_size), (before, after, tokens)


def assert_cache_holds(cache: List[LongHeadsCache], tokens: int) -> None:
    """What every layer holds after `tokens` tokens, whatever calls brought them."""
    H, Hk = TINY["num_attention_heads"], TINY["num_key_value_heads"]
    for layer in cache:
        w = layer.chunk_size
        complete = tokens // w
        assert layer.offset == tokens
        assert layer.complete_chunks == complete
        if tokens == 0:
            assert layer.nbytes == 0
            continue
        capacity = layer.keys.shape[2]
        # Linear in the capacity: keys and values per token, a representation per
        # chunk, the queries of the incomplete chunk and of the last (at most
        # UNDO_CHUNKS) complete ones, and a noted choice per token where the two-pass
        # selections noted one, and its id where the selection reads a question again (layer 0).
        noted = sum(0 if a is None else a.nbytes for a in (layer.choices, layer.tokens))
        assert all(a is None or a.shape[1] == capacity for a in (layer.choices, layer.tokens))
        assert layer.nbytes - noted == FLOAT32 * HEAD_DIM * (
            capacity * 2 * Hk + capacity // w * H + (1 + min(UNDO_CHUNKS, complete)) * w * H
        )
        for buffer in (layer.keys, layer.values):
            assert np.isfinite(np.array(buffer[:, :, :tokens])).all()
        assert np.isfinite(np.array(layer.queries)).all()
        reps = np.array(layer.representations)
        assert reps.shape[2] == capacity // w
        assert np.isfinite(reps[:, :, :complete]).all()
        assert (np.linalg.norm(reps[:, :, :complete], axis=-1) > 0).all()
        assert (reps[:, :, complete:] == 0).all()


@dataclass(frozen=True)
class Run:
    """A prompt of `prompt` tokens prefilled in calls of `step`, then `generated` tokens."""

    arch: str
    w: int
    chunks: int  # k: the attention length is k * w
    prompt: int
    generated: int
    step: int
    max_size: Optional[int] = None
    prefill: str = "grouped"
    selection: str = "query_head"


def generate_checking(run: Run) -> None:
    """Generate through mlx-lm's generate_step, checking the cache after each model call."""
    model = tiny_model(run.arch)
    L = run.w * run.chunks  # the paper's threshold F = L, so short runs select too
    config = LongHeadsConfig(run.w, L, run.selection, run.prefill, full_attention_length=L, filter_layer=filter_layer(run.selection))
    apply_longheads(model, config, max_size=run.max_size)
    cache = [GrowthWatch(c.chunk_size, c.max_size) for c in model.make_cache()]

    def prefill_progress(done: int, total: int) -> None:
        if done < total:  # the last report comes after the first generated token
            assert_cache_holds(cache, done)

    steps = generate_step(
        random_tokens(run.prompt, seed=run.prompt)[0],
        model,
        max_tokens=run.generated,
        prefill_step_size=run.step,
        prompt_cache=cache,
        prompt_progress_callback=prefill_progress,
    )
    generated = 0
    for _, logprobs in steps:
        assert np.isfinite(np.array(logprobs)).all()
        generated += 1
        # generate_step feeds each token before yielding it
        assert_cache_holds(cache, run.prompt + generated)
    assert generated == run.generated


@st.composite
def runs(draw) -> Run:
    """Prompts on, one before and one after chunk boundaries, or anywhere up to 2L;
    generation that crosses the attention length when the prompt stops short of it."""
    w, chunks = draw(st.sampled_from([2, 4, 8])), draw(st.integers(4, 6))
    L = w * chunks
    near_boundary = st.builds(
        lambda m, d: m * w + d, st.integers(1, 2 * chunks), st.sampled_from([-1, 0, 1])
    )
    prompt = draw(st.one_of(near_boundary, st.integers(1, 2 * L)))
    crossing = max(0, L - prompt)
    return Run(
        arch=draw(st.sampled_from(list(ARCHITECTURES))),
        w=w,
        chunks=chunks,
        prompt=prompt,
        generated=draw(st.integers(crossing + 1, crossing + 2 * w)),
        step=draw(st.integers(1, L)),
        max_size=draw(st.one_of(st.none(), st.integers(1, 3 * L))),
        prefill=draw(st.sampled_from(["grouped", "exact"])),
        selection=draw(st.sampled_from(SELECTIONS)),
    )


@settings(max_examples=20, deadline=None)
@given(run=runs())
def test_any_lengths_keep_the_cache_consistent_finite_and_linear(run):
    """Offset = tokens fed; one representation per complete chunk (finite, nonzero) and
    zeros after; finite logits, keys and values; nbytes linear in a capacity that grows
    by one step at most."""
    generate_checking(run)


@settings(max_examples=15, deadline=None)
@given(
    w=st.sampled_from([2, 4, 8]),
    steps=st.lists(st.tuples(st.integers(1, 40), st.integers(0, 60)), min_size=1, max_size=4),
)
def test_any_feeds_and_trims_keep_the_cache_consistent(w, steps):
    """Feeding tokens then trimming some, again and again: a trim forgets what it was
    asked (all, at most) or up to w - 1 more, and says how many; the cache stays
    consistent (no representation past the complete chunks) and its logits finite."""
    model = tiny_model("llama")
    apply_longheads(model, LongHeadsConfig(w, 4 * w, full_attention_length=4 * w))
    cache = model.make_cache()
    for seed, (fed, cut) in enumerate(steps):
        assert np.isfinite(np.array(model(random_tokens(fed, seed), cache=cache))).all()
        before = cache[0].offset
        trimmed = mlx_lm_cache.trim_prompt_cache(cache, cut)
        asked = min(cut, before)
        assert asked <= trimmed < asked + w and trimmed <= before
        assert {c.offset for c in cache} == {before - trimmed}
        assert prompt_cache.inconsistency(cache, model) is None
        for layer in cache:
            reps = np.array(layer.representations)
            assert (reps[:, :, layer.complete_chunks :] == 0).all()


@pytest.mark.parametrize("prompt", [9, 15, 16, 17, 24], ids=lambda n: f"prompt{n}")
def test_prompts_of_w_plus_1_to_L_minus_w_tokens_generate_past_L(arch, prompt):
    """The reference crashed here: its representations were not kept up to date for
    prompts of w+1 .. L-w tokens, and generation then crossed the attention length."""
    generate_checking(Run(arch, w=8, chunks=4, prompt=prompt, generated=48 - prompt, step=5))


@pytest.mark.parametrize("max_size", [None, 40, 100])
def test_crossing_the_threshold_with_prompts_around_L(max_size):
    """Prompts one before, on and one after L; a preallocation that runs out during
    generation, one that is enough, or none."""
    for prompt in (31, 32, 33):
        generate_checking(Run("qwen3", 8, 4, prompt, generated=20, step=7, max_size=max_size))


@settings(max_examples=30, deadline=None)
@given(
    w=st.sampled_from([1, 8, 256]),
    max_size=st.one_of(st.none(), st.integers(1, 5000)),
    sizes=st.lists(st.integers(1, 3000), min_size=1, max_size=8),
)
def test_buffers_grow_by_one_step_and_preallocation_keeps_nbytes_constant(w, max_size, sizes):
    """Appending any sizes: reallocation only when full, by one step (GrowthWatch);
    while the tokens fit in max_size, nbytes changes only by the queries kept of the
    first UNDO_CHUNKS complete chunks."""
    cache = GrowthWatch(w, max_size)
    first_nbytes = None
    for size in sizes:
        fresh = [mx.zeros((1, heads, size, 1)) for heads in (2, 1, 1)]
        completed = cache.append(*fresh)
        if completed is not None:
            cache.add_representations(mx.zeros((1, 2, completed[0].shape[2] // w, 1)))
        kept = cache.undo_chunks * w * 2 * FLOAT32  # 2 heads, head dim 1
        first_nbytes = first_nbytes or cache.nbytes - kept
        if max_size is not None and cache.offset <= max_size:
            assert cache.nbytes - kept == first_nbytes


@settings(max_examples=10, deadline=None)
@given(
    arch=st.sampled_from(list(ARCHITECTURES)),
    w=st.sampled_from([4, 8]),
    chunks=st.integers(4, 5),
    # Not "one_pass_reread": a call of one token after one of several is a prompt's end to it.
    selection=st.sampled_from([s for s in SELECTIONS if s != "one_pass_reread"]),
    cuts=st.lists(st.integers(1, 30), min_size=2, max_size=5),
)
def test_exact_prefill_split_anyhow_then_generation_past_L_equals_token_by_token(
    arch, w, chunks, selection, cuts
):
    """Exact mode selects per token, so how the prompt is cut into calls cannot matter:
    every logit of the prompt and of the greedy generation after it (past L) equals
    feeding one token per call."""
    L = w * chunks
    model = tiny_model(arch)
    apply_longheads(model, LongHeadsConfig(w, L, selection, prefill="exact", full_attention_length=L, filter_layer=filter_layer(selection)))
    prompt = random_tokens(sum(cuts), seed=len(cuts))
    cache = model.make_cache()
    starts = np.cumsum([0] + cuts)
    logits = [model(prompt[:, a:b], cache=cache) for a, b in zip(starts, starts[1:])]
    fed = [prompt]
    for _ in range(max(0, L - sum(cuts)) + w):
        fed.append(logits[-1][:, -1:].argmax(axis=-1))
        logits.append(model(fed[-1], cache=cache))
    sequence = mx.concatenate(fed, axis=1)
    cache = model.make_cache()
    one_by_one = [model(sequence[:, i : i + 1], cache=cache) for i in range(sequence.shape[1])]
    np.testing.assert_allclose(
        np.array(mx.concatenate(logits, axis=1)),
        np.array(mx.concatenate(one_by_one, axis=1)),
        atol=1e-4,
    )


# --- batches ---


@pytest.mark.parametrize(
    "arch, selection, kv_bits",
    [
        *[("llama", s, None) for s in SELECTIONS],
        ("qwen3", "two_pass_carry", None),
        ("qwen3", "two_pass_carry", 8),
        ("qwen3", "query_head", 8),
    ],
)
@pytest.mark.parametrize("prefill", ["grouped", "exact"])
def test_a_batch_of_two_prompts_gives_each_row_the_logits_it_gets_alone(arch, prefill, selection, kv_bits):
    """Batches work (selection is per row): two different prompts past F (48 > L = 32),
    prefilled in two calls and then decoded, give each row the logits of its prompt run
    alone, with float or 8-bit keys and values (qwen3 at head dim 32, which quantizes)."""
    model = tiny_model(arch, **({} if arch == "llama" else {"head_dim": 32}))
    config = LongHeadsConfig(8, 32, selection, prefill=prefill, full_attention_length=48, kv_bits=kv_bits,
                             filter_layer=filter_layer(selection))
    apply_longheads(model, config)
    tokens = random_tokens(75, seed=1, rows=2)
    calls = [(0, 30), (30, 70)] + [(t, t + 1) for t in range(70, 75)]

    def run(x: mx.array) -> np.ndarray:
        cache = model.make_cache()
        return np.array(mx.concatenate([model(x[:, a:b], cache=cache) for a, b in calls], axis=1))

    # 8-bit K/V: a key's float rounding differs in a batch (BLAS) by ~1e-6, which can move
    # an element across a quantization step; one step changes a logit by ~1e-3 here,
    # another row's keys by far more than 1e-2.
    tolerance = 1e-4 if kv_bits is None else 1e-2
    both = run(tokens)
    for row in range(2):
        np.testing.assert_allclose(both[row], run(tokens[row : row + 1])[0], atol=tolerance)


# --- bad input: each refused with the rule and the fix ---


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """Tiny models on disk: a llama (quick to load), one with dynamic NTK rope, and a
    gpt2 config (LongHeads patches llama, mistral, qwen2 and qwen3 only)."""
    root = tmp_path_factory.mktemp("models")
    llama = write_hf_folder(root / "llama", tiny_model("llama", vocab_size=VOCAB), "llama")
    dynamic_rope = tiny_model("llama", vocab_size=VOCAB, rope_scaling={"type": "dynamic", "factor": 2.0})
    dynamic = write_hf_folder(root / "dynamic", dynamic_rope, "llama")
    (root / "gpt2").mkdir()
    (root / "gpt2" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    return {"llama": llama, "dynamic": dynamic, "gpt2": root / "gpt2"}


def generate_cli(*args) -> subprocess.CompletedProcess:
    return run_module("mlx_longheads.generate", *map(str, args))


@pytest.mark.parametrize(
    "flags, rule, fix",
    [
        (
            ["--chunk-size", 100, "--attention-length", 4096],
            "attention_length 4096 must be a multiple of chunk_size 100",
            "choose a chunk_size that divides it",
        ),
        (
            ["--chunk-size", 2048, "--attention-length", 4096],
            "holds 2 chunks of 2048; at least 4 are needed",
            "lower chunk_size or raise attention_length",
        ),
        (
            ["--attention-length", 16384],
            "attention_length 16384 exceeds the model's trained length 8192",
            "use at most 8192",
        ),
    ],
    ids=["chunk-not-dividing", "fewer-than-4-chunks", "past-trained-length"],
)
def test_the_cli_refuses_a_configuration_that_breaks_a_rule(flags, rule, fix):
    """On the embedded SmolLM2 (trained to 8192): exit 1, the ConfigError on one line."""
    assert_one_line_error(generate_cli(*flags, "--prompt", "hi"), rule, fix)


def test_the_cli_refuses_an_unsupported_architecture(folders):
    assert_one_line_error(
        generate_cli("--model", folders["gpt2"], "--prompt", "hi"),
        "architecture 'gpt2' is not supported",
        "use a llama, mistral, qwen2, qwen3 model",
    )


def test_the_cli_refuses_dynamic_ntk_rope(folders):
    """Dynamic NTK rescales positions with the sequence length: LongHeads cannot honour it."""
    assert_one_line_error(
        generate_cli("--model", folders["dynamic"], "--prompt", "hi"),
        "rope scaling 'dynamic' is not supported",
        "use one of default, linear, llama3, yarn",
    )


def test_the_cli_refuses_an_empty_prompt():
    assert_one_line_error(
        generate_cli("--prompt", ""), "the prompt is empty", "pass --prompt, --prompt-file or --prompt -"
    )


class BosTokenizer:
    """A tokenizer that, like Llama's, encodes every text (even "") with a BOS token."""

    def encode(self, text: str) -> List[int]:
        return [1] + [ord(c) % TINY["vocab_size"] for c in text]


def test_the_api_refuses_an_empty_prompt_before_tokenizing():
    """Refused as text, not after the tokenizer has made it [BOS]; and as no tokens."""
    model = tiny_model("llama")
    apply_longheads(model, CONFIG)
    for empty in ("", []):
        with pytest.raises(LimitError, match="the prompt is empty: give some text"):
            generate(model, BosTokenizer(), empty)


def test_the_cli_refuses_a_prompt_file_that_is_not_utf8(tmp_path):
    latin1 = tmp_path / "latin1.txt"
    latin1.write_bytes("Café crème, à la carte.".encode("latin-1"))
    assert_one_line_error(
        generate_cli("--prompt-file", latin1, "--prompt", "Summarise."),
        f"{latin1} is not UTF-8 text",
        "iconv -t UTF-8",
    )


# --- saved state: prompt caches ---


@pytest.fixture
def saved(tmp_path):
    """A tiny model and the prompt cache of 40 of its tokens, saved at tmp_path."""
    model = tiny_model("llama")
    apply_longheads(model, CONFIG)
    cache = model.make_cache()
    model(random_tokens(40), cache=cache)
    path = tmp_path / "doc.safetensors"
    save_prompt_cache(str(path), cache, model, CONFIG)
    return model, cache, path


def test_a_prompt_cache_of_another_format_version_is_refused(saved, monkeypatch):
    model, cache, path = saved
    monkeypatch.setattr(prompt_cache, "FORMAT_VERSION", "0")
    save_prompt_cache(str(path), cache, model, CONFIG)
    monkeypatch.undo()
    with pytest.raises(PromptCacheError) as refused:
        load_prompt_cache(str(path), model, CONFIG)
    message = str(refused.value)
    assert "written in format version 0" in message and f"reads prompt-cache format {prompt_cache.FORMAT_VERSION}" in message
    assert REBUILD in message


def test_a_prompt_cache_written_by_plain_mlx_lm_is_refused(saved):
    model, cache, path = saved
    mlx_lm_cache.save_prompt_cache(str(path), cache)
    with pytest.raises(PromptCacheError, match=f"written not by mlx-longheads.*{REBUILD}"):
        load_prompt_cache(str(path), model, CONFIG)


@pytest.mark.parametrize("keep", [0.0, 0.002, 0.03, 0.5, 0.999])
def test_a_truncated_prompt_cache_is_refused_by_name(saved, keep):
    model, _, path = saved
    data = path.read_bytes()
    path.write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(PromptCacheError, match=f"is not a readable prompt cache.*{REBUILD}"):
        load_prompt_cache(str(path), model, CONFIG)


@pytest.mark.parametrize("where", [0, 3, 8, 40, 200])
def test_a_prompt_cache_with_flipped_header_bytes_is_refused_by_name(saved, where):
    model, _, path = saved
    data = bytearray(path.read_bytes())
    data[where] ^= 0xFF
    path.write_bytes(bytes(data))
    with pytest.raises(PromptCacheError, match=REBUILD):
        load_prompt_cache(str(path), model, CONFIG)


def drop_last_layer(cache: List[LongHeadsCache]) -> None:
    cache.pop()


@pytest.mark.parametrize(
    "corrupt, problem",
    [
        (lambda cache: [setattr(c, "offset", 10**6) for c in cache], "stored tokens for 1000000"),
        (lambda cache: setattr(cache[1], "offset", 39), "different token counts [39, 40]"),
        (drop_last_layer, "1 layers, the model has 2"),
    ],
    ids=["offset-past-the-keys", "layers-disagree", "layer-missing"],
)
def test_a_well_formed_file_with_inconsistent_arrays_is_refused(
    saved, corrupt: Callable[[List[LongHeadsCache]], None], problem: str
):
    """The metadata can match while the arrays (offsets included) do not: the cache
    would attend to garbage or fail deep inside a layer."""
    model, cache, path = saved
    corrupt(cache)
    save_prompt_cache(str(path), cache, model, CONFIG)
    with pytest.raises(PromptCacheError) as refused:
        load_prompt_cache(str(path), model, CONFIG)
    assert "is corrupt" in str(refused.value) and problem in str(refused.value)
    assert REBUILD in str(refused.value)


@pytest.fixture(scope="module")
def cli_cache(folders, tmp_path_factory) -> Path:
    """A prompt cache the generate CLI wrote for the tiny llama at attention length 64."""
    path = tmp_path_factory.mktemp("caches") / "doc.safetensors"
    result = generate_cli(*tiny_llama(folders, 64), "--max-tokens", 2, "--prompt-cache-file", path)
    assert result.returncode == 0, result.stderr
    return path


def tiny_llama(folders, attention_length: int) -> List[str]:
    """The generate CLI's flags for the tiny llama, chunks of 8, and a prompt."""
    return [
        "--model", folders["llama"], "--chunk-size", "8",
        "--attention-length", str(attention_length), "--prompt", "Hello there",
    ]


def test_the_cli_refuses_a_prompt_cache_made_with_another_attention_length(
    folders, cli_cache, tmp_path
):
    copy = shutil.copy(cli_cache, tmp_path / "doc.safetensors")
    result = generate_cli(*tiny_llama(folders, 128), "--prompt-cache-file", copy)
    assert_one_line_error(
        result,
        "was made with another attention configuration",
        '"attention_length": 64',
        '"attention_length": 128',
        REBUILD,
    )
    assert Path(copy).read_bytes() == cli_cache.read_bytes()  # refused, not overwritten


def test_the_cli_refuses_a_truncated_prompt_cache(folders, cli_cache, tmp_path):
    cut = tmp_path / "cut.safetensors"
    data = cli_cache.read_bytes()
    cut.write_bytes(data[: len(data) // 2])
    result = generate_cli(*tiny_llama(folders, 64), "--prompt-cache-file", cut)
    assert_one_line_error(result, f"{cut} is not a readable prompt cache", REBUILD)


# --- converters: corrupt GGUF files ---


def gguf_byte(field, part: int) -> int:
    """Where in the file one part of a GGUF reader field (key, type, value...) starts."""
    return int(field.offset + sum(p.nbytes for p in field.parts[:part]))


# Tensor info parts: name length, name, dimension count, dimensions, type, data offset.
CORRUPTIONS = {
    "tensor-count": lambda reader: 8,
    "architecture-string": lambda r: gguf_byte(r.fields["general.architecture"], 4),
    "tensor-name": lambda r: gguf_byte(r.tensors[0].field, 1) + 2,
    "tensor-dimension": lambda r: gguf_byte(r.tensors[0].field, 3),
    "tensor-type": lambda r: gguf_byte(r.tensors[0].field, 4),
    "tensor-offset": lambda r: gguf_byte(r.tensors[0].field, 5),
}


@pytest.mark.parametrize("where", list(CORRUPTIONS))
def test_a_gguf_file_with_flipped_header_bytes_is_named_corrupt_and_leaves_nothing(where, tmp_path):
    """Not truncated but corrupt: a flipped byte in the tensor count, a metadata string or
    a tensor's name, shape, type or data offset (which the reader itself accepts) is
    refused by name. GGUF has no checksum: flipped numbers in the metadata go unseen."""
    path = tmp_path / "model.gguf"
    write_gguf(path, tiny_model("llama", vocab_size=len(byte_level_vocab().tokens)), "llama")
    position = CORRUPTIONS[where](GGUFReader(path))
    data = bytearray(path.read_bytes())
    data[position] ^= 0xFF
    path.write_bytes(bytes(data))
    refused = re.escape("is not a complete GGUF file (truncated or corrupt") + ".*download it again"
    with pytest.raises(ModelError, match=refused):
        convert_gguf(path, tmp_path / "mlx")
    assert no_folder_left(tmp_path)
