"""Triton helpers shared by the kernel families (attention, attention-map KL, vocabulary losses).

Each helper is one rule that the kernel families share; ``@triton.jit`` helpers are inlined into the
kernels that call them, so sharing them costs nothing at run time.

* :func:`mma`: a dot product at the precision the host chose (``DOT_PRECISION``).
* :func:`document_bounds`: where a program's sequence starts and how long it is (dense or packed batch).
* :func:`visible`: which keys a query sees (the bounds, bottom-right aligned causal mask, sliding window);
  :func:`key_kept` adds the key-padding mask. The host-side definition of the same rule is
  :func:`asu_kernels.reference.attention_mask`.
* :func:`key_block_ranges` / :func:`query_block_ranges`: which blocks of the other side a block of queries
  (keys) visits, split into the masked and the mask-free stages of the three-stage loops.
* :func:`soft_cap`: logit soft-capping ``c * tanh(s / c)`` (natural or base-2 logits), and the tanh its
  gradient needs.
"""

from __future__ import annotations

import triton
import triton.language as tl

# Base-2 conversions of the online softmax. Kernels read them as constexpr globals; host code takes floats.
LOG2E: tl.constexpr = tl.constexpr(1.4426950408889634)
LN2: tl.constexpr = tl.constexpr(0.6931471805599453)


@triton.jit
def mma(a, b, acc, DOT_PRECISION: tl.constexpr):
    """``a @ b (+ acc)`` with fp32 accumulation (``acc=None``: no accumulator).

    ``DOT_PRECISION`` is ``"tf32"`` (fp16/bf16 operands: tensor cores), ``"ieee"`` (fp32 operands kept exact)
    or ``"fp32_operands"``: the dot of fp32 copies, used for bf16 under the Triton 3.6 interpreter, whose bf16
    dot multiplies the raw 16-bit patterns. A bf16 x bf16 product is exact in fp32, so the result equals
    the tensor-core one up to summation order. The host picks it with ``asu_kernels._inputs.dot_precision``.
    """
    if DOT_PRECISION == "fp32_operands":
        out = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        out = tl.dot(a, b, acc, input_precision=DOT_PRECISION)
    return out


@triton.jit
def soft_cap(x, CAP: tl.constexpr):
    """Soft-capped logits ``(CAP * tanh(x / CAP), tanh(x / CAP))``, ``x`` and ``CAP`` in the same units.

    The attention kernels keep base-2 logits ``log2(e) s`` and pass ``CAP = log2(e) c``; the vocabulary
    kernels pass natural logits and ``c``. ``tanh(u) = 2 / (1 + exp(-2u)) - 1`` with one exp2, saturating to
    +-1 for large ``|u|`` (exp2 overflows to inf or underflows to 0), never NaN for finite ``x`` (an ``x`` of
    -inf gives ``-CAP``: mask after capping). The absolute error of the tanh stays at fp32 rounding (~1e-7).
    The derivative of the capped logit with respect to ``x`` is ``1 - tanh^2``, the second value.
    """
    t = 2.0 / (1.0 + tl.math.exp2(x * (-2.0 * LOG2E / CAP))) - 1.0
    return t * CAP, t


@triton.jit
def document_bounds(CU_SEQLENS, batch, n_q, n_k, IS_VARLEN: tl.constexpr):
    """``(start, seqlen_q, seqlen_k)`` of sequence ``batch``.

    Dense: start 0 and the call's lengths. Packed (varlen): document ``batch`` owns rows
    ``cu_seqlens[batch] : cu_seqlens[batch + 1]`` of the packed tensors, as queries and as keys.
    """
    if IS_VARLEN:
        start = tl.load(CU_SEQLENS + batch)
        seqlen_q = tl.load(CU_SEQLENS + batch + 1) - start
        seqlen_k = seqlen_q
    else:
        start = 0
        seqlen_q = n_q
        seqlen_k = n_k
    return start, seqlen_q, seqlen_k


