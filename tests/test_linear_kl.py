"""Fused LM-head losses (linear_kl, linear_cross_entropy) against the float64 reference.

Both implementations are exercised: the Triton row kernels (under TRITON_INTERPRET=1 on CPU, natively on
CUDA) and the chunked PyTorch path (ASU_KERNELS_BACKEND=reference). Small chunk and tile overrides make
the odd shapes span several row chunks and several vocabulary tiles with a ragged last tile.

Tolerance (FlashAttention style): |ours - ref64| <= 2 |ref_lowp - ref64| + atol, where ref_lowp is the
reference run in the inputs' own precision and atol a couple of ulp of the largest reference value.
"""

from __future__ import annotations

import importlib
import json
import math
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from helpers import assert_fa_close

from asu_kernels import reference

# ``asu_kernels.linear_kl`` is shadowed by the function of that name in the package namespace.
LKL = importlib.import_module("asu_kernels.linear_kl")
ROOT = Path(__file__).resolve().parents[1]
UPSTREAM = 2.5
LOW = (torch.float16, torch.bfloat16)


def _interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@pytest.fixture(params=["triton", "torch"])
def backend(request, monkeypatch) -> str:
    """Run the test once on the Triton kernels and once on the chunked PyTorch path."""
    if request.param == "triton":
        if not (_interpreting() or torch.cuda.is_available()):
            pytest.skip("Triton path needs CUDA or TRITON_INTERPRET=1")
        monkeypatch.setenv("ASU_KERNELS_BACKEND", "triton")
    else:
        monkeypatch.setenv("ASU_KERNELS_BACKEND", "reference")
    return request.param


@pytest.fixture
def small_chunks(monkeypatch) -> None:
    """Several row chunks and vocabulary tiles even at M=37, V=333."""
    monkeypatch.setattr(LKL, "_chunk_rows_override", 8)
    monkeypatch.setattr(LKL, "_block_v_override", 128)


