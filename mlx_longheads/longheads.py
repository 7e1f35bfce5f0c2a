"""The LongHeads attention rule (arXiv 2402.10685), read top to bottom.

For a query at absolute position t, own = t // w, o = t % w, k = L / w, and
f = F / w (F the full attention length, at least L and at most the trained length):
  - own < f: ordinary causal attention over tokens 0..t (it fits in F keys); the
    paper's rule is F = L, the default F the trained length (stock attention inside it);
  - otherwise the head picks chunks S = [0] + sorted(top_(k-3) of chunks 1..own-2 by
    q_t . rep_c) + [own - 1], attends to their w * (k - 1) keys followed by its own
    chunk's tokens up to t, and all of them get contiguous positions 0 .. (k-1)*w + o.
No head ever sees more than F keys or a distance of F or more. The score uses the query
after projection (and q_norm) but before RoPE.

Both cases are one computation: a head's window is chunk slots, the chunk in slot r
sits at window positions r*w .. r*w + w-1, and the query at window position P sees the
keys at positions <= P. Below F the slots are chunks 0..own and the query's slot is its
own chunk, so it sees exactly tokens 0..t at their true positions; past it, k slots.

Positions without re-rotating keys: RoPE is relative, R(q, P) . R(k, r*w + j) =
R(q, P - r*w) . R(k, j). The cache stores every key rotated by its offset j inside its
chunk (the k~ the chunk representation needs too), and the query is rotated once per
slot, by P - r*w. Rotating k queries costs far less than rotating k*w keys per query.

Shapes: B batch, H query heads, Hk KV heads, Hs heads that select (H or Hk), D head dim,
w chunk size, G query groups (queries that share one selection), g queries per group.
"""

import math
from functools import partial
from typing import Any, Callable, Dict, List, Optional, Tuple, Union

import mlx.core as mx
from mlx.utils import tree_map

from .cache import Buffer, LongHeadsCache
from .config import LongHeadsConfig

RoPE = Callable[..., mx.array]  # rope(x, offset=int | mx.array): the model's own RoPE

# Upper bound on the working arrays of one attention call (bytes); groups of queries
# are processed in blocks that fit it, so prefill memory stays flat.
BLOCK_BUDGET = 256 * 2**20

LOG2_E = math.log2(math.e)

# MLX 0.32.4 on CUDA (an H200): gather_mm of 128 or 256 rows failed to launch
# ("cuGraphAddKernelNode ... invalid argument"). There the chunks are taken out of the
# buffer and multiplied by an ordinary batched matmul instead; gather_qmm passed the
# tests there and stays.


def products_in_place() -> bool:
    """Whether `mx.gather_mm` can be trusted on the current device."""
    return not (mx.default_device() == mx.gpu and mx.cuda.is_available())


