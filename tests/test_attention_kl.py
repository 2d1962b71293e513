"""asu_kernels.attention_kl against the float64 reference, on the Triton kernels and on the CPU path.

Conventions (layouts, masks, GQA on either side) are those of :mod:`asu_kernels.reference`
(docs/ARCHITECTURE.md, section "Tensor conventions"). Every test runs on each implementation (the
``implementation`` fixture): the Triton kernels on CUDA, or on CPU under TRITON_INTERPRET=1, and the PyTorch
CPU path with its default and with tiny tiles; shapes are tiny so the interpreter stays fast. Tolerance in
the FlashAttention style (``helpers.assert_fa_close``; section "Correctness"): the kernel's error against
float64 must be at most twice the error of the same computation done by PyTorch in the low precision, plus a
small absolute slack.
"""

import math

import pytest
import torch
from helpers import assert_fa_close

from asu_kernels import _cpu_attention as cpu_attention
from asu_kernels import reference
from asu_kernels._backend import interpreting
from asu_kernels.attention_kl import _Call, _launch_bwd, _launch_fwd, aot_specs, attention_kl

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"


@pytest.fixture(autouse=True, params=["triton", "cpu-path", "cpu-path-tiny-tiles"])
def implementation(request, monkeypatch) -> str:
    """Each test on each implementation: the Triton kernels (CUDA, or the interpreter on CPU tensors) and the
    PyTorch CPU path (``ASU_KERNELS_BACKEND=cpu``), once with its default tiles and once with 8-row tiles so
    that every case crosses query-chunk and key-block boundaries."""
    if request.param == "triton":
        if DEVICE == "cpu" and not interpreting():
            pytest.skip("needs CUDA or TRITON_INTERPRET=1 for the Triton kernels")
        return request.param
    if DEVICE == "cuda":
        pytest.skip("the CPU path serves CPU tensors")
    monkeypatch.setenv("ASU_KERNELS_BACKEND", "cpu")
    if request.param == "cpu-path-tiny-tiles":
        monkeypatch.setattr(cpu_attention, "TILE_ELEMENTS", 64)
        monkeypatch.setattr(cpu_attention, "MIN_BLOCK", 8)
    return request.param


def _triton_only(implementation: str) -> None:
    if implementation != "triton":
        pytest.skip("tests the Triton launchers or compile specs")


# Absolute slack per dtype on top of 2x PyTorch's own low-precision error (a few ulp of O(1) results).
SLACK = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 1e-2}


def _rand(*shape, dtype=torch.float32, seed=0, requires_grad=False):
    g = torch.Generator().manual_seed(seed)
    t = torch.randn(*shape, generator=g, dtype=torch.float32).to(dtype=dtype, device=DEVICE)
    return t.requires_grad_(requires_grad)


def _inputs(b, hq, hks, hkt, n, d, dtype, nk=None, seed=0):
    nk = n if nk is None else nk
    q_s = _rand(b, hq, n, d, dtype=dtype, seed=seed, requires_grad=True)
    k_s = _rand(b, hks, nk, d, dtype=dtype, seed=seed + 1, requires_grad=True)
    q_t = _rand(b, hq, n, d, dtype=dtype, seed=seed + 2)
    k_t = _rand(b, hkt, nk, d, dtype=dtype, seed=seed + 3)
    return q_s, k_s, q_t, k_t


def _leaf(t, dtype):
    return t.detach().to(dtype).requires_grad_(t.requires_grad)


def _reference(q_s, k_s, q_t, k_t, dtype, **kw):
    """Reference outputs and (q_s, k_s) leaves in ``dtype`` (the same rounded inputs as the kernel saw)."""
    qs, ks = _leaf(q_s, dtype), _leaf(k_s, dtype)
    out = reference.attention_kl(qs, ks, q_t.detach().to(dtype), k_t.detach().to(dtype), **kw)
    return out, qs, ks


