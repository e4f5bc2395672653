"""Triton forward kernel and custom op (issue 3).

CPU tests run the kernels under the Triton interpreter (``TRITON_INTERPRET=1``, set per
test by a fixture, so the GPU tests in this file still compile real kernels) on tiny
shapes in fp32/fp16 (the interpreter computes bf16 ``tl.dot`` wrongly). GPU tests
(``@pytest.mark.gpu``) check realistic shapes against a float64 reference on the GPU.
"""
from __future__ import annotations

import math

import pytest
import torch

pytest.importorskip("triton")
from triton.runtime.errors import OutOfResources  # noqa: E402

from twosimplicial.ops import two_simplicial_attention  # noqa: E402
from twosimplicial.ops.chunked import chunked_two_simplicial_attention  # noqa: E402
from twosimplicial.ops.naive import naive_two_simplicial_attention  # noqa: E402
from twosimplicial.ops.triton.common import pack_rows  # noqa: E402
from twosimplicial.ops.triton.fwd import clean_values, two_simplicial_fwd  # noqa: E402
from twosimplicial.ops.triton.fwd_ws import BM as WS_BM, pairs  # noqa: E402
from twosimplicial.ops.triton.op import is_available, triton_two_simplicial  # noqa: E402



@pytest.fixture(autouse=True)
def _interpreter_for_cpu_tests(request, monkeypatch):
    """CPU tests need the interpreter; GPU tests must not get it."""
    if request.node.get_closest_marker("gpu") is None:
        monkeypatch.setenv("TRITON_INTERPRET", "1")


def rel(a, b):
    a, b = a.double(), b.double()
    return ((a - b).norm() / b.norm()).item()


NAMES = ("dq", "dk1", "dv1", "dk2", "dv2")


def make(B, S, Hq, Hkv, D, Dv, dtype=torch.float32, device="cpu", mult=1.0, gen=None):
    """Fresh random inputs (never zeros)."""
    def r(*shape):
        return (torch.randn(*shape, generator=gen, device=device, dtype=torch.float32) * mult).to(dtype)
    return r(B, S, Hq, D), r(B, S, Hkv, D), r(B, S, Hkv, Dv), r(B, S, Hkv, D), r(B, S, Hkv, Dv)


def ref64(q, k1, v1, k2, v2, w1, w2, scale):
    return naive_two_simplicial_attention(*(t.double() for t in (q, k1, v1, k2, v2)), w1, w2, scale)


# (B, S, Hq, Hkv, D, Dv, w1, w2): MHA, GQA, MQA, odd windows and lengths, w1 < w2 (swap),
# w = 1, windows past S, S = 1, D != Dv, D = 48 (padded head dim), several offset chunks,
# unmasked interior key blocks and narrow left-edge blocks (the last case).
CASES = [
    (1, 7, 2, 2, 16, 16, 3, 2),
    (2, 13, 4, 2, 16, 32, 5, 3),
    (1, 11, 4, 1, 32, 16, 6, 5),
    (1, 9, 3, 3, 48, 16, 4, 7),
    (1, 1, 2, 1, 16, 16, 4, 4),
    (1, 10, 2, 1, 16, 16, 40, 30),
    (1, 19, 2, 2, 16, 16, 1, 1),
    (1, 19, 1, 1, 16, 24, 9, 1),
    (1, 18, 4, 2, 16, 16, 17, 19),
    (1, 45, 2, 2, 16, 16, 35, 2),
]


@pytest.mark.parametrize("tma", [False, True], ids=["pointers", "tma"])
@pytest.mark.parametrize("case", CASES + [(3, 40, 2, 2, 16, 16, 30, 3), (2, 33, 4, 1, 32, 32, 33, 4)],
                         ids=lambda c: "B{}S{}Hq{}Hkv{}D{}Dv{}w{}x{}".format(*c))
