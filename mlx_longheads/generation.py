"""Generation with LongHeads: mlx-lm's functions, with the limits checked before work."""

import argparse
import re
import sys
import time
from typing import Generator, List, Optional, Union

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
from mlx_lm.generate import GenerationResponse
from mlx_lm.tokenizer_utils import TokenizerWrapper

from .config import LongHeadsConfig
from .models import longheads_config
from .memory import available_bytes, cache_bytes, gigabytes, weight_bytes, WORKSPACE_BYTES

DEFAULT_MAX_CONTEXT = 131072


class LimitError(ValueError):
    """A run that cannot work as asked; the message names the way out."""


def parse_context_length(text: str) -> int:
    """'32k' -> 32768, '128K' -> 131072, '1m' -> 1048576, '131072' -> 131072."""
    match = re.fullmatch(r"\s*(\d+)\s*([kKmM]?)\s*", text)
    if not match or int(match.group(1)) == 0:
        raise argparse.ArgumentTypeError(
            f"invalid context length {text!r}: use a token count like 32k, 128k, 131072 or 1m"
        )
    unit = {"": 1, "k": 1024, "m": 1024 * 1024}[match.group(2).lower()]
    return int(match.group(1)) * unit


def format_context_length(n: int) -> str:
    """32768 -> '32k', 1000 -> '1000': the inverse of parse_context_length for labels."""
    return f"{n // 1024}k" if n and n % 1024 == 0 else str(n)


def truncate(tokens: List[int], limit: int, cut: Optional[str]) -> List[int]:
    """Cut a prompt to limit tokens: cut='start', 'middle' or 'end' says which part goes."""
    if len(tokens) <= limit:
        return tokens
    if cut is None:
        raise LimitError(
            f"the prompt has {len(tokens)} tokens, more than the maximum context of {limit}: "
            "raise --max-context or pass --truncate start|middle|end"
        )
    if cut == "start":
        return tokens[len(tokens) - limit :]
    if cut == "end":
        return tokens[:limit]
    head = limit // 2
    return tokens[:head] + tokens[len(tokens) - (limit - head) :]


def check_memory(
    model: nn.Module, tokens: int, longheads: Optional[LongHeadsConfig]
) -> None:
    """Refuse before prefill when weights + cache at `tokens` exceed the machine."""
    weights, cache = weight_bytes(model), cache_bytes(model, tokens, longheads)
    needed, have = weights + cache + WORKSPACE_BYTES, available_bytes()
    if needed > have:
        raise LimitError(
            f"this run needs about {gigabytes(needed)} (weights {gigabytes(weights)}, "
            f"cache {gigabytes(cache)} at {tokens} tokens, workspace {gigabytes(WORKSPACE_BYTES)}) "
            f"but {gigabytes(have)} is available: lower --max-context or use a more "
            "quantized model"
        )


def stream_generate(
    model: nn.Module,
    tokenizer: TokenizerWrapper,
    prompt: Union[str, List[int], mx.array],
    max_tokens: int = 256,
    max_context: Optional[int] = None,
    **kwargs,
) -> Generator[GenerationResponse, None, None]:
    """mlx_lm.stream_generate, refusing what would fail or be silently ignored.

    max_context: the most tokens the prompt may have (it is never truncated here).
    kv_bits is mlx-lm's for stock attention only: a LongHeads model's caches quantize
    (or not) by its LongHeadsConfig, so passing both would mean two quantizations.
    """
    if kwargs.get("kv_bits") is not None and longheads_config(model) is not None:
        raise LimitError(
            "kv_bits of a LongHeads model is part of its configuration (it quantizes from "
            "the first token): load(..., longheads=LongHeadsConfig(kv_bits=8)) instead"
        )
    if len(prompt) == 0:  # before encoding: a tokenizer may turn "" into a BOS token
        raise LimitError("the prompt is empty: give some text")
    if isinstance(prompt, str):
        prompt = tokenizer.encode(prompt)
    if max_context is not None:
        truncate(list(prompt), max_context, None)
    yield from mlx_lm.stream_generate(model, tokenizer, prompt, max_tokens, **kwargs)


def generate(model, tokenizer, prompt, max_tokens: int = 256, **kwargs) -> str:
    """The whole response as one string (see `stream_generate`)."""
    return "".join(
        r.text for r in stream_generate(model, tokenizer, prompt, max_tokens, **kwargs)
    )


def prefill_status(done: int, total: int, elapsed: float) -> str:
    """Tokens done of the prompt, the rate and the time left, for a progress line."""
    rate = done / elapsed if elapsed > 0 else 0.0
    left = f", {(total - done) / rate:,.0f}s left" if rate > 0 else ""
    return f"{done}/{total} tokens, {rate:,.1f} tok/s{left}"


class PrefillProgress:
    """A progress bar on stderr for the prompt: tokens done, tokens/s, time left."""

    def __init__(self, stream=sys.stderr):
        self.stream = stream
        self.start = None

    def __call__(self, done: int, total: int) -> None:
        now = time.perf_counter()
        if self.start is None:
            self.start = now
            return
        filled = int(30 * done / max(total, 1))
        status = prefill_status(done, total, now - self.start)
        self.stream.write(f"\rprefill [{'#' * filled}{'.' * (30 - filled)}] {status} ")
        if done >= total:
            self.stream.write("\n")
        self.stream.flush()
