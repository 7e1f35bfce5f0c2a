"""Hugging Face folders become MLX folders through mlx-lm's converter, whole or not at all."""

import json
import subprocess
import sys
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import numpy as np
import pytest
from gguf import GGMLQuantizationType as GGML
from huggingface_hub import constants
from mlx.utils import tree_flatten, tree_unflatten

from conftest import clone, tiny_model
from gguf_files import write_gguf
from hf_files import VOCAB, write_hf_folder
from leftovers import no_folder_left
from mlx_longheads.convert import convert_hf
from mlx_longheads.gguf import convert_gguf
from mlx_longheads.support import ModelError

ROOT = Path(__file__).resolve().parents[1]
TOKENS = mx.array(np.random.default_rng(0).integers(0, VOCAB, size=(1, 40)))


def load(path: Path):
    model, _ = mlx_lm.load(str(path))
    return model


def logits(model) -> np.ndarray:
    return np.array(model(TOKENS))


def test_hf_folder_converts_to_the_same_model(arch, tmp_path):
    model = tiny_model(arch, vocab_size=VOCAB)
    convert_hf(str(write_hf_folder(tmp_path / "hf", model, arch)), tmp_path / "mlx")
    np.testing.assert_array_equal(logits(load(tmp_path / "mlx")), logits(model))


def test_mistral_folder_converts_as_mlx_lm_llama(tmp_path):
    model = tiny_model("llama", vocab_size=VOCAB)
    convert_hf(str(write_hf_folder(tmp_path / "hf", model, "mistral")), tmp_path / "mlx")
    np.testing.assert_array_equal(logits(load(tmp_path / "mlx")), logits(model))


@pytest.mark.parametrize("bits, group_size", [(4, 64), (8, 32)])
def test_quantize_with_bits_and_group_size(arch, bits, group_size, tmp_path):
    model = tiny_model(arch, vocab_size=VOCAB)
    hf = write_hf_folder(tmp_path / "hf", model, arch)
    convert_hf(str(hf), tmp_path / "mlx", quantize=True, q_bits=bits, q_group_size=group_size)
    loaded = load(tmp_path / "mlx")
    layer = loaded.model.layers[0].self_attn.q_proj
    assert isinstance(layer, nn.QuantizedLinear) and (layer.bits, layer.group_size) == (bits, group_size)
    # |logit difference| / max |logit|, measured: 4-bit/64 5.5-6.6%, 8-bit/32 0.28-0.32%.
    expected = logits(model)
    noise = {4: 0.12, 8: 0.01}[bits]
    assert np.abs(logits(loaded) - expected).max() <= noise * np.abs(expected).max()


def test_quantize_defaults_to_mlx_lm_4_bits_group_64(tmp_path):
    hf = write_hf_folder(tmp_path / "hf", tiny_model("llama", vocab_size=VOCAB), "llama")
    convert_hf(str(hf), tmp_path / "mlx", quantize=True)
    config = json.loads((tmp_path / "mlx" / "config.json").read_text())
    assert config["quantization"] == {"group_size": 64, "bits": 4, "mode": "affine"}


def test_dtype_casts_the_weights(tmp_path):
    hf = write_hf_folder(tmp_path / "hf", tiny_model("qwen2", vocab_size=VOCAB), "qwen2")
    convert_hf(str(hf), tmp_path / "mlx", dtype="bfloat16")
    assert {v.dtype for _, v in tree_flatten(load(tmp_path / "mlx").parameters())} == {mx.bfloat16}


def test_hf_route_and_gguf_route_give_the_same_model(tmp_path):
    """A GGUF file, and a Hugging Face folder holding the weights that file decodes to."""
    model = tiny_model("llama", vocab_size=VOCAB)
    held = write_gguf(tmp_path / "model.gguf", model, "llama", GGML.Q8_0)
    from_gguf = load(convert_gguf(tmp_path / "model.gguf", tmp_path / "from_gguf"))
    from_gguf.set_dtype(mx.float32)
    decoded = clone(model)
    decoded.update(tree_unflatten([(k, mx.array(v)) for k, v in held.items()]))
    hf = write_hf_folder(tmp_path / "hf", decoded, "llama")
    from_hf = load(convert_hf(str(hf), tmp_path / "from_hf"))
    np.testing.assert_allclose(logits(from_hf), logits(from_gguf), atol=1e-4)


