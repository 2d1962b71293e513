"""Attention-map KL, ``KL(teacher attention || student attention)`` per query row: the public op.

This module holds :func:`attention_kl`, its custom ops (``asu_kernels::attention_kl_fwd`` /
``asu_kernels::attention_kl_bwd``, opaque to ``torch.compile``, with fake implementations) and their
autograd, the autotune tables and launchers, the input checks and the ahead-of-time compile specs. The op
bodies run the Triton kernels or, on CPU tensors without the interpreter, the blocked PyTorch implementation
of :mod:`asu_kernels._cpu_attention` (the same math and memory bound); float64 inputs run the reference
(:mod:`asu_kernels._backend` states the rule). The Triton kernels and their math are in
:mod:`asu_kernels._attention_kl_kernels`; the masks, layouts and ``lse`` conventions are those of
:mod:`asu_kernels.reference`.

One streaming pass over the keys per query block: memory is O(N) per head and the work is two ``QK^T``
products per block (4 N^2 D flops, as many as flash attention).
"""

from __future__ import annotations

import contextlib
import math
from typing import Any, NamedTuple

import torch
import triton

from asu_kernels import _attention_kl_kernels as _k
from asu_kernels import _cpu_attention as _cpu
from asu_kernels import _inputs as _in
from asu_kernels import reference
from asu_kernels._aot import AOTSpec
from asu_kernels._backend import backend, interpreting

__all__ = ["attention_kl", "aot_specs"]

_TL_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}

# (BLOCK_M, BLOCK_N, num_warps, num_stages). The forward holds two query tiles and two score tiles;
# the backward kernels hold one fp32 gradient tile on top of that.
_FWD_GPU_CONFIGS = [(128, 64, 8, 3), (128, 32, 8, 3), (64, 64, 8, 3), (64, 32, 4, 2), (32, 32, 4, 2)]
# Backward tiles hold an fp32 gradient accumulator on top: smaller blocks, chosen to compile without
# register spills on sm_80 and sm_90 at head dim 128 (see aot_specs / the compile report).
_DQ_GPU_CONFIGS = [(64, 32, 8, 2), (32, 32, 4, 1), (64, 32, 8, 1)]
# (BLOCK_N, BLOCK_M, ...) for the dk kernel: keys are the outer (resident) block.
_DK_GPU_CONFIGS = [(64, 32, 8, 1), (32, 32, 8, 1), (32, 16, 4, 1)]
# The interpreter runs one small configuration: autotuning there would only multiply the CPU time.
_INTERPRET_CONFIG = (16, 16, 4, 1)


def _configs(gpu: list[tuple[int, int, int, int]], outer: str, inner: str) -> list[triton.Config]:
    chosen = [_INTERPRET_CONFIG] if interpreting() else gpu
    return [triton.Config({outer: a, inner: c}, num_warps=w, num_stages=s) for a, c, w, s in chosen]


_TUNE_KEY = ["HEAD_DIM", "CAUSAL", "HAS_WINDOW", "HAS_KPM", "IS_VARLEN"]
# fp32 operands (full-precision products) and head dims above 128 double the registers a tile needs; the
# large tiles then spill heavily (checked with ptxas for sm_80/sm_90), so only these tile areas remain.
_HEAVY_MAX_TILE = 32 * 32


def _heavy(block_d: int, dot_precision: str) -> bool:
    return dot_precision == "ieee" or block_d > 128


def _fits(configs: list, block_d: int, dot_precision: str) -> list:
    """The configurations worth trying for this head dim / precision (never empty)."""
    if not _heavy(block_d, dot_precision):
        return list(configs)

    def area(c: Any) -> int:
        return c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"] if isinstance(c, triton.Config) else c[0] * c[1]

    small = [c for c in configs if area(c) <= _HEAVY_MAX_TILE]
    return small or [min(configs, key=area)]


