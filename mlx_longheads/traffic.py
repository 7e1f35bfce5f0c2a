"""What one decoded token reads from memory, by part.

On Apple silicon decoding is bound by memory traffic: a token costs about the bytes it
reads over the machine's bandwidth. This project cannot time a Mac, so the bench
reports these counts beside its CPU times, at the shapes of a model users run
(`LLAMA3_8B`) as well as the bench's own. They follow the code's reads
(`longheads.attend_groups`, `select_chunks`, `select_chunks_pooled`,
`pooled_attention`); tests/test_traffic.py counts the arrays those touch on a small
model and checks them against `decode_reads`. Writes (a token's key, value and query)
and activations are left out: a few kilobytes against megabytes.
"""

from dataclasses import dataclass
from typing import Dict, Optional

import mlx.nn as nn
from mlx.utils import tree_flatten

from .config import LongHeadsConfig
from .memory import kv_element_bytes
from .models import head_dim

PARTS = ("weights", "keys", "values", "representations", "pooled keys")


@dataclass(frozen=True)
class ModelShape:
    """What the reads of a decoded token depend on."""

    layers: int
    heads: int
    kv_heads: int
    head_dim: int
    weight_bytes: float  # read once per forward pass: the layers and the output head
    itemsize: int  # bytes of an activation element (K/V, representations)
    trained_length: int


def llama3_8b() -> ModelShape:
    """Llama-3-8B with 4-bit weights (group 64, a float16 scale and bias per group: 4.5
    bits a weight) and float16 keys and values. The embedding table is read one row a
    token; the untied output head whole."""
    hidden, intermediate, vocab, layers, kv_width = 4096, 14336, 128256, 32, 1024
    per_layer = hidden * (2 * hidden + 2 * kv_width) + 3 * hidden * intermediate
    weights = (layers * per_layer + vocab * hidden) * 4.5 / 8
    return ModelShape(layers, 32, 8, 128, weights, 2, 8192)


LLAMA3_8B = llama3_8b()


def read_per_pass(model: nn.Module) -> int:
    """Weight bytes a forward pass of one token reads: all but an untied embedding table
    (a tied one is the output head, read whole)."""
    total = sum(v.nbytes for _, v in tree_flatten(model.parameters()))
    if "lm_head" in model:
        total -= sum(v.nbytes for _, v in tree_flatten(model.model.embed_tokens.parameters()))
    return total


def shape_of(model: nn.Module) -> ModelShape:
    """The shape of a loaded mlx-lm model (stock or LongHeads)."""
    args = model.args
    return ModelShape(
        layers=len(model.layers),
        heads=args.num_attention_heads,
        kv_heads=args.num_key_value_heads,
        head_dim=head_dim(args),
        weight_bytes=read_per_pass(model),
        itemsize=model.layers[0].input_layernorm.weight.itemsize,
        trained_length=args.max_position_embeddings,
    )


def decode_reads(shape: ModelShape, config: Optional[LongHeadsConfig], context: int) -> Dict[str, float]:
    """Bytes one token decoded after `context` cached tokens reads, by part (`PARTS`).

    config None: stock attention, every key and value. LongHeads, resolved for `shape`:
    up to F the chunks 0..own once per KV head (stock attention's reads, in whole
    chunks); past F, per pass, each selecting head's k chunks of keys and values, the
    representations of the complete chunks where a head ranks them itself, and every
    complete chunk's keys once per KV head for the pooled attention: in every layer of
    "two_pass_carry"'s first pass, in the filter layer alone with "one_pass_filter",
    "two_pass_prompt", "one_pass_prompt" and "one_pass_reread" (whose decoded tokens make
    one pass; the last's question, read again once per prompt, is not a decoded token's).
    """
    D, Hk, kv_item = shape.head_dim, shape.kv_heads, kv_element_bytes(shape.itemsize, config)
    reads = dict.fromkeys(PARTS, 0.0)
    reads["weights"] = shape.weight_bytes
    if config is None:
        reads["keys"] = reads["values"] = shape.layers * Hk * (context + 1) * D * kv_item
        return reads
    w, k = config.chunk_size, config.num_chunks
    own, complete = context // w, (context + 1) // w  # the token's chunk; complete ones after it
    if own < config.full_chunks:
        reads["keys"] = reads["values"] = shape.layers * Hk * (own + 1) * w * D * kv_item
        return reads
    selecting = Hk if config.selection == "kv_head" else shape.heads
    ranks_itself = not config.links_layers or k - 3 > config.shared_slots
    passes = config.token_passes
    per_layer = dict(
        keys=selecting * k * w * D * kv_item,
        values=selecting * k * w * D * kv_item,
        representations=shape.heads * complete * D * shape.itemsize if ranks_itself else 0,
    )
    for part, size in per_layer.items():
        reads[part] = passes * shape.layers * size
    reads["weights"] = passes * shape.weight_bytes
    measuring = shape.layers if passes == 2 else int(config.links_layers)
    reads["pooled keys"] = measuring * Hk * complete * w * D * kv_item
    return reads
