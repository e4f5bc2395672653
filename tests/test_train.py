"""Training: schedule, overfitting, exact resume, config parsing, and a 2-process gloo run."""
import json
import math
import os
import subprocess
import sys
import sysconfig
import tomllib
from pathlib import Path

import numpy as np
import pytest
import torch
from safetensors.torch import load_file

from twosimplicial.models import ModelConfig, TwoSimplicialLM
from twosimplicial.train import (
    TrainConfig, _param_groups, _truncate_metrics, apply_overrides, latest_checkpoint, load_config, lr_lambda, parse_value, train,
)

ROOT = Path(__file__).resolve().parents[1]
STDLIB = sysconfig.get_paths()["stdlib"]
TINY_ROOTS = [os.path.join(STDLIB, "json"), os.path.join(STDLIB, "email")]


def tiny_lm_config(tmp_path, out="run", **train_over):
    cfg = load_config(None, [])
    cfg["run"].update(out_dir=str(tmp_path / out), seed=0, device="cpu")
    cfg["model"] = {"preset": "tiny", "dim": 32, "n_heads": 2, "simplicial_every": 2, "w1": 8, "w2": 4}
    cfg["data"] = {"task": "lm", "seq_len": 16, "batch_size": 4, "cache_dir": str(tmp_path.parent / "cache"),
                   "code_roots": TINY_ROOTS, "vocab_size": 400, "val_fraction": 0.2, "math_problems": 100,
                   "weights": {"code": 0.7, "math": 0.3}}
    cfg["train"] = {"max_steps": 8, "lr": 3e-3, "warmup_steps": 2, "log_interval": 1, "eval_interval": 4,
                    "eval_batches": 2, "ckpt_interval": 3, "progress": False, **train_over}
    return cfg


def read_metrics(run_dir, kind="train"):
    rows = [json.loads(ln) for ln in (Path(run_dir) / "metrics.jsonl").read_text().splitlines()]
    return [r for r in rows if r["kind"] == kind]


def test_lr_schedule_matches_paper_shape():
    t = TrainConfig(max_steps=1000, warmup_steps=100, min_lr_ratio=0.01)
    assert lr_lambda(0, t) == pytest.approx(0.01)
    assert lr_lambda(49, t) == pytest.approx(0.5)
    assert lr_lambda(99, t) == pytest.approx(1.0)
    assert lr_lambda(100, t) == pytest.approx(1.0)
    assert lr_lambda(550, t) == pytest.approx(0.01 + 0.99 * 0.5)      # half-way down the cosine
    assert lr_lambda(1000, t) == pytest.approx(0.01)
    vals = [lr_lambda(s, t) for s in range(100, 1001)]
    assert all(a >= b for a, b in zip(vals, vals[1:]))
    d = TrainConfig()
    assert (d.lr, d.weight_decay, d.warmup_steps, d.min_lr_ratio) == (4e-3, 0.0125, 4000, 0.01)


def test_config_overrides_and_validation(tmp_path):
    assert parse_value("3") == 3 and parse_value("1e-3") == 1e-3 and parse_value("true") is True
    assert parse_value("runs/x") == "runs/x" and parse_value("[1, 2]") == [1, 2]
    cfg = apply_overrides(load_config(None), ["train.lr=0.01", "model.form=determinant", "data.weights.math=0.5"])
    assert cfg["train"]["lr"] == 0.01 and cfg["model"]["form"] == "determinant"
    assert cfg["data"]["weights"]["math"] == 0.5
    with pytest.raises(ValueError, match="section.key=value"):
        apply_overrides(cfg, ["train.lr"])
    with pytest.raises(ValueError, match="must start with"):
        apply_overrides(cfg, ["bogus.x=1"])
    for conf in sorted((ROOT / "configs").glob("*.toml")):       # every shipped config parses and validates
        if "sweep" in tomllib.loads(conf.read_text()):          # a sweep: each run's config is built and validated
            from twosimplicial.studies.scaling import load_sweep
            load_sweep(conf)
            continue
        c = load_config(conf)
        from twosimplicial.train import train_config
        train_config(c)
    with pytest.raises(ValueError, match="train.max_steps"):
        train(tiny_lm_config(tmp_path, max_steps=0))


def test_run_table_is_validated(tmp_path):
    cfg = tiny_lm_config(tmp_path)
    cfg["run"]["sede"] = 3
    with pytest.raises(ValueError, match=r"\[run\] keys \['sede'\]"):
        train(cfg)
    for bad in ("1", 1.5, True):
        cfg = tiny_lm_config(tmp_path)
        cfg["run"]["seed"] = bad
        with pytest.raises(TypeError, match="run.seed"):
            train(cfg)
    assert not (tmp_path / "run").exists()                       # rejected before anything was written


def test_fresh_start_replaces_metrics_of_a_run_killed_before_its_first_checkpoint(tmp_path):
    cfg = tiny_lm_config(tmp_path, max_steps=8, ckpt_interval=0, eval_interval=0, stop_at_step=3)
    train(cfg)
    assert latest_checkpoint(tmp_path / "run") is None
    train(cfg)                                                  # no checkpoint: a fresh start, not a resume
    assert [r["step"] for r in read_metrics(tmp_path / "run")] == [1, 2, 3]


