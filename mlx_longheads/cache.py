"""The chunked KV cache LongHeads attends over, in mlx-lm's cache interface (0.32.2).

Per layer it stores the keys rotated by their offset inside their chunk (the query is
rotated for the window slot a chunk lands in, so a key can sit in any slot), the
values, one representation per complete chunk and query head, and the raw queries of
the current incomplete chunk only (they are needed to compute that chunk's
representation once it completes). Buffers grow in whole chunks, by at least 2048
tokens and an eighth of their size, so appending is amortised O(1) per token and the
spare room of a large cache stays under about 12.5%.
"""

from typing import Optional, Tuple

import mlx.core as mx
from mlx_lm.models import cache as mlx_lm_cache
from mlx_lm.models.cache import _BaseCache

MIN_GROWTH = 2048


class LongHeadsCache(_BaseCache):
    def __init__(self, chunk_size: int, max_size: Optional[int] = None):
        """max_size: tokens to allocate at once (for example the CLI's max-context)."""
        self.chunk_size = chunk_size
        self.max_size = max_size
        self.keys: Optional[mx.array] = None  # [B, Hk, capacity, D], R(k_i, i mod w)
        self.values: Optional[mx.array] = None  # [B, Hk, capacity, Dv]
        self.representations: Optional[mx.array] = None  # [B, H, capacity / w, D]
        self.queries: Optional[mx.array] = None  # [B, H, w, D]: the incomplete chunk's
        self.offset = 0

    @property
    def complete_chunks(self) -> int:
        return self.offset // self.chunk_size

    def _grow(self, needed: int, queries: mx.array, keys: mx.array, values: mx.array):
        w = self.chunk_size
        capacity = 0 if self.keys is None else self.keys.shape[2]
        if needed <= capacity:
            return
        if self.max_size is not None and needed <= self.max_size:
            new_capacity = self.max_size
        else:
            new_capacity = max(needed, capacity + max(MIN_GROWTH, capacity // 8))
        new_capacity = -(-new_capacity // w) * w
        B, Hk, _, D = keys.shape
        H = queries.shape[1]

        def extend(buffer: Optional[mx.array], shape, dtype) -> mx.array:
            fresh = mx.zeros(shape, dtype)
            if buffer is None:
                return fresh
            fresh[:, :, : buffer.shape[2]] = buffer
            return fresh

        self.keys = extend(self.keys, (B, Hk, new_capacity, D), keys.dtype)
        self.values = extend(
            self.values, (B, Hk, new_capacity, values.shape[3]), values.dtype
        )
        self.representations = extend(
            self.representations, (B, H, new_capacity // w, D), queries.dtype
        )
        if self.queries is None:
            self.queries = mx.zeros((B, H, w, queries.shape[3]), queries.dtype)

    def append(
        self, queries: mx.array, keys: mx.array, values: mx.array
    ) -> Optional[Tuple[mx.array, mx.array, mx.array]]:
        """Store T new tokens; return (queries, keys, values) of the chunks they complete.

        The returned arrays are [B, heads, n * w, D] for the n completed chunks, in order,
        or None when no chunk completed. Their representations must be passed to
        `add_representations` before the next append.
        """
        w, start = self.chunk_size, self.offset
        T = keys.shape[2]
        end = start + T
        self._grow(end, queries, keys, values)
        self.keys[:, :, start:end] = keys
        self.values[:, :, start:end] = values
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
        first = (start // w) * w
        last = first + completed * w
        return (
            chunk_queries[:, :, : completed * w],
            self.keys[:, :, first:last],
            self.values[:, :, first:last],
        )

    def add_representations(self, representations: mx.array) -> None:
        """Store the representations [B, H, n, D] of the n chunks `append` returned."""
        n = representations.shape[2]
        last = self.complete_chunks
        self.representations[:, :, last - n : last] = representations

    def chunked(self, buffer: mx.array) -> mx.array:
        """View a [B, Hk, capacity, D] buffer as [B, Hk, capacity / w, w, D]."""
        B, Hk, capacity, D = buffer.shape
        return buffer.reshape(B, Hk, capacity // self.chunk_size, self.chunk_size, D)

    # mlx-lm's cache interface

    @property
    def state(self):
        if self.keys is None:
            return []
        w = self.chunk_size
        used = -(-self.offset // w) * w
        return (
            self.keys[:, :, :used],
            self.values[:, :, :used],
            self.representations[:, :, : self.complete_chunks],
            self.queries,
            self.offset,
            self.chunk_size,
        )

    @state.setter
    def state(self, v):
        self.max_size = None
        if not v:
            self.keys = self.values = self.representations = self.queries = None
            self.offset = 0
            return
        keys, values, representations, queries, self.offset, self.chunk_size = v
        self.keys, self.values, self.queries = keys, values, queries
        B, H, n, D = representations.shape
        capacity = keys.shape[2] // self.chunk_size
        self.representations = mx.zeros((B, H, capacity, D), representations.dtype)
        self.representations[:, :, :n] = representations

    def size(self) -> int:
        return self.offset

    def empty(self) -> bool:
        return self.keys is None

    def is_trimmable(self) -> bool:
        return False

    def make_mask(self, *args, **kwargs):
        """LongHeads builds its own masks per head window; mlx-lm's model passes this on."""
        return None

    def to_quantized(self, group_size: int = 64, bits: int = 4):
        """Refuse rather than let mlx-lm's kv_bits silently do nothing."""
        raise ValueError(
            "kv_bits is not supported with LongHeads attention yet: "
            "drop --kv-bits (or use a more quantized model to save memory)"
        )

    @property
    def nbytes(self) -> int:
        if self.keys is None:
            return 0
        return sum(
            a.nbytes
            for a in (self.keys, self.values, self.representations, self.queries)
        )


# mlx-lm's load_prompt_cache looks cache classes up by name in its own module.
mlx_lm_cache.LongHeadsCache = LongHeadsCache
