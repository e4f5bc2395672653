"""The learning-rate check's summary (twosimplicial/studies/lr_check.py) on synthetic run files."""
from __future__ import annotations

import json

import pytest

from twosimplicial import cli
from twosimplicial.studies import lr_check

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _write(root, lr, size, arch, nll, seed=0, folder=None):
    d = root / (folder or f"lr{lr:g}") / "runs"
    d.mkdir(parents=True, exist_ok=True)
    (d / f"{size}-{arch}-s{seed}.json").write_text(json.dumps(_run(size, arch, seed, {"lr": lr}, {"code": nll, "math": 9.0})))


def _run(size, arch, seed, train, ev):
    """A run file as the sweep writes it (the fields fit.load_runs checks)."""
    return {"run": f"{size}-{arch}-s{seed}", "size": size, "arch": arch, "seed": seed, "params_nonembedding": 1000,
            "params_total": 2000, "tokens": 4096, "flops": 1e9, "data_sha256": None, "curve": [[4096, 3.0]],
            "train": train, "eval": ev}


GRID = {  # lr -> (size, arch) -> code NLL: dot alone would pick 8e-3, simplicial 4e-3, the mean 4e-3
    2e-3: {("s", "dot"): 3.0, ("s", "simplicial"): 3.1, ("l", "dot"): 2.0, ("l", "simplicial"): 2.2},
    4e-3: {("s", "dot"): 2.9, ("s", "simplicial"): 2.8, ("l", "dot"): 1.9, ("l", "simplicial"): 1.8},
    8e-3: {("s", "dot"): 2.8, ("s", "simplicial"): 3.5, ("l", "dot"): 1.8, ("l", "simplicial"): 2.5},
}


def _grid(root):
    for lr, cells in GRID.items():
        for (size, arch), nll in cells.items():
            _write(root, lr, size, arch, nll)


def test_the_rule_picks_the_lowest_mean_and_reports_each_architecture(tmp_path):
    _grid(tmp_path)
    s = lr_check.lr_check(tmp_path)
    assert s["lrs"] == [2e-3, 4e-3, 8e-3]
    assert [m["nll"] for m in s["mean"]] == pytest.approx([2.575, 2.35, 2.65])
    assert s["pick"] == 4e-3 and not s["pick_at_edge"]
    assert s["pick_by_arch"] == {"dot": 8e-3, "simplicial": 4e-3} and not s["archs_agree"]
    assert len(s["table"]) == 12
    assert json.loads((tmp_path / "lr_check.json").read_text()) == s
    assert (tmp_path / "lr_check.png").read_bytes().startswith(PNG_MAGIC)
    text = lr_check.format_summary(s)
    assert "| 0.004 (picked) |" in text and "they disagree" in text and "edge" not in text


def test_seeds_are_averaged_ties_take_the_smaller_rate_and_an_edge_pick_is_flagged(tmp_path):
    for lr in (1e-3, 2e-3):
        _write(tmp_path, lr, "s", "dot", 2.0, seed=0)
        _write(tmp_path, lr, "s", "dot", 3.0 if lr == 1e-3 else 2.0, seed=1)   # 2.5 and 2.0
        _write(tmp_path, lr, "s", "simplicial", 2.5 if lr == 1e-3 else 3.0)    # means 2.5 and 2.5: a tie
    s = lr_check.summarize(lr_check.load_runs(tmp_path))
    assert {(r["lr"], r["arch"]): (r["nll"], r["seeds"]) for r in s["table"]} == {
        (1e-3, "dot"): (2.5, 2), (1e-3, "simplicial"): (2.5, 1), (2e-3, "dot"): (2.0, 2), (2e-3, "simplicial"): (3.0, 1)}
    assert s["pick"] == 1e-3 and s["pick_at_edge"]
    assert "edge of the rates checked" in lr_check.format_summary(s)


def test_bad_checks_are_refused(tmp_path):
    with pytest.raises(FileNotFoundError, match="no run files"):
        lr_check.load_runs(tmp_path)
    _grid(tmp_path)
    (tmp_path / "lr0.008" / "runs" / "l-simplicial-s0.json").unlink()
    with pytest.raises(ValueError, match="missing: lr 0.008: l simplicial"):
        lr_check.summarize(lr_check.load_runs(tmp_path))
    _write(tmp_path, 8e-3, "l", "simplicial", 2.5)
    bad = tmp_path / "lr0.002" / "runs" / "s-dot-s0.json"
    bad.write_text(json.dumps(_run("s", "dot", 0, {}, {"code": 2.0})))
    with pytest.raises(ValueError, match=r"no peak learning rate \(train.lr\)"):
        lr_check.load_runs(tmp_path)
    bad.write_text(json.dumps(_run("s", "dot", 0, {"lr": 2e-3}, {"math": 2.0})))
    with pytest.raises(ValueError, match=r"no eval\['code'\] NLL"):
        lr_check.load_runs(tmp_path)
    bad.write_text(json.dumps(_run("s", "dot", 0, {"lr": 2e-3}, {"code": -1.0})))
    with pytest.raises(ValueError, match=r"eval\['code'\] must be a positive NLL"):    # fit.load_runs's check
        lr_check.load_runs(tmp_path)


def test_command_line(tmp_path, capsys):
    _grid(tmp_path)
    assert cli.main(["study", "lr-check", str(tmp_path), "--out", str(tmp_path / "o")]) == 0
    out = capsys.readouterr().out
    assert "| 0.004 (picked) |" in out and (tmp_path / "o" / "lr_check.json").is_file()
    report = tmp_path / "REPORT.md"
    report.write_text("# R\n\nbefore\n<!-- lr-check:table -->\nold\n<!-- /lr-check:table -->\nafter\n")
    assert cli.main(["study", "lr-check", str(tmp_path), "--out", str(tmp_path / "o"), "--report", str(report)]) == 0
    text = report.read_text()
    assert "old" not in text and text.startswith("# R\n\nbefore\n<!-- lr-check:table -->\n| peak lr |")
    assert "| 0.004 (picked) |" in text and text.endswith("<!-- /lr-check:table -->\nafter\n")