def test_forward_matches_reference_fp32(case, tma):
    """Both ways of loading the big-window key blocks: pointer loads, and copy-engine (TMA)
    descriptors (the GPU default; rows outside the sequence and batch come back as zeros)."""
    B, S, Hq, Hkv, D, Dv, w1, w2 = case
    gen = torch.Generator().manual_seed(hash(case) % 2**31)
    inputs = make(B, S, Hq, Hkv, D, Dv, gen=gen)
    scale = 1 / math.sqrt(D)
    out, lse = two_simplicial_fwd(*inputs, w1, w2, scale, allow_tf32=False, config=dict(tma=tma))
    ro, rl = ref64(*inputs, w1, w2, scale)
    assert out.shape == (B, S, Hq, Dv) and out.dtype == torch.float32
    assert lse.shape == (B, Hq, S) and lse.dtype == torch.float32
    assert rel(out, ro) < 1e-5
    assert rel(lse, rl) < 1e-5


@pytest.mark.parametrize("config", [dict(prefetch_vs=True), dict(block_m=32, block_n=16, prefetch_vs=False),
                                    dict(int64_idx=True), dict(block_t=4), dict(block_m=32, block_t=4)],
                         ids=["prefetch_vs", "block_m32", "int64_idx", "block_t4", "block_m32_t4"])
def test_forward_other_configs(config):
    """Launch variants the GPU uses or a benchmark tries (v_s prefetched before the key loop,
    bigger tiles, 64-bit position offsets for tensors past 2^31 elements per batch, tiles of
    several positions that take the small window in chunks of offsets)."""
    from twosimplicial.ops.triton.fwd import fwd_config
    if "block_t" in config:
        cfg = fwd_config(2, 5, 16, 16, True, **config)
        assert cfg["BT"] == 4 and cfg["BI"] > 1      # a chunk loop over tiles of several positions
    gen = torch.Generator().manual_seed(6)
    inputs = make(1, 20, 4, 2, 16, 16, gen=gen)
    out, lse = two_simplicial_fwd(*inputs, 9, 5, 0.25, False, config=config)
    ro, rl = ref64(*inputs, 9, 5, 0.25)
    assert rel(out, ro) < 1e-5 and rel(lse, rl) < 1e-5


@pytest.mark.parametrize("edge_dot", [True, False], ids=["edge_dot", "narrow"])
@pytest.mark.parametrize("case", [(1, 37, 2, 2, 16, 16, 20, 8), (2, 50, 2, 2, 16, 24, 8, 33), (1, 6, 1, 1, 16, 16, 7, 9),
                                  (1, 30, 4, 2, 32, 16, 4, 11), (1, 21, 2, 1, 16, 16, 16, 3),
                                  (1, 23, 2, 2, 48, 16, 6, 30)],
                         ids=lambda c: "B{}S{}Hq{}Hkv{}D{}Dv{}w{}x{}".format(*c))
