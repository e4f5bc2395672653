"""Data-parallel scaling efficiency of one size of a sweep (issue 20): tokens/s per GPU on N GPUs
against one GPU, with the same per-GPU batch (weak scaling), through ``twosimplicial.train`` under
``torchrun`` (DDP, NCCL on GPUs).

    python benchmarks/bench_ddp.py --config configs/scaling_wide.toml --size d832-l12 --gpus 8 \\
        --steps 60 --out ddp.json

Each process count trains the size's run config (the sweep's model, data, recipe and compile
settings) for ``--steps`` steps with no evaluation or checkpoint, into a scratch directory. Its
throughput is the mean of the logged ``tokens_per_s`` over the logging intervals after
``--skip`` steps (compilation and warm-up); the run's tokens count every rank's batch. Efficiency
= (tokens/s on N GPUs / N) / (tokens/s on 1 GPU). Writes a JSON with both runs and the ratio.
On a CPU (``--device cpu``, gloo) it checks the plumbing; the numbers mean nothing there.
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def worker(cfg_file: str) -> None:
    """One rank of one measurement (run by torchrun)."""
    import torch.distributed as dist

    from twosimplicial.train import train
    train(json.loads(Path(cfg_file).read_text()))
    if dist.is_initialized():
        dist.destroy_process_group()


def run_config(config: str, size: str, arch: str, sets: list[str], steps: int, log_every: int, device: str,
               out_dir: Path) -> dict:
    from twosimplicial.studies.scaling import load_sweep
    sw = load_sweep(config, sets)
    spec = next((s for s in sw.runs if s.size["name"] == size and s.arch == arch), None)
    if spec is None:
        raise SystemExit(f"no run of size {size!r} and arch {arch!r} in {config}; sizes: "
                         f"{sorted({s.size['name'] for s in sw.runs})}")
    cfg = json.loads(json.dumps(spec.cfg))
    cfg["run"].update(out_dir=str(out_dir), device=device)
    cfg["train"].update(max_steps=steps, eval_interval=0, ckpt_interval=0, log_interval=log_every,
                        warmup_steps=min(cfg["train"]["warmup_steps"], steps), progress=False)
    return cfg


def measure(cfg: dict, nproc: int, skip: int, work: Path) -> dict:
    """Train ``cfg`` on ``nproc`` processes; tokens/s after ``skip`` steps."""
    run_dir = work / f"np{nproc}"
    cfg = {**cfg, "run": {**cfg["run"], "out_dir": str(run_dir)}}
    cfg_file = work / f"np{nproc}.json"
    cfg_file.write_text(json.dumps(cfg))
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")]).rstrip(os.pathsep)}
    if cfg["run"]["device"] == "cpu":
        env["OMP_NUM_THREADS"] = "1"
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", f"--nproc_per_node={nproc}",
           str(Path(__file__).resolve()), "--worker", str(cfg_file)]
    r = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if r.returncode != 0:
        raise SystemExit(f"{nproc} processes failed:\n{r.stdout[-3000:]}\n{r.stderr[-3000:]}")
    rows = [json.loads(ln) for ln in (run_dir / "metrics.jsonl").read_text().splitlines()]
    rows = [x for x in rows if x.get("kind") == "train" and x["step"] > skip]
    if not rows:
        raise SystemExit(f"no logged interval after step {skip}: raise --steps or lower --skip")
    tps = sum(x["tokens_per_s"] for x in rows) / len(rows)
    return {"processes": nproc, "tokens_per_s": tps, "tokens_per_s_per_process": tps / nproc,
            "intervals": [[x["step"], x["tokens_per_s"]] for x in rows]}


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--worker", help=argparse.SUPPRESS)
    p.add_argument("--config", default="configs/scaling_wide.toml")
    p.add_argument("--size", help="a size name of the sweep (default: its largest)")
    p.add_argument("--arch", default="simplicial", choices=("dot", "simplicial"))
    p.add_argument("--gpus", type=int, default=None, help="processes of the N-way run (default: every visible GPU)")
    p.add_argument("--steps", type=int, default=60)
    p.add_argument("--skip", type=int, default=20, help="steps left out of the mean (compilation, warm-up)")
    p.add_argument("--log-every", type=int, default=10)
    p.add_argument("--device", default="cuda", choices=("cuda", "cpu"))
    p.add_argument("--set", action="append", default=[], metavar="SECTION.KEY=VALUE")
    p.add_argument("--out", default="ddp.json")
    args = p.parse_args(argv)
    if args.worker:
        worker(args.worker)
        return 0
    import torch
    n = args.gpus or (torch.cuda.device_count() if args.device == "cuda" else 2)
    if n < 2:
        raise SystemExit(f"--gpus must be >= 2 (got {n}): efficiency compares N processes with one")
    if not 0 <= args.skip < args.steps:
        raise SystemExit(f"--skip must be in [0, --steps), got {args.skip} with --steps {args.steps}")
    size = args.size
    if size is None:
        from twosimplicial.studies.scaling import load_sweep
        size = load_sweep(args.config, args.set).sweep["sizes"][-1]["name"]
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        cfg = run_config(args.config, size, args.arch, args.set, args.steps, args.log_every, args.device, work)
        one = measure(cfg, 1, args.skip, work)
        many = measure(cfg, n, args.skip, work)
    result = {"config": args.config, "size": size, "arch": args.arch, "device": args.device,
              "gpu": torch.cuda.get_device_name() if args.device == "cuda" else "cpu", "torch": torch.__version__,
              "steps": args.steps, "skip": args.skip, "per_process_batch": cfg["data"]["batch_size"],
              "seq_len": cfg["data"]["seq_len"], "one": one, "many": many,
              "efficiency": many["tokens_per_s_per_process"] / one["tokens_per_s_per_process"]}
    Path(args.out).write_text(json.dumps(result, indent=2))
    print(f"{size} {args.arch}: 1 process {one['tokens_per_s']:,.0f} tok/s; {n} processes "
          f"{many['tokens_per_s']:,.0f} tok/s ({many['tokens_per_s_per_process']:,.0f} per process): "
          f"efficiency {result['efficiency']:.1%}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
