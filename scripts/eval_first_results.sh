#!/usr/bin/env bash
# The evaluation runs behind results/eval (CPU, 2 cores), in the order they ran; each block
# names its date and the commits that added its records. Each run resumes: finished samples
# are kept, so raising --samples or adding lengths and methods only runs what is missing.
# Every LongHeads method names its attention length L, its full attention length F and its
# selection, so that each command reruns what it ran then whatever today's defaults are.
# The defaults changed: L from half to a quarter of the trained length (8192) on 2026-11-26;
# F from L (the paper's threshold; such names have no F=) to the trained length on
# 2026-11-30; the selection from query_head to pooled (2026-11-30), two_pass and
# two_pass_carry (2026-12-01). The chunk size w (256 unless named) and prefill=grouped
# have not changed.
# Runs made as processes side by side, each into its own /tmp folder, were merged with
# scripts/merge_eval_results.py; the commands here run the same samples in place.
set -euo pipefail
cd "$(dirname "$0")/.."
python=.venv/bin/python

# 2026-11-26 (commits 88697ae, c88af11): the first results, about 2.5 hours beside other jobs.
$python -m mlx_longheads.eval passkey --lengths 8k --samples 3 --methods longheads:L=4096,F=4096,sel=query_head,full,window:L=4096 --output results/eval
$python -m mlx_longheads.eval needle --lengths 2k,4k --samples 3 --methods longheads:L=1024,w=128,F=1024,sel=query_head,full --output results/eval
$python -m mlx_longheads.eval perplexity --lengths 16k --samples 1 --methods longheads:L=4096,F=4096,sel=query_head,full --output results/eval
$python -m mlx_longheads.eval report --output results/eval
$python -m mlx_longheads.eval passkey --lengths 8k --samples 3 --methods longheads:L=4096,F=4096,sel=kv_head --output results/eval
$python -m mlx_longheads.eval aggregation --lengths 4k --samples 3 --methods longheads:L=1024,w=128,F=1024,sel=query_head,full --output results/eval
$python -m mlx_longheads.eval report --output results/eval

# 2026-11-26 (commits 4ac0bf9, 6407e76, fe88c76): the pass key past the trained length, and
# the first ablations at 16k (alone on the 2 cores; 16k samples after the first record which
# layers' heads select the key's chunk).
$python -m mlx_longheads.eval passkey --lengths 16k --samples 5 --methods longheads:L=4096,F=4096,sel=query_head --output results/eval
for method in longheads:L=6144,F=6144,sel=query_head longheads:L=4096,F=4096,sel=query_head,score=rotated \
    longheads:L=4096,F=4096,sel=kv_head longheads:L=4096,w=128,F=4096,sel=query_head; do
    $python -m mlx_longheads.eval passkey --lengths 16k --samples 2 --methods $method --output results/eval
done
$python -m mlx_longheads.eval passkey --lengths 32k --samples 1 --methods longheads:L=4096,F=4096,sel=query_head --output results/eval
$python -m mlx_longheads.eval report --output results/eval

# 2026-11-26 (commits c1fde5e to 1d0bffa): the H200's 8k misses (samples 3, 11, 12) rerun in
# float32; chunk 128 on 8k samples 10-19 and on the 16k misses 7 and 8; aggregation at 8k.
$python -m mlx_longheads.eval passkey --lengths 8k --samples 1 --first-sample 3 --methods longheads:L=4096,F=4096,sel=query_head --output results/eval
$python -m mlx_longheads.eval passkey --lengths 8k --samples 2 --first-sample 11 --methods longheads:L=4096,F=4096,sel=query_head --output results/eval
$python -m mlx_longheads.eval passkey --lengths 8k --samples 10 --first-sample 10 --methods longheads:L=4096,w=128,F=4096,sel=query_head --output results/eval
$python -m mlx_longheads.eval aggregation --lengths 8k --samples 5 --methods longheads:L=4096,F=4096,sel=query_head --output results/eval
$python -m mlx_longheads.eval passkey --lengths 16k --samples 2 --first-sample 7 --methods longheads:L=4096,w=128,F=4096,sel=query_head --output results/eval
$python -m mlx_longheads.eval needle --lengths 8k --samples 3 --first-sample 3 --methods longheads:L=4096,w=128,F=4096,sel=query_head --output results/eval
$python -m mlx_longheads.eval report --output results/eval

