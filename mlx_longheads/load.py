"""One call from a model name (or nothing) to a LongHeads model and its tokenizer."""

from typing import Optional, Tuple

import mlx.core as mx
import mlx.nn as nn
import mlx_lm
from mlx_lm.utils import dequantize_model

from .config import LongHeadsConfig
from .models import apply_longheads


def load(
    model: Optional[str] = None,
    longheads: Optional[LongHeadsConfig] = LongHeadsConfig(),
    max_context: Optional[int] = None,
) -> Tuple[nn.Module, "mlx_lm.tokenizer_utils.TokenizerWrapper"]:
    """Load a model for mlx-lm's generate functions, with LongHeads attention.

    model: an MLX or Hugging Face folder, a .gguf file, a Hugging Face repo id, or None
      for the embedded default (SmolLM2-135M-Instruct).
    longheads: the LongHeads parameters (defaults from the model's trained length);
      None keeps mlx-lm's stock attention, for comparison.
    max_context: tokens each layer's cache allocates at once, so a long run never
      reallocates.
    On the CPU, quantized weights are dequantized and everything is cast to float32:
    MLX's CPU quantized and float16 matmuls do not use BLAS (measured 43x slower than
    float32 for a prefill block), at the cost of float32 weight memory.
    """
    from .resolve import resolve_model  # converters and hub access only when loading

    loaded, tokenizer = mlx_lm.load(str(resolve_model(model)))
    prepare(loaded, longheads, max_context)
    return loaded, tokenizer


def prepare(
    model: nn.Module, longheads: Optional[LongHeadsConfig], max_context: Optional[int] = None
) -> Optional[LongHeadsConfig]:
    """What `load` does to the model mlx-lm loaded (float32 on the CPU, LongHeads
    attention), for tools that load through mlx-lm themselves (the server); returns the
    resolved configuration (None: stock attention)."""
    if mx.default_device() == mx.cpu:
        model.set_dtype(mx.float32)  # first: float16 scales would round the weights
        dequantize_model(model)
    if longheads is None:
        return None
    return apply_longheads(model, longheads, max_size=max_context)