def _prune(configs: list, named_args: dict, **kwargs) -> list:
    meta = {**named_args, **kwargs}
    return _fits(configs, meta["BLOCK_D"], meta["DOT_PRECISION"])


# The kernels of :mod:`asu_kernels._attention_kl_kernels`, autotuned over the tables above.
_fwd_kernel = triton.autotune(
    configs=_configs(_FWD_GPU_CONFIGS, "BLOCK_M", "BLOCK_N"),
    key=_TUNE_KEY + ["WANT_ENTROPY"],
    prune_configs_by={"early_config_prune": _prune},
)(_k.attention_kl_fwd_kernel)
_dq_kernel = triton.autotune(
    configs=_configs(_DQ_GPU_CONFIGS, "BLOCK_M", "BLOCK_N"),
    key=_TUNE_KEY + ["ENT_GRAD"],
    prune_configs_by={"early_config_prune": _prune},
)(_k.attention_kl_bwd_dq_kernel)
_dk_kernel = triton.autotune(
    configs=_configs(_DK_GPU_CONFIGS, "BLOCK_N", "BLOCK_M"),
    key=_TUNE_KEY + ["ENT_GRAD"],
    prune_configs_by={"early_config_prune": _prune},
)(_k.attention_kl_bwd_dk_kernel)


# ----------------------------------------------------------------------------------------------------------
# Launchers. Outputs are passed in so that tests can poison them and check that every element is written.