def test_forward_two_positions_per_tile(case, edge_dot):
    """Tiles of two positions (P = 2: the MHA shape of the GPU defaults): the right-edge key
    i0 + 1 either folded in (its logit by a small tensor-core product) or by a masked narrow
    block; both load paths; a head dim that is not a power of two (masked edge-key load)."""
    B, S, Hq, Hkv, D, Dv, w1, w2 = case
    gen = torch.Generator().manual_seed(hash(case) % 2**31)
    inputs = make(B, S, Hq, Hkv, D, Dv, gen=gen)
    from twosimplicial.ops.triton.fwd import fwd_config
    assert fwd_config(Hq // Hkv, min(w1, w2, S), D, Dv, True)["BI"] == 2
    ro, rl = ref64(*inputs, w1, w2, 0.3)
    for tma in (False, True):
        out, lse = two_simplicial_fwd(*inputs, w1, w2, 0.3, False, config=dict(edge_dot=edge_dot, tma=tma))
        assert rel(out, ro) < 1e-5 and rel(lse, rl) < 1e-5


def test_tma_descriptor_only_where_the_copy_engine_can_read():
    from twosimplicial.ops.triton.fwd import _kv_desc
    x = torch.randn(2, 9, 3, 32)
    d = _kv_desc(x, 16)
    assert d is not None and list(d.shape) == [2, 9, 96] and list(d.block_shape) == [1, 16, 32]
    assert _kv_desc(torch.randn(2, 9, 3, 48), 16) is None            # head dim not a power of two
    assert _kv_desc(torch.randn(2, 9, 3, 64)[..., :32], 16) is None  # heads not packed
    assert _kv_desc(torch.randn(2, 9, 3, 32)[:, :, :, :], 16) is not None
    assert _kv_desc(torch.randn(2, 9 * 3 * 32 + 1)[:, 1:].view(2, 9, 3, 32), 16) is None   # unaligned base


def test_forward_fp16_and_x30_inputs():
    gen = torch.Generator().manual_seed(1)
    q, k1, v1, k2, v2 = make(1, 12, 4, 2, 32, 16, gen=gen)
    scale = 1 / math.sqrt(32)
    out, lse = two_simplicial_fwd(*(t.half() for t in (q, k1, v1, k2, v2)), 6, 3, scale, False)
    ro, rl = ref64(q, k1, v1, k2, v2, 6, 3, scale)
    assert out.dtype == torch.float16
    assert rel(out, ro) < 5e-3 and rel(lse, rl) < 1e-3
    # x30: logits in the tens of thousands; softmax is nearly one-hot, must stay finite and right
    big = [t * 30 for t in (q, k1, k2)]
    out, lse = two_simplicial_fwd(big[0], big[1], v1, big[2], v2, 6, 3, scale, False)
    ro, rl = ref64(big[0], big[1], v1, big[2], v2, 6, 3, scale)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    assert rel(out, ro) < 1e-4 and rel(lse, rl) < 1e-5


def test_strided_inputs_and_public_op_both_forms():
    """Views into a packed projection (non-contiguous heads) and the determinant form,
    reached through two_simplicial_attention(backend="triton") on CPU tensors."""
    gen = torch.Generator().manual_seed(2)
    B, S, H, D = 1, 9, 2, 18
    packed = torch.randn(B, S, H, 5 * D, generator=gen)
    q, k1, v1, k2, v2 = packed.split(D, dim=-1)
    assert not q.is_contiguous()
    for form in ("trilinear", "determinant"):
        out, lse = two_simplicial_attention(q, k1, v1, k2, v2, 4, 3, form=form, return_lse=True, backend="triton")
        ro, rl = naive_two_simplicial_attention(*(t.double() for t in (q, k1, v1, k2, v2)), 4, 3, form=form)
        assert rel(out, ro) < 1e-5 and rel(lse, rl) < 1e-5, form


def test_is_available(monkeypatch):
    t = torch.zeros(1)
    assert is_available(t)
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    assert not is_available(t)


def test_compile_fullgraph_cpu():
    """The custom op traces as one node: fullgraph=True must not break (aot_eager on CPU)."""
    gen = torch.Generator().manual_seed(3)
    inputs = make(1, 6, 2, 1, 16, 16, gen=gen)

    def f(q, k1, v1, k2, v2):
        out, lse = triton_two_simplicial(q, k1, v1, k2, v2, 4, 2, 0.25)
        return out * 2, lse

    torch._dynamo.reset()
    out_c, lse_c = torch.compile(f, fullgraph=True, backend="aot_eager")(*inputs)
    out_e, lse_e = f(*inputs)
    assert torch.equal(out_c, out_e) and torch.equal(lse_c, lse_e)


def _check_clean_values(device, dtype, B=2, S=37, H=3, Dv=24):
    """clean_values: copies with the non-finite entries as 0 (inputs with a non-unit head stride
    and a head dim that is not a power of two), and the running count of positions whose row
    holds one, per (batch, kv head)."""
    gen = torch.Generator().manual_seed(11)
    v1, v2 = (torch.randn(B, S, 2 * H, Dv, generator=gen).to(device, dtype)[:, :, ::2] for _ in range(2))
    assert v1.stride(2) == 2 * Dv                # (torch calls a [1, 1, 1, Dv] view contiguous anyway)
    for v in (v1, v2):
        for n in range(12):
            b, i, h, e = (int(torch.randint(0, m, (1,), generator=gen)) for m in (B, S, H, Dv))
            v[b, i, h, e] = (float("nan"), float("inf"), -float("inf"))[n % 3]
    c1, c2, counts = clean_values(v1, v2)
    for k, (v, c) in enumerate(((v1, c1), (v2, c2))):
        assert c.is_contiguous() and c.dtype == dtype
        assert torch.equal(c, torch.nan_to_num(v, nan=0.0, posinf=0.0, neginf=0.0))
        rows = (~torch.isfinite(v)).any(-1).transpose(1, 2)                    # [B, H, S]
        assert torch.equal(counts[k], rows.to(torch.int32).cumsum(-1))
    assert counts.dtype == torch.int32 and counts.shape == (2, B, H, S)


def test_clean_values():
    _check_clean_values("cpu", torch.float32)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("shape", [(2, 37, 3, 24), (1, 1, 1, 16), (3, 300, 1, 128)], ids=str)
def test_clean_values_gpu(dtype, shape):
    """Integer arguments equal to 1 (S, Hkv) are constants on the GPU, not in the interpreter."""
    _check_clean_values("cuda", dtype, *shape)


def test_custom_ops_pass_opcheck():
    """Schema, fake (meta) implementations matching the real outputs' shapes and strides,
    autograd registration: what torch.compile and CUDA graphs rely on."""
    gen = torch.Generator().manual_seed(7)
    q, k1, v1, k2, v2 = make(1, 7, 4, 2, 16, 16, gen=gen)
    for form in ("trilinear", "determinant"):
        torch.library.opcheck(torch.ops.twosimplicial.fwd.default, (q, k1, v1, k2, v2, 4, 3, 0.25, False, form),
                              test_utils=("test_schema", "test_faketensor"))
    out, lse = two_simplicial_fwd(q, k1, v1, k2, v2, 4, 3, 0.25, False)
    do = torch.randn(out.shape, generator=gen)
    torch.library.opcheck(torch.ops.twosimplicial.bwd.default,
                          (do, q, k1, v1, k2, v2, out, lse, 4, 3, 0.25, False, "trilinear"),
                          test_utils=("test_schema", "test_faketensor"))


def test_lse_is_not_differentiable():
    gen = torch.Generator().manual_seed(4)
    q, k1, v1, k2, v2 = make(1, 5, 2, 1, 16, 16, gen=gen)
    q.requires_grad_(True)
    out, lse = triton_two_simplicial(q, k1, v1, k2, v2, 3, 2, 0.25)
    assert out.requires_grad and not lse.requires_grad


@pytest.mark.parametrize("case", [(1, 9, 4, 2, 16, 16, 5, 3), (1, 8, 2, 2, 16, 32, 2, 6)])
def test_gradients_through_op(case):
    B, S, Hq, Hkv, D, Dv, w1, w2 = case
    gen = torch.Generator().manual_seed(5)
    inputs = [t.requires_grad_(True) for t in make(B, S, Hq, Hkv, D, Dv, gen=gen)]
    do = torch.randn(B, S, Hq, Dv, generator=gen)
    out, _ = triton_two_simplicial(*inputs, w1, w2, 1 / math.sqrt(D))
    grads = torch.autograd.grad(out, inputs, do)
    inputs64 = [t.detach().double().requires_grad_(True) for t in inputs]
    ro, _ = naive_two_simplicial_attention(*inputs64, w1, w2, 1 / math.sqrt(D))
    rgrads = torch.autograd.grad(ro, inputs64, do.double())
    for name, g, rg in zip(NAMES, grads, rgrads):
        assert rel(g, rg) < 1e-4, name


# ------------------------------------------------------------------------------------------
# GPU tests (device): realistic shapes against float64 on the GPU
# ------------------------------------------------------------------------------------------

BOUNDS = {torch.bfloat16: 1e-2, torch.float16: 3e-3, torch.float32: 1e-5}


def window_slice_ref(inputs, w1, w2, scale, n_last):
    """float64 reference for the last ``n_last`` queries: every query sees only its windows,
    so the sub-sequence that starts max(w1, w2) - 1 positions earlier gives them exactly."""
    S = inputs[0].shape[1]
    start = max(0, S - n_last - max(w1, w2) + 1)
    sub = [t[:, start:].double() for t in inputs]
    out, lse = chunked_two_simplicial_attention(*sub, w1, w2, scale)
    return out[:, -n_last:], lse[:, :, -n_last:]


GPU_SHAPES = {  # name: (B, S, Hq, Hkv, D)
    "mha-d128": (1, 8192, 16, 16, 128),
    "gqa64-d128": (1, 8192, 64, 1, 128),
    "mha-d64": (1, 4096, 8, 8, 64),
    "gqa8-d96": (1, 2048, 16, 2, 96),
}


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32], ids=str)
@pytest.mark.parametrize("shape", list(GPU_SHAPES), ids=str)
def test_gpu_forward_accuracy(shape, dtype):
    B, S, Hq, Hkv, D = GPU_SHAPES[shape]
    w1, w2 = 512, 32
    gen = torch.Generator(device="cuda").manual_seed(11)
    inputs = make(B, S, Hq, Hkv, D, D, dtype=dtype, device="cuda", gen=gen)
    scale = 1 / math.sqrt(D)
    out = torch.full((B, S, Hq, D), float("nan"), device="cuda", dtype=dtype)   # poison: every element written?
    o, lse = two_simplicial_fwd(*inputs, w1, w2, scale, allow_tf32=False)
    out.copy_(o)
    assert torch.isfinite(out).all() and torch.isfinite(lse).all()
    # the first positions (windows cut by the sequence start) and the last ones
    head_ref = chunked_two_simplicial_attention(*(t[:, :640].double() for t in inputs), w1, w2, scale)
    tail_ref = window_slice_ref(inputs, w1, w2, scale, 256)
    assert rel(out[:, :640], head_ref[0]) < BOUNDS[dtype]
    assert rel(out[:, -256:], tail_ref[0]) < BOUNDS[dtype]
    assert rel(lse[:, :, :640], head_ref[1]) < 1e-4
    assert rel(lse[:, :, -256:], tail_ref[1]) < 1e-4


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
@pytest.mark.parametrize("windows", [(128, 128), (256, 100), (300, 200)], ids=lambda w: "x".join(map(str, w)))
def test_gpu_forward_wide_small_window(windows, dtype):
    """Small windows past 64 take 128-row tiles (fwd_config); past 128 the kernel loops over
    offset chunks. MHA and GQA-2, every position against float64."""
    for B, S, Hq, Hkv, D in ((1, 1500, 4, 4, 128), (2, 700, 4, 2, 64)):
        gen = torch.Generator(device="cuda").manual_seed(13)
        inputs = make(B, S, Hq, Hkv, D, D, dtype=dtype, device="cuda", gen=gen)
        scale = 1 / math.sqrt(D)
        out, lse = two_simplicial_fwd(*inputs, *windows, scale, allow_tf32=False)
        ref_out, ref_lse = chunked_two_simplicial_attention(*(t.double() for t in inputs), *windows, scale)
        assert rel(out, ref_out) < BOUNDS[dtype], (B, S, Hq, Hkv, D)
        assert rel(lse, ref_lse) < 1e-4, (B, S, Hq, Hkv, D)


