"""Packaging: the wheel's contents and metadata (py.typed, LICENSE, triton only in extras), the
import and the PyTorch path without triton, --version, and every subcommand's --help."""
import argparse
import json
import os
import shutil
import subprocess
import sys
import tomllib
import zipfile
from pathlib import Path

import pytest

import twosimplicial
from twosimplicial.cli import build_parser, main

ROOT = Path(__file__).resolve().parents[1]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
PYPROJECT = tomllib.loads((ROOT / "pyproject.toml").read_text())
COMMANDS = [[], ["demo"], ["train"], ["eval"], ["generate"], ["sweep"], ["fit"], ["study"], ["study", "match3"]]


def _names(requirements: list[str]) -> list[str]:
    return [r.split(";")[0].split(">")[0].split("=")[0].split("<")[0].strip() for r in requirements]


# ----------------------------------------------------------------------------- metadata and the wheel
def test_triton_is_an_extra_not_a_dependency():
    project = PYPROJECT["project"]
    assert "triton" not in _names(project["dependencies"])
    extras = project["optional-dependencies"]
    assert "triton" in _names(extras["gpu"])
    assert "triton" in _names(extras["test"])                 # CI runs the kernels under the interpreter


def test_license_file():
    text = (ROOT / "LICENSE").read_text()
    assert "Apache License" in text and "Version 2.0, January 2004" in text
    assert "TERMS AND CONDITIONS FOR USE, REPRODUCTION, AND DISTRIBUTION" in text
    assert "END OF TERMS AND CONDITIONS" in text
    assert text.startswith("Copyright 2026 The twosimplicial authors.")
    assert PYPROJECT["project"]["license"] == "Apache-2.0" and PYPROJECT["project"]["license-files"] == ["LICENSE"]


