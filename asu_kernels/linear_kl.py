"""Fused LM-head + KL(teacher || student) and fused LM-head + cross-entropy, never holding (M x V) logits.

Semantics are defined in :mod:`asu_kernels.reference` (``linear_kl``, ``linear_cross_entropy``):

* ``linear_kl = sum_i w_i KL(softmax(hT_i WT^T + bT) || softmax(hS_i WS^T + bS))``, ``w_i = 1/M`` by default;
* ``linear_cross_entropy = sum_i w_i (-log softmax(h_i W^T + b)[y_i])`` over rows with
  ``y_i != ignore_index``, ``w_i = 1/#valid`` by default.

Models whose logits are not ``h W^T + b``:

* final-logit soft-capping (Gemma-2's ``final_logit_softcapping``): the keyword ``softcap=c`` replaces every
  logit, student and teacher, by ``c * tanh(logit / c)`` inside the row kernels, and the gradient goes
  through the tanh;
* logit scaling (Cohere's ``logit_scale``, Granite's ``1 / logits_scaling``) has no parameter: since
  ``a (h W^T + b) = (a h) W^T + a b``, the caller scales the hidden states (and the bias) by ``a`` and
  autograd carries the factor into their gradients (:mod:`asu.losses` does). A scale is applied before the
  cap, as those models do.

Dtypes: the hidden states, heads and biases may differ (bf16 activations with an fp32 master-weight head).
:func:`_compute_dtype` picks one dtype for the matmuls (the autocast dtype inside ``torch.autocast``, else
the widest present); the softmax part accumulates in fp32, the loss is returned in fp32 and each gradient in
its input's own dtype.

How it runs
-----------
Rows with weight 0 (and ignored labels) are dropped first, so they cost nothing. The remaining rows are
processed in chunks of ``C`` rows, sized so one fp32 (C x V) buffer stays small (512 MiB on a GPU; on the
CPU an eighth of the student's hidden-state + weight bytes, between 256 KiB and 64 MiB). Per chunk:

1. logits ``S = h_c WS^T + bS`` and ``T = hT_c WT^T + bT`` with one cuBLAS matmul each (``torch.addmm``) into
   reused chunk buffers;
2. one row kernel (Triton on CUDA or under ``TRITON_INTERPRET=1``, in-place PyTorch otherwise) streams the
   vocabulary with an online log-sum-exp for both distributions, returns the per-row loss, and, when the
   student needs gradients, overwrites ``S`` with ``G = dL/dS / k = (w_i / k) (p_S - p_T)`` (CE:
   ``(w_i / k) (p - onehot(y))``), where ``k = max |w|`` keeps fp16 gradients clear of underflow;
3. ``grad_h[rows] = k G WS`` and ``grad_WS += G^T h_c`` (fp32 accumulator), ``grad_bS += G.sum(0)``; the
   accumulators are multiplied by ``k`` once at the end.

So the gradients are produced in the forward (as in Liger-Kernel); the backward only multiplies them by the
upstream gradient. The teacher side never receives gradients. Why cuBLAS for the matmuls and Triton only
for the softmax part: on an H100 at d=4096, V=128k the four GEMMs are ``8 M V d`` FLOPs (~34 TFLOP at
M=8192, ~55 ms at a realistic 650 TFLOP/s) while the row kernel moves ``5 C V`` bf16 values per chunk
(~10 GB in all, ~3 ms at 3.3 TB/s); a Triton GEMM fused with the softmax would save only that traffic but
would have to match cuBLAS's Hopper GEMMs to come out ahead, so the GEMMs stay in cuBLAS.

Both losses are ``torch.library.custom_op`` s with a fake implementation and ``register_autograd``, so
``torch.compile(fullgraph=True)`` traces them as single opaque nodes.
"""

from __future__ import annotations

import math

import torch

from asu_kernels import _linear_kl_kernels as kernels
from asu_kernels._aot import AOTSpec
from asu_kernels._backend import use_triton

__all__ = ["linear_kl", "linear_cross_entropy", "linear_cross_entropy_rows", "aot_specs"]

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)

# Chunk sizing. On the GPU a (C x V) fp32-sized buffer of 512 MiB gives C ~ 1024 rows at V = 128k: enough rows
# that the grad_W GEMM (which reads and writes the fp32 (V x d) accumulator once per chunk) is compute-bound,
# while two bf16 chunk buffers stay near 0.5 GB. On the CPU the budget follows the inputs, so the chunked
# path's extra memory stays a fraction of (hidden states + weights).
CUDA_CHUNK_BYTES = 512 * 2**20
CPU_CHUNK_BYTES_MIN = 256 * 2**10
CPU_CHUNK_BYTES_MAX = 64 * 2**20
# When grad_W must be accumulated from low-precision gradients without an fp32-output GEMM, it is done in
# vocabulary blocks so the temporary (block x d) product stays at most this large.
GRAD_W_BLOCK_BYTES = 64 * 2**20
# A low-precision head's fp32 gradient accumulator is kept in this many vocabulary slices, so the final cast
# to the head's dtype frees fp32 slice by slice: peak fp32 + 1/GRAD_W_SLICES of the bf16 copy, then the
# concatenation, instead of the full fp32 and bf16 copies at once.
GRAD_W_SLICES = 8

# Test hooks: force several chunks / vocabulary tiles on small shapes. None = automatic.
_chunk_rows_override: int | None = None
_block_v_override: int | None = None


# ----------------------------------------------------------------------------------------------------------
# Input checks
# ----------------------------------------------------------------------------------------------------------


def _require_tensor(name: str, t: object) -> torch.Tensor:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    return t


