"""The Match3 study (twosimplicial.studies.match3): the tiny preset end to end on CPU, its split, statistics and CLI."""
import argparse
import json
import shutil

import numpy as np
import pytest

from twosimplicial.data import position_baseline
from twosimplicial.models import ModelConfig, count_parameters
from twosimplicial.studies import match3 as study

TINY = study.PRESETS["cpu-tiny"]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    out = tmp_path_factory.mktemp("match3")
    res = study.run_study("cpu-tiny", out=out, device="cpu", progress=False)
    return out, res


def test_tiny_study_writes_json_and_plot(tiny):
    out, res = tiny
    assert json.loads((out / "match3.json").read_text()) == json.loads(json.dumps(res))
    assert (out / "match3.png").stat().st_size > 20_000
    n_runs = len(TINY["settings"]) * len(TINY["depths"]) * len(TINY["archs"]) * len(TINY["seeds"])
    assert len(list((out / "runs").glob("*.json"))) == n_runs
    assert "independent stream" in res["split"] and res["seeds"] == list(TINY["seeds"])
    rows = res["rows"]
    assert len(rows) == len(TINY["settings"]) * len(TINY["depths"]) * len(TINY["archs"])
    for r in rows:
        base = position_baseline(r["n"], r["M"])
        assert r["position_baseline"] == base and r["threshold"] == pytest.approx(base + (1 - base) / 2)
        assert r["seeds"] == list(TINY["seeds"])
        for key in ("test_accuracy", "above_baseline", "test_loss", "train_loss", "train_accuracy"):
            s = r[key]
            assert len(s["per_seed"]) == len(TINY["seeds"])
            assert s["median"] == pytest.approx(float(np.median(s["per_seed"])))
            assert s["ci95"][0] <= s["median"] <= s["ci95"][1]                 # the interval holds the median
            assert min(s["per_seed"]) <= s["ci95"][0] and s["ci95"][1] <= max(s["per_seed"])
        assert r["above_baseline"]["per_seed"] == pytest.approx([a - base for a in r["test_accuracy"]["per_seed"]])
        st = r["steps_to_threshold"]
        assert st["reached"] == sum(s is not None for s in st["per_seed"])
        assert all(s is None or s in r["steps"] for s in st["per_seed"])
        assert r["steps"] == list(range(TINY["eval_interval"], TINY["steps"] + 1, TINY["eval_interval"]))
        for k in ("test_accuracy", "test_loss", "train_loss", "train_accuracy"):
            c = r["curves"][k]
            assert len(c["median"]) == len(c["lo"]) == len(c["hi"]) == len(r["steps"])
            assert all(lo <= m <= hi for lo, m, hi in zip(c["lo"], c["median"], c["hi"]))
        assert r["curves"]["test_accuracy"]["median"][-1] == pytest.approx(r["test_accuracy"]["median"])
        assert all(t + d == TINY["n_test"] for t, d in zip(r["split"]["n_test"], r["split"]["test_duplicates_removed"]))
        assert r["split"]["n_train"] == [TINY["n_train"]] * len(TINY["seeds"])


def test_tiny_study_matches_parameters(tiny):
    _, res = tiny
    for r in res["rows"]:
        p = r["parameters_by_arch"]
        assert p["trilinear"] == p["determinant"]
        assert abs(p["dot"] - p["trilinear"]) / p["trilinear"] < 0.01
        assert r["parameters"] == p[r["arch"]]


def test_gpu_preset_matches_parameters():
    """Within 1% in every (setting, depth) of the real study; the configs are what the runs build."""
    specs = study.run_specs(study.PRESETS["gpu"], (0,))
    for n, M in study.PRESETS["gpu"]["settings"]:
        for depth in study.PRESETS["gpu"]["depths"]:
            group = [s for s in specs if (s["n"], s["M"], s["depth"]) == (n, M, depth)]
            cfgs = {s["arch"]: ModelConfig(**s["model"]) for s in group}
            p = {a: count_parameters(c)["total"] for a, c in cfgs.items()}
            assert set(p) == set(study.ARCHS)
            assert abs(p["dot"] - p["trilinear"]) / p["trilinear"] < 0.01 and p["trilinear"] == p["determinant"]
            assert [c.layer_kinds()[-1] for c in cfgs.values()] == ["dot", "simplicial", "simplicial"]
            assert cfgs["determinant"].form == "determinant" and cfgs["trilinear"].form == "trilinear"
            assert all(c.n_layers == depth and c.vocab_size == M and c.max_seq_len == n for c in cfgs.values())


