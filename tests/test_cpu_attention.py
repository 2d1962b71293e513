"""The PyTorch CPU path of the attention ops (:mod:`asu_kernels._cpu_attention`): what only it has.

Every test forces ``ASU_KERNELS_BACKEND=cpu``, so CPU tensors take the CPU path even under
``TRITON_INTERPRET=1``: PyTorch's fused CPU flash attention where :func:`asu_kernels._backend.cpu_fused_mode`
says it expresses the call, the blocked online softmax otherwise. The case tables of the kernels' tests run
on this path too (``tests/test_attention.py``, ``tests/test_attention_kl.py``: their ``device`` /
``implementation`` fixtures); here are a grid over the shapes users hit (N 1 / 17 / 333, GQA 1 / 4 / 8, head
dims 64 / 80 / 96 / 128, causal or not), tiny tiles so that every chunk and block boundary of the online
softmax is crossed, the dispatch rule itself, and the properties of the path (bounded tiles, torch.compile,
the custom op's checks). All against float64 with FlashAttention's tolerance (``helpers.check_attention``),
forward and backward with non-unit upstream gradients. Memory and speed are measured by
``benchmarks/bench_cpu_attention.py``, not here.
"""

from __future__ import annotations

import itertools

import pytest
import torch
from helpers import assert_fa_close, check_attention, make_attention_input

import asu_kernels
from asu_kernels import _backend, reference
from asu_kernels import _cpu_attention as cpu


@pytest.fixture(autouse=True)
def cpu_path(monkeypatch):
    monkeypatch.setenv("ASU_KERNELS_BACKEND", "cpu")


@pytest.fixture
def tiny_tiles(monkeypatch):
    """Blocks of 8 rows and keys: many query chunks and key blocks even at N = 17 or 33."""
    monkeypatch.setattr(cpu, "TILE_ELEMENTS", 64)
    monkeypatch.setattr(cpu, "MIN_BLOCK", 8)


@pytest.fixture
def paths(monkeypatch):
    """Which implementation served each dense problem: a list of ``"fused"`` / ``"blocked"``."""
    seen: list[str] = []
    for name, label in (("_fused_forward", "fused"), ("_blocked_forward", "blocked")):
        real = getattr(cpu, name)

        def spy(*a, _real=real, _label=label, **kw):
            seen.append(_label)
            return _real(*a, **kw)

        monkeypatch.setattr(cpu, name, spy)
    return seen


def _qkv(b, hq, hkv, nq, nk, d, dtype=torch.float32, seed=0, transposed=False):
    gen = torch.Generator().manual_seed(seed)
    q = make_attention_input((b, hq, nq, d), dtype, "cpu", gen, transposed)
    k = make_attention_input((b, hkv, nk, d), dtype, "cpu", gen, transposed)
    v = make_attention_input((b, hkv, nk, d), dtype, "cpu", gen, transposed)
    return q, k, v


def test_key_padding_empty_rows_on_both_paths(paths):
    """Left and right padding and a fully padded sequence, causal (blocked) and not (fused): 0 and -inf
    there, never NaN, also in the gradients."""
    q, k, v = _qkv(2, 4, 2, 33, 33, 64, seed=7)
    kpm = torch.ones(2, 33, dtype=torch.bool)
    kpm[0, :5] = False
    kpm[0, 27:] = False
    kpm[1] = False
    for causal in (True, False):
        check_attention(q, k, v, causal=causal, temperature=2.3, key_padding_mask=kpm)
    assert paths == ["blocked", "fused"]


def test_fused_path_empty_rows_and_decoding_with_padding(paths):
    q, k, v = _qkv(2, 4, 2, 1, 19, 64, seed=4)
    kpm = torch.ones(2, 19, dtype=torch.bool)
    kpm[0, :6] = False  # a left-padded prompt decoding its next token
    kpm[1] = False
    check_attention(q, k, v, causal=True, temperature=2.3, key_padding_mask=kpm)
    assert paths == ["fused"]


# ------------------------------------------------------------------------------------------ the shape grid

# (N, GQA ratio) x causal; head dims cycle through 64, 80, 96, 128 so each appears with each length.
GRID = [
    (n, ratio, causal, d)
    for (n, ratio, causal), d in zip(
        itertools.product((1, 17, 333), (1, 4, 8), (True, False)), itertools.cycle((64, 80, 96, 128))
    )
]


GRID_IDS = [f"n{n}-gqa{r}-{'c' if c else 'nc'}-d{d}" for n, r, c, d in GRID]


