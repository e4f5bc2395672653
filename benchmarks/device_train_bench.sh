#!/usr/bin/env bash
# One GPU command: the GPU tests of compile and Theorem 5.1, then training throughput (bench_train.py).
#   OUT=out bash benchmarks/device_train_bench.sh
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TWOSIMPLICIAL_CACHE=/tmp/ts-cache
OUT=${OUT:-/tmp/ts-out}
mkdir -p "$OUT"
timeout 150 python3 -m pytest -q -m gpu -p no:cacheprovider tests/test_compile.py tests/test_theorem51.py \
  2>&1 | tee "$OUT/gpu-tests.log" | tail -6
timeout 300 python3 benchmarks/bench_train.py --sizes d128-l4,d256-l8,d512-l8 --modes eager,default \
  --out "$OUT/bench_train.json" 2>&1 | tee "$OUT/bench_train.log" | grep -v Warning
timeout 110 python3 benchmarks/bench_train.py --sizes d256-l8 --modes default,reduce-overhead \
  --out "$OUT/bench_modes.json" 2>&1 | tee "$OUT/bench_modes.log" | grep -v Warning