# --- bad input ---


def test_unsupported_architecture_is_refused_before_converting(tmp_path):
    (tmp_path / "hf").mkdir()
    (tmp_path / "hf" / "config.json").write_text(json.dumps({"model_type": "gpt2"}))
    with pytest.raises(ModelError, match="architecture 'gpt2' is not supported; use a llama, mistral, qwen2, qwen3 model"):
        convert_hf(str(tmp_path / "hf"), tmp_path / "mlx")
    assert no_folder_left(tmp_path)


def test_folder_without_weights(tmp_path):
    hf = write_hf_folder(tmp_path / "hf", tiny_model("llama", vocab_size=VOCAB), "llama")
    (hf / "model.safetensors").unlink()
    with pytest.raises(ModelError, match="No safetensors"):
        convert_hf(str(hf), tmp_path / "mlx")
    assert no_folder_left(tmp_path)


@pytest.mark.parametrize("spec", ["./absent", "absent/deeper/still", "~/absent-model-folder"])
def test_missing_local_path(spec, tmp_path):
    with pytest.raises(ModelError, match="no such file or folder"):
        convert_hf(spec, tmp_path / "mlx")


def test_hub_repo_offline_names_hf_hub_offline(tmp_path, monkeypatch):
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.setattr(constants, "HF_HUB_CACHE", str(tmp_path / "hub"))
    with pytest.raises(ModelError, match="not in the Hugging Face cache and HF_HUB_OFFLINE is set"):
        convert_hf("mlx-longheads/no-such-model", tmp_path / "mlx")
    assert no_folder_left(tmp_path)


def test_existing_output_folder_is_refused(tmp_path):
    hf = write_hf_folder(tmp_path / "hf", tiny_model("llama", vocab_size=VOCAB), "llama")
    (tmp_path / "mlx").mkdir()
    with pytest.raises(ModelError, match="already exists"):
        convert_hf(str(hf), tmp_path / "mlx")


def test_interrupted_conversion_leaves_no_folder(tmp_path, monkeypatch):
    hf = write_hf_folder(tmp_path / "hf", tiny_model("llama", vocab_size=VOCAB), "llama")
    module = sys.modules["mlx_lm.convert"]  # mlx_lm.convert is also the name of the function
    save = module.save

    def save_then_interrupt(*args, **kwargs):
        save(*args, **kwargs)
        raise KeyboardInterrupt

    monkeypatch.setattr(module, "save", save_then_interrupt)
    with pytest.raises(KeyboardInterrupt):
        convert_hf(str(hf), tmp_path / "mlx")
    assert no_folder_left(tmp_path)


# --- command line ---


def run_cli(*args):
    return subprocess.run(
        [sys.executable, str(ROOT / "convert" / "hf_to_mlx.py"), *map(str, args)],
        capture_output=True,
        text=True,
    )


def test_command_line_quantizes(tmp_path):
    hf = write_hf_folder(tmp_path / "hf", tiny_model("qwen3", vocab_size=VOCAB), "qwen3")
    result = run_cli("--hf-path", hf, "--mlx-path", tmp_path / "mlx", "-q", "--q-bits", "8", "--q-group-size", "32")
    assert result.returncode == 0, result.stderr
    assert load(tmp_path / "mlx").model.layers[0].mlp.up_proj.bits == 8


def test_command_line_error_is_one_line_without_traceback(tmp_path):
    result = run_cli("--hf-path", tmp_path / "absent", "--mlx-path", tmp_path / "mlx")
    assert result.returncode == 1
    assert result.stderr == f"error: {tmp_path / 'absent'}: no such file or folder\n"
