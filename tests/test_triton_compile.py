"""The forward and backward kernels compile for Hopper (sm_90) on a CPU: the PTX-hash harness
(``benchmarks/tuning/ptx_hash.py``: a stand-in driver, ``warmup`` instead of a launch, the GPU's
configurations) on a few cheap cases. Nothing is launched; the installed triton compiles.

The case ``s1`` (S = 1, windows (1, 1), GQA 2) is where Triton turns integer arguments equal
to 1 into constants, which the interpreter never does: a check of what only a GPU would
otherwise catch (it fails on the code before 9c3fbdb). The harness runs in a subprocess: the
driver swap is process-wide. Whether two versions of the code compile to the same kernels is
checked by running the harness itself before and after a change (docs/kernels.md).
"""
import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

pytest.importorskip("triton")

ROOT = Path(__file__).resolve().parents[1]


def test_kernels_compile_for_sm90_and_hash(tmp_path):
    out = tmp_path / "hashes.json"
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-m", "benchmarks.tuning.ptx_hash", "--cases", "s1,d48", "--json", str(out)],
                       capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    hashes = json.loads(out.read_text())["hashes"]
    assert set(hashes) == {"s1", "d48"}
    for case in hashes.values():
        assert set(case) == {"clean", "fwd", "delta", "keys", "rows"}
        assert all(re.fullmatch(r"[0-9a-f]{16}", h) for h in case.values())
