"""Convert a GGUF file (llama.cpp's format) into an MLX model folder for `mlx_lm.load`.

Q8_0, Q4_0 and Q4_1 blocks are repacked bit for bit into MLX's affine quantization
(group size 32), so the model stays quantized and holds the weights llama.cpp uses.
Every other quantization (K-quants, Q5_0, IQ...) is decoded to float16 by the `gguf`
package: mx.load decodes Q4_K wrongly and refuses whole files holding Q5_0 or IQ
tensors. llama.cpp's converter interleaves the query and key rows of llama models for
its rope; they are put back, so the folder holds an ordinary mlx-lm model.
"""

from collections import Counter
from pathlib import Path
from typing import Any, Dict, Optional, Tuple, Union

import mlx.core as mx
import numpy as np
from gguf import GGML_QUANT_SIZES, GGUFReader, ReaderTensor
from gguf import GGMLQuantizationType as GGML
from gguf.quants import dequantize
from mlx_lm.utils import load_model, save_config

from .atomic import atomic_folder
from .gguf_tokenizer import gguf_tokenizer
from .support import ModelError, require_architecture

GROUP_SIZE = 32  # the block length of Q8_0, Q4_0 and Q4_1
REPACKED = {GGML.Q8_0: 8, GGML.Q4_0: 4, GGML.Q4_1: 4}  # GGML type -> MLX bits
# llama.cpp writes Mistral models as llama, and interleaves the Q/K rows of llama only.
ARCHITECTURES = ("llama", "qwen2", "qwen3")

# GGUF tensor names -> mlx-lm names, per layer (blk.N.) and for the whole model.
LAYER_NAMES = {
    "attn_norm": "input_layernorm",
    "attn_q": "self_attn.q_proj",
    "attn_k": "self_attn.k_proj",
    "attn_v": "self_attn.v_proj",
    "attn_output": "self_attn.o_proj",
    "attn_q_norm": "self_attn.q_norm",
    "attn_k_norm": "self_attn.k_norm",
    "ffn_norm": "post_attention_layernorm",
    "ffn_gate": "mlp.gate_proj",
    "ffn_up": "mlp.up_proj",
    "ffn_down": "mlp.down_proj",
}
MODEL_NAMES = {"token_embd": "model.embed_tokens", "output_norm": "model.norm", "output": "lm_head"}


def read_gguf(path: Path) -> Tuple[Dict[str, Any], Dict[str, ReaderTensor]]:
    """The metadata (key -> value) and the tensors (by name) of a GGUF file."""
    if not path.is_file():
        raise ModelError(f"{path}: no such file")
    try:
        reader = GGUFReader(path)
        check_layout(reader)
        # Strings are decoded here, not by the reader: a flipped byte fails in contents().
        meta = {key: field.contents() for key, field in reader.fields.items()}
    except (ValueError, IndexError, KeyError, OSError) as e:
        raise ModelError(
            f"{path} is not a complete GGUF file (truncated or corrupt: {e}): download it again"
        ) from e
    return meta, {tensor.name: tensor for tensor in reader.tensors}


def check_layout(reader: GGUFReader) -> None:
    """Tensors start on the file's alignment and do not overlap, as llama.cpp writes them.

    The reader checks neither: a flipped byte in a tensor's offset would otherwise
    convert silently, reading part of the next tensor as its weights.
    """
    end = reader.data_offset
    for tensor in sorted(reader.tensors, key=lambda t: t.data_offset):
        start = tensor.data_offset
        if start < end or (start - reader.data_offset) % reader.alignment:
            raise ValueError(f"tensor {tensor.name} is misplaced at byte {start}")
        end = start + tensor.n_bytes


def mlx_name(gguf_name: str) -> str:
    """`blk.3.attn_q.weight` -> `model.layers.3.self_attn.q_proj.weight`."""
    stem, _, param = gguf_name.rpartition(".")
    if stem.startswith("blk."):
        _, layer, short = stem.split(".", 2)
        if short in LAYER_NAMES:
            return f"model.layers.{layer}.{LAYER_NAMES[short]}.{param}"
    elif stem in MODEL_NAMES:
        return f"{MODEL_NAMES[stem]}.{param}"
    if stem == "rope_freqs":
        raise ModelError(
            "GGUF files with rope_freqs (Llama 3.1-style rope scaling) are not supported: "
            "convert the original Hugging Face model instead"
        )
    raise ModelError(
        f"unexpected GGUF tensor {gguf_name}: convert the original Hugging Face model instead"
    )


