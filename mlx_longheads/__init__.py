"""LongHeads context extension for mlx-lm models."""

from .blas import preload_openblas

OPENBLAS_LOADED = preload_openblas()
