#!/usr/bin/env bash
# The README's example run: a 12k-token passkey prompt (1.5x SmolLM2's trained length)
# through the CLI, with its output and statistics, into results/readme_run.txt.
set -euo pipefail
cd "$(dirname "$0")/.."
prompt=results/passkey_12k_prompt.txt
.venv/bin/python - "$prompt" <<'PY'
import sys
from mlx_longheads import load
from mlx_longheads.passkey import passkey_prompt
_, tokenizer = load(longheads=None)
open(sys.argv[1], "w").write(passkey_prompt(tokenizer, 12288, 0.3, 57221).prompt)
PY
command=".venv/bin/python -m mlx_longheads.generate --prompt-file $prompt --ignore-chat-template --max-tokens 8 --verbose"
{
  echo "\$ $command"
  # The progress bar redraws with \r: keep only its last state.
  $command 2>&1 | tr '\r' '\n' | awk '/^prefill \[/ {bar = $0; next} {if (bar) print bar; bar = ""; print}' 
} > results/readme_run.txt
cat results/readme_run.txt
