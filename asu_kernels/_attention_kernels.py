"""Triton kernels of the temperature-scaled flash attention (forward, backward preprocess, dK/dV, dQ); the
host side (autotuning, launchers, custom ops) is in :mod:`asu_kernels.attention`.

Math (per query row ``i``, key ``j``; ``c = scale / temperature``; ``cap`` the optional soft-cap)::

    u_ij   = c * q_i . k_j
    s_ij   = u_ij,  or  cap * tanh(u_ij / cap)      (-inf where the mask hides j from i)
    lse_i  = log sum_j exp(s_ij)                    (natural log, fp32; -inf for a row with no visible key)
    p_ij   = exp(s_ij - lse_i)
    o_i    = sum_j p_ij v_j
    Delta_i = rowsum(dO_i * o_i) - dlse_i
    dv_j   = sum_i p_ij dO_i                        (summed over the query heads of the GQA group)
    ds_ij  = p_ij (dO_i . v_j - Delta_i)            (times 1 - tanh^2(u_ij / cap) with a soft-cap)
    dq_i   = c sum_j ds_ij k_j,   dk_j = c sum_i ds_ij q_i

The online softmax runs in base 2 with ``log2(e) * c`` folded into one multiplier (``qk_scale``); the
stored LSE is converted back to natural log.

Soft-capping (Gemma-2's ``attn_logit_softcapping``) is applied to the logit *after* the scale and the
temperature, as transformers' eager attention does with the scaling it is given: smoothing divides that
scaling by ``tau``, so the capped logit of a smoothed layer is ``cap * tanh(q.k * scale / (tau * cap))``. The
cap is the compile-time constant ``SOFTCAP`` (0.0 = none): kernels without a cap compile to the code they had
before the cap existed, and each cap value is its own specialisation.

The masks are those of :func:`asu_kernels._triton_common.visible` (bottom-right aligned causal mask, sliding
window) plus the key padding.

Tensor layout: every tensor is addressed as (batch, head, row, dim) through four strides, so any input
strides work without copies. Packed (varlen) batches pass batch stride 0 and add ``cu_seqlens[b]`` rows;
one program handles one (row block, head, document).

Every loop over the other side's blocks is split in three stages (:func:`~asu_kernels._triton_common.
key_block_ranges`, :func:`~asu_kernels._triton_common.query_block_ranges`): a masked stage for the blocks cut
by the lower window edge, an unmasked stage for blocks that are fully visible, and a masked stage for the
causal diagonal and the ragged end. Blocks outside the causal triangle or the window are never visited. The
kernels unroll the stages with ``tl.static_range`` over the four bounds (stage 1 is the mask-free one) and
compile the first only where it can hold blocks (with a window for key loops, causal for the query loop).
"""

from __future__ import annotations

import triton
import triton.language as tl

from asu_kernels import _triton_common as tc


@triton.jit
def _rows_offset(batch, head, seq_start, stride_b, stride_h, stride_row, IS_VARLEN: tl.constexpr):
    """int64 offset of row 0 of sequence ``batch``, head ``head`` of a (batch, head, row, dim) tensor; in a
    packed batch (batch stride 0) the sequence starts at row ``seq_start``."""
    off = batch.to(tl.int64) * stride_b + head.to(tl.int64) * stride_h
    if IS_VARLEN:
        off += seq_start.to(tl.int64) * stride_row
    return off


@triton.jit
def _load_tile(
    base, rows, stride_row, cols, stride_col, n_rows,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, CHECK_ROWS: tl.constexpr,
):  # fmt: skip
    """Load the (rows, BLOCK_D) tile at ``base + rows * stride_row + cols * stride_col``; rows >= n_rows (when
    checked) and padded head-dim columns read 0."""
    ptrs = base + rows[:, None] * stride_row + cols[None, :] * stride_col
    if CHECK_ROWS:
        if BLOCK_D == HEAD_DIM:
            x = tl.load(ptrs, mask=rows[:, None] < n_rows, other=0.0)
        else:
            x = tl.load(ptrs, mask=(rows[:, None] < n_rows) & (cols[None, :] < HEAD_DIM), other=0.0)
    else:
        if BLOCK_D == HEAD_DIM:
            x = tl.load(ptrs)
        else:
            x = tl.load(ptrs, mask=cols[None, :] < HEAD_DIM, other=0.0)
    return x