def _check(q_s, k_s, q_t, k_t, dtype, *, grads=True, entropy_grad=True, **kw):
    """Forward (KL, both entropies) and backward (dq_s, dk_s) against float64, non-unit upstream grads."""
    kl, h_s, h_t = attention_kl(q_s, k_s, q_t, k_t, return_entropy=True, **kw)
    assert kl.dtype == torch.float32 and kl.shape == q_s.shape[:-1]
    (r64, qs64, ks64) = _reference(q_s, k_s, q_t, k_t, torch.float64, **kw)
    # PyTorch's own low-precision run: fp16/bf16 math as is; fp32 as fp32.
    (rlp, qslp, kslp) = _reference(q_s, k_s, q_t, k_t, dtype, **kw)
    slack = SLACK[dtype]
    for name, o, a, b in zip(("kl", "entropy_s", "entropy_t"), (kl, h_s, h_t), r64, rlp, strict=True):
        assert_fa_close(name, o, a, b, slack)
    if not grads:
        return
    g_kl = _rand(*kl.shape, seed=11)
    g_h = _rand(*kl.shape, seed=12) if entropy_grad else torch.zeros_like(g_kl)
    loss = (kl * g_kl).sum() + (h_s * g_h).sum()
    loss.backward()
    ((r64[0] * g_kl.double()).sum() + (r64[1] * g_h.double()).sum()).backward()
    ((rlp[0] * g_kl.to(dtype)).sum() + (rlp[1] * g_h.to(dtype)).sum()).backward()
    for name, got, want, lowp in (
        ("dq_s", q_s.grad, qs64.grad, qslp.grad),
        ("dk_s", k_s.grad, ks64.grad, kslp.grad),
    ):
        assert got.dtype == dtype and got.shape == want.shape
        assert_fa_close(name, got, want, lowp, slack * 2)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
@pytest.mark.parametrize("causal", [True, False])
def test_matches_reference_gqa(dtype, causal):
    # GQA on both sides with different ratios: student 4 -> 2 kv heads, teacher 4 -> 1.
    _check(*_inputs(2, 4, 2, 1, 17, 32, dtype), dtype, causal=causal, temperature_t=2.3)


@pytest.mark.parametrize("hq,hks,hkt", [(2, 2, 2), (8, 2, 8), (8, 1, 1)])
def test_gqa_ratios(hq, hks, hkt):
    _check(*_inputs(1, hq, hks, hkt, 18, 16, torch.float32, seed=3), torch.float32, temperature_t=2.0)


@pytest.mark.parametrize("n,causal", [(1, True), (16, False), (33, True)])
def test_odd_lengths_and_window(n, causal):
    q_s, k_s, q_t, k_t = _inputs(1, 2, 1, 1, n, 16, torch.float32, seed=n)
    _check(q_s, k_s, q_t, k_t, torch.float32, temperature_t=2.7, window=5, causal=causal)


@pytest.mark.parametrize("d", [64, 80, 96, 128])
def test_head_dims(d):
    grads = d == 80  # one non-power-of-two head dim through the backward; the others forward only
    _check(*_inputs(1, 2, 1, 1, 9, d, torch.bfloat16, seed=d), torch.bfloat16, grads=grads, temperature_t=2.0)


def test_student_temperature_scale_and_fewer_queries_than_keys():
    # Bottom-right causal alignment (Nq < Nk), an explicit scale, and a student temperature != 1.
    q_s, k_s, q_t, k_t = _inputs(1, 2, 2, 1, 5, 16, torch.float32, nk=12, seed=7)
    _check(q_s, k_s, q_t, k_t, torch.float32, temperature_t=3.0, temperature_s=1.3, scale=0.2)
    _check(
        *_inputs(1, 2, 2, 1, 5, 16, torch.float32, nk=12, seed=8), torch.float32, temperature_t=3.0, window=3
    )


@pytest.mark.parametrize("causal,window", [(True, 20), (False, None)])
def test_interior_blocks_with_window_and_padding(causal, window):
    # Long enough (N=50 against 16-wide interpreter blocks) for mask-free interior key blocks between
    # the window's lower edge and the causal diagonal, with padding applied inside them too.
    q_s, k_s, q_t, k_t = _inputs(1, 2, 1, 1, 50, 16, torch.float32, seed=40)
    kpm = torch.rand(1, 50, generator=torch.Generator().manual_seed(1)).to(DEVICE) > 0.3
    _check(
        q_s,
        k_s,
        q_t,
        k_t,
        torch.float32,
        temperature_t=2.0,
        causal=causal,
        window=window,
        key_padding_mask=kpm,
    )


def test_key_padding_and_empty_rows():
    q_s, k_s, q_t, k_t = _inputs(2, 2, 1, 2, 13, 16, torch.float32, seed=5)
    kpm = torch.ones(2, 13, dtype=torch.bool, device=DEVICE)
    kpm[0, :4] = False  # left padding: causal rows 0..3 of batch 0 see no key
    kpm[1, 7:] = False
    _check(q_s, k_s, q_t, k_t, torch.float32, temperature_t=2.0, key_padding_mask=kpm)
    kl, h_s, h_t = attention_kl(
        q_s, k_s, q_t, k_t, temperature_t=2.0, key_padding_mask=kpm, return_entropy=True
    )
    for t in (kl, h_s, h_t):
        assert (t[0, :, :4] == 0).all()
    assert (q_s.grad[0, :, :4] == 0).all()