@pytest.mark.parametrize("n,ratio,causal,d", GRID, ids=GRID_IDS)
def test_grid_matches_reference(n, ratio, causal, d):
    q, k, v = _qkv(1, 8, 8 // ratio, n, n, d, seed=n * 31 + ratio + d)
    check_attention(q, k, v, causal=causal, temperature=2.0)


@pytest.mark.parametrize(
    "nq,nk,causal,window,softcap,padded,lse_grad",
    [
        (17, 40, True, None, None, False, False),  # bottom-right causal, Nq < Nk
        (33, 33, True, 7, None, False, True),  # window, LSE gradient
        (17, 29, True, 9, 2.0, True, True),  # window, soft-cap, padding, Nq < Nk
        (40, 40, False, 12, 1.5, True, False),  # non-causal window, soft-cap, padding
        (1, 33, True, 5, None, False, True),  # decoding with a window
    ],
)
def test_blocked_path_with_tiny_tiles(nq, nk, causal, window, softcap, padded, lse_grad, tiny_tiles, paths):
    """Many query chunks and key blocks: online rescaling, interior tiles without a mask, window starts."""
    q, k, v = _qkv(2, 4, 2, nq, nk, 64, seed=nq + nk)
    kw = dict(causal=causal, temperature=2.3, window=window, softcap=softcap, scale=0.5)
    if padded:
        kpm = torch.ones(2, nk, dtype=torch.bool)
        kpm[0, :3] = False
        kpm[1, nk - 5 :] = False
        kw["key_padding_mask"] = kpm
    check_attention(q, k, v, lse_grad=lse_grad, **kw)
    assert set(paths) == {"blocked"}


def test_packed_documents_with_tiny_tiles(tiny_tiles):
    lengths = [17, 0, 1, 40, 9]
    cu = torch.tensor([0, *torch.tensor(lengths).cumsum(0).tolist()], dtype=torch.int32)
    gen = torch.Generator().manual_seed(9)
    q, k, v = (make_attention_input((sum(lengths), h, 64), torch.float32, "cpu", gen) for h in (8, 1, 1))
    check_attention(q, k, v, cu=cu, causal=True, temperature=2.3)
    check_attention(q, k, v, cu=cu, causal=True, temperature=2.3, window=6, softcap=2.0, lse_grad=True)


# ------------------------------------------------------------------------------------------- the dispatch


@pytest.mark.parametrize(
    "nq,nk,kw,expect",
    [
        (17, 17, {}, "fused"),
        (17, 17, {"causal": False}, "fused"),
        (1, 17, {}, "fused"),
        (5, 17, {}, "blocked"),  # bottom-right causal
        (17, 17, {"window": 4}, "blocked"),
        (17, 17, {"softcap": 5.0}, "blocked"),
        (17, 17, {"key_padding_mask": torch.ones(1, 17, dtype=torch.bool)}, "blocked"),
        (17, 17, {"causal": False, "key_padding_mask": torch.ones(1, 17, dtype=torch.bool)}, "fused"),
    ],
)
def test_dispatch_rule(nq, nk, kw, expect, paths):
    q, k, v = _qkv(1, 2, 1, nq, nk, 64)
    with torch.no_grad():
        asu_kernels.attention(q, k, v, **kw)
    assert paths == [expect]


def test_an_unused_lse_keeps_the_fused_backward(monkeypatch):
    """Autograd hands the op a zero LSE gradient when only the output is used (packed calls through the
    Hugging Face layer do): that must not send the backward to the blocked path."""
    seen = []
    for name in ("_fused_backward", "_blocked_backward"):
        real = getattr(cpu, name)
        monkeypatch.setattr(cpu, name, lambda *a, _r=real, _n=name, **kw: (seen.append(_n), _r(*a, **kw))[1])
    lengths = [9, 17]
    cu = torch.tensor([0, 9, 26], dtype=torch.int32)
    gen = torch.Generator().manual_seed(2)
    q, k, v = (make_attention_input((26, h, 64), torch.float32, "cpu", gen) for h in (4, 2, 2))
    out, lse = asu_kernels.attention(q, k, v, cu_seqlens=cu, max_seqlen=max(lengths), return_lse=True)
    out.sum().backward()
    assert seen == ["_fused_backward"] * 2
    seen.clear()
    out, lse = asu_kernels.attention(q, k, v, cu_seqlens=cu, max_seqlen=max(lengths), return_lse=True)
    (out.sum() + lse.sum()).backward()
    assert seen == ["_blocked_backward"] * 2


def test_backends(monkeypatch):
    t = torch.zeros(1)
    monkeypatch.delenv("ASU_KERNELS_BACKEND")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    assert _backend.backend(t) == "cpu"
    monkeypatch.setenv("TRITON_INTERPRET", "1")
    assert _backend.backend(t) == "triton"
    for forced in ("cpu", "reference"):
        monkeypatch.setenv("ASU_KERNELS_BACKEND", forced)
        assert _backend.backend(t) == forced
    monkeypatch.setenv("ASU_KERNELS_BACKEND", "fast")
    with pytest.raises(ValueError, match="ASU_KERNELS_BACKEND"):
        _backend.backend(t)


def test_float64_runs_the_reference():
    q, k, v = (t.detach().double() for t in _qkv(1, 2, 1, 9, 9, 16))
    out, lse = asu_kernels.attention(q, k, v, temperature=2.0, return_lse=True)
    ref_out, ref_lse = reference.attention(q, k, v, temperature=2.0)
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)