@triton.jit
def visible(i, j, seqlen_q, seqlen_k, diag, window, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr):
    """Whether query ``i`` sees key ``j`` (broadcastable index tensors), the sequence bounds included.

    ``diag = seqlen_k - seqlen_q`` aligns the masks bottom-right: causal keeps ``j <= i + diag``, a window
    of ``W`` keeps ``i + diag - j < W`` (the query's own position and the ``W - 1`` keys before it).
    """
    ok = (i < seqlen_q) & (j < seqlen_k)
    if CAUSAL:
        ok = ok & (j <= i + diag)
    if HAS_WINDOW:
        ok = ok & (i + diag - j < window)
    return ok


@triton.jit
def key_kept(kpm_row, offs_n, stride_pn, seqlen_k, CHECK_BOUNDS: tl.constexpr):
    """Key padding: True where key ``offs_n`` is a real token (its byte in the uint8 mask row is nonzero).

    ``CHECK_BOUNDS`` guards the load for keys at or past ``seqlen_k`` (which then read as padding).
    """
    if CHECK_BOUNDS:
        kp = tl.load(kpm_row + offs_n * stride_pn, mask=offs_n < seqlen_k, other=0)
    else:
        kp = tl.load(kpm_row + offs_n * stride_pn)
    return kp != 0


@triton.jit
def key_block_ranges(
    m0, seqlen_k, diag, window,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Key blocks seen by query rows ``[m0, m0 + BLOCK_M)``: masked ``[lo, a)``, mask-free ``[a, b)``, masked
    ``[b, hi)``.

    Blocks outside ``[lo, hi)`` hold no key any row sees (below the window, past the causal diagonal).
    Every row sees every key of ``[a, b)`` (only key padding may still hide some); ``[lo, a)`` is cut by
    the window's lower edge, ``[b, hi)`` by the causal diagonal or the ragged end of the sequence.
    """
    hi = seqlen_k
    if CAUSAL:
        hi = tl.minimum(hi, m0 + BLOCK_M + diag)
    lo = 0
    full_lo = 0
    if HAS_WINDOW:
        lo = tl.maximum(m0 + diag - window + 1, 0) // BLOCK_N * BLOCK_N
        # first key block that every row of the query block still sees
        full_lo = tl.cdiv(tl.maximum(m0 + BLOCK_M + diag - window, 0), BLOCK_N) * BLOCK_N
    full_hi = seqlen_k // BLOCK_N * BLOCK_N
    if CAUSAL:
        full_hi = tl.minimum(full_hi, (m0 + diag + 1) // BLOCK_N * BLOCK_N)
    a = tl.minimum(tl.maximum(full_lo, lo), hi)
    b = tl.minimum(tl.maximum(full_hi, a), hi)
    return lo, a, b, hi


@triton.jit
def query_block_ranges(
    n0, seqlen_q, diag, window,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Query blocks that see key rows ``[n0, n0 + BLOCK_N)``: masked ``[lo, a)``, mask-free ``[a, b)``,
    masked ``[b, hi)``.

    The mirror of :func:`key_block_ranges`: causal gives the lower bound (queries before the diagonal see
    none of these keys), the window the upper one (queries past it have moved on).
    """
    lo = 0
    full_lo = 0
    if CAUSAL:
        lo = tl.maximum(n0 - diag, 0) // BLOCK_M * BLOCK_M
        # first query block whose every row sees the last key of the block
        full_lo = tl.cdiv(tl.maximum(n0 + BLOCK_N - 1 - diag, 0), BLOCK_M) * BLOCK_M
    hi = seqlen_q
    full_hi = seqlen_q // BLOCK_M * BLOCK_M
    if HAS_WINDOW:
        hi = tl.minimum(hi, tl.maximum(n0 + BLOCK_N - 1 - diag + window, 0))
        full_hi = tl.minimum(full_hi, tl.maximum(n0 + window - diag, 0) // BLOCK_M * BLOCK_M)
    a = tl.minimum(tl.maximum(full_lo, lo), hi)
    b = tl.minimum(tl.maximum(full_hi, a), hi)
    return lo, a, b, hi