def _run_script(script: str, arg: str, env: dict[str, str], timeout: int) -> str:
    """Run ``python -c script arg`` from the repository root in a fresh process; return its stdout."""
    proc = subprocess.run(
        [sys.executable, "-c", script, arg],
        env=env,
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=timeout,
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def _kl_inputs(m, v, d, dtype, *, shared_head, bias, seed=0, hidden_scale=1.0, device=None):
    """Student/teacher hidden states, heads and row weights (some zero); logits ~ N(0, 4) by default."""
    device = device or _device()
    g = torch.Generator().manual_seed(seed)
    w_scale = 2.0 / math.sqrt(d)
    sh = torch.randn(m, d, generator=g) * hidden_scale
    th = sh + 0.5 * torch.randn(m, d, generator=g) * hidden_scale
    sw = torch.randn(v, d, generator=g) * w_scale
    tw = sw if shared_head else sw + 0.5 * w_scale * torch.randn(v, d, generator=g)
    sb = torch.randn(v, generator=g) if bias else None
    tb = (sb if shared_head else torch.randn(v, generator=g)) if bias else None
    weights = torch.rand(m, generator=g) + 0.1
    weights[::5] = 0.0
    cast = dict(dtype=dtype, device=device)
    out = {
        "student_hidden": sh.to(**cast),
        "student_weight": sw.to(**cast),
        "teacher_hidden": th.to(**cast),
        "teacher_weight": tw.to(**cast) if not shared_head else None,
        "weights": weights.to(device),
        "student_bias": None if sb is None else sb.to(**cast),
        "teacher_bias": None if tb is None or shared_head else tb.to(**cast),
    }
    if shared_head:  # literally the same tensors
        out["teacher_weight"] = out["student_weight"]
        out["teacher_bias"] = out["student_bias"]
    return out


STUDENT_PARAMS = ("student_hidden", "student_weight", "student_bias")


def _run_kl(fn, inputs, dtype, upstream=UPSTREAM):
    """Loss and student gradients of fn(**inputs) with the inputs cast to dtype (teacher detached)."""
    args = {}
    for k, t in inputs.items():
        args[k] = (
            None
            if t is None
            else t.detach().to(dtype if t.is_floating_point() and k != "weights" else t.dtype)
        )
    if inputs["teacher_weight"] is inputs["student_weight"]:
        args["teacher_weight"] = args["student_weight"]
    if inputs["teacher_bias"] is not None and inputs["teacher_bias"] is inputs["student_bias"]:
        args["teacher_bias"] = args["student_bias"]
    for k in STUDENT_PARAMS:
        if args[k] is not None:
            args[k].requires_grad_(True)
    if fn is reference.linear_kl:
        for k in ("teacher_hidden", "teacher_weight", "teacher_bias"):
            if args[k] is not None:
                args[k] = args[k].detach()
    loss = fn(**args)
    loss.backward(torch.tensor(upstream, dtype=loss.dtype, device=loss.device))
    grads = [None if args[k] is None else args[k].grad for k in STUDENT_PARAMS]
    return loss.detach(), grads


def _tolerance(dtype: torch.dtype, ref: torch.Tensor) -> float:
    scale = max(1.0, float(ref.abs().max())) if ref.numel() else 1.0
    return (2 * torch.finfo(dtype).eps if dtype in LOW else 2e-5) * scale


def _loss_dtype(dtype: torch.dtype) -> torch.dtype:
    """The fused losses return fp32 (fp64 for fp64 inputs) whatever the inputs' dtype, as Liger does."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _assert_close(ours, ref64, ref_lowp, dtype, what):
    """The FlashAttention-style bound with this file's dtype-relative slack; gradients in the reference's
    dtype, the loss in fp32."""
    assert ours is not None, f"{what}: missing"
    want = _loss_dtype(ref_lowp.dtype) if what == "loss" else ref_lowp.dtype
    assert ours.dtype == want, f"{what}: dtype {ours.dtype} != {want}"
    assert_fa_close(what, ours, ref64, ref_lowp, _tolerance(dtype, ref64))


def _check_against_reference(fn, ref_fn, inputs, dtype):
    ours = _run_kl(fn, inputs, dtype)
    ref64 = _run_kl(ref_fn, inputs, torch.float64)
    ref_lowp = _run_kl(ref_fn, inputs, dtype)
    _assert_close(ours[0], ref64[0], ref_lowp[0], dtype, "loss")
    for name, a, b, c in zip(STUDENT_PARAMS, ours[1], ref64[1], ref_lowp[1], strict=True):
        if b is None:
            continue
        _assert_close(a, b, c, dtype, f"grad {name}")


# ----------------------------------------------------------------------------------------------------------
# linear_kl
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("shared_head", [True, False], ids=["shared_head", "separate_head"])
def test_kl_matches_reference(backend, small_chunks, dtype, shared_head):
    inputs = _kl_inputs(37, 333, 80, dtype, shared_head=shared_head, bias=not shared_head, seed=1)
    _check_against_reference(LKL.linear_kl, reference.linear_kl, inputs, dtype)


def test_kl_default_chunks_and_tiles(backend):
    """No overrides: one chunk, one (masked) 1024 tile over V=1000; weights=None is the mean over rows."""
    inputs = _kl_inputs(37, 1000, 64, torch.float32, shared_head=False, bias=False, seed=2)
    inputs["weights"] = None
    _check_against_reference(LKL.linear_kl, reference.linear_kl, inputs, torch.float32)


def test_kl_float64_is_exact(backend, small_chunks):
    inputs = _kl_inputs(19, 150, 64, torch.float64, shared_head=False, bias=True, seed=3)
    ours = _run_kl(LKL.linear_kl, inputs, torch.float64)
    ref = _run_kl(reference.linear_kl, inputs, torch.float64)
    torch.testing.assert_close(ours[0], ref[0], rtol=1e-12, atol=1e-12)
    for a, b in zip(ours[1], ref[1], strict=True):
        torch.testing.assert_close(a, b, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_kl_extreme_logits_finite(backend, small_chunks, dtype):
    """|logit| ~ 1e4: online max subtraction keeps everything finite (and fp32 close to the reference)."""
    inputs = _kl_inputs(37, 333, 64, dtype, shared_head=False, bias=False, seed=4, hidden_scale=5000.0)
    logits = inputs["student_hidden"].double() @ inputs["student_weight"].double().T
    assert logits.abs().max() > 5e3
    loss, grads = _run_kl(LKL.linear_kl, inputs, dtype)
    assert torch.isfinite(loss)
    for g in grads:
        if g is not None:
            assert torch.isfinite(g).all()
    if dtype == torch.float32:
        _check_against_reference(LKL.linear_kl, reference.linear_kl, inputs, dtype)


def test_kl_all_zero_weights(backend):
    inputs = _kl_inputs(37, 333, 64, torch.float32, shared_head=False, bias=True, seed=5)
    inputs["weights"] = torch.zeros_like(inputs["weights"])
    loss, grads = _run_kl(LKL.linear_kl, inputs, torch.float32)
    assert loss.item() == 0.0
    for g in grads:
        assert g is not None and torch.count_nonzero(g) == 0


def test_kl_zero_weight_rows_get_zero_grad(backend, small_chunks):
    inputs = _kl_inputs(37, 333, 64, torch.float32, shared_head=False, bias=False, seed=6)
    _, (grad_h, _, _) = _run_kl(LKL.linear_kl, inputs, torch.float32)
    zero_rows = inputs["weights"] == 0
    assert torch.count_nonzero(grad_h[zero_rows]) == 0
    assert (grad_h[~zero_rows].abs().sum(-1) > 0).all()


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
def test_kl_teacher_equals_student(backend, small_chunks, dtype):
    """Same hidden states and head: exactly 0 loss and 0 gradient."""
    inputs = _kl_inputs(37, 333, 64, dtype, shared_head=True, bias=True, seed=7)
    inputs["teacher_hidden"] = inputs["student_hidden"]
    loss, grads = _run_kl(LKL.linear_kl, inputs, dtype)
    assert loss.item() == 0.0
    for g in grads:
        assert torch.count_nonzero(g) == 0


def test_kl_no_grad_and_frozen_head(backend, small_chunks):
    """Forward-only and hidden-only gradients match the full computation."""
    inputs = _kl_inputs(23, 333, 64, torch.float32, shared_head=False, bias=True, seed=8)
    full_loss, (full_h, _, _) = _run_kl(LKL.linear_kl, inputs, torch.float32)
    with torch.no_grad():
        loss = LKL.linear_kl(**inputs)
    torch.testing.assert_close(loss, full_loss, rtol=1e-6, atol=1e-6)
    h = inputs["student_hidden"].clone().requires_grad_(True)
    loss = LKL.linear_kl(**{**inputs, "student_hidden": h})
    loss.backward(torch.tensor(UPSTREAM))
    torch.testing.assert_close(h.grad, full_h, rtol=1e-6, atol=1e-7)


def test_kl_distinct_teacher_width(backend):
    """The teacher may have its own hidden size (d_T != d_S); only V must agree."""
    g = torch.Generator().manual_seed(9)
    dev = _device()
    sh = torch.randn(11, 64, generator=g).to(dev).requires_grad_(True)
    sw = (torch.randn(97, 64, generator=g) / 8).to(dev)
    th, tw = torch.randn(11, 96, generator=g).to(dev), (torch.randn(97, 96, generator=g) / 8).to(dev)
    ours = LKL.linear_kl(sh, sw, th, tw)
    ref = reference.linear_kl(sh.double(), sw.double(), th.double(), tw.double())
    torch.testing.assert_close(ours.double(), ref, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# linear_cross_entropy
# ----------------------------------------------------------------------------------------------------------


def _ce_inputs(m, v, d, dtype, *, bias, weights, seed=0, hidden_scale=1.0):
    dev = _device()
    g = torch.Generator().manual_seed(seed)
    hidden = (torch.randn(m, d, generator=g) * hidden_scale).to(dtype=dtype, device=dev)
    weight = (torch.randn(v, d, generator=g) * 2 / math.sqrt(d)).to(dtype=dtype, device=dev)
    labels = torch.randint(0, v, (m,), generator=g)
    labels[::4] = -100
    w = None
    if weights:
        w = torch.rand(m, generator=g) + 0.1
        w[1::6] = 0.0
        w = w.to(dev)
    b = torch.randn(v, generator=g).to(dtype=dtype, device=dev) if bias else None
    return {"hidden": hidden, "weight": weight, "labels": labels.to(dev), "weights": w, "bias": b}


CE_PARAMS = ("hidden", "weight", "bias")


def _run_ce(fn, inputs, dtype, upstream=UPSTREAM):
    args = dict(inputs)
    for k in CE_PARAMS:
        if args[k] is not None:
            args[k] = args[k].detach().to(dtype).requires_grad_(True)
    loss = fn(**args)
    loss.backward(torch.tensor(upstream, dtype=loss.dtype, device=loss.device))
    return loss.detach(), [None if args[k] is None else args[k].grad for k in CE_PARAMS]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
@pytest.mark.parametrize("weights", [False, True], ids=["mean", "weighted"])
def test_ce_matches_reference(backend, small_chunks, dtype, weights):
    inputs = _ce_inputs(37, 333, 80, dtype, bias=weights, weights=weights, seed=10)
    ours = _run_ce(LKL.linear_cross_entropy, inputs, dtype)
    ref64 = _run_ce(reference.linear_cross_entropy, inputs, torch.float64)
    ref_lowp = _run_ce(reference.linear_cross_entropy, inputs, dtype)
    _assert_close(ours[0], ref64[0], ref_lowp[0], dtype, "loss")
    for name, a, b, c in zip(CE_PARAMS, ours[1], ref64[1], ref_lowp[1], strict=True):
        if b is not None:
            _assert_close(a, b, c, dtype, f"grad {name}")


def test_ce_extreme_logits_and_custom_ignore_index(backend, small_chunks):
    inputs = _ce_inputs(37, 333, 64, torch.float32, bias=False, weights=False, seed=11, hidden_scale=5000.0)
    labels = inputs["labels"].clone()
    labels[labels == -100] = 7  # a class id as the ignore index
    inputs["labels"] = labels
    ours = _run_ce(lambda **kw: LKL.linear_cross_entropy(**kw, ignore_index=7), inputs, torch.float32)
    ref = _run_ce(lambda **kw: reference.linear_cross_entropy(**kw, ignore_index=7), inputs, torch.float64)
    ref32 = _run_ce(lambda **kw: reference.linear_cross_entropy(**kw, ignore_index=7), inputs, torch.float32)
    _assert_close(ours[0], ref[0], ref32[0], torch.float32, "loss")
    _assert_close(ours[1][0], ref[1][0], ref32[1][0], torch.float32, "grad hidden")
    _assert_close(ours[1][1], ref[1][1], ref32[1][1], torch.float32, "grad weight")


@pytest.mark.parametrize("weights", [False, True], ids=["mean", "weighted"])
def test_ce_every_row_ignored(backend, weights):
    inputs = _ce_inputs(13, 333, 64, torch.float32, bias=True, weights=weights, seed=12)
    inputs["labels"] = torch.full_like(inputs["labels"], -100)
    loss, grads = _run_ce(LKL.linear_cross_entropy, inputs, torch.float32)
    assert loss.item() == 0.0
    for g in grads:
        assert g is not None and torch.count_nonzero(g) == 0


# ----------------------------------------------------------------------------------------------------------
# Mixed dtypes and autocast
# ----------------------------------------------------------------------------------------------------------


def _mixed(inputs: dict, dtypes: dict) -> dict:
    """``inputs`` with the named tensors cast (a shared head stays shared)."""
    out = dict(inputs)
    for name, dtype in dtypes.items():
        if out[name] is not None:
            out[name] = out[name].to(dtype)
    for teacher, student in (("teacher_weight", "student_weight"), ("teacher_bias", "student_bias")):
        if teacher in inputs and inputs[teacher] is not None and inputs[teacher] is inputs.get(student):
            out[teacher] = out[student]
    return out


def _run_mixed(fn, inputs, params, autocast=None):
    """fn(**inputs) with each of ``params`` requiring its gradient, in its own dtype (optionally under
    CPU autocast); (loss, [grad per param])."""
    args = {
        k: (v.detach().clone().requires_grad_(k in params) if torch.is_tensor(v) else v)
        for k, v in inputs.items()
    }
    for teacher, student in (("teacher_weight", "student_weight"), ("teacher_bias", "student_bias")):
        if teacher in inputs and inputs[teacher] is not None and inputs[teacher] is inputs.get(student):
            args[teacher] = args[student]
    if autocast is None:
        loss = fn(**args)
    else:
        with torch.autocast(_device(), dtype=autocast):
            loss = fn(**args)
    loss.backward(torch.tensor(UPSTREAM, dtype=loss.dtype, device=loss.device))
    return loss.detach(), [None if args[k] is None else args[k].grad for k in params]


def _check_mixed(fn, ref_fn, inputs, params, compute, autocast=None):
    """Mixed-dtype inputs against the float64 reference on the same values.

    ``compute`` is the dtype the op should compute in; ``ref_lowp`` is the reference computed in it, its
    gradients rounded to each input's dtype, so the bound allows the compute precision plus the final cast.
    """
    teacher_fixed = {k: v for k, v in inputs.items() if k.startswith("teacher") and v is not None}
    ours = _run_mixed(fn, inputs, params, autocast)

    floats = [k for k, v in inputs.items() if torch.is_tensor(v) and v.is_floating_point() and k != "weights"]

    def ref(dtype):
        cast = _mixed(inputs, dict.fromkeys(floats, dtype))
        for k in teacher_fixed:
            cast[k] = cast[k].detach()  # the fused ops treat the teacher side as constant
        return _run_mixed(ref_fn, cast, params)

    ref64, ref_c = ref(torch.float64), ref(compute)
    assert ours[0].dtype == torch.float32, f"loss dtype {ours[0].dtype}"
    _assert_close(ours[0], ref64[0], ref_c[0], compute, "loss")
    for name, a, b, c in zip(params, ours[1], ref64[1], ref_c[1], strict=True):
        if b is None:
            continue
        own = inputs[name].dtype
        assert a is not None and a.dtype == own, f"grad {name}: {None if a is None else a.dtype} != {own}"
        coarser = own if _FLOAT_BITS[own] < _FLOAT_BITS[compute] else compute
        _assert_close(a, b, c.to(own), coarser, f"grad {name}")


_FLOAT_BITS = {torch.float16: 16, torch.bfloat16: 16, torch.float32: 32, torch.float64: 64}
FP32_HEAD = {"student_weight": torch.float32, "student_bias": torch.float32, "teacher_weight": torch.float32}


@pytest.mark.parametrize("shared_head", [False, True], ids=["two_heads", "shared_head"])
def test_kl_bf16_hidden_fp32_head(backend, small_chunks, shared_head):
    """The usual mixed-precision set-up: bf16 activations, fp32 master weights: computed in fp32."""
    inputs = _kl_inputs(37, 333, 80, torch.bfloat16, shared_head=shared_head, bias=True, seed=21)
    inputs = _mixed(inputs, FP32_HEAD | {"teacher_bias": torch.float32})
    _check_mixed(LKL.linear_kl, reference.linear_kl, inputs, STUDENT_PARAMS, torch.float32)


def test_ce_bf16_hidden_fp32_head(backend, small_chunks):
    inputs = _mixed(_ce_inputs(37, 333, 80, torch.bfloat16, bias=True, weights=True, seed=22), {})
    inputs = _mixed(inputs, {"weight": torch.float32, "bias": torch.float32})
    _check_mixed(LKL.linear_cross_entropy, reference.linear_cross_entropy, inputs, CE_PARAMS, torch.float32)


@pytest.mark.parametrize("hidden_dtype", [torch.float32, torch.bfloat16], ids=str)
def test_kl_and_ce_under_autocast(backend, small_chunks, hidden_dtype):
    """Inside ``torch.autocast(dtype=bf16)`` an fp32 head computes in bf16 (as ``F.linear`` would), the
    loss is fp32 and each gradient comes back in its input's dtype."""
    if _device() == "cuda":
        pytest.skip("CPU autocast is tested here; CUDA autocast follows the same rule")
    kl = _kl_inputs(37, 333, 80, torch.float32, shared_head=False, bias=True, seed=23)
    kl = _mixed(kl, {"student_hidden": hidden_dtype, "teacher_hidden": hidden_dtype})
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert LKL._compute_dtype({k: kl[k] for k in STUDENT_PARAMS}) == torch.bfloat16  # not the head's fp32
    _check_mixed(LKL.linear_kl, reference.linear_kl, kl, STUDENT_PARAMS, torch.bfloat16, torch.bfloat16)
    ce = _ce_inputs(37, 333, 80, torch.float32, bias=True, weights=False, seed=24)
    ce = _mixed(ce, {"hidden": hidden_dtype})
    ce_fns = (LKL.linear_cross_entropy, reference.linear_cross_entropy)
    _check_mixed(*ce_fns, ce, CE_PARAMS, torch.bfloat16, torch.bfloat16)


def test_fp16_with_bf16_is_refused_outside_autocast():
    """Neither half type holds the other's values: refused with the dtypes named, unless autocast decides."""
    args = _good_ce()
    args["hidden"], args["weight"] = args["hidden"].half(), args["weight"].bfloat16()
    with pytest.raises(
        TypeError, match=r"float16 and bfloat16 inputs cannot be mixed \(hidden: torch.float16"
    ):
        LKL.linear_cross_entropy(**args)
    half = {"student_hidden": torch.bfloat16, "student_weight": torch.bfloat16}
    kl = _mixed(_good_kl(), half | {"teacher_hidden": torch.float16, "teacher_weight": torch.float16})
    with pytest.raises(TypeError, match="cannot be mixed"):
        LKL.linear_kl(**kl)
    # with an fp32 tensor among them, fp32 holds both
    kl["teacher_weight"] = kl["teacher_weight"].float()
    assert LKL.linear_kl(**kl).dtype == torch.float32
    with torch.autocast("cpu", dtype=torch.bfloat16):
        assert LKL.linear_cross_entropy(**args).dtype == torch.float32


# ----------------------------------------------------------------------------------------------------------
# Bad inputs
# ----------------------------------------------------------------------------------------------------------


def _good_kl():
    g = torch.Generator().manual_seed(13)
    return {
        "student_hidden": torch.randn(5, 16, generator=g),
        "student_weight": torch.randn(9, 16, generator=g),
        "teacher_hidden": torch.randn(5, 16, generator=g),
        "teacher_weight": torch.randn(9, 16, generator=g),
    }


KL_BAD = [
    ("student_hidden", torch.randn(5, 12), ValueError, "student_hidden has d=12"),
    ("teacher_weight", torch.randn(8, 16), ValueError, "vocabulary sizes differ"),
    ("teacher_hidden", torch.randn(4, 16), ValueError, "M=5 rows but teacher_hidden has 4"),
    ("weights", torch.ones(4), ValueError, r"weights must have shape \(M,\)=\(5,\)"),
    ("weights", torch.ones(5, dtype=torch.complex64), TypeError, "weights must be a floating-point"),
    ("student_hidden", torch.randn(5, 16).to(torch.int32), TypeError, "supported: float16"),
    ("student_hidden", torch.randn(5, 2, 16), ValueError, "student_hidden must be 2-D"),
    ("student_bias", torch.randn(8), ValueError, r"student_bias must have shape \(V,\)=\(9,\)"),
    ("teacher_hidden", [[0.0] * 16] * 5, TypeError, "teacher_hidden must be a torch.Tensor"),
    ("weights", torch.ones(5, device="meta"), ValueError, "all tensors must be on one device"),
]


@pytest.mark.parametrize(("name", "value", "error", "match"), KL_BAD, ids=[c[3][:30] for c in KL_BAD])
def test_kl_bad_inputs(name, value, error, match):
    args = _good_kl()
    args[name] = value
    with pytest.raises(error, match=match):
        LKL.linear_kl(**args)


def _good_ce():
    g = torch.Generator().manual_seed(14)
    return {
        "hidden": torch.randn(5, 16, generator=g),
        "weight": torch.randn(9, 16, generator=g),
        "labels": torch.tensor([0, 3, -100, 8, 2]),
    }


CE_BAD = [
    ("labels", torch.tensor([0, 3, 1, 8]), ValueError, r"labels must have shape \(M,\)=\(5,\)"),
    ("labels", torch.tensor([0.0, 3, 1, 8, 2]), TypeError, "labels must be an integer tensor"),
    ("labels", torch.tensor([0, 3, 9, 8, 2]), ValueError, r"labels must be in \[0, V=9\)"),
    ("labels", torch.tensor([0, -1, 2, 8, 2]), ValueError, r"labels must be in \[0, V=9\)"),
    ("weight", torch.randn(9, 15), ValueError, "hidden has d=16"),
    ("weights", torch.ones(6), ValueError, r"weights must have shape \(M,\)=\(5,\)"),
    ("ignore_index", 1.5, TypeError, "ignore_index must be an int"),
]


@pytest.mark.parametrize(("name", "value", "error", "match"), CE_BAD, ids=[c[3][:30] for c in CE_BAD])
def test_ce_bad_inputs(backend, name, value, error, match):
    args = _good_ce()
    args[name] = value
    with pytest.raises(error, match=match):
        LKL.linear_cross_entropy(**args)


# The NaN is injected on purpose: the interpreter's numpy reports arithmetic on it.
@pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
@pytest.mark.parametrize("name", ["teacher_hidden", "student_weight"])
def test_kl_check_flag_detects_nan(backend, name):
    args = _good_kl()
    args[name] = args[name].clone()
    args[name][1, 2] = float("nan")
    with pytest.raises(ValueError, match=f"{name} contains NaN or inf"):
        LKL.linear_kl(**args, check=True)
    assert torch.isnan(LKL.linear_kl(**args))  # without the flag: no scan, NaN propagates


def test_ce_check_flag_detects_inf(backend):
    args = _good_ce()
    args["hidden"] = args["hidden"].clone()
    args["hidden"][0, 0] = float("inf")
    with pytest.raises(ValueError, match="hidden contains NaN or inf"):
        LKL.linear_cross_entropy(**args, check=True)


@pytest.mark.parametrize("fp32_out_gemm", [False, True], ids=["blocked", "fp32_out_gemm"])
def test_grad_weight_accumulation_from_bf16(monkeypatch, fp32_out_gemm):
    """grad_W += g^T h from bf16 chunks into the fp32 accumulator: the blocked fallback (several blocks and
    vocabulary slices) and, where the device has it, the fp32-output GEMM agree with an fp32 computation."""
    dev = _device()
    if fp32_out_gemm and not LKL._fp32_out_addmm_works(torch.device(dev)):
        pytest.skip(f"aten::addmm.dtype_out is not available on {dev}")
    monkeypatch.setitem(LKL._FP32_OUT_ADDMM, torch.device(dev).type, fp32_out_gemm)
    monkeypatch.setattr(LKL, "GRAD_W_BLOCK_BYTES", 40 * 16 * 2)  # 40-row blocks
    gen = torch.Generator().manual_seed(19)
    weight = torch.empty(333, 16, dtype=torch.bfloat16, device=dev)
    acc = LKL._GradWeight(weight, torch.float32)
    assert len(acc.slices) == LKL.GRAD_W_SLICES
    want = torch.zeros(333, 16, dtype=torch.float64)
    for _ in range(3):
        g = torch.randn(7, 333, generator=gen).to(torch.bfloat16)
        h = torch.randn(7, 16, generator=gen).to(torch.bfloat16)
        acc.add(g.to(dev), h.to(dev))
        want += g.double().t() @ h.double()
    got = acc.finish(torch.tensor(0.5, device=dev), torch.float32)
    assert not acc.slices
    torch.testing.assert_close(got.double().cpu(), 0.5 * want, rtol=2e-2, atol=2e-2)


# ----------------------------------------------------------------------------------------------------------
# torch.compile
# ----------------------------------------------------------------------------------------------------------


def test_torch_compile_fullgraph(backend, small_chunks):
    """Both custom ops trace under fullgraph=True (fake impls); the compiled graph gives the eager grads."""
    inputs = _kl_inputs(17, 333, 64, torch.float32, shared_head=False, bias=True, seed=15)
    labels = torch.randint(0, 333, (17,), generator=torch.Generator().manual_seed(0)).to(_device())

    def step(sh, sw, sb, th, tw, tb, w):
        kl = LKL.linear_kl(sh, sw, th, tw, w, sb, tb)
        ce = LKL.linear_cross_entropy(sh, sw, labels, bias=sb)
        return 0.1 * kl + ce

    def run(fn):
        sh, sw, sb = (inputs[k].clone().requires_grad_(True) for k in STUDENT_PARAMS)
        loss = fn(
            sh,
            sw,
            sb,
            inputs["teacher_hidden"],
            inputs["teacher_weight"],
            inputs["teacher_bias"],
            inputs["weights"],
        )
        loss.backward()
        return loss.detach(), sh.grad, sw.grad, sb.grad

    torch._dynamo.reset()
    compiled = run(torch.compile(step, fullgraph=True, backend="aot_eager"))
    eager = run(step)
    for a, b in zip(compiled, eager, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------------------------------------
# Memory of the chunked CPU path
# ----------------------------------------------------------------------------------------------------------

_MEMORY_SCRIPT = textwrap.dedent(
    """
    import importlib, json, sys
    import torch

    torch.set_num_threads(1)
    L = importlib.import_module("asu_kernels.linear_kl")

    def kib(field):
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1])
        raise RuntimeError(field)

    op = sys.argv[1]
    m, v, d = 4096, 32000, 64
    g = torch.Generator().manual_seed(0)
    h = torch.randn(m, d, generator=g).requires_grad_(True)
    w = (torch.randn(v, d, generator=g) / 8).requires_grad_(True)
    if op == "kl":
        th, tw = torch.randn(m, d, generator=g), torch.randn(v, d, generator=g) / 8
        run = lambda: L.linear_kl(h, w, th, tw)
    else:
        labels = torch.randint(0, v, (m,), generator=g)
        run = lambda: L.linear_cross_entropy(h, w, labels)
    # Warm up on a tiny problem so lazy imports and allocator arenas are not counted.
    L.linear_cross_entropy(h[:4], w[:8], torch.zeros(4, dtype=torch.long)).backward()
    h.grad = w.grad = None
    base = kib("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:  # reset the high-water mark VmHWM to the current RSS
        f.write("5")
    loss = run()
    loss.backward()
    assert torch.isfinite(loss) and h.grad is not None and w.grad is not None
    extra = (kib("VmHWM") - base) * 1024
    print(json.dumps({"extra": extra, "inputs": sum(t.numel() * t.element_size() for t in (h, w))}))
    """
)


@pytest.mark.parametrize("op", ["ce", "kl"])
def test_cpu_chunked_path_memory(op):
    """M=4096, V=32000, d=64 fp32: peak extra RSS (gradients included) < 2x the student's (hidden + weight).

    Measured as the growth of the process's peak RSS (VmHWM, reset through /proc/self/clear_refs) over a
    forward + backward; the teacher's inputs for KL are allocated beforehand and not counted as extra.
    Full fp32 logits alone would take 4096 * 32000 * 4 = 524 MB (twice that for KL's two models).
    """
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("needs /proc/self/clear_refs to reset the peak-RSS mark")
    env = {k: val for k, val in os.environ.items() if k not in ("TRITON_INTERPRET", "ASU_KERNELS_BACKEND")}
    env["MALLOC_MMAP_THRESHOLD_"] = "131072"  # big blocks go straight back to the OS: RSS tracks live memory
    env["OMP_NUM_THREADS"] = "1"
    stdout = _run_script(_MEMORY_SCRIPT, op, env, timeout=300)
    result = json.loads(stdout.strip().splitlines()[-1])
    full_logits = 4096 * 32000 * 4
    assert result["extra"] < 2 * result["inputs"], result
    assert result["extra"] < full_logits / 10, result


# ----------------------------------------------------------------------------------------------------------
# Ahead-of-time specs
# ----------------------------------------------------------------------------------------------------------


def test_aot_specs_cover_launch_configs():
    specs = LKL.aot_specs()
    names = [s.name for s in specs]
    assert len(names) == len(set(names))
    from asu_kernels import _linear_kl_kernels as kernels

    launched = {(kernels.tile_for(v), dt) for v in (333, 32000, 128256) for dt in ("fp32", "bf16", "fp16")}
    for (block_v, warps), dt in launched:
        for fn in (kernels.kl_rows_kernel, kernels.ce_rows_kernel):
            for grad in (True, False):
                match = [
                    s
                    for s in specs
                    if s.fn is fn
                    and s.constexprs == {"COMPUTE_GRAD": grad, "BLOCK_V": block_v, "SOFTCAP": 0.0}
                    and s.num_warps == warps
                    and next(iter(s.signature.values())) == f"*{dt}"
                ]
                assert len(match) == 1, (fn, dt, block_v, grad)
    for s in specs:
        assert list(s.signature) == list(s.fn.arg_names), s.name


_COMPILE_SCRIPT = textwrap.dedent(
    """
    import importlib, sys
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    L = importlib.import_module("asu_kernels.linear_kl")
    specs = [s for s in L.aot_specs() if sys.argv[1] == "all" or s.h100_candidate and "bf16" in s.name]
    for spec in specs:
        for cc in (80, 90):
            triton.compile(
                ASTSource(fn=spec.fn, signature=spec.signature, constexprs=spec.constexprs),
                target=GPUTarget("cuda", cc, 32),
                options={"num_warps": spec.num_warps, "num_stages": spec.num_stages},
            )
    print("compiled", len(specs))
    """
)


def _compile_specs(which: str, tmp_path: Path) -> str:
    env = {k: val for k, val in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_CACHE_DIR"] = str(tmp_path / "triton-cache")
    return _run_script(_COMPILE_SCRIPT, which, env, timeout=600)


def test_aot_h100_specs_compile_for_sm80_sm90(tmp_path):
    """The bf16 large-tile configs (what an H100 runs at real vocab sizes) compile without a GPU."""
    assert "compiled 6" in _compile_specs("h100", tmp_path)


@pytest.mark.slow
def test_aot_all_specs_compile_for_sm80_sm90(tmp_path):
    assert "compiled 28" in _compile_specs("all", tmp_path)


# ----------------------------------------------------------------------------------------------------------
# GPU (run by benchmarks/gpu_check.sh)
# ----------------------------------------------------------------------------------------------------------


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32], ids=str)
def test_gpu_real_vocab(dtype):
    """A real vocabulary tile mix (V=32003: 8 tiles of 4096, ragged) and d=1024 on CUDA."""
    inputs = _kl_inputs(300, 32003, 1024, dtype, shared_head=False, bias=False, seed=16, device="cuda")
    _check_against_reference(LKL.linear_kl, reference.linear_kl, inputs, dtype)
    ce = _ce_inputs(300, 32003, 1024, dtype, bias=False, weights=True, seed=17)
    ours = _run_ce(LKL.linear_cross_entropy, ce, dtype)
    ref64 = _run_ce(reference.linear_cross_entropy, ce, torch.float64)
    ref_lowp = _run_ce(reference.linear_cross_entropy, ce, dtype)
    _assert_close(ours[0], ref64[0], ref_lowp[0], dtype, "loss")
    for a, b, c in zip(ours[1], ref64[1], ref_lowp[1], strict=True):
        if b is not None:
            _assert_close(a, b, c, dtype, "grad")


@pytest.mark.gpu
def test_gpu_peak_memory_is_chunk_sized():
    """M=32768, V=65536, d=512 bf16: the extra CUDA memory of forward + backward is a fraction of one bf16
    (M x V) logits tensor (4.3 GB): chunk buffers (2 x 2048 x V) + fp32 grad_W + gradients, ~0.75 GB."""
    m, v, d = 32768, 65536, 512
    g = torch.Generator(device="cuda").manual_seed(18)
    sh = torch.randn(m, d, device="cuda", dtype=torch.bfloat16, generator=g).requires_grad_(True)
    th = torch.randn(m, d, device="cuda", dtype=torch.bfloat16, generator=g)
    sw = (torch.randn(v, d, device="cuda", generator=g) / 16).to(torch.bfloat16).requires_grad_(True)
    tw = (torch.randn(v, d, device="cuda", generator=g) / 16).to(torch.bfloat16)
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    loss = LKL.linear_kl(sh, sw, th, tw)
    loss.backward()
    torch.cuda.synchronize()
    extra = torch.cuda.max_memory_allocated() - base
    assert torch.isfinite(loss) and torch.isfinite(sw.grad).all()
    assert extra < m * v * 2 / 4, f"peak extra {extra / 2**30:.2f} GiB"


# ----------------------------------------------------------------------------------------------------------
# Final-logit soft-capping (softcap=) and logit scaling folded into the hidden states
# ----------------------------------------------------------------------------------------------------------

# Small against the N(0, 4) logits of the inputs above, so the tanh bends most of them.
CAP = 1.7


def _capped(fn, softcap=CAP):
    """``fn`` with ``softcap`` set; the reference gets its teacher side detached (the fused op does that)."""

    def run(**kw):
        if fn is reference.linear_kl:
            kw = {k: (t.detach() if k.startswith("teacher") and t is not None else t) for k, t in kw.items()}
        return fn(**kw, softcap=softcap)

    return run


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("shared_head", [True, False], ids=["shared_head", "separate_head"])
def test_softcap_kl_matches_reference(backend, small_chunks, dtype, shared_head):
    """Both sides capped, the student gradient through the tanh; several chunks and vocabulary tiles."""
    inputs = _kl_inputs(37, 333, 48, dtype, shared_head=shared_head, bias=True, seed=31)
    _check_against_reference(_capped(LKL.linear_kl), _capped(reference.linear_kl), inputs, dtype)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16], ids=str)
