"""Which layer of a loaded model finds a passage its last tokens ask for: the filter layer.

The "one_pass_filter" selection (and the "*_prompt" ones at a decoded token) lets one
layer's pooled attention (how much attention its heads give each chunk together,
`longheads.pooled_attention`) choose the chunks the whole model shares. Which layer does
that best is a property of the model: on SmolLM2's retrieval prompts the most peaked layer
was one of the middle-to-late ones (docs/evaluation.md), and GemFilter and TidalDecode
found one middle layer of Llama-3-8B.
So the library finds it on the loaded model, from its shape and weights alone:

  a prompt of random tokens (inside the trained length, run with the model's own
  attention whatever F is) holds a
  segment of them planted in one chunk, and ends with the segment's first tokens again; a
  model continues such a repeat by attending to the segment (induction). At the
  prompt's last token every layer's pooled attention over the candidate chunks is
  measured, and the layer that gives the planted chunk the largest share, averaged
  over a few prompts with the segment at other depths, is the filter layer.

Random tokens need no tokenizer and no text, so any supported model calibrates alike.
The result depends only on the weights and the configuration; it is kept per model on
disk, in the cache folder (`resolve.cache_dir()`), so a model is calibrated once.
"""

import hashlib
import json
import os
import sys
from contextlib import contextmanager
from dataclasses import dataclass, replace
from typing import Iterator, List

import mlx.core as mx
import mlx.nn as nn
import numpy as np

from .cache import LongHeadsCache
from .config import ConfigError, LongHeadsConfig
from .longheads import pooled_attention

PROMPT_CHUNKS = 12  # chunks in a calibration prompt (fewer where the trained length holds fewer)
MIN_CHUNKS = 6  # the first, four candidates and the own chunk
PROMPTS = 3
SEED = 0


@dataclass(frozen=True)
class Calibration:
    """The filter layer and what it was chosen from (per layer, the mean share of the
    pooled attention on the planted chunk)."""

    layer: int
    shares: List[float]


def calibration_prompts(vocab_size: int, chunk_size: int, chunks: int) -> List[tuple]:
    """(tokens, planted chunk) for each calibration prompt: random token ids from the
    middle of the vocabulary (clear of special tokens at either end); the segment is a
    quarter of a chunk, planted a quarter into a candidate chunk (the prompts spread
    over the candidates' depths), and the cue its first tokens, a sixteenth of a chunk."""
    rng = np.random.default_rng(SEED)
    low, high = vocab_size // 8, vocab_size // 2
    candidates = range(1, chunks - 2)  # 1 .. own-2 for the last token's own chunk
    planted = [candidates[round(i * (len(candidates) - 1) / max(PROMPTS - 1, 1))] for i in range(PROMPTS)]
    segment, cue = max(chunk_size // 4, 4), max(chunk_size // 16, 2)  # the cue repeats the first
    prompts = []
    for chunk in planted:
        tokens = rng.integers(low, high, size=chunks * chunk_size - cue)  # the cue ends in the last chunk
        start = chunk * chunk_size + segment
        prompts.append((np.concatenate([tokens, tokens[start : start + cue]]).tolist(), chunk))
    return prompts


def last_queries(cache: LongHeadsCache) -> mx.array:
    """The raw query of the cache's newest token, [B, H, D]."""
    pending = cache.offset % cache.chunk_size
    if pending:
        return cache.queries[:, :, pending - 1]
    return cache.undo_queries[:, :, -1]


def planted_shares(model: nn.Module, config: LongHeadsConfig, tokens: List[int], chunk: int) -> np.ndarray:
    """Per layer, the share of the pooled attention of the prompt's last token that
    falls on `chunk` (the prompt held inside F, `own_attention`: the model's own attention)."""
    caches = model.make_cache()
    mx.eval(model(mx.array([tokens]), cache=caches))
    own = mx.array([(len(tokens) - 1) // config.chunk_size])
    shares = []
    for layer, cache in zip(model.layers, caches):
        attention = layer.self_attn
        mass = pooled_attention(last_queries(cache)[:, :, None], cache, own, attention.rope, attention.scale)
        shares.append(mass[0, 0, chunk] / mass[0, 0].sum())
    return np.array(mx.stack(shares), dtype=np.float64)


def fingerprint(model: nn.Module, config: LongHeadsConfig) -> str:
    """A key for the weights and the configuration the calibration depends on: the
    model's shape, a slice of every layer's query projection, the chunk size and the
    prompts' length."""
    shape = (model.args.model_type, len(model.layers), config.chunk_size, prompt_chunks(model, config), PROMPTS, SEED)
    digest = hashlib.sha256(repr(shape).encode())
    for layer in model.layers:
        digest.update(np.array(layer.self_attn.q_proj.weight[:2].astype(mx.float32)).tobytes())
    return digest.hexdigest()[:20]


def prompt_chunks(model: nn.Module, config: LongHeadsConfig) -> int:
    """Chunks in a calibration prompt: PROMPT_CHUNKS, or as many as the trained length holds."""
    trained = model.args.max_position_embeddings // config.chunk_size
    chunks = min(PROMPT_CHUNKS, trained)
    if chunks < MIN_CHUNKS:
        raise ConfigError(
            f"the {config.selection} selection calibrates its filter layer on {MIN_CHUNKS} chunks or more "
            f"inside the model's trained length, which holds {trained} of {config.chunk_size} tokens: "
            "lower chunk_size or set filter_layer"
        )
    return chunks


@contextmanager
def own_attention(model: nn.Module, config: LongHeadsConfig, tokens: int) -> Iterator[None]:
    """The model's layers with F raised to `tokens` (within the trained length) for the
    calibration prompts: the model's own attention over them, whatever F the user chose."""
    calibrating = replace(config, full_attention_length=max(config.full_attention_length, tokens))
    for layer in model.layers:
        layer.self_attn.config = calibrating
    try:
        yield
    finally:
        for layer in model.layers:
            layer.self_attn.config = config


def calibrate(model: nn.Module, config: LongHeadsConfig) -> Calibration:
    """Find the filter layer of a model with LongHeads attention (see the module's note)."""
    chunks = prompt_chunks(model, config)
    prompts = calibration_prompts(model.args.vocab_size, config.chunk_size, chunks)
    measured = []
    with own_attention(model, config, chunks * config.chunk_size):
        for number, (tokens, chunk) in enumerate(prompts, 1):
            print(f"\rCalibrating the filter layer (once per model): prompt {number}/{len(prompts)}",
                  end="", file=sys.stderr, flush=True)
            measured.append(planted_shares(model, config, tokens, chunk))
    shares = np.mean(measured, axis=0)
    layer = int(np.argmax(shares))
    print(f"\rCalibrated the filter layer: {layer} of {len(shares)}".ljust(72), file=sys.stderr)
    return Calibration(layer, [round(float(s), 4) for s in shares])


def filter_layer(model: nn.Module, config: LongHeadsConfig) -> int:
    """The calibrated filter layer, read from the cache folder where it was found before."""
    from .resolve import cache_dir  # the converters' module, loaded only when needed

    path = cache_dir() / "calibration" / f"{fingerprint(model, config)}.json"
    if path.exists():
        return json.loads(path.read_text())["layer"]
    found = calibrate(model, config)
    path.parent.mkdir(parents=True, exist_ok=True)
    staging = path.with_suffix(f".{os.getpid()}.tmp")  # another process may calibrate the same model
    staging.write_text(json.dumps({"layer": found.layer, "shares": found.shares}) + "\n")
    os.replace(staging, path)
    return found.layer