def rotate_in_chunks(x: mx.array, start: int, rope: RoPE, w: int) -> mx.array:
    """R(x_i, i mod w) for tokens at positions start.. ([B, h, T, D])."""
    B, h, T, D = x.shape
    skip = start % w
    n = -(-(skip + T) // w)
    padded = mx.pad(x, [(0, 0), (0, 0), (skip, n * w - T - skip), (0, 0)])
    rotated = rope(padded.reshape(B, h * n, w, D))
    return rotated.reshape(B, h, n * w, D)[:, :, skip : skip + T]


def chunk_representations(
    queries: mx.array, keys: mx.array, values: mx.array, rope: RoPE, scale: float, w: int
) -> mx.array:
    """rep_c of n complete chunks: an attention-pooled key per chunk and query head.

    queries [B, H, n*w, D] before RoPE, keys [B, Hk, n*w, D] already rotated in their
    chunks (k~), values [B, Hk, n*w, D] -> [B, H, n, D].
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

    q, k = rope(per_chunk(queries)), per_chunk(keys)
    attended = mx.fast.scaled_dot_product_attention(
        q, k, per_chunk(values), scale=scale
    )
    pooled_query = attended.mean(axis=2, keepdims=True)
    rep = mx.fast.scaled_dot_product_attention(pooled_query, k, k, scale=scale)
    return rep.reshape(B, n, H, D).transpose(0, 2, 1, 3)


def candidate_chunks(n_chunks: int, own: mx.array) -> mx.array:
    """[G, n_chunks]: which chunks a group may retrieve, 1..own-2 (0, own-1 and own are
    in every window anyway)."""
    chunk = mx.arange(n_chunks)
    return (chunk >= 1) & (chunk[None] <= own[:, None] - 2)


def window_of(retrieved: mx.array, own: mx.array) -> mx.array:
    """The window [0, sorted retrieved, own-1, own] (uint32) of each head and group,
    from retrieved chunks [..., G, r]."""
    retrieved = mx.sort(retrieved, axis=-1).astype(mx.uint32)
    ends = mx.broadcast_to(own[:, None] + mx.array([-1, 0]), (*retrieved.shape[:-1], 2))
    first = mx.zeros((*retrieved.shape[:-1], 1), mx.uint32)
    return mx.concatenate([first, retrieved, ends.astype(mx.uint32)], axis=-1)


def top_chunks(scores: mx.array, count: int) -> mx.array:
    """The indices of the `count` largest scores along the last axis, in no order."""
    return mx.argpartition(-scores, kth=count - 1, axis=-1)[..., :count]


def chunk_mask(chunks: mx.array, n_chunks: int) -> mx.array:
    """[..., n_chunks]: whether each chunk is among `chunks` [..., s]."""
    return (chunks[..., None] == mx.arange(n_chunks)).any(axis=-2)


def select_chunks(
    query_sums: mx.array,
    representations: mx.array,
    own: mx.array,
    k: int,
    n_kv_heads: Optional[int] = None,
) -> mx.array:
    """The k chunk indices each head of each group attends to, in order.

    query_sums [B, H, G, D]: the group's raw queries summed (a sum of scores is the
    score of the summed query), in float32 where float16 could overflow.
    representations [B, H, C, D] of the C complete chunks. own [G]: the group's own
    chunk, with own >= k. n_kv_heads: select once per KV head, summing the scores of
    its query heads. Returns uint32 [B, Hs, G, k]: [0, top_(k-3) of 1..own-2 sorted,
    own-1, own].
    """
    reps = representations.astype(query_sums.dtype)
    scores = query_sums @ reps.swapaxes(-1, -2)  # [B, H, G, C]
    if n_kv_heads is not None:
        B, H, G, C = scores.shape
        scores = scores.reshape(B, n_kv_heads, H // n_kv_heads, G, C).sum(axis=2)
    scores = mx.where(candidate_chunks(scores.shape[-1], own), scores, -mx.inf)
    return window_of(top_chunks(scores, k - 3), own)


def pooled_attention(
    queries: mx.array, cache: LongHeadsCache, own: mx.array, rope: RoPE, scale: float
) -> mx.array:
    """How much attention each candidate chunk gets from the whole layer, [B, G, C].

    queries [B, H, G, D]: one raw query per group (its newest). Each head's query,
    placed one chunk after the key's chunk (R(q, w) . k~, the positions it would see
    the chunk at), attends over all keys of the candidates 1..own-2; the mass each
    chunk gets is summed over the layer's query heads. A product with every key: the
    cost of stock attention's scores for one query per group.
    """
    B, H, G, D = queries.shape
    w, C, Hk = cache.chunk_size, cache.complete_chunks, cache.kv_heads
    rotated = rope(mx.contiguous(queries.reshape(-1, 1, D)), offset=w)
    rotated = rotated.reshape(B, Hk, (H // Hk) * G, D).astype(cache.dtype)
    keys = tree_map(lambda a: a[:, :, : C * w], cache.keys)
    if cache.bits is None:
        scores = rotated @ keys.swapaxes(-1, -2)
    else:
        scores = mx.quantized_matmul(
            rotated, *keys, transpose=True, group_size=cache.group_size, bits=cache.bits
        )
    scores = scores.astype(mx.float32).reshape(B, H, G, C * w) * scale
    allowed = mx.repeat(candidate_chunks(C, own), w, axis=1)  # [G, C*w]: per key
    mass = mx.softmax(mx.where(allowed, scores, -mx.inf), axis=-1)
    return mass.reshape(B, H, G, C, w).sum(axis=(1, 4))


def select_chunks_pooled(
    query_sums: mx.array, representations: mx.array, pooled: mx.array, own: mx.array, k: int, shared: int
) -> mx.array:
    """The two-pass selections' window: chunks the whole model agrees on, then each head's own.

    The first `shared` (`LongHeadsConfig.shared_slots`) retrieved slots of every head
    hold the chunks with the most `pooled` attention [B, G, C] (the one `CarryRelay`
    chose), and the rest each head's top by q . rep among the others, as in
    `select_chunks`.

    query_sums [B, H, G, D] and representations [B, H, C, D] as in `select_chunks`.
    Returns uint32 [B, H, G, k], the layout of `select_chunks`.
    """
    B, H, G, _ = query_sums.shape
    C = pooled.shape[-1]
    retrieved = k - 3
    allowed = candidate_chunks(C, own)  # [G, C]
    pooled = mx.where(allowed, pooled, -mx.inf)
    layer_top = top_chunks(pooled, shared)  # [B, G, s]
    chosen = chunk_mask(layer_top, C)  # [B, G, C]
    top = mx.broadcast_to(layer_top[:, None], (B, H, G, shared))
    if retrieved > shared:
        scores = query_sums @ representations.astype(query_sums.dtype).swapaxes(-1, -2)
        scores = mx.where(allowed & ~chosen[:, None], scores, -mx.inf)
        top = mx.concatenate([top, top_chunks(scores, retrieved - shared)], axis=-1)
    return window_of(top, own)


def peakedness(pooled: mx.array) -> mx.array:
    """[B, G]: the share of a layer's pooled attention [B, G, C] on its top chunk."""
    return pooled.max(axis=-1) / pooled.sum(axis=-1)


