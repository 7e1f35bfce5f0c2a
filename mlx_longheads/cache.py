"""The chunked KV cache LongHeads attends over, in mlx-lm's cache interface (0.32.2).

Per layer it stores the keys rotated by their offset inside their chunk (the query is
rotated for the window slot a chunk lands in, so a key can sit in any slot), the
values, one representation per complete chunk and query head, and the raw queries of
the current incomplete chunk (they are needed to compute that chunk's representation
once it completes) and of the last UNDO_CHUNKS complete ones (so that `trim` can cut
inside them exactly: the cut chunk's representation is computed again when it
completes again). With `bits`, keys and values are stored quantized
along the head dim (packed uint32, scales and biases, as mlx-lm's QuantizedKVCache)
from the first token on; representations and queries stay float. Buffers grow in
whole chunks, by at least 2048 tokens and an eighth of their size, so appending is
amortised O(1) per token and the spare room of a large cache stays under about 12.5%.
"""

from typing import List, Optional, Tuple, Union

import mlx.core as mx
from mlx.utils import tree_flatten, tree_map
from mlx_lm.models import cache as mlx_lm_cache
from mlx_lm.models.cache import _BaseCache

MIN_GROWTH = 2048
# Complete chunks whose raw queries are kept for `trim`: a conversation's next request
# usually differs from the cached one in its last few tokens (the re-templated answer).
UNDO_CHUNKS = 2

# A K/V buffer: float [B, Hk, capacity, D], or quantized (packed, scales, biases).
Buffer = Union[mx.array, Tuple[mx.array, mx.array, mx.array]]


def with_rows(a: mx.array, rows: int, fill: float) -> mx.array:
    """`a` [B, n, ...] with room for `rows` along its second axis, the new rows `fill`."""
    fresh = mx.full((a.shape[0], rows, *a.shape[2:]), fill, a.dtype)
    fresh[:, : a.shape[1]] = a
    return fresh


