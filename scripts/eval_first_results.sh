#!/usr/bin/env bash
# The evaluation runs behind results/eval (CPU, 2 cores: about 2.5 hours beside other jobs
# for the first block, about 2 hours for the runs at 16k and 32k).
# Each run resumes: finished samples are kept, so raising --samples or adding lengths and
# methods only runs what is missing.
# Runs before 2026-11-30 used the paper's threshold (full attention length F = L; their
# method names have no F=) and the default L of their day (their files name L): to rerun
# one today, name both, e.g. longheads:L=2048,F=2048.
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
# Passkey past the trained length, and first ablations at 16k (2026-11-26, alone on the
# 2 cores; 16k samples after the first record which layers' heads select the key's chunk).
$python -m mlx_longheads.eval passkey --lengths 16k --samples 5 --methods longheads --output results/eval
for method in longheads:L=6144 longheads:score=rotated longheads:sel=kv_head longheads:w=128; do
    $python -m mlx_longheads.eval passkey --lengths 16k --samples 2 --methods $method --output results/eval
done
$python -m mlx_longheads.eval passkey --lengths 32k --samples 1 --methods longheads --output results/eval
$python -m mlx_longheads.eval report --output results/eval
# Second session of 2026-11-26: the H200's 8k misses (samples 3, 11, 12) rerun in float32;
# chunk 128 on 8k samples 10-19 and on the 16k misses 7 and 8; aggregation with the defaults.
$python -m mlx_longheads.eval passkey --lengths 8k --samples 1 --first-sample 3 --methods longheads --output results/eval
$python -m mlx_longheads.eval passkey --lengths 8k --samples 2 --first-sample 11 --methods longheads --output results/eval
$python -m mlx_longheads.eval passkey --lengths 8k --samples 10 --first-sample 10 --methods longheads:w=128 --output results/eval
$python -m mlx_longheads.eval aggregation --lengths 8k --samples 5 --methods longheads --output results/eval
$python -m mlx_longheads.eval passkey --lengths 16k --samples 2 --first-sample 7 --methods longheads:w=128 --output results/eval
$python -m mlx_longheads.eval needle --lengths 8k --samples 3 --first-sample 3 --methods longheads:w=128 --output results/eval
$python -m mlx_longheads.eval report --output results/eval
# Third session of 2026-11-26: L 2048 (a quarter of the trained length), the H100's best
# at 16k, on the defaults' 8k misses and neighbours, the needle at 8k, perplexity and 32k;
# then the ablations the GPU did not reach, on two of those 8k samples.
$python -m mlx_longheads.eval passkey --lengths 8k --samples 8 --first-sample 11 --methods longheads:L=2048 --output results/eval
$python -m mlx_longheads.eval needle --lengths 8k --samples 11 --methods longheads:L=2048 --output results/eval
$python -m mlx_longheads.eval perplexity --lengths 16k --samples 1 --methods longheads:L=2048 --output results/eval
$python -m mlx_longheads.eval passkey --lengths 32k --samples 2 --methods longheads:L=2048 --output results/eval
for method in forced=first forced=prev score=rotated w=64; do
    $python -m mlx_longheads.eval passkey --lengths 8k --samples 2 --first-sample 11 --methods longheads:L=2048,$method --output results/eval
