"""Runs you can trust: resume under faults, refused config drift, verified checkpoints, typed configs.

Each test injects one fault into a finished or killed run and checks that the run either
continues correctly or stops with a clear error, and that a refusal changes no file.
"""
import hashlib
import json
import os
import pickle
import re
import shutil
from pathlib import Path

import pytest
import torch
from test_train import read_metrics, tiny_lm_config

from twosimplicial import checkpoint
from twosimplicial.checkpoint import CheckpointError
from twosimplicial.evaluate import evaluate_run
from twosimplicial.train import apply_overrides, latest_checkpoint, load_model, lr_lambda, train, train_config

PACKAGE = Path(__file__).resolve().parents[1] / "twosimplicial"


def snapshot(run_dir: Path) -> dict:
    """Every file under ``run_dir`` by relative path -> SHA-256 (tb/ excluded: TensorBoard appends on open)."""
    return {str(p.relative_to(run_dir)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(run_dir.rglob("*")) if p.is_file() and "tb" not in p.relative_to(run_dir).parts}


@pytest.fixture(scope="module")
def finished(tmp_path_factory):
    """A finished 8-step run (checkpoints at steps 6 and 8) and the metrics of that run."""
    tmp = tmp_path_factory.mktemp("finished")
    cfg = tiny_lm_config(tmp, "run")
    train(cfg)
    return cfg, tmp / "run"


@pytest.fixture
def run_copy(finished, tmp_path):
    """A private copy of the finished run, with its config pointing at the copy."""
    cfg, src = finished
    dst = tmp_path / "run"
    shutil.copytree(src, dst)
    cfg = json.loads(json.dumps(cfg))
    cfg["run"]["out_dir"] = str(dst)
    return cfg, dst


def killed_run(tmp_path, name="cut", **over):
    """A run that died at step 5 with its last checkpoint at step 3 (ckpt_interval=3)."""
    cfg = tiny_lm_config(tmp_path, name, stop_at_step=5, **over)
    train(cfg)
    cfg["train"]["stop_at_step"] = 0
    return cfg, tmp_path / name


def train_curve(run_dir):
    return [(r["step"], r["loss"], r["lr"], r["tokens"]) for r in read_metrics(run_dir)]


# ----------------------------------------------------------------------------- 1. no code from pickles
def test_a_malicious_state_file_is_not_executed(run_copy, tmp_path):
    cfg, run = run_copy
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (os.system, (f"touch {marker}",))

    ck = latest_checkpoint(run)
    (ck / "state.pt").write_bytes(pickle.dumps({"optimizer": Evil()}))
    # the attacker also fixes the manifest, so only weights_only stands between them and the shell
    mf = json.loads((ck / "manifest.json").read_text())
    mf["files"]["state.pt"] = checkpoint.file_sha256(ck / "state.pt")
    (ck / "manifest.json").write_text(json.dumps(mf))
    cfg["train"]["max_steps"] = 10
    before = snapshot(run)
    with pytest.raises(CheckpointError, match="refused to load"):
        train(cfg, resume=True)
    assert not marker.exists()
    assert snapshot(run) == before


def test_the_package_never_unpickles():
    for path in PACKAGE.rglob("*.py"):
        src = path.read_text()
        assert "weights_only=False" not in src, path
        assert not re.search(r"\bpickle\.loads?\(", src), path
        for m in re.finditer(r"torch\.load\(([^)]*)\)", src):
            assert "weights_only=True" in m.group(1), (path, m.group(0))


# ----------------------------------------------------------------------------- 2. latest missing/empty/dangling
@pytest.mark.parametrize("fault", ["dangling", "empty", "deleted", "garbage"])
def test_a_broken_latest_falls_back_to_the_newest_intact_checkpoint(tmp_path, fault, capfd):
    full = tiny_lm_config(tmp_path, "full")
    train(full)
    cfg, run = killed_run(tmp_path)
    latest = run / "checkpoints" / "latest"
    {"dangling": lambda: latest.write_text("step-0009999\n"), "empty": lambda: latest.write_text(""),
     "deleted": latest.unlink, "garbage": lambda: latest.write_text("../../etc")}[fault]()
    train(cfg, resume=True)
    assert "using the newest complete checkpoint on disk instead: step-0000003" in capfd.readouterr().err
    assert train_curve(run) == train_curve(tmp_path / "full")


@pytest.mark.parametrize("fault", ["dangling", "empty", "deleted"])
def test_no_intact_checkpoint_is_an_error_that_changes_nothing(run_copy, fault):
    cfg, run = run_copy
    for _, p in checkpoint.step_dirs(run):            # every checkpoint corrupt
        (p / "model.safetensors").write_bytes(b"x")
    latest = run / "checkpoints" / "latest"
    {"dangling": lambda: latest.write_text("step-0009999"), "empty": lambda: latest.write_text(""),
     "deleted": latest.unlink}[fault]()
    cfg["train"]["max_steps"] = 12
    before = snapshot(run)
    with pytest.raises(CheckpointError, match="no intact checkpoint"):
        train(cfg, resume=True)
    assert snapshot(run) == before


def test_resume_without_any_checkpoint_is_an_error(tmp_path):
    cfg = tiny_lm_config(tmp_path, "none", ckpt_interval=0, stop_at_step=2)
    train(cfg)
    before = snapshot(tmp_path / "none")
    with pytest.raises(FileNotFoundError, match="nothing to resume"):
        train(cfg, resume=True)
    assert snapshot(tmp_path / "none") == before


# ----------------------------------------------------------------------------- 3. config drift
@pytest.mark.parametrize("change, key", [
    (["model.w1=4"], "model.w1"), (["model.dim=64"], "model.dim"), (["data.seq_len=8"], "data.seq_len"),
    (["train.lr=1e-3"], "train.lr"), (["run.seed=3"], "run.seed"), (["train.max_steps=7"], "train.max_steps"),
    (["model.form=determinant", "train.warmup_steps=1"], "model.form.*train.warmup_steps"),
])
def test_resume_refuses_a_changed_config(run_copy, change, key):
    cfg, run = run_copy
    before = snapshot(run)
    with pytest.raises(ValueError, match=f"cannot resume .*{key}"):
        train(apply_overrides(cfg, change), resume=True)
    assert snapshot(run) == before


def test_resume_may_extend_max_steps_and_records_it(run_copy):
    cfg, run = run_copy
    out = train(apply_overrides(cfg, ["train.max_steps=11", "train.log_interval=2"]), resume=True)
    assert out["step"] == 11
    changes = [r for r in read_metrics(run, "config")]
    assert changes == [{"kind": "config", "step": 8,
                        "changes": {"train.log_interval": [1, 2], "train.max_steps": [8, 11]}}]
    saved = json.loads((run / "config.json").read_text())
    assert saved["train"]["max_steps"] == 11 and saved["model_resolved"]["w1"] == 8
    t = train_config(cfg)                       # the schedule keeps its horizon: no re-warm, no bend
    lrs = [r["lr"] for r in read_metrics(run) if r["step"] > 8]
    assert lrs == pytest.approx([t.lr * lr_lambda(s - 1, t, horizon=8) for s in (10, 11)])
    assert lrs == pytest.approx([t.lr * t.min_lr_ratio] * 2)


def test_resume_of_a_finished_run_changes_nothing(run_copy):
    cfg, run = run_copy
    before = snapshot(run)
    out = train(cfg, resume=True)
    assert out["step"] == 8 and snapshot(run) == before
    summary = json.loads((run / "summary.json").read_text())      # strict JSON: no NaN
    assert isinstance(summary["train_loss"], float)


# ----------------------------------------------------------------------------- 4. integrity
@pytest.mark.parametrize("name", ["model.safetensors", "state.pt", "rng-0.pt"])
def test_a_flipped_byte_is_caught_on_load(run_copy, name, capfd):
    cfg, run = run_copy
    ck = latest_checkpoint(run)
    raw = bytearray((ck / name).read_bytes())
    raw[len(raw) // 2] ^= 0x01
    (ck / name).write_bytes(bytes(raw))
    with pytest.raises(CheckpointError, match=re.escape(name)):
        checkpoint.verify(ck)
    model, c = load_model(run)                       # eval / generate: fall back to the intact step-6, loudly
    assert c["checkpoint"] == {"name": "step-0000006", "step": 6}
    assert f"{name}: SHA-256 does not match" in capfd.readouterr().err
    for _, p in checkpoint.step_dirs(run):
        if p != ck:
            shutil.rmtree(p)
    with pytest.raises(CheckpointError, match=name):
        load_model(run)


def test_a_missing_rng_file_is_an_error(run_copy):
    cfg, run = run_copy
    for _, p in checkpoint.step_dirs(run):
        (p / "rng-0.pt").unlink()
    with pytest.raises(CheckpointError, match="rng-0.pt: missing"):
        train(apply_overrides(cfg, ["train.max_steps=10"]), resume=True)


# ----------------------------------------------------------------------------- 5. typed config values
@pytest.mark.parametrize("item, exc, match", [
    ("train.compile=False", TypeError, "train.compile must be true or false"),
    ("train.compile=no", TypeError, "train.compile"),
    ('train.progress="false"', TypeError, "train.progress"),
    ("train.lr=abc", TypeError, "train.lr must be a number"),
    ("train.lr=inf", ValueError, "train.lr must be finite"),
    ("train.max_steps=1.5", TypeError, "train.max_steps must be an integer"),
    ("run.seed=-1", ValueError, "run.seed must be in"),
    ("data.seq_len=abc", TypeError, "data.seq_len must be an integer"),
    ("data.batch_size=0", ValueError, "data.batch_size must be >= 1"),
    ("data.code_roots=x", TypeError, "data.code_roots must be a list"),
    ("model.dim=abc", TypeError, r"\[model\] dim must be an int"),
])
def test_config_values_are_type_checked(tmp_path, item, exc, match):
    with pytest.raises(exc, match=match):
        train(apply_overrides(tiny_lm_config(tmp_path), [item]))
    assert not (tmp_path / "run").exists()


# ----------------------------------------------------------------------------- 7. self-contained run directories
def test_a_copied_run_evaluates_without_the_corpus_cache(tmp_path):
    cfg = tiny_lm_config(tmp_path, "orig")
    cfg["data"]["cache_dir"] = str(tmp_path / "private-cache")     # this test deletes it
    train(cfg)
    shutil.copytree(tmp_path / "orig", tmp_path / "copy")
    shutil.rmtree(tmp_path / "private-cache")
    shutil.rmtree(tmp_path / "orig")
    saved = json.loads((tmp_path / "copy" / "config.json").read_text())
    assert "corpus_dir" not in saved and len(saved["data_sha256"]) == 64
    res = evaluate_run(tmp_path / "copy", max_tokens=200, math_problems_n=3, humaneval=False)
    assert res["code"]["tokens"] > 0 and res["code"]["sequences"] >= 1 and res["math"]["items"] == 3
    assert res["checkpoint"] == {"name": "step-0000008", "step": 8} and res["data_sha256"] == saved["data_sha256"]


def test_eval_refuses_an_unwritable_output_before_computing(finished, tmp_path):
    _, run = finished
    with pytest.raises(FileNotFoundError, match="does not exist"):
        evaluate_run(run, out=tmp_path / "missing" / "x.json", device="cpu")


def test_the_data_digest_tells_corpora_apart(tmp_path):
    a = train(tiny_lm_config(tmp_path, "a", max_steps=1, eval_interval=0))
    cfg = tiny_lm_config(tmp_path, "b", max_steps=1, eval_interval=0)
    cfg["data"]["vocab_size"] = 300                   # another tokenizer
    b = train(cfg)
    c = train(tiny_lm_config(tmp_path, "c", max_steps=1, eval_interval=0))
    assert a["data_sha256"] != b["data_sha256"] and a["data_sha256"] == c["data_sha256"]


# ----------------------------------------------------------------------------- 8. resume is exact at any intervals
@pytest.mark.parametrize("log_interval, ckpt_interval", [(3, 4), (4, 3)])
def test_resume_is_bit_identical_with_coprime_intervals(tmp_path, log_interval, ckpt_interval):
    over = dict(max_steps=11, log_interval=log_interval, ckpt_interval=ckpt_interval, eval_interval=5)
    train(tiny_lm_config(tmp_path, "full", **over))
    cfg = tiny_lm_config(tmp_path, "cut", stop_at_step=ckpt_interval + 2, **over)
    train(cfg)
    cfg["train"]["stop_at_step"] = 0
    train(cfg, resume=True)
    assert train_curve(tmp_path / "cut") == train_curve(tmp_path / "full")
    assert read_metrics(tmp_path / "cut", "eval") == read_metrics(tmp_path / "full", "eval")


def test_rng_state_round_trips_through_plain_data():
    import random

    import numpy as np
    dev = torch.device("cpu")
    torch.manual_seed(1), np.random.seed(2), random.seed(3)
    s = checkpoint.rng_state(dev)
    a = (torch.rand(3), np.random.rand(3), random.random())
    torch.manual_seed(9), np.random.seed(9), random.seed(9)
    checkpoint.set_rng_state(s, dev)
    b = (torch.rand(3), np.random.rand(3), random.random())
    assert torch.equal(a[0], b[0]) and (a[1] == b[1]).all() and a[2] == b[2]