# 2026-11-26 (commits ea30518, 9bb5135): L 2048 (a quarter of the trained length), the H100's
# best at 16k, on the 8k misses of L 4096 and their neighbours, the needle at 8k, perplexity
# and 32k; then the ablations the GPU did not reach, on two of those 8k samples.
$python -m mlx_longheads.eval passkey --lengths 8k --samples 8 --first-sample 11 --methods longheads:L=2048,F=2048,sel=query_head --output results/eval
$python -m mlx_longheads.eval needle --lengths 8k --samples 11 --methods longheads:L=2048,F=2048,sel=query_head --output results/eval
$python -m mlx_longheads.eval perplexity --lengths 16k --samples 1 --methods longheads:L=2048,F=2048,sel=query_head --output results/eval
$python -m mlx_longheads.eval passkey --lengths 32k --samples 2 --methods longheads:L=2048,F=2048,sel=query_head --output results/eval
for method in forced=first forced=prev score=rotated w=64; do
    $python -m mlx_longheads.eval passkey --lengths 8k --samples 2 --first-sample 11 --methods longheads:L=2048,F=2048,sel=query_head,$method --output results/eval
done
$python -m mlx_longheads.eval report --output results/eval

# 2026-11-26 (commit 92156de): L 2048, the new default, on the rest of the 20 passkey samples at 8k.
$python -m mlx_longheads.eval passkey --lengths 8k --samples 11 --first-sample 0 --methods longheads:L=2048,F=2048,sel=query_head --output results/eval
$python -m mlx_longheads.eval passkey --lengths 8k --samples 1 --first-sample 19 --methods longheads:L=2048,F=2048,sel=query_head --output results/eval
$python -m mlx_longheads.eval report --output results/eval

# 2026-11-26 (commit 47809fe): L 2048 past the trained length, as two processes side by side:
# 64k samples 0-4, then 32k samples 2-5 and 11-12 (the runs, meant for 2-19, were stopped there).
$python -m mlx_longheads.eval passkey --lengths 64k --samples 5 --methods longheads:L=2048,F=2048,sel=query_head --output results/eval
$python -m mlx_longheads.eval passkey --lengths 32k --samples 4 --first-sample 2 --methods longheads:L=2048,F=2048,sel=query_head --output results/eval
$python -m mlx_longheads.eval passkey --lengths 32k --samples 2 --first-sample 11 --methods longheads:L=2048,F=2048,sel=query_head --output results/eval
$python -m mlx_longheads.eval report --output results/eval

# 2026-11-26 (commits 846e404, 5df556f): the other 12 passkey samples at 32k (6-10 and 13-19),
# as two processes side by side:
$python -m mlx_longheads.eval passkey --lengths 32k --samples 5 --first-sample 6 --methods longheads:L=2048,F=2048,sel=query_head --output results/eval
$python -m mlx_longheads.eval passkey --lengths 32k --samples 7 --first-sample 13 --methods longheads:L=2048,F=2048,sel=query_head --output results/eval
# and, at a low priority (nice 19) beside those two, the first 128k sample:
$python -m mlx_longheads.eval passkey --lengths 128k --samples 1 --methods longheads:L=2048,F=2048,sel=query_head --output results/eval
$python -m mlx_longheads.eval report --output results/eval

# 2026-11-26 (commits 549daed, 55c051c): the other four 128k samples (1-4), as two processes
# side by side into /tmp folders (about 35 tokens/s each, 62 min a sample), then merged:
#   $python -m mlx_longheads.eval passkey --lengths 128k --samples 2 --first-sample 1 --methods longheads:L=2048,F=2048,sel=query_head --output /tmp/ev/A
#   $python -m mlx_longheads.eval passkey --lengths 128k --samples 2 --first-sample 3 --methods longheads:L=2048,F=2048,sel=query_head --output /tmp/ev/B
#   $python scripts/merge_eval_results.py /tmp/ev/A /tmp/ev/B results/eval
# Run in place, the same samples are:
$python -m mlx_longheads.eval passkey --lengths 128k --samples 4 --first-sample 1 --methods longheads:L=2048,F=2048,sel=query_head --output results/eval
$python -m mlx_longheads.eval report --output results/eval
# and then multikey at 8k, samples 0-5, again as two processes:
$python -m mlx_longheads.eval multikey --lengths 8k --samples 6 --methods longheads:L=2048,F=2048,sel=query_head --output results/eval
$python -m mlx_longheads.eval report --output results/eval

