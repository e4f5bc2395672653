"""The kernel benchmark's plumbing on a CPU (benchmarks/bench_kernels.py, compare_kernels.py,
device_kernels_bench.sh): case list, model and sweep shapes, the JSON and PNG of a smoke run,
the before/after comparison and its noise flag, and the device script end to end."""
import json
import math
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

from benchmarks import bench_kernels as bk  # noqa: E402
from benchmarks import compare_kernels as ck  # noqa: E402

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"
ISSUE_NAMES = ["gqa64", "mha", "mha-d64", "gqa8", "mha-w1024x16", "mha-w256x64", "mha-w128x128",
               "lm-b16-s1024-h4-d64", "lm-b8-s2048-h8-d64", "lm-b16-s1024-h2-d128", "det",
               "det-transform"]


def test_n_triples_matches_the_sum():
    for S, w1, w2 in [(1, 1, 1), (8192, 512, 32), (100, 7, 300), (50, 64, 16), (33, 33, 33), (1000, 1, 999)]:
        i = torch.arange(S, dtype=torch.float64)
        want = float((torch.clamp(i + 1, max=w1) * torch.clamp(i + 1, max=w2)).sum())
        assert bk.n_triples(S, w1, w2) == want


def test_cases_are_the_issue_table_and_the_window_grid():
    assert bk.GROUPS["issue"] == ISSUE_NAMES
    assert bk.GROUPS["table1"] == [f"table1-{a}x{b}" for a, b in bk.TABLE1]
    c = bk.CASES
    assert (c["gqa8"].B, c["gqa8"].S, c["gqa8"].Hq, c["gqa8"].Hkv, c["gqa8"].D) == (1, 8192, 32, 4, 128)
    assert (c["mha-w256x64"].w1, c["mha-w256x64"].w2, c["mha-w256x64"].Hq) == (256, 64, 16)
    assert (c["lm-b8-s2048-h8-d64"].B, c["lm-b8-s2048-h8-d64"].S, c["lm-b8-s2048-h8-d64"].Hkv) == (8, 2048, 8)
    assert c["det"].form == "determinant" and c["det"].D == 128
    # targets: gqa64 / mha shapes, other trilinear shapes, the determinant form
    assert c["gqa64"].target == c["mha"].target == c["table1-512x32"].target == (0.70, 0.55)
    assert c["mha-d64"].target == c["table1-128x128"].target == c["lm-b16-s1024-h2-d128"].target == (0.55, 0.45)
    assert c["det"].target == (0.30, 0.20)
    # useful FLOPs: det counts the model's head dim, the same as mha
    assert c["det"].flops == c["mha"].flops == 4 * 128 * bk.n_triples(8192, 512, 32) * 16
    assert c["gqa64"].sdpa_flops == 4 * 2 * 64 * 8192 * 512 * 32 * 128


def test_select_names_and_groups():
    got = [x.name for x in bk.select("table1-128x128,issue,mha", bk.CASES)]
    assert got == ["table1-128x128"] + ISSUE_NAMES
    assert [x.name for x in bk.select(None, bk.CASES)] == list(bk.CASES)
    with pytest.raises(SystemExit, match="unknown case 'nope'"):
        bk.select("mha,nope", bk.CASES)


def test_list_prints_shapes_flops_and_estimate(capsys):
    assert bk.main(["--list"]) is None
    out = capsys.readouterr().out
    for name in bk.CASES:
        assert name in out
    gqa64 = next(line for line in out.splitlines() if line.startswith("gqa64 "))
    assert "B2 S8192 Hq64 Hkv1 D128 512x32" in gqa64 and "8.521" in gqa64 and "0.70/0.55" in gqa64
    assert "19 cases" in out
    bk.main(["--list", "--quick"])
    out = capsys.readouterr().out
    total = float(out.strip().splitlines()[-1].split("about ")[1].split(" s")[0])
    assert "12 cases" in out and "twosimplicial,sdpa-cudnn," in out and "table1" not in out
    assert 60 < total < 230                      # the device script's per-run budget (BUDGET=230)


def test_estimate_grows_with_rounds_and_compile():
    c = bk.CASES["gqa64"]
    one, three = (bk.estimate_s(c, ["twosimplicial", "sdpa-cudnn"], r, 10, 50) for r in (1, 3))
    assert three > one > bk.COMPILE_S
    assert bk.estimate_s(bk.CASES["det"], ["twosimplicial"], 1, 10, 50) > bk.COMPILE_DET_S