done
$python -m mlx_longheads.eval report --output results/eval
# The new default (L 2048) on the rest of the 20 passkey samples at 8k.
$python -m mlx_longheads.eval passkey --lengths 8k --samples 11 --first-sample 0 --methods longheads --output results/eval
$python -m mlx_longheads.eval passkey --lengths 8k --samples 1 --first-sample 19 --methods longheads --output results/eval
$python -m mlx_longheads.eval report --output results/eval
# 2026-11-26, fourth session: the new default past the trained length. Run as two processes
# side by side (each into its own folder, merged with scripts/merge_eval_results.py; the
# lines below give the same samples run one after another): 64k samples 0-4, then 32k
# samples 2-5 and 11-12 (the runs were meant for 2-19 and stopped when the session's time ran out).
$python -m mlx_longheads.eval passkey --lengths 64k --samples 5 --methods longheads --output results/eval
$python -m mlx_longheads.eval passkey --lengths 32k --samples 4 --first-sample 2 --methods longheads --output results/eval
$python -m mlx_longheads.eval passkey --lengths 32k --samples 2 --first-sample 11 --methods longheads --output results/eval
$python -m mlx_longheads.eval report --output results/eval
# 2026-11-26, fifth session: the default's other 12 passkey samples at 32k (6-10 and 13-19),
# again as two processes side by side, merged with scripts/merge_eval_results.py.
$python -m mlx_longheads.eval passkey --lengths 32k --samples 5 --first-sample 6 --methods longheads --output results/eval
$python -m mlx_longheads.eval passkey --lengths 32k --samples 7 --first-sample 13 --methods longheads --output results/eval
# and, at a low priority (nice 19) beside those two, the first 128k sample:
$python -m mlx_longheads.eval passkey --lengths 128k --samples 1 --methods longheads --output results/eval
$python -m mlx_longheads.eval report --output results/eval
# 2026-11-26, sixth session: the default's other four 128k samples (1-4), as two processes
# side by side into /tmp folders (about 35 tokens/s each, 62 min a sample), then merged:
#   $python -m mlx_longheads.eval passkey --lengths 128k --samples 2 --first-sample 1 --methods longheads --output /tmp/ev/A
#   $python -m mlx_longheads.eval passkey --lengths 128k --samples 2 --first-sample 3 --methods longheads --output /tmp/ev/B
#   $python scripts/merge_eval_results.py /tmp/ev/A /tmp/ev/B results/eval
# Run in place, the same samples are:
$python -m mlx_longheads.eval passkey --lengths 128k --samples 4 --first-sample 1 --methods longheads --output results/eval
$python -m mlx_longheads.eval report --output results/eval
# and then multikey at 8k, samples 0-5, again as two processes (into /tmp/ev/C and /tmp/ev/D, merged):
$python -m mlx_longheads.eval multikey --lengths 8k --samples 6 --methods longheads --output results/eval
$python -m mlx_longheads.eval report --output results/eval
# 2026-11-30, seventh session (issue 17): the full attention length F = the trained length
# (the new default) with the paper's per-head selection and with the pooled one, needle and
# passkey at 16k, and perplexity. Run as processes side by side into /tmp folders, then
# merged with scripts/merge_eval_results.py (each process prefilled a sample's first 8192
# tokens once and handed both selections a copy):
#   needle 16k samples 0-5 (/tmp/ev/A) and 6-10 (/tmp/ev/B); passkey 16k samples 0-1 (C), 2-3 (D)
$python -m mlx_longheads.eval needle --lengths 16k --samples 11 --methods longheads:sel=pooled,longheads:sel=query_head --output results/eval
$python -m mlx_longheads.eval passkey --lengths 16k --samples 4 --methods longheads:sel=pooled,longheads:sel=query_head --output results/eval
$python -m mlx_longheads.eval perplexity --lengths 16k --samples 1 --methods longheads:sel=pooled,longheads:sel=query_head --output results/eval
# and one 32k sample of each (/tmp/ev/F, /tmp/ev/G), the default (pooled, F = 8192) only:
$python -m mlx_longheads.eval needle --lengths 32k --samples 1 --first-sample 1 --methods longheads:sel=pooled --output results/eval
$python -m mlx_longheads.eval passkey --lengths 32k --samples 1 --methods longheads:sel=pooled --output results/eval
$python -m mlx_longheads.eval report --output results/eval
# 2026-11-30, eighth session (issue 17): multikey at 16k with the default (pooled, F = 8192),
# as processes side by side into /tmp folders (samples 0-4, 5-7, 8-9), and the pass key at
# 64k (samples 0, 1, 2: one process each), then merged with scripts/merge_eval_results.py:
$python -m mlx_longheads.eval multikey --lengths 16k --samples 10 --methods longheads:sel=pooled --output results/eval
$python -m mlx_longheads.eval passkey --lengths 64k --samples 3 --methods longheads:sel=pooled --output results/eval
$python -m mlx_longheads.eval report --output results/eval
# 2026-11-30, ninth session (issue 17): the "peak" selection (each layer's shared slots follow
# the most peaked pooled attention of the layers so far in the forward call), F = 8192, on
# the needle grid at 16k, multikey at 16k (the default's misses first), perplexity and one pass
# key at 16k, one sample per
# process in /tmp folders (--first-sample N --samples 1), merged with scripts/merge_eval_results.py:
$python -m mlx_longheads.eval needle --lengths 16k --samples 11 --methods longheads:sel=peak --output results/eval
$python -m mlx_longheads.eval multikey --lengths 16k --samples 10 --methods longheads:sel=peak --output results/eval
$python -m mlx_longheads.eval perplexity --lengths 16k --samples 1 --methods longheads:sel=peak --output results/eval
$python -m mlx_longheads.eval passkey --lengths 16k --samples 1 --methods longheads:sel=peak --output results/eval
$python -m mlx_longheads.eval report --output results/eval
# and quantized K/V at 8k (issue 18; stopped after its first record: kv=8 sample 0):
$python -m mlx_longheads.eval passkey --lengths 8k --samples 2 --methods longheads:kv=8,longheads:kv=4 --output results/eval
$python -m mlx_longheads.eval report --output results/eval
# 2026-11-30, tenth session (issue 17): the "two_pass" selection (each group past F through the
# model twice, every layer's shared slots following the first pass's most peaked layer), F = 8192,
# on the same samples, one sample per process in /tmp folders (--first-sample N --samples 1),
# merged with scripts/merge_eval_results.py:
$python -m mlx_longheads.eval needle --lengths 16k --samples 11 --methods longheads:sel=two_pass --output results/eval
$python -m mlx_longheads.eval multikey --lengths 16k --samples 10 --methods longheads:sel=two_pass --output results/eval
$python -m mlx_longheads.eval perplexity --lengths 16k --samples 1 --methods longheads:sel=two_pass --output results/eval
$python -m mlx_longheads.eval passkey --lengths 16k --samples 1 --methods longheads:sel=two_pass --output results/eval
$python -m mlx_longheads.eval report --output results/eval
# and one 32k needle sample (1, depth 50%) with the new default (two_pass), beside the soak:
$python -m mlx_longheads.eval needle --lengths 32k --samples 1 --first-sample 1 --methods longheads --output results/eval
$python -m mlx_longheads.eval report --output results/eval
# 2026-12-01, eleventh session (issue 17): the default (two_pass) on the rest of the 32k needle
# grid, one sample per process (scripts/eval_parallel.sh, two at a time, and sample 10 alone),
# merged with scripts/merge_eval_results.py:
$python -m mlx_longheads.eval needle --lengths 32k --samples 11 --methods longheads --output results/eval
$python -m mlx_longheads.eval report --output results/eval