# 2026-11-30 (commits ceb733e, e76ecfe): the full attention length F = the trained length with
# the paper's per-head selection and with the pooled one, needle and passkey at 16k, and
# perplexity; processes side by side (needle 16k samples 0-5 and 6-10, passkey 16k samples
# 0-1 and 2-3), each prefilling a sample's first 8192 tokens once for both selections.
$python -m mlx_longheads.eval needle --lengths 16k --samples 11 --methods longheads:L=2048,F=8192,sel=query_head --output results/eval
$python -m mlx_longheads.eval passkey --lengths 16k --samples 4 --methods longheads:L=2048,F=8192,sel=query_head --output results/eval
$python -m mlx_longheads.eval perplexity --lengths 16k --samples 1 --methods longheads:L=2048,F=8192,sel=query_head --output results/eval
# pooled was removed from the library on 2026-12-02 (commit c250878); the records stay in results/:
#   $python -m mlx_longheads.eval needle --lengths 16k --samples 11 --methods longheads:L=2048,F=8192,sel=pooled --output results/eval
#   $python -m mlx_longheads.eval passkey --lengths 16k --samples 4 --methods longheads:L=2048,F=8192,sel=pooled --output results/eval
#   $python -m mlx_longheads.eval perplexity --lengths 16k --samples 1 --methods longheads:L=2048,F=8192,sel=pooled --output results/eval
# and one 32k sample of each with pooled, the default then (removed from the library on
# 2026-12-02; the records stay in results/):
#   $python -m mlx_longheads.eval needle --lengths 32k --samples 1 --first-sample 1 --methods longheads:L=2048,F=8192,sel=pooled --output results/eval
#   $python -m mlx_longheads.eval passkey --lengths 32k --samples 1 --methods longheads:L=2048,F=8192,sel=pooled --output results/eval
$python -m mlx_longheads.eval report --output results/eval

# 2026-11-30 (commits 254feb6, dc1b13e): multikey at 16k with pooled, the default then
# (processes side by side: samples 0-4, 5-7, 8-9), and the pass key at 64k (samples 0, 1, 2:
# one process each). pooled was removed from the library on 2026-12-02 (commit c250878); the records stay in results/:
#   $python -m mlx_longheads.eval multikey --lengths 16k --samples 10 --methods longheads:L=2048,F=8192,sel=pooled --output results/eval
#   $python -m mlx_longheads.eval passkey --lengths 64k --samples 3 --methods longheads:L=2048,F=8192,sel=pooled --output results/eval

# 2026-11-30 (commit ebec547): the "peak" selection (each layer's shared slots follow the most
# peaked pooled attention of the layers so far in the forward call) on the needle grid at 16k,
# multikey at 16k (pooled's misses first), perplexity and one pass key at 16k, one sample per
# process (--first-sample N --samples 1). peak was removed from the library on 2026-12-02 (commit c250878);
# the records stay in results/:
#   $python -m mlx_longheads.eval needle --lengths 16k --samples 11 --methods longheads:L=2048,F=8192,sel=peak --output results/eval
#   $python -m mlx_longheads.eval multikey --lengths 16k --samples 10 --methods longheads:L=2048,F=8192,sel=peak --output results/eval
#   $python -m mlx_longheads.eval perplexity --lengths 16k --samples 1 --methods longheads:L=2048,F=8192,sel=peak --output results/eval
#   $python -m mlx_longheads.eval passkey --lengths 16k --samples 1 --methods longheads:L=2048,F=8192,sel=peak --output results/eval
# and quantized K/V at 8k with pooled, the default then (commit 32db76f; the run was stopped
# after its first record, kv=8 sample 0). pooled was removed from the library on 2026-12-02 (commit c250878);
# the records stay in results/:
#   $python -m mlx_longheads.eval passkey --lengths 8k --samples 2 --methods longheads:L=2048,F=8192,sel=pooled,kv=8,longheads:L=2048,F=8192,sel=pooled,kv=4 --output results/eval

# 2026-12-01 (commit 7a4bbdc): the "two_pass" selection (each group past F through the model
# twice, every layer's shared slots following the first pass's most peaked layer) on the same
# samples, one sample per process; then (commit 0d9e52c) one 32k needle sample (1, depth 50%)
# with two_pass, the default then. two_pass was removed from the library on 2026-12-02 (commit c250878); the
# records stay in results/:
#   $python -m mlx_longheads.eval needle --lengths 16k --samples 11 --methods longheads:L=2048,F=8192,sel=two_pass --output results/eval
#   $python -m mlx_longheads.eval multikey --lengths 16k --samples 10 --methods longheads:L=2048,F=8192,sel=two_pass --output results/eval
#   $python -m mlx_longheads.eval perplexity --lengths 16k --samples 1 --methods longheads:L=2048,F=8192,sel=two_pass --output results/eval
#   $python -m mlx_longheads.eval passkey --lengths 16k --samples 1 --methods longheads:L=2048,F=8192,sel=two_pass --output results/eval
#   $python -m mlx_longheads.eval needle --lengths 32k --samples 1 --first-sample 1 --methods longheads:L=2048,F=8192,sel=two_pass --output results/eval

