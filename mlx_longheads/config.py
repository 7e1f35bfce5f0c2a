"""LongHeads parameters, their defaults and the rules they must obey."""

from dataclasses import dataclass, replace
from typing import Literal, Optional

Selection = Literal["query_head", "kv_head"]
Prefill = Literal["grouped", "exact"]

DEFAULT_CHUNK_SIZE = 256


class ConfigError(ValueError):
    """A LongHeads configuration that cannot work; the message names the broken rule."""


@dataclass(frozen=True)
class LongHeadsConfig:
    """How each head picks its chunks.

    chunk_size: tokens per chunk (w).
    attention_length: keys one head may see (L = k * w); at most the trained length.
      None: half the model's trained length, the reference author's advice, which the
      throwaway prototype confirmed on SmolLM2 (4096 found a 16k passkey, 2048 did not).
    selection: "query_head" picks chunks per query head (the paper's rule);
      "kv_head" sums the scores of a GQA group and picks once per KV head.
    prefill: "grouped" lets the queries of one chunk within one forward call share a
      selection (one attention call per chunk); "exact" selects per token.
    """

    chunk_size: Optional[int] = None
    attention_length: Optional[int] = None
    selection: Selection = "query_head"
    prefill: Prefill = "grouped"

    @property
    def num_chunks(self) -> int:
        """k: chunks one head attends to (first + k-3 retrieved + previous + own)."""
        return self.attention_length // self.chunk_size

    def resolve(self, trained_length: Optional[int]) -> "LongHeadsConfig":
        """Fill the defaults from the model's trained length and check every rule."""
        attention_length = self.attention_length
        if attention_length is None:
            if trained_length is None:
                raise ConfigError(
                    "the model config has no max_position_embeddings: "
                    "set attention_length explicitly"
                )
            attention_length = trained_length // 2
        chunk_size = self.chunk_size
        if chunk_size is None:
            chunk_size = min(DEFAULT_CHUNK_SIZE, attention_length // 4)
        config = replace(self, chunk_size=chunk_size, attention_length=attention_length)
        config.check(trained_length)
        return config

    def check(self, trained_length: Optional[int]) -> None:
        w, L = self.chunk_size, self.attention_length
        if w is None or L is None:
            raise ConfigError("chunk_size and attention_length must be set (call resolve)")
        if w < 1:
            raise ConfigError(f"chunk_size must be positive, got {w}")
        if L % w:
            raise ConfigError(
                f"attention_length {L} must be a multiple of chunk_size {w}: "
                "choose a chunk_size that divides it"
            )
        if L // w < 4:
            raise ConfigError(
                f"attention_length {L} holds {L // w} chunks of {w}; at least 4 are needed "
                "(first, one retrieved, previous, own): lower chunk_size or raise attention_length"
            )
        if trained_length is not None and L > trained_length:
            raise ConfigError(
                f"attention_length {L} exceeds the model's trained length {trained_length}: "
                f"positions past it are what LongHeads avoids; use at most {trained_length}"
            )
        if self.selection not in ("query_head", "kv_head"):
            raise ConfigError(
                f"selection must be 'query_head' or 'kv_head', got {self.selection!r}"
            )
        if self.prefill not in ("grouped", "exact"):
            raise ConfigError(f"prefill must be 'grouped' or 'exact', got {self.prefill!r}")