class _Call(NamedTuple):
    """One call as the kernels see it: inputs, packed offsets, uint8 key padding and the logit scales."""

    q_s: torch.Tensor
    k_s: torch.Tensor
    q_t: torch.Tensor
    k_t: torch.Tensor
    cu_seqlens: torch.Tensor | None  # int32
    kpm: torch.Tensor | None  # contiguous uint8 (B, Nk)
    max_seqlen: int  # packed batches: the longest document
    scale_s: float  # scale / temperature_s
    scale_t: float  # scale / temperature_t
    causal: bool
    window: int  # 0: no window

    def unit_stride(self) -> _Call:
        """The same call with the inputs' last dim made unit-stride (the kernels assume it)."""
        q_s, k_s, q_t, k_t = (t if t.stride(-1) == 1 else t.contiguous() for t in self[:4])
        return self._replace(q_s=q_s, k_s=k_s, q_t=q_t, k_t=k_t)

    def layout(self) -> _in.Layout:
        return _in.layout(self.q_s, self.k_s, self.cu_seqlens, self.max_seqlen)

    def pointers(self, dummy: torch.Tensor) -> tuple[torch.Tensor, ...]:
        """QS, KS, QT, KT, KPM, CU (``dummy`` stands in for the absent, never-read ones)."""
        kpm = dummy if self.kpm is None else self.kpm
        cu = dummy if self.cu_seqlens is None else self.cu_seqlens
        return (self.q_s, self.k_s, self.q_t, self.k_t, kpm, cu)

    def strides(self, varlen: bool) -> tuple[int, ...]:
        """(batch, head, row) strides of q_s, k_s, q_t, k_t, then the key padding's batch stride."""
        inputs = (s for t in self[:4] for s in _in.strides4(t, varlen)[:3])
        return (*inputs, 0 if self.kpm is None else self.kpm.stride(0))

    def scalars(self, lay: _in.Layout, heads: int) -> tuple[int | float, ...]:
        """n_q, n_k, the programs' head count, both GQA group sizes, window and both base-2 scales."""
        hq, hkv_s, hkv_t = self.q_s.shape[1], self.k_s.shape[1], self.k_t.shape[1]
        qk_scales = (_in.base2_scale(self.scale_s), _in.base2_scale(self.scale_t))
        return (lay.max_q, lay.max_k, heads, hq // hkv_s, hq // hkv_t, self.window, *qk_scales)

    def flags(self) -> dict[str, Any]:
        d = self.q_s.shape[-1]
        return dict(
            HEAD_DIM=d, BLOCK_D=_in.head_dim_block(d), CAUSAL=bool(self.causal), HAS_WINDOW=self.window > 0,
            HAS_KPM=self.kpm is not None, IS_VARLEN=self.cu_seqlens is not None,
            DOT_PRECISION=_in.dot_precision(self.q_s.dtype),
        )  # fmt: skip


def _on_device(t: torch.Tensor):
    return torch.cuda.device(t.device) if t.is_cuda else contextlib.nullcontext()


def _launch_fwd(
    call: _Call,
    kl: torch.Tensor,
    lse_s: torch.Tensor,
    lse_t: torch.Tensor,
    ent_s: torch.Tensor | None,
    ent_t: torch.Tensor | None,
) -> None:
    """Run the forward kernel into preallocated fp32 ``kl``, ``lse_*`` (and ``ent_*`` when given), all shaped
    like ``q_s`` without its last dim."""
    call = call.unit_stride()
    lay, hq = call.layout(), call.q_s.shape[1]
    if lay.batch * hq == 0 or lay.max_q == 0:
        return
    dummy = kl
    outputs = (kl, lse_s, lse_t, dummy if ent_s is None else ent_s, dummy if ent_t is None else ent_t)
    grid = lambda meta: (triton.cdiv(lay.max_q, meta["BLOCK_M"]), lay.batch * hq)  # noqa: E731
    with _on_device(call.q_s):
        _fwd_kernel[grid](
            *call.pointers(dummy), *outputs, *call.strides(lay.varlen), *_in.row_strides(kl, lay.varlen),
            *call.scalars(lay, hq), WANT_ENTROPY=ent_s is not None, **call.flags(),
        )  # fmt: skip


def _launch_bwd(
    call: _Call,
    g_kl: torch.Tensor,
    g_ent: torch.Tensor | None,
    lse_s: torch.Tensor,
    lse_t: torch.Tensor,
    ent_s: torch.Tensor | None,
    dq: torch.Tensor,
    dk: torch.Tensor,
) -> None:
    """Run the two backward kernels into preallocated ``dq`` (like q_s) and ``dk`` (like k_s), from the
    upstream gradients of the KL (``g_kl``) and of the student entropy (``g_ent``, None: no gradient)."""
    call = call.unit_stride()
    lay, hq, hkv_s = call.layout(), call.q_s.shape[1], call.k_s.shape[1]
    if lay.batch * hq == 0 or lay.max_q == 0:
        return
    ent_grad = g_ent is not None
    dummy = lse_s
    g_kl = g_kl.contiguous()
    rows = (lse_s, lse_t, ent_s if ent_grad else dummy, g_kl, g_ent.contiguous() if ent_grad else dummy)
    # The per-row tensors (lse, entropies, upstream grads) must share one layout: lse_s's strides.
    assert g_kl.stride() == lse_s.stride(), (g_kl.stride(), lse_s.stride())
    strides = (*call.strides(lay.varlen), *_in.row_strides(lse_s, lay.varlen))
    flags = dict(ENT_GRAD=ent_grad, **call.flags())
    with _on_device(call.q_s):
        grid_q = lambda meta: (triton.cdiv(lay.max_q, meta["BLOCK_M"]), lay.batch * hq)  # noqa: E731
        _dq_kernel[grid_q](
            *call.pointers(dummy), *rows, dq, *strides, *_in.strides4(dq, lay.varlen)[:3],
            *call.scalars(lay, hq), call.scale_s, **flags,
        )  # fmt: skip
        grid_k = lambda meta: (triton.cdiv(lay.max_k, meta["BLOCK_N"]), lay.batch * hkv_s)  # noqa: E731
        _dk_kernel[grid_k](
            *call.pointers(dummy), *rows, dk, *strides, *_in.strides4(dk, lay.varlen)[:3],
            *call.scalars(lay, hkv_s), call.scale_s, **flags,
        )  # fmt: skip


# ----------------------------------------------------------------------------------------------------------
# Custom ops (compile-traceable: torch.compile sees opaque ops with fake implementations).


def _row_outputs(q_s: torch.Tensor, want_entropy: bool) -> tuple[torch.Tensor, ...]:
    """fp32 ``kl, lse_s, lse_t, ent_s, ent_t`` shaped like q_s without D (entropies empty when not wanted)."""
    kl = q_s.new_empty(tuple(q_s.shape[:-1]), dtype=torch.float32)
    ent = (lambda: torch.empty_like(kl)) if want_entropy else (lambda: kl.new_empty(0))
    return kl, torch.empty_like(kl), torch.empty_like(kl), ent(), ent()


def _grad_outputs(q_s: torch.Tensor, k_s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    # Fresh contiguous gradients: empty_like would copy an input layout whose last dim may not be unit-stride,
    # which the kernels' stores assume.
    return q_s.new_empty(q_s.shape), k_s.new_empty(k_s.shape)


def _as_call(q_s, k_s, q_t, k_t, cu_seqlens, key_padding_mask, max_seqlen, scale_s, scale_t, causal, window):
    kpm = None if key_padding_mask is None else _in.key_padding_bytes(key_padding_mask).contiguous()
    return _Call(q_s, k_s, q_t, k_t, cu_seqlens, kpm, max_seqlen, scale_s, scale_t, causal, window)


# The ops' schemas, written out (as the vocabulary-loss ops do): the op bodies below take these arguments in
# this order.
_FWD_SCHEMA = (
    "(Tensor q_s, Tensor k_s, Tensor q_t, Tensor k_t, Tensor? cu_seqlens, Tensor? key_padding_mask, "
    "SymInt max_seqlen, float scale_s, float scale_t, bool causal, SymInt window, bool want_entropy) "
    "-> (Tensor, Tensor, Tensor, Tensor, Tensor)"
)
_BWD_SCHEMA = (
    "(Tensor g_kl, Tensor g_ent, Tensor q_s, Tensor k_s, Tensor q_t, Tensor k_t, Tensor? cu_seqlens, "
    "Tensor? key_padding_mask, Tensor lse_s, Tensor lse_t, Tensor ent_s, SymInt max_seqlen, float scale_s, "
    "float scale_t, bool causal, SymInt window, bool ent_grad) -> (Tensor, Tensor)"
)


def _fwd(q_s, k_s, q_t, k_t, cu_seqlens, key_padding_mask, max_seqlen, scale_s, scale_t, causal, window,
         want_entropy):  # fmt: skip
    """Forward (:data:`_FWD_SCHEMA`), Triton or the CPU path: ``(kl, lse_s, lse_t, ent_s, ent_t)``, the
    entropies empty unless ``want_entropy``."""
    if backend(q_s) == "cpu":
        return _cpu.attention_kl_forward(
            q_s, k_s, q_t, k_t, cu_seqlens, key_padding_mask, scale_s, scale_t, causal, window, want_entropy
        )  # fmt: skip
    kl, lse_s, lse_t, ent_s, ent_t = _row_outputs(q_s, want_entropy)
    call = _as_call(
        q_s, k_s, q_t, k_t, cu_seqlens, key_padding_mask, max_seqlen, scale_s, scale_t, causal, window
    )
    _launch_fwd(call, kl, lse_s, lse_t, ent_s if want_entropy else None, ent_t if want_entropy else None)
    return kl, lse_s, lse_t, ent_s, ent_t


def _bwd(g_kl, g_ent, q_s, k_s, q_t, k_t, cu_seqlens, key_padding_mask, lse_s, lse_t, ent_s, max_seqlen,
         scale_s, scale_t, causal, window, ent_grad):  # fmt: skip
    """Backward (:data:`_BWD_SCHEMA`), Triton or the CPU path: ``(dq_s, dk_s)`` from the upstream gradients of
    the KL and (``ent_grad``) of the student entropy."""
    if backend(q_s) == "cpu":
        return _cpu.attention_kl_backward(
            g_kl, g_ent if ent_grad else None, q_s, k_s, q_t, k_t, cu_seqlens, key_padding_mask, lse_s, lse_t,
            ent_s, scale_s, scale_t, causal, window,
        )  # fmt: skip
    dq, dk = _grad_outputs(q_s, k_s)
    call = _as_call(
        q_s, k_s, q_t, k_t, cu_seqlens, key_padding_mask, max_seqlen, scale_s, scale_t, causal, window
    )
    ent_s = ent_s if ent_grad else None
    _launch_bwd(call, g_kl, g_ent if ent_grad else None, lse_s, lse_t, ent_s, dq, dk)
    return dq, dk


_fwd_op = torch.library.custom_op("asu_kernels::attention_kl_fwd", _fwd, mutates_args=(), schema=_FWD_SCHEMA)
_bwd_op = torch.library.custom_op("asu_kernels::attention_kl_bwd", _bwd, mutates_args=(), schema=_BWD_SCHEMA)


@_fwd_op.register_fake
def _fwd_fake(q_s, k_s, q_t, k_t, cu_seqlens, key_padding_mask, max_seqlen, scale_s, scale_t, causal, window,
              want_entropy):  # fmt: skip
    return _row_outputs(q_s, want_entropy)


@_bwd_op.register_fake
def _bwd_fake(g_kl, g_ent, q_s, k_s, q_t, k_t, cu_seqlens, key_padding_mask, lse_s, lse_t, ent_s, max_seqlen,
              scale_s, scale_t, causal, window, ent_grad):  # fmt: skip
    return _grad_outputs(q_s, k_s)


def _setup_context(ctx, inputs, output) -> None:
    q_s, k_s, q_t, k_t, cu_seqlens, kpm, max_seqlen, scale_s, scale_t, causal, window, want_entropy = inputs
    _, lse_s, lse_t, ent_s, _ = output
    ctx.save_for_backward(q_s, k_s, q_t, k_t, cu_seqlens, kpm, lse_s, lse_t, ent_s)
    ctx.params = (max_seqlen, scale_s, scale_t, causal, window, want_entropy)


def _backward(ctx, g_kl, g_lse_s, g_lse_t, g_ent_s, g_ent_t):
    q_s, k_s, q_t, k_t, cu_seqlens, kpm, lse_s, lse_t, ent_s = ctx.saved_tensors
    max_seqlen, scale_s, scale_t, causal, window, want_entropy = ctx.params
    if g_kl is None:
        g_kl = torch.zeros_like(lse_s)
    # The LSEs are internal outputs (never returned to the caller), and the teacher is frozen, so only the
    # KL and the student entropy carry gradient.
    ent_grad = bool(want_entropy) and g_ent_s is not None
    dq, dk = _bwd_op(
        g_kl.float(), g_ent_s.float() if ent_grad else g_kl.new_empty(0), q_s, k_s, q_t, k_t, cu_seqlens, kpm,
        lse_s, lse_t, ent_s, max_seqlen, scale_s, scale_t, causal, window, ent_grad,
    )  # fmt: skip
    return dq, dk, None, None, None, None, None, None, None, None, None, None


_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# ----------------------------------------------------------------------------------------------------------
# Public entry point.


def _check_tensors(
    q_s: torch.Tensor,
    k_s: torch.Tensor,
    q_t: torch.Tensor,
    k_t: torch.Tensor,
    cu_seqlens: torch.Tensor | None,
    max_seqlen: int | None,
    key_padding_mask: torch.Tensor | None,
) -> None:
    """The four inputs' dtypes, devices, shapes and dense or packed layout: a TypeError/ValueError names the
    problem; the caller's input is never silently fixed."""
    tensors = {"q_s": q_s, "k_s": k_s, "q_t": q_t, "k_t": k_t}
    _in.check_tensors(tensors)
    _in.check_dims(tensors, cu_seqlens is not None)
    _in.check_same_shape("q_s", q_s, "q_t", q_t)
    keys = {"k_s": k_s, "k_t": k_t}
    _in.check_head_dims(q_s.shape[-1], keys)
    _in.check_head_dim_range(q_s.shape[-1], 1)
    for name, k in keys.items():
        _in.check_head_groups(q_s.shape[1], k.shape[1], f"{name}'s heads")
    if cu_seqlens is not None:
        _check_packed(q_s, keys, cu_seqlens, max_seqlen, key_padding_mask)
    else:
        _check_dense(q_s, keys, max_seqlen, key_padding_mask)


def _check_options(
    temperature_t: float, temperature_s: float, scale: float | None, window: int | None, causal: bool
) -> None:
    """The scalar options: positive temperatures and scale, a window of at least one key, a bool causal."""
    for name, value in (("temperature_t", temperature_t), ("temperature_s", temperature_s), ("scale", scale)):
        _in.check_positive(name, value)
    _in.check_window(window)
    if not isinstance(causal, bool):
        raise TypeError(f"causal must be a bool, got {type(causal).__name__}")


def _check_packed(
    q_s: torch.Tensor,
    keys: dict[str, torch.Tensor],
    cu_seqlens: torch.Tensor,
    max_seqlen: int | None,
    key_padding_mask: torch.Tensor | None,
) -> None:
    if max_seqlen is not None and (int(max_seqlen) != max_seqlen or max_seqlen < 0):
        raise ValueError(f"max_seqlen must be a non-negative int, got {max_seqlen}")
    _in.check_packed("q_s", q_s, keys, cu_seqlens, max_seqlen, key_padding_mask)
    # A compiled graph cannot read the offsets to find the longest document: the caller must pass it.
    if torch.compiler.is_compiling() and max_seqlen is None:
        raise ValueError("under torch.compile, varlen calls must pass max_seqlen")


def _check_dense(
    q_s: torch.Tensor,
    keys: dict[str, torch.Tensor],
    max_seqlen: int | None,
    key_padding_mask: torch.Tensor | None,
) -> None:
    k_s, k_t = keys["k_s"], keys["k_t"]
    if k_s.shape[2] != k_t.shape[2]:
        raise ValueError(
            f"k_s and k_t must have the same number of keys, got {k_s.shape[2]} and {k_t.shape[2]}"
        )
    for name, k in keys.items():
        _in.check_dense_lengths("q_s", q_s, name, k)
    if key_padding_mask is not None:
        _in.check_key_padding_mask(key_padding_mask, k_s, q_s.device, "q_s", integer_ok=False)
    if max_seqlen is not None:
        raise ValueError("max_seqlen is only meaningful with cu_seqlens (packed batches)")


def attention_kl(
    q_s: torch.Tensor,
    k_s: torch.Tensor,
    q_t: torch.Tensor | None = None,
    k_t: torch.Tensor | None = None,
    *,
    temperature_t: float,
    temperature_s: float = 1.0,
    causal: bool = True,
    window: int | None = None,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    return_entropy: bool = False,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-query-row ``KL(p_T || p_S)`` between a teacher's and a student's attention maps, linear in N.

    ``p_T = softmax(q_t k_t^T * scale / temperature_t)``, ``p_S = softmax(q_s k_s^T * scale / temperature_s)``
    over the same visible keys; ``KL_i = sum_j p_T,ij (s_T,ij - s_S,ij) - lse_T,i + lse_S,i``.

    Args:
        q_s: student queries (B, Hq, Nq, D), or (total, Hq, D) with ``cu_seqlens``. Any strides.
        k_s: student keys (B, Hkv_s, Nk, D) or (total, Hkv_s, D); ``Hq % Hkv_s == 0``.
        q_t, k_t: teacher queries/keys shaped like q_s and (B, Hkv_t, Nk, D); ``Hq % Hkv_t == 0``. Both None
            means self-smoothing: the teacher is the student's own ``q_s, k_s``, detached.
        temperature_t: teacher temperature (> 0; ASU's smoothed teacher uses > 1).
        temperature_s: student temperature, default 1.
        causal: bottom-right aligned causal mask. window: keys visible including the diagonal, or None.
        cu_seqlens: (B+1,) int32 offsets of a packed batch; ``max_seqlen`` its longest document (computed
            from cu_seqlens when omitted; required under torch.compile).
        scale: logit scale, default ``1/sqrt(D)``.
        key_padding_mask: (B, Nk) bool, True = real key (dense layout only).
        return_entropy: also return the per-row entropies ``H_S`` and ``H_T``.

    Returns:
        ``kl`` of shape (B, Hq, Nq) dense or (total, Hq) varlen, float32 (float64 for float64 inputs); with
        ``return_entropy`` the tuple ``(kl, entropy_s, entropy_t)``. Rows with no visible key give 0.
        Gradients flow to ``q_s`` and ``k_s`` through ``kl`` and ``entropy_s``; the teacher is frozen
        (never receives gradient, like a detached tensor).
    """
    if (q_t is None) != (k_t is None):
        raise ValueError("pass both q_t and k_t, or neither (self-smoothing: teacher = detached q_s, k_s)")
    if q_t is None:
        q_t, k_t = q_s.detach(), k_s.detach()
    else:
        q_t, k_t = q_t.detach(), k_t.detach()
    _check_tensors(q_s, k_s, q_t, k_t, cu_seqlens, max_seqlen, key_padding_mask)
    _check_options(temperature_t, temperature_s, scale, window, causal)
    scale = 1.0 / math.sqrt(q_s.shape[-1]) if scale is None else float(scale)
    if q_s.dtype == torch.float64 or backend(q_s) == "reference":
        # The reference: float64 as is, lower precisions computed in fp32 (results are fp32 either way).
        work = torch.float64 if q_s.dtype == torch.float64 else torch.float32
        kl, ent_s, ent_t = reference.attention_kl(
            *(t.to(work) for t in (q_s, k_s, q_t, k_t)),
            temperature_t=float(temperature_t), temperature_s=float(temperature_s), causal=causal,
            window=window, scale=scale, key_padding_mask=key_padding_mask, cu_seqlens=cu_seqlens,
        )  # fmt: skip
        return (kl, ent_s, ent_t) if return_entropy else kl
    if cu_seqlens is not None and max_seqlen is None:
        max_seqlen = _in.longest_document(cu_seqlens)
    kl, _, _, ent_s, ent_t = _fwd_op(
        q_s, k_s, q_t, k_t,
        None if cu_seqlens is None else _in.cu_seqlens_int32(cu_seqlens),
        key_padding_mask,
        0 if max_seqlen is None else int(max_seqlen),
        scale / float(temperature_s), scale / float(temperature_t),
        causal, 0 if window is None else int(window), bool(return_entropy),
    )  # fmt: skip
    return (kl, ent_s, ent_t) if return_entropy else kl


# ----------------------------------------------------------------------------------------------------------
# Ahead-of-time compile specs (benchmarks/compile_report.py builds each for sm_80 and sm_90).


def _signature(kernel: str, dtype: torch.dtype) -> dict[str, str]:
    ptr = f"*{_TL_DTYPE[dtype]}"
    sig = {"QS": ptr, "KS": ptr, "QT": ptr, "KT": ptr, "KPM": "*u8", "CU": "*i32"}
    if kernel == "fwd":
        sig.update({n: "*fp32" for n in ("KL", "LSE_S", "LSE_T", "ENT_S", "ENT_T")})
    else:
        sig.update({n: "*fp32" for n in ("LSE_S", "LSE_T", "ENT_S", "G_KL", "G_ENT")})
        sig["DQ" if kernel == "dq" else "DK"] = ptr
    groups = ["qs", "ks", "qt", "kt"]
    for g in groups:
        sig.update({f"s_{g}_b": "i64", f"s_{g}_h": "i32", f"s_{g}_n": "i32"})
    sig["s_kpm_b"] = "i32"
    sig.update({"s_o_b": "i32", "s_o_h": "i32", "s_o_n": "i32"})
    if kernel != "fwd":
        g = "dq" if kernel == "dq" else "dk"
        sig.update({f"s_{g}_b": "i64", f"s_{g}_h": "i32", f"s_{g}_n": "i32"})
    sig.update({"n_q": "i32", "n_k": "i32", ("H" if kernel != "dk" else "H_KV"): "i32"})
    sig.update(
        {"GROUP_S": "i32", "GROUP_T": "i32", "window": "i32", "qk_scale_s": "fp32", "qk_scale_t": "fp32"}
    )
    if kernel != "fwd":
        sig["sm_scale_s"] = "fp32"
    flags = ["HEAD_DIM", "BLOCK_D", "CAUSAL", "HAS_WINDOW", "HAS_KPM", "IS_VARLEN"]
    flags += ["WANT_ENTROPY" if kernel == "fwd" else "ENT_GRAD", "DOT_PRECISION"]
    flags += ["BLOCK_N", "BLOCK_M"] if kernel == "dk" else ["BLOCK_M", "BLOCK_N"]
    sig.update({f: "constexpr" for f in flags})
    return sig


def aot_specs() -> list[AOTSpec]:
    """Every configuration the GPU autotuner may launch, at head dim 128 (bf16, causal; the ones an H100
    picks from) plus fp16 / fp32 / head dim 64 / window+padding / varlen variants on the first config."""
    kernels = {"fwd": (_k.attention_kl_fwd_kernel, _FWD_GPU_CONFIGS),
               "dq": (_k.attention_kl_bwd_dq_kernel, _DQ_GPU_CONFIGS),
               "dk": (_k.attention_kl_bwd_dk_kernel, _DK_GPU_CONFIGS)}  # fmt: skip
    variants = [
        # (dtype, D, causal, window, kpm, varlen, extra flag, all configs?)
        (torch.bfloat16, 128, True, False, False, False, True, True),
        (torch.float16, 128, True, False, False, False, False, False),
        (torch.float32, 64, False, False, False, False, True, False),
        (torch.bfloat16, 64, True, True, True, False, False, False),
        (torch.bfloat16, 80, True, False, False, True, True, False),
    ]
    specs = []
    for kernel, (fn, configs) in kernels.items():
        for dtype, d, causal, window, kpm, varlen, extra, all_configs in variants:
            block_d = triton.next_power_of_2(d)
            precision = "ieee" if dtype == torch.float32 else "tf32"
            chosen = _fits(configs, block_d, precision)
            for a, c, w, s in chosen if all_configs else chosen[:1]:
                outer, inner = ("BLOCK_N", "BLOCK_M") if kernel == "dk" else ("BLOCK_M", "BLOCK_N")
                constexprs = {
                    "HEAD_DIM": d, "BLOCK_D": block_d, "CAUSAL": causal,
                    "HAS_WINDOW": window, "HAS_KPM": kpm, "IS_VARLEN": varlen,
                    ("WANT_ENTROPY" if kernel == "fwd" else "ENT_GRAD"): extra,
                    "DOT_PRECISION": precision,
                    outer: a, inner: c,
                }  # fmt: skip
                name = (f"attention_kl_{kernel}[D={d},{_TL_DTYPE[dtype]},{'causal' if causal else 'full'}"
                        f"{',window,kpm' if window else ''}{',varlen' if varlen else ''}"
                        f"{',entropy' if extra else ''},{outer}={a},{inner}={c},w{w},s{s}]")  # fmt: skip
                specs.append(AOTSpec(
                    name=name, fn=fn, signature=_signature(kernel, dtype), constexprs=constexprs,
                    num_warps=w, num_stages=s, h100_candidate=(all_configs and d == 128),
                ))  # fmt: skip
    return specs