def test_resume_drops_a_half_written_metrics_line(tmp_path):
    path = tmp_path / "metrics.jsonl"
    rows = [{"kind": "train", "step": s} for s in (1, 2, 3)]
    path.write_text("".join(json.dumps(r) + "\n" for r in rows) + '{"kind": "train", "st')
    _truncate_metrics(path, 2)
    assert [json.loads(ln) for ln in path.read_text().splitlines()] == rows[:2]


def test_loss_falls_when_overfitting_a_tiny_batch():
    torch.manual_seed(0)
    for every, form in [(0, "trilinear"), (2, "trilinear"), (2, "determinant")]:
        model = TwoSimplicialLM(ModelConfig.from_preset("tiny", vocab_size=50, dim=32, n_heads=2,
                                                        simplicial_every=every, form=form, w1=8, w2=4))
        opt = torch.optim.AdamW(_param_groups(model, 0.0), lr=1e-2)
        x = torch.randint(0, 50, (2, 16))
        y = torch.randint(0, 50, (2, 16))
        losses = []
        for _ in range(60):
            _, loss = model(x, y)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert losses[0] > math.log(50) - 0.5
        assert losses[-1] < 0.25 * losses[0], (every, form, losses[::10])


def test_interrupted_and_resumed_run_matches_uninterrupted(tmp_path):
    full = train(tiny_lm_config(tmp_path, "full"))
    cut = tiny_lm_config(tmp_path, "cut", stop_at_step=5)       # dies at step 5; last checkpoint is step 3
    part = train(cut)
    assert part["step"] == 5 and latest_checkpoint(tmp_path / "cut").name == "step-0000003"
    with pytest.raises(FileExistsError, match="--resume"):
        train(cut)
    cut["train"]["stop_at_step"] = 0
    resumed = train(cut, resume=True)
    assert resumed["step"] == full["step"] == 8
    a, b = read_metrics(tmp_path / "full"), read_metrics(tmp_path / "cut")
    assert [r["step"] for r in b] == list(range(1, 9))           # steps 4-5 of the dead run were dropped
    assert [(r["loss"], r["lr"], r["tokens"]) for r in a] == [(r["loss"], r["lr"], r["tokens"]) for r in b]
    ea, eb = read_metrics(tmp_path / "full", "eval"), read_metrics(tmp_path / "cut", "eval")
    assert [{k: v for k, v in r.items()} for r in ea] == eb
    wa = load_file(str(latest_checkpoint(tmp_path / "full") / "model.safetensors"))
    wb = load_file(str(latest_checkpoint(tmp_path / "cut") / "model.safetensors"))
    assert wa.keys() == wb.keys() and all(torch.equal(wa[k], wb[k]) for k in wa)
    assert a[-1]["loss"] < a[0]["loss"]
    assert len(list((tmp_path / "full" / "checkpoints").glob("step-*"))) == 2    # keep_checkpoints


def _torchrun(tmp_path, cfg, extra_sets, nproc=2):
    cfg_file = tmp_path / "cfg.json"
    cfg_file.write_text(json.dumps(cfg))
    script = ("import json,sys; from twosimplicial.train import train, apply_overrides; "
              "import torch.distributed as dist; "
              "cfg = apply_overrides(json.load(open(sys.argv[1])), sys.argv[2:]); train(cfg); "
              "dist.destroy_process_group()")
    env = {**os.environ, "PYTHONPATH": str(ROOT), "OMP_NUM_THREADS": "1"}
    (tmp_path / "dist_main.py").write_text(script)
    r = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
                        str(tmp_path / "dist_main.py"), str(cfg_file), *extra_sets],
                       env=env, capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-3000:] + r.stderr[-3000:]


