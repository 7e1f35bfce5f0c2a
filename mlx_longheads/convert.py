"""Convert a Hugging Face model (a local folder or a Hub repo) into an MLX folder,
with mlx-lm's own converter."""

from pathlib import Path
from typing import Optional, Union

from mlx_lm.convert import convert

from .atomic import atomic_folder
from .resolve import model_folder
from .support import ModelError


def convert_hf(
    hf_path: str,
    mlx_path: Union[str, Path],
    quantize: bool = False,
    q_bits: Optional[int] = None,
    q_group_size: Optional[int] = None,
    dtype: Optional[str] = None,
) -> Path:
    """Write the MLX folder of a Hugging Face model; return its path.

    As `mlx_lm.convert`: quantize with q_bits (default 4) and q_group_size (default
    64); dtype (float16, bfloat16, float32) for the unquantized weights, default the
    config's torch_dtype. Only supported architectures; the folder appears complete
    or not at all.
    """
    source = model_folder(hf_path)
    with atomic_folder(Path(mlx_path)) as out:
        try:
            convert(
                str(source),
                str(out),
                quantize=quantize,
                q_bits=q_bits,
                q_group_size=q_group_size,
                dtype=dtype,
            )
        except (FileNotFoundError, ValueError) as e:  # mlx-lm's: missing weights, bad shapes
            raise ModelError(f"{hf_path}: {e}") from e
    return Path(mlx_path)
