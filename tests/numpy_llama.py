"""A Llama forward pass in numpy (float64), written from the architecture, to check
converted models against.

It reads a GGUF file by itself, with the gguf package's reader and decoder, and puts
llama.cpp's permuted query and key rows back its own way: llama.cpp stores the rows
of each head interleaved (0, d/2, 1, d/2+1, ...), so the even rows are the first half.
"""

from pathlib import Path
from typing import Dict, Tuple

import numpy as np

import reference
from reference import softmax
from gguf import GGUFReader
from gguf.quants import dequantize


def read_llama(path: Path) -> Tuple[Dict[str, np.ndarray], Dict[str, float]]:
    """Weights by GGUF name, decoded to float64 and un-permuted, and the hyperparameters."""
    reader = GGUFReader(path)
    field = {key: f.contents() for key, f in reader.fields.items() if key.startswith("llama.")}
    config = {
        "layers": field["llama.block_count"],
        "heads": field["llama.attention.head_count"],
        "kv_heads": field["llama.attention.head_count_kv"],
        "eps": field["llama.attention.layer_norm_rms_epsilon"],
        "base": field["llama.rope.freq_base"],
    }
    weights = {}
    for tensor in reader.tensors:
        w = dequantize(tensor.data, tensor.tensor_type).astype(np.float64)
        if tensor.name.endswith(("attn_q.weight", "attn_k.weight")):
            heads = config["heads"] if "attn_q" in tensor.name else config["kv_heads"]
            per_head = w.reshape(heads, -1, w.shape[-1])
            w = np.concatenate([per_head[:, 0::2], per_head[:, 1::2]], axis=1).reshape(w.shape)
        weights[tensor.name] = w
    return weights, config


def rms_norm(x: np.ndarray, weight: np.ndarray, eps: float) -> np.ndarray:
    return x / np.sqrt(np.mean(x * x, axis=-1, keepdims=True) + eps) * weight


def rope(x: np.ndarray, base: float) -> np.ndarray:
    """x [T, heads, D] at positions 0..T-1."""
    return reference.rope(x, np.arange(len(x))[:, None], base)


def llama_logits(weights: Dict[str, np.ndarray], config: Dict[str, float], tokens) -> np.ndarray:
    """Logits [T, vocab] of a causal pass over tokens; GQA, SwiGLU, tied or untied output."""
    H, Hk, eps = config["heads"], config["kv_heads"], config["eps"]
    x = weights["token_embd.weight"][np.asarray(tokens)]
    T = len(x)
    causal = np.triu(np.full((T, T), -np.inf), 1)
    for i in range(config["layers"]):
        w = {name[len(f"blk.{i}.") :]: v for name, v in weights.items() if name.startswith(f"blk.{i}.")}
        h = rms_norm(x, w["attn_norm.weight"], eps)
        q = (h @ w["attn_q.weight"].T).reshape(T, H, -1)
        k = (h @ w["attn_k.weight"].T).reshape(T, Hk, -1)
        v = (h @ w["attn_v.weight"].T).reshape(T, Hk, -1)
        q, k = rope(q, config["base"]), rope(k, config["base"])
        k, v = np.repeat(k, H // Hk, axis=1), np.repeat(v, H // Hk, axis=1)
        scores = np.einsum("thd,shd->hts", q, k) / np.sqrt(q.shape[-1]) + causal
        attended = np.einsum("hts,shd->thd", softmax(scores), v).reshape(T, -1)
        x = x + attended @ w["attn_output.weight"].T
        h = rms_norm(x, w["ffn_norm.weight"], eps)
        gate = h @ w["ffn_gate.weight"].T
        x = x + (gate / (1 + np.exp(-gate)) * (h @ w["ffn_up.weight"].T)) @ w["ffn_down.weight"].T
    x = rms_norm(x, weights["output_norm.weight"], eps)
    return x @ weights.get("output.weight", weights["token_embd.weight"]).T