class CarryRelay:
    """What the "two_pass_carry" selection carries: from layer to layer in a group's
    first pass, from its first pass to its second, and from group to group.

    One head's score of one chunk rarely ranks a sentence planted in natural text (a
    needle) first, while the attention a layer's heads give it together does, and one
    or two middle layers give it a large share of theirs (0.13-0.31 on its chunk
    against 0.02-0.1 at the other layers, results/relay_needle_16k.md). So:
      - first pass: each layer's pooled attention is measured (`choose`), and the
        most peaked one, the largest share of its candidates' mass on one chunk (ties
        to the later layer), is kept per block of groups;
      - between the passes (`between_passes`, the cache rolled back by `run`): the
        group's choice, the top `shared` chunks of that attention, is noted in layer
        0's cache, and the most peaked choice noted in the `span` tokens before the
        group replaces it where it was more peaked;
      - second pass (`replaying`): every layer's shared slots hold that choice, the
        layers before the most peaked one included.
    The carry keeps a question's choice in its answer's first tokens: in the needle
    misses of the selection without it, every head held the needle's chunk at the
    question's last token, dropped it from the first or second answer token on and
    answered " 1."; with it kept, they answered right (results/
    answer_decode_needle_16k.md, answer_decode_needle_32k_topk.md). The choices are
    noted a row per token, so trimming, saving and restoring a cache keep them, and
    decoding still equals exact prefill.
    """

    def __init__(self, shared: int, span: int):
        self.shared = shared
        self.span = span
        self.best: Dict[int, Tuple[mx.array, mx.array]] = {}  # block -> (pooled, share)
        self.replaying = False

    def choose(self, layer: int, block: int, measure: Callable[[], mx.array]) -> mx.array:
        """The pooled attention [B, G, C] that `layer`'s shared slots follow for the
        groups of `block` (its first group's index in the call): in the first pass the
        most peaked layer's so far (this one's measured by `measure`), in the second
        the chosen one."""
        if self.replaying:
            return self.best[block][0]
        pooled = measure()
        share = peakedness(pooled)
        if layer > 0:
            best, best_share = self.best[block]
            own = share >= best_share
            pooled = mx.where(own[..., None], pooled, best)
            share = mx.where(own, share, best_share)
        self.best[block] = (pooled, share)
        return pooled

    def run(self, forward: Callable[[], Any], caches: List[LongHeadsCache], tokens: int) -> Any:
        """One group's two passes through `forward` (the model's, or layers', call on its
        `tokens` queries): the first, then the caches rolled back and the second, whose
        result is returned."""
        self.replaying = False
        forward()
        roll_back(caches, tokens, [best for best, _ in self.best.values()])
        self.between_passes(caches[0], tokens)
        self.replaying = True
        try:
            return forward()
        finally:
            self.replaying = False

    def between_passes(self, cache: LongHeadsCache, tokens: int) -> None:
        """Note the group's choice and keep the most peaked of it and the recent ones
        (the cache trimmed back to the group's start)."""
        ((pooled, share),) = self.best.values()  # one group per piece past F
        pooled, share = pooled[:, 0], share[:, 0]  # [B, C], [B]
        chunks = top_chunks(pooled, self.shared)
        cache.record_choice(cache.offset, tokens, share, chunks)
        carried, carried_share = recent_choice(cache, self.span, pooled.shape[-1])
        keep = carried_share > share
        pooled = mx.where(keep[:, None], carried, pooled)
        self.best = {0: (pooled[:, None], mx.maximum(share, carried_share)[:, None])}


def roll_back(caches: List[LongHeadsCache], tokens: int, kept: Any) -> None:
    """Undo a first pass's `tokens` in every cache, `kept` (what the second pass takes
    from the first) evaluated before: no read of the first pass is pending when the
    second writes over its keys and values (no buffer copies)."""
    mx.eval(kept, [c.buffers for c in caches])
    if [cache.trim(tokens) for cache in caches] != [tokens] * len(caches):
        raise RuntimeError("the first pass could not be rolled back exactly")


def note_choice(cache: LongHeadsCache, tokens: int, pooled: mx.array, share: mx.array, shared: int) -> None:
    """Note a group's choice, the top `shared` chunks of its pooled attention [B, 1, C]
    with its share [B, 1], on the rows of its `tokens` queries before the cache's offset."""
    cache.record_choice(cache.offset - tokens, tokens, share[:, 0], top_chunks(pooled[:, 0], shared))


