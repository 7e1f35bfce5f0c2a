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


def longheads(
    q, k, v, w, L, scale, base, group_of=None, per_kv_head=False, F=None, pooled=False, mass=None, gaps=None
):
    """Outputs [H, N, D] for queries q [H, N, D] and keys, values [Hk, N, D].

    F: the full attention length, below which a query attends to all tokens up to it
    (None: L, the paper's threshold). pooled: the first ceil((k-3)/2) retrieved chunks
    of every head are the top of mass(newest) for the group's newest query (the
    linked selections', `linked_layers`); the rest each head's own
    (all of them where mass(newest) is None).
    group_of[t]: queries with the same value share one selection, scored by the sum
    of their scores (None: each token selects alone). per_kv_head: the scores of the
    query heads of a KV head are summed and the KV head selects once. gaps: a list each
    ranking appends its margin to, the score of the last chunk taken less the next one's
    (how far from a tie that rounding could decide).
    """
    H, N, D = q.shape
    Hk = k.shape[0]
    rep_heads = H // Hk
    k_chunks = L // w
    full_chunks = (F or L) // w
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
    retrieved = k_chunks - 3
    out = np.zeros_like(q)
    for t in range(N):
        own, o = divmod(t, w)
        members = np.flatnonzero(group_of == group_of[t])
        shared = []
        total = mass(members.max()) if pooled and own >= full_chunks else None
        if total is not None:
            shared = [int(c) for c in 1 + np.argsort(-total, kind="stable")[: -(-retrieved // 2)]]
            note_margin(gaps, total, len(shared))
        for h in range(H):
            kv = h // rep_heads
            if own < full_chunks:
                keys = rope(k[kv, : t + 1], np.arange(t + 1), base)
                query = rope(q[h, t], t, base)
                out[h, t] = softmax(query @ keys.T * scale) @ v[kv, : t + 1]
                continue
            heads = range(kv * rep_heads, (kv + 1) * rep_heads) if per_kv_head else [h]
            scores = sum(q[g, members].sum(axis=0) @ reps[g, 1 : own - 1].T for g in heads)
            ranked = [c for c in 1 + np.argsort(-scores, kind="stable") if c not in shared]
            top = [*shared, *ranked[: retrieved - len(shared)]]
            note_margin(gaps, scores[[c - 1 for c in ranked]], retrieved - len(shared))
            chunks = [0, *sorted(top), own - 1]
            index = np.concatenate([np.arange(c * w, (c + 1) * w) for c in chunks])
            index = np.concatenate([index, np.arange(own * w, t + 1)])
            keys = rope(k[kv, index], np.arange(len(index)), base)
            query = rope(q[h, t], len(index) - 1, base)
            out[h, t] = softmax(query @ keys.T * scale) @ v[kv, index]
    return out


def note_margin(gaps, scores, taken):
    """Append to gaps the margin between the `taken`-th largest score and the next."""
    if gaps is not None and 0 < taken < len(scores):
        ordered = np.sort(scores)[::-1]
        gaps.append(ordered[taken - 1] - ordered[taken])


def selected_chunks(q, reps, t, w, L):
    """The chunk list S of the rule for one query head at position t (own >= k)."""
    own = t // w
    scores = q @ reps[1 : own - 1].T
    top = 1 + np.argsort(-scores, kind="stable")[: L // w - 3]
    return [0, *sorted(top), own - 1]


def pooled_mass(q_newest, k, own, w, scale, base):
    """[own-2]: the attention each chunk of 1..own-2 gets from every query head's R(q, w)
    over all their keys (rotated in their chunk), summed over the heads."""
    H, D = q_newest.shape
    Hk = k.shape[0]
    index = np.arange(w, (own - 1) * w)
    total = np.zeros(own - 2)
    for h in range(H):
        query = rope(q_newest[h], w, base)
        keys = rope(k[h // (H // Hk), index], index % w, base)
        total += softmax(keys @ query * scale).reshape(own - 2, w).sum(axis=1)
    return total


def linked_layers(layers, w, L, scale, base, selection, filter_layer=0, group_of=None, F=None):
    """Outputs of a stack of layers ((q, k, v) each, as in `longheads`) under a selection
    that links them, and the smallest gap between two shares compared or two scores
    ranked (how far from a tie; `note_margin` for the rankings).

    Past the full attention length F (None: L), each group in order gives each layer the
    pooled mass its shared slots follow, by the group's rule:
      - "two_pass_carry": every layer the mass of the most peaked layer of all (the
        largest share of its mass on one chunk; the later layer on a tie; the layers'
        inputs being those of the first pass, which are these);
      - "one_pass_peaked": each layer the mass of the most peaked of it and the layers
        before it;
      - "one_pass_filter": the layers from `filter_layer` on that layer's mass; the
        layers before it the earlier group's chunks below (none where no group noted
        one: each head ranks all its slots);
    "two_pass_prompt" and "one_pass_prompt" give a group of several queries the rule
    "two_pass_carry" and "one_pass_peaked", a group of one "one_pass_filter"; so does
    "one_pass_reread" as "one_pass_prompt" (its question read again is a model's call,
    tests/test_reread.py). In each case
    a layer's mass is replaced, where its share is smaller, by the top chunks noted by
    an earlier group whose newest query is among the w tokens before the group's first
    (the most peaked of them). Each group notes the top chunks and share of the mass its
    last layer followed before that."""
    gaps = [np.inf]
    group_of = np.arange(layers[0][0].shape[1]) if group_of is None else np.asarray(group_of)
    shared = -(-(L // w - 3) // 2)
    prompt_rules = {"two_pass_prompt": "two_pass_carry", "one_pass_prompt": "one_pass_peaked", "one_pass_reread": "one_pass_peaked"}

    def mass_and_share(layer, newest):
        q, k, _ = layers[layer]
        mass = pooled_mass(q[:, newest], k, newest // w, w, scale, base)
        return mass, mass.max() / mass.sum()

    def most_peaked(measured):
        best = max(range(len(measured)), key=lambda i: (measured[i][1], i))
        gaps.extend(abs(measured[best][1] - share) for i, (_, share) in enumerate(measured) if i != best)
        return measured[best]

    noted, chosen = {}, [{} for _ in layers]
    for group in dict.fromkeys(group_of):
        members = np.flatnonzero(group_of == group)
        first, newest = members.min(), members.max()
        if newest // w < (F or L) // w:
            continue
        rule = prompt_rules.get(selection, selection) if len(members) > 1 else "one_pass_filter"
        rule = selection if selection in ("two_pass_carry", "one_pass_filter") else rule
        measured = [mass_and_share(layer, newest) for layer in range(len(layers))]
        if rule == "two_pass_carry":
            own = [most_peaked(measured)] * len(layers)
        elif rule == "one_pass_peaked":
            own = [most_peaked(measured[: layer + 1]) for layer in range(len(layers))]
        else:
            own = [None if layer < filter_layer else measured[filter_layer] for layer in range(len(layers))]
        earlier = [noted[p] for p in noted if first - w <= p < first]
        carried = None
        if earlier:
            carried_share, chunks = max(earlier, key=lambda noted: noted[0])
            carried = np.isin(np.arange(1, newest // w - 1), chunks).astype(float)
        for layer, mine in enumerate(own):
            if mine is not None and carried is not None:
                gaps.append(abs(carried_share - mine[1]))
            keep = carried is not None and (mine is None or carried_share > mine[1])
            chosen[layer][newest] = carried if keep else None if mine is None else mine[0]
        mass, share = own[-1]
        noted[newest] = (share, 1 + np.argsort(-mass, kind="stable")[:shared])
        note_margin(gaps, mass, shared)
    outputs = [
        longheads(
            q, k, v, w, L, scale, base, group_of=group_of, F=F, pooled=True, gaps=gaps,
            mass=chosen[layer].__getitem__,
        )
        for layer, (q, k, v) in enumerate(layers)
    ]
    return outputs, min(gaps)
