"""Triton row kernels for the fused vocabulary losses (KL and cross-entropy over one chunk of logits).

The LM-head matmuls that produce a chunk of logits, and the ones that turn the logit gradient back into
hidden-state and weight gradients, run in cuBLAS (see :mod:`asu_kernels.linear_kl`). These kernels do the
part between them: one program per row streams over the vocabulary in tiles of ``BLOCK_V`` with an online
log-sum-exp (running max ``m`` and rescaled sum ``z``), so any vocabulary size works with a fixed tile, and
logits as large as 1e4 never overflow ``exp``. Both kernels read the logits in their storage dtype (fp32,
bf16 or fp16) and compute in fp32.

With ``COMPUTE_GRAD`` a second pass overwrites the logits of the row, in place, with the gradient of the
weighted loss with respect to them (the Liger-Kernel trick: the chunk buffer that held the logits holds
their gradient next, so the backward needs no logits at all):

* KL:  ``d (w_i KL(p_T,i || p_S,i)) / d s_ij = w_i (p_S,ij - p_T,ij)``
* CE:  ``d (w_i CE_i) / d x_ij = w_i (p_ij - [j == y_i])``

Final-logit soft-capping (Gemma-2's ``final_logit_softcapping``): with ``SOFTCAP = c > 0`` every logit read,
student and teacher alike, is first replaced by ``c * tanh(x / c)`` (the logit the model itself outputs),
and the stored gradient is taken through the cap: multiplied by ``1 - tanh^2(x / c)``, so it is the gradient
with respect to the matmul's (uncapped) logits. ``SOFTCAP`` is a compile-time constant; 0.0 compiles the
uncapped kernels unchanged.
"""

from __future__ import annotations

import triton
import triton.language as tl

from asu_kernels._triton_common import soft_cap


@triton.jit
def _lse_step(m, z, x):
    """Online log-sum-exp over one tile ``x``: running max ``m`` and sum ``z = sum exp(x - m)``, rescaled
    to the new max (``lse = m + log z`` at the end)."""
    m_new = tl.maximum(m, tl.max(x, axis=0))
    z = z * tl.exp(m - m_new) + tl.sum(tl.exp(x - m_new), axis=0)
    return m_new, z


@triton.jit
def _load_logits(row_ptr, cols, mask, other, SOFTCAP: tl.constexpr):
    """One tile of a row's logits in fp32 (``other`` past the vocabulary), soft-capped when ``SOFTCAP > 0``;
    returns the logits and ``tanh(x / c)`` (0 without a cap)."""
    x = tl.load(row_ptr + cols, mask=mask, other=other).to(tl.float32)
    t = 0.0
    if SOFTCAP > 0:
        x, t = soft_cap(x, SOFTCAP)
        x = tl.where(mask, x, other)
    return x, t


