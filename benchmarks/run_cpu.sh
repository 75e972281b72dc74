#!/usr/bin/env bash
# The CPU benchmark run whose results are committed in benchmarks/results/ (bench_kl.*).
# Needs the optional peers: pip install -e ".[bench]". About 30 minutes on a 2-core machine;
# run it alone (other load on the cores distorts the timings).
#   bash benchmarks/run_cpu.sh 2>&1 | tee benchmarks/results/bench_kl.log
set -euxo pipefail
cd "$(dirname "$0")/.."
B="python benchmarks/bench_kl.py --repeats 5"
# One sequence, float32. dynamax's parallel smoother hangs on 2 cores for k = 16 (at
# T = 1 000 in one run, T = 100 in another: 0% CPU for minutes), so it runs only for k <= 4.
$B --dtype float32 --batch 1 --k 2 4 --T 100 1000 10000 100000 --schedule sequential blocked
$B --append --dtype float32 --batch 1 --k 16 64 --T 100 1000 10000 100000 \
    --schedule sequential blocked --dynamax-parallel-max-T 0
# The memory target: KL + gradient at k = 16, T = 100 000 (about 20 s per call).
$B --append --skip-peers --repeats 3 --budget-s 60 --dtype float32 --batch 1 --k 16 \
    --T 100000 --schedule sequential
# A batch of 64 sequences. The peers' per-sequence covariances make their vmapped LAPACK
# calls batched ones, which can deadlock 2-thread jaxlib: bounded, and the run goes on
# (the rows measured so far are written after every size).
timeout 1200 $B --append --repeats 3 --dtype float32 --batch 64 --k 2 4 16 --T 100 1000 \
    --schedule sequential blocked --dynamax-parallel-max-T 0 || echo "batch 64 run stopped (timeout)"
# Parallel-in-time on the CPU (for GPUs; here to show its compile time and cost).
$B --append --skip-peers --repeats 3 --dtype float32 --batch 1 --k 4 16 --T 1000 10000 \
    --schedule parallel
# float64.
$B --append --repeats 3 --dtype float64 --batch 1 --k 4 16 --T 1000 10000 \
    --schedule sequential --dynamax-parallel-max-T 0
