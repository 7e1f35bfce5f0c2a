"""What a failed conversion may leave in its output folder's parent: nothing."""

from pathlib import Path


def no_folder_left(parent: Path, name: str = "mlx") -> bool:
    """Neither the output folder nor its staging folder (a hidden sibling) exists."""
    return not [p for p in parent.iterdir() if p.name == name or p.name.startswith(f".{name}.")]