@triton.jit
def _store_tile(base, rows, stride_row, cols, stride_col, n_rows, x, HEAD_DIM: tl.constexpr):
    """Store the (rows, BLOCK_D) tile ``x`` at ``base + rows * stride_row + cols * stride_col``, in the
    tensor's dtype; rows >= n_rows and padded head-dim columns are left alone."""
    tl.store(
        base + rows[:, None] * stride_row + cols[None, :] * stride_col,
        x.to(base.dtype.element_ty),
        mask=(rows[:, None] < n_rows) & (cols[None, :] < HEAD_DIM),
    )


@triton.jit
def _scores(
    a, b, i, j, seqlen_q, seqlen_k, diag, window, qk_scale,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, SOFTCAP: tl.constexpr,
    DOT_PRECISION: tl.constexpr,
):  # fmt: skip
    """Base-2 logits ``a @ b^T * qk_scale`` of one tile, soft-capped with ``SOFTCAP``; on ``MASKED`` tiles
    -inf where query ``i`` does not see key ``j`` (index tensors broadcast to the tile: ``a`` holds queries
    and ``b`` keys, or the transpose). Key padding is the caller's.

    Returns ``(s, tanh)``, ``tanh`` the cap's ``tanh(u / cap)`` that the gradient needs (without a cap, the
    uncapped logits, never read).
    """
    s = tc.mma(a, tl.trans(b), None, DOT_PRECISION) * qk_scale
    tanh = s
    if SOFTCAP > 0:
        s, tanh = tc.soft_cap(s, SOFTCAP * tc.LOG2E)
    if MASKED:
        s = tl.where(tc.visible(i, j, seqlen_q, seqlen_k, diag, window, CAUSAL, HAS_WINDOW), s, float("-inf"))
    return s, tanh


@triton.jit
def _score_grad(p, dp, delta, tanh, SOFTCAP: tl.constexpr):
    """``ds = p (dp - Delta)``, times ``1 - tanh^2`` through a soft-cap (``d(c tanh(u/c))/du``): the
    gradient of the logit before the cap."""
    ds = p * (dp - delta)
    if SOFTCAP > 0:
        ds = ds * (1.0 - tanh * tanh)
    return ds


