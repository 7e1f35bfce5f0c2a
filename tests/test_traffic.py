"""What a decoded token reads: `traffic.decode_reads` against the arrays the code touches."""

from collections import Counter

import mlx.core as mx
import numpy as np
import pytest
from mlx.utils import tree_flatten

from conftest import tiny_model
from mlx_longheads import longheads
from mlx_longheads.config import LongHeadsConfig
from mlx_longheads.models import LongHeadsAttention, apply_longheads
from mlx_longheads.traffic import LLAMA3_8B, PARTS, decode_reads, shape_of


def bytes_per_token(buffer) -> float:
    """Bytes of one token's key (or value) of one KV head in a cache buffer, the
    scales and biases of quantized ones included."""
    arrays = buffer if isinstance(buffer, tuple) else (buffer,)
    B, Hk, capacity = arrays[0].shape[:3]
    return sum(a.nbytes for a in arrays) / (B * Hk * capacity)


def counting_reads(monkeypatch, model) -> Counter:
    """A Counter the library's reads add their bytes to from now on: the cache rows each
    window product multiplies (keys, values), the representations a head ranks, every
    complete chunk's keys where a first pass measures its pooled attention, and the
    forward passes (calls of layer 0's attention)."""
    reads = Counter()
    product, select, select_pooled = longheads.chunk_product, longheads.select_chunks, longheads.select_chunks_pooled
    pooled_attention, attention_call = longheads.pooled_attention, LongHeadsAttention.__call__
    first_layer = model.layers[0].self_attn

    def chunk_product(x, buffer, rows, cache, transpose):
        reads["keys" if transpose else "values"] += rows.size * cache.chunk_size * bytes_per_token(buffer)
        return product(x, buffer, rows, cache, transpose)

    def select_chunks(query_sums, representations, *args):
        reads["representations"] += representations.nbytes
        return select(query_sums, representations, *args)

    def select_chunks_pooled(query_sums, representations, pooled, own, k, shared):
        if k - 3 > shared:  # per-head slots besides the shared ones
            reads["representations"] += representations.nbytes
        return select_pooled(query_sums, representations, pooled, own, k, shared)

    def counted_pooled_attention(queries, cache, *args):
        keys = cache.complete_chunks * cache.chunk_size * cache.kv_heads  # measured where a relay asks
        reads["pooled keys"] += keys * bytes_per_token(cache.keys)
        return pooled_attention(queries, cache, *args)

    def counted_call(attention, x, mask=None, cache=None):
        reads["passes"] += attention is first_layer
        return attention_call(attention, x, mask, cache)

    monkeypatch.setattr(longheads, "chunk_product", chunk_product)
    monkeypatch.setattr(longheads, "select_chunks", select_chunks)
    monkeypatch.setattr(longheads, "select_chunks_pooled", select_chunks_pooled)
    monkeypatch.setattr(longheads, "pooled_attention", counted_pooled_attention)
    monkeypatch.setattr(LongHeadsAttention, "__call__", counted_call)
    return reads


@pytest.mark.parametrize(
    "selection, kv_bits",
    [("two_pass_carry", None), ("one_pass_filter", None), ("two_pass_prompt", None), ("one_pass_prompt", None),
     ("query_head", None),
     ("kv_head", None), ("two_pass_carry", 8)],
)
@pytest.mark.parametrize("context", [40, 100, 103])  # inside F; past it; a token completing a chunk
def test_decode_reads_are_what_the_code_reads(monkeypatch, selection, kv_bits, context):
    """A tiny model (F = 64 > L = 48, chunks of 8; head dim 32 so that keys and values
    quantize) prefilled with `context` tokens decodes chunk_size + 1 tokens: the bytes
    its attention reads, part by part, and its passes times the weights a pass reads,
    are what `decode_reads` gives those tokens."""
    model = tiny_model("qwen3", head_dim=32)
    config = LongHeadsConfig(8, 48, selection=selection, kv_bits=kv_bits, full_attention_length=64)
    config = apply_longheads(model, config)
    cache = model.make_cache()
    tokens = mx.array(np.random.default_rng(0).integers(0, 97, size=(1, context + 9)))
    mx.eval(model(tokens[:, :context], cache=cache))
    reads, expected = counting_reads(monkeypatch, model), Counter()
    for t in range(context, context + 9):
        mx.eval(model(tokens[:, t : t + 1], cache=cache))
        expected.update(decode_reads(shape_of(model), config, t))
    shape = shape_of(model)
    assert reads["passes"] * shape.weight_bytes == pytest.approx(expected["weights"])
    for part in PARTS[1:]:
        assert reads[part] == pytest.approx(expected[part], rel=1e-9), part
    assert (reads["pooled keys"] > 0) == (config.links_layers and context >= 64)
    assert reads["representations"] > 0 or context < 64


def parameter_bytes(model) -> int:
    return sum(v.nbytes for _, v in tree_flatten(model.parameters()))


def test_a_model_with_its_own_output_head_reads_one_embedding_row_a_token():
    """Untied embeddings: the output head is read whole, the embedding table only at the
    token's row; tied ones are the output head."""
    untied, tied = tiny_model("llama", tie_word_embeddings=False), tiny_model("llama")
    table = untied.model.embed_tokens.weight.nbytes
    assert shape_of(untied).weight_bytes == parameter_bytes(untied) - table
    assert shape_of(tied).weight_bytes == parameter_bytes(tied)


def test_at_llama3_8b_shapes_two_pass_carry_reads_nearly_what_stock_attention_does():
    """The figures the bench reports for Llama-3-8B (4-bit weights, float16 K/V): at
    128k two_pass_carry reads the weights twice and every key once more a token, most of
    stock attention's bytes; one_pass_filter (one layer's keys more than the per-head
    rule) at most 1.15x the per-head rule's, and the prompt readers' decoded token what
    one_pass_filter's reads."""
    resolve = lambda s: LongHeadsConfig(selection=s).resolve(LLAMA3_8B.trained_length, LLAMA3_8B.head_dim)  # noqa: E731
    total = lambda config: sum(decode_reads(LLAMA3_8B, config, 131072).values())  # noqa: E731
    assert 4.0e9 < LLAMA3_8B.weight_bytes < 4.5e9
    assert decode_reads(LLAMA3_8B, resolve("two_pass_carry"), 131072)["weights"] == 2 * LLAMA3_8B.weight_bytes
    assert total(resolve("two_pass_carry")) > 0.8 * total(None)
    assert total(resolve("query_head")) < 0.35 * total(None)
    assert total(resolve("one_pass_filter")) < 1.15 * total(resolve("query_head"))
    for prompt_reader in ("two_pass_prompt", "one_pass_prompt", "one_pass_reread"):
        assert decode_reads(LLAMA3_8B, resolve(prompt_reader), 131072) == decode_reads(LLAMA3_8B, resolve("one_pass_filter"), 131072)
