"""The Triton backward kernels (twosimplicial/ops/triton/bwd.py) against float64 autograd.

CPU: the kernels run under the Triton interpreter (tiny tiles) on tiny shapes in fp32/fp16
(the interpreter computes bf16 ``tl.dot`` wrongly), against autograd through the dense
float64 reference; out/lse come from that reference too. GPU (``-m gpu``, on the device):
bf16/fp16/fp32 at realistic shapes against autograd through the memory-bounded float64
torch path, determinism, x30 inputs.
"""
from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")

from twosimplicial.ops.naive import naive_two_simplicial_attention  # noqa: E402
from twosimplicial.ops.triton.bwd import two_simplicial_bwd  # noqa: E402

NAMES = ("dq", "dk1", "dv1", "dk2", "dv2")


@pytest.fixture
def interpret(monkeypatch):
    # the module runs CPU tensors under the interpreter whatever this says when it was
    # imported; set it anyway for anything else launched from these tests
    monkeypatch.setenv("TRITON_INTERPRET", "1")


def _inputs(B, S, Hq, Hkv, D, Dv, gen, device="cpu", mult=1.0):
    r = lambda *s: torch.randn(*s, generator=gen, dtype=torch.float64).to(device) * mult
    return r(B, S, Hq, D), r(B, S, Hkv, D), r(B, S, Hkv, Dv), r(B, S, Hkv, D), r(B, S, Hkv, Dv), r(B, S, Hq, Dv)


def _reference(ref_fn, q, k1, v1, k2, v2, do, w1, w2, scale):
    """float64 out, lse and the five gradients by autograd."""
    xs = [x.detach().clone().requires_grad_() for x in (q, k1, v1, k2, v2)]
    out, lse = ref_fn(*xs, w1, w2, scale)
    grads = torch.autograd.grad(out, xs, do)
    return out.detach(), lse.detach(), grads


def _assert_within(got, ref, tol, mult=1.0):
    """``||g - r|| / max(||r||, floor) < tol`` per gradient. The floor covers gradients that are
    (nearly) zero by cancellation, measured against the size of their terms instead: at S = 1
    every gradient but dv is exactly 0 (P = 1, dS = 0), and with inputs scaled by ``mult`` = 30
    the softmax is one-hot and dS is a difference of two nearly equal numbers ~mult^4."""
    errs = {}
    for name, g, r in zip(NAMES, got, ref):
        assert g.shape == r.shape, f"{name}: shape {tuple(g.shape)} != {tuple(r.shape)}"
        assert torch.isfinite(g).all(), f"{name}: non-finite values"
        g, r = g.double(), r.double()
        floor = 1e-2 * r.numel() ** 0.5 * mult ** 4
        errs[name] = (g - r).norm().item() / max(r.norm().item(), floor)
    assert max(errs.values()) < tol, errs
    return errs


def _run(B, S, Hq, Hkv, D, Dv, w1, w2, dtype, gen, ref_fn, device="cpu", mult=1.0, allow_tf32=False):
    """Returns (our gradients, float64 gradients, kernel args);
    the references see the inputs rounded to ``dtype``, as the kernels do."""
    xs = [x.to(dtype).double() for x in _inputs(B, S, Hq, Hkv, D, Dv, gen, device, mult)]
    scale = 1.0 / math.sqrt(D)
    out, lse, ref = _reference(ref_fn, *xs, w1, w2, scale)
    do, q, k1, v1, k2, v2 = (x.to(dtype) for x in (xs[5], *xs[:5]))
    args = (do, q, k1, v1, k2, v2, out.to(dtype), lse.float(), w1, w2, scale, allow_tf32)
    got = two_simplicial_bwd(*args)
    for name, g, x in zip(NAMES, got, (q, k1, v1, k2, v2)):
        assert g.dtype == dtype and g.shape == x.shape, name
    return got, ref, args


def _naive(q, k1, v1, k2, v2, w1, w2, scale):
    return naive_two_simplicial_attention(q, k1, v1, k2, v2, w1, w2, scale=scale)


