"""Convert a GGUF file of a llama (Mistral's are llama too), qwen2 or qwen3 model to an
MLX folder. (Not named gguf.py: a script of that name would hide the gguf package.)

python convert/gguf_to_mlx.py --gguf-path FILE.gguf --mlx-path DIR [--dtype float16]
"""

import argparse

from mlx_longheads.gguf import convert_gguf
from mlx_longheads.cli import exit_on_bad_input


def main() -> None:
    parser = argparse.ArgumentParser(description="Convert a GGUF file to MLX format.")
    parser.add_argument("--gguf-path", required=True, help="the .gguf file")
    parser.add_argument("--mlx-path", default="mlx_model", help="output folder (must not exist)")
    parser.add_argument(
        "--dtype",
        choices=["float16", "bfloat16", "float32"],
        help="unquantized weights (default: as stored; decoded K-quants float16)",
    )
    args = parser.parse_args()
    exit_on_bad_input(lambda: convert_gguf(**vars(args)))


if __name__ == "__main__":
    main()
