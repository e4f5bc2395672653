"""The demo: it refuses to replace an earlier run without --overwrite, and it measures and cites its seed spread."""
import argparse
import json
import re

import pytest

from twosimplicial import demo
from twosimplicial.cli import main as cli_main


def _parser():
    p = argparse.ArgumentParser(prog="twosimplicial")
    demo.add_parser(p.add_subparsers(dest="command", required=True))
    return p


def _run(out, **kw):
    return demo.run_demo(out_dir=out, steps=kw.pop("steps", 2), device="cpu", parallel=False,
                         spread_json=kw.pop("spread_json", None), **kw)


def test_demo_refuses_to_replace_an_earlier_run(tmp_path, capsys):
    out = tmp_path / "demo"
    first = _run(out)
    log = (out / "dot" / "metrics.jsonl").read_text()
    with pytest.raises(FileExistsError, match=re.escape(f"{out / 'dot'} holds an earlier demo run; pass --overwrite")):
        _run(out)
    assert (out / "dot" / "metrics.jsonl").read_text() == log                    # untouched

    assert cli_main(["demo", "--out-dir", str(out), "--steps", "2", "--device", "cpu"]) == 2   # a message, no traceback
    err = capsys.readouterr().err
    assert "twosimplicial: error:" in err and str(out / "dot") in err and "--overwrite" in err

    again = _run(out, overwrite=True, seed=1)                                    # replaced
    assert again["seed"] == 1 and first["seed"] == 0
    assert json.loads((out / "dot" / "config.json").read_text())["run"]["seed"] == 1


def test_demo_never_deletes_a_foreign_directory(tmp_path):
    mine = tmp_path / "out" / "2-simplicial"
    mine.mkdir(parents=True)
    (mine / "notes.txt").write_text("not a run")
    for overwrite in (False, True):
        with pytest.raises(FileExistsError, match="not a demo run directory"):
            _run(tmp_path / "out", overwrite=overwrite)
    assert (mine / "notes.txt").read_text() == "not a run"


def test_seed_spread_is_measured_and_cited(tmp_path, capsys):
    spread = tmp_path / "spread.json"
    seeds_dir = tmp_path / "seeds"
    res = demo.run_demo_seeds(seeds=(0, 1), steps=2, device="cpu", parallel=False, out_dir=seeds_dir, out_json=spread)
    assert json.loads(spread.read_text()) == res
    assert [p["seed"] for p in res["per_seed"]] == [0, 1]
    for p in res["per_seed"]:
        one = json.loads((seeds_dir / f"seed-{p['seed']}" / "results.json").read_text())
        assert p["accuracy"] == {k: v["accuracy"] for k, v in one["models"].items()}
        assert p["gap"] == pytest.approx(p["accuracy"]["2-simplicial"] - p["accuracy"]["dot"])
    s = res["spread"]
    acc = {k: [p["accuracy"][k] for p in res["per_seed"]] for k in demo.MODELS}
    assert s["accuracy_range_max"] == pytest.approx(max(max(v) - min(v) for v in acc.values()))
    gaps = [p["gap"] for p in res["per_seed"]]
    assert (s["gap_min"], s["gap_max"]) == (min(gaps), max(gaps))
    assert s["simplicial_ahead"] == sum(g > 0 for g in gaps)

    capsys.readouterr()
    assert demo.run_demo_seeds(seeds=(0, 1), steps=2, device="cpu", parallel=False, out_dir=seeds_dir,
                               out_json=spread) == res                          # read back, not trained again
    assert capsys.readouterr().out.count("done earlier") == 2

    one = _run(tmp_path / "single", seed=2, spread_json=spread)
    where = "outside" if abs(one["accuracy_gap_simplicial_minus_dot"]) > s["accuracy_range_max"] else "within"
    assert one["seed_spread"].startswith(f"This gap is {where} the seed spread")
    assert one["seed_spread"] in capsys.readouterr().out
    other = _run(tmp_path / "other", steps=3, spread_json=spread)               # another experiment
    assert other["seed_spread"].startswith("Seed spread not measured for these settings")
    assert _run(tmp_path / "none", spread_json=tmp_path / "missing.json")["seed_spread"] == \
        "Seed spread not measured for these settings."


@pytest.mark.parametrize("gap, where", [(0.05, "outside"), (-0.05, "outside"), (0.01, "within"), (0.02, "within")])
def test_spread_verdict_rule(tmp_path, gap, where):
    exp = {"size": "cpu", "steps": 10}
    path = tmp_path / "s.json"
    path.write_text(json.dumps({"experiment": exp, "seeds": [0, 1, 2], "spread": {
        "accuracy_range_max": 0.02, "gap_min": -0.01, "gap_max": 0.03, "simplicial_ahead": 2}}))
    assert demo.spread_verdict(gap, exp, path).startswith(f"This gap is {where} the seed spread")
    assert demo.spread_verdict(gap, {**exp, "steps": 11}, path).startswith("Seed spread not measured")


def test_committed_spread_is_for_the_cpu_demo():
    """The committed measurement must describe the default CPU demo, or the demo cannot cite it."""
    m = json.loads(demo.SPREAD_JSON.read_text())
    assert m["experiment"] == demo._experiment("cpu", "trilinear", demo.SIZES["cpu"]["steps"], "cpu")
    assert len(m["seeds"]) >= 5 and len(m["per_seed"]) == len(m["seeds"])


def test_demo_rejects_bad_seeds(tmp_path):
    for seeds in ((), (0, 0), "01", (0.5,)):
        with pytest.raises(ValueError, match="seeds"):
            demo.run_demo_seeds(seeds=seeds, out_dir=tmp_path / "s", out_json=tmp_path / "s.json", device="cpu")
    with pytest.raises(SystemExit):
        _parser().parse_args(["demo", "--seeds", "0,a"])
    assert not (tmp_path / "s").exists()


def test_parallel_progress_bars_stop_with_their_runs(tmp_path, monkeypatch):
    """Each bar reaches its run's last step, is closed once, and is not moved after that."""
    bars = []

    class Bar:
        def __init__(self, total, desc, **kw):
            self.total, self.closed, self._n = total, False, 0
            bars.append(self)

        @property
        def n(self):
            return self._n

        @n.setter
        def n(self, value):
            assert not self.closed, "a finished run's bar kept counting"
            self._n = value

        def set_postfix(self, **kw):
            assert not self.closed, "a finished run's bar kept counting"

        def close(self):
            assert not self.closed, "closed twice"
            self.closed = True

    monkeypatch.setattr(demo, "tqdm", Bar)
    demo.run_demo(out_dir=tmp_path / "demo", steps=3, device="cpu", parallel=True, spread_json=None)
    assert len(bars) == 2 and all(b.closed and b.n == b.total == 3 for b in bars)
