"""Write a model folder so that it either appears complete or not at all."""

import os
import shutil
import tempfile
from contextlib import contextmanager
from pathlib import Path
from typing import Iterator

from .support import ModelError


@contextmanager
def atomic_folder(target: Path) -> Iterator[Path]:
    """Yield a not yet existing path beside `target` to build the folder in.

    On success it is renamed to `target` (one step on the same file system); on any
    failure, Ctrl-C included, it is deleted, so a half-written folder never loads.
    """
    target = Path(target)
    exists = f"{target} already exists: delete it or choose another output path"
    if target.exists():
        raise ModelError(exists)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(prefix=f".{target.name}.", dir=target.parent))
    try:
        yield staging / target.name
        try:
            os.rename(staging / target.name, target)
        except OSError as e:  # another process finished the same folder first
            if not target.exists():
                raise
            raise ModelError(exists) from e
    finally:
        shutil.rmtree(staging, ignore_errors=True)