def test_softcap_ce_matches_reference(backend, small_chunks, dtype):
    inputs = _ce_inputs(37, 333, 48, dtype, bias=True, weights=True, seed=32)
    ours = _run_ce(_capped(LKL.linear_cross_entropy), inputs, dtype)
    ref64 = _run_ce(_capped(reference.linear_cross_entropy), inputs, torch.float64)
    ref_lowp = _run_ce(_capped(reference.linear_cross_entropy), inputs, dtype)
    _assert_close(ours[0], ref64[0], ref_lowp[0], dtype, "loss")
    for name, a, b, c in zip(CE_PARAMS, ours[1], ref64[1], ref_lowp[1], strict=True):
        _assert_close(a, b, c, dtype, f"grad {name}")


def test_softcap_is_the_models_own_logits(backend):
    """``softcap`` computes the loss of ``c tanh(x / c)``, the logits Gemma-2 outputs; it is not a no-op."""
    g = torch.Generator().manual_seed(33)
    h, w = torch.randn(9, 16, generator=g), torch.randn(40, 16, generator=g)
    labels = torch.randint(0, 40, (9,), generator=g)
    logits = torch.tanh(h @ w.T / CAP) * CAP
    want = torch.nn.functional.cross_entropy(logits, labels)
    got = LKL.linear_cross_entropy(h, w, labels, softcap=CAP)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    assert (LKL.linear_cross_entropy(h, w, labels) - got).abs() > 0.1
    th = h + 0.3 * torch.randn(9, 16, generator=g)
    t_logits = torch.tanh(th @ w.T / CAP) * CAP
    want_kl = torch.nn.functional.kl_div(
        logits.log_softmax(-1), t_logits.log_softmax(-1), log_target=True, reduction="batchmean"
    )
    torch.testing.assert_close(LKL.linear_kl(h, w, th, w, softcap=CAP), want_kl, rtol=1e-5, atol=1e-6)


