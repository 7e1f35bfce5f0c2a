"""LongHeads parameters, their defaults and the rules they must obey."""

from dataclasses import dataclass, replace
from typing import Literal, Optional

Selection = Literal[
    "two_pass_carry", "one_pass_filter", "two_pass_prompt", "one_pass_prompt", "one_pass_reread", "query_head", "kv_head"
]
SELECTIONS = ("two_pass_carry", "one_pass_filter", "two_pass_prompt", "one_pass_prompt", "one_pass_reread", "query_head", "kv_head")
LINKED_SELECTIONS = ("two_pass_carry", "one_pass_filter", "two_pass_prompt", "one_pass_prompt", "one_pass_reread")
# A calibrated filter layer chooses (for a decoded token at least).
FILTERING_SELECTIONS = ("one_pass_filter", "two_pass_prompt", "one_pass_prompt", "one_pass_reread")
# Selections that lost their comparison, when they left the library and what answers what
# they did (docs/evaluation.md has their results and the commits that removed them).
REMOVED_SELECTIONS = {
    "pooled": ("2026-12-02", "two_pass_carry"),
    "peak": ("2026-12-02", "two_pass_carry"),
    "two_pass": ("2026-12-02", "two_pass_carry"),
    "two_pass_topk": ("2026-12-02", "two_pass_carry"),
    "two_pass_reuse": ("2026-12-03", "one_pass_filter, at the paper's reads,"),
    "two_pass_tail": ("2026-12-03", "two_pass_prompt"),
    "two_pass_checked": ("2026-12-03", "two_pass_prompt"),
}
Prefill = Literal["grouped", "exact"]

DEFAULT_CHUNK_SIZE = 256
KV_BITS = (4, 8)
KV_GROUP_SIZES = (32, 64, 128)  # what mx.quantize accepts
DEFAULT_KV_GROUP_SIZE = 64  # mlx-lm's --kv-group-size default


class ConfigError(ValueError):
    """A LongHeads configuration that cannot work; the message names the broken rule."""