def test_varlen_matches_reference():
    # Documents of lengths 5, 0, 12, 1 (an empty one and a single-token one), GQA and a window.
    cu = torch.tensor([0, 5, 5, 17, 18], dtype=torch.int32, device=DEVICE)
    total, hq, hks, hkt, d = 18, 4, 2, 1, 16
    q_s = _rand(total, hq, d, seed=1, requires_grad=True)
    k_s = _rand(total, hks, d, seed=2, requires_grad=True)
    q_t, k_t = _rand(total, hq, d, seed=3), _rand(total, hkt, d, seed=4)
    for window in (None, 4):
        q_s.grad = k_s.grad = None
        _check(q_s, k_s, q_t, k_t, torch.float32, temperature_t=2.3, cu_seqlens=cu, window=window)
    kl = attention_kl(q_s, k_s, q_t, k_t, temperature_t=2.3, cu_seqlens=cu, max_seqlen=12)
    assert kl.shape == (total, hq)
    # A one-token document's only row sees one key: both maps are the same point mass.
    assert kl[17].abs().max() < 1e-6


def test_non_contiguous_inputs():
    # Hugging Face hands in (B, N, H, D) buffers viewed as (B, H, N, D).
    q_s = _rand(1, 11, 4, 16, seed=1).transpose(1, 2).detach().requires_grad_()
    k_s = _rand(1, 11, 2, 16, seed=2).transpose(1, 2).detach().requires_grad_()
    q_t = _rand(1, 11, 4, 16, seed=3).transpose(1, 2)
    k_t = _rand(1, 16, 11, 2, seed=4).permute(0, 3, 2, 1)
    assert not q_s.is_contiguous() and k_t.stride(-1) != 1
    _check(q_s, k_s, q_t, k_t, torch.float32, temperature_t=2.0)
    # Student inputs whose last dim is not unit-stride: their gradients must still be complete and right.
    q_s = _rand(1, 16, 11, 4, seed=5).permute(0, 3, 2, 1).detach().requires_grad_()
    k_s = _rand(1, 16, 11, 2, seed=6).permute(0, 3, 2, 1).detach().requires_grad_()
    assert q_s.stride(-1) != 1
    _check(q_s, k_s, q_t, k_t, torch.float32, temperature_t=2.0)


def test_identical_maps_give_zero_and_self_smoothing():
    q, k = _inputs(1, 4, 2, 2, 21, 16, torch.float32, seed=9)[:2]
    # Teacher == student at equal temperatures: KL is exactly 0 and so is its gradient.
    kl, h_s, h_t = attention_kl(q, k, temperature_t=1.7, temperature_s=1.7, return_entropy=True)
    assert (kl == 0).all()
    torch.testing.assert_close(h_s, h_t, rtol=0, atol=0)
    kl.sum().backward()
    assert q.grad.abs().max() < 1e-6 and k.grad.abs().max() < 1e-6
    # q_t=None, k_t=None is the student's own q, k detached: the same as passing them explicitly.
    q.grad = k.grad = None
    smooth = attention_kl(q, k, temperature_t=2.3)
    explicit = attention_kl(q, k, q.detach(), k.detach(), temperature_t=2.3)
    torch.testing.assert_close(smooth, explicit, rtol=0, atol=0)
    assert (smooth > 0).any()
    # Gradients flow only through the student side.
    g = _rand(*smooth.shape, seed=4)
    (smooth * g).sum().backward()
    q64, k64 = q.detach().double().requires_grad_(), k.detach().double().requires_grad_()
    ref = reference.attention_kl(q64, k64, q64.detach(), k64.detach(), temperature_t=2.3)[0]
    (ref * g.double()).sum().backward()
    torch.testing.assert_close(q.grad.double(), q64.grad, atol=2e-5, rtol=1e-4)
    torch.testing.assert_close(k.grad.double(), k64.grad, atol=2e-5, rtol=1e-4)


def test_teacher_receives_no_gradient():
    q_s, k_s, q_t, k_t = _inputs(1, 2, 1, 1, 8, 16, torch.float32)
    q_t.requires_grad_()
    attention_kl(q_s, k_s, q_t, k_t, temperature_t=2.0).sum().backward()
    assert q_t.grad is None and q_s.grad is not None