def test_logit_scale_folds_into_hidden_and_bias(backend):
    """Cohere / Granite scale their logits: ``a (h W^T + b) = (a h) W^T + a b``, scaled before any cap; the
    gradient of the unscaled hidden states carries the factor through autograd."""
    g = torch.Generator().manual_seed(34)
    h = torch.randn(11, 16, generator=g, dtype=torch.float64).requires_grad_()
    w, b = (
        torch.randn(40, 16, generator=g, dtype=torch.float64),
        torch.randn(40, generator=g, dtype=torch.float64),
    )
    labels = torch.randint(0, 40, (11,), generator=g)
    a = 0.0625
    logits = torch.tanh(a * (h @ w.T + b) / CAP) * CAP
    want = torch.nn.functional.cross_entropy(logits, labels)
    (want_grad,) = torch.autograd.grad(want, h)
    got = LKL.linear_cross_entropy((h * a).float(), w.float(), labels, bias=(b * a).float(), softcap=CAP)
    (got_grad,) = torch.autograd.grad(got, h)
    torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(got_grad, want_grad, rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize(
    ("value", "error"),
    [
        (0.0, ValueError),
        (-30.0, ValueError),
        (float("inf"), ValueError),
        ("30", TypeError),
        (True, TypeError),
    ],
    ids=["zero", "negative", "inf", "string", "bool"],
)
def test_softcap_bad_values(value, error):
    h, w = torch.randn(3, 16), torch.randn(8, 16)
    with pytest.raises(error, match="softcap"):
        LKL.linear_kl(h, w, h, w, softcap=value)
    with pytest.raises(error, match="softcap"):
        LKL.linear_cross_entropy(h, w, torch.zeros(3, dtype=torch.long), softcap=value)


# ----------------------------------------------------------------------------------------------------------
# linear_cross_entropy_rows
# ----------------------------------------------------------------------------------------------------------


def _rows_reference(hidden, weight, labels, bias=None, softcap=None):
    """Per-row cross-entropy from full float64 logits (0 on ignored rows)."""
    logits = hidden.double() @ weight.double().T + (0 if bias is None else bias.double())
    if softcap is not None:
        logits = softcap * torch.tanh(logits / softcap)
    return torch.nn.functional.cross_entropy(logits, labels, ignore_index=-100, reduction="none")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=str)