@pytest.mark.parametrize("strategy", ["ddp", "fsdp"])
def test_two_process_gloo_matches_one_process(tmp_path, strategy):
    """2 ranks x batch 2 see exactly the rows of 1 process x batch 4 (loader partitions the
    global batch), so their rank-averaged losses agree with the single process to float tolerance."""
    cfg = tiny_lm_config(tmp_path, "one", max_steps=4, eval_interval=0, ckpt_interval=0)
    cfg["data"]["batch_size"] = 4
    torch.set_num_threads(1)
    try:
        train(cfg)
    finally:
        torch.set_num_threads(os.cpu_count() or 1)
    two = tiny_lm_config(tmp_path, "two", max_steps=4, eval_interval=0, ckpt_interval=0, distributed=strategy)
    two["data"]["batch_size"] = 2
    _torchrun(tmp_path, two, [])
    a, b = read_metrics(tmp_path / "one"), read_metrics(tmp_path / "two")
    assert [r["step"] for r in b] == [1, 2, 3, 4]
    np.testing.assert_allclose([r["loss"] for r in b], [r["loss"] for r in a], rtol=2e-5)
    assert [r["tokens"] for r in b] == [r["tokens"] for r in a]
    wa = load_file(str(latest_checkpoint(tmp_path / "one") / "model.safetensors"))
    wb = load_file(str(latest_checkpoint(tmp_path / "two") / "model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wb[k], wa[k], rtol=1e-4, atol=1e-5)
    assert json.loads((tmp_path / "two" / "config.json").read_text())["world_size"] == 2


def test_score_continuations_matches_direct_forward():
    from twosimplicial.evaluate import score_continuations
    torch.manual_seed(0)
    model = TwoSimplicialLM(ModelConfig.from_preset("tiny", vocab_size=30, dim=32, n_heads=2, simplicial_every=2,
                                                    w1=8, w2=4, max_seq_len=12)).eval()
    pairs = [([1, 2, 3], [4, 5]), ([7], [8, 9, 10, 11]), (list(range(1, 15)), [3, 4])]   # the last one is cut
    r = score_continuations(model, pairs, "cpu", max_len=12, batch_size=2)
    want, n = [], 0
    for prompt, target in pairs:
        prompt = prompt[-(13 - len(target)):]
        seq = torch.tensor([prompt + target])
        with torch.no_grad():
            logits, _ = model(seq[:, :-1])
        lp = torch.log_softmax(logits[0, len(prompt) - 1:], -1)
        want.append(-lp.gather(1, torch.tensor(target)[:, None]).sum().item())
        n += len(target)
    assert r["tokens"] == n and r["items"] == 3
    assert r["nll"] == pytest.approx(sum(want) / n, rel=1e-5)
    assert r["nll_per_item"] == pytest.approx(np.mean([w / len(t) for w, (_, t) in zip(want, pairs)]), rel=1e-5)


def test_gradient_accumulation_matches_one_large_batch(tmp_path):
    """2 micro-batches of 2 sequences give the same losses and weights as 1 batch of 4
    (with one source the loader serves samples in index order, so both runs see the same data)."""
    big = tiny_lm_config(tmp_path, "big", max_steps=4, ckpt_interval=4, eval_interval=100)
    acc = tiny_lm_config(tmp_path, "acc", max_steps=4, ckpt_interval=4, eval_interval=100, grad_accum=2)
    for cfg in (big, acc):
        cfg["data"]["weights"] = {"code": 1.0, "math": 0.0}
    acc["data"]["batch_size"] = 2
    train(big)
    train(acc)
    a, b = read_metrics(tmp_path / "big"), read_metrics(tmp_path / "acc")
    assert [r["tokens"] for r in a] == [r["tokens"] for r in b]
    np.testing.assert_allclose([r["loss"] for r in a], [r["loss"] for r in b], rtol=1e-5)
    wa = load_file(str(latest_checkpoint(tmp_path / "big") / "model.safetensors"))
    wb = load_file(str(latest_checkpoint(tmp_path / "acc") / "model.safetensors"))
    for k in wa:
        torch.testing.assert_close(wa[k], wb[k], rtol=1e-4, atol=1e-5)


def test_compiled_training_matches_eager(tmp_path):
    """train.compile=true (torch.compile of the whole model, 2-simplicial layer included)
    trains to the same losses as eager mode."""
    eager = tiny_lm_config(tmp_path, "eager", max_steps=3, eval_interval=100, ckpt_interval=100)
    compiled = tiny_lm_config(tmp_path, "compiled", max_steps=3, eval_interval=100, ckpt_interval=100, compile=True)
    train(eager)
    train(compiled)
    a, b = read_metrics(tmp_path / "eager"), read_metrics(tmp_path / "compiled")
    assert len(a) == len(b) == 3
    np.testing.assert_allclose([r["loss"] for r in a], [r["loss"] for r in b], rtol=1e-4)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["default", "reduce-overhead"])
def test_gpu_compiled_training_matches_eager_and_resumes(tmp_path, mode):
    """On the GPU, a compiled run (CUDA graphs with "reduce-overhead") with evaluations and
    checkpoints trains to eager's losses, and a run stopped and resumed equals the straight one."""
    over = dict(max_steps=8, eval_interval=4, ckpt_interval=3, dtype="bf16")
    eager = tiny_lm_config(tmp_path, "eager", **over)
    compiled = tiny_lm_config(tmp_path, "compiled", compile=True, compile_mode=mode, **over)
    for cfg in (eager, compiled):
        cfg["run"]["device"] = "cuda"
    train(eager)
    train(compiled)
    a, b = read_metrics(tmp_path / "eager"), read_metrics(tmp_path / "compiled")
    assert len(a) == len(b) == 8
    np.testing.assert_allclose([r["loss"] for r in a], [r["loss"] for r in b], rtol=2e-2)
    stopped = tiny_lm_config(tmp_path, "stopped", compile=True, compile_mode=mode, stop_at_step=5, **over)
    stopped["run"]["device"] = "cuda"
    train(stopped)
    stopped["train"]["stop_at_step"] = 0
    train(stopped, resume=True)
    c = read_metrics(tmp_path / "stopped")
    np.testing.assert_allclose([r["loss"] for r in b], [r["loss"] for r in c], rtol=1e-2)
