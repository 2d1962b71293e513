"""The reference definitions: gradcheck in float64 and agreement with an independent formulation."""

import math

import pytest
import torch
import torch.nn.functional as F

from asu_kernels import reference


def _rand(*shape, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(*shape, generator=g, dtype=torch.float64)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", [None, 3])
def test_attention_matches_sdpa_at_temperature(causal, window):
    b, hq, hkv, n, d = 2, 4, 2, 9, 16
    q, k, v = _rand(b, hq, n, d, seed=1), _rand(b, hkv, n, d, seed=2), _rand(b, hkv, n, d, seed=3)
    tau = 2.3
    out, lse = reference.attention(q, k, v, causal=causal, temperature=tau, window=window)
    mask = reference.attention_mask(n, n, causal=causal, window=window)
    kk, vv = k.repeat_interleave(2, 1), v.repeat_interleave(2, 1)
    expect = F.scaled_dot_product_attention(q, kk, vv, attn_mask=mask, scale=1 / (math.sqrt(d) * tau))
    torch.testing.assert_close(out, expect)
    s = (q @ kk.transpose(-1, -2)) / (math.sqrt(d) * tau)
    torch.testing.assert_close(lse, torch.logsumexp(s.masked_fill(~mask, -math.inf), -1))


def test_attention_empty_rows_are_zero_not_nan():
    q, k, v = _rand(1, 2, 4, 16), _rand(1, 2, 4, 16, seed=5), _rand(1, 2, 4, 16, seed=6)
    kpm = torch.tensor([[False, False, True, True]])
    out, lse = reference.attention(q, k, v, causal=True, key_padding_mask=kpm)
    assert torch.isfinite(out).all()
    assert (out[:, :, :2] == 0).all() and torch.isinf(lse[:, :, :2]).all()


def test_attention_gradcheck():
    q = _rand(1, 2, 5, 16).requires_grad_()
    k = _rand(1, 1, 5, 16, seed=1).requires_grad_()
    v = _rand(1, 1, 5, 16, seed=2).requires_grad_()
    fn = lambda q, k, v: reference.attention(q, k, v, causal=True, temperature=2.0, window=3)[0]
    assert torch.autograd.gradcheck(fn, (q, k, v))


def test_varlen_equals_per_document_dense():
    lens = [3, 1, 6]
    cu = torch.tensor([0, 3, 4, 10], dtype=torch.int32)
    q, k, v = _rand(10, 4, 16), _rand(10, 2, 16, seed=1), _rand(10, 2, 16, seed=2)
    out, lse = reference.attention_varlen(q, k, v, cu, causal=True, temperature=1.7)
    start = 0
    for n in lens:
        sl = slice(start, start + n)
        o, l_ = reference.attention(
            q[sl].transpose(0, 1)[None],
            k[sl].transpose(0, 1)[None],
            v[sl].transpose(0, 1)[None],
            temperature=1.7,
        )
        torch.testing.assert_close(out[sl], o[0].transpose(0, 1))
        torch.testing.assert_close(lse[sl], l_[0].transpose(0, 1))
        start += n


def test_linear_kl_matches_explicit_sum():
    hs, ht = _rand(7, 8), _rand(7, 8, seed=1)
    ws, wt = _rand(11, 8, seed=2), _rand(11, 8, seed=3)
    w = torch.rand(7, dtype=torch.float64)
    ps, pt = torch.softmax(hs @ ws.T, -1), torch.softmax(ht @ wt.T, -1)
    expect = (w * (pt * (pt.log() - ps.log())).sum(-1)).sum()
    torch.testing.assert_close(reference.linear_kl(hs, ws, ht, wt, w), expect)
    assert reference.linear_kl(hs, ws, hs, ws).abs() < 1e-12


def test_linear_cross_entropy_ignores_and_means():
    h, w = _rand(6, 8), _rand(13, 8, seed=1)
    labels = torch.tensor([1, -100, 3, 12, -100, 0])
    keep = labels != -100
    expect = F.cross_entropy(h[keep] @ w.T, labels[keep])
    torch.testing.assert_close(reference.linear_cross_entropy(h, w, labels), expect)
    assert reference.linear_cross_entropy(h, w, torch.full((6,), -100)) == 0
