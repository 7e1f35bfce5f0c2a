"""The command-line tools end to end, on the embedded SmolLM2 model: as a user runs them
(a new process) where that is what is tested, else their `main` called here."""

import io
import json
import re
import signal
import subprocess
import sys
import threading

import mlx.core as mx
import numpy as np
import pytest
from mlx_lm.models.cache import load_prompt_cache, make_prompt_cache

from conftest import (
    ROUNDING, assert_one_line_error, clone, run_main, run_module as run, tiny_model, with_longheads,
)
from hf_files import VOCAB, write_hf_folder
from mlx_longheads import LongHeadsConfig
import mlx_longheads.generate as generate  # the tool's module; the package's `generate` is a function
from mlx_longheads import chat
from mlx_longheads.cli import exit_on_bad_input
from mlx_longheads.generation import (
    LimitError, check_memory, parse_context_length, prefill_status, stream_generate, truncate,
)

FILLER = "The grass is green. The sky is blue. The sun is yellow. Here we go. There and back again. "
DOCUMENT = "Alice keeps a red bicycle in the garden shed. " + FILLER * 2  # 59 tokens
QUESTION = "What is the capital of France?"
COMPLETION = "The capital of France is the city of"
# 8-bit keys and values (groups of 64) move the embedded model's logits by less than this:
# measured 0.21 at the end of COMPLETION; along QUESTION's answer 0.98, and 1.07 on an AMD EPYC.
KV8_ERROR = 1.5


@pytest.fixture(scope="module")
def document(tmp_path_factory):
    path = tmp_path_factory.mktemp("docs") / "doc.txt"
    path.write_text(DOCUMENT)
    return path


@pytest.fixture
def loaded(monkeypatch, embedded):
    """The tools' `load` of the embedded model gives a copy of the run's loaded one (the
    weights shared), as `load` gives it, instead of reading it from disk again: for
    tests, called here, of what a tool does once it has loaded (other models load)."""
    from mlx_longheads.load import load as load_from_disk

    def load(model=None, longheads=None, max_context=None):
        if model is not None:
            return load_from_disk(model, longheads, max_context)
        stock, tokenizer = embedded
        return (clone(stock) if longheads is None else with_longheads(stock, longheads)), tokenizer

    monkeypatch.setattr(generate, "load", load)
    monkeypatch.setattr(chat, "load", load)


def margins(logits: np.ndarray) -> np.ndarray:
    """Top-1 minus top-2 logit: a perturbation smaller than half of it keeps the top-1."""
    top2 = np.sort(logits, axis=-1)[..., -2:]
    return top2[..., 1] - top2[..., 0]


def greedy(model, tokenizer, prompt, max_tokens: int):
    """The greedy tokens after `prompt` (stock mlx-lm generation), their text and each
    step's margin."""
    steps = list(stream_generate(model, tokenizer, prompt, max_tokens=max_tokens))
    margin = margins(np.array([np.array(s.logprobs) for s in steps]))
    return [s.token for s in steps], "".join(s.text for s in steps), margin


@pytest.fixture(scope="module")
def answer(embedded):
    """The embedded model's greedy answer to QUESTION (8 tokens at most) and each step's margin."""
    model, tokenizer = embedded
    prompt = tokenizer.apply_chat_template([{"role": "user", "content": QUESTION}], add_generation_prompt=True)
    _, text, margin = greedy(model, tokenizer, prompt, 8)
    return text, margin


def next_token_logits(model, prompt) -> np.ndarray:
    """The logits after `prompt`, fed as mlx-lm's generate_step feeds a short one."""
    cache = make_prompt_cache(model)
    model(mx.array(prompt[:-1])[None], cache=cache)
    return np.array(model(mx.array(prompt[-1:])[None], cache=cache)[0, -1])


def verbose_count(stderr: str, what: str) -> int:
    """The token count --verbose reports for "Prompt" or "Generation"."""
    return int(re.search(rf"^{what}: (\d+) tokens", stderr, re.M).group(1))


# --- generate ---


