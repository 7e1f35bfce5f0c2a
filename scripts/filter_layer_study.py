"""Does the calibration's layer find what questions about real text ask for?

`mlx_longheads.calibrate` picks the filter layer of the "one_pass_filter" selection from
random-token prompts (a planted segment, repeated at the end). This study measures the
same per-layer share (the pooled attention of the prompt's last token on the chunk that
holds the answer) on the eval's prompts inside the trained length, and reports per layer
the calibration's share beside the mean share on each task, and where each ranks the
calibrated layer.

  python scripts/filter_layer_study.py --tasks fact,needle,multikey --length 4096 --samples 4 \
      --output results/filter_layer_study.md
"""

import argparse
from pathlib import Path

import mlx_longheads  # noqa: F401  (loads OpenBLAS before MLX on Linux)
import numpy as np

from mlx_longheads import LongHeadsConfig, load
from mlx_longheads.calibrate import calibrate, planted_shares
from mlx_longheads.eval import code_version
from mlx_longheads.tasks import make_sample


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tasks", default="fact,needle,multikey")
    parser.add_argument("--length", type=int, default=4096)
    parser.add_argument("--samples", type=int, default=4)
    parser.add_argument("--output", type=Path, required=True)
    args = parser.parse_args()

    version = code_version()  # the code that runs, not the one when the report is written
    model, tokenizer = load(None, LongHeadsConfig(selection="query_head"))
    config = model.layers[0].self_attn.config
    found = calibrate(model, config)
    print(f"calibration: layer {found.layer}, shares {found.shares}", flush=True)
    rows = {"calibration (random tokens)": np.array(found.shares)}
    for task in args.tasks.split(","):
        shares, used = [], []
        for index in range(args.samples):
            sample = make_sample(task, tokenizer, args.length, index)
            tokens = tokenizer.encode(sample.prompt)
            chunk, own = sample.answer_chunk(tokenizer, config.chunk_size), (len(tokens) - 1) // config.chunk_size
            if not 1 <= chunk <= own - 2:  # chunk 0, the previous and the own are in every window
                print(f"{task} {index}: the answer's chunk {chunk} is no candidate (own {own}), skipped", flush=True)
                continue
            shares.append(planted_shares(model, config, tokens, chunk))
            used.append(str(index))
            print(f"{task} {index}: best layer {int(np.argmax(shares[-1]))}, shares {np.round(shares[-1], 3).tolist()}", flush=True)
        rows[f"{task} {args.length} (samples {', '.join(used)})"] = np.mean(shares, axis=0)

    layers = len(found.shares)
    lines = [
        "# The filter layer: the calibration beside questions about real text",
        "",
        f"Commit {version}; SmolLM2-135M-Instruct, float32, chunk {config.chunk_size}; prompts inside "
        "the trained length (the model's own attention). Per layer, the share of the prompt's last token's "
        "pooled attention (`longheads.pooled_attention`) on the chunk holding the answer, mean over the "
        f"prompts; the calibration picks layer **{found.layer}**.",
        "",
        f"`python scripts/filter_layer_study.py --tasks {args.tasks} --length {args.length} --samples {args.samples} "
        f"--output {args.output}`",
        "",
        "| prompts | best layer | calibrated layer's rank | calibrated layer's share | best share |",
        "|---|---|---|---|---|",
    ]
    for name, shares in rows.items():
        rank = 1 + int((shares > shares[found.layer]).sum())
        lines.append(f"| {name} | {int(np.argmax(shares))} | {rank} of {layers} | {shares[found.layer]:.3f} | {shares.max():.3f} |")
    lines += ["", "Per layer:", "", "| layer | " + " | ".join(rows) + " |", "|---" * (len(rows) + 1) + "|"]
    for layer in range(layers):
        lines.append(f"| {layer} | " + " | ".join(f"{s[layer]:.3f}" for s in rows.values()) + " |")
    args.output.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