# 2026-12-01 (commit 2991445): two_pass on the rest of the 32k needle grid, one sample per
# process (scripts/eval_parallel.sh, two at a time, and sample 10 alone). Removed from the
# library on 2026-12-02; the records stay in results/:
#   $python -m mlx_longheads.eval needle --lengths 32k --samples 11 --methods longheads:L=2048,F=8192,sel=two_pass --output results/eval

# 2026-12-01 (commit 269025e): two_pass_topk (the most peaked layer measured by its top
# shared_slots chunks) on the 16k needle grid and the 32k miss at depth 70% (sample 10), one
# sample per process (scripts/eval_parallel.sh, two at a time). two_pass_topk was removed
# from the library on 2026-12-02; the records stay in results/:
#   $python -m mlx_longheads.eval needle --lengths 16k --samples 11 --methods longheads:L=2048,F=8192,sel=two_pass_topk --output results/eval
#   $python -m mlx_longheads.eval needle --lengths 32k --samples 1 --first-sample 10 --methods longheads:L=2048,F=8192,sel=two_pass_topk --output results/eval

# 2026-12-01 (commits 640dbce to 01d963d): two_pass_carry (a group's second pass keeps the most
# peaked first-pass choice of the chunk_size tokens before it), two_pass's misses first, then
# the 16k needle grid's samples 1-9 (every depth but 0% and 70%) and perplexity; one sample
# per process (scripts/eval_parallel.sh, two at a time):
$python -m mlx_longheads.eval needle --lengths 16k --samples 9 --first-sample 1 --methods longheads:L=2048,F=8192,sel=two_pass_carry --output results/eval
$python -m mlx_longheads.eval needle --lengths 32k --samples 1 --first-sample 10 --methods longheads:L=2048,F=8192,sel=two_pass_carry --output results/eval
for sample in 2 4 9; do  # two_pass's multikey misses
    $python -m mlx_longheads.eval multikey --lengths 16k --samples 1 --first-sample $sample --methods longheads:L=2048,F=8192,sel=two_pass_carry --output results/eval
done
$python -m mlx_longheads.eval perplexity --lengths 16k --samples 1 --methods longheads:L=2048,F=8192,sel=two_pass_carry --output results/eval
$python -m mlx_longheads.eval report --output results/eval

# 2026-12-01 (commit d289a47): two_pass_carry's grids completed where they were not rerun
# (needle 16k depths 0% and 70%; multikey 16k, two_pass's seven hits; passkey 16k sample 0),
# and two_pass_reuse (a decoded token takes a choice noted within the chunk before it without
# a first pass) on two_pass_carry's wins; one sample per process (scripts/eval_parallel.sh,
# two at a time, plus one):
for sample in 0 10; do
    $python -m mlx_longheads.eval needle --lengths 16k --samples 1 --first-sample $sample --methods longheads:L=2048,F=8192,sel=two_pass_carry --output results/eval
done
for sample in 0 1 3 5 6 7 8; do
    $python -m mlx_longheads.eval multikey --lengths 16k --samples 1 --first-sample $sample --methods longheads:L=2048,F=8192,sel=two_pass_carry --output results/eval
done
$python -m mlx_longheads.eval passkey --lengths 16k --samples 1 --methods longheads:L=2048,F=8192,sel=two_pass_carry --output results/eval
# two_pass_reuse left the library on 2026-12-03 (docs/evaluation.md names the commit); at a
# commit before it:
# $python -m mlx_longheads.eval needle --lengths 16k --samples 1 --first-sample 5 --methods longheads:L=2048,F=8192,sel=two_pass_reuse --output results/eval
# for sample in 2 4; do
#     $python -m mlx_longheads.eval multikey --lengths 16k --samples 1 --first-sample $sample --methods longheads:L=2048,F=8192,sel=two_pass_reuse --output results/eval
# done
$python -m mlx_longheads.eval report --output results/eval
