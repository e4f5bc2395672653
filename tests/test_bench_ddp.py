"""benchmarks/bench_ddp.py end to end on CPU (gloo): one process, then two, same per-process batch."""
import importlib.util
import json
import os
import sysconfig
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
STDLIB = sysconfig.get_paths()["stdlib"]


def _bench():
    spec = importlib.util.spec_from_file_location("bench_ddp", ROOT / "benchmarks" / "bench_ddp.py")
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_ddp_efficiency_on_cpu(tmp_path):
    roots = [os.path.join(STDLIB, "json"), os.path.join(STDLIB, "email")]
    sets = [f"data.code_roots={json.dumps(roots)}", f'data.cache_dir="{tmp_path / "cache"}"', "data.val_fraction=0.2"]
    out = tmp_path / "ddp.json"
    argv = ["--config", str(ROOT / "configs" / "scaling_cpu.toml"), "--size", "d16", "--device", "cpu", "--gpus", "2",
            "--steps", "6", "--skip", "2", "--log-every", "2", "--out", str(out)]
    for s in sets:
        argv += ["--set", s]
    assert _bench().main(argv) == 0
    r = json.loads(out.read_text())
    assert r["one"]["processes"] == 1 and r["many"]["processes"] == 2
    assert [s for s, _ in r["many"]["intervals"]] == [4, 6]
    assert r["many"]["tokens_per_s_per_process"] == pytest.approx(r["many"]["tokens_per_s"] / 2)
    assert r["efficiency"] == pytest.approx(r["many"]["tokens_per_s_per_process"] / r["one"]["tokens_per_s"])
    assert r["efficiency"] > 0


def test_ddp_bench_refuses_bad_arguments():
    bench = _bench()
    with pytest.raises(SystemExit, match="--gpus must be >= 2"):
        bench.main(["--device", "cpu", "--gpus", "1"])
    with pytest.raises(SystemExit, match="--skip"):
        bench.main(["--device", "cpu", "--gpus", "2", "--steps", "5", "--skip", "5"])
