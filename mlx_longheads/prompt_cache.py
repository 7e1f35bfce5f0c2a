"""Prompt caches on disk: written atomically, versioned, and checked against the model.

A long document read once (minutes of prefill) is saved and questioned again later. The
file is mlx-lm's prompt-cache format with metadata naming the format version, the model
and the LongHeads parameters, so a cache made with another model or configuration is
refused by name rather than producing nonsense.
"""

import json
import os
from dataclasses import asdict
from pathlib import Path
from typing import Any, List, Optional

import mlx.nn as nn
from mlx.utils import tree_flatten
from mlx_lm.models import cache as mlx_lm_cache

from .cache import UNDO_CHUNKS, LongHeadsCache
from .config import REMOVED_SELECTIONS, SELECTIONS, LongHeadsConfig

# 2: the cache state carries kv_bits and kv_group_size (quantized K/V).
# 3: and the raw queries of the last complete chunks (exact trim).
# 4: and the choices of the selections that link layers (None for the others).
# 5: and the token ids "one_pass_reread" reads a question again from (None for the others).
FORMAT_VERSION = "5"
REBUILD = "delete it and run the prompt again to rebuild it"


class PromptCacheError(ValueError):
    """A prompt cache file that cannot continue this run; the message says to rebuild it."""


def describe(model: nn.Module, config: Optional[LongHeadsConfig]) -> dict:
    """What a cache depends on: the model's shape and the attention configuration."""
    args = model.args
    return {
        "mlx_longheads_format": FORMAT_VERSION,
        "model": json.dumps(
            {
                "model_type": args.model_type,
                "layers": len(model.layers),
                "hidden_size": args.hidden_size,
                "heads": args.num_attention_heads,
                "kv_heads": args.num_key_value_heads,
                "vocab_size": args.vocab_size,
            },
            sort_keys=True,
        ),
        "longheads": json.dumps(asdict(config) if config else None, sort_keys=True),
    }


def save_prompt_cache(
    path: str, cache: List[Any], model: nn.Module, config: Optional[LongHeadsConfig]
) -> None:
    """Write to a temporary file beside the target, then rename: a killed write never
    leaves a file that loads."""
    target = Path(path)
    tmp = target.with_name(f".{target.name}.tmp.safetensors")
    mlx_lm_cache.save_prompt_cache(str(tmp), cache, describe(model, config))
    os.replace(tmp, target)


def load_prompt_cache(
    path: str, model: nn.Module, config: Optional[LongHeadsConfig]
) -> List[Any]:
    """The cache saved at path, refused unless it fits this model and configuration."""
    if not Path(path).is_file():
        raise PromptCacheError(f"no such prompt cache file: {path}")
    try:
        cache, metadata = mlx_lm_cache.load_prompt_cache(path, return_metadata=True)
    except Exception as e:  # mx.load, JSON and tree errors of a truncated or corrupt file
        raise PromptCacheError(f"{path} is not a readable prompt cache ({e}): {REBUILD}")
    version = metadata.get("mlx_longheads_format")
    if version != FORMAT_VERSION:
        written = "not by mlx-longheads" if version is None else f"in format version {version}"
        raise PromptCacheError(
            f"{path} was written {written}; this version reads prompt-cache format "
            f"{FORMAT_VERSION} only: {REBUILD}"
        )
    selection = saved_selection(metadata)
    if selection in REMOVED_SELECTIONS:
        raise PromptCacheError(
            f"{path} was made with selection {selection!r}, which this version no longer has "
            f"(it has {', '.join(SELECTIONS)}): {REBUILD}"
        )
    expected = describe(model, config)
    for key, what in (("model", "model"), ("longheads", "attention configuration")):
        if metadata.get(key) != expected[key]:
            raise PromptCacheError(
                f"{path} was made with another {what} ({metadata.get(key)}, now "
                f"{expected[key]}): use the same one, or {REBUILD}"
            )
    problem = inconsistency(cache, model)
    if problem:
        raise PromptCacheError(f"{path} is corrupt ({problem}): {REBUILD}")
    return cache


def saved_selection(metadata: dict) -> Optional[str]:
    """The selection a cache's metadata names (None for stock attention or unreadable)."""
    try:
        return (json.loads(metadata.get("longheads") or "null") or {}).get("selection")
    except (ValueError, AttributeError):
        return None


def inconsistency(cache: List[Any], model: nn.Module) -> Optional[str]:
    """What makes a cache's arrays disagree with each other or with the model, if anything.

    The metadata matching is not enough: flipped bytes in the arrays (the offsets are
    arrays too) would otherwise load and attend to garbage or fail deep in a layer.
    """
    if len(cache) != len(model.layers):
        return f"{len(cache)} layers, the model has {len(model.layers)}"
    offsets = {c.offset for c in cache}
    if len(offsets) != 1:
        return f"the layers hold different token counts {sorted(offsets)}"
    for c in cache:
        if not isinstance(c, LongHeadsCache) or c.empty():
            continue
        w, held = c.chunk_size, c.capacity
        stored = {a.shape[2] for _, a in tree_flatten((c.keys, c.values))}
        if held % w or held < c.offset or stored != {held}:
            return f"{held} stored tokens for {c.offset} in chunks of {w}"
        if c.queries.shape[2] != w:
            return f"{c.queries.shape[2]} pending queries for chunks of {w}"
        undo = 0 if c.undo_queries is None else c.undo_queries.shape[2]
        if undo % w or undo > min(UNDO_CHUNKS, c.complete_chunks) * w:
            return f"{undo} queries kept of complete chunks of {w}, {c.complete_chunks} complete"
        if c.choices is not None and c.choices.shape[1] != held:
            return f"{c.choices.shape[1]} noted choices for {held} stored tokens"
        if c.tokens is not None and c.tokens.shape[1] != held:
            return f"{c.tokens.shape[1]} noted token ids for {held} stored tokens"
    return None