@pytest.fixture(scope="module")
def wheel(tmp_path_factory):
    """The wheel built from a copy of the sources (the build backend, no network)."""
    src = tmp_path_factory.mktemp("src")
    shutil.copytree(ROOT / "twosimplicial", src / "twosimplicial", ignore=shutil.ignore_patterns("__pycache__"))
    for name in ("pyproject.toml", "README.md", "LICENSE"):
        shutil.copy(ROOT / name, src / name)
    build = "from setuptools import build_meta; print(build_meta.build_wheel('dist'))"
    r = subprocess.run([sys.executable, "-c", build], cwd=src, capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    return src / "dist" / r.stdout.strip().splitlines()[-1]


def test_wheel_ships_py_typed_and_license(wheel):
    names = zipfile.ZipFile(wheel).namelist()
    assert "twosimplicial/py.typed" in names
    assert f"twosimplicial-{twosimplicial.__version__}.dist-info/licenses/LICENSE" in names
    assert "twosimplicial/ops/triton/fwd.py" in names and "twosimplicial/studies/match3.py" in names


def test_wheel_metadata(wheel):
    with zipfile.ZipFile(wheel) as z:
        meta = z.read(f"twosimplicial-{twosimplicial.__version__}.dist-info/METADATA").decode()
        entry = z.read(f"twosimplicial-{twosimplicial.__version__}.dist-info/entry_points.txt").decode()
    lines = meta.splitlines()
    assert f"Version: {twosimplicial.__version__}" in lines
    assert "License-Expression: Apache-2.0" in lines and "Classifier: Typing :: Typed" in lines
    assert any(ln.startswith("Project-URL: ") for ln in lines) and any(ln.startswith("Author: ") for ln in lines)
    triton = [ln for ln in lines if ln.startswith("Requires-Dist: triton")]
    assert triton and all('extra == "gpu"' in ln or 'extra == "test"' in ln for ln in triton)
    assert "Provides-Extra: gpu" in lines
    assert "twosimplicial = twosimplicial.cli:main" in entry


# ----------------------------------------------------------------------------- without triton
WITHOUT_TRITON = r"""
import sys
sys.modules["triton"] = None                    # `import triton` fails and find_spec says it is absent
import json
import torch
import twosimplicial
from twosimplicial import TwoSimplicialAttention, TwoSimplicialLM, ModelConfig, two_simplicial_attention
from twosimplicial.ops import interface, naive_two_simplicial_attention
from twosimplicial.generate import generate
import twosimplicial.cli, twosimplicial.train, twosimplicial.evaluate, twosimplicial.demo
import twosimplicial.studies.scaling, twosimplicial.studies.fit, twosimplicial.studies.match3

g = torch.Generator().manual_seed(0)
q, k1, v1, k2, v2 = (torch.randn(1, 10, 2, 6, dtype=torch.float64, generator=g, requires_grad=True) for _ in range(5))
ref, _ = naive_two_simplicial_attention(q, k1, v1, k2, v2, 4, 3)
auto = two_simplicial_attention(q, k1, v1, k2, v2, 4, 3)
torch_ = two_simplicial_attention(q, k1, v1, k2, v2, 4, 3, backend="torch")
auto.sum().backward()
try:
    two_simplicial_attention(q, k1, v1, k2, v2, 4, 3, backend="triton")
    triton_error = None
except RuntimeError as e:
    triton_error = str(e)
layer = TwoSimplicialAttention(16, 2, w1=4, w2=2)
y = layer(torch.randn(2, 7, 16))
y.sum().backward()
lm = TwoSimplicialLM(ModelConfig(vocab_size=50, dim=16, n_layers=2, n_heads=2, simplicial_every=2, w1=4, w2=2,
                                 max_seq_len=16))
out = generate(lm, torch.tensor([[1, 2, 3]]), 4, temperature=0)
print(json.dumps({
    "triton_op": interface._TRITON_OP is not None,
    "auto_err": (auto - ref).abs().max().item(), "torch_err": (torch_ - ref).abs().max().item(),
    "grad_finite": bool(torch.isfinite(q.grad).all()) and q.grad.abs().sum().item() > 0,
    "triton_error": triton_error,
    "layer_shape": list(y.shape), "layer_grad": layer.q_proj.weight.grad is not None,
    "generated": list(out.shape),
    "loaded_triton": sorted(m for m, v in sys.modules.items() if m.split(".")[0] == "triton" and v is not None),
}))
"""


def test_import_and_pytorch_path_without_triton():
    r = subprocess.run([sys.executable, "-c", WITHOUT_TRITON], capture_output=True, text=True, env=ENV, timeout=300)
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads(r.stdout.strip().splitlines()[-1])
    assert res["triton_op"] is False and res["loaded_triton"] == []
    assert res["auto_err"] < 1e-12 and res["torch_err"] < 1e-12 and res["grad_finite"]
    assert "needs the `triton` package" in res["triton_error"]
    assert res["layer_shape"] == [2, 7, 16] and res["layer_grad"]
    assert res["generated"] == [1, 7]


# ----------------------------------------------------------------------------- command line
def test_version_flag(capsys):
    with pytest.raises(SystemExit) as e:
        main(["--version"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"twosimplicial {twosimplicial.__version__} (torch ")
    r = subprocess.run([sys.executable, "-m", "twosimplicial.cli", "--version"], capture_output=True, text=True,
                       env=ENV, timeout=300)
    assert r.returncode == 0 and r.stdout == out


def _subparser(parser: argparse.ArgumentParser, path: list[str]) -> argparse.ArgumentParser:
    for name in path:
        sub = next(a for a in parser._actions if isinstance(a, argparse._SubParsersAction))
        parser = sub.choices[name]
    return parser


@pytest.mark.parametrize("columns", ["100", "50"])
@pytest.mark.parametrize("command", COMMANDS, ids=lambda c: " ".join(c) or "top")
def test_help_reads_cleanly_and_shows_defaults(command, columns, capsys, monkeypatch):
    """Every option's default is shown whole, at any terminal width: a default path (absolute, so
    with whatever hyphens the checkout's path has) is never split at a hyphen or mid-word."""
    monkeypatch.setenv("COLUMNS", columns)
    with pytest.raises(SystemExit) as e:
        main([*command, "--help"])
    assert e.value.code == 0
    out = capsys.readouterr().out
    assert out.startswith(f"usage: twosimplicial {' '.join(command)}".rstrip())
    assert "``" not in out and ":func:" not in out and ":class:" not in out
    flat = " ".join(out.split())
    parser = _subparser(build_parser(), command)
    shown = 0
    for action in parser._actions:
        if not action.option_strings or action.nargs == 0 or action.default in (None, []):
            continue
        assert f"default: {action.default}" in flat, f"{action.option_strings[0]}: default {action.default!r} not shown"
        shown += 1
    if command in (["eval"], ["generate"], ["demo"], ["fit"], ["study", "match3"]):
        assert shown >= 2


def test_help_in_a_fresh_process():
    r = subprocess.run([sys.executable, "-m", "twosimplicial.cli", "generate", "--help"], capture_output=True,
                       text=True, env={**ENV, "COLUMNS": "100"}, timeout=300)
    assert r.returncode == 0 and "``" not in r.stdout and "(default: 0.8)" in " ".join(r.stdout.split())
