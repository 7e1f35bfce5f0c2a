"""GGUF files become MLX folders that stock mlx-lm loads: same weights, same tokenizer."""

import io
import subprocess
import sys
import unicodedata
from pathlib import Path

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
import numpy as np
import pytest
import sentencepiece as spm
from gguf import GGMLQuantizationType as GGML
from gguf import GGUFWriter, TokenType
from mlx.utils import tree_flatten, tree_unflatten
from transformers import Qwen2Tokenizer

from conftest import assert_one_line_error, clone, run_main, tiny_model
from gguf_files import CHATML, SPECIAL, TEXT, Vocab, byte_level_vocab, write_gguf
from leftovers import no_folder_left
from mlx_longheads.gguf import convert_gguf
from mlx_longheads.resolve import cache_dir
from mlx_longheads.support import ModelError

ROOT = Path(__file__).resolve().parents[1]
VOCAB = len(byte_level_vocab().tokens)
TOKENS = mx.array(np.random.default_rng(0).integers(0, VOCAB, size=(1, 40)))
# Largest |logit difference| from the float model, as a fraction of the largest |logit|;
# measured on the tiny models (logits up to ~80, every weight quantized, the embedding
# too): F16 0.01%, Q8_0 0.35-0.41%, Q4_0 and Q4_1 4.8-6.4%. Top-1 agreed everywhere.
QUANTIZATION_NOISE = {GGML.F16: 0.001, GGML.Q8_0: 0.01, GGML.Q4_0: 0.1, GGML.Q4_1: 0.1}


def convert(tmp_path, model, arch, qtype=GGML.F32, **kwargs):
    """Write, convert and load a GGUF; return the loaded model (float32), its tokenizer
    and the weights the file holds."""
    held = write_gguf(tmp_path / "model.gguf", model, arch, qtype, **kwargs)
    loaded, tokenizer = mlx_lm.load(str(convert_gguf(tmp_path / "model.gguf", tmp_path / "mlx")))
    loaded.set_dtype(mx.float32)
    return loaded, tokenizer, held


def with_weights(model, weights):
    copy = clone(model)
    copy.update(tree_unflatten([(k, mx.array(v)) for k, v in weights.items()]))
    return copy


def logits(model) -> np.ndarray:
    return np.array(model(TOKENS))


def test_float32_file_gives_the_same_logits_bit_for_bit(arch, tmp_path):
    model = tiny_model(arch, vocab_size=VOCAB)
    loaded, _, _ = convert(tmp_path, model, arch)
    np.testing.assert_array_equal(logits(loaded), logits(model))


@pytest.mark.parametrize("qtype", [GGML.F16, GGML.Q8_0, GGML.Q4_0, GGML.Q4_1], ids=lambda t: t.name)
def test_quantized_file_computes_with_exactly_the_weights_it_holds(arch, qtype, tmp_path):
    model = tiny_model(arch, vocab_size=VOCAB)
    loaded, _, held = convert(tmp_path, model, arch, qtype)
    # The same weights, decoded by the gguf package: equal up to float rounding order.
    np.testing.assert_allclose(logits(loaded), logits(with_weights(model, held)), atol=1e-4)
    # And close to the float model, within the quantization's own noise.
    expected = logits(model)
    assert np.abs(logits(loaded) - expected).max() <= QUANTIZATION_NOISE[qtype] * np.abs(expected).max()


@pytest.mark.parametrize("qtype", [GGML.Q8_0, GGML.Q4_0, GGML.Q4_1], ids=lambda t: t.name)
def test_q8_0_q4_0_q4_1_stay_quantized_with_mlx_group_size_32(qtype, tmp_path):
    loaded, _, _ = convert(tmp_path, tiny_model("llama", vocab_size=VOCAB), "llama", qtype)
    layer = loaded.model.layers[0].self_attn.q_proj
    assert isinstance(layer, nn.QuantizedLinear)
    assert (layer.group_size, layer.bits) == (32, 8 if qtype == GGML.Q8_0 else 4)


