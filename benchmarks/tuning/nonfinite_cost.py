"""The PyTorch backend's non-finite guard alone (``chunked.clean_values`` on v1 and v2, then
``chunked.mark_nonfinite`` with windows 512 x 32), eager and under ``torch.compile``, at two LM
shapes and the mha shape (bf16, GPU only): what these torch passes cost the Triton path while it
ran them around its kernels (it now does the same in its own launches: docs/kernels.md,
Non-finite inputs).

    OUT=out python3 -m benchmarks.tuning.nonfinite_cost      # prints and writes $OUT/nonfinite_cost.json
"""
from __future__ import annotations

import json
import os

import torch
from triton.testing import do_bench

from twosimplicial.ops.chunked import clean_values, mark_nonfinite

SHAPES = {"lm-b16-s1024-h4-d64": (16, 1024, 4, 64), "lm-b8-s2048-h8-d64": (8, 2048, 8, 64),
          "mha": (1, 8192, 16, 128)}       # B, S, H (= Hkv = Hq), D


def guard(v1, v2, out):
    (v1, bad1), (v2, bad2) = clean_values(v1), clean_values(v2)
    return v1, v2, mark_nonfinite(out, (bad1, 512), (bad2, 32))


def main():
    compiled = torch.compile(guard)
    res = {"device": torch.cuda.get_device_name(), "torch": torch.__version__}
    for name, shape in SHAPES.items():
        v1, v2, out = (torch.randn(shape, device="cuda", dtype=torch.bfloat16) for _ in range(3))
        res[name] = {"eager_ms": do_bench(lambda: guard(v1, v2, out), warmup=25, rep=100),
                     "compiled_ms": do_bench(lambda: compiled(v1, v2, out), warmup=25, rep=100)}
        print(name, res[name], flush=True)
    with open(os.path.join(os.environ.get("OUT", "."), "nonfinite_cost.json"), "w") as f:
        json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