@dataclass(frozen=True)
class LongHeadsConfig:
    """How each head picks its chunks.

    chunk_size: tokens per chunk (w).
    attention_length: keys one head may see (L = k * w); at most the trained length.
      None: a quarter of the model's trained length, the best of a quarter, half and
      three quarters on SmolLM2's passkey at 16k (README, "Evaluation").
    full_attention_length: a query with at most this many tokens up to and including it
      attends to all of them (stock attention); past it, each head selects. At least
      attention_length (which is the paper's threshold), at most the trained length.
      None: the trained length, so inside it LongHeads answers what the model does.
    selection: "one_pass_reread" (the default): as "one_pass_prompt", and at a prompt's
      last token (a call of one token after a call of several, past F), where that token
      chose anew, the question, the tokens from the chunk before the last token's on, is
      read again with every layer following its choice, before it is read again
      (`longheads.RereadRelay`): past F the question's keys and values were made in
      windows chosen before the question was complete, which in many layers missed the
      fact it asks about; read again, twice the plain facts answered at 16k (README).
      "one_pass_prompt": a group of several queries past F (a prompt's chunk) in one
      pass, each layer following the most peaked of the layers up to it and the recent
      choice (`longheads.PeakedRelay`), a group of one (a decoded token) as
      "one_pass_filter" (`longheads.PromptRelay`): the default until 2026-12-04.
      "two_pass_prompt": as "one_pass_prompt", but a prompt's chunk as "two_pass_carry"
      reads it (twice): the default until 2026-12-03, at half the prefill speed.
      "two_pass_carry" runs each group of queries past F through the model twice: the
      first pass measures every layer's pooled attention (how much of it the layer's
      heads give each chunk together), and in the second every layer's
      shared slots hold the chunks of the most peaked layer, or those of an earlier
      group's within the chunk_size tokens before it where that was more peaked
      (`longheads.CarryRelay`): a question's choice carries into the answer's tokens.
      "one_pass_filter": one pass; one layer, found on the loaded model by a
      calibration (`calibrate`), measures its pooled attention, and its choice (kept
      against the recent ones as "two_pass_carry" keeps them) fills the shared slots of
      the layers after it and, at the next group, of the layers before it
      (`longheads.FilterRelay`): what "two_pass_carry" shares, at about the paper's
      reads (one layer's keys, not every layer's, and the weights once).
      "query_head": the paper's rule, each query head picks its chunks by q . rep_c;
      "kv_head": the paper's rule per KV head (the scores of a GQA group summed).
    prefill: "grouped" lets the queries of one chunk within one forward call share a
      selection (one attention call per chunk); "exact" selects per token.
    kv_bits: store keys and values quantized to 4 or 8 bits (None: the model's float
      dtype), from the first token on; about a quarter (8 bits) of float32's K/V memory.
      On SmolLM2 8 bits cost 0.3% perplexity, 4 bits 19% (README, "What kv_bits costs").
    kv_group_size: elements sharing one scale and bias, along the head dim; None: 64,
      or the head dim when it is smaller.
    filter_layer: the layer whose choice "one_pass_filter" (and "two_pass_prompt" and
      "one_pass_prompt" and "one_pass_reread" at a decoded token) shares; None: calibrated on the loaded model when LongHeads is applied.
    """

    chunk_size: Optional[int] = None
    attention_length: Optional[int] = None
    selection: Selection = "one_pass_reread"
    prefill: Prefill = "grouped"
    kv_bits: Optional[int] = None
    kv_group_size: Optional[int] = None
    full_attention_length: Optional[int] = None
    filter_layer: Optional[int] = None

    @property
    def num_chunks(self) -> int:
        """k: chunks one head attends to (first + k-3 retrieved + previous + own)."""
        return self.attention_length // self.chunk_size

    @property
    def token_passes(self) -> int:
        """Passes through the model of a group of one query past F (a decoded token): two
        with "two_pass_carry" (every layer's pooled attention measured in the first)."""
        return 2 if self.selection == "two_pass_carry" else 1

    @property
    def filters(self) -> bool:
        """Whether a filter layer (`filter_layer`, calibrated) chooses for a decoded token."""
        return self.selection in FILTERING_SELECTIONS

    @property
    def notes_tokens(self) -> bool:
        """Whether layer 0's cache notes the token ids, to read a question again from them."""
        return self.selection == "one_pass_reread"

    @property
    def links_layers(self) -> bool:
        """Whether a layer's selection takes a choice made in another layer (a relay,
        `longheads.CarryRelay`, `longheads.FilterRelay`, `longheads.PromptRelay`), so that each group of queries
        past F is a call of its own."""
        return self.selection in LINKED_SELECTIONS

    @property
    def shared_slots(self) -> int:
        """Retrieved slots the two-pass selections give every head of a layer alike:
        half of the k - 3, rounded up."""
        return -(-(self.num_chunks - 3) // 2)

    @property
    def full_chunks(self) -> int:
        """Own chunks below this get ordinary causal attention (unresolved: the paper's k)."""
        return (self.full_attention_length or self.attention_length) // self.chunk_size

    def resolve(
        self, trained_length: Optional[int], head_dim: Optional[int] = None
    ) -> "LongHeadsConfig":
        """Fill the defaults from the model's trained length (and head dim) and check
        every rule."""
        attention_length = self.attention_length
        if attention_length is None:
            if trained_length is None:
                raise ConfigError(
                    "the model config has no max_position_embeddings: "
                    "set attention_length explicitly"
                )
            attention_length = trained_length // 4
        chunk_size = self.chunk_size
        if chunk_size is None:
            chunk_size = min(DEFAULT_CHUNK_SIZE, attention_length // 4)
        kv_group_size = self.kv_group_size
        if kv_group_size is None and self.kv_bits is not None:
            kv_group_size = min(DEFAULT_KV_GROUP_SIZE, head_dim or DEFAULT_KV_GROUP_SIZE)
        full_attention_length = self.full_attention_length
        if full_attention_length is None:
            full_attention_length = trained_length or attention_length
        config = replace(
            self,
            chunk_size=chunk_size,
            attention_length=attention_length,
            kv_group_size=kv_group_size,
            full_attention_length=full_attention_length,
        )
        config.check(trained_length, head_dim)
        return config

    def check(self, trained_length: Optional[int], head_dim: Optional[int] = None) -> None:
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
        F = self.full_attention_length
        if F is None:
            raise ConfigError("full_attention_length must be set (call resolve)")
        if F < L or F % w:
            raise ConfigError(
                f"full_attention_length {F} must be a multiple of chunk_size {w} and at least "
                f"attention_length {L}: use {L} for the paper's rule, or the trained length"
            )
        if trained_length is not None and F > trained_length:
            raise ConfigError(
                f"full_attention_length {F} exceeds the model's trained length {trained_length}: "
                f"use at most {trained_length}"
            )
        if self.selection in REMOVED_SELECTIONS:
            day, successor = REMOVED_SELECTIONS[self.selection]
            raise ConfigError(
                f"selection {self.selection!r} was removed on {day} ({successor} answers what it "
                f"did): use one of {', '.join(map(repr, SELECTIONS))}"
            )
        if self.selection not in SELECTIONS:
            raise ConfigError(
                f"selection must be one of {', '.join(map(repr, SELECTIONS))}, got {self.selection!r}"
            )
        if self.filter_layer is not None and (not self.filters or self.filter_layer < 0):
            raise ConfigError(
                f"filter_layer {self.filter_layer} applies to the "
                f"{', '.join(FILTERING_SELECTIONS[:-1])} and {FILTERING_SELECTIONS[-1]} selections only, "
                "as a layer index from 0: "
                "drop it or set selection='one_pass_filter'"
            )
        if self.prefill not in ("grouped", "exact"):
            raise ConfigError(f"prefill must be 'grouped' or 'exact', got {self.prefill!r}")
        if self.kv_bits is None:
            if self.kv_group_size is not None:
                raise ConfigError(
                    f"kv_group_size {self.kv_group_size} only applies to quantized K/V: "
                    "set kv_bits too, or drop kv_group_size"
                )
            return
        if self.kv_bits not in KV_BITS:
            raise ConfigError(
                f"kv_bits must be one of {KV_BITS} (or None for float K/V), got {self.kv_bits}"
            )
        group = self.kv_group_size
        if group not in KV_GROUP_SIZES:
            raise ConfigError(
                f"kv_group_size must be one of {KV_GROUP_SIZES} (what mx.quantize accepts), "
                f"got {group}" + (f" (the head dim {head_dim})" if group == head_dim else "")
            )
        if head_dim is not None and head_dim % group:
            raise ConfigError(
                f"kv_group_size {group} must divide the head dim {head_dim}: "
                f"use one of {[g for g in KV_GROUP_SIZES if head_dim % g == 0] or 'none'}"
            )