class LongHeadsCache(_BaseCache):
    def __init__(
        self,
        chunk_size: int,
        max_size: Optional[int] = None,
        bits: Optional[int] = None,
        group_size: Optional[int] = 64,
    ):
        """max_size: tokens to allocate at once (for example the CLI's max-context).
        bits, group_size: quantize keys and values (None: keep the float dtype)."""
        self.chunk_size = chunk_size
        self.max_size = max_size
        self.bits = bits
        self.group_size = group_size
        self.keys: Optional[Buffer] = None  # [B, Hk, capacity, D], R(k_i, i mod w)
        self.values: Optional[Buffer] = None  # [B, Hk, capacity, Dv]
        self.representations: Optional[mx.array] = None  # [B, H, capacity / w, D]
        self.queries: Optional[mx.array] = None  # [B, H, w, D]: the incomplete chunk's
        # [B, H, u * w, D]: the last u <= UNDO_CHUNKS complete chunks' (None: u = 0)
        self.undo_queries: Optional[mx.array] = None
        # [B, capacity, 1 + s] (selections that link layers, layer
        # 0's cache only): per token, the choice of the group whose newest query it is,
        # as `record_choice` writes it; share -1 where no group's newest query is.
        self.choices: Optional[mx.array] = None
        # [B, capacity] int32 ("one_pass_reread", layer 0's cache only): the token ids,
        # as `record_tokens` writes them; and the offset at the end of the last call of
        # several tokens (a prompt's end, None after a cut before it).
        self.tokens: Optional[mx.array] = None
        self.prompt_end: Optional[int] = None
        self.offset = 0

    @property
    def complete_chunks(self) -> int:
        return self.offset // self.chunk_size

    @property
    def undo_chunks(self) -> int:
        """Complete chunks (the last ones) whose raw queries are kept."""
        return 0 if self.undo_queries is None else self.undo_queries.shape[2] // self.chunk_size

    @property
    def capacity(self) -> int:
        """Tokens the buffers have room for."""
        return 0 if self.keys is None else tree_flatten(self.keys)[0][1].shape[2]

    @property
    def kv_heads(self) -> int:
        return tree_flatten(self.keys)[0][1].shape[1]

    @property
    def dtype(self) -> mx.Dtype:
        """The float dtype keys and values are read in (quantized: their scales')."""
        return tree_flatten(self.keys)[-1][1].dtype

    def encode(self, x: mx.array) -> Buffer:
        """Keys or values [B, Hk, T, D] as stored."""
        if self.bits is None:
            return x
        return tuple(mx.quantize(x, group_size=self.group_size, bits=self.bits))

    def decode(self, x: Buffer) -> mx.array:
        """Stored keys or values back in float."""
        if self.bits is None:
            return x
        return mx.dequantize(*x, group_size=self.group_size, bits=self.bits)

    def _grow(self, needed: int, queries: mx.array, keys: Buffer, values: Buffer):
        w = self.chunk_size
        capacity = self.capacity
        if needed <= capacity:
            return
        if self.max_size is not None and needed <= self.max_size:
            new_capacity = self.max_size
        else:
            new_capacity = max(needed, capacity + max(MIN_GROWTH, capacity // 8))
        new_capacity = -(-new_capacity // w) * w
        B, H, _, D = queries.shape

        def extend(like: mx.array, buffer: Optional[mx.array], rows: int) -> mx.array:
            fresh = mx.zeros((*like.shape[:2], rows, like.shape[3]), like.dtype)
            if buffer is not None:
                fresh[:, :, : buffer.shape[2]] = buffer
            return fresh

        def extend_kv(new: Buffer, buffer: Optional[Buffer]) -> Buffer:
            old = tree_map(lambda _: None, new) if buffer is None else buffer
            return tree_map(lambda a, b: extend(a, b, new_capacity), new, old)

        self.keys = extend_kv(keys, self.keys)
        self.values = extend_kv(values, self.values)
        self.representations = extend(
            queries, self.representations, new_capacity // w
        )
        if self.queries is None:
            self.queries = mx.zeros((B, H, w, D), queries.dtype)
        if self.choices is not None:
            self.choices = with_rows(self.choices, new_capacity, -1)
        if self.tokens is not None:
            self.tokens = with_rows(self.tokens, new_capacity, 0)

    def append(
        self, queries: mx.array, keys: mx.array, values: mx.array
    ) -> Optional[Tuple[mx.array, mx.array, mx.array]]:
        """Store T new tokens; return (queries, keys, values) of the chunks they complete.

        The returned arrays are [B, heads, n * w, D] for the n completed chunks, in order,
        or None when no chunk completed. Their representations must be passed to
        `add_representations` before the next append. Quantized keys and values come
        back dequantized: representations are made of what attention will read.
        """
        w, start = self.chunk_size, self.offset
        T = keys.shape[2]
        end = start + T
        keys, values = self.encode(keys), self.encode(values)
        self._grow(end, queries, keys, values)
        stored, new = tree_flatten((self.keys, self.values)), tree_flatten((keys, values))
        for (_, buffer), (_, part) in zip(stored, new):
            buffer[:, :, start:end] = part
        self.offset = end

        pending = start % w
        completed = end // w - start // w
        if completed == 0:
            self.queries[:, :, pending : pending + T] = queries
            return None
        chunk_queries = mx.concatenate([self.queries[:, :, :pending], queries], axis=2)
        rest = end % w
        if rest:
            self.queries[:, :, :rest] = chunk_queries[:, :, completed * w :]
        done = chunk_queries[:, :, : completed * w]
        kept = done if self.undo_queries is None else mx.concatenate([self.undo_queries, done], axis=2)
        self.undo_queries = mx.contiguous(kept[:, :, -UNDO_CHUNKS * w :])
        first = (start // w) * w
        last = first + completed * w
        return (
            done,
            *(self.decode(self._rows(b, first, last)) for b in (self.keys, self.values)),
        )

    @staticmethod
    def _rows(buffer: Buffer, first: int, last: int) -> Buffer:
        return tree_map(lambda a: a[:, :, first:last], buffer)

    def add_representations(self, representations: mx.array) -> None:
        """Store the representations [B, H, n, D] of the n chunks `append` returned."""
        n = representations.shape[2]
        last = self.complete_chunks
        self.representations[:, :, last - n : last] = representations

    def record_choice(self, start: int, tokens: int, share: mx.array, chunks: mx.array) -> None:
        """Note the choice of the group of queries start..start+tokens-1 at its newest:
        the share [B] of its first pass's most peaked layer and that layer's top
        chunks [B, s]. The group's other tokens are noted as no group's newest."""
        B, s = chunks.shape
        if self.choices is None:
            self.choices = mx.full((B, self.capacity, 1 + s), -1.0)
        newest = mx.concatenate([share[:, None], chunks.astype(mx.float32)], axis=-1)
        rows = mx.full((B, tokens - 1, 1 + s), -1.0)
        self.choices[:, start : start + tokens] = mx.concatenate([rows, newest[:, None]], axis=1)

    def record_tokens(self, inputs: mx.array) -> None:
        """Note the ids [B, T] of a call's tokens at the offset, before they are appended,
        so that a prompt's last tokens can be read again."""
        end = self.offset + inputs.shape[1]
        if self.tokens is None:
            self.tokens = mx.zeros((inputs.shape[0], 0), mx.int32)
        if self.tokens.shape[1] < end:
            self.tokens = with_rows(self.tokens, max(end, self.capacity), 0)
        self.tokens[:, self.offset : end] = inputs.astype(mx.int32)

    def recent_choice(self, start: int, span: int) -> Tuple[mx.array, mx.array]:
        """The most peaked choice noted at the `span` tokens before `start` (after
        `record_choice`): its share [B] (-1 where none was noted) and chunks [B, s]."""
        rows = self.choices[:, max(0, start - span) : start]
        best = mx.argmax(rows[..., 0], axis=1)
        row = mx.take_along_axis(rows, best[:, None, None], axis=1)[:, 0]
        return row[:, 0], row[:, 1:].astype(mx.uint32)

    # mlx-lm's cache interface

    @property
    def state(self):
        if self.keys is None:
            return []
        w = self.chunk_size
        used = -(-self.offset // w) * w
        return (
            self._rows(self.keys, 0, used),
            self._rows(self.values, 0, used),
            self.representations[:, :, : self.complete_chunks],
            self.queries,
            self.undo_queries,
            None if self.choices is None else self.choices[:, :used],
            None if self.tokens is None else self.tokens[:, :used],
            self.prompt_end,
            self.offset,
            self.chunk_size,
            self.bits,
            self.group_size,
        )

    @state.setter
    def state(self, v):
        self.max_size = None
        if not v:
            self.keys = self.values = self.representations = self.queries = None
            self.undo_queries = self.choices = self.tokens = self.prompt_end = None
            self.offset = 0
            return
        keys, values, representations, queries, undo_queries, self.choices, self.tokens = v[:7]
        self.prompt_end, self.offset, self.chunk_size, self.bits, self.group_size = v[7:]
        # A loaded file gives lists where the state had tuples.
        self.keys, self.values = (tuple(b) if self.bits else b for b in (keys, values))
        self.queries, self.undo_queries = queries, undo_queries
        B, H, n, D = representations.shape
        capacity = self.capacity // self.chunk_size
        self.representations = mx.zeros((B, H, capacity, D), representations.dtype)
        self.representations[:, :, :n] = representations

    def size(self) -> int:
        return self.offset

    def empty(self) -> bool:
        return self.keys is None

    def is_trimmable(self) -> bool:
        """Any cut is possible; `trim` says whether it was exact by the count it returns."""
        return True

    def trim(self, n: int) -> int:
        """Forget the last n tokens (at most all); return how many were forgotten.

        Exact when the cut lands in the incomplete chunk, on a chunk boundary, or in one
        of the last `undo_chunks` complete chunks, whose raw queries come back as the
        pending ones (its representation is recomputed when it completes again).
        Elsewhere those queries are gone, so the cut moves back to the start of its
        chunk: up to w - 1 tokens more than asked, which the caller must read from the
        count and feed again (`server.LongHeadsPromptCache` makes mlx-lm's prompt-cache
        store do so; mlx-lm's speculative decoding trims only its last few tokens).
        """
        w, complete = self.chunk_size, self.complete_chunks
        chunk, inside = divmod(self.offset - min(n, self.offset), w)
        first_undo = complete - self.undo_chunks  # the oldest chunk with its queries
        if chunk < complete and inside:
            if chunk >= first_undo:
                row = (chunk - first_undo) * w
                self.queries[:, :, :inside] = self.undo_queries[:, :, row : row + inside]
            else:
                inside = 0
        if self.undo_queries is not None:
            kept = max(0, chunk - first_undo)  # complete chunks before the cut stay complete
            self.undo_queries = self.undo_queries[:, :, : kept * w] if kept else None
        if chunk < complete:  # as in a cache that never held them: no representations
            self.representations[:, :, chunk:complete] = 0
        trimmed = self.offset - (chunk * w + inside)
        self.offset -= trimmed
        if self.prompt_end is not None and self.prompt_end > self.offset:
            self.prompt_end = None
        return trimmed

    def make_mask(self, *args, **kwargs):
        """LongHeads builds its own masks per head window; mlx-lm's model passes this on."""
        return None

    def to_quantized(self, group_size: int = 64, bits: int = 4):
        """Refuse mlx-lm's kv_bits: LongHeads quantizes from the first token, by its config."""
        raise ValueError(
            "mlx-lm's kv_bits does not apply to LongHeads caches: set "
            "LongHeadsConfig(kv_bits=...) in load() (--kv-bits in the command-line tools)"
        )

    @property
    def buffers(self) -> List[mx.array]:
        """Every array the cache holds (each quantized buffer's parts separately)."""
        arrays = (self.keys, self.values, self.representations, self.queries, self.undo_queries, self.choices, self.tokens)
        return [a for _, a in tree_flatten(arrays) if a is not None]

    @property
    def nbytes(self) -> int:
        return sum(a.nbytes for a in self.buffers)


# mlx-lm's load_prompt_cache looks cache classes up by name in its own module.
mlx_lm_cache.LongHeadsCache = LongHeadsCache
