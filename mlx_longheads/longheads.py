"""The LongHeads attention rule (arXiv 2402.10685), read top to bottom.

For a query at absolute position t, own = t // w, o = t % w, k = L / w:
  - own < k: ordinary causal attention over tokens 0..t (it fits in L keys);
  - otherwise the head picks chunks S = [0] + sorted(top_(k-3) of chunks 1..own-2 by
    q_t . rep_c) + [own - 1], attends to their w * (k - 1) keys followed by its own
    chunk's tokens up to t, and all of them get contiguous positions 0 .. (k-1)*w + o.
No head ever sees more than L keys or a distance of L or more. The score uses the query
after projection (and q_norm) but before RoPE. Keys are stored before RoPE and rotated
at their window position when gathered.

Shapes: B batch, H query heads, Hk KV heads, D head dim, w chunk size, G query groups
(queries that share one selection), g queries per group.
"""

from typing import Callable, Optional

import mlx.core as mx

from .cache import LongHeadsCache
from .config import LongHeadsConfig

RoPE = Callable[..., mx.array]  # rope(x, offset=int | mx.array): the model's own RoPE

# Upper bound on the gathered keys and values of one attention call (bytes); queries
# are processed in blocks of groups that fit it, so prefill memory stays flat.
GATHER_BUDGET = 256 * 2**20


def chunk_representations(
    queries: mx.array, keys: mx.array, values: mx.array, rope: RoPE, scale: float, w: int
) -> mx.array:
    """rep_c of n complete chunks: an attention-pooled key per chunk and query head.

    queries [B, H, n*w, D], keys and values [B, Hk, n*w, D] -> [B, H, n, D].
      q~_i = R(q_i, i mod w), k~_i = R(k_i, i mod w)
      A_i = sum_j softmax_j(q~_i . k~_j * scale) v_j    (bidirectional inside the chunk)
      qc = mean_i A_i
      rep = sum_j softmax_j(qc . k~_j * scale) k~_j
    """
    B, H, N, D = queries.shape
    n = N // w

    def per_chunk(x: mx.array) -> mx.array:  # [B, h, n*w, d] -> [B*n, h, w, d]
        h, d = x.shape[1], x.shape[3]
        x = x.reshape(B, h, n, w, d).transpose(0, 2, 1, 3, 4)
        return x.reshape(B * n, h, w, d)

    q = rope(per_chunk(queries))
    k = rope(per_chunk(keys))
    attended = mx.fast.scaled_dot_product_attention(
        q, k, per_chunk(values), scale=scale
    )
    pooled_query = attended.mean(axis=2, keepdims=True)
    rep = mx.fast.scaled_dot_product_attention(pooled_query, k, k, scale=scale)
    return rep.reshape(B, n, H, D).transpose(0, 2, 1, 3)