# (B, S, Hq, Hkv, D, Dv, w1, w2): MHA, GQA (non-power-of-2 group), MQA, D = 48, D != Dv,
# odd windows and lengths, S = 1, windows past S, equal windows, w = 1, a small window
# longer than one offset tile (16 on the interpreter), either window the small one, a big
# window spanning several key blocks with several positions per tile (unmasked interior
# blocks next to masked edges in both kernels)
CASES = [
    (1, 7, 2, 2, 16, 16, 3, 2),
    (2, 13, 4, 1, 48, 16, 4, 3),
    (1, 9, 6, 2, 16, 32, 2, 5),
    (1, 1, 1, 1, 16, 16, 1, 1),
    (1, 6, 3, 1, 16, 16, 9, 20),
    (1, 10, 2, 1, 16, 16, 4, 4),
    (1, 12, 2, 2, 16, 16, 1, 7),
    (1, 37, 1, 1, 16, 16, 30, 19),
    (1, 50, 2, 2, 16, 16, 3, 40),
]


@pytest.mark.parametrize("shape", CASES, ids=lambda s: "x".join(map(str, s)))
def test_grads_fp32_interpreter(interpret, shape):
    gen = torch.Generator().manual_seed(hash(shape) % 2**31)
    got, ref, _ = _run(*shape, torch.float32, gen, _naive)
    _assert_within(got, ref, 1e-5)


@pytest.mark.parametrize("shape", [(1, 11, 2, 1, 32, 32, 5, 3), (1, 9, 4, 2, 48, 64, 2, 6)],
                         ids=lambda s: "x".join(map(str, s)))
def test_grads_fp16_interpreter(interpret, shape):
    gen = torch.Generator().manual_seed(1 + hash(shape) % 2**31)
    got, ref, _ = _run(*shape, torch.float16, gen, _naive)
    _assert_within(got, ref, 5e-3)


@pytest.mark.parametrize("windows", [(5, 5), (30, 20)], ids=["equal", "both-past-S"])
def test_tied_windows_fp16_through_the_op(interpret, windows):
    """Equal windows (also after clamping to S): forward and backward must give the small role
    to the same key set, or the backward recomputes P from a differently rounded z = q * k_s
    than the forward's lse (seen as 5e-2 errors in dv with fp16 inputs)."""
    from twosimplicial import two_simplicial_attention
    gen = torch.Generator().manual_seed(11)
    xs = [(torch.randn(1, 12, 2, 16, generator=gen) * 3).half().requires_grad_() for _ in range(5)]
    out = two_simplicial_attention(*xs, *windows, backend="triton")
    do = torch.randn(out.shape, generator=gen).half()
    got = torch.autograd.grad(out, xs, do)
    ref = torch.autograd.grad(*_reference_out(xs, windows, do))
    errs = {n: ((g.double() - r).norm() / r.norm()).item() for n, g, r in zip(NAMES, got, ref)}
    assert errs["dv1"] < 2e-3 and errs["dv2"] < 2e-3, errs
    assert max(errs.values()) < 3e-2, errs                   # dq, dk: fp16 rounding of z at scale 3


def _reference_out(xs, windows, do):
    ref_in = [x.detach().double().requires_grad_() for x in xs]
    out, _ = naive_two_simplicial_attention(*ref_in, *windows)
    return out, ref_in, do.double()


def test_deterministic_and_x30_interpreter(interpret):
    """Bitwise-equal reruns; inputs scaled by 30 (peaked softmax) stay finite and accurate."""
    gen = torch.Generator().manual_seed(30)
    got, ref, args = _run(1, 10, 2, 1, 16, 16, 5, 3, torch.float32, gen, _naive, mult=30.0)
    _assert_within(got, ref, 2e-3, mult=30.0)
    again = two_simplicial_bwd(*args)
    for name, a, b in zip(NAMES, got, again):
        assert torch.equal(a, b), name


# ---------------------------------------------------------------------------------- GPU


def _chunked(q, k1, v1, k2, v2, w1, w2, scale):
    from twosimplicial.ops.chunked import chunked_two_simplicial_attention
    return chunked_two_simplicial_attention(q, k1, v1, k2, v2, w1, w2, scale)