@pytest.mark.gpu
def test_gpu_tf32_follows_torch_flag():
    gen = torch.Generator(device="cuda").manual_seed(12)
    inputs = make(1, 1024, 8, 8, 64, 64, device="cuda", gen=gen)
    ref = window_slice_ref(inputs, 256, 32, 0.125, 1024)[0]
    old = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = True
        e_tf32 = rel(triton_two_simplicial(*inputs, 256, 32, 0.125)[0], ref)
        torch.backends.cuda.matmul.allow_tf32 = False
        e_ieee = rel(triton_two_simplicial(*inputs, 256, 32, 0.125)[0], ref)
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    assert e_tf32 < 2e-3 and e_ieee < 1e-5 and e_ieee < e_tf32


# the warp-specialised Gluon forward (fwd_ws.py, not dispatched): its knobs per head dim (three
# consumers and three stages fit the shared memory only at D = 64)
WS_SHARE = {"share": {"share": True}, "share-bn128": {"share": True, "block_n": 128},
            "share-overlap-s3": {"share": True, "overlap": True, "stages": 3},
            "share-pingpong": {"share": True, "overlap": True, "pingpong": True}}
WS_VARIANTS = {128: {"c2": {}, "overlap": {"overlap": True}, **WS_SHARE},
               64: {"c2": {}, "c2s3": {"stages": 3}, "c3": {"consumers": 3}, "c3s3": {"consumers": 3, "stages": 3},
                    "c3-overlap": {"consumers": 3, "overlap": True}, **WS_SHARE}}
