"""Theorem 5.1 run through the public op (issue 14): one determinant-form head of head dim 7
labels causal Match3 exactly; the same vectors through the trilinear form cannot."""
from __future__ import annotations

import math

import numpy as np
import pytest
import torch

from twosimplicial.data.match3 import match3_labels
from twosimplicial.ops.naive import determinant_logits
from twosimplicial.studies.theorem51 import (THRESHOLD, build_inputs, construction_output, predict_labels,
                                             required_c)

SIZES = [(8, 5), (16, 11), (32, 37), (24, 188)]
RANDOM = 400                                        # random sequences per (n, M)


def brute_force(x: np.ndarray, M: int, c: float):
    """O(n^3) per sequence, independent of ``match3_labels``: the labels, and the head's output
    predicted by the module's closed form ``(beta + R') / (beta + 1 + 2m e^-c + R')`` with
    ``R'`` the sum of ``exp(c (cos - 1))`` over the non-matching pairs ``j, k <= t``."""
    B, n = x.shape
    s = (x[:, :, None, None] + x[:, None, :, None] + x[:, None, None, :]) % M          # [B, t, j, k]
    t = np.arange(n)
    causal = (t[None, :, None] <= t[:, None, None]) & (t[None, None, :] <= t[:, None, None])
    match = (s == 0) & causal
    beta = match.sum(axis=(2, 3))
    r = np.where(causal & (s != 0), np.exp(c * (np.cos(2 * np.pi * s / M) - 1)), 0.0).sum(axis=(2, 3))
    m = t + 1
    out = (beta + r) / (beta + 1 + 2 * m * math.exp(-c) + r)
    return (beta > 0).astype(np.int64), out


@pytest.mark.parametrize("n,M", SIZES)
def test_determinant_logits_are_the_papers(n, M):
    """Under our determinant convention the paper's vectors score c cos(th_i + th_j + th_k) for
    real triples, c for blank-blank and 0 for pairs with one blank (reference, not the fast path)."""
    x = np.random.default_rng(n * M).integers(0, M, size=(3, n))
    c = required_c(n, M)
    q, k1, _, k2, _, scale = build_inputs(x, M, c)
    assert scale == 1.0
    logits = determinant_logits(q, k1, k2)[:, 0, 1:]                                   # queries at real tokens
    th = 2 * np.pi * x / M
    real = c * np.cos(th[:, :, None, None] + th[:, None, :, None] + th[:, None, None, :])
    torch.testing.assert_close(logits[:, :, 1:, 1:], torch.from_numpy(real), rtol=0, atol=1e-9 * c)
    assert torch.all(logits[:, :, 0, 0] == c)
    assert torch.all(logits[:, :, 0, 1:] == 0) and torch.all(logits[:, :, 1:, 0] == 0)


@pytest.mark.parametrize("backend", ["torch", "auto"])
@pytest.mark.parametrize("n,M", SIZES)
def test_random_sequences_labelled_exactly(n, M, backend):
    x = np.random.default_rng(1000 * n + M).integers(0, M, size=(RANDOM, n))
    c = 2 * required_c(n, M)
    y, expected_out = brute_force(x, M, c)
    np.testing.assert_array_equal(y, match3_labels(x, M))
    assert 0.1 < y.mean() < 0.9                                                        # both labels well represented
    out = construction_output(x, M, backend=backend)                                   # default c = 2 required_c
    assert out.dtype == torch.float64
    np.testing.assert_allclose(out.numpy(), expected_out, rtol=1e-9, atol=1e-12)
    np.testing.assert_array_equal(predict_labels(x, M, backend=backend), y)
    # the margins the module derives: no match below 1/(9 n^2), a match at least 1/(2 (1 + n e^-c))
    assert out.numpy()[y == 0].max() < 1 / (9 * n * n)
    assert out.numpy()[y == 1].min() >= 1 / (2 * (1 + n * math.exp(-c))) - 1e-12


# (M, x, labels) worked out by hand: near misses, matches through j = k = t and through j = k != t
HAND = [
    (5, [2] * 8, [0] * 8),                          # 2+2+2 = 1 (mod 5): every pair one step off
    (5, [0], [1]),                                  # j = k = t
    (5, [1, 3], [0, 1]),                            # 3 + 1 + 1: j = k = 0
    (5, [1, 2, 2], [0, 1, 1]),
    (11, [4] * 16, [0] * 16),                       # 12 = 1 (mod 11)
    (11, [1, 9], [0, 1]),
    (37, [25, 25, 25, 24], [0, 0, 0, 1]),           # 75 = 1, 24 + 50 = 74 = 0 (mod 37)
    (188, [63] * 23 + [62], [0] * 23 + [1]),        # 189 = 1, 62 + 126 = 188
]


