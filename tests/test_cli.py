"""The command-line tools end to end, on the embedded SmolLM2 model."""

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import make_prompt_cache

from conftest import assert_one_line_error, run_module as run
from mlx_longheads import LongHeadsConfig, load
from mlx_longheads.generation import (
    LimitError, check_memory, parse_context_length, prefill_status, stream_generate, truncate,
)

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
QUESTION = "What is the capital of France?"
# LongHeads below its full attention length is stock attention up to rounding: logits within
# this of stock mlx-lm's on the embedded model (test_models allows 2e-3; measured 5e-5).
ROUNDING = 2e-3
COMPLETION = "The capital of France is the city of"
# 8-bit keys and values (groups of 64) move the embedded model's logits by less than this:
# measured 0.21 at the end of COMPLETION; along QUESTION's answer 0.98, and 1.07 on an AMD EPYC.
KV8_ERROR = 1.5


@pytest.fixture(scope="module")
def document(tmp_path_factory):
    path = tmp_path_factory.mktemp("docs") / "doc.txt"
    path.write_text("Alice keeps a red bicycle in the garden shed. " + FILLER * 60)
    return path


@pytest.fixture(scope="module")
def embedded():
    """The embedded model with mlx-lm's stock attention (float32 on the CPU), and its tokenizer."""
    return load(longheads=None)


def margins(logits: np.ndarray) -> np.ndarray:
    """Top-1 minus top-2 logit: a perturbation smaller than half of it keeps the top-1."""
    top2 = np.sort(logits, axis=-1)[..., -2:]
    return top2[..., 1] - top2[..., 0]


@pytest.fixture(scope="module")
def answer(embedded):
    """The embedded model's greedy answer to QUESTION (8 tokens at most) and each step's margin."""
    model, tokenizer = embedded
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True)
    steps = list(stream_generate(model, tokenizer, prompt, max_tokens=8))
    return "".join(s.text for s in steps), margins(np.array([np.array(s.logprobs) for s in steps]))


def next_token_logits(model, prompt) -> np.ndarray:
    """The logits after `prompt`, fed as mlx-lm's generate_step feeds a short one."""
    cache = make_prompt_cache(model)
    model(mx.array(prompt[:-1])[None], cache=cache)
    return np.array(model(mx.array(prompt[-1:])[None], cache=cache)[0, -1])


