#!/usr/bin/env bash
# One GPU command: training throughput and MFU at every size of configs/scaling.toml, both
# architectures, eager and two torch.compile modes, with a profile of each (bench_train.py).
#   OUT=out [SIZES=d384-l8,d512-l8] [BUDGET=540] bash benchmarks/device_train_bench.sh
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TWOSIMPLICIAL_CACHE=/tmp/ts-cache
OUT=${OUT:-/tmp/ts-out}
mkdir -p "$OUT"
timeout "${BUDGET:-540}" python3 benchmarks/bench_train.py --modes eager,default,reduce-overhead \
  --warmup 4 --steps 10 --rounds 2 --profile ${SIZES:+--sizes "$SIZES"} --out "$OUT/bench_train.json" 2>&1 \
  | tee "$OUT/bench_train.log" | grep -v -i warn
