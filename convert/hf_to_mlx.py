"""Convert a Hugging Face model to an MLX folder.

python convert/hf_to_mlx.py --hf-path REPO_OR_FOLDER --mlx-path DIR
    [-q [--q-bits 4] [--q-group-size 64]] [--dtype float16]
"""

import argparse

from mlx_longheads.convert import convert_hf
from mlx_longheads.cli import exit_on_bad_input


def main() -> None:
    parser = argparse.ArgumentParser(description="Convert a Hugging Face model to MLX format.")
    parser.add_argument(
        "--hf-path", required=True, help="local model folder or Hugging Face repo id"
    )
    parser.add_argument("--mlx-path", default="mlx_model", help="output folder (must not exist)")
    parser.add_argument("-q", "--quantize", action="store_true", help="quantize the weights")
    parser.add_argument(
        "--q-bits", type=int, choices=[2, 3, 4, 5, 6, 8], help="bits per weight (default 4)"
    )
    parser.add_argument(
        "--q-group-size", type=int, choices=[32, 64, 128], help="group size (default 64)"
    )
    parser.add_argument(
        "--dtype", choices=["float16", "bfloat16", "float32"], help="unquantized weights"
    )
    args = parser.parse_args()
    exit_on_bad_input(lambda: convert_hf(**vars(args)))


if __name__ == "__main__":
    main()