def test_mixed_bits_get_per_layer_quantization_config(tmp_path):
    """SmolLM2's file: Q4_1 layers with a Q8_0 embedding."""
    model = tiny_model("llama", vocab_size=VOCAB)
    types = {"model.embed_tokens.weight": GGML.Q8_0}
    loaded, _, held = convert(tmp_path, model, "llama", GGML.Q4_1, types=types)
    _, config = mlx_lm.utils.load_model(tmp_path / "mlx", lazy=True)
    assert config["quantization"]["bits"] == 4
    assert config["quantization"]["model.embed_tokens"] == {"group_size": 32, "bits": 8, "mode": "affine"}
    assert loaded.model.embed_tokens.bits == 8
    np.testing.assert_allclose(logits(loaded), logits(with_weights(model, held)), atol=1e-4)


def test_llama_query_and_key_rows_are_unpermuted_and_qwen_rows_left_alone(arch, tmp_path):
    model = tiny_model(arch, vocab_size=VOCAB)
    loaded, _, _ = convert(tmp_path, model, arch)
    for name in ("q_proj", "k_proj"):
        converted = getattr(loaded.model.layers[1].self_attn, name).weight
        original = getattr(model.model.layers[1].self_attn, name).weight
        assert mx.array_equal(converted, original)


def test_untied_output_matrix_is_kept(tmp_path):
    model = tiny_model("llama", vocab_size=VOCAB, tie_word_embeddings=False)
    loaded, _, _ = convert(tmp_path, model, "llama", GGML.Q8_0)
    assert not loaded.args.tie_word_embeddings
    assert isinstance(loaded.lm_head, nn.QuantizedLinear)


@pytest.mark.parametrize("qtype", [GGML.Q4_K, GGML.Q6_K], ids=lambda t: t.name)
def test_k_quants_are_decoded_by_the_gguf_package_not_mx_load(qtype, tmp_path):
    """mx.load decodes Q4_K wrongly; the converter decodes K-quants to float16 instead."""
    model = tiny_model("llama", vocab_size=VOCAB, hidden_size=256, intermediate_size=256)
    types = {f"model.layers.{i}.mlp.{p}.weight": qtype for i in (0, 1) for p in ("up_proj", "down_proj")}
    loaded, _, held = convert(tmp_path, model, "llama", GGML.Q8_0, types=types)
    up = loaded.model.layers[0].mlp.up_proj
    assert isinstance(up, nn.Linear)  # decoded, not quantized
    np.testing.assert_array_equal(
        np.array(up.weight), held["model.layers.0.mlp.up_proj.weight"].astype(np.float16)
    )
    decoded_f16 = {k: v.astype(np.float16) if k in types else v for k, v in held.items()}
    np.testing.assert_allclose(logits(loaded), logits(with_weights(model, decoded_f16)), atol=1e-3)


def test_dtype_casts_the_unquantized_weights(tmp_path):
    write_gguf(tmp_path / "model.gguf", tiny_model("qwen3", vocab_size=VOCAB), "qwen3", GGML.Q8_0)
    convert_gguf(tmp_path / "model.gguf", tmp_path / "mlx", dtype="bfloat16")
    loaded, _ = mlx_lm.load(str(tmp_path / "mlx"))
    dtypes = {k: v.dtype for k, v in tree_flatten(loaded.parameters())}
    assert dtypes["model.norm.weight"] == mx.bfloat16
    assert dtypes["model.layers.0.self_attn.q_norm.weight"] == mx.bfloat16
    assert dtypes["model.layers.0.self_attn.q_proj.scales"] == mx.float16  # repacked exactly


def test_linear_rope_scaling_is_kept(tmp_path):
    model = tiny_model("llama", vocab_size=VOCAB, rope_scaling={"type": "linear", "factor": 4.0})
    metadata = {"llama.rope.scaling.type": "linear", "llama.rope.scaling.factor": 4.0}
    loaded, _, _ = convert(tmp_path, model, "llama", metadata=metadata)
    assert loaded.args.rope_scaling == {"type": "linear", "factor": 4.0}
    np.testing.assert_array_equal(logits(loaded), logits(model))


