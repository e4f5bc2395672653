"""The scripts in examples/ run as a user runs them (a fresh process, CPU), on small settings."""
import json
import math
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from twosimplicial import TwoSimplicialLM

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1", "CUDA_VISIBLE_DEVICES": ""}


def run_example(name: str, *args, env=ENV) -> dict:
    """Run ``examples/<name>`` and return the JSON object its last line prints."""
    r = subprocess.run([sys.executable, str(ROOT / "examples" / name), *map(str, args)], capture_output=True,
                       text=True, env=env, timeout=600)
    assert r.returncode == 0, r.stderr[-3000:]
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_drop_in_layer():
    res = run_example("drop_in_layer.py", "--steps", 20, "--seq-len", 32, "--batch-size", 4)
    assert res["simplicial_blocks"] == [1, 3]                       # every other block swapped
    dot, hybrid = res["dot-product"], res["hybrid"]
    # each swap replaces qkv + out (4 dim^2 weights) by q, k1, v1, k2, v2 + out (6 dim^2), dim = 64
    assert hybrid["parameters"] - dot["parameters"] == 2 * (2 * 64 * 64)
    for r in (dot, hybrid):
        assert math.isfinite(r["last_loss"]) and r["last_loss"] < r["first_loss"]


def test_train_tiny_lm(tmp_path):
    res = run_example("train_tiny_lm.py", "--steps", 30, "--seq-len", 32, "--out", tmp_path / "lm")
    assert res["val_loss_after"] < res["val_loss_before"]
    assert res["reload_equal"] is True
    model = TwoSimplicialLM.from_pretrained(tmp_path / "lm")
    assert model.config.layer_kinds() == ["dot", "simplicial"] and model.config.vocab_size == 256


def test_benchmark_shape():
    B, S, Hq, Hkv, D, w1, w2 = 2, 40, 4, 2, 8, 12, 5
    res = run_example("benchmark_shape.py", "--batch", B, "--seq", S, "--heads", Hq, "--kv-heads", Hkv,
                      "--head-dim", D, "--w1", w1, "--w2", w2, "--warmup", 1, "--repeats", 2, "--sdpa")
    triples = sum(len([j for j in range(S) if i - w1 < j <= i]) * len([k for k in range(S) if i - w2 < k <= i])
                  for i in range(S))
    assert res["forward_flops"] == 4 * D * B * Hq * triples
    assert res["device"].startswith("cpu") and res["dtype"] == str(torch.float32)
    for impl in ("two_simplicial", "sdpa"):
        r = res[impl]
        assert r["fwd_ms"] > 0 and r["bwd_ms"] > 0
        assert math.isclose(r["bwd_tflops"] / r["fwd_tflops"], 2.5 * r["fwd_ms"] / r["bwd_ms"])
    assert res["sdpa"]["key_len"] == w1 * w2 and res["sdpa"]["forward_flops"] == 4 * D * B * Hq * S * w1 * w2


@pytest.mark.gpu
def test_benchmark_shape_on_the_gpu():
    env = {k: v for k, v in ENV.items() if k != "CUDA_VISIBLE_DEVICES"}
    res = run_example("benchmark_shape.py", "--sdpa", env=env)          # the defaults: bf16, Triton kernels
    assert res["device"] == torch.cuda.get_device_name() and res["dtype"] == str(torch.bfloat16)
    for impl in ("two_simplicial", "sdpa"):
        assert res[impl]["fwd_ms"] > 0 and res[impl]["bwd_ms"] > 0