def test_model_preset_shapes():
    (xl,) = bk.model_cases("xl", ["simplicial_every=4"], None, None).values()
    assert (xl.name, xl.B, xl.S, xl.Hq, xl.Hkv, xl.D, xl.w1, xl.w2) == \
        ("model-xl-b4-s4096", 4, 4096, 16, 4, 128, 512, 32)
    assert xl.layers == 6 and xl.group == "model" and xl.target == (0.55, 0.45)
    (sm,) = bk.model_cases("small", ["form=determinant", "simplicial_every=4", "simplicial_heads=2", "model.w1=128"],
                           2, 256).values()
    assert (sm.name, sm.B, sm.S, sm.Hq, sm.Hkv, sm.D, sm.w1, sm.w2) == \
        ("model-small-b2-s256", 2, 256, 2, 2, 64, 128, 32)
    assert sm.form == "determinant" and sm.target == (0.30, 0.20) and sm.layers == 2
    with pytest.raises(ValueError, match="unknown ModelConfig field"):
        bk.model_cases("small", ["nope=1"], None, None)


def test_sweep_shapes():
    cases = bk.sweep_cases(str(ROOT / "configs/scaling.toml"), [])
    assert list(cases) == ["sweep-d128-l4", "sweep-d192-l4", "sweep-d256-l8", "sweep-d384-l8", "sweep-d512-l8"]
    assert [c.Hq for c in cases.values()] == [2, 3, 4, 6, 8]
    assert all((c.B, c.S, c.D, c.Hkv, c.w1, c.w2) == (16, 1024, 64, c.Hq, 512, 32) for c in cases.values())
    assert [c.layers for c in cases.values()] == [1, 1, 2, 2, 2]
    short = bk.sweep_cases(str(ROOT / "configs/scaling.toml"), ["data.seq_len=512", "data.batch_size=4"])
    assert {(c.B, c.S) for c in short.values()} == {(4, 512)}


def run_smoke(tmp_path, tag, *extra):
    return bk.main(["--device", "cpu", "--rounds", "2", "--out", str(tmp_path), "--tag", tag, *extra])


def test_cpu_smoke_run_json_and_png(tmp_path):
    res = run_smoke(tmp_path, "run", "--cases", "gqa64,gqa8,det")
    on_disk = json.loads((tmp_path / "run.json").read_text())
    assert on_disk["rows"] == json.loads(json.dumps(res["rows"]))
    for key in ("device", "torch", "triton", "date", "flops", "method", "ratio_to", "package", "cases", "rows"):
        assert on_disk[key], key
    assert on_disk["device"] == "cpu" and on_disk["smoke"] is True and on_disk["ratio_to"] == "sdpa"
    assert on_disk["package"] == str(ROOT / "twosimplicial")
    assert "2.5x" in on_disk["flops"] and not on_disk["skipped"] and not on_disk["errors"]
    assert [(r["case"], r["impl"]) for r in on_disk["rows"]] == [
        (c, i) for c in ("gqa64", "gqa8", "det") for i in ("twosimplicial", "sdpa")]
    assert on_disk["cases"]["gqa8"]["Hq"] == 2 and on_disk["cases"]["gqa8"]["Hkv"] == 1   # tiny, still GQA
    assert on_disk["cases"]["gqa64"]["target"] == [0.70, 0.55]    # the full shape's target, kept
    rows = {(r["case"], r["impl"]): r for r in on_disk["rows"]}
    for case in ("gqa64", "gqa8", "det"):
        ours, ref = rows[(case, "twosimplicial")], rows[(case, "sdpa")]
        for k in ("fwd", "bwd"):
            assert ours[f"{k}_ms"] > 0 and len(ours[f"{k}_ms_rounds"]) == 2
            assert ours[f"{k}_ms"] == pytest.approx(sum(ours[f"{k}_ms_rounds"]) / 2)   # median of two
            assert ours[f"{k}_ratio"] == pytest.approx(ours[f"{k}_tflops"] / ref[f"{k}_tflops"])
            assert len(ours[f"{k}_ratio_rounds"]) == 2 and all(x > 0 for x in ours[f"{k}_ratio_rounds"])
            assert ours[f"meets_{k}"] == (ours[f"{k}_ratio"] >= ours[f"target_{k}"])
            assert "target_fwd" not in ref
        c = on_disk["cases"][case]
        assert ours["fwd_tflops"] == pytest.approx(c["flops_fwd"] / ours["fwd_ms"] / 1e9)
        assert ours["bwd_tflops"] == pytest.approx(2.5 * c["flops_fwd"] / ours["bwd_ms"] / 1e9)
    assert rows[("det", "twosimplicial")]["target_fwd"] == 0.30
    png = (tmp_path / "run.png").read_bytes()
    assert png.startswith(PNG_MAGIC) and len(png) > 10_000


def test_cpu_smoke_model_preset(tmp_path):
    res = run_smoke(tmp_path, "m", "--shapes", "model", "--preset", "tiny", "--set", "simplicial_every=1",
                    "--batch", "2", "--seq", "128")
    assert [(r["case"], r["impl"]) for r in res["rows"]] == [("model-tiny-b2-s128", "twosimplicial"),
                                                            ("model-tiny-b2-s128", "sdpa")]
    assert res["cases"]["model-tiny-b2-s128"]["layers"] == 2
    assert (tmp_path / "m.png").read_bytes().startswith(PNG_MAGIC)


