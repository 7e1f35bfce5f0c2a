#!/usr/bin/env bash
# Many `python -m mlx_longheads.eval` runs at once, all stopped at one deadline: a 135M
# model leaves a GPU mostly idle per process, so parallel processes fill it. Each run
# writes to its own folder (finished samples survive the deadline); the results are then
# merged into OUTPUT/merged, which `python -m mlx_longheads.eval report` reads.
# usage: scripts/eval_parallel.sh JOBS_FILE OUTPUT SECONDS [PARALLEL]
#   JOBS_FILE: one run's eval arguments per line, most important first ('#' comments).
set -uo pipefail
jobs_file=$1 output=$2 seconds=$3 parallel=${4:-12}
export output python=${PYTHON:-python3} deadline=$(( $(date +%s) + seconds ))
mkdir -p "$output/runs" "$output/logs" "$output/merged"
$python -c "from mlx_longheads.resolve import resolve_model; resolve_model(None)"  # convert once, not per run

run() {  # run NUMBER EVAL_ARGS...: one eval run, interrupted at the deadline
    local number=$1 left=$(( deadline - $(date +%s) ))
    shift
    (( left > 30 )) || { echo "run $number: not started (deadline)"; return 0; }
    echo "run $number: $*"
    PYTHONUNBUFFERED=1 timeout -s INT "$left" $python -m mlx_longheads.eval "$@" \
        --output "$output/runs/$number" >"$output/logs/$number.log" 2>&1
    echo "run $number: exit $? after $(( $(date +%s) + left - deadline ))s"
}
export -f run
grep -v '^\s*\(#\|$\)' "$jobs_file" | nl -nrz -w3 | xargs -P "$parallel" -L 1 bash -c 'run "$@"' _

$python "$(dirname "$0")/merge_eval_results.py" "$output"/runs/* "$output/merged"
