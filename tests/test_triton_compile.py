"""The forward and backward kernels compile for Hopper (sm_90) at the shapes where Triton turns integer
arguments equal to 1 into constants, which the interpreter never does: a CPU check of what only
a GPU would otherwise catch (it compiles with the installed triton; nothing is launched).

A stand-in driver supplies the target; each kernel is compiled with ``warmup`` instead of run,
with the GPU tile configurations. Runs in a subprocess: the driver swap is process-wide.
"""
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

STAND_IN = r'''
import sys, torch, triton
from triton.backends.compiler import GPUTarget
from triton.runtime import driver

class StandIn:
    def get_current_device(self): return 0
    def get_current_stream(self, device=None): return 0
    def get_current_target(self): return GPUTarget("cuda", 90, 32)
    def get_active_torch_device(self): return torch.device("cpu")

driver.set_active(StandIn())
S, w1, w2, HQ, HKV = map(int, sys.argv[1:])
q = torch.randn(2, S, HQ, 64, dtype=torch.bfloat16)
k1, v1, k2, v2 = (torch.randn(2, S, HKV, 64, dtype=torch.bfloat16) for _ in range(4))
'''

FORWARD = STAND_IN + r'''
import twosimplicial.ops.triton_fwd as tf
config = tf.fwd_config
tf.fwd_config = lambda gkv, ws, D, Dv, interpret, **k: config(gkv, ws, D, Dv, False, **k)
kernel = triton.jit(tf._two_simplicial_fwd_kernel)

class Compile:
    def __getitem__(self, grid): return lambda *a, **k: kernel.warmup(*a, grid=grid, **k)

tf._kernel = lambda interpret: Compile()
tf.two_simplicial_fwd(q, k1, v1, k2, v2, w1, w2, 0.125, False)
'''

BACKWARD = STAND_IN + r'''
import twosimplicial.ops.triton_bwd as tb

config = tb._config
tb._config = lambda device, *a, **k: config(torch.device("cuda"), *a, **k)

class Compile:
    def __init__(self, fn): self.fn = fn
    def __getitem__(self, grid): return lambda *a, **k: self.fn.warmup(*a, grid=grid, **k)

tb._kernel = lambda fn, device: Compile(fn)
out = torch.randn(2, S, HQ, 64, dtype=torch.bfloat16)
tb.two_simplicial_bwd(torch.randn_like(out), q, k1, v1, k2, v2, out, torch.zeros(2, HQ, S), w1, w2, 0.125, False)
'''


@pytest.mark.parametrize("kernels", ["forward", "backward"])
@pytest.mark.parametrize("S, w1, w2, HQ, HKV", [(1, 1, 1, 4, 2)])
def test_kernels_compile_for_sm90_with_a_big_window_of_one(kernels, S, w1, w2, HQ, HKV):
    script = {"forward": FORWARD, "backward": BACKWARD}[kernels]
    r = subprocess.run([sys.executable, "-c", script, *map(str, (S, w1, w2, HQ, HKV))], capture_output=True,
                       text=True, timeout=600, cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0, r.stderr[-3000:]