def _banded(q, k1, v1, k2, v2, w1, w2, scale):
    """The operation for small windows at any length: each query's w1 x w2 logits from gathered
    key rows (rows before the sequence start masked), O(S w1 w2 D) work and memory; the dense
    reference's math without its S x S x S tensor (test_banded_reference_is_the_naive_one)."""
    g = q.shape[2] // k1.shape[2]
    k1, v1, k2, v2 = (t.repeat_interleave(g, dim=2) for t in (k1, v1, k2, v2))
    i = torch.arange(q.shape[1], device=q.device)
    j = i[:, None] - torch.arange(w1, device=q.device)            # [S, w1] keys of the first window
    k = i[:, None] - torch.arange(w2, device=q.device)            # [S, w2] keys of the second
    K1, V1, K2, V2 = (t[:, idx.clamp(min=0)] for t, idx in ((k1, j), (v1, j), (k2, k), (v2, k)))   # [B, S, w, H, .]
    logits = scale * torch.einsum("bshd,bsjhd,bskhd->bhsjk", q, K1, K2)
    valid = (j >= 0)[:, :, None] & (k >= 0)[:, None, :]           # [S, w1, w2]
    logits = logits.masked_fill(~valid, float("-inf"))
    lse = torch.logsumexp(logits.flatten(-2), dim=-1)             # [B, H, S]
    p = torch.exp(logits - lse[..., None, None])
    return torch.einsum("bhsjk,bsjhe,bskhe->bshe", p, V1, V2), lse


def test_banded_reference_is_the_naive_one():
    """The GPU tests' reference for long sequences (_banded) against the dense one: out, lse and
    every gradient, GQA, windows past S and either window the larger."""
    gen = torch.Generator().manual_seed(14)
    for B, S, Hq, Hkv, D, Dv, w1, w2 in [(2, 9, 4, 2, 8, 6, 3, 2), (1, 5, 2, 2, 4, 4, 7, 1), (1, 11, 3, 1, 4, 8, 2, 4)]:
        xs = _inputs(B, S, Hq, Hkv, D, Dv, gen)
        ref = _reference(_naive, *xs[:5], xs[5], w1, w2, 0.3)
        got = _reference(_banded, *xs[:5], xs[5], w1, w2, 0.3)
        for a, b in zip((got[0], got[1], *got[2]), (ref[0], ref[1], *ref[2])):
            torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


# METHOD.md bounds: bf16 operands 1e-3..1e-2, fp16 a few 1e-4..1e-3, fp32 far under 1e-3
GPU_TOL = {torch.bfloat16: 1.5e-2, torch.float16: 3e-3, torch.float32: 1e-4}

GPU_CASES = [
    # (B, S, Hq, Hkv, D, Dv, w1, w2)
    (1, 8192, 2, 2, 128, 128, 512, 32),     # MHA, full length
    (1, 2048, 64, 1, 128, 128, 512, 32),    # the paper's GQA-64
    (2, 4096, 8, 8, 64, 64, 32, 512),       # MHA D = 64, windows swapped
    (1, 3000, 12, 4, 96, 64, 100, 45),      # GQA 3:1, D = 96 != Dv, odd windows
    (1, 1024, 4, 2, 64, 64, 200, 200),      # tied windows: k2 takes the small role, as in the forward
    (1, 1024, 4, 4, 128, 128, 128, 128),    # MHA, a wide small window: one-head tiles of 8 positions x 16 offsets
]


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", GPU_CASES, ids=lambda s: "x".join(map(str, s)))
def test_grads_gpu(shape, dtype):
    gen = torch.Generator().manual_seed(7)
    got, ref, args = _run(*shape, dtype, gen, _chunked, device="cuda")
    _assert_within(got, ref, GPU_TOL[dtype])
    again = two_simplicial_bwd(*args)
    for name, a, b in zip(NAMES, got, again):
        assert torch.equal(a, b), f"{name}: reruns differ"