def fake_run(tag, rows, old_format=False):
    """A results dict with our rows and a reference row per case: ``rows`` maps case -> {dir:
    [our ms per round]} against a reference at 1 ms every round with FLOPs equal to ours, so the
    per-round ratio is 1 / ms. ``old_format``: no ratio fields (as files before issue 18)."""
    out = {"device": "NVIDIA H100", "date": "2026-12-07", "tag": tag, "ratio_to": "sdpa-cudnn", "rows": []}
    for case, ms in rows.items():
        ours, ref = {"case": case, "impl": "twosimplicial"}, {"case": case, "impl": "sdpa-cudnn"}
        for k in ("fwd", "bwd"):
            fl = 1e12 * (2.5 if k == "bwd" else 1)
            med = sorted(ms[k])[len(ms[k]) // 2]
            ours.update({f"{k}_ms": med, f"{k}_ms_rounds": ms[k], f"{k}_tflops": fl / (med * 1e-3) / 1e12})
            ref.update({f"{k}_ms": 1.0, f"{k}_ms_rounds": [1.0] * len(ms[k]), f"{k}_tflops": fl / 1e-3 / 1e12})
            if not old_format:
                ours.update({f"{k}_ratio": 1 / med, f"{k}_ratio_rounds": [1 / m for m in ms[k]],
                             f"target_{k}": bk.CASES[case].target[("fwd", "bwd").index(k)]})
        out["rows"] += [ours, ref]
    return out


def test_compare_flags_slower_past_the_noise(tmp_path, capsys):
    before = fake_run("before", {"gqa64": {"fwd": [1.0 / 0.60, 1.0 / 0.605, 1.0 / 0.595], "bwd": [2.5, 2.5, 2.5]},
                                 "mha": {"fwd": [2.0, 2.0, 2.0], "bwd": [2.0, 2.0, 2.0]},
                                 "det": {"fwd": [5.0, 5.0, 5.0], "bwd": [9.0, 9.0, 9.0]}}, old_format=True)
    after = fake_run("after", {"gqa64": {"fwd": [2.0, 2.0, 2.0],                    # 0.60 -> 0.50: slower
                                         "bwd": [1 / 0.36, 1 / 0.38, 1 / 0.40]},   # -5% in a 10.5% spread
                               "mha": {"fwd": [1.0, 1.0, 1.0], "bwd": [2.0, 2.0, 2.0]},   # faster, same
                               "gqa8": {"fwd": [1.0, 1.0, 1.0], "bwd": [1.0, 1.0, 1.0]}})
    (tmp_path / "b.json").write_text(json.dumps(before))
    (tmp_path / "a.json").write_text(json.dumps(after))
    cmp = ck.main([str(tmp_path / "b.json"), str(tmp_path / "a.json"), "--out", str(tmp_path / "cmp")])
    rows = {(r["case"], r["direction"]): r for r in cmp["rows"]}
    assert set(rows) == {(c, k) for c in ("gqa64", "mha") for k in ("fwd", "bwd")}
    r = rows[("gqa64", "fwd")]
    assert r["before"] == pytest.approx(0.60) and r["after"] == pytest.approx(0.50)
    assert r["change_pct"] == pytest.approx(-100 / 6) and r["flag"] == "slower"
    assert r["noise_pct"] == pytest.approx(100 * (0.605 - 0.595) / 0.60)       # the before rounds' spread
    assert r["target"] == 0.70 and (r["meets_before"], r["meets_after"]) == (False, False)
    r = rows[("gqa64", "bwd")]
    assert r["change_pct"] == pytest.approx(-5) and r["noise_pct"] == pytest.approx(100 * 0.04 / 0.38)
    assert r["flag"] == ""
    assert rows[("mha", "fwd")]["flag"] == "faster" and rows[("mha", "fwd")]["meets_after"] is True
    assert rows[("mha", "bwd")]["flag"] == "" and rows[("mha", "bwd")]["noise_pct"] == pytest.approx(1.0)  # the floor
    assert cmp["only_before"] == ["det"] and cmp["only_after"] == ["gqa8"] and not cmp["warnings"]
    md = capsys.readouterr().out
    assert "| gqa64 | fwd | 0.600 | 0.500 | -16.7% |" in md and "SLOWER" in md
    assert "slower past the noise: gqa64" in md
    saved = json.loads((tmp_path / "cmp" / "compare.json").read_text())
    assert saved["rows"] == json.loads(json.dumps(cmp["rows"]))
    assert (tmp_path / "cmp" / "compare.png").read_bytes().startswith(PNG_MAGIC)
    with pytest.raises(SystemExit) as e:
        ck.main([str(tmp_path / "b.json"), str(tmp_path / "a.json"), "--out", str(tmp_path / "cmp"),
                 "--fail-on-slower"])
    assert e.value.code == 1
    after["device"] = "NVIDIA H200"
    assert ck.compare(before, after)["warnings"] == ["different devices: 'NVIDIA H100' before, 'NVIDIA H200' after"]


def test_compare_two_smoke_runs(tmp_path):
    a = run_smoke(tmp_path, "a", "--cases", "mha,det")
    b = run_smoke(tmp_path, "b", "--cases", "mha,det")
    cmp = ck.main([str(tmp_path / "a.json"), str(tmp_path / "b.json"), "--out", str(tmp_path)])
    ours = lambda res, case: next(r for r in res["rows"] if r["case"] == case and r["impl"] == "twosimplicial")
    assert len(cmp["rows"]) == 4
    for r in cmp["rows"]:
        assert r["before"] == ours(a, r["case"])[f"{r['direction']}_ratio"]
        assert r["after"] == ours(b, r["case"])[f"{r['direction']}_ratio"]
        assert math.isclose(r["change_pct"], 100 * (r["after"] / r["before"] - 1))
        assert r["noise_pct"] >= 1.0 and r["rounds_before"] == r["rounds_after"] == 2
    assert (tmp_path / "compare.png").exists()


def test_device_script_on_cpu(tmp_path):
    """The one GPU command, run with --device cpu: a BEFORE copy of the package, the working tree,
    the comparison; the seven files it leaves and that the BEFORE run imported the copy."""
    before = tmp_path / "before"
    shutil.copytree(ROOT / "twosimplicial", before / "twosimplicial", ignore=shutil.ignore_patterns("__pycache__"))
    out = tmp_path / "out"
    env = {**os.environ, "OUT": str(out), "BEFORE": str(before), "PYTHON": sys.executable, "CASES": "mha",
           "IMPLS": "twosimplicial,sdpa", "ROUNDS": "2", "EXTRA": "--device cpu"}
    r = subprocess.run(["bash", "benchmarks/device_kernels_bench.sh"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=120)
    assert r.returncode == 0, r.stderr
    assert sorted(p.name for p in out.iterdir()) == ["after.json", "after.png", "before.json", "before.png",
                                                     "bench.log", "compare.json", "compare.png"]
    assert json.loads((out / "before.json").read_text())["package"] == str(before / "twosimplicial")
    assert json.loads((out / "after.json").read_text())["package"] == str(ROOT / "twosimplicial")
    log = (out / "bench.log").read_text()
    assert f"ok: before ran {before / 'twosimplicial'}" in log and "| mha | bwd |" in log
    cmp = json.loads((out / "compare.json").read_text())
    assert [(x["case"], x["direction"]) for x in cmp["rows"]] == [("mha", "fwd"), ("mha", "bwd")]


def test_device_script_needs_before(tmp_path):
    env = {**os.environ, "OUT": str(tmp_path), "BEFORE": str(tmp_path / "missing")}
    r = subprocess.run(["bash", "benchmarks/device_kernels_bench.sh"], cwd=ROOT, env=env, capture_output=True,
                       text=True, timeout=30)
    assert r.returncode == 2 and "git archive" in r.stderr


def test_product_rate_puts_the_backward_products_against_the_forward(capsys):
    """benchmarks/tuning/product_rate.py: the backward's counted TFLOP/s times 8 / 5 (products run
    over products counted) against the forward's; what the backward target needs as a multiple of
    the forward's rate; the determinant form and untimed rows are left out."""
    from benchmarks.tuning import product_rate as pr
    res = {"ratio_to": "sdpa-cudnn", "device": "GPU", "rows": [
        {"case": "mha", "impl": "twosimplicial", "fwd_tflops": 300.0, "bwd_tflops": 150.0, "target_bwd": 0.5},
        {"case": "mha", "impl": "sdpa-cudnn", "fwd_tflops": 600.0, "bwd_tflops": 500.0},
        {"case": "det", "impl": "twosimplicial", "fwd_tflops": 100.0, "bwd_tflops": 50.0, "target_bwd": 0.2},
        {"case": "gqa64", "impl": "twosimplicial", "fwd_tflops": 300.0, "bwd_tflops": None}]}
    (row,) = pr.rates(res)
    assert row["case"] == "mha"
    assert row["bwd_product_rate"] == pytest.approx(240.0) and row["bwd_over_fwd"] == pytest.approx(0.8)
    assert row["target_needs_x_fwd"] == pytest.approx(0.5 * 500 * 8 / 5 / 300)
    assert "| mha | 300 | 150 | 240 | 0.80 | 1.33 |" in pr.markdown("run.json", res, [row])