def test_generates_from_a_prompt_file_with_stats(document):
    result = run(
        "mlx_longheads.generate", "--prompt-file", str(document),
        "--prompt", "Where is the bicycle?", "--max-tokens", "12", "--verbose",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    assert "Prompt:" in result.stderr and "Peak memory:" in result.stderr


def test_reads_the_prompt_from_stdin(answer):
    """The question read from stdin gets the model's greedy answer: LongHeads (below its
    full attention length) gives stock attention's tokens, every step's margin being more
    than twice the rounding between them."""
    text, margin = answer
    assert margin.min() > 2 * ROUNDING, margin  # 0.08 ("The" over "L") is the smallest
    result = run("mlx_longheads.generate", "--prompt", "-", "--max-tokens", "8", stdin=QUESTION)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == text and "Paris" in text


def test_full_attention_for_comparison(answer):
    """--attention full is mlx-lm's stock attention: the same greedy answer."""
    text, margin = answer
    assert margin.min() > 2 * ROUNDING, margin
    result = run("mlx_longheads.generate", "--attention", "full", "--max-tokens", "8", "--prompt", QUESTION)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == text and "Paris" in text


def test_a_prompt_longer_than_max_context_is_refused_before_work(document):
    result = run("mlx_longheads.generate", "--prompt-file", str(document), "--max-context", "256")
    assert_one_line_error(result, "more than the maximum context of 256", "--truncate")


def test_a_bad_model_path_is_one_clear_line(tmp_path):
    result = run("mlx_longheads.generate", "--model", str(tmp_path / "nope"), "--prompt", "hi")
    assert_one_line_error(result, "no such file or folder")


def test_a_bad_max_context_string_is_refused():
    result = run("mlx_longheads.generate", "--max-context", "12q", "--prompt", "hi")
    assert result.returncode == 2
    assert "invalid context length '12q'" in result.stderr


def test_kv_bits_8_generates_with_longheads(tmp_path, embedded):
    """Quantized from the first token, and saved so: the prompt cache holds packed K/V.
    8-bit K/V move the logits by less than KV8_ERROR, so the next token is float K/V's
    where float's margin is more than twice that (at QUESTION's first token it is 0.08)."""
    model, tokenizer = embedded
    prompt = tokenizer.encode(COMPLETION)
    exact = next_token_logits(model, prompt)
    quantized = next_token_logits(load(longheads=LongHeadsConfig(kv_bits=8))[0], prompt)
    assert np.abs(quantized - exact).max() < KV8_ERROR
    assert margins(exact) > 2 * KV8_ERROR, margins(exact)  # 5.2 for " Paris"
    cache_file = str(tmp_path / "cache.safetensors")
    result = run(
        "mlx_longheads.generate", "--kv-bits", "8", "--max-tokens", "1", "--ignore-chat-template",
        "--prompt", COMPLETION, "--prompt-cache-file", cache_file,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == tokenizer.decode([int(exact.argmax())]).strip() == "Paris"
    from mlx_lm.models.cache import load_prompt_cache

    cache = load_prompt_cache(cache_file)
    assert cache[0].bits == 8 and cache[0].group_size == 64 and len(cache[0].keys) == 3


def test_kv_bits_3_is_refused_by_its_rule():
    result = run("mlx_longheads.generate", "--kv-bits", "3", "--prompt", "hi")
    assert_one_line_error(result, "kv_bits must be one of (4, 8)")


def test_api_kv_bits_of_a_longheads_model_belongs_in_its_configuration():
    from conftest import tiny_model
    from mlx_longheads.generation import stream_generate
    from mlx_longheads.models import apply_longheads

    model = tiny_model("llama")
    apply_longheads(model)
    with pytest.raises(LimitError, match=r"load\(\.\.\., longheads=LongHeadsConfig\(kv_bits=8\)\)"):
        next(stream_generate(model, None, [1, 2, 3], kv_bits=8))


def test_chat_reads_the_document_once(document):
    result = run(
        "mlx_longheads.chat", "--document", str(document), "--max-tokens", "16",
        stdin="Where is the bicycle?\nWhat colour is it?\n",
    )
    assert result.returncode == 0, result.stderr
    turns = [line for line in result.stderr.splitlines() if line.startswith("[prefill")]
    assert len(turns) == 2, result.stderr
    first, second = (int(t.split()[1]) for t in turns)
    assert first > 1000  # the document
    assert second < 50  # only the new question


@pytest.mark.parametrize(
    "text, tokens", [("32k", 32768), ("128K", 131072), ("131072", 131072), ("1m", 1048576)]
)
def test_context_lengths_parse(text, tokens):
    assert parse_context_length(text) == tokens


def test_truncation_keeps_the_named_parts():
    tokens = list(range(10))
    assert truncate(tokens, 4, "start") == [6, 7, 8, 9]
    assert truncate(tokens, 4, "end") == [0, 1, 2, 3]
    assert truncate(tokens, 4, "middle") == [0, 1, 8, 9]
    with pytest.raises(LimitError, match="10 tokens, more than the maximum context of 4"):
        truncate(tokens, 4, None)


def test_too_little_memory_stops_before_prefill(monkeypatch):
    from conftest import tiny_model
    from mlx_longheads import generation

    monkeypatch.setattr(generation, "available_bytes", lambda: 2 * 10**9)
    with pytest.raises(LimitError, match="lower --max-context or use a more quantized model"):
        check_memory(tiny_model("llama"), 10**7, None)


def test_prefill_progress_shows_the_rate_and_the_time_left():
    assert prefill_status(100, 400, 2.0) == "100/400 tokens, 50.0 tok/s, 6s left"
    assert prefill_status(0, 400, 0.0) == "0/400 tokens, 0.0 tok/s"