@pytest.mark.gpu
@pytest.mark.parametrize("S", [1, 2])
@pytest.mark.parametrize("windows", [(1, 1), (1, 40), (2, 2)], ids=lambda w: "x".join(map(str, w)))
def test_grads_gpu_big_window_of_one(S, windows):
    """A clamped big window of 1 (S = 1, or w1 = w2 = 1): Triton passes an integer argument equal
    to 1 as a constant, which the interpreter does not, so only a GPU sees this specialisation."""
    gen = torch.Generator().manual_seed(11)
    got, ref, _ = _run(2, S, 4, 2, 64, 64, *windows, torch.float32, gen, _chunked, device="cuda")
    _assert_within(got, ref, GPU_TOL[torch.float32])


@pytest.mark.gpu
def test_grads_gpu_more_position_blocks_than_a_grid_axis_holds():
    """S past 65535 blocks of 64 positions (the rows kernel's programs per head): its grid is one
    axis, so CUDA's limit of 65535 on a grid's other axes does not apply (the keys kernel's
    32769 blocks of 128 keys sit on its second axis, under that limit)."""
    gen = torch.Generator().manual_seed(12)
    got, ref, _ = _run(1, 64 * 65536 + 5, 1, 1, 16, 16, 3, 2, torch.float32, gen, _banded, device="cuda")
    _assert_within(got, ref, GPU_TOL[torch.float32])


@pytest.mark.gpu
def test_grads_gpu_more_batch_heads_than_a_grid_axis_holds():
    """B * Hkv and B * Hq past 65535 (forward, Delta, both backward kernels): every grid is one axis."""
    gen = torch.Generator().manual_seed(13)
    from twosimplicial.ops.triton.fwd import two_simplicial_fwd
    got, ref, (do, q, k1, v1, k2, v2, out, lse, w1, w2, scale, _) = _run(
        33000, 3, 2, 2, 16, 16, 2, 2, torch.float32, gen, _chunked, device="cuda")
    _assert_within(got, ref, GPU_TOL[torch.float32])
    out_t, lse_t = two_simplicial_fwd(q, k1, v1, k2, v2, w1, w2, scale, False)
    torch.testing.assert_close(out_t, out, rtol=1e-4, atol=1e-4)
    torch.testing.assert_close(lse_t, lse, rtol=1e-4, atol=1e-4)


def test_sequence_past_the_keys_grid_is_refused():
    """The keys kernel's blocks of keys sit on a grid axis of at most 65535: a longer sequence gets
    an error that says so (checked before anything is allocated or launched)."""
    from twosimplicial.ops.triton.bwd import _launch, bwd_config
    cfg = bwd_config(torch.device("cpu"), 2, 1, 1, 1, 4)
    S = 65535 * cfg["KBN"] + 1
    x = torch.zeros(1, S, 1, 1)
    lse = torch.zeros(1, 1, S)
    with pytest.raises(ValueError, match=f"at most {65535 * cfg['KBN']} positions.*got S = {S}"):
        _launch(x, x, x, x, x, x, lse, lse, torch.zeros_like(x), 2, 2, 1.0, "ieee", cfg)


@pytest.mark.gpu
def test_x30_gpu():
    """fp32: finite and close. Logits here are ~1e4, so fp32 rounding alone moves each P by
    ~1e-3 relative: measured on the H100, dv 2.1e-3 and dq/dk 2.3e-2..2.6e-2 of the floor (the
    bound below was set from that run). bf16: finite and deterministic only. The virtual query
    z = q * k_s is rounded to bf16 for the tensor cores, which moves logits of size ~1e4 by ~10,
    so P is not the true one (with the Triton forward's lse: dq/dk off by ~1.7x their norm,
    dv by ~1e-1; the same holds for the forward's output)."""
    gen = torch.Generator().manual_seed(30)
    got, ref, _ = _run(1, 2048, 4, 2, 128, 128, 512, 32, torch.float32, gen, _chunked, device="cuda", mult=30.0)
    _assert_within(got, ref, 5e-2, mult=30.0)
    got, ref, args = _run(1, 2048, 4, 2, 128, 128, 512, 32, torch.bfloat16, gen, _chunked, device="cuda",
                          mult=30.0)
    again = two_simplicial_bwd(*args)
    for name, a, b in zip(NAMES, got, again):
        assert torch.isfinite(a).all(), name
        assert torch.equal(a, b), name