# (B, S, Hq, Hkv, D, w1, w2, scale, dtype): GQA-8 (persistent grid of many tiles); head blocks
# partly past the kv group (3 query heads per kv head) and S not a multiple of any block, with a
# negative scale; a non-finite value (fp16); windows past S; a window of one big key; MHA (two
# positions per tile) with windows not multiples of a block; MHA with 16 offsets (four positions
# per tile, fp16, a non-finite value); GQA-2 (one position and one head block per tile, pairs of
# positions); GQA-6 (three head blocks: no pairs)
WS_CASES = [(1, 1000, 32, 4, 128, 512, 32, 0.088, torch.bfloat16),
            (3, 100, 6, 2, 64, 50, 32, -0.3, torch.bfloat16),
            (2, 200, 8, 1, 64, 70, 32, 0.2, torch.float16),
            (1, 300, 16, 1, 128, 4096, 16, 0.2, torch.bfloat16),
            (2, 130, 64, 1, 64, 1, 32, 0.2, torch.bfloat16),
            (1, 777, 8, 8, 128, 300, 32, 0.1, torch.bfloat16),
            (2, 150, 4, 4, 64, 40, 16, -0.2, torch.float16),
            (1, 500, 4, 2, 64, 200, 32, 0.15, torch.bfloat16),
            (1, 260, 6, 1, 64, 100, 32, 0.15, torch.bfloat16)]