def _check_head(prefix: str, hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """hidden (M, d), weight (V, d), bias (V,) (their dtypes are checked by :func:`_compute_dtype`)."""
    for name, t in ((f"{prefix}hidden", hidden), (f"{prefix}weight", weight)):
        if t.dim() != 2:
            raise ValueError(f"{name} must be 2-D, got shape {tuple(t.shape)}")
    if hidden.shape[1] != weight.shape[1]:
        raise ValueError(
            f"{prefix}hidden has d={hidden.shape[1]} but {prefix}weight is (V, d)={tuple(weight.shape)}"
        )
    if weight.shape[0] < 1:
        raise ValueError(f"{prefix}weight has an empty vocabulary: shape {tuple(weight.shape)}")
    if bias is not None:
        if bias.shape != (weight.shape[0],):
            raise ValueError(
                f"{prefix}bias must have shape (V,)=({weight.shape[0]},), got {tuple(bias.shape)}"
            )


# ----------------------------------------------------------------------------------------------------------
# Mixed dtypes and autocast
# ----------------------------------------------------------------------------------------------------------

_FLOAT_BITS = {torch.float16: 16, torch.bfloat16: 16, torch.float32: 32, torch.float64: 64}


def _autocast_dtype(device: torch.device) -> torch.dtype | None:
    """The dtype ``torch.autocast`` computes matmuls in on this device type, or None when it is off."""
    try:
        if torch.is_autocast_enabled(device.type):
            return torch.get_autocast_dtype(device.type)
    except RuntimeError:  # a device type autocast does not know (meta, ...)
        pass
    return None


def _compute_dtype(named: dict[str, object]) -> torch.dtype:
    """The one floating dtype the LM-head matmuls of a fused loss run in.

    * Under ``torch.autocast`` for the tensors' device type: the autocast dtype, as ``F.linear`` would use
      (unless a float64 tensor is among them: autocast leaves float64 alone, so the rule below applies).
    * Otherwise the widest dtype present, so bf16 activations with an fp32 master-weight head compute in
      fp32. float16 and bfloat16 with nothing wider are refused: neither holds the other's values.

    The row kernels accumulate in fp32 (fp64 for float64) whatever this dtype is. ``named`` maps argument
    names to tensors (or None for absent biases).
    """
    present: dict[str, torch.Tensor] = {}
    for name, t in named.items():
        if t is None:
            continue
        t = _require_tensor(name, t)
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; supported: float16, bfloat16, float32, float64")
        present[name] = t
    dtypes = {t.dtype for t in present.values()}
    autocast = _autocast_dtype(next(iter(present.values())).device)
    if autocast is not None and torch.float64 not in dtypes:
        return autocast
    widest = max(dtypes, key=_FLOAT_BITS.__getitem__)
    if _FLOAT_BITS[widest] == 16 and len(dtypes) > 1:
        by_dtype = ", ".join(f"{name}: {t.dtype}" for name, t in present.items())
        raise TypeError(
            f"float16 and bfloat16 inputs cannot be mixed ({by_dtype}): neither dtype holds the other's "
            "values; cast them to one dtype or call the loss under torch.autocast"
        )
    return widest


def _no_autocast(device: torch.device) -> torch.autocast:
    """Autocast off inside the op bodies: their inputs already carry the compute dtype, and the fp32 row
    math (logsumexp, the KL dot products) must not be cast down again."""
    return torch.autocast(device.type, enabled=False)


def _in_compute_dtype(**named: object) -> tuple[torch.Tensor | None, ...]:
    """The tensors of ``named`` (in order) cast to :func:`_compute_dtype`; None stays None.

    A tensor passed twice (a shared LM head) is cast once. The casts are autograd ops, so gradients come
    back to each input in its own dtype.
    """
    dtype = _compute_dtype(named)
    cast: dict[int, torch.Tensor] = {}
    out = []
    for t in named.values():
        if t is not None and id(t) not in cast:
            cast[id(t)] = t.to(dtype)
        out.append(None if t is None else cast[id(t)])
    return tuple(out)


def _check_row_weights(weights: object | None, rows: int) -> None:
    if weights is None:
        return
    weights = _require_tensor("weights", weights)
    if weights.is_complex() or not (weights.is_floating_point() or weights.dtype == torch.bool):
        raise TypeError(f"weights must be a floating-point (or bool) tensor, got {weights.dtype}")
    if weights.shape != (rows,):
        raise ValueError(f"weights must have shape (M,)=({rows},), got {tuple(weights.shape)}")


def _check_devices(named: dict[str, torch.Tensor | None]) -> None:
    present = {k: v.device for k, v in named.items() if v is not None}
    if len(set(present.values())) > 1:
        raise ValueError(
            "all tensors must be on one device, got " + ", ".join(f"{k}: {d}" for k, d in present.items())
        )


def _check_finite(named: dict[str, torch.Tensor | None]) -> None:
    for name, t in named.items():
        if t is not None and t.is_floating_point() and not bool(torch.isfinite(t).all()):
            raise ValueError(f"{name} contains NaN or inf")


# ----------------------------------------------------------------------------------------------------------
# Shared chunk machinery
# ----------------------------------------------------------------------------------------------------------


def _acc_dtype(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def _triton_path(t: torch.Tensor) -> bool:
    # float64 has no Triton kernel configuration; it takes the (exact) PyTorch chunked path on any device.
    return t.dtype != torch.float64 and use_triton(t)


def _chunk_rows(n_rows: int, vocab: int, device: torch.device, input_bytes: int) -> int:
    if _chunk_rows_override is not None:
        return max(1, min(n_rows, int(_chunk_rows_override)))
    if device.type == "cuda":
        rows = CUDA_CHUNK_BYTES // (4 * vocab)
        if rows >= 128:
            rows = rows // 128 * 128  # whole GEMM tiles
    else:
        budget = min(CPU_CHUNK_BYTES_MAX, max(CPU_CHUNK_BYTES_MIN, input_bytes // 8))
        rows = budget // (4 * vocab)
    return max(1, min(n_rows, rows))


def _nbytes(*ts: torch.Tensor | None) -> int:
    return sum(t.numel() * t.element_size() for t in ts if t is not None)


def _logits_into(out: torch.Tensor, h: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None) -> None:
    """out (c, V) <- h (c, d) @ weight (V, d)^T + bias, in the inputs' dtype, then stored in out's dtype."""
    if out.dtype == h.dtype:
        if bias is None:
            torch.mm(h, weight.t(), out=out)
        else:
            torch.addmm(bias, h, weight.t(), out=out)
    else:
        # PyTorch path with fp16/bf16 inputs: the matmul runs in the input precision (as the reference does),
        # the softmax part in fp32.
        logits = h @ weight.t()
        out.copy_(logits if bias is None else logits + bias)


_FP32_OUT_ADDMM: dict[str, bool] = {}


def _fp32_out_addmm_works(device: torch.device) -> bool:
    """Whether ``aten::addmm.dtype_out`` (low-precision operands, fp32 accumulator in place) works here.

    Probed once per device type on a tiny case with the operand layouts used below, and checked against an
    fp32 computation, so a build without it (or with a wrong result) falls back to the blocked path.
    """
    key = device.type
    if key not in _FP32_OUT_ADDMM:
        ok = False
        try:
            gen = torch.Generator(device="cpu").manual_seed(0)
            g = torch.randn(3, 9, generator=gen).to(device=device, dtype=torch.bfloat16)[
                :, 2:7
            ]  # a column slice
            h = torch.randn(3, 2, generator=gen).to(device=device, dtype=torch.bfloat16)
            acc = torch.randn(5, 2, generator=gen).to(device)
            want = acc + g.float().t() @ h.float()
            torch.ops.aten.addmm.dtype_out(acc, g.t(), h, torch.float32, out=acc)
            ok = acc.dtype == torch.float32 and bool(torch.allclose(acc, want, rtol=1e-3, atol=1e-3))
        except (RuntimeError, NotImplementedError, TypeError):
            ok = False
        _FP32_OUT_ADDMM[key] = ok
    return _FP32_OUT_ADDMM[key]


def _accumulate_grad_weight(acc: torch.Tensor, g: torch.Tensor, h: torch.Tensor) -> None:
    """acc (V, d) += g (c, V)^T @ h (c, d), with acc in fp32 (fp64) whatever the dtype of g and h."""
    if g.dtype == acc.dtype:
        acc.addmm_(g.t(), h if h.dtype == acc.dtype else h.to(acc.dtype))
        return
    if h.dtype != g.dtype:
        h = h.to(g.dtype)
    if _fp32_out_addmm_works(acc.device):
        torch.ops.aten.addmm.dtype_out(acc, g.t(), h, torch.float32, out=acc)
        return
    # Blocked over the vocabulary so the low-precision temporary stays small; each block's product is
    # accumulated in fp32 inside the GEMM and rounded once before joining the fp32 accumulator.
    vocab, d = acc.shape
    block = max(1, GRAD_W_BLOCK_BYTES // max(1, d * g.element_size()))
    for v0 in range(0, vocab, block):
        v1 = min(vocab, v0 + block)
        acc[v0:v1].add_(torch.mm(g[:, v0:v1].t(), h))


class _GradWeight:
    """fp32 (fp64) accumulator of ``sum_chunks g^T h`` for a (V, d) head, held in vocabulary slices."""

    def __init__(self, weight: torch.Tensor, acc_dtype: torch.dtype):
        vocab, d = weight.shape
        # Same dtype as the head: one slice (the result is the accumulator itself, no cast, no copy).
        n = 1 if weight.dtype == acc_dtype else max(1, min(GRAD_W_SLICES, vocab))
        bounds = [round(i * vocab / n) for i in range(n + 1)]
        self.slices = [
            (v0, v1, torch.zeros(v1 - v0, d, dtype=acc_dtype, device=weight.device))
            for v0, v1 in zip(bounds[:-1], bounds[1:], strict=True)
        ]

    def add(self, g: torch.Tensor, h: torch.Tensor) -> None:
        """acc += g (c, V)^T @ h (c, d)."""
        for v0, v1, acc in self.slices:
            _accumulate_grad_weight(acc, g[:, v0:v1], h)

    def finish(self, scale: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        """``scale * acc`` in ``dtype`` as one (V, d) tensor; the accumulator is consumed."""
        if len(self.slices) == 1:
            acc = self.slices.pop()[2]
            return acc.mul_(scale).to(dtype)
        parts = []
        while self.slices:
            acc = self.slices.pop(0)[2]
            parts.append(acc.mul_(scale).to(dtype))
            del acc  # free this fp32 slice before casting the next
        return torch.cat(parts)


class _Rows:
    """Which rows of the (M, ...) inputs a chunk covers: a slice when every row is active, else indices."""

    def __init__(self, index: torch.Tensor | None, start: int, stop: int):
        self.index = None if index is None else index[start:stop]
        self.slice = slice(start, stop)

    def take(self, t: torch.Tensor) -> torch.Tensor:
        return t[self.slice] if self.index is None else t.index_select(0, self.index)

    def put(self, dst: torch.Tensor, src: torch.Tensor) -> None:
        if self.index is None:
            dst[self.slice].copy_(src)
        else:
            dst.index_copy_(0, self.index, src.to(dst.dtype))


def _active_rows(active: torch.Tensor | None, rows: int) -> tuple[torch.Tensor | None, int]:
    """(indices of active rows or None when all are, their count)."""
    if active is None:
        return None, rows
    index = active.nonzero().squeeze(1)
    count = index.numel()
    return (None, rows) if count == rows else (index, count)


def _grad_scale(w: torch.Tensor) -> torch.Tensor:
    """max |w_i| (1 when all are 0), a 0-dim tensor: the kernels write ``(w_i / scale) dL_i/dlogits``.

    Row weights are often ~1/M (1e-4 .. 1e-5); folded into fp16 logit gradients of size ~1/V they would
    underflow. Dividing by the largest weight keeps the stored gradients O(p), and the scale is applied to
    the small (c x d) / accumulated results instead. Stays on the device (no host sync).
    """
    if w.numel() == 0:
        return torch.ones((), dtype=w.dtype, device=w.device)
    scale = w.abs().max()
    return torch.where(scale > 0, scale, torch.ones_like(scale))


def _backprop_chunk(
    g: torch.Tensor,
    h: torch.Tensor,
    weight: torch.Tensor,
    rows: _Rows,
    grad_hidden: torch.Tensor | None,
    grad_weight_acc: _GradWeight | None,
    grad_bias_acc: torch.Tensor | None,
    grad_scale: torch.Tensor,
) -> None:
    """Turn the chunk's logit gradient ``grad_scale * g`` (g: (c, V)) into hidden / weight / bias gradients.

    grad_hidden rows are final here; the weight and bias accumulators collect ``g``-products and are
    multiplied by ``grad_scale`` once at the end (:func:`_finish_grads`).
    """
    if grad_hidden is not None:
        gh = torch.mm(g if g.dtype == weight.dtype else g.to(weight.dtype), weight)
        rows.put(grad_hidden, gh.to(grad_scale.dtype).mul_(grad_scale))
    if grad_weight_acc is not None:
        grad_weight_acc.add(g, h)
    if grad_bias_acc is not None:
        grad_bias_acc += g.sum(0, dtype=grad_bias_acc.dtype)


# ----------------------------------------------------------------------------------------------------------
# PyTorch row kernels (the CPU path): same math as the Triton kernels, in place on fp32/fp64 chunk buffers.
# With a ``softcap`` the logit buffers are capped first and the gradient is taken through the cap.
# ----------------------------------------------------------------------------------------------------------


def _soft_cap_(x: torch.Tensor, softcap: float | None, slope: bool) -> torch.Tensor | None:
    """In place ``x <- c tanh(x / c)`` (nothing without a cap); with ``slope``, returns ``1 - tanh^2(x / c)``,
    the derivative of the capped logits with respect to the uncapped ones."""
    if softcap is None:
        return None
    x.div_(softcap).tanh_()
    derivative = 1.0 - x * x if slope else None
    x.mul_(softcap)
    return derivative


def _weigh_logit_grad_(g: torch.Tensor, w: torch.Tensor, slope: torch.Tensor | None) -> None:
    """In place ``g <- w g`` (row weights), times the cap's ``slope`` when there is one: the gradient of each
    row's loss w.r.t. the capped logits becomes that of the weighted loss w.r.t. the uncapped ones."""
    g.mul_(w[:, None])
    if slope is not None:
        g.mul_(slope)


def _kl_rows_torch(
    s: torch.Tensor, t: torch.Tensor, w: torch.Tensor, compute_grad: bool, softcap: float | None = None
) -> torch.Tensor:
    """Per-row KL(softmax(t) || softmax(s)) of (c, V) buffers; with compute_grad, s <- w (p_S - p_T)."""
    slope = _soft_cap_(s, softcap, compute_grad)
    _soft_cap_(t, softcap, False)
    s.sub_(torch.logsumexp(s, dim=-1, keepdim=True))  # log p_S
    t.sub_(torch.logsumexp(t, dim=-1, keepdim=True))  # log p_T
    p_t = t.exp()
    t.sub_(s)  # log p_T - log p_S
    t.masked_fill_(p_t == 0, 0.0)  # 0 * log 0 = 0, also where a logit is -inf
    kl = torch.bmm(p_t.unsqueeze(1), t.unsqueeze(2)).view(-1)
    if compute_grad:
        _weigh_logit_grad_(s.exp_().sub_(p_t), w, slope)
    return kl


def _ce_rows_torch(
    x: torch.Tensor, y: torch.Tensor, w: torch.Tensor, compute_grad: bool, softcap: float | None = None
) -> torch.Tensor:
    """Per-row logsumexp(x) - x[y] of a (c, V) buffer; with compute_grad, x <- w (softmax(x) - onehot(y))."""
    slope = _soft_cap_(x, softcap, compute_grad)
    lse = torch.logsumexp(x, dim=-1)
    loss = lse - x.gather(1, y[:, None]).squeeze(1)
    if compute_grad:
        x.sub_(lse[:, None]).exp_()
        x.scatter_add_(1, y[:, None], torch.full_like(lse[:, None], -1.0))
        _weigh_logit_grad_(x, w, slope)
    return loss


# ----------------------------------------------------------------------------------------------------------
# Forward passes (loss and gradients); the bodies of the custom ops
# ----------------------------------------------------------------------------------------------------------


def _new_grads(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    need_h: bool,
    need_w: bool,
    need_b: bool,
    acc_dtype: torch.dtype,
) -> tuple[torch.Tensor | None, _GradWeight | None, torch.Tensor | None]:
    grad_h = torch.zeros(hidden.shape, dtype=hidden.dtype, device=hidden.device) if need_h else None
    grad_w = _GradWeight(weight, acc_dtype) if need_w else None
    grad_b = (
        torch.zeros(weight.shape[0], dtype=acc_dtype, device=weight.device)
        if need_b and bias is not None
        else None
    )
    return grad_h, grad_w, grad_b


def _finish_grads(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    grad_h: torch.Tensor | None,
    grad_w: _GradWeight | None,
    grad_b: torch.Tensor | None,
    grad_scale: torch.Tensor,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Cast accumulators to the parameter dtypes; absent gradients become empty (0,) tensors.

    Each absent gradient gets its own empty tensor: custom-op outputs may not alias one another.
    """
    out_h = hidden.new_empty((0,)) if grad_h is None else grad_h
    out_w = hidden.new_empty((0,)) if grad_w is None else grad_w.finish(grad_scale, weight.dtype)
    out_b = hidden.new_empty((0,)) if grad_b is None else grad_b.mul_(grad_scale).to(bias.dtype)
    return out_h, out_w, out_b


def _chunked_loss(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    w: torch.Tensor,
    active: torch.Tensor | None,
    need: tuple[bool, bool, bool],
    n_buffers: int,
    chunk_loss,
    rows_out: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """The chunk loop of both losses: ``(loss, grad_hidden, grad_weight, grad_bias)`` of ``sum_i w_i L_i``.

    ``w`` (M,) are the row weights in the accumulation dtype and ``active`` the rows to compute (None: all).
    For each chunk of rows, ``chunk_loss(rows, h, buffers, w_scaled, loss_out, on_triton, compute_grad)``
    fills the ``n_buffers`` (c, V) logit buffers from the chunk's hidden states ``h``, returns the per-row
    losses and, with ``compute_grad``, leaves the logit gradient ``w_scaled * dL/dlogits`` in
    ``buffers[0]``; the student head (``hidden``, ``weight``, ``bias``) gets the gradients ``need`` asks for.
    ``rows_out`` (M,), when given, receives every active row's own loss ``L_i`` (unweighted).
    """
    rows, vocab = hidden.shape[0], weight.shape[0]
    device = hidden.device
    acc = _acc_dtype(hidden.dtype)
    on_triton = _triton_path(hidden)
    index, n_active = _active_rows(active, rows)
    grad_h, grad_w, grad_b = _new_grads(hidden, weight, bias, *need, acc)
    compute_grad = grad_h is not None or grad_w is not None or grad_b is not None
    grad_scale = _grad_scale(w)
    total = torch.zeros((), dtype=acc, device=device)
    if n_active > 0:
        chunk = _chunk_rows(n_active, vocab, device, _nbytes(hidden, weight))
        buf_dtype = hidden.dtype if on_triton else acc
        buffers = [torch.empty((chunk, vocab), dtype=buf_dtype, device=device) for _ in range(n_buffers)]
        loss_buf = torch.empty(chunk, dtype=torch.float32, device=device)
        for start in range(0, n_active, chunk):
            stop = min(n_active, start + chunk)
            sel = _Rows(index, start, stop)
            c = stop - start
            h, w_c, x = sel.take(hidden), sel.take(w), [buf[:c] for buf in buffers]
            per_row = chunk_loss(sel, h, x, w_c / grad_scale, loss_buf[:c], on_triton, compute_grad)
            total += (w_c * per_row.to(acc)).sum()
            if rows_out is not None:
                sel.put(rows_out, per_row.to(rows_out.dtype))
            if compute_grad:
                _backprop_chunk(x[0], h, weight, sel, grad_h, grad_w, grad_b, grad_scale)
        del buffers, x  # free the chunk buffers before the gradients are cast
    # The loss stays in the accumulation dtype (fp32, fp64 for float64 inputs), as Liger-Kernel returns it.
    return (total, *_finish_grads(hidden, weight, bias, grad_h, grad_w, grad_b, grad_scale))


def _linear_kl_forward(
    student_hidden, student_weight, teacher_hidden, teacher_weight, weights, student_bias, teacher_bias,
    need_h, need_w, need_b, check, softcap=None,
):  # fmt: skip
    """Body of the KL op (:data:`_KL_SCHEMA`): ``(loss, grad_hidden, grad_weight, grad_bias)``."""
    if check:
        _check_finite(
            {
                "student_hidden": student_hidden,
                "student_weight": student_weight,
                "teacher_hidden": teacher_hidden,
                "teacher_weight": teacher_weight,
                "weights": weights,
                "student_bias": student_bias,
                "teacher_bias": teacher_bias,
            }
        )
    rows = student_hidden.shape[0]
    acc = _acc_dtype(student_hidden.dtype)
    if weights is None:
        w = torch.full((rows,), 1.0 / max(rows, 1), dtype=acc, device=student_hidden.device)
        active = None
    else:
        w = weights.to(acc)
        active = w != 0

    def kl_chunk(sel, h_s, buffers, w_scaled, loss_out, on_triton, compute_grad):
        s, t = buffers
        _logits_into(s, h_s, student_weight, student_bias)
        _logits_into(t, sel.take(teacher_hidden), teacher_weight, teacher_bias)
        if not on_triton:
            return _kl_rows_torch(s, t, w_scaled, compute_grad, softcap)
        per_row = loss_out.fill_(math.nan)  # poison: an unwritten row would show as NaN
        kernels.launch_kl_rows(s, t, w_scaled, per_row, compute_grad, _block_v_override, softcap)
        return per_row

    need = (need_h, need_w, need_b)
    with _no_autocast(student_hidden.device):
        return _chunked_loss(student_hidden, student_weight, student_bias, w, active, need, 2, kl_chunk)


def _ce_labels_and_weights(
    labels: torch.Tensor, ignore_index: int, vocab: int, weights: torch.Tensor | None, acc: torch.dtype
) -> torch.Tensor:
    """The row weights of the cross-entropy (0 on ignored rows; ``1/#valid`` each without ``weights``);
    ValueError for a label outside ``[0, V)`` that is not ``ignore_index``."""
    valid = labels != ignore_index
    out_of_range = valid & ((labels < 0) | (labels >= vocab))
    if bool(out_of_range.any()):
        bad = labels[out_of_range][:5].tolist()
        raise ValueError(
            f"labels must be in [0, V={vocab}) or equal ignore_index={ignore_index}; got e.g. {bad}"
        )
    if weights is None:
        return valid.to(acc) / valid.sum().clamp(min=1).to(acc)
    return weights.to(acc) * valid.to(acc)


def _ce_chunk_loss(labels: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, softcap):
    """The cross-entropy's per-chunk step for :func:`_chunked_loss`."""

    def ce_chunk(sel, h, buffers, w_scaled, loss_out, on_triton, compute_grad):
        (x,) = buffers
        y = sel.take(labels).to(torch.int64)
        _logits_into(x, h, weight, bias)
        if not on_triton:
            return _ce_rows_torch(x, y, w_scaled, compute_grad, softcap)
        per_row = loss_out.fill_(math.nan)
        kernels.launch_ce_rows(x, y.contiguous(), w_scaled, per_row, compute_grad, _block_v_override, softcap)
        return per_row

    return ce_chunk


def _linear_ce_forward(
    hidden, weight, labels, ignore_index, weights, bias, need_h, need_w, need_b, check, softcap=None
):
    """Body of the cross-entropy op (:data:`_CE_SCHEMA`): ``(loss, grad_hidden, grad_weight, grad_bias)``."""
    if check:
        _check_finite({"hidden": hidden, "weight": weight, "weights": weights, "bias": bias})
    w = _ce_labels_and_weights(labels, ignore_index, weight.shape[0], weights, _acc_dtype(hidden.dtype))
    ce_chunk = _ce_chunk_loss(labels, weight, bias, softcap)
    with _no_autocast(hidden.device):
        return _chunked_loss(hidden, weight, bias, w, w != 0, (need_h, need_w, need_b), 1, ce_chunk)


# ----------------------------------------------------------------------------------------------------------
# Custom ops + autograd
# ----------------------------------------------------------------------------------------------------------

_KL_SCHEMA = (
    "(Tensor student_hidden, Tensor student_weight, Tensor teacher_hidden, Tensor teacher_weight, "
    "Tensor? weights, Tensor? student_bias, Tensor? teacher_bias, bool need_grad_hidden, "
    "bool need_grad_weight, bool need_grad_bias, bool check, float? softcap) "
    "-> (Tensor, Tensor, Tensor, Tensor)"
)
_CE_SCHEMA = (
    "(Tensor hidden, Tensor weight, Tensor labels, int ignore_index, Tensor? weights, Tensor? bias, "
    "bool need_grad_hidden, bool need_grad_weight, bool need_grad_bias, bool check, float? softcap) "
    "-> (Tensor, Tensor, Tensor, Tensor)"
)


# The op bodies are the forward functions above; they return (loss, grad_hidden, grad_weight, grad_bias) with
# absent gradients as empty (0,) tensors (a custom op cannot return None).
_linear_kl_op = torch.library.custom_op(
    "asu_kernels::linear_kl_fused", _linear_kl_forward, mutates_args=(), schema=_KL_SCHEMA
)
_linear_ce_op = torch.library.custom_op(
    "asu_kernels::linear_cross_entropy_fused", _linear_ce_forward, mutates_args=(), schema=_CE_SCHEMA
)


@_linear_kl_op.register_fake
def _linear_kl_fake(
    s_hidden, s_weight, t_hidden, t_weight, weights, s_bias, t_bias, need_h, need_w, need_b, check, softcap
):
    return _fake_outputs(s_hidden, s_weight, s_bias, need_h, need_w, need_b)


@_linear_ce_op.register_fake
def _linear_ce_fake(
    hidden, weight, labels, ignore_index, weights, bias, need_h, need_w, need_b, check, softcap
):
    return _fake_outputs(hidden, weight, bias, need_h, need_w, need_b)


def _fake_outputs(hidden, weight, bias, need_h: bool, need_w: bool, need_b: bool):
    return (
        hidden.new_empty((), dtype=_acc_dtype(hidden.dtype)),
        hidden.new_empty(hidden.shape) if need_h else hidden.new_empty((0,)),
        weight.new_empty(weight.shape) if need_w else hidden.new_empty((0,)),
        bias.new_empty(bias.shape) if need_b and bias is not None else hidden.new_empty((0,)),
    )


def _save_grads(ctx, inputs, output) -> None:
    _, grad_h, grad_w, grad_b = output
    ctx.save_for_backward(grad_h, grad_w, grad_b)
    # Only the loss is differentiable, and autograd must not build zero "incoming gradients" for the
    # gradient outputs: a (V x d) block of zeros would double the backward's peak memory.
    ctx.mark_non_differentiable(grad_h, grad_w, grad_b)
    ctx.set_materialize_grads(False)


def _scaled(grad: torch.Tensor, upstream: torch.Tensor) -> torch.Tensor | None:
    """The saved gradient times the upstream gradient, in place.

    In place because an out-of-place product would hold a second copy of grad_W (as large as the LM head)
    at the peak. Autograd's version counter guards the saved tensor: a second backward through the same
    loss (retain_graph=True) raises instead of reusing scaled gradients. Under torch.compile the product
    is functionalised (out of place) by AOTAutograd.
    """
    # Empty (0,) means "not computed": that input did not require a gradient.
    if grad.numel() == 0 and grad.dim() == 1:
        return None
    return grad.mul_(upstream.to(grad.dtype))


def _grads_from_forward(n_inputs: int):
    """Backward of an op whose forward already computed the gradients of inputs 0 (hidden), 1 (weight) and
    5 (bias): scale them by the upstream gradient; every other input gets none."""

    def backward(ctx, grad_loss, *_unused):
        grads: list[torch.Tensor | None] = [None] * n_inputs
        if grad_loss is None:  # nothing flowed into the loss (grads are not materialised)
            return tuple(grads)
        grad_h, grad_w, grad_b = ctx.saved_tensors
        grads[0], grads[1], grads[5] = (_scaled(g, grad_loss) for g in (grad_h, grad_w, grad_b))
        return tuple(grads)

    return backward


_linear_kl_backward = _grads_from_forward(12)
_linear_ce_backward = _grads_from_forward(11)


_linear_kl_op.register_autograd(_linear_kl_backward, setup_context=_save_grads)
_linear_ce_op.register_autograd(_linear_ce_backward, setup_context=_save_grads)


# ----------------------------------------------------------------------------------------------------------
# Public entry points
# ----------------------------------------------------------------------------------------------------------


def _wants_grad(t: torch.Tensor | None) -> bool:
    return t is not None and t.requires_grad and torch.is_grad_enabled()


def _detach(t: torch.Tensor | None) -> torch.Tensor | None:
    return None if t is None else t.detach()


def _check_softcap(softcap: object) -> float | None:
    """None, or a finite number > 0 (the final-logit soft-cap), as a float."""
    if softcap is None:
        return None
    if isinstance(softcap, bool) or not isinstance(softcap, (int, float)):
        raise TypeError(f"softcap must be None or a number, got {type(softcap).__name__}")
    if not math.isfinite(softcap) or softcap <= 0:
        raise ValueError(f"softcap must be a finite number > 0 (or None for no cap), got {softcap}")
    return float(softcap)


def _check_kl_inputs(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    student_bias: torch.Tensor | None,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    teacher_bias: torch.Tensor | None,
    weights: torch.Tensor | None,
) -> None:
    """Shapes and devices of :func:`linear_kl`'s inputs: each head matches its hidden states, both heads have
    the same vocabulary, both sides the same rows, and everything lies on one device."""
    _check_head("student_", student_hidden, student_weight, student_bias)
    _check_head("teacher_", teacher_hidden, teacher_weight, teacher_bias)
    if student_weight.shape[0] != teacher_weight.shape[0]:
        raise ValueError(
            f"vocabulary sizes differ: student_weight has V={student_weight.shape[0]}, "
            f"teacher_weight has V={teacher_weight.shape[0]}"
        )
    if student_hidden.shape[0] != teacher_hidden.shape[0]:
        raise ValueError(
            f"student_hidden has M={student_hidden.shape[0]} rows "
            f"but teacher_hidden has {teacher_hidden.shape[0]}"
        )
    _check_row_weights(weights, student_hidden.shape[0])
    _check_devices(
        {
            "student_hidden": student_hidden,
            "student_weight": student_weight,
            "teacher_hidden": teacher_hidden,
            "teacher_weight": teacher_weight,
            "weights": weights,
            "student_bias": student_bias,
            "teacher_bias": teacher_bias,
        }
    )


def linear_kl(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    weights: torch.Tensor | None = None,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    check: bool = False,
    *,
    softcap: float | None = None,
) -> torch.Tensor:
    """``sum_i w_i KL(softmax(hT_i WT^T + bT) || softmax(hS_i WS^T + bS))`` without materialising logits.

    Args:
        student_hidden: (M, d_S). student_weight: (V, d_S).
        teacher_hidden: (M, d_T). teacher_weight: (V, d_T) (may be ``student_weight`` itself).
        weights: (M,) row weights carrying mask and normalisation; None = ``1/M`` each. Rows with weight 0
            cost nothing. No gradient flows to ``weights``.
        student_bias, teacher_bias: optional (V,).
        check: also raise ValueError when any input holds NaN or inf (one reduction per input).
        softcap: final-logit soft-cap ``c > 0``: both distributions are ``softmax(c tanh((h W^T + b) / c))``
            (Gemma-2's ``final_logit_softcapping``); None = plain logits. A logit scale is folded into the
            hidden states and bias by the caller (module docstring).

    The hidden states, heads and biases may mix fp16/bf16/fp32/fp64: the matmuls run in the
    ``torch.autocast`` dtype inside autocast, else in the widest dtype present (fp16 with bf16 alone is
    refused); the softmax and the sums accumulate in fp32.

    Returns:
        The scalar loss in fp32 (fp64 when computed in fp64). Gradients flow to ``student_hidden``,
        ``student_weight`` and ``student_bias`` only, each in that input's own dtype (the teacher side is
        treated as constant).
    """
    softcap = _check_softcap(softcap)
    student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias = (
        _in_compute_dtype(
            student_hidden=student_hidden,
            student_weight=student_weight,
            student_bias=student_bias,
            teacher_hidden=teacher_hidden,
            teacher_weight=teacher_weight,
            teacher_bias=teacher_bias,
        )
    )
    _check_kl_inputs(
        student_hidden, student_weight, student_bias, teacher_hidden, teacher_weight, teacher_bias, weights
    )
    loss, _, _, _ = _linear_kl_op(
        student_hidden,
        student_weight,
        teacher_hidden.detach(),
        teacher_weight.detach(),
        _detach(weights),
        student_bias,
        _detach(teacher_bias),
        _wants_grad(student_hidden),
        _wants_grad(student_weight),
        _wants_grad(student_bias),
        bool(check),
        softcap,
    )
    return loss


def _check_ce_inputs(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    bias: torch.Tensor | None,
    labels: object,
    ignore_index: object,
    weights: torch.Tensor | None,
) -> None:
    """Shapes, types and devices of the cross-entropy's inputs (hidden, head and bias already cast)."""
    _check_head("", hidden, weight, bias)
    labels = _require_tensor("labels", labels)
    if labels.dtype == torch.bool or labels.is_floating_point() or labels.is_complex():
        raise TypeError(f"labels must be an integer tensor, got {labels.dtype}")
    if labels.shape != (hidden.shape[0],):
        raise ValueError(f"labels must have shape (M,)=({hidden.shape[0]},), got {tuple(labels.shape)}")
    if isinstance(ignore_index, bool) or not isinstance(ignore_index, int):
        raise TypeError(f"ignore_index must be an int, got {type(ignore_index).__name__}")
    _check_row_weights(weights, hidden.shape[0])
    _check_devices({"hidden": hidden, "weight": weight, "labels": labels, "weights": weights, "bias": bias})


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    weights: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    check: bool = False,
    *,
    softcap: float | None = None,
) -> torch.Tensor:
    """``sum_i w_i (-log softmax(h_i W^T + b)[y_i])`` over rows with ``y_i != ignore_index``, no logits held.

    Args:
        hidden: (M, d). weight: (V, d). labels: (M,) integer, each in ``[0, V)`` or equal to
            ``ignore_index``. weights: (M,) row weights; None = mean over the non-ignored rows (0 when every
            row is ignored). bias: optional (V,).
        check: also raise ValueError when any input holds NaN or inf.
        softcap: final-logit soft-cap ``c > 0``: the logits are ``c tanh((h W^T + b) / c)``; None = plain.

    hidden, weight and bias may mix fp16/bf16/fp32/fp64, resolved as in :func:`linear_kl` (autocast dtype,
    else the widest; softmax and sums in fp32).

    Returns:
        The scalar loss in fp32 (fp64 when computed in fp64); gradients flow to hidden, weight and bias,
        each in that input's own dtype.
    """
    softcap = _check_softcap(softcap)
    hidden, weight, bias = _in_compute_dtype(hidden=hidden, weight=weight, bias=bias)
    _check_ce_inputs(hidden, weight, bias, labels, ignore_index, weights)
    loss, _, _, _ = _linear_ce_op(
        hidden,
        weight,
        labels,
        ignore_index,
        _detach(weights),
        bias,
        _wants_grad(hidden),
        _wants_grad(weight),
        _wants_grad(bias),
        bool(check),
        softcap,
    )
    return loss


# fmt: off
@torch.no_grad()
def linear_cross_entropy_rows(
    hidden: torch.Tensor, weight: torch.Tensor, labels: torch.Tensor, ignore_index: int = -100,
    bias: torch.Tensor | None = None, *, softcap: float | None = None,
) -> torch.Tensor:
    # fmt: on
    """Every row's own ``-log softmax(h_i W^T + b)[y_i]``, (M,) fp32 (fp64 for float64 inputs), 0 on rows
    whose label is ``ignore_index``; no gradient, no (M x V) logits held.

    The per-token probabilities ``p_i = exp(-L_i)`` that weighted objectives (WGA, SatImp, CE-U, UNDIAL's
    teacher) build their detached row weights from, computed by the same chunk loop and row kernels as
    :func:`linear_cross_entropy` (Triton on CUDA / under the interpreter, PyTorch otherwise). Arguments as
    there.
    """
    softcap = _check_softcap(softcap)
    hidden, weight, bias = _in_compute_dtype(hidden=hidden, weight=weight, bias=bias)
    _check_ce_inputs(hidden, weight, bias, labels, ignore_index, None)
    acc = _acc_dtype(hidden.dtype)
    valid = labels != ignore_index
    w = _ce_labels_and_weights(labels, ignore_index, weight.shape[0], valid.to(acc), acc)
    out = torch.zeros(hidden.shape[0], dtype=acc, device=hidden.device)
    ce_chunk = _ce_chunk_loss(labels, weight, bias, softcap)
    with _no_autocast(hidden.device):
        _chunked_loss(hidden, weight, bias, w, valid, (False, False, False), 1, ce_chunk, rows_out=out)
    return out


# ----------------------------------------------------------------------------------------------------------
# Ahead-of-time compile specs
# ----------------------------------------------------------------------------------------------------------

_AOT_DTYPES = {torch.float32: "fp32", torch.bfloat16: "bf16", torch.float16: "fp16"}


def aot_specs() -> list[AOTSpec]:
    """Every Triton configuration :func:`linear_kl` / :func:`linear_cross_entropy` may launch.

    Both row kernels x logits-buffer dtype (fp32, bf16, fp16) x with/without the gradient pass x the two
    vocabulary tiles of :func:`asu_kernels._linear_kl_kernels.tile_for`, without a soft-cap; and the bf16
    gradient-pass ones with Gemma-2's final-logit cap of 30.
    """
    specs: list[AOTSpec] = []
    tiles = (kernels.SMALL_TILE, kernels.LARGE_TILE)
    for ty in _AOT_DTYPES.values():
        row_kernels = (
            ("linear_kl_rows", kernels.kl_rows_kernel, {"s_ptr": f"*{ty}", "t_ptr": f"*{ty}"}),
            ("linear_ce_rows", kernels.ce_rows_kernel, {"x_ptr": f"*{ty}", "y_ptr": "*i64"}),
        )
        for grad in (True, False):
            for block_v, warps in tiles:
                tag = f"{ty},grad={int(grad)},BLOCK_V={block_v},w{warps}"
                common = {"w_ptr": "*fp32", "loss_ptr": "*fp32", "V": "i32"}
                consts = {"COMPUTE_GRAD": grad, "BLOCK_V": block_v, "SOFTCAP": 0.0}
                flags = {"COMPUTE_GRAD": "constexpr", "BLOCK_V": "constexpr", "SOFTCAP": "constexpr"}
                specs += [
                    AOTSpec(
                        name=f"{name}[{tag}]",
                        fn=fn,
                        signature={**inputs, **common, **flags},
                        constexprs=consts,
                        num_warps=warps,
                        num_stages=kernels.NUM_STAGES,
                        h100_candidate=block_v == kernels.LARGE_TILE[0],
                    )
                    for name, fn, inputs in row_kernels
                ]
    return specs + _softcap_specs(specs)


def _softcap_specs(specs: list[AOTSpec]) -> list[AOTSpec]:
    """The bf16 gradient-pass specs again with Gemma-2's final-logit soft-cap (30) compiled in."""
    capped = []
    for spec in specs:
        if spec.constexprs["COMPUTE_GRAD"] and "[bf16," in spec.name:
            name = spec.name[:-1] + ",softcap=30]"
            consts = {**spec.constexprs, "SOFTCAP": 30.0}
            capped.append(AOTSpec(name, spec.fn, spec.signature, consts, spec.num_warps, spec.num_stages,
                                  spec.h100_candidate))  # fmt: skip
    return capped
