"""Fetch a model from the Hugging Face Hub, with errors that say what to do instead."""

from pathlib import Path

from huggingface_hub import constants, snapshot_download
from huggingface_hub.errors import (
    HFValidationError,
    LocalEntryNotFoundError,
    RepositoryNotFoundError,
)
from mlx_lm.utils import DEFAULT_ALLOW_PATTERNS

from .support import ModelError


def download(repo_id: str) -> Path:
    """The local snapshot of a Hub repo: the files mlx-lm reads, from the cache or the Hub."""
    try:
        return Path(snapshot_download(repo_id, allow_patterns=DEFAULT_ALLOW_PATTERNS))
    except HFValidationError as e:
        raise ModelError(f"{repo_id!r} is neither a local path nor a Hugging Face repo id") from e
    except RepositoryNotFoundError as e:
        raise ModelError(
            f"{repo_id}: no such Hugging Face repo, or it is private or gated "
            "(log in with `hf auth login`); or pass a local folder or .gguf file"
        ) from e
    except LocalEntryNotFoundError as e:
        if constants.HF_HUB_OFFLINE:
            fix = "HF_HUB_OFFLINE is set: unset it to download"
        else:
            fix = "the Hub cannot be reached: connect to download"
        raise ModelError(
            f"{repo_id} is not in the Hugging Face cache and {fix}, "
            "or pass a local folder or .gguf file"
        ) from e