@pytest.mark.gpu
def test_tf32_gpu():
    gen = torch.Generator().manual_seed(32)
    got, ref, _ = _run(1, 1024, 4, 4, 64, 64, 256, 32, torch.float32, gen, _chunked, device="cuda",
                             allow_tf32=True)
    _assert_within(got, ref, 5e-3)


@pytest.mark.parametrize("scale", [-0.4, 0.0])
def test_negative_and_zero_scale(interpret, scale):
    """The kernels build z = q * k_s and apply |scale| in the exp2 argument: a negative scale is
    carried as -z, a zero one as 1e-30 (the same uniform softmax). Forward and all five
    gradients against float64 autograd."""
    from twosimplicial.ops.triton.fwd import two_simplicial_fwd
    gen = torch.Generator().manual_seed(11)
    q, k1, v1, k2, v2, do = _inputs(1, 13, 4, 2, 16, 16, gen)
    out, lse, ref = _reference(_naive, q, k1, v1, k2, v2, do, 9, 5, scale)
    f32 = [x.float() for x in (q, k1, v1, k2, v2)]
    o, l = two_simplicial_fwd(*f32, 9, 5, scale, False)
    assert ((o.double() - out).norm() / out.norm()).item() < 1e-5
    assert ((l.double() - lse).norm() / lse.norm()).item() < 1e-5
    got = two_simplicial_bwd(do.float(), *f32, o, l, 9, 5, scale, False)
    _assert_within(got, ref, 1e-4)


@pytest.mark.parametrize("device", ["cpu", pytest.param("cuda", marks=pytest.mark.gpu)])
@pytest.mark.parametrize("ws,S,cols,NHB,HKV", [(5, 29, 6, 3, 2), (1, 16, 16, 3, 2), (9, 17, 3, 2, 1), (2, 40, 20, 1, 2),
                                               (1, 1, 256, 1, 1)])