def test_config_carries_the_trained_length_and_the_model_shape(arch, tmp_path):
    model = tiny_model(arch, vocab_size=VOCAB, max_position_embeddings=2048, rope_theta=500000.0)
    write_gguf(tmp_path / "model.gguf", model, arch)
    convert_gguf(tmp_path / "model.gguf", tmp_path / "mlx")
    _, config = mlx_lm.utils.load_model(tmp_path / "mlx", lazy=True)
    assert config["model_type"] == arch
    assert config["max_position_embeddings"] == 2048
    assert config["rope_theta"] == 500000.0
    assert config["rms_norm_eps"] == 1e-5
    assert (config["num_attention_heads"], config["num_key_value_heads"]) == (4, 2)
    assert config["tie_word_embeddings"] is True
    assert config["eos_token_id"] == SPECIAL.index("<|im_end|>")


# --- tokenizer ---


def test_byte_level_tokenizer_encodes_like_the_original_qwen2_tokenizer(tmp_path):
    """Qwen3's GGUF files name the qwen2 pre-tokenizer. (Not a qwen2 model: for those,
    transformers' AutoTokenizer rebuilds the tokenizer as its Qwen2Tokenizer anyway.)"""
    vocab = byte_level_vocab()
    original = Qwen2Tokenizer(
        vocab={t: i for i, t in enumerate(vocab.tokens)},
        merges=[tuple(m.split(" ")) for m in vocab.merges],
    )
    write_gguf(
        tmp_path / "model.gguf", tiny_model("qwen3", vocab_size=VOCAB), "qwen3", vocab=vocab, pre="qwen2"
    )
    _, tokenizer = mlx_lm.load(str(convert_gguf(tmp_path / "model.gguf", tmp_path / "mlx")))
    for text in (TEXT, "it's I'LL 12345 x", "\n\n  indented\r\nline", "Cafe\u0301 (NFD)"):
        assert tokenizer.encode(text) == original.encode(text)
        assert tokenizer.decode(tokenizer.encode(text)) == unicodedata.normalize("NFC", text)


def sentencepiece_vocab() -> tuple:
    """A Llama-2-style sentencepiece BPE (byte fallback, digits split), trained on TEXT,
    and its vocabulary as llama.cpp stores it."""
    proto = io.BytesIO()
    spm.SentencePieceTrainer.train(
        sentence_iterator=iter(TEXT.split("\n") * 20),
        model_writer=proto,
        vocab_size=400,
        model_type="bpe",
        byte_fallback=True,
        split_digits=True,
        normalization_rule_name="identity",
        remove_extra_whitespaces=False,
        allow_whitespace_only_pieces=True,
        character_coverage=1.0,
        hard_vocab_limit=False,
        minloglevel=2,
    )
    sp = spm.SentencePieceProcessor(model_proto=proto.getvalue())

    def kind(i):
        for test, token_type in (
            (sp.is_unknown, TokenType.UNKNOWN),
            (sp.is_control, TokenType.CONTROL),
            (sp.is_byte, TokenType.BYTE),
        ):
            if test(i):
                return token_type
        return TokenType.NORMAL

    ids = range(sp.get_piece_size())
    vocab = Vocab(
        [sp.id_to_piece(i) for i in ids], [kind(i) for i in ids], scores=[sp.get_score(i) for i in ids]
    )
    return sp, vocab


def test_sentencepiece_tokenizer_encodes_like_sentencepiece(tmp_path):
    sp, vocab = sentencepiece_vocab()
    model = tiny_model("llama", vocab_size=len(vocab.tokens))
    write_gguf(tmp_path / "model.gguf", model, "llama", vocab=vocab)
    _, tokenizer = mlx_lm.load(str(convert_gguf(tmp_path / "model.gguf", tmp_path / "mlx")))
    texts = [TEXT, " leading space", "two  spaces", "unseen: ÆØÅ ℕ 𝔸 zebra", "line\nbreak\n", "1234567"]
    for text in texts:
        ids = tokenizer.encode(text)
        assert ids == [sp.bos_id()] + sp.encode(text)  # llama.cpp adds BOS to sentencepiece
        assert tokenizer.decode(ids, skip_special_tokens=True) == text


