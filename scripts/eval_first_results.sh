#!/usr/bin/env bash
# The evaluation runs behind results/eval (CPU, 2 cores: about 2.5 hours beside other jobs
# for the first block, about 2 hours for the passkey runs past the trained length).
# Each run resumes: finished samples are kept, so raising --samples or adding lengths and
# methods only runs what is missing.
set -euo pipefail
cd "$(dirname "$0")/.."
python=.venv/bin/python
$python -m mlx_longheads.eval passkey --lengths 8k --samples 3 --methods longheads,full,window --output results/eval
$python -m mlx_longheads.eval needle --lengths 2k,4k --samples 3 --methods longheads:L=1024,w=128,full --output results/eval
$python -m mlx_longheads.eval perplexity --lengths 16k --samples 1 --methods longheads,full --output results/eval
$python -m mlx_longheads.eval report --output results/eval
$python -m mlx_longheads.eval passkey --lengths 8k --samples 3 --methods longheads:sel=kv_head --output results/eval
$python -m mlx_longheads.eval aggregation --lengths 4k --samples 3 --methods longheads:L=1024,w=128,full --output results/eval
$python -m mlx_longheads.eval report --output results/eval
# Passkey past the trained length (2026-11-26, alone on the 2 cores).
$python -m mlx_longheads.eval passkey --lengths 16k --samples 5 --methods longheads --output results/eval
$python -m mlx_longheads.eval passkey --lengths 32k --samples 3 --methods longheads --output results/eval
$python -m mlx_longheads.eval passkey --lengths 64k --samples 1 --methods longheads --output results/eval
$python -m mlx_longheads.eval report --output results/eval
