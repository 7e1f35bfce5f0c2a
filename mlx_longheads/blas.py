"""Use Debian's OpenBLAS for MLX's CPU backend when it is installed.

The Linux `mlx-cpu` wheel bundles the reference BLAS (about 7 GFLOP/s for float32
matmul). Loading OpenBLAS with RTLD_GLOBAL before the first `import mlx` makes MLX's
cblas calls resolve to it, measured 16-47x faster. Without the library nothing changes.
"""

import ctypes
import ctypes.util
import sys


def preload_openblas() -> bool:
    """Load OpenBLAS globally if possible; return whether it was loaded in time."""
    if not sys.platform.startswith("linux") or "mlx.core" in sys.modules:
        return False
    name = ctypes.util.find_library("openblas")
    if name is None:
        return False
    try:
        ctypes.CDLL(name, mode=ctypes.RTLD_GLOBAL)
    except OSError:
        return False
    return True