def test_special_tokens_stay_whole_and_the_chat_template_renders(tmp_path):
    write_gguf(tmp_path / "model.gguf", tiny_model("qwen3", vocab_size=VOCAB), "qwen3")
    _, tokenizer = mlx_lm.load(str(convert_gguf(tmp_path / "model.gguf", tmp_path / "mlx")))
    start, end = SPECIAL.index("<|im_start|>"), SPECIAL.index("<|im_end|>")
    ids = tokenizer.encode("<|im_start|>user\nhi<|im_end|>")
    assert (ids[0], ids[-1]) == (start, end)
    assert tokenizer.eos_token_ids == {end}
    messages = [{"role": "user", "content": "hi"}]
    rendered = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    assert rendered == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert tokenizer.chat_template == CHATML


# --- bad input ---


def test_missing_file(tmp_path):
    with pytest.raises(ModelError, match="no such file"):
        convert_gguf(tmp_path / "absent.gguf", tmp_path / "mlx")
    assert no_folder_left(tmp_path)


@pytest.mark.parametrize("keep", [0.0, 0.001, 0.3, 0.999])
def test_truncated_file_is_named_and_leaves_nothing(keep, tmp_path):
    write_gguf(tmp_path / "model.gguf", tiny_model("llama", vocab_size=VOCAB), "llama")
    data = (tmp_path / "model.gguf").read_bytes()
    (tmp_path / "cut.gguf").write_bytes(data[: int(len(data) * keep)])
    with pytest.raises(ModelError, match="not a complete GGUF file.*download it again"):
        convert_gguf(tmp_path / "cut.gguf", tmp_path / "mlx")
    assert no_folder_left(tmp_path)


def test_not_a_gguf_file(tmp_path):
    (tmp_path / "model.gguf").write_bytes(b"PK\x03\x04" + bytes(1000))
    with pytest.raises(ModelError, match="not a complete GGUF file.*download it again"):
        convert_gguf(tmp_path / "model.gguf", tmp_path / "mlx")


def test_file_without_token_embeddings(tmp_path):
    model = tiny_model("llama", vocab_size=VOCAB)
    write_gguf(tmp_path / "model.gguf", model, "llama", without=("model.embed_tokens.weight",))
    with pytest.raises(ModelError, match="no token_embd.weight"):
        convert_gguf(tmp_path / "model.gguf", tmp_path / "mlx")


def test_unsupported_architecture(tmp_path):
    write_gguf(tmp_path / "model.gguf", tiny_model("llama", vocab_size=VOCAB), "phi3")
    with pytest.raises(ModelError, match="architecture 'phi3' is not supported"):
        convert_gguf(tmp_path / "model.gguf", tmp_path / "mlx")
    assert no_folder_left(tmp_path)


def test_undecodable_tensor_type(tmp_path):
    """Q8_1 is llama.cpp's activation type: no weights file should hold it, nothing decodes it."""
    types = {"model.layers.0.mlp.up_proj.weight": GGML.Q8_1}
    with pytest.raises(ModelError, match="Q8_1, which cannot be decoded"):
        convert(tmp_path, tiny_model("llama", vocab_size=VOCAB), "llama", types=types)
    assert no_folder_left(tmp_path)


def test_unsupported_tokenizer_pre_type(tmp_path):
    write_gguf(tmp_path / "model.gguf", tiny_model("llama", vocab_size=VOCAB), "llama", pre="tekken")
    with pytest.raises(ModelError, match="pre-type 'tekken' is not supported"):
        convert_gguf(tmp_path / "model.gguf", tmp_path / "mlx")


def test_rope_frequency_table_of_llama_3_1_is_refused(tmp_path):
    extra = {"rope_freqs.weight": np.ones(8, np.float32)}
    write_gguf(tmp_path / "model.gguf", tiny_model("llama", vocab_size=VOCAB), "llama", extra=extra)
    with pytest.raises(ModelError, match="rope_freqs"):
        convert_gguf(tmp_path / "model.gguf", tmp_path / "mlx")


def test_unsupported_rope_scaling_is_refused(tmp_path):
    metadata = {"llama.rope.scaling.type": "yarn"}
    write_gguf(tmp_path / "model.gguf", tiny_model("llama", vocab_size=VOCAB), "llama", metadata=metadata)
    with pytest.raises(ModelError, match="rope scaling 'yarn' is not supported"):
        convert_gguf(tmp_path / "model.gguf", tmp_path / "mlx")