@pytest.mark.parametrize("M,x,labels", HAND)
def test_hand_picked_sequences(M, x, labels):
    x = np.array([x])
    np.testing.assert_array_equal(match3_labels(x, M)[0], labels)
    np.testing.assert_array_equal(brute_force(x, M, 1.0)[0][0], labels)
    np.testing.assert_array_equal(predict_labels(x, M)[0], labels)


@pytest.mark.parametrize("n,M", SIZES)
def test_required_c_is_tight(n, M):
    """The constant sequence x = 3^-1 (mod M) puts every pair one step from a match: just below
    required_c its last position reads as a match, just above every position is right."""
    x = np.full((1, n), pow(3, -1, M))
    assert not match3_labels(x, M).any()
    c = required_c(n, M)
    assert predict_labels(x, M, c=0.95 * c)[0, -1] == 1
    assert not predict_labels(x, M, c=1.001 * c).any()


@pytest.mark.parametrize("n,M", SIZES)
def test_trilinear_form_fails(n, M):
    """Through the trilinear form every real pair scores 0 (q is zero wherever k2 is not), so
    the output is m^2 / (e^c + 2m + m^2) whatever x is: one label per position, here 0 everywhere,
    which misses every positive (at least 10% of this sample's labels)."""
    x = np.random.default_rng(7 * n + M).integers(0, M, size=(RANDOM, n))
    y = match3_labels(x, M)
    c = 2 * required_c(n, M)
    out = construction_output(x, M, c=c, form="trilinear")
    m = np.arange(1, n + 1)
    e = math.exp(-c)
    expected = m**2 * e / (1 + (2 * m + m**2) * e)
    np.testing.assert_allclose(out.numpy(), np.broadcast_to(expected, out.shape), rtol=1e-9, atol=0)
    predicted = (out > THRESHOLD).long().numpy()
    assert not predicted.any()
    accuracy = (predicted == y).mean()
    assert accuracy == pytest.approx(1 - y.mean()) and accuracy < 0.9
    assert (predict_labels(x, M) == y).all()                                           # determinant: exact


def test_bad_arguments():
    with pytest.raises(ValueError, match="M must be an integer >= 2"):
        required_c(4, 1)
    with pytest.raises(ValueError, match="n must be an integer >= 1"):
        required_c(0, 5)
    with pytest.raises(TypeError, match="M must be an integer"):
        build_inputs(np.array([[1, 2]]), 5.0)
    with pytest.raises(TypeError, match="c must be a real number"):
        build_inputs(np.array([[1, 2]]), 5, c="10")
    with pytest.raises(ValueError, match=r"\[0, M=5\)"):
        build_inputs(np.array([[5]]), 5)
    with pytest.raises(TypeError, match="integers"):
        build_inputs(np.array([[0.5]]), 5)
    with pytest.raises(ValueError, match=r"\[batch, n\]"):
        build_inputs(np.array([1, 2]), 5)
    with pytest.raises(ValueError, match="c must be"):
        build_inputs(np.array([[1, 2]]), 5, c=-1.0)


@pytest.mark.gpu
@pytest.mark.parametrize("n,M", SIZES)
def test_gpu_triton_float32(n, M):
    """The Triton kernel in float32 with tf32 off: c = 2 required_c (up to ~2.7e4 at M = 188)
    moves logits by ~1e-2 nats in float32, far inside the log(3 n^2)-nat margin."""
    x = np.random.default_rng(1000 * n + M).integers(0, M, size=(RANDOM, n))
    y, expected_out = brute_force(x, M, 2 * required_c(n, M))
    old = torch.backends.cuda.matmul.allow_tf32
    try:
        torch.backends.cuda.matmul.allow_tf32 = False
        out = construction_output(x, M, backend="triton", dtype=torch.float32, device="cuda")
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old
    assert out.dtype == torch.float32 and out.is_cuda
    # logit errors of at most d nats move an output by at most d / 2; d is a few eps32 * c (~5e-3 at M = 188)
    np.testing.assert_allclose(out.cpu().double().numpy(), expected_out, atol=1e-2)
    np.testing.assert_array_equal((out > THRESHOLD).long().cpu().numpy(), y)
