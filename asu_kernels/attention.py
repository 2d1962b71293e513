"""Temperature-scaled flash attention: the public entry point, its autograd/custom-op wrapper and AOT specs.

``o = softmax(q k^T * scale / temperature + mask) v`` (optionally with the logits soft-capped,
``cap * tanh(logit / cap)``, after the scale and the temperature) without ever forming the (N x N) matrix
on the Triton path. Semantics (masks, GQA, varlen layout, LSE, soft-cap) are defined in
:mod:`asu_kernels.reference`; the kernels live in :mod:`asu_kernels._attention_kernels`.

Dispatch (the rule is written out once, in :mod:`asu_kernels._backend`): fp16/bf16/fp32 inputs go through
the custom ops ``asu_kernels::attention_fwd`` / ``asu_kernels::attention_bwd`` (opaque to ``torch.compile``,
with fake implementations for tracing), whose bodies run the Triton kernels (CUDA tensors, and CPU tensors
under ``TRITON_INTERPRET=1``) or the PyTorch CPU path of :mod:`asu_kernels._cpu_attention` (PyTorch's fused
CPU flash attention where it expresses the call, a blocked online softmax otherwise; O(N) memory). Float64
inputs, and every call under ``ASU_KERNELS_BACKEND=reference``, run the PyTorch reference, differentiated by
autograd.
"""

from __future__ import annotations

import math

import torch
import triton

from asu_kernels import _attention_kernels as _k
from asu_kernels import _cpu_attention as _cpu
from asu_kernels import _inputs as _in
from asu_kernels import reference
from asu_kernels._aot import AOTSpec
from asu_kernels._backend import backend, interpreting


