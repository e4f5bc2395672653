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
        assert set(case) == {"clean", "fwd", "delta", "keys", "rows", "sum_dks", "sum_dvs"}
        assert all(re.fullmatch(r"[0-9a-f]{16}", h) for h in case.values())


def test_ptxas_reports_registers_and_spills_with_config_overrides():
    """``--ptxas`` assembles each kernel with triton's ptxas and prints its registers and spills;
    ``--bwd-config`` reaches the backward (a different tile, different PTX)."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    lines = {}
    for cfg in ("{}", '{"BN": 16}'):
        r = subprocess.run([sys.executable, "-m", "benchmarks.tuning.ptx_hash", "--cases", "d48", "--ptxas",
                            "--bwd-config", cfg], capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
        assert r.returncode == 0, r.stderr[-3000:]
        lines[cfg] = {ln.split()[1]: ln for ln in r.stdout.splitlines() if ln.startswith("d48")}
        assert set(lines[cfg]) == {"clean", "fwd", "delta", "keys", "rows", "sum_dks", "sum_dvs"}
        assert all(re.search(r"regs \d+, spills \d+ / \d+ bytes", ln) for ln in lines[cfg].values()), r.stdout
    assert lines["{}"]["fwd"] == lines['{"BN": 16}']["fwd"]
    assert lines["{}"]["rows"].split()[2] != lines['{"BN": 16}']["rows"].split()[2]


@pytest.mark.parametrize("cases,kernel", [
    (("ws-gqa64", "ws-gqa64-pingpong", "ws-mha-share"), "_fwd_ws_kernel"),
    (("keys-ws-gqa64", "keys-ws-mha", "keys-ws-mha-d64", "keys-ws-s1", "keys-ws-stage-pingpong"), "_keys_ws_kernel"),
], ids=["forward", "keys"])
def test_gluon_kernels_compile_and_assemble_for_sm90a(cases, kernel):
    """The warp-specialised Gluon kernels (not dispatched; no interpreter runs Gluon, so this is
    what the CPU can check of them) compile under the installed triton and assemble for sm_90a.
    The forward (``fwd_ws``) at its three kinds of work unit: a tile with its own ring, a pair of
    head blocks with FA3's order and ping-pong, a pair of position blocks (MHA, negative scale).
    The backward's keys kernel (``bwd_ws``): GQA-64 and MHA at D 128 (the builder at 40
    registers beside two 232-register consumers), fp16 at D 64, S = 1 with windows of 1
    (integer arguments of 1 become constants), and the builder's ``cp.async`` staging with the
    consumers' ping-pong at MHA D 128."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    r = subprocess.run([sys.executable, "-m", "benchmarks.tuning.ptx_hash", "--cases", ",".join(cases), "--ptxas"],
                       capture_output=True, text=True, timeout=600, cwd=ROOT, env=env)
    assert r.returncode == 0, r.stderr[-3000:]
    lines = {ln.split()[0]: ln for ln in r.stdout.splitlines() if ln.split() and ln.split()[0] in cases}
    assert set(lines) == set(cases), r.stdout
    assert all(f"({kernel})" in ln and re.search(r"regs \d+, spills \d+ / \d+ bytes", ln)
               for ln in lines.values()), r.stdout
