"""Time of the op's non-finite handling (clean_values + mark_nonfinite) alone, eager and compiled."""
import json, os, sys, torch
from triton.testing import do_bench
from twosimplicial.ops.interface import clean_values, mark_nonfinite
res = {}
for name, (B, S, H, D) in {"lm-b16-s1024-h4-d64": (16, 1024, 4, 64), "lm-b8-s2048-h8-d64": (8, 2048, 8, 64),
                           "mha": (1, 8192, 16, 128)}.items():
    v1, v2, out = (torch.randn(B, S, H, D, device="cuda", dtype=torch.bfloat16) for _ in range(3))
    def passes(v1, v2, out):
        (a, b1), (b, b2) = clean_values(v1), clean_values(v2)
        return a, b, mark_nonfinite(out, (b1, 512), (b2, 32))
    comp = torch.compile(passes)
    res[name] = {"eager_ms": do_bench(lambda: passes(v1, v2, out), warmup=25, rep=100),
                 "compiled_ms": do_bench(lambda: comp(v1, v2, out), warmup=25, rep=100)}
    print(name, res[name], flush=True)
json.dump(res, open(os.path.join(os.environ["OUT"], "nonfinite_cost.json"), "w"), indent=1)