def test_slice_sums_add_every_partial_row_of_a_small_key(ws, S, cols, NHB, HKV, device):
    """``_gather_slices``: small key l = p NB + n sums slot ws - 1 + n of program p and, for the
    last ws - 1 keys of a block, slot n - (NB - ws + 1) of program p + 1, over every head block;
    columns past ``cols`` are dropped and the result is cast (here against the same sums in torch,
    on random partial rows; the gradient tests check it end to end). S = 1 and ws = 1 on the GPU:
    integer arguments equal to 1 (S, ws, head blocks, kv heads) become constants there."""
    from twosimplicial.ops.triton.bwd import _gather_slices
    NB, B = 8, 2
    NP = -(-S // NB)
    row = max(32, cols)
    part = torch.randn(B, HKV, NHB, NP, NB + ws - 1, row, generator=torch.Generator().manual_seed(ws + S))
    want = torch.zeros(B, HKV, NP * NB + NB, row, dtype=torch.float64)
    for p in range(NP):
        for s in range(NB + ws - 1):
            want[:, :, p * NB - (ws - 1) + s + NB] += part[:, :, :, p, s].double().sum(2)
    want = want[:, :, NB:NB + S, :cols].transpose(1, 2)
    for dtype in (torch.float32, torch.float16) + ((torch.bfloat16,) if device == "cuda" else ()):
        got = _gather_slices(part.to(device), NB, ws, S, cols, dtype).cpu()
        assert got.dtype == dtype and got.shape == (B, S, HKV, cols) and got.is_contiguous()
        tol = {torch.float32: 1e-5, torch.float16: 1e-3, torch.bfloat16: 1e-2}[dtype]
        torch.testing.assert_close(got.double(), want.to(dtype).double(), rtol=tol, atol=tol)


# the warp-specialised Gluon keys kernel (bwd_ws.py, not dispatched; config={"ws": knobs}):
# (B, S, Hq, Hkv, D, w1, w2, dtype). MHA at D 128 (tiles of 4 positions x 16 offsets, two offset
# chunks); GQA-64 (1 position x 4 heads x 16 offsets); D 64, fp16, windows swapped, S not a
# multiple of a key block; GQA 3:1 (head blocks past the group) with three offset chunks; S = 1
# and windows of 1 (integer arguments of 1 are constants on the GPU); windows past S; GQA-2
# with a small window of 7 offsets
WS_KEYS_CASES = [(1, 2048, 4, 4, 128, 512, 32, torch.bfloat16),
                 (1, 1024, 64, 1, 128, 512, 32, torch.bfloat16),
                 (2, 1000, 8, 8, 64, 32, 300, torch.float16),
                 (1, 333, 12, 4, 64, 100, 45, torch.bfloat16),
                 (2, 1, 4, 2, 64, 1, 1, torch.bfloat16),
                 (1, 100, 4, 4, 64, 300, 200, torch.float16),
                 (1, 500, 4, 2, 128, 200, 7, torch.bfloat16)]
WS_KEYS_VARIANTS = {"default": {}, "stages3": {"stages": 3}, "rows16": {"builder_rows": 16},
                    "stage": {"stage": True, "stages": 3}, "stage-s2-rows8": {"stage": True, "builder_rows": 8},
                    "pingpong": {"pingpong": True}, "stage-pingpong": {"stage": True, "stages": 3, "pingpong": True}}


@pytest.mark.gpu
@pytest.mark.parametrize("case", WS_KEYS_CASES, ids=lambda c: "x".join(map(str, c[:7])))
def test_gpu_ws_keys_kernel_matches_the_triton_backward(case):
    """The Gluon keys kernel's dk_b, dv_b against float64 autograd and the Triton keys kernel's;
    the rows kernel's gradients (dq, the small window's) are the same computation, bit for bit,
    and a rerun gives the same bits."""
    from twosimplicial.ops.plan import make_plan
    B, S, Hq, Hkv, D, w1, w2, dtype = case
    gen = torch.Generator().manual_seed(19)
    base, ref, args = _run(B, S, Hq, Hkv, D, D, w1, w2, dtype, gen, _chunked, device="cuda")
    plan = make_plan(args[1].shape, args[3].shape, w1, w2, dtype, False)
    big = (1, 2) if plan.swap else (3, 4)                # (dk, dv) of the big window: the keys kernel's
    for name, knobs in WS_KEYS_VARIANTS.items():
        got = two_simplicial_bwd(*args, config={"ws": knobs})
        errs = _assert_within(got, ref, GPU_TOL[dtype])
        for i, (g, t) in enumerate(zip(got, base)):
            if i in big:     # relative, with _assert_within's floor for gradients that cancel (S = 1)
                scale = max(t.double().norm().item(), 1e-2 * t.numel() ** 0.5)
                assert (g.double() - t.double()).norm().item() / scale < 2e-3, (name, NAMES[i], errs)
            else:
                assert torch.equal(g, t), (name, NAMES[i])
        again = two_simplicial_bwd(*args, config={"ws": knobs})
        assert all(torch.equal(a, b) for a, b in zip(got, again)), name


def test_ws_keys_kernel_refuses_problems_outside_its_scope_and_bad_knobs():
    gen = torch.Generator().manual_seed(20)
    _, _, args = _run(1, 20, 4, 1, 16, 16, 8, 4, torch.float32, gen, _naive)
    with pytest.raises(ValueError, match=r"config\['ws'\]: the warp-specialised keys kernel takes .*CUDA"):
        two_simplicial_bwd(*args, config={"ws": {}})
    from twosimplicial.ops.triton.bwd_ws import keys_ws
    do, q, k1, v1, k2, v2, out, lse = args[:8]
    t = (q, k2, v2, k1, v1, do, lse, lse, torch.empty_like(k1), torch.empty_like(v1), 4, 8, 0.25)
    for tile, knobs, match in (((1, 1, 16), {}, r"tile: expected \(BI, BH, BT\) of 64 rows"),
                               ((1, 4, 16), {"stages": 1}, "stages: expected at least 2"),
                               ((1, 4, 16), {"builder_rows": 12}, "builder_rows: expected a divisor of 64"),
                               ((1, 4, 16), {"builder_rows": 4}, "builder_rows: expected a divisor of 64")):
        with pytest.raises(ValueError, match=match):
            keys_ws(*t, tile, **knobs)