@pytest.mark.gpu
@pytest.mark.parametrize("case", WS_CASES, ids=lambda c: "x".join(map(str, c[:7])))
def test_gpu_ws_forward_matches_the_triton_forward(case):
    B, S, Hq, Hkv, D, w1, w2, scale, dtype = case
    gen = torch.Generator(device="cuda").manual_seed(17)
    inputs = make(B, S, Hq, Hkv, D, D, dtype=dtype, device="cuda", gen=gen)
    if dtype == torch.float16:
        inputs[4][:, S // 3, 0, 5] = float("inf")        # v2: the rows whose window holds it are NaN
    o0, l0 = two_simplicial_fwd(*inputs, w1, w2, scale, False)
    ro, rl = chunked_two_simplicial_attention(*(t.double() for t in inputs), w1, w2, scale)
    fin = torch.isfinite(ro)
    assert rel(o0[fin], ro[fin]) < 1e-2
    BI, BH, BT = pack_rows(WS_BM, Hq // Hkv, min(w1, w2))
    kind = pairs(Hq // Hkv, min(w1, w2))
    for name, knobs in WS_VARIANTS[D].items():
        if knobs.get("share") and not kind:             # an odd number of head blocks past one
            with pytest.raises(ValueError, match="share: pairs of tiles need"):
                two_simplicial_fwd(*inputs, w1, w2, scale, False, config={"ws": knobs})
            continue
        out = torch.full_like(o0, 7.0)                   # poison: every element written?
        # past the 232,448 bytes of shared memory a block may have (offline sm_90a builds): three
        # rings of three blocks beside one-offset tiles' merge scratch; FA3's P buffers beside
        # own rings and right-edge blocks at D 128
        too_big = ((knobs.get("consumers"), knobs.get("stages"), BT) == (3, 3, 1)
                   or (knobs.get("overlap") and not knobs.get("share") and D == 128 and BI > 1))
        try:
            o, lse = two_simplicial_fwd(*inputs, w1, w2, scale, False, config={"ws": knobs})
        except OutOfResources:
            assert too_big, name
            continue
        assert not too_big, name
        out.copy_(o)
        assert torch.equal(out.isnan(), o0.isnan()), name
        # one position per unit and 64-key blocks: the Triton forward's blocks, so the same sums
        if knobs.get("block_n", 64) == 64 and BI == 1 and (kind == 1 or not knobs.get("share")):
            assert rel(out[fin], o0[fin]) < 1e-6 and rel(lse, l0) < 1e-6, name
        else:                                            # other blocks: P rounded at other maxima
            assert rel(out[fin], ro[fin]) < 1e-2 and rel(lse, l0) < 1e-5, name


def test_ws_forward_refuses_problems_outside_its_scope_and_bad_knobs():
    # share's pairing: head blocks of one position (GQA-64: 32 blocks of 2 heads x 32 offsets),
    # positions (MHA; GQA-64 with one offset: one block of 64 heads), none (GQA-6: 3 blocks of 2)
    assert (pairs(64, 32), pairs(1, 32), pairs(64, 1), pairs(6, 32)) == (1, 2, 2, 0)
    inputs = make(1, 20, 4, 1, 16, 16)
    with pytest.raises(ValueError, match=r"config\['ws'\].*CUDA"):
        two_simplicial_fwd(*inputs, 8, 4, 0.25, False, config={"ws": {}})
    from twosimplicial.ops.triton.fwd_ws import canonical_fwd_ws
    for knobs, match in (({"consumers": 4}, "consumers: expected 2 or 3"),
                         ({"stages": 1}, "stages: expected at least 2"),
                         ({"block_n": 32}, "block_n: expected 64 or 128"),
                         ({"share": True, "consumers": 3}, "share: a ring shared by a pair of tiles takes 2"),
                         ({"pingpong": True, "overlap": True}, "pingpong: .* only with share=True and overlap=True")):
        with pytest.raises(ValueError, match=match):
            canonical_fwd_ws(None, *inputs, None, 0.25, **knobs)


@pytest.mark.gpu
@pytest.mark.parametrize("case", [(1, 3000, 8, 2, 48, 64, 200, 48), (2, 1, 4, 4, 256, 256, 512, 32),
                                  (1, 700, 4, 1, 32, 32, 1000, 1000), (1, 333, 2, 2, 16, 16, 1, 1)])
def test_gpu_edge_shapes(case):
    B, S, Hq, Hkv, D, Dv, w1, w2 = case
    gen = torch.Generator(device="cuda").manual_seed(13)
    inputs = make(B, S, Hq, Hkv, D, Dv, dtype=torch.bfloat16, device="cuda", gen=gen)
    scale = 1 / math.sqrt(D)
    out, lse = two_simplicial_fwd(*inputs, w1, w2, scale, False)
    ro, rl = chunked_two_simplicial_attention(*(t.double() for t in inputs), w1, w2, scale)
    # lse of very short rows is a single bf16-rounded logit: bf16-class bound for it too
    assert rel(out, ro) < 1e-2 and rel(lse, rl) < 1e-2


@pytest.mark.gpu
def test_gpu_x30_inputs_and_determinism():
    """x30 inputs: logits ~1e4, softmax nearly one-hot. Must stay finite and be bitwise
    reproducible. In bf16 the virtual query z = q * k_s is rounded to bf16 before the
    product (relative 2^-9), which moves logits of this size by tens of nats, so the output
    only roughly matches a float64 reference; lse (a max) stays close. fp32 (IEEE) must match."""
    gen = torch.Generator(device="cuda").manual_seed(14)
    q, k1, v1, k2, v2 = make(1, 4096, 64, 1, 128, 128, dtype=torch.bfloat16, device="cuda", gen=gen)
    q, k1, k2 = q * 30, k1 * 30, k2 * 30
    o1, l1 = two_simplicial_fwd(q, k1, v1, k2, v2, 512, 32, 128 ** -0.5, False)
    o2, l2 = two_simplicial_fwd(q, k1, v1, k2, v2, 512, 32, 128 ** -0.5, False)
    assert torch.isfinite(o1).all() and torch.isfinite(l1).all()
    assert torch.equal(o1, o2) and torch.equal(l1, l2)
    ro, rl = window_slice_ref((q, k1, v1, k2, v2), 512, 32, 128 ** -0.5, 128)
    assert rel(l1[:, :, -128:], rl) < 5e-3
    assert rel(o1[:, -128:], ro) < 0.25
    x = [t.float() for t in (q, k1, v1, k2, v2)]
    o32, l32 = two_simplicial_fwd(*x, 512, 32, 128 ** -0.5, False)
    assert torch.isfinite(o32).all()
    assert rel(o32[:, -128:], ro) < 1e-3 and rel(l32[:, :, -128:], rl) < 1e-5


@pytest.mark.gpu
def test_gpu_compile_fullgraph_and_cuda_graph():
    gen = torch.Generator(device="cuda").manual_seed(15)
    inputs = make(2, 1024, 8, 2, 64, 64, dtype=torch.bfloat16, device="cuda", gen=gen)

    def f(q, k1, v1, k2, v2):
        return triton_two_simplicial(q, k1, v1, k2, v2, 128, 16, 0.125)[0] * 2 + 1

    torch._dynamo.reset()
    out_c = torch.compile(f, fullgraph=True)(*inputs)
    assert torch.equal(out_c, f(*inputs))

    static = [t.clone() for t in inputs]
    f(*static)                                          # compile/warm up outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = f(*static)
    fresh = make(2, 1024, 8, 2, 64, 64, dtype=torch.bfloat16, device="cuda", gen=gen)
    for s, t in zip(static, fresh):
        s.copy_(t)
    graph.replay()
    assert torch.equal(static_out, f(*fresh))


@pytest.mark.gpu
def test_gpu_backward_concurrent_and_cuda_graph():
    """The backward's two kernels on two streams (``concurrent``, the default for problems of
    many key blocks) give bitwise the gradients of running them in turn, and they capture into
    a CUDA graph whose replay on fresh inputs gives bitwise the eager gradients."""
    from twosimplicial.ops.triton.bwd import two_simplicial_bwd
    gen = torch.Generator(device="cuda").manual_seed(17)

    def fresh():
        inputs = make(1, 1024, 8, 2, 64, 64, dtype=torch.bfloat16, device="cuda", gen=gen)
        do = torch.randn(1, 1024, 8, 64, device="cuda", dtype=torch.bfloat16, generator=gen)
        return [do, *inputs, *two_simplicial_fwd(*inputs, 256, 32, 0.125, False)]

    def bwd(a, concurrent):
        return two_simplicial_bwd(*a, 256, 32, 0.125, False, config=dict(concurrent=concurrent))

    static = fresh()
    for name, a, b in zip(NAMES, bwd(static, True), bwd(static, False)):
        assert torch.equal(a, b), name
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_grads = bwd(static, True)
    new = fresh()
    for s, t in zip(static, new):
        s.copy_(t)
    graph.replay()
    for name, a, b in zip(NAMES, static_grads, bwd(new, False)):
        assert torch.equal(a, b), name


@pytest.mark.gpu
def test_gpu_backward_through_op_compiled():
    gen = torch.Generator(device="cuda").manual_seed(16)
    inputs = [t.requires_grad_(True) for t in make(1, 1024, 8, 2, 64, 64, dtype=torch.bfloat16, device="cuda", gen=gen)]
    do = torch.randn(1, 1024, 8, 64, device="cuda", dtype=torch.bfloat16, generator=gen)

    def f(*a):
        return triton_two_simplicial(*a, 256, 32, 0.125)[0]

    torch._dynamo.reset()
    g_c = torch.autograd.grad(torch.compile(f, fullgraph=True)(*inputs), inputs, do)
    g_e = torch.autograd.grad(f(*inputs), inputs, do)
    inputs64 = [t.detach().double().requires_grad_(True) for t in inputs]
    g_r = torch.autograd.grad(chunked_two_simplicial_attention(*inputs64, 256, 32, 0.125)[0], inputs64, do.double())
    for name, a, b, r in zip(NAMES, g_c, g_e, g_r):
        assert torch.equal(a, b), name
        assert rel(a, r) < 2e-2, name
