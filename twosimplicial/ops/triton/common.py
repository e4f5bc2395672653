"""What the forward (``fwd.py``) and backward (``bwd.py``) kernels share: one vocabulary, the
scale convention, the row packing, the interpreter mechanism and the stride packing.

Vocabulary (both kernels; docs/kernels.md, Virtual rows and the tile)::

    B, S, HQ, HKV   batch, sequence length, query heads, key/value heads
    GQA             query heads per kv head, HQ // HKV (1: MHA, HQ: MQA)
    hk, hq          a kv head, a query head (hq = hk * GQA + head inside the group)
    WS, WB          the small and the big window (``ops/plan.py``: ws <= wb); t an offset in
                    [0, WS), l = i - t the small key of row (i, t), j a big-window key
    D, DV           head dims of q, k and of v, out; D_PAD, DV_PAD the same padded to a power
                    of two >= 16; dd, ee their index vectors, dmask, emask the real ones
    BI, BH, BT      a tile of BM = BI * BH * BT virtual rows: BI positions x BH query heads of
                    one kv group x BT offsets, row r = (p * BH + h) * BT + t (offset fastest);
                    NQ = BI * BH (position, head) pairs per tile
    BN              keys per big-window block (the forward's narrow right-edge blocks: BN2)
    NHB             head blocks of BH heads per kv group
    PRECISION       tl.dot's input_precision ("ieee" or "tf32"), from the plan
    NEG_Z           the scale is negative: z = -(q * k_s) (:func:`z_scaling`)
    FORM            the form the kernels compute (:func:`form_code`): 0 trilinear, z = q * k_s;
                    +1 / -1 the determinant form at head dim D, z = sgn * (k_s x q) per 3-chunk
                    (docs/kernels.md, The determinant form at head dim D), built from z's
                    operands (:func:`z_operands`), which Q and KS then hold: rows of 2 D values;
                    nx, pv the column of the next and the previous dim inside each chunk
                    (:func:`chunk_columns`)
    Q, KS, VS, KB, VB, O, LSE, DO, ...  tensors (pointers), in the roles of the plan;
    sq, sks, svs, skb, svb, so, sdo, ... their (batch, seq, head) strides, one tuple each
                    (:func:`strides`), indexed [0], [1], [2]
"""
from __future__ import annotations

import functools
import types

import torch
import triton
import triton.language as tl

from ..determinant import rotation_index

LOG2E = 1.4426950408889634

# Row reductions go through tl.reduce with triton's own combine functions, tl.reduce(x, 1,
# max_combine), instead of tl.max / tl.sum: those are @triton.jit helpers decorated when triton
# was imported, and the interpreter cannot call them if TRITON_INTERPRET=1 was set only
# afterwards (as the tests do), while it recognises these combine functions and reduces with
# numpy. For the same reason the kernels call no other helper of triton.language.standard
# (tl.cdiv, tl.zeros): tl.full instead of tl.zeros, integer arithmetic instead of tl.cdiv.
max_combine = tl.standard._elementwise_max
sum_combine = tl.standard._sum_combine


def pow2(n: int) -> int:
    """The smallest power of two >= n (1 for n <= 1)."""
    return 1 << max(0, (int(n) - 1).bit_length())


def padded(n: int) -> int:
    """A head dim padded for the kernels (``D_PAD``, ``DV_PAD``): a power of two >= 16."""
    return max(16, pow2(n))


def z_scaling(scale: float) -> tuple[bool, float]:
    """How the kernels (forward and backward alike) apply ``scale``: the virtual query is the
    plain product ``z = q * k_s`` (``-z`` for a negative scale: ``neg``), rounded once to the
    input dtype, and the base-2 logits are ``qk_scale * <z, k_b>`` with ``qk_scale = |scale| *
    log2(e) > 0``. A zero scale runs as 1e-30 (logits ~1e-28: the same uniform softmax in fp32)."""
    return scale < 0, max(abs(float(scale)), 1e-30) * LOG2E


def form_code(form: str, swap: bool) -> int:
    """The kernels' ``FORM`` for ``form`` (one the kernels compute natively: ``forms.Form.native``)
    and the plan's roles: 0 for the trilinear form; for the determinant form the sign ``sgn`` of
    ``z = sgn * (k_s x q)``: +1 when k2 is the small window's key set (``plan.swap``), since
    ``det[q; k1; k2] = k1 . (k2 x q)``, and -1 when k1 is, since it is also ``k2 . (q x k1)``."""
    if form == "trilinear":
        return 0
    if form == "determinant":
        return 1 if swap else -1
    raise ValueError(f"form must be 'trilinear' or 'determinant' for the Triton kernels, got {form!r}")