def select_chunks(
    query_sums: mx.array,
    representations: mx.array,
    own: mx.array,
    k: int,
    n_kv_heads: Optional[int] = None,
) -> mx.array:
    """The k chunk indices each head of each group attends to, in order.

    query_sums [B, H, G, D]: the group's raw queries summed (a sum of scores is the
    score of the summed query), in float32 where float16 could overflow. representations [B, H, C, D] of the C complete chunks.
    own [G]: the group's own chunk, with own >= k. n_kv_heads: select once per KV head,
    summing the scores of its query heads. Returns uint32 [B, Hs, G, k]:
    [0, top_(k-3) of 1..own-2 sorted, own-1, own].
    """
    reps = representations.astype(query_sums.dtype)
    scores = query_sums @ reps.swapaxes(-1, -2)  # [B, H, G, C]
    if n_kv_heads is not None:
        B, H, G, C = scores.shape
        scores = scores.reshape(B, n_kv_heads, H // n_kv_heads, G, C).sum(axis=2)
    candidates = mx.arange(scores.shape[-1])
    allowed = (candidates >= 1) & (candidates[None] <= own[:, None] - 2)  # [G, C]
    scores = mx.where(allowed, scores, -mx.inf)
    top = mx.argpartition(-scores, kth=k - 4, axis=-1)[..., : k - 3]
    top = mx.sort(top, axis=-1)
    ends = mx.broadcast_to(own[:, None] + mx.array([-1, 0]), (*top.shape[:-1], 2))
    first = mx.zeros((*top.shape[:-1], 1), mx.uint32)
    return mx.concatenate([first, top, ends.astype(mx.uint32)], axis=-1)


def gather_chunks(chunked: mx.array, slots: mx.array) -> mx.array:
    """Keys or values of the selected chunks, concatenated in slot order.

    chunked [B, Hk, n_chunks, w, D] (a contiguous cache buffer), slots [B, Hs, G, k]
    with Hs = Hk or H -> [B, Hs, G, k*w, D].
    """
    B, Hk, _, w, D = chunked.shape
    _, Hs, G, k = slots.shape
    index = slots.reshape(B, Hk, Hs // Hk, G * k)[..., None, None]
    gathered = mx.take_along_axis(chunked[:, :, None], index, axis=3)
    return gathered.reshape(B, Hs, G, k * w, D)


def attend_groups(
    queries: mx.array,
    own: mx.array,
    first_offset: mx.array,
    cache: LongHeadsCache,
    rope: RoPE,
    scale: float,
    config: LongHeadsConfig,
) -> mx.array:
    """Selective attention for G groups of g consecutive queries in chunks own >= k.

    queries [B, H, G, g, D] before RoPE; group i's queries sit at in-chunk offsets
    first_offset[i] + 0..g-1 of chunk own[i]. Returns [B, H, G, g, D].
    """
    B, H, G, g, D = queries.shape
    w, k = config.chunk_size, config.num_chunks
    n_kv_heads = cache.keys.shape[1]
    per_kv_head = n_kv_heads if config.selection == "kv_head" else None
    representations = cache.representations[:, :, : cache.complete_chunks]
    query_sums = queries.astype(mx.float32).sum(axis=3)
    slots = select_chunks(query_sums, representations, own, k, per_kv_head)

    def fold(x: mx.array) -> mx.array:  # [B, h, G, n, d] -> [B*G, h, n, d]
        return x.swapaxes(1, 2).reshape(B * G, x.shape[1], x.shape[3], x.shape[4])

    keys = rope(fold(gather_chunks(cache.chunked(cache.keys), slots)))
    values = fold(gather_chunks(cache.chunked(cache.values), slots))
    query_start = (k - 1) * w + first_offset  # [G]: window position of each group's first query
    q = rope(fold(queries), offset=mx.tile(query_start, B))
    query_positions = query_start[:, None] + mx.arange(g)  # [G, g]
    mask = mx.arange(k * w) <= query_positions[..., None]  # [G, g, k*w]
    mask = mx.tile(mask[:, None], (B, 1, 1, 1))
    out = mx.fast.scaled_dot_product_attention(q, keys, values, scale=scale, mask=mask)
    return out.reshape(B, G, H, g, -1).swapaxes(1, 2)


def selective_attention(
    queries: mx.array,
    start: int,
    cache: LongHeadsCache,
    rope: RoPE,
    scale: float,
    config: LongHeadsConfig,
) -> mx.array:
    """LongHeads attention for queries [B, H, T, D] at positions start.. (all >= L)."""
    B, H, T, D = queries.shape
    w = config.chunk_size
    skip = start % w  # the first chunk's tokens before this call
    if config.prefill == "exact":
        positions = mx.arange(start, start + T)
        groups = queries[:, :, :, None]
        own, first_offset = positions // w, positions % w
    elif start // w == (start + T - 1) // w:
        # All queries in one chunk (decode, or a short call): one group of T.
        groups = queries[:, :, None]
        own = mx.array([start // w])
        first_offset = mx.array([start % w])
    else:
        # One group per chunk touched, padded to whole chunks with zero queries (which
        # add nothing to a group's score); their outputs are dropped below.
        G = (start + T - 1) // w - start // w + 1
        padded = mx.pad(queries, [(0, 0), (0, 0), (skip, G * w - T - skip), (0, 0)])
        groups = padded.reshape(B, H, G, w, D)
        own = mx.arange(start // w, start // w + G)
        first_offset = mx.zeros((G,), mx.int32)
    G, g = groups.shape[2], groups.shape[3]
    n_heads = H if config.selection == "query_head" else cache.keys.shape[1]
    bytes_per_group = 2 * n_heads * config.attention_length * D * queries.itemsize
    block = max(1, GATHER_BUDGET // bytes_per_group)
    outputs = [
        attend_groups(
            groups[:, :, i : i + block],
            own[i : i + block],
            first_offset[i : i + block],
            cache,
            rope,
            scale,
            config,
        )
        for i in range(0, G, block)
    ]
    out = mx.concatenate(outputs, axis=2).reshape(B, H, G * g, -1)
    if G * g == T:
        return out
    return out[:, :, skip : skip + T]


def full_attention(
    queries: mx.array, start: int, cache: LongHeadsCache, rope: RoPE, scale: float
) -> mx.array:
    """Ordinary causal attention for queries at positions start.. whose context fits in L."""
    end = start + queries.shape[2]
    keys = rope(cache.keys[:, :, :end])
    q = rope(queries, offset=start)
    mask = "causal" if queries.shape[2] > 1 else None
    return mx.fast.scaled_dot_product_attention(
        q, keys, cache.values[:, :, :end], scale=scale, mask=mask
    )


def longheads_attention(
    queries: mx.array,
    keys: mx.array,
    values: mx.array,
    cache: LongHeadsCache,
    rope: RoPE,
    scale: float,
    config: LongHeadsConfig,
) -> mx.array:
    """One layer's attention for T new tokens, updating the cache.

    queries [B, H, T, D], keys and values [B, Hk, T, D], all before RoPE.
    Returns [B, H, T, Dv].
    """
    start = cache.offset
    completed = cache.append(queries, keys, values)
    if completed is not None:
        cache.add_representations(
            chunk_representations(*completed, rope, scale, config.chunk_size)
        )
    T = queries.shape[2]
    n_full = min(max(config.attention_length - start, 0), T)
    outputs = []
    if n_full:
        outputs.append(full_attention(queries[:, :, :n_full], start, cache, rope, scale))
    if n_full < T:
        outputs.append(
            selective_attention(
                queries[:, :, n_full:], start + n_full, cache, rope, scale, config
            )
        )
    return outputs[0] if len(outputs) == 1 else mx.concatenate(outputs, axis=2)