@pytest.mark.parametrize("softcap", [None, CAP], ids=["plain", "softcap"])
def test_ce_rows_match_reference(backend, small_chunks, dtype, softcap):
    """Every row's own loss, ignored rows 0, no gradient; its weighted sum is linear_cross_entropy's loss."""
    inputs = _ce_inputs(37, 333, 80, dtype, bias=True, weights=False, seed=13)
    h, w, y, b = inputs["hidden"], inputs["weight"], inputs["labels"], inputs["bias"]
    h = h.clone().requires_grad_(True)
    rows = LKL.linear_cross_entropy_rows(h, w, y, bias=b, softcap=softcap)
    assert rows.dtype == torch.float32 and rows.shape == (37,) and not rows.requires_grad
    exact = _rows_reference(h.detach(), w, y, b, softcap)
    lowp_logits = (h.detach() @ w.T + b).float()
    if softcap is not None:
        lowp_logits = softcap * torch.tanh(lowp_logits / softcap)
    lowp = torch.nn.functional.cross_entropy(lowp_logits, y, ignore_index=-100, reduction="none")
    assert_fa_close("rows", rows, exact, lowp, _tolerance(dtype, exact))
    assert torch.count_nonzero(rows[y == -100]) == 0
    total = LKL.linear_cross_entropy(h, w, y, bias=b, softcap=softcap)
    torch.testing.assert_close(total, rows[y != -100].mean(), rtol=1e-5, atol=1e-6)