def test_tiny_study_resumes(tiny, tmp_path):
    """A run with a result file is skipped; a missing one is trained again (here by two worker
    processes, the GPU path) to the same numbers; a result from other settings is refused."""
    src, _ = tiny
    out = tmp_path / "m3"
    shutil.copytree(src, out)
    runs = sorted((out / "runs").glob("*.json"))
    removed = {p: json.loads(p.read_text()) for p in runs[:2]}
    for p in removed:
        p.unlink()
    kept = {p: p.stat().st_mtime_ns for p in runs[2:]}
    study.run_study("cpu-tiny", out=out, device="cpu", workers=2, progress=False)
    assert {p: p.stat().st_mtime_ns for p in kept} == kept                   # skipped
    for p, old in removed.items():
        new = json.loads(p.read_text())
        assert new["spec"] == old["spec"]
        for k, v in old["curves"].items():                  # another process may sum in another order
            assert new["curves"][k] == pytest.approx(v, rel=1e-4, abs=1e-3), k

    tampered = json.loads(runs[3].read_text())
    tampered["spec"]["lr"] *= 2
    runs[3].write_text(json.dumps(tampered))
    with pytest.raises(ValueError, match=f"{runs[3].name}.*other settings.*lr"):
        study.run_study("cpu-tiny", out=out, device="cpu", progress=False)


@pytest.mark.parametrize("n, M, seed", [(3, 3, 0), (3, 3, 1), (4, 2, 0)])
def test_split_removes_every_shared_sequence(n, M, seed):
    n_train, n_test = 20, 60                      # M**n <= 27 sequences: the two draws must overlap
    d = study.make_split(n, M, seed, n_train, n_test)
    train = {row.tobytes() for row in d["x_train"]}
    assert not any(row.tobytes() in train for row in d["x_test"])
    assert d["test_duplicates_removed"] > 0 and len(d["x_test"]) + d["test_duplicates_removed"] == n_test
    assert d["x_train"].shape == (n_train, n) and d["y_train"].shape == (n_train, n)
    assert d["y_test"].shape == d["x_test"].shape


def test_tiny_and_gpu_splits_have_no_leakage():
    for preset in ("cpu-tiny", "gpu"):
        p = study.PRESETS[preset]
        for n, M in p["settings"]:
            d = study.make_split(n, M, 0, p["n_train"], p["n_test"])
            train = {row.tobytes() for row in d["x_train"]}
            assert not any(row.tobytes() in train for row in d["x_test"])
            assert len(d["x_test"]) + d["test_duplicates_removed"] == p["n_test"]
    a, b = study.make_split(6, 8, 0, 100, 50), study.make_split(6, 8, 0, 100, 50)
    assert all(np.array_equal(a[k], b[k]) for k in ("x_train", "y_train", "x_test", "y_test"))   # a pure function
    assert not np.array_equal(a["x_train"], study.make_split(6, 8, 1, 100, 50)["x_train"])         # of the seed


def test_split_rejects_bad_arguments():
    with pytest.raises(ValueError, match="every test sequence occurs in the training set"):
        study.make_split(1, 2, 0, 100, 10)
    with pytest.raises(ValueError, match="n_train"):
        study.make_split(4, 5, 0, 0, 10)
    with pytest.raises(ValueError, match="seed"):
        study.make_split(4, 5, -1, 10, 10)
    with pytest.raises(ValueError, match="M must"):
        study.make_split(4, 1, 0, 10, 10)


def test_bootstrap_median_ci():
    v = [0.71, 0.74, 0.80, 0.83, 0.90]
    lo, hi = study.bootstrap_median_ci(v)
    assert min(v) <= lo <= np.median(v) <= hi <= max(v) and lo < hi
    assert study.bootstrap_median_ci(v) == (lo, hi)                            # seeded
    assert study.bootstrap_median_ci([0.5, 0.5, 0.5]) == (0.5, 0.5)
    with pytest.raises(ValueError, match="non-empty"):
        study.bootstrap_median_ci([])


def test_steps_to_threshold():
    steps, acc = [10, 20, 30, 40], [0.6, 0.8, 0.7, 0.9]
    assert study.steps_to_threshold(steps, acc, 0.75) == 20
    assert study.steps_to_threshold(steps, acc, 0.9) == 40
    assert study.steps_to_threshold(steps, acc, 0.95) is None


def test_run_study_rejects_bad_arguments(tmp_path):
    for kw, match in ((dict(preset="huge"), "preset"), (dict(seeds=(0, 0)), "seeds"), (dict(seeds=(-1,)), "seeds"),
                      (dict(workers=0), "workers"), (dict(device="tpu"), "device")):
        with pytest.raises(ValueError, match=match):
            study.run_study(**{"preset": "cpu-tiny", "out": tmp_path / "x", "device": "cpu", **kw})
    assert not (tmp_path / "x").exists()


def test_cli_parser():
    parser = argparse.ArgumentParser(prog="twosimplicial study")
    study.add_parser(parser.add_subparsers(dest="study", required=True))
    args = parser.parse_args(["match3", "--preset", "cpu-tiny", "--seeds", "0,3", "--device", "cpu"])
    assert (args.preset, args.seeds, args.device, args.out, args.workers) == ("cpu-tiny", (0, 3), "cpu",
                                                                              "results/match3", None)
    assert args.fn is study._cli
    with pytest.raises(SystemExit):
        parser.parse_args(["match3", "--seeds", "0,x"])
    with pytest.raises(SystemExit):
        parser.parse_args(["match3", "--preset", "nope"])
    text = parser._subparsers._group_actions[0].choices["match3"].format_help()
    assert "(default: results/match3)" in text and "(default: gpu)" in text
