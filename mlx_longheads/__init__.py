"""LongHeads context extension for mlx-lm models."""

from .blas import preload_openblas

# Before anything imports mlx: MLX's CPU backend then uses OpenBLAS where installed.
OPENBLAS_LOADED = preload_openblas()

from .config import LongHeadsConfig  # noqa: E402
from .generation import generate, stream_generate  # noqa: E402
from .load import load  # noqa: E402

__all__ = ["LongHeadsConfig", "load", "generate", "stream_generate", "OPENBLAS_LOADED"]