def _check_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None,
    temperature: float,
    window: int | None,
    cu_seqlens: torch.Tensor | None,
    max_seqlen: int | None,
    key_padding_mask: torch.Tensor | None,
    softcap: float | None = None,
) -> None:
    """Raise a TypeError/ValueError naming the problem; never silently fix the caller's input."""
    _in.check_tensors({"q": q, "k": k, "v": v})
    _in.check_positive("temperature", temperature)
    _in.check_positive("scale", scale)
    _in.check_positive("softcap", softcap)
    _in.check_window(window)
    varlen = cu_seqlens is not None
    _in.check_dims({"q": q, "k": k, "v": v}, varlen)
    d = q.shape[-1]
    _in.check_head_dims(d, {"k": k, "v": v})
    _in.check_same_shape("k", k, "v", v)
    _in.check_head_groups(q.shape[1], k.shape[1], "key/value heads")
    _in.check_head_dim_range(d, 16)
    if varlen:
        _in.check_packed("q", q, {"k": k}, cu_seqlens, max_seqlen, key_padding_mask)
        return
    _in.check_dense_lengths("q", q, "k", k)
    if key_padding_mask is not None:
        _in.check_key_padding_mask(key_padding_mask, k, q.device, "q", integer_ok=True)


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    scale: float | None = None,
    temperature: float = 1.0,
    window: int | None = None,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    return_lse: bool = False,
    key_padding_mask: torch.Tensor | None = None,
    softcap: float | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Temperature-scaled attention ``softmax(q k^T * scale / temperature) v``, fused (no N x N matrix).

    Per query row ``i`` and visible key ``j`` (:func:`asu_kernels.reference.visible`, plus key padding and
    packed documents): ``s_ij = q_i . k_j * scale / temperature`` (with ``softcap`` ``c``:
    ``s_ij = c * tanh(q_i . k_j * scale / (temperature * c))``), ``lse_i = log sum_j exp(s_ij)``,
    ``out_i = sum_j exp(s_ij - lse_i) v_j``. A row that sees no key gives ``out_i = 0``, ``lse_i = -inf``.

    Args:
        q: (B, Hq, N, D), or (total, Hq, D) with ``cu_seqlens``. Any strides. fp16/bf16/fp32/fp64.
        k, v: (B, Hkv, Nk, D) with ``Nk >= N``, or (total, Hkv, D). ``Hq % Hkv == 0`` (GQA: query head ``h``
            reads key/value head ``h // (Hq // Hkv)``).
        causal: bottom-right aligned causal mask (``j <= i + Nk - N``).
        scale: logit scale, default ``1/sqrt(D)``.
        temperature: > 0; ASU's forget-teacher uses ``temperature > 1``.
        window: sliding window (keys visible including the diagonal), or None.
        cu_seqlens: (B+1,) int32 document offsets for packed batches; ``max_seqlen`` its longest document.
        return_lse: also return the natural-log LSE (fp32, shaped like q without D). It is differentiable:
            an upstream LSE gradient ``g`` adds ``p_ij * g_i`` to the logit gradient.
        key_padding_mask: (B, Nk) bool, True = real key (dense layout only).
        softcap: logit soft-cap ``c > 0`` (Gemma-2's ``attn_logit_softcapping``), applied after the scale and
            the temperature, as transformers' eager attention applies it after its (smoothed) scaling; None
            = no cap. Each value compiles its own kernel specialisation.

    Returns:
        ``out`` shaped like q (and ``lse`` when ``return_lse``).
    """
    _check_inputs(
        q, k, v, scale=scale, temperature=temperature, window=window, cu_seqlens=cu_seqlens,
        max_seqlen=max_seqlen, key_padding_mask=key_padding_mask, softcap=softcap,
    )  # fmt: skip
    if q.dtype != torch.float64 and backend(q) != "reference":
        d = q.shape[-1]
        sm_scale = (1.0 / math.sqrt(d) if scale is None else float(scale)) / float(temperature)
        needs_grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad or v.requires_grad)
        out, lse = _attention_fwd_op(
            q, k, v, bool(causal), sm_scale, 0 if window is None else int(window), cu_seqlens,
            -1 if max_seqlen is None else int(max_seqlen), key_padding_mask, bool(return_lse or needs_grad),
            0.0 if softcap is None else float(softcap),
        )  # fmt: skip
        return (out, lse) if return_lse else out
    options = dict(causal=causal, scale=scale, temperature=temperature, window=window, softcap=softcap)
    if cu_seqlens is not None:
        out, lse = reference.attention_varlen(q, k, v, cu_seqlens, **options)
    else:
        out, lse = reference.attention(q, k, v, key_padding_mask=key_padding_mask, **options)
    return (out, lse) if return_lse else out


# Triton launch path -----------------------------------------------------------------------------------------

# (BLOCK_M, BLOCK_N, num_warps, num_stages). The GPU lists are the search space of the autotuner; the
# interpreter runs one tiny tile so the CPU suite stays fast (it ignores warps and stages).
FWD_CONFIGS: tuple[tuple[int, int, int, int], ...] = (
    (128, 64, 4, 3), (128, 64, 8, 3), (128, 128, 8, 2), (128, 32, 4, 4), (64, 64, 4, 3), (64, 32, 4, 4),
)  # fmt: skip
# dK/dV holds k, v and two fp32 accumulators of BLOCK_N x D per program: at D >= 128 only the
# 16 x 128 tile on 8 warps (one 64-row warpgroup slice each) stays spill-free on sm_90 (ptxas -v).
DKDV_CONFIGS: tuple[tuple[int, int, int, int], ...] = (
    (16, 128, 8, 2), (32, 128, 8, 2), (32, 64, 4, 3), (64, 64, 4, 2), (16, 64, 4, 3),
)  # fmt: skip
# BLOCK_M >= 64 so that the dQ dots map onto 64-row wgmma tiles on sm_90
DQ_CONFIGS: tuple[tuple[int, int, int, int], ...] = (
    (128, 32, 8, 3), (128, 64, 8, 2), (64, 32, 4, 3), (64, 64, 4, 2),
)  # fmt: skip
INTERPRETER_CONFIG = (16, 16, 1, 1)
PREPROCESS_BLOCK_M = 64
AUTOTUNE_KEY = ["HEAD_DIM", "CAUSAL", "HAS_WINDOW", "IS_VARLEN", "HAS_KPM", "SOFTCAP", "n_ctx_key"]


def _configs(table: tuple[tuple[int, int, int, int], ...]) -> list[triton.Config]:
    rows = (INTERPRETER_CONFIG,) if interpreting() else table
    return [triton.Config({"BLOCK_M": bm, "BLOCK_N": bn}, num_warps=w, num_stages=s) for bm, bn, w, s in rows]


def _smem_bytes(kernel: str, block_m: int, block_n: int, block_d: int, stages: int, elsize: int) -> int:
    """Rough shared-memory estimate of one config: the pipelined tiles plus the tiles kept resident.

    Only used to prune configs that cannot fit; the compile report measures the real numbers.
    """
    if kernel == "fwd":  # q resident, k and v pipelined
        return elsize * block_d * (block_m + stages * 2 * block_n)
    if kernel == "dkdv":  # k and v resident, q and dO pipelined, p^T/dS^T staged for the second operand
        return elsize * (block_d * (2 * block_n + stages * 2 * block_m) + 2 * block_m * block_n)
    return elsize * (block_d * (2 * block_m + stages * 2 * block_n) + 2 * block_m * block_n)  # dq


def _shared_memory_limit(t: torch.Tensor) -> int:
    if not t.is_cuda:
        return 1 << 30
    props = triton.runtime.driver.active.utils.get_device_properties(t.device.index or 0)
    return int(props["max_shared_mem"])


def config_allowed(
    kernel: str,
    block_m: int,
    block_n: int,
    num_warps: int,
    num_stages: int,
    block_d: int,
    elsize: int,
    smem_limit: int,
    n_ctx: int | None = None,
) -> bool:
    """Whether the autotuner may try a config (kernel "fwd", "dkdv" or "dq").

    Drops tiles longer than the sequence (``n_ctx``, None = no cap), above shared memory, or known from
    ``ptxas -v`` on sm_90 to spill registers at large head dims.
    """
    if n_ctx is not None and max(block_m, block_n) > max(16, n_ctx):
        return False  # a tile longer than the whole sequence only wastes work
    if _smem_bytes(kernel, block_m, block_n, block_d, num_stages, elsize) > smem_limit:
        return False
    if block_d >= 128:
        if kernel == "fwd" and num_warps == 4 and block_m * block_n >= 128 * 64:
            return False  # a 128 x D fp32 accumulator plus a 128 x 64 score tile on 4 warps spills
        if kernel == "dkdv" and ((block_m, block_n, num_warps) != (16, 128, 8) or num_stages > 2):
            return False  # see DKDV_CONFIGS
    return True


def _pruner(kernel: str):
    """Build an ``early_config_prune`` applying :func:`config_allowed` to the launch at hand."""

    def prune(configs: list[triton.Config], named_args: dict, **kwargs) -> list[triton.Config]:
        args = {**named_args, **kwargs}
        q = args["Q"]
        shape = (int(args["BLOCK_D"]), q.element_size(), _shared_memory_limit(q))

        def allowed(c: triton.Config, n_ctx: int | None) -> bool:
            bm, bn = c.kwargs["BLOCK_M"], c.kwargs["BLOCK_N"]
            return config_allowed(kernel, bm, bn, c.num_warps, c.num_stages, *shape, n_ctx)

        kept = [c for c in configs if allowed(c, int(args["n_ctx_key"]))]
        if not kept:  # short sequence: a longer tile is still better than a spilling one
            kept = [c for c in configs if allowed(c, None)]
        if not kept:  # keep the smallest tile so the launch still has a config
            kept = [min(configs, key=lambda c: (c.kwargs["BLOCK_M"] * c.kwargs["BLOCK_N"], c.num_stages))]
        return kept

    return prune


_fwd_kernel = triton.autotune(
    configs=_configs(FWD_CONFIGS),
    key=AUTOTUNE_KEY,
    prune_configs_by={"early_config_prune": _pruner("fwd")},
)(_k.attn_fwd_kernel)
_dkdv_kernel = triton.autotune(
    configs=_configs(DKDV_CONFIGS),
    key=AUTOTUNE_KEY,
    prune_configs_by={"early_config_prune": _pruner("dkdv")},
)(_k.attn_bwd_dkdv_kernel)
_dq_kernel = triton.autotune(
    configs=_configs(DQ_CONFIGS),
    key=AUTOTUNE_KEY,
    prune_configs_by={"early_config_prune": _pruner("dq")},
)(_k.attn_bwd_dq_kernel)


def _kpm_args(kpm: torch.Tensor | None, q: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    if kpm is None:
        return q, 0, 0  # never read: HAS_KPM is False
    kpm = _in.key_padding_bytes(kpm)
    return kpm, kpm.stride(0), kpm.stride(1)


def _cu32(cu_seqlens: torch.Tensor | None, q: torch.Tensor) -> torch.Tensor:
    return q if cu_seqlens is None else _in.cu_seqlens_int32(cu_seqlens)  # q: never read (dense)


# The ops' schemas, written out (as the vocabulary-loss ops do): the op bodies below take these arguments in
# this order. ``window <= 0`` means no window, ``max_seqlen < 0`` derive it from cu_seqlens, ``softcap <= 0``
# no soft-cap.
_DEVICES = ("cuda", "cpu")
_FWD_SCHEMA = (
    "(Tensor q, Tensor k, Tensor v, bool causal, float sm_scale, SymInt window, Tensor? cu_seqlens, "
    "SymInt max_seqlen, Tensor? key_padding_mask, bool store_lse, float softcap) -> (Tensor, Tensor)"
)
_BWD_SCHEMA = (
    "(Tensor do, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, Tensor? dlse, bool causal, "
    "float sm_scale, SymInt window, Tensor? cu_seqlens, SymInt max_seqlen, Tensor? key_padding_mask, "
    "float softcap) -> (Tensor, Tensor, Tensor)"
)


def _attention_fwd(
    q, k, v, causal, sm_scale, window, cu_seqlens, max_seqlen, key_padding_mask, store_lse, softcap
):
    """Forward (:data:`_FWD_SCHEMA`): the Triton kernel or the CPU path (:mod:`asu_kernels._backend`
    decides). Returns ``out`` (like q) and ``lse`` (fp32, q's shape without D; an empty tensor when not
    stored)."""
    if backend(q) == "cpu":
        out, lse = _cpu.attention_forward(
            q, k, v, causal, sm_scale, window, cu_seqlens, key_padding_mask, softcap
        )  # fmt: skip
        return out, lse if store_lse else lse.new_empty(0)
    lay = _in.layout(q, k, cu_seqlens, max_seqlen)
    out = torch.empty_like(q)
    lse = torch.empty(tuple(q.shape[:-1]) if store_lse else (0,), dtype=torch.float32, device=q.device)
    if q.numel() == 0 or lay.batch == 0 or lay.max_q == 0:
        if store_lse:
            lse.fill_(float("-inf"))
        return out, lse
    hq, hkv, d = q.shape[1], k.shape[1], q.shape[-1]
    kpm, stride_pb, stride_pn = _kpm_args(key_padding_mask, q)
    lse_strides = _in.row_strides(lse, lay.varlen) if store_lse else (0, 0, 0)

    def grid(meta):
        return (triton.cdiv(lay.max_q, meta["BLOCK_M"]), hq, lay.batch)

    _fwd_kernel[grid](
        q, k, v, out, lse, kpm, _cu32(cu_seqlens, q),
        *_in.strides4(q, lay.varlen), *_in.strides4(k, lay.varlen), *_in.strides4(v, lay.varlen),
        *_in.strides4(out, lay.varlen), *lse_strides, stride_pb, stride_pn,
        lay.n_q, lay.n_k, hq // hkv, max(window, 0), _in.base2_scale(sm_scale),
        triton.next_power_of_2(max(lay.max_q, lay.max_k)),
        HEAD_DIM=d, BLOCK_D=_in.head_dim_block(d), CAUSAL=causal, HAS_WINDOW=window > 0,
        IS_VARLEN=lay.varlen, HAS_KPM=key_padding_mask is not None, STORE_LSE=store_lse,
        DOT_PRECISION=_in.dot_precision(q.dtype), SOFTCAP=_softcap_constexpr(softcap),
    )  # fmt: skip
    return out, lse


def _softcap_constexpr(softcap: float) -> float:
    """The kernels' ``SOFTCAP``: the cap as a compile-time float, 0.0 for none."""
    return float(softcap) if softcap > 0 else 0.0


_attention_fwd_op = torch.library.custom_op(
    "asu_kernels::attention_fwd", _attention_fwd, mutates_args=(), device_types=_DEVICES, schema=_FWD_SCHEMA
)


@_attention_fwd_op.register_fake
def _(q, k, v, causal, sm_scale, window, cu_seqlens, max_seqlen, key_padding_mask, store_lse, softcap):
    out = torch.empty_like(q)
    lse = q.new_empty(tuple(q.shape[:-1]) if store_lse else (0,), dtype=torch.float32)
    return out, lse


def _attention_bwd(
    do, q, k, v, out, lse, dlse, causal, sm_scale, window, cu_seqlens, max_seqlen, key_padding_mask, softcap
):
    """Backward (:data:`_BWD_SCHEMA`): on the Triton path the Delta preprocess, then the dK/dV and dQ kernels;
    on the CPU path :func:`asu_kernels._cpu_attention.attention_backward`. Returns (dq, dk, dv)."""
    if backend(q) == "cpu":
        return _cpu.attention_backward(
            do, q, k, v, out, lse, dlse, causal, sm_scale, window, cu_seqlens, key_padding_mask, softcap
        )  # fmt: skip
    lay = _in.layout(q, k, cu_seqlens, max_seqlen)
    dq = torch.empty_like(q)
    dk = torch.empty_like(k)
    dv = torch.empty_like(v)
    if q.numel() == 0 or lay.batch == 0 or lay.max_q == 0:
        return dq.zero_(), dk.zero_(), dv.zero_()
    hq, hkv, d = q.shape[1], k.shape[1], q.shape[-1]
    block_d = _in.head_dim_block(d)
    cu = _cu32(cu_seqlens, q)
    kpm, stride_pb, stride_pn = _kpm_args(key_padding_mask, q)
    delta = torch.empty_like(lse)
    lse_strides = _in.row_strides(lse, lay.varlen)
    dlse_t = dlse.contiguous() if dlse is not None else lse  # same layout as lse
    pre_m = 16 if interpreting() else PREPROCESS_BLOCK_M
    _k.attn_bwd_preprocess_kernel[(triton.cdiv(lay.max_q, pre_m), hq, lay.batch)](
        out, do, dlse_t, delta, cu,
        *_in.strides4(out, lay.varlen), *_in.strides4(do, lay.varlen), *lse_strides, lay.n_q,
        HEAD_DIM=d, BLOCK_D=block_d, IS_VARLEN=lay.varlen, HAS_DLSE=dlse is not None, BLOCK_M=pre_m,
        num_warps=4,
    )  # fmt: skip
    common = dict(
        HEAD_DIM=d, BLOCK_D=block_d, CAUSAL=causal, HAS_WINDOW=window > 0, IS_VARLEN=lay.varlen,
        HAS_KPM=key_padding_mask is not None, DOT_PRECISION=_in.dot_precision(q.dtype),
        SOFTCAP=_softcap_constexpr(softcap),
    )  # fmt: skip
    scalars = (lay.n_q, lay.n_k, hq // hkv, max(window, 0), sm_scale, _in.base2_scale(sm_scale))
    n_ctx_key = triton.next_power_of_2(max(lay.max_q, lay.max_k))

    def grid_kv(meta):
        return (triton.cdiv(lay.max_k, meta["BLOCK_N"]), hkv, lay.batch)

    _dkdv_kernel[grid_kv](
        q, k, v, do, dk, dv, lse, delta, kpm, cu,
        *_in.strides4(q, lay.varlen), *_in.strides4(k, lay.varlen), *_in.strides4(v, lay.varlen),
        *_in.strides4(do, lay.varlen), *_in.strides4(dk, lay.varlen), *_in.strides4(dv, lay.varlen),
        *lse_strides, stride_pb, stride_pn, *scalars, n_ctx_key, **common,
    )  # fmt: skip

    def grid_q(meta):
        return (triton.cdiv(lay.max_q, meta["BLOCK_M"]), hq, lay.batch)

    _dq_kernel[grid_q](
        q, k, v, do, dq, lse, delta, kpm, cu,
        *_in.strides4(q, lay.varlen), *_in.strides4(k, lay.varlen), *_in.strides4(v, lay.varlen),
        *_in.strides4(do, lay.varlen), *_in.strides4(dq, lay.varlen),
        *lse_strides, stride_pb, stride_pn, *scalars, n_ctx_key, **common,
    )  # fmt: skip
    return dq, dk, dv


_attention_bwd_op = torch.library.custom_op(
    "asu_kernels::attention_bwd", _attention_bwd, mutates_args=(), device_types=_DEVICES, schema=_BWD_SCHEMA
)


@_attention_bwd_op.register_fake
def _(
    do, q, k, v, out, lse, dlse, causal, sm_scale, window, cu_seqlens, max_seqlen, key_padding_mask, softcap
):
    return torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)


def _setup_context(ctx, inputs, output) -> None:
    q, k, v, causal, sm_scale, window, cu_seqlens, max_seqlen, key_padding_mask, store_lse, softcap = inputs
    out, lse = output
    ctx.save_for_backward(q, k, v, out, lse, cu_seqlens, key_padding_mask)
    ctx.causal, ctx.sm_scale, ctx.window, ctx.max_seqlen = causal, sm_scale, window, max_seqlen
    ctx.softcap = softcap


def _backward(ctx, dout, dlse):
    q, k, v, out, lse, cu_seqlens, key_padding_mask = ctx.saved_tensors
    if lse.numel() == 0 and q.numel() != 0:
        raise RuntimeError("attention backward needs the LSE: the forward ran without storing it")
    dq, dk, dv = _attention_bwd_op(
        dout, q, k, v, out, lse, dlse, ctx.causal, ctx.sm_scale, ctx.window, cu_seqlens, ctx.max_seqlen,
        key_padding_mask, ctx.softcap,
    )  # fmt: skip
    return dq, dk, dv, None, None, None, None, None, None, None, None


_attention_fwd_op.register_autograd(_backward, setup_context=_setup_context)


# Ahead-of-time compile specs -------------------------------------------------------------------------------

_TL_DTYPE = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32"}

# (head dim, dtype, causal, varlen, window, key padding, softcap): a representative set of launch variants.
# The first one is the H100 target (d = 128, bf16, causal); its autotune configs are the ``h100_candidate``
# ones. The soft-capped variants (Gemma-2: cap 50 with a sliding window on every other layer) compile the
# forward and both backward kernels with the cap; their preprocess kernel is the uncapped one.
AOT_VARIANTS: tuple[tuple[int, torch.dtype, bool, bool, bool, bool, float], ...] = (
    (128, torch.bfloat16, True, False, False, False, 0.0),
    (128, torch.float16, False, False, False, False, 0.0),
    (128, torch.bfloat16, True, True, True, False, 0.0),
    (64, torch.bfloat16, True, True, False, False, 0.0),
    (64, torch.float16, False, False, False, True, 0.0),
    (128, torch.bfloat16, True, False, False, False, 50.0),
    (128, torch.bfloat16, True, False, True, True, 50.0),
    (64, torch.float16, True, True, False, False, 30.0),
)


def _aot_signature(
    fn, pointers: dict[str, str], constexprs: dict, unit_strides: tuple[str, ...]
) -> tuple[dict[str, str], dict]:
    """Triton signature of ``fn`` as a real launch specialises it.

    Pointers and the non-unit strides carry 16-divisibility (true for head dims that are multiples of 16),
    the head-dim strides are the constant 1 (Triton specialises an int argument equal to 1), the lengths and
    scalars are plain i32/fp32.
    """
    sig: dict[str, str] = {}
    consts = dict(constexprs)
    for name in fn.arg_names:
        if name in consts:
            sig[name] = "constexpr"
        elif name in pointers:
            sig[name] = pointers[name]
        elif name in unit_strides:
            sig[name] = "constexpr"
            consts[name] = 1
        elif name in ("qk_scale", "sm_scale"):
            sig[name] = "fp32"
        else:
            sig[name] = "i32"
    return sig, consts


def aot_specs() -> list[AOTSpec]:
    """Every attention kernel (forward, backward preprocess, dK/dV, dQ) in every autotune config, for the
    variants of :data:`AOT_VARIANTS`; the configs the H100 autotuner may pick at d = 128 are flagged."""
    specs: list[AOTSpec] = []
    for variant in AOT_VARIANTS:
        specs += _tiled_specs(*variant)
        if not variant[-1]:  # the preprocess kernel has no logits, hence no cap
            specs.append(_preprocess_spec(*variant[:-1]))
    return specs


# kernel name in the report -> (kernel, autotune table, config_allowed kind)
_TILED_KERNELS = {
    "attn_fwd": (_k.attn_fwd_kernel, FWD_CONFIGS, "fwd"),
    "attn_bwd_dkdv": (_k.attn_bwd_dkdv_kernel, DKDV_CONFIGS, "dkdv"),
    "attn_bwd_dq": (_k.attn_bwd_dq_kernel, DQ_CONFIGS, "dq"),
}


def _variant_tag(
    d: int, dtype: torch.dtype, causal: bool, varlen: bool, window: bool, kpm: bool, softcap: float = 0.0
) -> str:
    tag = f"D={d},{_TL_DTYPE[dtype]}" + (",causal" if causal else "") + (",varlen" if varlen else "")
    return (
        tag
        + (",window" if window else "")
        + (",kpm" if kpm else "")
        + (f",softcap={softcap:g}" if softcap else "")
    )


def _is_h100_target(
    d: int, dtype: torch.dtype, causal: bool, varlen: bool, window: bool, kpm: bool, softcap: float = 0.0
) -> bool:
    return d == 128 and dtype == torch.bfloat16 and causal and not (varlen or window or kpm or softcap)


def _tiled_specs(
    d: int, dtype: torch.dtype, causal: bool, varlen: bool, window: bool, kpm: bool, softcap: float
) -> list[AOTSpec]:
    """The forward, dK/dV and dQ kernels of one variant in each config the pruner may keep."""
    el, block_d = _TL_DTYPE[dtype], _in.head_dim_block(d)
    tag = _variant_tag(d, dtype, causal, varlen, window, kpm, softcap)
    h100 = _is_h100_target(d, dtype, causal, varlen, window, kpm, softcap)
    # dense LSE rows are contiguous; packed LSE (total, H) strides rows by H
    unit = ("stride_pn",) + (() if varlen else ("stride_lm",))
    ptr = {n: f"*{el}" for n in ("Q", "K", "V", "O", "DO", "DK", "DV", "DQ")}
    ptr.update({"LSE": "*fp32", "DELTA": "*fp32", "KPM": "*u8", "CU_SEQLENS": "*i32"})
    specs = []
    for kname, (fn, table, kind) in _TILED_KERNELS.items():
        units = unit + tuple(n for n in fn.arg_names if n.startswith("stride_") and n.endswith("d"))
        for bm, bn, warps, stages in table:
            if not config_allowed(kind, bm, bn, warps, stages, block_d, dtype.itemsize, 227 * 1024):
                continue  # the pruner drops it on every GPU at every length
            meta = {
                "HEAD_DIM": d, "BLOCK_D": block_d, "CAUSAL": causal, "HAS_WINDOW": window,
                "IS_VARLEN": varlen, "HAS_KPM": kpm, "DOT_PRECISION": "tf32", "BLOCK_M": bm, "BLOCK_N": bn,
                "SOFTCAP": _softcap_constexpr(softcap),
            }  # fmt: skip
            if kind == "fwd":
                meta["STORE_LSE"] = True
            sig, consts = _aot_signature(fn, ptr, meta, units)
            name = f"{kname}[{tag},BLOCK_M={bm},BLOCK_N={bn},w{warps},s{stages}]"
            specs.append(AOTSpec(name, fn, sig, consts, warps, stages, h100))
    return specs


def _preprocess_spec(
    d: int, dtype: torch.dtype, causal: bool, varlen: bool, window: bool, kpm: bool
) -> AOTSpec:
    """The backward preprocess kernel (Delta) of one variant."""
    el, tag = _TL_DTYPE[dtype], _variant_tag(d, dtype, causal, varlen, window, kpm)
    fn = _k.attn_bwd_preprocess_kernel
    ptr = {"O": f"*{el}", "DO": f"*{el}", "DLSE": "*fp32", "DELTA": "*fp32", "CU_SEQLENS": "*i32"}
    meta = {"HEAD_DIM": d, "BLOCK_D": _in.head_dim_block(d), "IS_VARLEN": varlen, "HAS_DLSE": False}
    meta["BLOCK_M"] = PREPROCESS_BLOCK_M
    units = (() if varlen else ("stride_lm",)) + ("stride_od", "stride_dd")
    sig, consts = _aot_signature(fn, ptr, meta, units)
    name = f"attn_bwd_preprocess[{tag},BLOCK_M={PREPROCESS_BLOCK_M},w4]"
    return AOTSpec(name, fn, sig, consts, 4, 1, _is_h100_target(d, dtype, causal, varlen, window, kpm))


def aot_attrs(spec: AOTSpec) -> dict:
    """Argument attributes for compiling ``spec`` as a real launch would specialise it.

    Pointers (torch allocations) and the batch/head/row strides (multiples of the head dim) are
    16-divisible; lengths such as ``n_q`` are not assumed to be.
    """
    attrs = {}
    for i, name in enumerate(spec.fn.arg_names):
        kind = spec.signature.get(name, "")
        if kind.startswith("*") or (name.startswith("stride_") and kind == "i32"):
            attrs[(i,)] = [["tt.divisibility", 16]]
    return attrs