@triton.jit
def kl_rows_kernel(
    s_ptr,
    t_ptr,
    w_ptr,
    loss_ptr,
    V,
    COMPUTE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    """Per row ``i``: ``loss[i] = KL(softmax(t_i) || softmax(s_i))``; optionally ``s_i <- w_i (p_S - p_T)``.

    s_ptr, t_ptr: (C, V) contiguous student / teacher logits. w_ptr: (C,) fp32 row weights (read only with
    COMPUTE_GRAD). loss_ptr: (C,) fp32, unweighted per-row KL.

    The KL is accumulated as ``sum_j p_T,j (t_j - s_j) - (lse_T - lse_S)`` with ``lse = m + log z``: the
    difference ``t - s`` is formed before any shift, so identical rows give exactly 0 and large logits
    do not cancel catastrophically. With ``SOFTCAP`` both rows are soft-capped first (module docstring).
    """
    row = tl.program_id(0).to(tl.int64)
    s_row = s_ptr + row * V
    t_row = t_ptr + row * V
    offs = tl.arange(0, BLOCK_V)

    m_s = float("-inf")
    z_s = 0.0
    m_t = float("-inf")
    z_t = 0.0
    acc = 0.0  # sum_j exp(t_j - m_t) * (t_j - s_j), rescaled whenever m_t grows
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        mask = cols < V
        s, _ = _load_logits(s_row, cols, mask, float("-inf"), SOFTCAP)
        t, _ = _load_logits(t_row, cols, mask, float("-inf"), SOFTCAP)

        m_s, z_s = _lse_step(m_s, z_s, s)

        m_t_new = tl.maximum(m_t, tl.max(t, axis=0))
        rescale = tl.exp(m_t - m_t_new)
        e_t = tl.exp(t - m_t_new)
        # p_T = 0 terms contribute 0 (0 * log 0 = 0), also where t or s is -inf (masked lanes, masked vocab).
        # Select before subtracting so masked lanes never form (-inf) - (-inf).
        live = e_t > 0.0
        diff = tl.where(live, t, 0.0) - tl.where(live, s, 0.0)
        z_t = z_t * rescale + tl.sum(e_t, axis=0)
        acc = acc * rescale + tl.sum(e_t * diff, axis=0)
        m_t = m_t_new

    log_z_s = tl.log(z_s)
    log_z_t = tl.log(z_t)
    kl = acc / z_t - (m_t - m_s) - log_z_t + log_z_s
    tl.store(loss_ptr + row, kl)

    if COMPUTE_GRAD:
        w = tl.load(w_ptr + row).to(tl.float32)
        lse_s = m_s + log_z_s
        lse_t = m_t + log_z_t
        for start in range(0, V, BLOCK_V):
            cols = start + offs
            mask = cols < V
            s, tanh_s = _load_logits(s_row, cols, mask, 0.0, SOFTCAP)
            t, _ = _load_logits(t_row, cols, mask, 0.0, SOFTCAP)
            g = w * (tl.exp(s - lse_s) - tl.exp(t - lse_t))
            if SOFTCAP > 0:
                g = g * (1.0 - tanh_s * tanh_s)
            tl.store(s_row + cols, g.to(s_ptr.dtype.element_ty), mask=mask)


@triton.jit
def ce_rows_kernel(
    x_ptr,
    y_ptr,
    w_ptr,
    loss_ptr,
    V,
    COMPUTE_GRAD: tl.constexpr,
    BLOCK_V: tl.constexpr,
    SOFTCAP: tl.constexpr,
):
    """Per row ``i``: ``loss[i] = logsumexp(x_i) - x_i[y_i]``; optionally ``x_i <- w_i (softmax(x_i) - e_y)``.

    x_ptr: (C, V) contiguous logits. y_ptr: (C,) int64 labels in [0, V) (ignored rows are filtered out by
    the caller). w_ptr: (C,) fp32 row weights (read only with COMPUTE_GRAD). loss_ptr: (C,) fp32. With
    ``SOFTCAP`` the row is soft-capped first (module docstring).
    """
    row = tl.program_id(0).to(tl.int64)
    x_row = x_ptr + row * V
    offs = tl.arange(0, BLOCK_V)
    y = tl.load(y_ptr + row)

    m = float("-inf")
    z = 0.0
    for start in range(0, V, BLOCK_V):
        cols = start + offs
        mask = cols < V
        x, _ = _load_logits(x_row, cols, mask, float("-inf"), SOFTCAP)
        m, z = _lse_step(m, z, x)
    lse = m + tl.log(z)
    # Read the label's logit before pass 2 overwrites the row with gradients.
    x_y = tl.load(x_row + y).to(tl.float32)
    if SOFTCAP > 0:
        x_y, _ = soft_cap(x_y, SOFTCAP)
    tl.store(loss_ptr + row, lse - x_y)

    if COMPUTE_GRAD:
        w = tl.load(w_ptr + row).to(tl.float32)
        for start in range(0, V, BLOCK_V):
            cols = start + offs
            mask = cols < V
            x, tanh_x = _load_logits(x_row, cols, mask, 0.0, SOFTCAP)
            g = tl.exp(x - lse) - tl.where(cols == y, 1.0, 0.0)
            if SOFTCAP > 0:
                g = g * (1.0 - tanh_x * tanh_x)
            tl.store(x_row + cols, (w * g).to(x_ptr.dtype.element_ty), mask=mask)


# Tile configurations the launcher may pick: (BLOCK_V, num_warps). Small vocabularies (tests, the CPU demo's
# tiny model) take the small tile; real ones (32k..152k) the large one, 16 fp32 elements per thread per
# stream at 8 warps, which keeps every load 128-bit wide and the registers well under the spill limit.
SMALL_TILE = (1024, 4)
LARGE_TILE = (4096, 8)
LARGE_VOCAB = 8192
# The row loops carry a reduction, not a GEMM: two stages let the next tile's loads overlap the math.
NUM_STAGES = 2


def tile_for(vocab: int) -> tuple[int, int]:
    """(BLOCK_V, num_warps) for a vocabulary of ``vocab`` entries."""
    return LARGE_TILE if vocab >= LARGE_VOCAB else SMALL_TILE


def _launch_rows(
    kernel, logits, *args, compute_grad: bool, block_v: int | None, softcap: float | None
) -> None:
    """One program per row of the contiguous (C, V) ``logits``; ``block_v`` overrides the tile of
    :func:`tile_for` (the warps stay those of the vocabulary size); ``softcap`` None or > 0."""
    rows, vocab = logits.shape
    tile, warps = tile_for(vocab)
    if block_v is not None:
        tile = block_v
    kernel[(rows,)](
        logits, *args, vocab, COMPUTE_GRAD=compute_grad, BLOCK_V=tile, SOFTCAP=float(softcap or 0.0),
        num_warps=warps, num_stages=NUM_STAGES,
    )  # fmt: skip


def launch_kl_rows(
    s, t, w, loss, compute_grad: bool, block_v: int | None = None, softcap: float | None = None
) -> None:
    """Run :func:`kl_rows_kernel` over the ``C`` rows of the contiguous (C, V) buffers ``s`` and ``t``."""
    _launch_rows(kl_rows_kernel, s, t, w, loss, compute_grad=compute_grad, block_v=block_v, softcap=softcap)


def launch_ce_rows(
    x, y, w, loss, compute_grad: bool, block_v: int | None = None, softcap: float | None = None
) -> None:
    """Run :func:`ce_rows_kernel` over the ``C`` rows of the contiguous (C, V) buffer ``x``."""
    _launch_rows(ce_rows_kernel, x, y, w, loss, compute_grad=compute_grad, block_v=block_v, softcap=softcap)