def _float32(value: float) -> float:
    """GGUF stores float32: 1e-05 comes back as 9.999999747e-06; keep the short spelling."""
    return float(str(np.float32(value)))


def gguf_config(meta: Dict[str, Any], tensors: Dict[str, ReaderTensor]) -> Dict[str, Any]:
    """The config.json of the model, from the metadata llama.cpp wrote."""
    arch = meta.get("general.architecture")
    require_architecture(arch, "GGUF file", ARCHITECTURES)

    def get(key: str, default: Any = None) -> Any:
        value = meta.get(f"{arch}.{key}", default)
        if value is None:
            raise ModelError(f"the GGUF metadata lacks {arch}.{key}: the file is incomplete")
        if isinstance(value, list):
            raise ModelError(f"per-layer {arch}.{key} is not supported")
        return value

    if "token_embd.weight" not in tensors:
        raise ModelError("the GGUF file has no token_embd.weight: it is not a whole model")
    hidden, heads = get("embedding_length"), get("attention.head_count")
    head_dim = get("attention.key_length", hidden // heads)
    if get("rope.dimension_count", head_dim) != head_dim:
        raise ModelError("GGUF models with partial rotary embeddings are not supported")
    config = {
        "model_type": arch,
        "hidden_size": hidden,
        "num_hidden_layers": get("block_count"),
        "intermediate_size": get("feed_forward_length"),
        "num_attention_heads": heads,
        "num_key_value_heads": get("attention.head_count_kv", heads),
        "head_dim": head_dim,
        "rms_norm_eps": _float32(get("attention.layer_norm_rms_epsilon")),
        "rope_theta": _float32(get("rope.freq_base", 10000.0)),
        "max_position_embeddings": get("context_length"),
        "vocab_size": int(tensors["token_embd.weight"].shape[-1]),
        "tie_word_embeddings": "output.weight" not in tensors,
        "attention_bias": "blk.0.attn_q.bias" in tensors,
    }
    scaling = meta.get(f"{arch}.rope.scaling.type", "none")
    if scaling == "linear":
        factor = _float32(get("rope.scaling.factor"))
        config["rope_scaling"] = {"type": "linear", "factor": factor}
    elif scaling != "none":
        raise ModelError(
            f"GGUF rope scaling {scaling!r} is not supported: "
            "convert the original Hugging Face model instead"
        )
    if "tokenizer.ggml.bos_token_id" in meta:
        config["bos_token_id"] = meta["tokenizer.ggml.bos_token_id"]
    # Generation stops at end of sequence and, in chat models, at end of turn.
    stops = {meta.get(f"tokenizer.ggml.{role}_token_id") for role in ("eos", "eot")} - {None}
    if stops:
        config["eos_token_id"] = stops.pop() if len(stops) == 1 else sorted(stops)
    return config


def repack(blocks: np.ndarray, qtype: GGML) -> Tuple[np.ndarray, np.ndarray, np.ndarray]:
    """Rows of Q8_0, Q4_0 or Q4_1 blocks as MLX affine (packed weight, scales, biases).

    Q8_0 is d * q (q int8), Q4_0 d * (q - 8), Q4_1 d * q + m (q 0..15); MLX computes
    scale * q + bias with unsigned q, so each block keeps its d and gets a bias, exactly.
    """
    rows = blocks.shape[0]
    blocks = blocks.reshape(rows, -1, GGML_QUANT_SIZES[qtype][1])
    d = blocks[..., :2].copy().view(np.float16)
    if qtype == GGML.Q8_0:
        q = (blocks[..., 2:].view(np.int8).astype(np.int16) + 128).astype(np.uint8)
        bias = d * np.float16(-128)
    else:
        nibbles = blocks[..., 4:] if qtype == GGML.Q4_1 else blocks[..., 2:]
        q = np.concatenate([nibbles & 0x0F, nibbles >> 4], axis=-1)  # values 0-15, then 16-31
        q = q[..., 0::2] | (q[..., 1::2] << 4)  # MLX: the first of two values in the low bits
        if qtype == GGML.Q4_1:
            bias = blocks[..., 2:4].copy().view(np.float16)
        else:
            bias = d * np.float16(-8)
    return q.reshape(rows, -1).view(np.uint32), d[..., 0], bias[..., 0]


def _arrays(tensor: ReaderTensor, name: str, dtype: Optional[mx.Dtype]) -> Dict[str, mx.array]:
    """One GGUF tensor as the MLX arrays of parameter `name`."""
    qtype = tensor.tensor_type
    if qtype in REPACKED:
        layer = name.rpartition(".")[0]
        parts = repack(np.asarray(tensor.data), qtype)
        keys = (f"{layer}.weight", f"{layer}.scales", f"{layer}.biases")
        return {key: mx.array(a) for key, a in zip(keys, parts)}
    if qtype in (GGML.F32, GGML.F16):
        array = mx.array(np.asarray(tensor.data))
    else:
        try:
            values = dequantize(tensor.data, qtype)
        except NotImplementedError as e:
            raise ModelError(
                f"GGUF tensor {tensor.name} has type {qtype.name}, which cannot be decoded: "
                "use a file quantized to F16, Q8_0, Q4_0, Q4_1 or a K-quant, "
                "or the original Hugging Face model"
            ) from e
        array = mx.array(values).astype(mx.bfloat16 if qtype == GGML.BF16 else mx.float16)
    return {name: array if dtype is None else array.astype(dtype)}


def _unpermute(w: mx.array, heads: int) -> mx.array:
    """Undo llama.cpp's permute(w, heads): reshape(heads, 2, d/2, ...).swapaxes(1, 2).

    It moves whole rows, so it applies alike to weights, packed weights, scales and biases.
    """
    return w.reshape(heads, -1, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def gguf_weights(
    tensors: Dict[str, ReaderTensor], config: Dict[str, Any], dtype: Optional[mx.Dtype] = None
) -> Dict[str, mx.array]:
    """All parameters under their mlx-lm names, with llama's Q/K rows back in order."""
    heads = {"q_proj": config["num_attention_heads"], "k_proj": config["num_key_value_heads"]}
    weights = {}
    for gguf_name, tensor in tensors.items():
        for name, array in _arrays(tensor, mlx_name(gguf_name), dtype).items():
            projection = name.split(".")[-2]
            if config["model_type"] == "llama" and projection in heads:
                array = _unpermute(array, heads[projection])
            weights[name] = array
    return weights


def quantization(tensors: Dict[str, ReaderTensor]) -> Optional[Dict[str, Any]]:
    """mlx-lm's quantization config: the most common bits, and the layers that differ."""
    bits = {
        mlx_name(name).rpartition(".")[0]: REPACKED[t.tensor_type]
        for name, t in tensors.items()
        if t.tensor_type in REPACKED
    }
    if not bits:
        return None
    common = Counter(bits.values()).most_common(1)[0][0]
    config = {"group_size": GROUP_SIZE, "bits": common, "mode": "affine"}
    for layer, b in bits.items():
        if b != common:
            config[layer] = {"group_size": GROUP_SIZE, "bits": b, "mode": "affine"}
    return config


def convert_gguf(
    gguf_path: Union[str, Path], mlx_path: Union[str, Path], dtype: Optional[str] = None
) -> Path:
    """Write the MLX folder of a GGUF file; return its path.

    dtype: float16, bfloat16 or float32 for the unquantized weights (default: F32, F16
    and BF16 tensors as they are, decoded ones float16).
    """
    gguf_path, mlx_path = Path(gguf_path), Path(mlx_path)
    meta, tensors = read_gguf(gguf_path)
    config = gguf_config(meta, tensors)
    quant = quantization(tensors)
    if quant is not None:
        config["quantization"] = quant
    tokenizer = gguf_tokenizer(meta)
    with atomic_folder(mlx_path) as out:
        weights = gguf_weights(tensors, config, None if dtype is None else getattr(mx, dtype))
        out.mkdir()
        mx.save_safetensors(str(out / "model.safetensors"), weights, metadata={"format": "mlx"})
        save_config(config, out / "config.json")
        tokenizer.save_pretrained(out)
        try:
            load_model(out, lazy=True, strict=True)
        except ValueError as e:
            raise ModelError(
                f"{gguf_path}: the weights do not fit mlx-lm's {config['model_type']}: {e}"
            ) from e
    return mlx_path
