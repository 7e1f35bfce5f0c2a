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
from mlx_lm.models import cache as mlx_lm_cache

from .config import LongHeadsConfig

FORMAT_VERSION = "1"


class PromptCacheError(ValueError):
    pass


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
    if not Path(path).is_file():
        raise PromptCacheError(f"no such prompt cache file: {path}")
    try:
        cache, metadata = mlx_lm_cache.load_prompt_cache(path, return_metadata=True)
    except Exception as e:
        raise PromptCacheError(f"{path} is not a readable prompt cache ({e}): delete it and rebuild it")
    expected = describe(model, config)
    if metadata.get("mlx_longheads_format") != FORMAT_VERSION:
        raise PromptCacheError(
            f"{path} was not written by this version of mlx-longheads: rebuild it"
        )
    for key in ("model", "longheads"):
        if metadata.get(key) != expected[key]:
            raise PromptCacheError(
                f"{path} was made with another {'model' if key == 'model' else 'attention configuration'} "
                f"({metadata.get(key)}, now {expected[key]}): use the same one or rebuild the cache"
            )
    return cache