def recent_choice(cache: LongHeadsCache, span: int, n_chunks: int) -> Tuple[mx.array, mx.array]:
    """The most peaked choice noted in the `span` tokens before the cache's offset, as a
    pooled attention [B, n_chunks] (1 on its chunks, 0 elsewhere), and its share [B]
    (-1 where none was noted)."""
    share, chunks = cache.recent_choice(cache.offset, span)
    return chunk_mask(chunks, n_chunks).astype(mx.float32), share


def carried_choice(cache: LongHeadsCache, span: int, tokens: int) -> Optional[Tuple[mx.array, mx.array]]:
    """What a one-pass group of `tokens` queries at the cache's offset carries in: the
    most peaked choice noted in the `span` tokens before it, as (pooled [B, 1, C], share
    [B, 1]); None before any group noted one."""
    if cache.choices is None:
        return None
    carried, share = recent_choice(cache, span, (cache.offset + tokens) // cache.chunk_size)
    return carried[:, None], share[:, None]


class PeakedRelay(CarryRelay):
    """What a prompt's chunk carries under "one_pass_prompt": `CarryRelay`'s choice, the
    most peaked layer's, in one pass.

    "two_pass_carry" runs a chunk twice so that the layers before the most peaked one
    follow the chunk's own choice too; that second pass halves the prefill past F. Here
    each layer's pooled attention is measured, and each layer follows the most peaked
    of the choice noted in the `span` tokens before the group and the group's layers up
    to it (`CarryRelay.choose`); the group's most peaked choice is noted in layer 0's
    cache after the pass. The pass reads every layer's keys once for one query per head,
    shared by the chunk's queries: a small part of the pass.
    """

    def run(self, forward: Callable[[], Any], caches: List[LongHeadsCache], tokens: int) -> Any:
        """One group's pass through `forward`, the recent choice carried in and the
        group's own noted after."""
        cache = caches[0]
        self.replaying, self.carried = False, carried_choice(cache, self.span, tokens)
        out = forward()
        ((pooled, share),) = self.best.values()  # one group per piece past F
        note_choice(cache, tokens, pooled, share, self.shared)
        return out

    def choose(self, layer: int, block: int, measure: Callable[[], mx.array]) -> mx.array:
        """The pooled attention [B, 1, C] `layer`'s shared slots follow: the most peaked
        of the group's layers up to this one (measured by `measure`) and the carried."""
        pooled = super().choose(layer, block, measure)
        if self.carried is None:
            return pooled
        carried, carried_share = self.carried
        return mx.where((carried_share > self.best[block][1])[..., None], carried, pooled)


class FilterRelay:
    """What the "one_pass_filter" selection carries: one layer's choice, to the layers
    after it in the same pass and to the layers before it at the next group.

    "two_pass_carry" runs every group past F twice and measures the pooled attention of
    every layer over every key, to share the chunks of the most peaked one. That layer
    was nearly always the same one (layer 18 of SmolLM2's 30 in 13 of 18 decoded steps,
    results/decode_choice.md), and that layer's own top chunks held the answer's chunk
    as often as the most peaked layer's did. So one pass:
      - the filter layer (`layer`, found by `calibrate` on the loaded model) measures
        its pooled attention; its choice, or the most peaked choice noted in the `span`
        tokens before the group where that was more peaked (as `CarryRelay` keeps
        them), fills the shared slots of it and of the layers after it;
      - the layers before it take that recent choice (each head's own ranking fills
        their slots where none was noted: the first group past F);
      - the group's own choice is noted in layer 0's cache (`run`), for the groups after it.
    Per token that reads the weights once and one layer's keys, where "two_pass_carry"
    reads the weights twice and every layer's keys. The host decides whether a choice
    was noted from the offsets alone (every group past F notes one), not inside a layer.
    """

    def __init__(self, shared: int, span: int, full_length: int, layer: Optional[int] = None):
        """full_length: F in tokens; layer: the filter layer (set once calibrated)."""
        self.shared = shared
        self.span = span
        self.full_length = full_length
        self.layer = layer
        self.carried: Optional[Tuple[mx.array, mx.array]] = None  # (pooled [B, 1, C], share [B, 1])
        self.fresh: Optional[Tuple[mx.array, mx.array]] = None  # the filter layer's own
        self.kept: Optional[mx.array] = None  # what the filter layer and those after it follow

    def run(self, forward: Callable[[], Any], caches: List[LongHeadsCache], tokens: int) -> Any:
        """One group's pass through `forward` (its `tokens` queries after the caches'
        offset), with the recent choice carried in and the group's own noted after."""
        cache = caches[0]
        self.carried = carried_choice(cache, self.span, tokens) if cache.offset > self.full_length else None
        out = forward()
        note_choice(cache, tokens, *self.fresh, self.shared)
        return out

    def choose(self, layer: int, block: int, measure: Callable[[], mx.array]) -> Optional[mx.array]:
        """The pooled attention [B, 1, C] that `layer`'s shared slots follow (None: none,
        each head ranks all its slots), measured (`measure`) at the filter layer only."""
        if layer < self.layer:
            return None if self.carried is None else self.carried[0]
        if layer == self.layer:
            pooled = measure()
            share = peakedness(pooled)
            self.fresh, self.kept = (pooled, share), pooled
            if self.carried is not None:
                carried, carried_share = self.carried
                self.kept = mx.where((carried_share > share)[..., None], carried, pooled)
        return self.kept


class PromptRelay:
    """What the "two_pass_prompt" and "one_pass_prompt" selections carry: a group of
    several queries (a prompt's chunk) runs the `prompt` relay (`CarryRelay`'s two
    passes, or `PeakedRelay`'s one), a group of one (a decoded token, and a prompt's
    last token, which mlx-lm's generate feeds alone) `FilterRelay`'s one pass.

    On the 16k prompts where "two_pass_carry" and "one_pass_filter" disagreed, the
    answer was lost either while the prompt was read (by the filter) or in the answer's
    tokens (by the carry); read by the first and decoded by the second, both prompts
    were answered (results/answer_rule_multikey_5_*.md, _9_*.md). A prompt is read
    once, while every decoded token costs what "one_pass_filter"'s does. Both note
    their choice in layer 0's cache, so each carries the other's.
    """

    def __init__(self, prompt: CarryRelay, filter: FilterRelay):
        self.prompt, self.filter = prompt, filter
        self.active: Union[CarryRelay, FilterRelay] = filter

    def run(self, forward: Callable[[], Any], caches: List[LongHeadsCache], tokens: int) -> Any:
        """One group through `forward`: by the prompt relay for several queries, by the
        filter for one."""
        self.active = self.prompt if tokens > 1 else self.filter
        return self.active.run(forward, caches, tokens)

    def choose(self, layer: int, block: int, measure: Callable[[], mx.array]) -> Optional[mx.array]:
        """The pooled attention `layer`'s shared slots follow, by the group's relay."""
        return self.active.choose(layer, block, measure)


class RereadRelay(PromptRelay):
    """What the "one_pass_reread" selection carries: "one_pass_prompt"'s, and at a prompt's
    last token the question read again by the choice that token makes.

    Past F a prompt's chunk is read before the question is complete: its keys and values
    are made in windows chosen by what came before. On the plain-fact task at 16k the
    default missed 14 of 20 facts that stock attention reads from a bare window (chunk 0,
    the fact's chunk, the question's two chunks: 17 / 20). Forcing the fact's chunk into
    every window at the answer recovered none of those misses; forcing it from the
    question's first token on, 6 of 12; reading the question's two chunks again following
    the last token's choice, without knowing the fact, the same 6
    (results/question_window_fact_16k.md; this rule, replayed on the default's prefills:
    12 / 20, and every needle and multikey prompt the default answered, results/
    reread_replay_*_16k.md). So at a prompt's last token past F (`answer`):
      - the token is read as "one_pass_prompt" reads it; where its filter layer kept the
        more peaked choice the prompt's last groups noted, which the question's tokens
        followed when they were read, that is the call (`chose_anew`: reading them again by
        it lost a needle and a multikey prompt the default answered, and answered no more
        facts); where it chose anew,
      - the caches are cut back to the start of the chunk before the token's (not below
        F), and those tokens are read again, in groups as a prompt is, every layer's shared
        slots following the token's choice, which the groups note with its share;
      - the token is read again, and its logits are the call's.
    Once per prompt that reads at most 2w tokens again; a decoded token costs what
    "one_pass_prompt"'s does. The ids are noted in layer 0's cache (`record_tokens`), and the
    prompt's end too, so that a saved prompt reads its question again when loaded. A cut
    after the answer's first token does not undo the question read again.
    """

    def __init__(self, prompt: CarryRelay, filter: FilterRelay):
        super().__init__(prompt, filter)
        self.followed: Optional[Tuple[mx.array, mx.array]] = None  # (pooled [B, 1, C], share [B, 1])
        self.chunks = 0  # the chunks complete at the group being read again

    def answer(self, call: Callable[[mx.array], mx.array], inputs: mx.array, caches: List[LongHeadsCache]) -> mx.array:
        """The logits of `call` (the model's linked call) on `inputs` [B, T], the question
        read again first where they are a prompt's last token past F and it chose anew.
        Whether they are is known on the host from offsets alone (no wait for an earlier
        step's results); whether it chose anew, once per prompt, from its first pass."""
        cache = caches[0]
        w, offset = self.filter.span, cache.offset
        start = max((offset // w - 1) * w, self.filter.full_length)
        cache.record_tokens(inputs)
        if inputs.shape[1] > 1:
            logits = call(inputs)
            cache.prompt_end = cache.offset
            return logits
        if cache.prompt_end != offset or start >= offset:
            return call(inputs)
        logits = call(inputs)
        if not self.chose_anew():
            return logits
        question = cache.tokens[:, start:offset]
        followed = self.filter.kept, self.kept_share()
        roll_back(caches, offset + 1 - start, followed)
        self.followed = followed
        try:
            call(question)
        finally:
            self.followed = None
        return call(inputs)

    def kept_share(self) -> mx.array:
        """[B, 1]: the share of the choice the last token's filter layer kept (the more
        peaked of its own and the carried one)."""
        share, carried = self.filter.fresh[1], self.filter.carried
        return share if carried is None else mx.maximum(carried[1], share)

    def chose_anew(self) -> bool:
        """Whether the last token's filter layer kept its own choice (for any prompt of the
        batch), not the one the prompt's last groups noted, which the question followed."""
        carried = self.filter.carried
        return carried is None or (self.filter.fresh[1] >= carried[1]).any().item()

    def run(self, forward: Callable[[], Any], caches: List[LongHeadsCache], tokens: int) -> Any:
        """One group through `forward`: as "one_pass_prompt", or, read again, following
        the last token's choice, which it notes."""
        if self.followed is None:
            return super().run(forward, caches, tokens)
        self.chunks = (caches[0].offset + tokens) // self.filter.span
        out = forward()
        note_choice(caches[0], tokens, *self.followed, self.filter.shared)
        return out

    def choose(self, layer: int, block: int, measure: Callable[[], mx.array]) -> Optional[mx.array]:
        """The pooled attention `layer`'s shared slots follow: the last token's, in a
        re-read (over the chunks complete at its group), else as "one_pass_prompt"."""
        if self.followed is None:
            return super().choose(layer, block, measure)
        return self.followed[0][..., : self.chunks]


def chunk_rows(slots: mx.array, n_kv_heads: int, n_chunks: int) -> mx.array:
    """Row of each slot's chunk in a cache buffer viewed as [B * Hk * n_chunks, w, D].

    slots [B, G, n, Hs] with Hs = Hk or H (query head h reads KV head h // (H / Hk)).
    `chunk_product` multiplies these rows in place: no gathered copy of the window
    (except on CUDA without kv_bits, see `products_in_place`).
    """
    B, _, _, Hs = slots.shape
    kv_head = mx.arange(Hs) // (Hs // n_kv_heads)
    first_row = (mx.arange(B)[:, None] * n_kv_heads + kv_head[None]) * n_chunks  # [B, Hs]
    return slots + first_row[:, None, None].astype(mx.uint32)


def chunk_product(
    x: mx.array, buffer: Buffer, rows: mx.array, cache: LongHeadsCache, transpose: bool
) -> mx.array:
    """x @ chunk.T (transpose) or x @ chunk for the chunk at each row of a cache buffer.

    The buffer is viewed as [B * Hk * n_chunks, w, d] rows, multiplied in place
    (`mx.gather_qmm` on quantized keys and values, else `mx.gather_mm` where the device
    can be trusted with it, else taken out of the buffer first).
    """
    w = cache.chunk_size
    chunks = tree_map(lambda a: a.reshape(-1, w, a.shape[-1]), buffer)
    if cache.bits is not None:
        return mx.gather_qmm(
            x,
            *chunks,
            rhs_indices=rows,
            transpose=transpose,
            group_size=cache.group_size,
            bits=cache.bits,
        )
    if products_in_place():
        rhs = chunks.swapaxes(-1, -2) if transpose else chunks
        return mx.gather_mm(x, rhs, rhs_indices=rows)
    taken = chunks[rows]
    return x @ (taken.swapaxes(-1, -2) if transpose else taken)


def window_slots(
    queries: mx.array,
    own: List[int],
    newest: List[int],
    cache: LongHeadsCache,
    config: LongHeadsConfig,
    rope: RoPE,
    scale: float,
    relay: Optional[Callable[[Callable[[], mx.array]], Optional[mx.array]]] = None,
) -> mx.array:
    """The chunk in each window slot, [B, Hs, G, n]; the last slot is the group's own chunk.

    The groups are all below the threshold (own < f) or all past it. Past it a window
    is the selection [0, top, own-1, own]. Below it, a window is chunks 0..own at their
    true positions, so n = max(own) + 1 slots hold chunks 0..n-2 and the own chunk
    (slots a group may not see are masked by attend_groups): short contexts cost what
    ordinary attention costs. newest: where each group's newest query sits in it.
    relay (the selections that link layers): given a way to measure the layer's pooled
    attention, the one its shared slots follow, or None where each head ranks all its
    slots (`CarryRelay.choose`, `FilterRelay.choose`).
    """
    B, H, G = queries.shape[:3]
    n_kv_heads = cache.kv_heads
    if max(own) < config.full_chunks:
        # Every head's window alike: one per KV head, so a chunk is read once per KV
        # head as stock attention reads it, not once per query head.
        n = max(own) + 1
        own_chunk = mx.array(own, dtype=mx.uint32)[:, None]
        earlier = mx.broadcast_to(mx.arange(n - 1, dtype=mx.uint32), (G, n - 1))
        first_chunks = mx.concatenate([earlier, own_chunk], axis=1)
        return mx.broadcast_to(first_chunks, (B, n_kv_heads, G, n))
    query_sums = queries.astype(mx.float32).sum(axis=3)
    C = cache.complete_chunks
    representations = cache.representations[:, :, :C]

    def measure() -> mx.array:  # the layer's pooled attention, where the relay asks for it
        index = mx.array(newest)[None, None, :, None, None]
        newest_queries = mx.take_along_axis(queries, index, axis=3)[:, :, :, 0]
        return pooled_attention(newest_queries, cache, mx.array(own), rope, scale)

    pooled = None if relay is None else relay(measure)
    if pooled is not None:
        return select_chunks_pooled(
            query_sums, representations, pooled, mx.array(own), config.num_chunks, config.shared_slots
        )
    return select_chunks(
        query_sums,
        representations,
        mx.array(own),
        config.num_chunks,
        n_kv_heads if config.selection == "kv_head" else None,
    )


def attend_groups(
    queries: mx.array,
    own: List[int],
    first_offset: List[int],
    newest: List[int],
    cache: LongHeadsCache,
    rope: RoPE,
    scale: float,
    config: LongHeadsConfig,
    relay: Optional[Callable[[Callable[[], mx.array]], Optional[mx.array]]] = None,
) -> mx.array:
    """Attention for G groups of g consecutive queries, each group sharing its window.

    queries [B, H, G, g, D] before RoPE; group i's queries sit at in-chunk offsets
    first_offset[i] + 0..g-1 of chunk own[i], the newest at newest[i] (those after it
    are zero padding). Returns [B, H, G, g, Dv].

    Each slot is one matrix product of the slot's rotated queries with the chunk's rows
    of the cache (`chunk_product`: the window is never copied out). The softmax runs over
    all slots without bringing them together: 2^(s - max) with scores in base 2 (the
    scale includes log2 e; MLX's CPU `power` is twice as fast as its `exp`), and the
    sum of those weights divides the summed per-slot outputs. Only the own chunk's slot
    needs a causal mask, so the other slots are never masked past the threshold.
    """
    B, H, G, g, D = queries.shape
    w = config.chunk_size
    slots = window_slots(queries, own, newest, cache, config, rope, scale, relay)
    slots = slots.transpose(0, 2, 3, 1)  # [B, G, n, Hs]
    n, Hs = slots.shape[2], slots.shape[3]
    R = H // Hs  # query heads sharing one window
    rows = chunk_rows(slots, cache.kv_heads, cache.capacity // w)

    # The query of slot r is rotated by P - r*w (P its window position); the own
    # chunk's slot, at r*w = own*w (below the threshold) or (n-1)*w, by its in-chunk offset.
    own_offset = mx.array(first_offset)
    position = mx.array([min(c, n - 1) * w for c in own]) + own_offset  # [G]
    earlier = mx.maximum(position[:, None] - mx.arange(n - 1) * w, 0)
    offsets = mx.concatenate([earlier, own_offset[:, None]], axis=1)  # [G, n]
    q = (queries * (scale * LOG2_E)).transpose(0, 2, 1, 3, 4)[:, :, None]
    # Contiguous: MLX 0.32.4's CUDA RoPE writes a broadcast (stride 0) input's slots over
    # each other, which a single group (decoding) would otherwise be.
    q = mx.contiguous(mx.broadcast_to(q, (B, G, n, H, g, D)).reshape(B * G * n, H, g, D))
    q = rope(q, offset=mx.tile(offsets.reshape(-1), B))
    q = q.reshape(B, G, n, Hs, R * g, D)
    scores = chunk_product(q, cache.keys, rows, cache, transpose=True)
    scores = scores.reshape(B, G, n, Hs, R, g, w)

    # Own chunk: keys up to the query. Earlier slots: all, but before the threshold
    # only the chunks before the group's own one.
    own_visible = mx.arange(w) <= (own_offset[:, None] + mx.arange(g))[..., None]  # [G, g, w]
    own_scores = scores[:, :, -1:]
    own_scores = mx.where(own_visible[:, None, None, None], own_scores, -mx.inf)
    parts = [(own_scores, rows[:, :, -1:])]
    if n > 1:
        earlier_scores = scores[:, :, :-1]
        if min(own) < n - 1:
            earlier_visible = mx.arange(n - 1) < mx.array(own)[:, None]  # [G, n-1]
            mask = earlier_visible[..., None, None, None, None]
            earlier_scores = mx.where(mask, earlier_scores, -mx.inf)
        parts.append((earlier_scores, rows[:, :, :-1]))

    top = parts[0][0].max(axis=(2, 6), keepdims=True)
    for part, _ in parts[1:]:
        top = mx.maximum(top, part.max(axis=(2, 6), keepdims=True))
    out, total = 0, 0
    for part, part_rows in parts:
        weights = mx.power(2.0, (part - top).astype(mx.float32))  # [B, G, m, Hs, R, g, w]
        total = total + weights.sum(axis=(2, 6))  # [B, G, Hs, R, g]
        weights = weights.astype(cache.dtype).reshape(B, G, -1, Hs, R * g, w)
        product = chunk_product(weights, cache.values, part_rows, cache, transpose=False)
        out = out + product.sum(axis=2)
    Dv = out.shape[-1]
    out = out.reshape(B, G, Hs, R, g, Dv) / total[..., None].astype(out.dtype)
    return out.reshape(B, G, H, g, Dv).transpose(0, 2, 1, 3, 4)


def longheads_attention(
    queries: mx.array,
    keys: mx.array,
    values: mx.array,
    cache: LongHeadsCache,
    rope: RoPE,
    scale: float,
    config: LongHeadsConfig,
    relay: Optional[Callable[..., Optional[mx.array]]] = None,
) -> mx.array:
    """One layer's attention for T new tokens, updating the cache.

    queries [B, H, T, D], keys and values [B, Hk, T, D], all before RoPE.
    relay: with a selection that links layers, the relay's `choose` bound to this
    layer (the link to the model's other layers). Returns [B, H, T, Dv].
    """
    if config.links_layers and relay is None:
        raise ValueError(
            f"the {config.selection} selection links a model's layers: apply it with apply_longheads"
        )
    B, H, T, D = queries.shape
    w = config.chunk_size
    start = cache.offset
    completed = cache.append(queries, rotate_in_chunks(keys, start, rope, w), values)
    if completed is not None:
        cache.add_representations(chunk_representations(*completed, rope, scale, w))

    skip = start % w  # the first chunk's tokens before this call
    if config.prefill == "exact":
        groups = queries[:, :, :, None]
        own = [t // w for t in range(start, start + T)]
        first_offset = [t % w for t in range(start, start + T)]
        newest = [0] * T
    elif skip + T <= w:
        # All queries in one chunk (decode, or a short call): one group of T.
        groups = queries[:, :, None]
        own, first_offset, newest = [start // w], [skip], [T - 1]
    else:
        # One group per chunk touched, padded to whole chunks with zero queries (which
        # add nothing to a group's score); their outputs are dropped below.
        G = -(-(skip + T) // w)
        padded = mx.pad(queries, [(0, 0), (0, 0), (skip, G * w - T - skip), (0, 0)])
        groups = padded.reshape(B, H, G, w, D)
        own = list(range(start // w, start // w + G))
        first_offset = [0] * G
        newest = [min((c + 1) * w, start + T) - 1 - c * w for c in own]
    G, g = groups.shape[2], groups.shape[3]

    # Blocks of groups never mix the two sides of the threshold. Working arrays per
    # group: rotated queries, scores and exponentials (float32), per-slot outputs, and
    # the chunks' keys and values where they are taken out.
    f, k = config.full_chunks, config.num_chunks
    below = sum(c < f for c in own)
    taken = 0 if products_in_place() else 2 * w * D
    outputs = []
    for first, last in ((0, below), (below, G)):
        if first == last:
            continue
        slots = min(max(own[first:last]) + 1, f) if first == 0 else k
        per_group = H * slots * (g * (2 * D + 3 * w) + taken) * 4
        block = max(1, BLOCK_BUDGET // per_group)
        outputs += [
            attend_groups(
                groups[:, :, i : min(i + block, last)],
                own[i : min(i + block, last)],
                first_offset[i : min(i + block, last)],
                newest[i : min(i + block, last)],
                cache,
                rope,
                scale,
                config,
                None if relay is None else partial(relay, i),
            )
            for i in range(first, last, block)
        ]
    out = mx.concatenate(outputs, axis=2).reshape(B, H, G * g, -1)
    out = out if G * g == T else out[:, :, skip : skip + T]
    # The pending queries, the kept ones and the representations are written each call
    # but read only when a chunk completes, or past F: made a dependency of the output,
    # they are evaluated with it, instead of each decode step's writes chaining on the
    # unevaluated last ones (one query per head and layer held per token, without end).
    return mx.depends(out, cache.buffers)