@triton.jit
def _fwd_inner(
    acc, l_i, m_i, q,
    k_base, v_base, kpm_base, stride_kn, stride_kd, stride_vn, stride_vd, stride_pn,
    offs_m, offs_d, lo, hi, seqlen_q, seqlen_k, diag, window, qk_scale,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_KPM: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
    SOFTCAP: tl.constexpr,
):  # fmt: skip
    """Online-softmax update of one query block over key blocks [lo, hi)."""
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_tile(k_base, offs_n, stride_kn, offs_d, stride_kd, seqlen_k, HEAD_DIM, BLOCK_D, MASKED)
        s, _ = _scores(
            q, k, offs_m[:, None], offs_n[None, :], seqlen_q, seqlen_k, diag, window, qk_scale,
            MASKED, CAUSAL, HAS_WINDOW, SOFTCAP, DOT_PRECISION,
        )  # fmt: skip
        if HAS_KPM:
            s = tl.where(tc.key_kept(kpm_base, offs_n, stride_pn, seqlen_k, True)[None, :], s, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        if MASKED or HAS_KPM:
            # a row that has seen no visible key yet keeps m = -inf; exp2(-inf - -inf) would be NaN
            m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.math.exp2(s - m_new[:, None])
        alpha = tl.math.exp2(m_i - m_new)
        l_i = l_i * alpha + tl.sum(p, 1)
        v = _load_tile(v_base, offs_n, stride_vn, offs_d, stride_vd, seqlen_k, HEAD_DIM, BLOCK_D, MASKED)
        acc = acc * alpha[:, None]
        acc = tc.mma(p.to(v.dtype), v, acc, DOT_PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def attn_fwd_kernel(
    Q, K, V, O, LSE, KPM, CU_SEQLENS,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_lb, stride_lh, stride_lm,
    stride_pb, stride_pn,
    n_q, n_k, group, window, qk_scale, n_ctx_key,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_KPM: tl.constexpr,
    STORE_LSE: tl.constexpr, DOT_PRECISION: tl.constexpr, SOFTCAP: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """One program: BLOCK_M query rows of one head of one sequence. ``n_ctx_key`` only keys the autotuner."""
    start_m = tl.program_id(0)
    off_h = tl.program_id(1)
    off_b = tl.program_id(2)
    off_hk = off_h // group
    seq_start, seqlen_q, seqlen_k = tc.document_bounds(CU_SEQLENS, off_b, n_q, n_k, IS_VARLEN)
    q_off = _rows_offset(off_b, off_h, seq_start, stride_qb, stride_qh, stride_qm, IS_VARLEN)
    k_off = _rows_offset(off_b, off_hk, seq_start, stride_kb, stride_kh, stride_kn, IS_VARLEN)
    v_off = _rows_offset(off_b, off_hk, seq_start, stride_vb, stride_vh, stride_vn, IS_VARLEN)
    o_off = _rows_offset(off_b, off_h, seq_start, stride_ob, stride_oh, stride_om, IS_VARLEN)
    l_off = _rows_offset(off_b, off_h, seq_start, stride_lb, stride_lh, stride_lm, IS_VARLEN)
    m0 = start_m * BLOCK_M
    if m0 >= seqlen_q:
        return
    diag = seqlen_k - seqlen_q
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_tile(Q + q_off, offs_m, stride_qm, offs_d, stride_qd, seqlen_q, HEAD_DIM, BLOCK_D, True)
    kpm_base = KPM + off_b.to(tl.int64) * stride_pb
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    bounds = tc.key_block_ranges(m0, seqlen_k, diag, window, CAUSAL, HAS_WINDOW, BLOCK_M, BLOCK_N)
    args = (
        K + k_off, V + v_off, kpm_base, stride_kn, stride_kd, stride_vn, stride_vd, stride_pn, offs_m, offs_d,
    )  # fmt: skip
    for stage in tl.static_range(0 if HAS_WINDOW else 1, 3):  # the first stage needs a window
        acc, l_i, m_i = _fwd_inner(
            acc, l_i, m_i, q, *args, bounds[stage], bounds[stage + 1], seqlen_q, seqlen_k, diag, window,
            qk_scale, stage != 1, CAUSAL, HAS_WINDOW, HAS_KPM, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PRECISION,
            SOFTCAP,
        )  # fmt: skip
    # rows with no visible key: l = 0 and acc = 0 -> output 0, lse = -inf
    l_safe = tl.where(l_i == 0.0, 1.0, l_i)
    acc = acc / l_safe[:, None]
    _store_tile(O + o_off, offs_m, stride_om, offs_d, stride_od, seqlen_q, acc, HEAD_DIM)
    if STORE_LSE:
        lse = tl.where(l_i == 0.0, float("-inf"), (m_i + tl.math.log2(l_safe)) * tc.LN2)
        tl.store(LSE + l_off + offs_m * stride_lm, lse, mask=offs_m < seqlen_q)


@triton.jit
def attn_bwd_preprocess_kernel(
    O, DO, DLSE, DELTA, CU_SEQLENS,
    stride_ob, stride_oh, stride_om, stride_od,
    stride_db, stride_dh, stride_dm, stride_dd,
    stride_lb, stride_lh, stride_lm,
    n_q,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_DLSE: tl.constexpr,
    BLOCK_M: tl.constexpr,
):  # fmt: skip
    """``Delta = rowsum(dO * O) - dlse`` in fp32, laid out like the LSE (DLSE shares the LSE strides)."""
    start_m = tl.program_id(0)
    off_h = tl.program_id(1)
    off_b = tl.program_id(2)
    seq_start, seqlen_q, _ = tc.document_bounds(CU_SEQLENS, off_b, n_q, n_q, IS_VARLEN)
    o_off = _rows_offset(off_b, off_h, seq_start, stride_ob, stride_oh, stride_om, IS_VARLEN)
    d_off = _rows_offset(off_b, off_h, seq_start, stride_db, stride_dh, stride_dm, IS_VARLEN)
    l_off = _rows_offset(off_b, off_h, seq_start, stride_lb, stride_lh, stride_lm, IS_VARLEN)
    m0 = start_m * BLOCK_M
    if m0 >= seqlen_q:
        return
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    o = _load_tile(O + o_off, offs_m, stride_om, offs_d, stride_od, seqlen_q, HEAD_DIM, BLOCK_D, True)
    do = _load_tile(DO + d_off, offs_m, stride_dm, offs_d, stride_dd, seqlen_q, HEAD_DIM, BLOCK_D, True)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if HAS_DLSE:
        # d lse_i / d s_ij = p_ij, so an upstream lse gradient folds into Delta
        delta -= tl.load(DLSE + l_off + offs_m * stride_lm, mask=offs_m < seqlen_q, other=0.0)
    tl.store(DELTA + l_off + offs_m * stride_lm, delta, mask=offs_m < seqlen_q)


@triton.jit
def _bwd_dkdv_inner(
    dk, dv, k, v, key_ok,
    q_base, do_base, lse_base, delta_base, stride_qm, stride_qd, stride_dm, stride_dd, stride_lm,
    offs_n, offs_d, lo, hi, seqlen_q, seqlen_k, diag, window, qk_scale,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_KPM: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, DOT_PRECISION: tl.constexpr,
    SOFTCAP: tl.constexpr,
):  # fmt: skip
    """Accumulate dK/dV of one key block over query blocks [lo, hi), in the transposed (N, M) frame."""
    for start_m in range(lo, hi, BLOCK_M):
        start_m = tl.multiple_of(start_m, BLOCK_M)
        offs_m = start_m + tl.arange(0, BLOCK_M)
        q = _load_tile(q_base, offs_m, stride_qm, offs_d, stride_qd, seqlen_q, HEAD_DIM, BLOCK_D, MASKED)
        if MASKED:
            lse = tl.load(lse_base + offs_m * stride_lm, mask=offs_m < seqlen_q, other=float("-inf"))
            delta = tl.load(delta_base + offs_m * stride_lm, mask=offs_m < seqlen_q, other=0.0)
        else:
            lse = tl.load(lse_base + offs_m * stride_lm)
            delta = tl.load(delta_base + offs_m * stride_lm)
        # an empty row (lse = -inf) must give p = 0: subtract +inf instead of -inf
        lse2 = tl.where(lse == float("-inf"), float("inf"), lse * tc.LOG2E)
        s_t, tanh_t = _scores(
            k, q, offs_m[None, :], offs_n[:, None], seqlen_q, seqlen_k, diag, window, qk_scale,
            MASKED, CAUSAL, HAS_WINDOW, SOFTCAP, DOT_PRECISION,
        )  # fmt: skip
        if HAS_KPM:
            s_t = tl.where(key_ok[:, None], s_t, float("-inf"))
        p_t = tl.math.exp2(s_t - lse2[None, :])
        do = _load_tile(do_base, offs_m, stride_dm, offs_d, stride_dd, seqlen_q, HEAD_DIM, BLOCK_D, MASKED)
        dv = tc.mma(p_t.to(do.dtype), do, dv, DOT_PRECISION)
        dp_t = tc.mma(v, tl.trans(do), None, DOT_PRECISION)
        ds_t = _score_grad(p_t, dp_t, delta[None, :], tanh_t, SOFTCAP)
        dk = tc.mma(ds_t.to(q.dtype), q, dk, DOT_PRECISION)
    return dk, dv


@triton.jit
def attn_bwd_dkdv_kernel(
    Q, K, V, DO, DK, DV, LSE, DELTA, KPM, CU_SEQLENS,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_db, stride_dh, stride_dm, stride_dd,
    stride_dkb, stride_dkh, stride_dkn, stride_dkd,
    stride_dvb, stride_dvh, stride_dvn, stride_dvd,
    stride_lb, stride_lh, stride_lm,
    stride_pb, stride_pn,
    n_q, n_k, group, window, sm_scale, qk_scale, n_ctx_key,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_KPM: tl.constexpr,
    DOT_PRECISION: tl.constexpr, SOFTCAP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """One program: BLOCK_N keys of one KV head; loops over the GQA group's query heads (no atomics)."""
    start_n = tl.program_id(0)
    off_hk = tl.program_id(1)
    off_b = tl.program_id(2)
    seq_start, seqlen_q, seqlen_k = tc.document_bounds(CU_SEQLENS, off_b, n_q, n_k, IS_VARLEN)
    k_off = _rows_offset(off_b, off_hk, seq_start, stride_kb, stride_kh, stride_kn, IS_VARLEN)
    v_off = _rows_offset(off_b, off_hk, seq_start, stride_vb, stride_vh, stride_vn, IS_VARLEN)
    dk_off = _rows_offset(off_b, off_hk, seq_start, stride_dkb, stride_dkh, stride_dkn, IS_VARLEN)
    dv_off = _rows_offset(off_b, off_hk, seq_start, stride_dvb, stride_dvh, stride_dvn, IS_VARLEN)
    n0 = start_n * BLOCK_N
    if n0 >= seqlen_k:
        return
    diag = seqlen_k - seqlen_q
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    k = _load_tile(K + k_off, offs_n, stride_kn, offs_d, stride_kd, seqlen_k, HEAD_DIM, BLOCK_D, True)
    v = _load_tile(V + v_off, offs_n, stride_vn, offs_d, stride_vd, seqlen_k, HEAD_DIM, BLOCK_D, True)
    if HAS_KPM:
        key_ok = tc.key_kept(KPM + off_b.to(tl.int64) * stride_pb, offs_n, stride_pn, seqlen_k, True)
    else:
        key_ok = offs_n < seqlen_k
    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    bounds = tc.query_block_ranges(n0, seqlen_q, diag, window, CAUSAL, HAS_WINDOW, BLOCK_M, BLOCK_N)
    for g in range(0, group):
        off_h = off_hk * group + g
        q_off = _rows_offset(off_b, off_h, seq_start, stride_qb, stride_qh, stride_qm, IS_VARLEN)
        do_off = _rows_offset(off_b, off_h, seq_start, stride_db, stride_dh, stride_dm, IS_VARLEN)
        l_off = _rows_offset(off_b, off_h, seq_start, stride_lb, stride_lh, stride_lm, IS_VARLEN)
        args = (
            Q + q_off, DO + do_off, LSE + l_off, DELTA + l_off,
            stride_qm, stride_qd, stride_dm, stride_dd, stride_lm,
        )  # fmt: skip
        for stage in tl.static_range(0 if CAUSAL else 1, 3):  # the first stage needs the causal mask
            dk, dv = _bwd_dkdv_inner(
                dk, dv, k, v, key_ok, *args, offs_n, offs_d, bounds[stage], bounds[stage + 1], seqlen_q,
                seqlen_k, diag, window, qk_scale, stage != 1, CAUSAL, HAS_WINDOW, HAS_KPM, HEAD_DIM, BLOCK_D,
                BLOCK_M, DOT_PRECISION, SOFTCAP,
            )  # fmt: skip
    dk = dk * sm_scale
    _store_tile(DK + dk_off, offs_n, stride_dkn, offs_d, stride_dkd, seqlen_k, dk, HEAD_DIM)
    _store_tile(DV + dv_off, offs_n, stride_dvn, offs_d, stride_dvd, seqlen_k, dv, HEAD_DIM)


@triton.jit
def _bwd_dq_inner(
    dq, q, do, lse2, delta,
    k_base, v_base, kpm_base, stride_kn, stride_kd, stride_vn, stride_vd, stride_pn,
    offs_m, offs_d, lo, hi, seqlen_q, seqlen_k, diag, window, qk_scale,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_KPM: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, DOT_PRECISION: tl.constexpr,
    SOFTCAP: tl.constexpr,
):  # fmt: skip
    """Accumulate dQ of one query block over key blocks [lo, hi)."""
    for start_n in range(lo, hi, BLOCK_N):
        start_n = tl.multiple_of(start_n, BLOCK_N)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        k = _load_tile(k_base, offs_n, stride_kn, offs_d, stride_kd, seqlen_k, HEAD_DIM, BLOCK_D, MASKED)
        v = _load_tile(v_base, offs_n, stride_vn, offs_d, stride_vd, seqlen_k, HEAD_DIM, BLOCK_D, MASKED)
        s, tanh_s = _scores(
            q, k, offs_m[:, None], offs_n[None, :], seqlen_q, seqlen_k, diag, window, qk_scale,
            MASKED, CAUSAL, HAS_WINDOW, SOFTCAP, DOT_PRECISION,
        )  # fmt: skip
        if HAS_KPM:
            s = tl.where(tc.key_kept(kpm_base, offs_n, stride_pn, seqlen_k, True)[None, :], s, float("-inf"))
        p = tl.math.exp2(s - lse2[:, None])
        dp = tc.mma(do, tl.trans(v), None, DOT_PRECISION)
        ds = _score_grad(p, dp, delta[:, None], tanh_s, SOFTCAP)
        dq = tc.mma(ds.to(k.dtype), k, dq, DOT_PRECISION)
    return dq


@triton.jit
def attn_bwd_dq_kernel(
    Q, K, V, DO, DQ, LSE, DELTA, KPM, CU_SEQLENS,
    stride_qb, stride_qh, stride_qm, stride_qd,
    stride_kb, stride_kh, stride_kn, stride_kd,
    stride_vb, stride_vh, stride_vn, stride_vd,
    stride_db, stride_dh, stride_dm, stride_dd,
    stride_dqb, stride_dqh, stride_dqm, stride_dqd,
    stride_lb, stride_lh, stride_lm,
    stride_pb, stride_pn,
    n_q, n_k, group, window, sm_scale, qk_scale, n_ctx_key,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, IS_VARLEN: tl.constexpr, HAS_KPM: tl.constexpr,
    DOT_PRECISION: tl.constexpr, SOFTCAP: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """One program: dQ of BLOCK_M query rows of one head, looping over the visible key blocks."""
    start_m = tl.program_id(0)
    off_h = tl.program_id(1)
    off_b = tl.program_id(2)
    off_hk = off_h // group
    seq_start, seqlen_q, seqlen_k = tc.document_bounds(CU_SEQLENS, off_b, n_q, n_k, IS_VARLEN)
    q_off = _rows_offset(off_b, off_h, seq_start, stride_qb, stride_qh, stride_qm, IS_VARLEN)
    do_off = _rows_offset(off_b, off_h, seq_start, stride_db, stride_dh, stride_dm, IS_VARLEN)
    dq_off = _rows_offset(off_b, off_h, seq_start, stride_dqb, stride_dqh, stride_dqm, IS_VARLEN)
    l_off = _rows_offset(off_b, off_h, seq_start, stride_lb, stride_lh, stride_lm, IS_VARLEN)
    k_off = _rows_offset(off_b, off_hk, seq_start, stride_kb, stride_kh, stride_kn, IS_VARLEN)
    v_off = _rows_offset(off_b, off_hk, seq_start, stride_vb, stride_vh, stride_vn, IS_VARLEN)
    m0 = start_m * BLOCK_M
    if m0 >= seqlen_q:
        return
    diag = seqlen_k - seqlen_q
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    q = _load_tile(Q + q_off, offs_m, stride_qm, offs_d, stride_qd, seqlen_q, HEAD_DIM, BLOCK_D, True)
    do = _load_tile(DO + do_off, offs_m, stride_dm, offs_d, stride_dd, seqlen_q, HEAD_DIM, BLOCK_D, True)
    lse = tl.load(LSE + l_off + offs_m * stride_lm, mask=offs_m < seqlen_q, other=float("-inf"))
    delta = tl.load(DELTA + l_off + offs_m * stride_lm, mask=offs_m < seqlen_q, other=0.0)
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * tc.LOG2E)
    kpm_base = KPM + off_b.to(tl.int64) * stride_pb
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    bounds = tc.key_block_ranges(m0, seqlen_k, diag, window, CAUSAL, HAS_WINDOW, BLOCK_M, BLOCK_N)
    args = (
        K + k_off, V + v_off, kpm_base, stride_kn, stride_kd, stride_vn, stride_vd, stride_pn, offs_m, offs_d,
    )  # fmt: skip
    for stage in tl.static_range(0 if HAS_WINDOW else 1, 3):  # the first stage needs a window
        dq = _bwd_dq_inner(
            dq, q, do, lse2, delta, *args, bounds[stage], bounds[stage + 1], seqlen_q, seqlen_k, diag, window,
            qk_scale, stage != 1, CAUSAL, HAS_WINDOW, HAS_KPM, HEAD_DIM, BLOCK_D, BLOCK_N, DOT_PRECISION,
            SOFTCAP,
        )  # fmt: skip
    dq = dq * sm_scale
    _store_tile(DQ + dq_off, offs_m, stride_dqm, offs_d, stride_dqd, seqlen_q, dq, HEAD_DIM)