def test_tiles_stay_bounded(monkeypatch):
    """The blocked path never builds a logits tile larger than its budget, whatever N (no N x N matrix)."""
    monkeypatch.setattr(cpu, "TILE_ELEMENTS", 2 * 64 * 64)
    biggest = []
    real = cpu._logits

    def spy(q_chunk, k_block_t, softcap):
        s, t = real(q_chunk, k_block_t, softcap)
        biggest.append(s.numel())
        return s, t

    monkeypatch.setattr(cpu, "_logits", spy)
    q, k, v = _qkv(1, 2, 1, 700, 700, 16, seed=3)
    out = asu_kernels.attention(q, k, v, window=300, temperature=2.0)
    out.sum().backward()
    assert max(biggest) <= 2 * 64 * 64 < 700 * 700


def test_torch_compile_fullgraph_on_the_cpu_path():
    torch._dynamo.reset()

    def f(q, k, v):
        return asu_kernels.attention(q, k, v, causal=True, temperature=2.3, softcap=3.0).sum(-1)

    q, k, v = _qkv(1, 4, 2, 17, 17, 64, seed=1)
    got = torch.compile(f, fullgraph=True, backend="aot_eager")(q, k, v)
    grads = torch.autograd.grad(got.sum(), (q, k, v))
    want = f(q, k, v)
    torch.testing.assert_close(got, want)
    for g, w in zip(grads, torch.autograd.grad(want.sum(), (q, k, v)), strict=True):
        torch.testing.assert_close(g, w)


def test_custom_op_checks_on_the_cpu_path():
    q, k, v = _qkv(1, 4, 2, 17, 17, 64)
    for args in (
        (q, k, v, True, 0.1, 0, None, -1, None, True, 0.0),  # fused
        (q, k, v, True, 0.1, 5, None, -1, None, True, 2.0),  # blocked
    ):
        torch.library.opcheck(
            torch.ops.asu_kernels.attention_fwd.default,
            args,
            test_utils=("test_schema", "test_faketensor", "test_autograd_registration"),
        )


# --------------------------------------------------------------------------------------- attention-map KL


@pytest.mark.parametrize("tiles", ["default", "tiny"])
def test_attention_kl_long_gqa8_against_float64(tiles, monkeypatch):
    """N = 333 with GQA 8 on the student and 4 on the teacher, a window and padding: the KL rows, both
    entropies and the student gradients (through the KL and the entropy) against float64."""
    if tiles == "tiny":
        monkeypatch.setattr(cpu, "TILE_ELEMENTS", 64)
        monkeypatch.setattr(cpu, "MIN_BLOCK", 8)
    gen = torch.Generator().manual_seed(12)
    q_s, k_s = torch.randn(1, 8, 333, 64, generator=gen), torch.randn(1, 1, 333, 64, generator=gen)
    q_t, k_t = torch.randn(1, 8, 333, 64, generator=gen), torch.randn(1, 2, 333, 64, generator=gen)
    kpm = torch.rand(1, 333, generator=gen) > 0.2
    kw = dict(temperature_t=2.3, window=150, key_padding_mask=kpm)
    g_kl, g_ent = torch.randn(1, 8, 333, generator=gen), torch.randn(1, 8, 333, generator=gen)

    def run(dtype):
        qs, ks = (t.to(dtype).clone().requires_grad_() for t in (q_s, k_s))
        rows = asu_kernels.attention_kl(qs, ks, q_t.to(dtype), k_t.to(dtype), return_entropy=True, **kw)
        ((rows[0] * g_kl.to(rows[0].dtype)).sum() + (rows[1] * g_ent.to(rows[1].dtype)).sum()).backward()
        return (*rows, qs.grad, ks.grad)

    got = run(torch.float32)
    exact = run(torch.float64)  # float64 runs the reference
    monkeypatch.setenv("ASU_KERNELS_BACKEND", "reference")
    lowp = run(torch.float32)
    for name, g, e, lp in zip(
        ("kl", "entropy_s", "entropy_t", "dq_s", "dk_s"), got, exact, lowp, strict=True
    ):
        assert_fa_close(name, g, e, lp, 4e-5)