@functools.cache
def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (the size of a persistent grid, waves of a launch)."""
    return torch.cuda.get_device_properties(device).multi_processor_count


@triton.jit
def seq_block(S, H, BS: tl.constexpr):
    """A one-axis grid over (batch, head) x blocks of BS positions, blocks fastest (no CUDA limit
    of 65535 on B * H; the host launches ``cdiv(S, BS) * B * H`` programs): this program's
    (batch, head) pair ``b * H + h``, batch, head and its block's positions."""
    n_s = (S + BS - 1) // BS
    pid_s = tl.program_id(0) % n_s
    pid_bh = tl.program_id(0) // n_s
    b = pid_bh // H
    h = pid_bh % H
    return pid_bh, b, h, pid_s * BS + tl.arange(0, BS)


@triton.jit
def chunk_columns(dd, D: tl.constexpr):
    """For column indices ``dd``: the next and the previous column inside each 3-chunk of the
    first ``3 * (D // 3)`` dims (``(a x b)_d = a[nx] b[pv] - a[pv] b[nx]``), the column itself on
    the leftover and padding dims; and the mask of the chunk dims."""
    C3: tl.constexpr = 3 * (D // 3)
    m = dd % 3
    in_c3 = dd < C3
    return tl.where(in_c3, dd - m + (m + 1) % 3, dd), tl.where(in_c3, dd - m + (m + 2) % 3, dd), in_c3


@triton.jit
def _z_operand_rows(X, XZ, sx, S, H, n_rows, FIRST_NX: tl.constexpr, SIGN_CHUNK: tl.constexpr,
                    SIGN_LEFT: tl.constexpr, D: tl.constexpr, D_PAD: tl.constexpr, BR: tl.constexpr):
    """BR rows of one operand tensor ``XZ [.., 2 D]`` (contiguous) from ``X [B, S, H, D]`` (strides
    ``sx``, last 1), see :func:`z_operands`: on the chunk dims the first half is ``SIGN_CHUNK *
    x[nx]`` (FIRST_NX) or ``* x[pv]``, the second ``SIGN_CHUNK`` times the other permutation; on
    the leftover dims ``SIGN_LEFT * x`` and 0. The signs are +-1: copies and negations, exact."""
    r = tl.program_id(0) * BR + tl.arange(0, BR)
    dd = tl.arange(0, D_PAD)
    c_nx, c_pv, in_c3 = chunk_columns(dd, D)
    row = (r // (S * H)).to(tl.int64) * sx[0] + ((r // H) % S).to(tl.int64) * sx[1] + (r % H) * sx[2]
    m = (r < n_rows)[:, None] & (dd < D)[None, :]
    first = tl.load(X + row[:, None] + (c_nx if FIRST_NX else c_pv)[None, :], mask=m, other=0.0)
    second = tl.load(X + row[:, None] + (c_pv if FIRST_NX else c_nx)[None, :], mask=m & in_c3[None, :], other=0.0)
    out = XZ + r.to(tl.int64)[:, None] * (2 * D) + dd[None, :]
    tl.store(out, (first * tl.where(in_c3, SIGN_CHUNK, SIGN_LEFT)[None, :]).to(XZ.dtype.element_ty), mask=m)
    tl.store(out + D, (second * SIGN_CHUNK).to(XZ.dtype.element_ty), mask=m)


def z_operands(q, ks, form_id: int, neg_z: bool):
    """The virtual query's operands for the determinant form (``form_id`` = sgn, non-zero), made
    once per call so that the kernels build ``z`` from contiguous rows, as for the trilinear form:
    ``qz [.., 2 D] = [b, e]`` from ``q`` and ``ksz [.., 2 D] = [a, c]`` from ``k_s`` with

        z = a * b - c * e = s sgn (k_s x q) per 3-chunk, s (k_s * q) on the leftover dims,

    ``s = -1 if neg_z else 1`` (:func:`z_scaling`), i.e. on the chunk dims (``nx``, ``pv``: the
    next and the previous dim inside each chunk, :func:`chunk_columns`) ``a = s sgn k_s[nx]``,
    ``c = s sgn k_s[pv]``, ``b = q[pv]``, ``e = q[nx]`` (``sgn (k_s x q)_d = sgn (k_s[nx] q[pv] -
    k_s[pv] q[nx])``), and on the leftover dims ``a = s k_s``, ``b = q``, ``c = e = 0``. Every
    entry is one of the inputs' (permuted, maybe negated) or 0, so z rounds exactly as when it is
    formed from the inputs themselves. One pass of a small kernel per tensor (``_z_operand_rows``);
    ``q``, ``ks`` must have a last stride of 1 (the forward and the backward make it so)."""
    D = q.shape[-1]
    out = []
    s = -1.0 if neg_z else 1.0
    # (tensor, first half at nx, sign on the chunk dims, sign on the leftover dims)
    for x, first_nx, sign_chunk, sign_left in ((q, False, 1.0, 1.0), (ks, True, s * form_id, s)):
        B, S, H, _ = x.shape
        xz = torch.empty(B, S, H, 2 * D, device=x.device, dtype=x.dtype)
        n_rows, br = B * S * H, 32 if x.device.type == "cuda" else 16
        if n_rows:
            kernel(_z_operand_rows, x.device)[(triton.cdiv(n_rows, br),)](
                x, xz, strides(x), S, H, n_rows, FIRST_NX=first_nx, SIGN_CHUNK=sign_chunk, SIGN_LEFT=sign_left, D=D,
                D_PAD=padded(D), BR=br, num_warps=4)
        out.append(xz)
    return tuple(out)


def dks_from_sums(x, y, form_id: int):
    """The determinant form's small-window key gradient from the backward's two column sums
    ``x = sum b dz``, ``y = sum e dz`` over the rows of each small key (z's operands b, e of
    :func:`z_operands`): ``sgn (x[pv] - y[nx])`` on the chunk dims (the per-row ``sgn (e dz[pv]
    - b dz[nx])`` with the permutations moved past the sum, as ``pv pv = nx`` inside a chunk), ``x``
    on the leftover dims."""
    D = x.shape[-1]
    c3 = 3 * (D // 3)
    out = x.clone()
    out[..., :c3] = (x[..., rotation_index(D, 2, x.device)] - y[..., rotation_index(D, 1, x.device)]) * form_id
    return out


def pack_rows(bm: int, gqa: int, ws: int) -> tuple[int, int, int]:
    """Split a tile of ``bm`` rows into ``(BI, BH, BT)``: BT (offsets) takes as much of the small
    window as fits, then BH query heads of the kv group, then BI positions."""
    bt = min(pow2(ws), bm)
    bh = min(pow2(gqa), bm // bt)
    return bm // (bt * bh), bh, bt


def strides(t: torch.Tensor) -> tuple[int, int, int]:
    """The (batch, seq, head) strides of a ``[B, S, H, D]`` tensor (the last is 1 in the kernels):
    one tuple argument of a kernel."""
    return t.stride(0), t.stride(1), t.stride(2)


_INTERPRETED: dict = {}


def kernel(fn, device: torch.device):
    """``fn`` (a ``@triton.jit`` kernel) as it runs on ``device``: itself on CUDA; on CPU the same
    source under the Triton interpreter (whatever TRITON_INTERPRET said when triton was
    imported), with every jitted helper it reaches interpreted too, helpers called from helpers
    included, in copies of their modules' globals, so that the compiled path in the same process
    is untouched. Both kernels choose by the tensors' device, so forward and backward agree."""
    if device.type == "cuda":
        return fn
    if fn not in _INTERPRETED:
        _INTERPRETED[fn] = _interpreted(fn, {})
    return _INTERPRETED[fn]


def _interpreted(fn, envs: dict):
    """``fn`` rebuilt under the interpreter over a copy of its module's globals (one copy per
    module, in ``envs``), in which every jitted function of this project is rebuilt the same way."""
    from triton.runtime.interpreter import InterpretedFunction
    if not isinstance(fn, triton.runtime.JITFunction):
        return fn                                  # interpreted already (TRITON_INTERPRET=1 at import)
    glb = fn.fn.__globals__
    if id(glb) not in envs:
        env = envs[id(glb)] = dict(glb)
        for name, v in glb.items():
            # triton's own functions stay as they are: the interpreter runs those itself, and
            # recognises max_combine / sum_combine only by identity
            if isinstance(v, triton.runtime.JITFunction) and not v.fn.__module__.startswith("triton."):
                env[name] = _interpreted(v, envs)
    f = fn.fn
    return InterpretedFunction(types.FunctionType(f.__code__, envs[id(glb)], f.__name__, f.__defaults__, f.__closure__))
