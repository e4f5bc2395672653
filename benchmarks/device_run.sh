#!/usr/bin/env bash
# Everything the GPU machine checks, in one call (the device keeps nothing between calls):
#   1. the GPU test suite (pytest -m gpu),
#   2. the kernel benchmark (benchmarks/bench_kernels.py -> JSON + PNG),
#   3. tokens/s of a dot-product and a 2-simplicial LM of the same size (configs/gpu_*.toml,
#      short runs), and the 2-simplicial one again under torch.compile;
#   ws, ws-bwd (not in the default parts): the warp-specialised Gluon prototypes' timing (the
#      forward; the backward's keys kernel), one part per call (each may take most of 10 min).
# Usage on the device: OUT=/some/dir bash benchmarks/device_run.sh [tests|bench|train|ws|ws-bwd ...]
# Wheels carried in .whl/ (carry: [".whl"]) are installed into /tmp/site first: with pytest-xdist's
# (pytest_xdist, execnet) the GPU tests run in TEST_WORKERS processes (default 4), which compile
# their Triton kernels side by side (the suite alone took about 500 s on a fresh H100).
# STEPS sets the training steps; TRAIN_SETS adds --set overrides to both training runs (a CPU
# dry run of the plumbing: TRAIN_SETS="run.device=cpu model.preset=tiny data.seq_len=64").
set -uo pipefail
export PYTHONPATH=$PWD PYTHONUNBUFFERED=1 TWOSIMPLICIAL_CACHE=/tmp/ts-cache
OUT=${OUT:-/tmp/ts-out}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" > /dev/null; then
  python3 -m pip install -q --upgrade --no-index --no-deps --target /tmp/site .whl/*.whl 2>&1 | tail -2
  export PYTHONPATH=$PYTHONPATH:/tmp/site
fi
steps=${STEPS:-80}
parts=${*:-tests bench train}
python3 - <<'PY' | tee "$OUT/env.txt"
import torch, triton
from twosimplicial.ops.interface import _pick_backend
if torch.cuda.is_available():
    x = torch.empty(1, device="cuda", dtype=torch.bfloat16)
    print(f"{torch.cuda.get_device_name()} torch {torch.__version__} triton {triton.__version__} "
          f"auto backend for bf16 CUDA: {_pick_backend('auto', x)}")
else:
    print(f"no GPU; torch {torch.__version__} triton {triton.__version__}")
PY
for part in $parts; do
  case $part in
    tests)
      workers=()
      if python3 -c "import xdist" 2> /dev/null; then workers=(-n "${TEST_WORKERS:-4}"); fi
      # the warp-specialised Gluon prototypes first, under a timeout: a wrong barrier phase hangs
      # a kernel, and must not take the rest of the suite with it
      timeout 300 python3 -m pytest -q -m gpu -p no:cacheprovider -rfE "${workers[@]}" tests/test_triton.py \
        tests/test_triton_bwd.py -k "ws_forward or ws_keys" 2>&1 | tee "$OUT/gpu-tests-ws.log" | tail -8
      python3 -m pytest -q -m gpu -p no:cacheprovider -rfE --durations=15 "${workers[@]}" \
        -k "not ws_forward and not ws_keys" tests/ 2>&1 \
        | tee "$OUT/gpu-tests.log" | tail -40 ;;
    bench) python3 benchmarks/bench_kernels.py --quick --out "$OUT" 2>&1 | tee "$OUT/bench.log" | tail -40 ;;
    ws)   # the warp-specialised forward's knobs against the Triton forward (docs/kernels.md, The
          # warp-specialised forward), then ncu's L2 throughput of the Triton forward at gqa64
      python3 -m benchmarks.tuning.bench_fwd_variants --quick-check --out "$OUT/fwd-ws.json" \
        --variants default,ws,ws-overlap,ws-share,ws-share-bn128,ws-share-overlap,ws-pingpong,ws-pingpong-s3 \
        --cases gqa64:default+ws+ws-overlap+ws-share+ws-share-bn128+ws-share-overlap+ws-pingpong+ws-pingpong-s3,mha:default+ws+ws-share+ws-share-overlap+ws-pingpong+ws-pingpong-s3,lm-h4-d64:default+ws+ws-share+ws-pingpong,lm-h2-d128:default+ws+ws-share+ws-pingpong,w256x64:default+ws-share+ws-pingpong \
        2>&1 | tee "$OUT/fwd-ws.log" | tail -45
      if command -v ncu > /dev/null; then
        ncu -k regex:_two_simplicial_fwd_kernel --launch-skip 1 -c 1 \
          --metrics lts__throughput.avg.pct_of_peak_sustained_elapsed,lts__t_bytes.sum.per_second,sm__throughput.avg.pct_of_peak_sustained_elapsed \
          python3 -m benchmarks.tuning.profile_once --case gqa64 > "$OUT/ncu-l2.txt" 2>&1; tail -8 "$OUT/ncu-l2.txt"
      fi ;;
    ws-bwd)   # the warp-specialised keys kernel's knobs against the Triton one, the whole backward and
              # per kernel (docs/kernels.md, The warp-specialised keys kernel)
      ws_lm='["default", null], ["ws", {"ws": {}}], ["ws-stage", {"ws": {"stage": true, "stages": 3}}], ["ws-pingpong", {"ws": {"pingpong": true}}], ["ws-stage-pingpong", {"ws": {"stage": true, "stages": 3, "pingpong": true}}]'
      ws_all="[$ws_lm, [\"ws-s3\", {\"ws\": {\"stages\": 3}}], [\"ws-c224\", {\"ws\": {\"consumer_regs\": 224}}]]"
      # JSON saved after each case: a run the timeout stops keeps the cases it finished
      timeout 540 python3 -m benchmarks.tuning.bench_bwd_variants --no-checks --out "$OUT/bwd-ws.json" --variants \
        "{\"gqa64\": $ws_all, \"mha\": $ws_all, \"lm-h4-d64\": [$ws_lm], \"lm-h2-d128\": [$ws_lm]}" \
        2>&1 | tee "$OUT/bwd-ws.log" | grep -v "^  " | tail -20 ;;
    train)
      common=(--set train.max_steps=$steps --set train.eval_interval=100000 --set train.ckpt_interval=100000
              --set train.log_interval=10 --set train.progress=false --set data.code_max_bytes=30000000
              --set data.tokenizer_sample_bytes=4000000 --set data.math_problems=5000)
      for kv in ${TRAIN_SETS:-}; do common+=(--set "$kv"); done
      for run in "dot configs/gpu_dot.toml" "simplicial configs/gpu_simplicial.toml" \
                 "simplicial-compiled configs/gpu_simplicial.toml --set train.compile=true"; do
        set -- $run
        name=$1; shift
        python3 -m twosimplicial.cli train "$@" --set run.out_dir=/tmp/ts-runs/$name "${common[@]}" \
          > "$OUT/train-$name.log" 2>&1 || { echo "train $name FAILED"; tail -20 "$OUT/train-$name.log"; }
      done
      python3 - "$OUT" <<'PY'
import json, statistics, sys
from twosimplicial.models import ModelConfig, count_parameters
rows = {}
for name in ("dot", "simplicial", "simplicial-compiled"):
    try:
        lines = [json.loads(l) for l in open(f"/tmp/ts-runs/{name}/metrics.jsonl")]
    except OSError:
        continue
    tr = [l for l in lines if l["kind"] == "train"]
    steady = [l["tokens_per_s"] for l in tr[len(tr) // 2:]]            # second half: past compile/warm-up
    rows[name] = {"tokens_per_s_median": statistics.median(steady), "first_loss": tr[0]["loss"], "last_loss": tr[-1]["loss"]}
    print(f"{name:22s} {rows[name]['tokens_per_s_median']:>12,.0f} tok/s  loss {tr[0]['loss']:.3f} -> {tr[-1]['loss']:.3f}")
json.dump(rows, open(f"{sys.argv[1]}/train-throughput.json", "w"), indent=1)
PY
      ;;
  esac
done