def test_existing_output_folder_is_left_untouched(tmp_path):
    write_gguf(tmp_path / "model.gguf", tiny_model("llama", vocab_size=VOCAB), "llama")
    (tmp_path / "mlx").mkdir()
    (tmp_path / "mlx" / "mine.txt").write_text("keep")
    with pytest.raises(ModelError, match="already exists"):
        convert_gguf(tmp_path / "model.gguf", tmp_path / "mlx")
    assert (tmp_path / "mlx" / "mine.txt").read_text() == "keep"


def test_interrupted_conversion_leaves_no_folder(tmp_path, monkeypatch):
    write_gguf(tmp_path / "model.gguf", tiny_model("llama", vocab_size=VOCAB), "llama")

    def interrupt(*args, **kwargs):
        raise KeyboardInterrupt

    monkeypatch.setattr(mx, "save_safetensors", interrupt)
    with pytest.raises(KeyboardInterrupt):
        convert_gguf(tmp_path / "model.gguf", tmp_path / "mlx")
    assert no_folder_left(tmp_path)


# --- command line ---


def run_cli(*args):
    return subprocess.run(
        [sys.executable, str(ROOT / "convert" / "gguf_to_mlx.py"), *map(str, args)],
        capture_output=True,
        text=True,
    )


def test_command_line_converts(tmp_path):
    write_gguf(tmp_path / "model.gguf", tiny_model("qwen2", vocab_size=VOCAB), "qwen2", GGML.Q4_0)
    result = run_cli("--gguf-path", tmp_path / "model.gguf", "--mlx-path", tmp_path / "mlx")
    assert result.returncode == 0, result.stderr
    mlx_lm.load(str(tmp_path / "mlx"))


def test_command_line_error_is_one_line_without_traceback(tmp_path):
    result = run_cli("--gguf-path", tmp_path / "absent.gguf", "--mlx-path", tmp_path / "mlx")
    assert result.returncode == 1
    assert result.stderr == f"error: {tmp_path / 'absent.gguf'}: no such file\n"


def generate_from(path, capfd) -> subprocess.CompletedProcess:
    """`python -m mlx_longheads.generate --model FILE.gguf`, called here: the file is
    converted into the run's cache on first use, or refused."""
    import mlx_longheads.generate as generate

    return run_main(generate.main, "--model", str(path), "--prompt", "hi", capfd=capfd)


@pytest.mark.parametrize(
    "change, message",
    [
        (
            dict(extra={"blk.0.attn_mystery.weight": np.ones((8, 8), np.float32)}),
            "unexpected GGUF tensor blk.0.attn_mystery.weight: convert the original Hugging Face model instead",
        ),
        (dict(leave_out="add_block_count"), "the GGUF metadata lacks llama.block_count: the file is incomplete"),
        (
            dict(metadata={"llama.attention.head_count_kv": [2, 2]}),
            "per-layer llama.attention.head_count_kv is not supported",
        ),
        (
            dict(metadata={"llama.rope.dimension_count": 8}),
            "GGUF models with partial rotary embeddings are not supported",
        ),
    ],
    ids=["unexpected-tensor", "missing-metadata", "per-layer-metadata", "partial-rotary"],
)
def test_the_cli_refuses_a_gguf_file_it_cannot_convert(change, message, tmp_path, monkeypatch, capfd):
    """A llama GGUF file with one thing the converter cannot honour: exit status 1, the
    reason on one line, and nothing left in the cache."""
    change = dict(change)
    if "leave_out" in change:  # the writer skips that key
        monkeypatch.setattr(GGUFWriter, change.pop("leave_out"), lambda self, value: None)
    write_gguf(tmp_path / "model.gguf", tiny_model("llama", vocab_size=VOCAB), "llama", **change)
    assert_one_line_error(generate_from(tmp_path / "model.gguf", capfd), message)
    assert not list(cache_dir().glob("*model-*")), "a partial conversion was left in the cache"
