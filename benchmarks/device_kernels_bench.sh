#!/usr/bin/env bash
# The kernels before and after a change, in one GPU command (issue 18): benchmarks/bench_kernels.py
# once with PYTHONPATH on a BEFORE copy of the package and once on the working tree (same cases, same
# GPU, one after the other), then benchmarks/compare_kernels.py on the two JSONs.
#
# Here, before the device call: a copy of the package at the commit to compare against, e.g.
#   c=$(git rev-parse --short HEAD~1)
#   mkdir -p .before/$c && git archive $c twosimplicial | tar -x -C .before/$c
# .before/ must be git-ignored (it travels as a carried path, it is never committed); then
#   run(command="BEFORE=.before/$c bash benchmarks/device_kernels_bench.sh", carry=[".before"])
# On the device (repository root):
#   BEFORE=.before/<commit> [CASES=issue] [ROUNDS=3] [IMPLS=twosimplicial,sdpa-cudnn] [BUDGET=230]
#     [EXTRA="..."] bash benchmarks/device_kernels_bench.sh
# Writes 7 files under $OUT: before.json before.png after.json after.png compare.json compare.png
# bench.log (the device returns at most 8).
#
# Time (bench_kernels.py --list --quick prints the per-case estimate: H100 rates, cold Triton cache):
# the 12 issue cases, twosimplicial + sdpa-cudnn, 3 interleaved rounds, do_bench warmup 10 / rep 50
# ms: about 217 s a run, of which about 170 s compiling (about 12 s a case, 25 s for each det case)
# and 47 s timing (gqa64 the longest: ~9 s of timing, its backward ~0.1 s a call); two runs, ~10 s of
# start-up each and the comparison: about 7.5 minutes (the BEFORE run of a package without native
# forms runs det-transform on its transform, its only path). Guard rails: each run gets --budget-s $BUDGET (default
# 230: a case whose estimate would pass it is skipped and listed in the JSON's "skipped") and a hard
# timeout of BUDGET + 30 s (the JSON and PNG of the finished cases are still written), so the whole
# command ends within 2 x 260 s + the comparison, under 9 minutes, whatever the compile times.
# CASES=all adds the paper's window grid (7 more cases at the gqa64 shape, ~30 s each): it does not
# fit twice in one command; run it alone (bench_kernels.py --quick --cases table1 --budget-s 500).
set -uo pipefail
export PYTHONUNBUFFERED=1
OUT=${OUT:-/tmp/ts-out}
PYTHON=${PYTHON:-python3}
CASES=${CASES:-issue}
ROUNDS=${ROUNDS:-3}
IMPLS=${IMPLS:-twosimplicial,sdpa-cudnn}
BUDGET=${BUDGET:-230}
EXTRA=${EXTRA:-}
if [ -z "${BEFORE:-}" ] || [ ! -f "$BEFORE/twosimplicial/__init__.py" ]; then
  echo "BEFORE must name a directory holding a copy of the package (BEFORE/twosimplicial/__init__.py);" \
       "make one with: git archive <commit> twosimplicial | tar -x -C .before/<commit>" >&2
  exit 2
fi
BEFORE=$(cd "$BEFORE" && pwd)
mkdir -p "$OUT"
log="$OUT/bench.log"
: > "$log"
{ nvidia-smi --query-gpu=name,clocks.max.sm,power.limit --format=csv,noheader 2>/dev/null || true
  echo "BEFORE=$BEFORE CASES=$CASES ROUNDS=$ROUNDS IMPLS=$IMPLS BUDGET=$BUDGET EXTRA=$EXTRA"; } | tee -a "$log"
args=(--quick --cases "$CASES" --rounds "$ROUNDS" --impls "$IMPLS" --budget-s "$BUDGET" --out "$OUT")
# shellcheck disable=SC2206
extra=($EXTRA)
for run in before after; do
  if [ "$run" = before ]; then pp=$BEFORE; else pp=$PWD; fi
  echo "=== $run: PYTHONPATH=$pp" | tee -a "$log"
  PYTHONPATH=$pp timeout -k 10 $((BUDGET + 30)) "$PYTHON" benchmarks/bench_kernels.py "${args[@]}" \
    --tag "$run" "${extra[@]}" 2>&1 | tee -a "$log" | grep -v -e '^cases:' -e 'it/s\]' -e 's/it\]' | tail -30
  rc=${PIPESTATUS[0]}
  echo "=== $run: exit $rc" | tee -a "$log"
done
# the BEFORE run must have imported the BEFORE copy (an installed package would shadow nothing: PYTHONPATH
# comes first, but say so if it ever did not)
"$PYTHON" - "$OUT/before.json" "$BEFORE" <<'PY' 2>&1 | tee -a "$log"
import json, sys
try:
    pkg = json.load(open(sys.argv[1]))["package"]
except (OSError, ValueError, KeyError) as e:
    sys.exit(f"no before.json: {e}")
print(("ok" if pkg.startswith(sys.argv[2]) else "WARNING: not the BEFORE copy") + f": before ran {pkg}")
PY
if [ -f "$OUT/before.json" ] && [ -f "$OUT/after.json" ]; then
  PYTHONPATH=$PWD "$PYTHON" benchmarks/compare_kernels.py "$OUT/before.json" "$OUT/after.json" --out "$OUT" \
    2>&1 | tee -a "$log"
fi