def test_poisoned_outputs_are_fully_written(implementation):
    _triton_only(implementation)
    nan = float("nan")
    for varlen in (False, True):
        if varlen:
            cu = torch.tensor([0, 7, 7, 20], dtype=torch.int32, device=DEVICE)
            q_s, q_t = _rand(20, 4, 16, seed=1), _rand(20, 4, 16, seed=2)
            k_s, k_t = _rand(20, 2, 16, seed=3), _rand(20, 1, 16, seed=4)
            max_seqlen = 13
        else:
            cu, max_seqlen = None, 0
            q_s, k_s, q_t, k_t = (t.detach() for t in _inputs(2, 4, 2, 1, 19, 16, torch.float32))
        rows = q_s.shape[:-1]
        outs = [torch.full(rows, nan, device=DEVICE) for _ in range(5)]
        call = _Call(q_s, k_s, q_t, k_t, cu, None, max_seqlen, 0.25, 0.1, True, 0)
        _launch_fwd(call, *outs)
        for o in outs:
            assert torch.isfinite(o).all()  # no empty rows here: every lse is finite too
        kl, lse_s, lse_t, ent_s, _ = outs
        dq, dk = torch.full_like(q_s, nan), torch.full_like(k_s, nan)
        g = _rand(*rows, seed=5)
        _launch_bwd(call, g, g, lse_s, lse_t, ent_s, dq, dk)
        assert torch.isfinite(dq).all() and torch.isfinite(dk).all()


def test_float64_and_reference_backend_take_the_reference_path(monkeypatch):
    q_s, k_s, q_t, k_t = _inputs(1, 2, 1, 1, 6, 16, torch.float32)
    q64 = q_s.detach().double().requires_grad_()
    k64 = k_s.detach().double().requires_grad_()
    fn = lambda q, k: attention_kl(q, k, q_t.double(), k_t.double(), temperature_t=2.0, window=3)  # noqa: E731
    assert fn(q64, k64).dtype == torch.float64
    assert torch.autograd.gradcheck(fn, (q64, k64), fast_mode=True)
    monkeypatch.setenv("ASU_KERNELS_BACKEND", "reference")
    ref = attention_kl(q_s, k_s, q_t, k_t, temperature_t=2.0)
    monkeypatch.delenv("ASU_KERNELS_BACKEND")
    torch.testing.assert_close(attention_kl(q_s, k_s, q_t, k_t, temperature_t=2.0), ref, atol=2e-5, rtol=1e-4)