# 2026-12-01, twelfth session (issue 17): two_pass_topk (the most peaked layer measured by its
# top shared_slots chunks) on the 16k needle grid and the 32k miss at depth 70% (sample 10),
# one sample per process (scripts/eval_parallel.sh, two at a time), merged as above:
$python -m mlx_longheads.eval needle --lengths 16k --samples 11 --methods longheads:sel=two_pass_topk --output results/eval
$python -m mlx_longheads.eval needle --lengths 32k --samples 1 --first-sample 10 --methods longheads:sel=two_pass_topk --output results/eval
$python -m mlx_longheads.eval report --output results/eval

# 2026-12-01, thirteenth session (issue 17): two_pass_carry (a group's second pass keeps the
# most peaked first-pass choice of the chunk_size tokens before it), two_pass's misses first,
# then the 16k needle grid's samples 1-9 (every depth but 0% and 70%) and perplexity; one
# sample per process (scripts/eval_parallel.sh, two at a time), merged with
# scripts/merge_eval_results.py:
$python -m mlx_longheads.eval needle --lengths 16k --samples 9 --first-sample 1 --methods longheads:sel=two_pass_carry --output results/eval
$python -m mlx_longheads.eval needle --lengths 32k --samples 1 --first-sample 10 --methods longheads:sel=two_pass_carry --output results/eval
for sample in 2 4 9; do  # two_pass's multikey misses
  $python -m mlx_longheads.eval multikey --lengths 16k --samples 1 --first-sample $sample --methods longheads:sel=two_pass_carry --output results/eval
done
$python -m mlx_longheads.eval perplexity --lengths 16k --samples 1 --methods longheads:sel=two_pass_carry --output results/eval
$python -m mlx_longheads.eval report --output results/eval

# 2026-12-01, fourteenth session (issue 17): two_pass_carry's grids completed where they were
# not rerun (needle 16k depths 0% and 70%; multikey 16k, two_pass's seven hits; passkey 16k
# sample 0), and two_pass_reuse (a decoded token takes a choice noted within the chunk before
# it without a first pass) on two_pass_carry's wins; one sample per process
# (scripts/eval_parallel.sh, two at a time, plus one), merged with scripts/merge_eval_results.py:
for sample in 0 10; do
  $python -m mlx_longheads.eval needle --lengths 16k --samples 1 --first-sample $sample --methods longheads:sel=two_pass_carry --output results/eval
done
for sample in 0 1 3 5 6 7 8; do
  $python -m mlx_longheads.eval multikey --lengths 16k --samples 1 --first-sample $sample --methods longheads:sel=two_pass_carry --output results/eval
done
$python -m mlx_longheads.eval passkey --lengths 16k --samples 1 --methods longheads:sel=two_pass_carry --output results/eval
$python -m mlx_longheads.eval needle --lengths 16k --samples 1 --first-sample 5 --methods longheads:sel=two_pass_reuse --output results/eval
for sample in 2 4; do
  $python -m mlx_longheads.eval multikey --lengths 16k --samples 1 --first-sample $sample --methods longheads:sel=two_pass_reuse --output results/eval
done
$python -m mlx_longheads.eval report --output results/eval
