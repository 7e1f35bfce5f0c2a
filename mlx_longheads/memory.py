"""What a run will need, checked before it starts rather than discovered at token 70k."""

import os
from typing import Optional

import mlx.core as mx
import mlx.nn as nn
from mlx.utils import tree_flatten

from .cache import UNDO_CHUNKS
from .config import LongHeadsConfig
from .models import head_dim as model_head_dim

# Activations, gathered windows and allocator slack during prefill.
WORKSPACE_BYTES = 1 << 30


def weight_bytes(model: nn.Module) -> int:
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def kv_element_bytes(itemsize: int, longheads: Optional[LongHeadsConfig]) -> float:
    """Bytes per stored key or value element: the float itemsize, or with kv_bits the
    packed bits plus a float scale and bias per group."""
    if longheads is None or longheads.kv_bits is None:
        return itemsize
    return longheads.kv_bits / 8 + 2 * itemsize / longheads.kv_group_size


def cache_bytes(model: nn.Module, tokens: int, longheads: Optional[LongHeadsConfig]) -> int:
    """Keys and values (plus LongHeads' representations, 1 + UNDO_CHUNKS chunks of
    queries and, with a selection that links layers, layer 0's noted choices:
    float32 per token; and its token ids, int32, where the selection notes them)."""
    args = model.args
    heads, kv_heads = args.num_attention_heads, args.num_key_value_heads
    head_dim = model_head_dim(args)
    # The cache holds activations, whose dtype the norms' weights share.
    itemsize = model.layers[0].input_layernorm.weight.itemsize
    per_token = 2 * kv_heads * head_dim * kv_element_bytes(itemsize, longheads)
    extra = 0
    if longheads is not None:
        w = longheads.chunk_size
        per_token += heads * head_dim / w * itemsize
        extra = (1 + UNDO_CHUNKS) * heads * w * head_dim * itemsize
    choices = 0
    if longheads is not None and longheads.links_layers:
        choices = tokens * (1 + longheads.shared_slots + longheads.notes_tokens) * 4
    return int(len(model.layers) * (per_token * tokens + extra) + choices)


def available_bytes() -> int:
    """Memory this process can use: the GPU working set on Metal, free RAM elsewhere."""
    if mx.metal.is_available():
        return mx.device_info()["max_recommended_working_set_size"]
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def gigabytes(n: float) -> str:
    return f"{n / 1e9:.1f} GB"