def test_generates_from_a_prompt_file_with_stats(document, embedded):
    """The file is read before --prompt: the prompt --verbose counts holds the document."""
    result = run(
        "mlx_longheads.generate", "--prompt-file", str(document),
        "--prompt", "Where is the bicycle?", "--max-tokens", "4", "--verbose",
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    assert verbose_count(result.stderr, "Prompt") > len(embedded[1].encode(DOCUMENT))
    assert 1 <= verbose_count(result.stderr, "Generation") <= 4 and "Peak memory:" in result.stderr


def test_reads_the_prompt_from_stdin(answer):
    """The question read from stdin gets the model's greedy answer: LongHeads (below its
    full attention length) gives stock attention's tokens, every step's margin being more
    than twice the rounding between them."""
    text, margin = answer
    assert margin.min() > 2 * ROUNDING, margin  # 0.08 ("The" over "L") is the smallest
    result = run("mlx_longheads.generate", "--prompt", "-", "--max-tokens", "8", stdin=QUESTION)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == text and "Paris" in text


def test_full_attention_for_comparison(answer, loaded, capfd):
    """--attention full is mlx-lm's stock attention: the same greedy answer."""
    text, margin = answer
    assert margin.min() > 2 * ROUNDING, margin
    result = run_main(generate.main, "--attention", "full", "--max-tokens", "8", "--prompt", QUESTION, capfd=capfd)
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == text and "Paris" in text


def test_a_prompt_longer_than_max_context_is_refused_before_work(document):
    result = run("mlx_longheads.generate", "--prompt-file", str(document), "--max-context", "64")
    assert_one_line_error(result, "more than the maximum context of 64", "--truncate")


def test_truncate_cuts_a_long_prompt_to_max_context_and_generates(document, loaded, capfd):
    """--truncate middle keeps the prompt's start and end, max-context tokens of them, and
    generates from there: --verbose counts the prompt it kept (and one token, the room
    max-context leaves)."""
    result = run_main(
        generate.main, "--prompt-file", str(document), "--prompt", "Where is the bicycle?",
        "--max-context", "64", "--truncate", "middle", "--max-tokens", "4", "--verbose", capfd=capfd,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip()
    assert verbose_count(result.stderr, "Prompt") == 64
    assert verbose_count(result.stderr, "Generation") == 1


def test_a_missing_prompt_file_is_one_clear_line(tmp_path, capfd):
    missing = tmp_path / "absent.txt"
    result = run_main(generate.main, "--prompt-file", str(missing), "--prompt", "Summarise.", capfd=capfd)
    assert_one_line_error(result, f"no such file: {missing}")


def test_a_bad_model_path_is_one_clear_line(tmp_path, capfd):
    result = run_main(generate.main, "--model", str(tmp_path / "nope"), "--prompt", "hi", capfd=capfd)
    assert_one_line_error(result, "no such file or folder")


def test_a_bad_max_context_string_is_refused(capfd):
    result = run_main(generate.main, "--max-context", "12q", "--prompt", "hi", capfd=capfd)
    assert result.returncode == 2
    assert "invalid context length '12q'" in result.stderr


def test_ctrl_c_ends_generation_with_exit_status_130(embedded_folder):
    """SIGINT once the answer has begun: exit status 130 (128 + SIGINT), no traceback.
    The child installs Python's own SIGINT handler first, as a terminal-started Python has
    it: a suite started in the background inherits SIGINT ignored, and Python keeps that.
    (Not `preexec_fn`: code run between fork and exec can deadlock on a lock another
    thread of the suite held.) A watchdog kills a stuck child, so the test fails, never hangs."""
    run_generate = ("import runpy, signal; signal.signal(signal.SIGINT, signal.default_int_handler); "
                    "runpy.run_module('mlx_longheads.generate', run_name='__main__', alter_sys=True)")
    process = subprocess.Popen(
        [sys.executable, "-c", run_generate, "--ignore-chat-template",
         "--prompt", "1, 2, 3, 4, 5,", "--max-tokens", "500"],
        stdout=subprocess.PIPE, stderr=subprocess.PIPE,
    )
    watchdog = threading.Timer(300, process.kill)
    watchdog.start()
    try:
        assert process.stdout.read(1), process.stderr.read().decode()
        process.send_signal(signal.SIGINT)
        _, stderr = process.communicate(timeout=120)
    finally:
        watchdog.cancel()
        process.kill()
    assert process.returncode == 130, stderr.decode()
    assert "Traceback" not in stderr.decode()


def test_a_second_run_continues_from_the_prompt_cache_file(tmp_path, embedded, loaded, capfd):
    """Run 1 saves its cache (its prompt and the answer's tokens); run 2, given the same
    file, feeds only its own prompt after them (--verbose counts its prompt alone: run
    1's is not read again) and answers as a fresh run of all those tokens does, greedy,
    each step winning by more than twice the rounding between the two paths."""
    model, tokenizer = embedded
    cache_file = str(tmp_path / "doc.safetensors")
    first_argv = ["--prompt", "Alice keeps a red bicycle in the garden shed. Where is the bicycle?", "--max-tokens", "4"]
    second_argv = ["--prompt", "What colour is it?", "--max-tokens", "6"]
    first = run_main(generate.main, *first_argv, "--prompt-cache-file", cache_file, capfd=capfd)
    assert first.returncode == 0, first.stderr
    second = run_main(generate.main, *second_argv, "--prompt-cache-file", cache_file, "--verbose", capfd=capfd)
    assert second.returncode == 0, second.stderr

    def prompt(argv):
        args = generate.build_parser().parse_args(argv)
        return generate.encode_prompt(tokenizer, generate.read_prompt(args), args)

    asked, asked_again = prompt(first_argv), prompt(second_argv)
    answered, text, margin = greedy(model, tokenizer, asked, 4)
    assert margin.min() > 2 * ROUNDING, margin
    assert first.stdout.strip() == text.strip()
    assert verbose_count(second.stderr, "Prompt") == len(asked_again)
    tokens, text, margin = greedy(model, tokenizer, asked + answered + asked_again, 6)
    assert margin.min() > 2 * ROUNDING, margin
    assert second.stdout.strip() == text.strip()
    # The file now holds both runs: every prompt token and every token generated.
    held = load_prompt_cache(cache_file)[0].offset
    assert held == len(asked) + len(answered) + len(asked_again) + len(tokens)


def test_kv_bits_8_generates_with_longheads(tmp_path, embedded, loaded, capfd):
    """Quantized from the first token, and saved so: the prompt cache holds packed K/V.
    8-bit K/V move the logits by less than KV8_ERROR, so the next token is float K/V's
    where float's margin is more than twice that (at QUESTION's first token it is 0.08)."""
    model, tokenizer = embedded
    prompt = tokenizer.encode(COMPLETION)
    exact = next_token_logits(model, prompt)
    quantized = next_token_logits(with_longheads(model, LongHeadsConfig(kv_bits=8)), prompt)
    assert np.abs(quantized - exact).max() < KV8_ERROR
    assert margins(exact) > 2 * KV8_ERROR, margins(exact)  # 5.2 for " Paris"
    cache_file = str(tmp_path / "cache.safetensors")
    result = run_main(
        generate.main, "--kv-bits", "8", "--max-tokens", "1", "--ignore-chat-template",
        "--prompt", COMPLETION, "--prompt-cache-file", cache_file, capfd=capfd,
    )
    assert result.returncode == 0, result.stderr
    assert result.stdout.strip() == tokenizer.decode([int(exact.argmax())]).strip() == "Paris"
    cache = load_prompt_cache(cache_file)
    assert cache[0].bits == 8 and cache[0].group_size == 64 and len(cache[0].keys) == 3


def test_kv_bits_3_is_refused_by_its_rule(loaded, capfd):
    result = run_main(generate.main, "--kv-bits", "3", "--prompt", "hi", capfd=capfd)
    assert_one_line_error(result, "kv_bits must be one of (4, 8)")


@pytest.mark.parametrize(
    "flags, message",
    [
        (["--selection", "one_pass_filter", "--filter-layer", "30"], "filter_layer 30 is past the model's last layer (29)"),
        (["--selection", "query_head", "--filter-layer", "3"], "filter_layer 3 applies to the one_pass_filter, two_pass_prompt, one_pass_prompt and one_pass_reread selections only"),
    ],
)
def test_a_filter_layer_that_cannot_work_is_refused_by_its_rule(flags, message, loaded, capfd):
    result = run_main(generate.main, *flags, "--prompt", "hi", capfd=capfd)
    assert_one_line_error(result, message)


def test_api_kv_bits_of_a_longheads_model_belongs_in_its_configuration():
    from mlx_longheads.models import apply_longheads

    model = tiny_model("llama")
    apply_longheads(model)
    with pytest.raises(LimitError, match=r"load\(\.\.\., longheads=LongHeadsConfig\(kv_bits=8\)\)"):
        next(stream_generate(model, None, [1, 2, 3], kv_bits=8))


# --- chat ---


def test_chat_reads_the_document_once(document, embedded):
    result = run(
        "mlx_longheads.chat", "--document", str(document), "--max-tokens", "4",
        stdin="Where is the bicycle?\nWhat colour is it?\n",
    )
    assert result.returncode == 0, result.stderr
    turns = [line for line in result.stderr.splitlines() if line.startswith("[prefill")]
    assert len(turns) == 2, result.stderr
    first, second = (int(t.split()[1]) for t in turns)
    assert first > len(embedded[1].encode(DOCUMENT))  # the document
    assert second < 50  # only the new question


def run_chat(capfd, *argv: str, stdin: str = "") -> subprocess.CompletedProcess:
    """python -m mlx_longheads.chat, called here (its main reads the real stdin)."""

    def main(argv):
        args = chat.build_parser().parse_args(argv)
        exit_on_bad_input(lambda: chat.chat(args, stdin=io.StringIO(stdin)))

    return run_main(main, *argv, capfd=capfd)


@pytest.mark.parametrize(
    "flags, fragments",
    [
        (["--document", "{tmp}/absent.txt"], ["no such file: {tmp}/absent.txt"]),
        (
            ["--document", "{document}", "--max-context", "64"],
            ["the conversation reached", "more than --max-context 64: start again with a larger one"],
        ),
        (["--max-context", "1024m"], ["this run needs about", "lower --max-context"]),
        (["--chunk-size", "100", "--attention-length", "4096"], ["must be a multiple of chunk_size 100"]),
    ],
    ids=["missing-document", "past-max-context", "memory", "configuration"],
)
def test_chat_refuses_bad_input_in_one_line(flags, fragments, tmp_path, document, loaded, capfd):
    """Before any prefill: a missing document, a conversation that would pass
    --max-context, one the machine's memory cannot hold, a configuration breaking a rule."""
    fill = lambda s: s.format(tmp=tmp_path, document=document)  # noqa: E731
    result = run_chat(capfd, *map(fill, flags), stdin="Where is the bicycle?\n")
    assert_one_line_error(result, *map(fill, fragments))
    assert "[prefill" not in result.stderr


def test_chat_refuses_a_template_that_rewrites_earlier_turns(tmp_path, capfd):
    """Chat feeds each turn's new tokens only, so the template must append: one that
    marks the last message (and so changes the one before) is refused by name."""
    folder = write_hf_folder(tmp_path / "model", tiny_model("llama", vocab_size=VOCAB), "llama")
    config = json.loads((folder / "tokenizer_config.json").read_text())
    config["chat_template"] = (
        "{% for m in messages %}{{ m['role'] }}: {{ m['content'] }}"
        "{% if loop.last %} (last){% endif %}\n{% endfor %}"
    )
    (folder / "tokenizer_config.json").write_text(json.dumps(config))
    (tmp_path / "doc.txt").write_text("A short document.")
    result = run_chat(capfd, "--model", str(folder), "--document", str(tmp_path / "doc.txt"), stdin="Why?\n")
    assert_one_line_error(result, "the chat template rewrites earlier turns", "one that appends")


# --- shared parts ---


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
    from mlx_longheads import generation

    monkeypatch.setattr(generation, "available_bytes", lambda: 2 * 10**9)
    with pytest.raises(LimitError, match="lower --max-context or use a more quantized model"):
        check_memory(tiny_model("llama"), 10**7, None)


def test_prefill_progress_shows_the_rate_and_the_time_left():
    assert prefill_status(100, 400, 2.0) == "100/400 tokens, 50.0 tok/s, 6s left"
    assert prefill_status(0, 400, 0.0) == "0/400 tokens, 0.0 tok/s"
