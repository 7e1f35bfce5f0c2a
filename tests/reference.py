"""A naive numpy LongHeads, written from the rule in the design note, for the tests."""

import numpy as np


def rope(x: np.ndarray, positions: np.ndarray, base: float) -> np.ndarray:
    """Non-traditional RoPE (halves rotated), as mlx's nn.RoPE with traditional=False."""
    D = x.shape[-1]
    freqs = base ** (-np.arange(0, D, 2) / D)
    angles = np.asarray(positions, dtype=np.float64)[..., None] * freqs
    cos, sin = np.cos(angles), np.sin(angles)
    x1, x2 = x[..., : D // 2], x[..., D // 2 :]
    return np.concatenate([x1 * cos - x2 * sin, x1 * sin + x2 * cos], axis=-1)


def softmax(x: np.ndarray) -> np.ndarray:
    e = np.exp(x - x.max(axis=-1, keepdims=True))
    return e / e.sum(axis=-1, keepdims=True)


def representation(q, k, v, scale, base):
    """rep of one chunk for one query head: q [w, D], k and v [w, D] before RoPE."""
    local = np.arange(len(q))
    qt, kt = rope(q, local, base), rope(k, local, base)
    attended = softmax(qt @ kt.T * scale) @ v
    pooled = attended.mean(axis=0)
    return softmax(pooled @ kt.T * scale) @ kt


def longheads(q, k, v, w, L, scale, base, group_of=None, per_kv_head=False):
    """Outputs [H, N, D] for queries q [H, N, D] and keys, values [Hk, N, D].

    group_of[t]: queries with the same value share one selection, scored by the sum
    of their scores (None: each token selects alone). per_kv_head: the scores of the
    query heads of a KV head are summed and the KV head selects once.
    """
    H, N, D = q.shape
    Hk = k.shape[0]
    rep_heads = H // Hk
    k_chunks = L // w
    reps = np.array(
        [
            [
                representation(
                    q[h, c * w : (c + 1) * w],
                    k[h // rep_heads, c * w : (c + 1) * w],
                    v[h // rep_heads, c * w : (c + 1) * w],
                    scale,
                    base,
                )
                for c in range(N // w)
            ]
            for h in range(H)
        ]
    ).reshape(H, N // w, D)
    group_of = np.arange(N) if group_of is None else np.asarray(group_of)
    out = np.zeros_like(q)
    for t in range(N):
        own, o = divmod(t, w)
        members = np.flatnonzero(group_of == group_of[t])
        for h in range(H):
            kv = h // rep_heads
            if own < k_chunks:
                keys = rope(k[kv, : t + 1], np.arange(t + 1), base)
                query = rope(q[h, t], t, base)
                out[h, t] = softmax(query @ keys.T * scale) @ v[kv, : t + 1]
                continue
            heads = range(kv * rep_heads, (kv + 1) * rep_heads) if per_kv_head else [h]
            scores = sum(q[g, members].sum(axis=0) @ reps[g, 1 : own - 1].T for g in heads)
            top = 1 + np.argsort(-scores, kind="stable")[: k_chunks - 3]
            chunks = [0, *sorted(top), own - 1]
            index = np.concatenate([np.arange(c * w, (c + 1) * w) for c in chunks])
            index = np.concatenate([index, np.arange(own * w, t + 1)])
            keys = rope(k[kv, index], np.arange(len(index)), base)
            query = rope(q[h, t], len(index) - 1, base)
            out[h, t] = softmax(query @ keys.T * scale) @ v[kv, index]
    return out


def selected_chunks(q, reps, t, w, L):
    """The chunk list S of the rule for one query head at position t (own >= k)."""
    own = t // w
    scores = q @ reps[1 : own - 1].T
    top = 1 + np.argsort(-scores, kind="stable")[: L // w - 3]
    return [0, *sorted(top), own - 1]
