"""The command-line tools end to end, on the embedded SmolLM2 model."""

import pytest

from conftest import assert_one_line_error, run_module as run
from mlx_longheads.generation import LimitError, check_memory, parse_context_length, prefill_status, truncate

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "


@pytest.fixture(scope="module")
def document(tmp_path_factory):
    path = tmp_path_factory.mktemp("docs") / "doc.txt"
    path.write_text("Alice keeps a red bicycle in the garden shed. " + FILLER * 60)
    return path


def test_generates_from_a_prompt_file_with_stats(document):
    result = run(
        "mlx_longheads.generate", "--prompt-file", str(document),
        "--prompt", "Where is the bicycle?", "--max-tokens", "12", "--verbose",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    assert "Prompt:" in result.stderr and "Peak memory:" in result.stderr


def test_reads_the_prompt_from_stdin():
    result = run(
        "mlx_longheads.generate", "--prompt", "-", "--max-tokens", "8",
        stdin="What is the capital of France?",
    )
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


def test_full_attention_for_comparison():
    result = run(
        "mlx_longheads.generate", "--attention", "full", "--max-tokens", "8",
        "--prompt", "What is the capital of France?",
    )
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout


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


def test_kv_bits_8_generates_with_longheads(tmp_path):
    """Quantized from the first token, and saved so: the prompt cache holds packed K/V."""
    cache_file = str(tmp_path / "cache.safetensors")
    result = run(
        "mlx_longheads.generate", "--kv-bits", "8", "--max-tokens", "8", "--prompt",
        "What is the capital of France?", "--prompt-cache-file", cache_file,
    )
    assert result.returncode == 0, result.stderr
    assert "Paris" in result.stdout
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