def test_bad_inputs_raise_clear_errors():
    q_s, k_s, q_t, k_t = (t.detach() for t in _inputs(1, 4, 2, 1, 8, 16, torch.float32))
    kw = dict(temperature_t=2.0)
    cases = [
        (TypeError, "must be a torch.Tensor", lambda: attention_kl(q_s.numpy(), k_s, q_t, k_t, **kw)),
        (TypeError, "dtype", lambda: attention_kl(q_s.int(), k_s.int(), q_t.int(), k_t.int(), **kw)),
        (TypeError, "share one dtype", lambda: attention_kl(q_s, k_s, q_t.half(), k_t, **kw)),
        (ValueError, "both q_t and k_t", lambda: attention_kl(q_s, k_s, q_t, None, **kw)),
        (ValueError, "4-D", lambda: attention_kl(q_s[0], k_s, q_t, k_t, **kw)),
        (ValueError, "same shape", lambda: attention_kl(q_s, k_s, q_t[:, :2], k_t, **kw)),
        (ValueError, "multiple", lambda: attention_kl(q_s[:, :3], k_s, q_t[:, :3], k_t, **kw)),
        (ValueError, "head dims", lambda: attention_kl(q_s, k_s[..., :8], q_t, k_t, **kw)),
        (ValueError, "same number of keys", lambda: attention_kl(q_s, k_s, q_t, k_t[:, :, :5], **kw)),
        (ValueError, "fewer positions", lambda: attention_kl(q_s, k_s[:, :, :5], q_t, k_t[:, :, :5], **kw)),
        (ValueError, "temperature_t", lambda: attention_kl(q_s, k_s, q_t, k_t, temperature_t=0.0)),
        (ValueError, "temperature_s", lambda: attention_kl(q_s, k_s, **kw, temperature_s=math.inf)),
        (TypeError, "temperature_t", lambda: attention_kl(q_s, k_s, temperature_t="2")),
        (ValueError, "window", lambda: attention_kl(q_s, k_s, **kw, window=0)),
        (ValueError, "scale", lambda: attention_kl(q_s, k_s, **kw, scale=-1.0)),
        (TypeError, "causal", lambda: attention_kl(q_s, k_s, **kw, causal=1)),
        (TypeError, "bool", lambda: attention_kl(q_s, k_s, **kw, key_padding_mask=torch.ones(1, 8))),
        (
            ValueError,
            "key_padding_mask",
            lambda: attention_kl(q_s, k_s, **kw, key_padding_mask=torch.ones(1, 7) > 0),
        ),
        (ValueError, "max_seqlen", lambda: attention_kl(q_s, k_s, **kw, max_seqlen=8)),
    ]
    qv, kv = q_s[0].transpose(0, 1), k_s[0].transpose(0, 1)  # (8, H, D)
    cu = torch.tensor([0, 3, 8], dtype=torch.int32)
    cases += [
        (TypeError, "cu_seqlens", lambda: attention_kl(qv, kv, **kw, cu_seqlens=cu.float())),
        (ValueError, "start at 0", lambda: attention_kl(qv, kv, **kw, cu_seqlens=torch.tensor([0, 3, 9]))),
        (
            ValueError,
            "non-decreasing",
            lambda: attention_kl(qv, kv, **kw, cu_seqlens=torch.tensor([0, 5, 3, 8])),
        ),
        (
            ValueError,
            "smaller than the longest",
            lambda: attention_kl(qv, kv, **kw, cu_seqlens=cu, max_seqlen=4),
        ),
        (ValueError, "total length", lambda: attention_kl(qv, kv[:7], **kw, cu_seqlens=cu)),
        (ValueError, "3-D", lambda: attention_kl(q_s, k_s, **kw, cu_seqlens=cu)),
    ]
    for exc, match, call in cases:
        with pytest.raises(exc, match=match):
            call()


def test_torch_compile_fullgraph():
    q_s, k_s, q_t, k_t = _inputs(1, 4, 2, 1, 12, 16, torch.float32, seed=2)

    def loss_fn(q, k):
        kl, h_s, _ = attention_kl(q, k, q_t, k_t, temperature_t=2.3, window=6, return_entropy=True)
        return kl.mean() - 0.1 * h_s.mean()

    eager = loss_fn(q_s, k_s)
    gq, gk = torch.autograd.grad(eager, (q_s, k_s))
    compiled = torch.compile(loss_fn, fullgraph=True, backend="aot_eager")
    got = compiled(q_s, k_s)
    cq, ck = torch.autograd.grad(got, (q_s, k_s))
    torch.testing.assert_close(got, eager)
    torch.testing.assert_close(cq, gq)
    torch.testing.assert_close(ck, gk)


def test_aot_specs_are_well_formed(implementation):
    _triton_only(implementation)
    specs = aot_specs()
    assert len({s.name for s in specs}) == len(specs)
    for s in specs:
        names = list(s.fn.arg_names)
        assert list(s.signature) == names, s.name
        assert {n for n, t in s.signature.items() if t == "constexpr"} == set(s.constexprs), s.name
    assert any(s.h100_candidate for s in specs)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_gpu_realistic_shape_and_linear_memory(dtype):
    # Head dim 128, GQA 8 -> 2 (student) and 8 -> 1 (teacher), a length that is not a multiple of any block;
    # runs every autotuned configuration on the GPU.
    _check(*_inputs(1, 8, 2, 1, 1531, 128, dtype, seed=21), dtype, temperature_t=2.3)
    # Memory: at N = 16k the extra memory of forward + backward is O(N) (per-row stats and the gradients),
    # far below a single (N x N) fp32 score matrix of one head (1 GiB).
    q_s, k_s, q_t, k_t = _inputs(1, 8, 2, 2, 16384, 128, dtype, seed=22)
    torch.cuda.synchronize()
    base = torch.cuda.memory_allocated()
    torch.cuda.reset_peak_memory_stats()
    kl = attention_kl(q_s, k_s, q_t, k_t, temperature_t=2.3)
    kl.sum().backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert extra < 64 * 2**20, f"attention_kl used {extra / 2**20:.0f} MiB beyond its inputs at N=16k"
    assert torch.isfinite(kl).all() and torch.isfinite(q_s.grad).all() and torch.isfinite(k_s.grad).all()
