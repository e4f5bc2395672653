"""The backward kernels compile for Hopper (sm_90) at the shapes where Triton turns integer
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

SCRIPT = r'''
import sys, torch
from triton.backends.compiler import GPUTarget
from triton.runtime import driver

class StandIn:
    def get_current_device(self): return 0
    def get_current_stream(self, device=None): return 0
    def get_current_target(self): return GPUTarget("cuda", 90, 32)
    def get_active_torch_device(self): return torch.device("cpu")

driver.set_active(StandIn())
import twosimplicial.ops.triton_bwd as tb

config = tb._config
tb._config = lambda device, *a, **k: config(torch.device("cuda"), *a, **k)

class Compile:
    def __init__(self, fn): self.fn = fn
    def __getitem__(self, grid): return lambda *a, **k: self.fn.warmup(*a, grid=grid, **k)

tb._kernel = lambda fn, device: Compile(fn)
S, w1, w2 = map(int, sys.argv[1:])
q, k1, v1, k2, v2 = (torch.randn(2, S, 4 if i == 0 else 2, 64, dtype=torch.bfloat16) for i in range(5))
out = torch.randn(2, S, 4, 64, dtype=torch.bfloat16)
tb.two_simplicial_bwd(torch.randn_like(out), q, k1, v1, k2, v2, out, torch.zeros(2, 4, S), w1, w2, 0.125, False)
'''


@pytest.mark.parametrize("S, w1, w2", [(1, 1, 1)])
def test_backward_compiles_for_sm90_with_a_big_window_of_one(S, w1, w2):
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(S), str(w1), str(w2)], capture_output=True, text=True,
                       timeout=600, cwd=Path(__file__).resolve().parents[1])
    assert r.returncode == 0, r.stderr[-3000:]
