"""Triton kernels of the attention-map KL (forward, dq_s and dk_s backward); the host side is in
:mod:`asu_kernels.attention_kl`.

For query row ``i`` with teacher logits ``s_T,ij = q_t,i . k_t,j * scale / temperature_t`` and student logits
``s_S,ij = q_s,i . k_s,j * scale / temperature_s`` over the same visible keys::

    KL_i = sum_j p_T,ij (s_T,ij - s_S,ij) - lse_T,i + lse_S,i
    H_i  = lse_i - sum_j p_ij s_ij                          (entropy of either side)

The forward kernel streams key blocks once, keeping for each row running maxima ``m`` and sums ``l`` of
both distributions and rescaled accumulators ``a = sum_j exp(s_T - m_T)(s_T - s_S)`` and
``b = sum_j exp(s - m)(s - m)`` (entropies), so no (N x N) matrix ever exists.

The teacher is frozen. With upstream gradients ``g_i`` (KL) and ``e_i`` (student entropy),
``dL/ds_S,ij = g_i (p_S,ij - p_T,ij) + e_i p_S,ij (lse_S,i - H_S,i - s_S,ij)``, so
``dq_s = scale_s (dS) k_s`` and ``dk_s = scale_s (dS)^T q_s``, both recomputed blockwise from the stored
LSEs by two kernels (one per query block, one per key block; no atomics).

Logits are kept in base 2 (``t = s * log2(e)``) so that ``exp2`` does the exponentials; results are
converted back to natural units on the way out. Masks, block ranges and the dot precision are the shared
helpers of :mod:`asu_kernels._triton_common`, the same as the attention kernels'. The forward splits its key
loop in the three stages of :func:`~asu_kernels._triton_common.key_block_ranges` (masked, mask-free,
masked); the backward kernels run one masked loop over the visible blocks.
"""

from __future__ import annotations

import triton
import triton.language as tl

from asu_kernels import _triton_common as tc


@triton.jit
def _load_rows(base, rows, offs_d, mask, stride_n):
    """A (rows, BLOCK_D) tile of a tensor whose last dim is unit-stride; masked-off elements read 0."""
    return tl.load(base + rows[:, None] * stride_n + offs_d[None, :], mask=mask, other=0.0)


@triton.jit
def _query_tiles(
    QS, QT, b64, h, start, m0, n_q, offs_d, d_ok, s_qs_b, s_qs_h, s_qs_n, s_qt_b, s_qt_h, s_qt_n,
    BLOCK_M: tl.constexpr,
):  # fmt: skip
    """Query rows ``[m0, m0 + BLOCK_M)`` of head ``h`` of sequence ``b64`` (packed: from row ``start``),
    student and teacher: ``(offs_m, row_ok, rows, q_s, q_t)`` with ``rows`` the int64 tensor rows.
    Rows past ``n_q`` and padded head-dim columns read 0."""
    offs_m = m0 + tl.arange(0, BLOCK_M)
    row_ok = offs_m < n_q
    rows = (start + offs_m).to(tl.int64)
    q_mask = row_ok[:, None] & d_ok[None, :]
    q_s = _load_rows(QS + b64 * s_qs_b + h * s_qs_h, rows, offs_d, q_mask, s_qs_n)
    q_t = _load_rows(QT + b64 * s_qt_b + h * s_qt_h, rows, offs_d, q_mask, s_qt_n)
    return offs_m, row_ok, rows, q_s, q_t


@triton.jit
def _key_logits(
    q_s, q_t, ks_base, kt_base, kpm_base, s_ks_n, s_kt_n, start, n0, offs_m, offs_d, d_ok,
    n_q, n_k, off, window, qk_scale_s, qk_scale_t,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_KPM: tl.constexpr,
    DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """Key block ``[n0, n0 + BLOCK_N)`` against a block of query rows: ``(k_s, t_s, t_t, vis)``.

    ``t_s``, ``t_t`` are the raw base-2 logits of both maps, ``vis`` which of them count: the masks
    (``MASKED``) and the key padding (``HAS_KPM``). With neither, every logit counts and ``vis`` is ``True``.
    ``MASKED=False`` is for interior blocks that every row sees whole: no bounds check on the key rows.
    """
    offs_n = n0 + tl.arange(0, BLOCK_N)
    cols = (start + offs_n).to(tl.int64)
    if MASKED:
        k_mask = (offs_n < n_k)[:, None] & d_ok[None, :]
    else:
        k_mask = d_ok[None, :]
    k_s = _load_rows(ks_base, cols, offs_d, k_mask, s_ks_n)
    k_t = _load_rows(kt_base, cols, offs_d, k_mask, s_kt_n)
    # Raw (unmasked) base-2 logits are finite everywhere, so products with exp2(masked) are 0, not NaN.
    t_s = tc.mma(q_s, tl.trans(k_s), None, DOT_PRECISION) * qk_scale_s
    t_t = tc.mma(q_t, tl.trans(k_t), None, DOT_PRECISION) * qk_scale_t
    if MASKED:
        # Rows past n_q are masked too; their results are never stored.
        vis = tc.visible(offs_m[:, None], offs_n[None, :], n_q, n_k, off, window, CAUSAL, HAS_WINDOW)
        if HAS_KPM:
            vis = vis & tc.key_kept(kpm_base, offs_n, 1, n_k, True)[None, :]
    elif HAS_KPM:
        vis = tc.key_kept(kpm_base, offs_n, 1, n_k, False)[None, :]
    else:
        vis = True
    return k_s, t_s, t_t, vis


@triton.jit
def _softmax_step(m, l, acc_h, t_masked, t, WANT_ENTROPY: tl.constexpr):
    """One key block of an online base-2 softmax: running max ``m``, sum ``l`` and, for the entropy,
    ``acc_h = sum exp(t - m)(t - m)``. Returns ``(m_new, l, acc_h, alpha, e)`` with ``alpha`` the rescale of
    the old sums and ``e = exp2(t_masked - m_new)`` the block's unnormalised probabilities."""
    m_new = tl.maximum(m, tl.max(t_masked, 1))
    alpha = tl.math.exp2(m - m_new)
    e = tl.math.exp2(t_masked - m_new[:, None])
    if WANT_ENTROPY:
        # sum exp(t - m)(t - m) re-based from m_old to m_new: (t - m_new) = (t - m_old) + (m_old - m_new).
        acc_h = alpha * (acc_h + (m - m_new) * l) + tl.sum(e * (t - m_new[:, None]), 1)
    l = l * alpha + tl.sum(e, 1)
    return m_new, l, acc_h, alpha, e


@triton.jit
def _fwd_step(
    q_s, q_t, ks_base, kt_base, kpm_base, s_ks_n, s_kt_n, start, n0, offs_m, offs_d, d_ok,
    n_q, n_k, off, window, qk_scale_s, qk_scale_t,
    m_s, m_t, l_s, l_t, acc_kl, acc_hs, acc_ht,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_KPM: tl.constexpr,
    WANT_ENTROPY: tl.constexpr, DOT_PRECISION: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """One key block of the forward stream: update both maps' running max / sum and the accumulators.

    ``MASKED=False`` is for interior blocks that every row sees whole (only padding, if any, is masked).
    """
    _, t_s, t_t, vis = _key_logits(
        q_s, q_t, ks_base, kt_base, kpm_base, s_ks_n, s_kt_n, start, n0, offs_m, offs_d, d_ok, n_q, n_k, off,
        window, qk_scale_s, qk_scale_t, MASKED, CAUSAL, HAS_WINDOW, HAS_KPM, DOT_PRECISION, BLOCK_N,
    )  # fmt: skip
    if MASKED or HAS_KPM:
        tt_m = tl.where(vis, t_t, float("-inf"))
        ts_m = tl.where(vis, t_s, float("-inf"))
    else:
        tt_m = t_t
        ts_m = t_s
    mt_new, l_t, acc_ht, alpha_t, e_t = _softmax_step(m_t, l_t, acc_ht, tt_m, t_t, WANT_ENTROPY)
    acc_kl = acc_kl * alpha_t + tl.sum(e_t * (t_t - t_s), 1)
    ms_new, l_s, acc_hs, _, _ = _softmax_step(m_s, l_s, acc_hs, ts_m, t_s, WANT_ENTROPY)
    return ms_new, mt_new, l_s, l_t, acc_kl, acc_hs, acc_ht


@triton.jit
def attention_kl_fwd_kernel(
    QS, KS, QT, KT, KPM, CU,
    KL, LSE_S, LSE_T, ENT_S, ENT_T,
    s_qs_b, s_qs_h, s_qs_n,
    s_ks_b, s_ks_h, s_ks_n,
    s_qt_b, s_qt_h, s_qt_n,
    s_kt_b, s_kt_h, s_kt_n,
    s_kpm_b,
    s_o_b, s_o_h, s_o_n,
    n_q, n_k, H, GROUP_S, GROUP_T, window,
    qk_scale_s, qk_scale_t,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_KPM: tl.constexpr, IS_VARLEN: tl.constexpr,
    WANT_ENTROPY: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """One (query block, batch * head) program: stream the visible key blocks once for both maps."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    start, n_q, n_k = tc.document_bounds(CU, b, n_q, n_k, IS_VARLEN)
    m0 = pid_m * BLOCK_M
    if m0 >= n_q:
        return
    off = n_k - n_q  # bottom-right alignment of the causal / window masks
    b64 = b.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    offs_m, row_ok, rows, q_s, q_t = _query_tiles(
        QS, QT, b64, h, start, m0, n_q, offs_d, d_ok, s_qs_b, s_qs_h, s_qs_n, s_qt_b, s_qt_h, s_qt_n, BLOCK_M
    )
    ks_base = KS + b64 * s_ks_b + (h // GROUP_S) * s_ks_h
    kt_base = KT + b64 * s_kt_b + (h // GROUP_T) * s_kt_h

    # A finite start for the running maxima keeps exp2(m_old - m_new) and (m_old - m_new) * l_old finite
    # when a row has not met a visible key yet (all-masked blocks happen with padding and windows).
    m_s = tl.full([BLOCK_M], -1.0e30, tl.float32)
    m_t = tl.full([BLOCK_M], -1.0e30, tl.float32)
    l_s = tl.zeros([BLOCK_M], tl.float32)
    l_t = tl.zeros([BLOCK_M], tl.float32)
    acc_kl = tl.zeros([BLOCK_M], tl.float32)
    acc_hs = tl.zeros([BLOCK_M], tl.float32)
    acc_ht = tl.zeros([BLOCK_M], tl.float32)

    # Interior key blocks [a, b_end) are visible to every row of the block: they skip the mask arithmetic,
    # which only the boundary blocks [lo, a) and [b_end, hi) pay. Without a window the interior starts at
    # key 0: no leading boundary stage.
    bounds = tc.key_block_ranges(
        m0, n_k, off, window, CAUSAL, HAS_WINDOW, BLOCK_M, BLOCK_N
    )  # lo, a, b_end, hi
    kpm_base = KPM + b64 * s_kpm_b
    for stage in tl.static_range(0 if HAS_WINDOW else 1, 3):  # masked, interior (stage 1), masked
        for n0 in range(bounds[stage], bounds[stage + 1], BLOCK_N):
            m_s, m_t, l_s, l_t, acc_kl, acc_hs, acc_ht = _fwd_step(
                q_s, q_t, ks_base, kt_base, kpm_base, s_ks_n, s_kt_n, start, n0, offs_m, offs_d, d_ok,
                n_q, n_k, off, window, qk_scale_s, qk_scale_t, m_s, m_t, l_s, l_t, acc_kl, acc_hs, acc_ht,
                stage != 1, CAUSAL, HAS_WINDOW, HAS_KPM, WANT_ENTROPY, DOT_PRECISION, BLOCK_N,
            )  # fmt: skip

    # Both maps share one mask, so a row is empty for both or for neither.
    empty = l_t == 0.0
    l_t = tl.where(empty, 1.0, l_t)
    l_s = tl.where(empty, 1.0, l_s)
    lse2_t = m_t + tl.math.log2(l_t)
    lse2_s = m_s + tl.math.log2(l_s)
    kl = tl.where(empty, 0.0, (acc_kl / l_t - lse2_t + lse2_s) * tc.LN2)
    o_off = b64 * s_o_b + h * s_o_h + rows * s_o_n
    tl.store(KL + o_off, kl, mask=row_ok)
    tl.store(LSE_S + o_off, tl.where(empty, float("-inf"), lse2_s * tc.LN2), mask=row_ok)
    tl.store(LSE_T + o_off, tl.where(empty, float("-inf"), lse2_t * tc.LN2), mask=row_ok)
    if WANT_ENTROPY:
        ent_s = tl.where(empty, 0.0, (tl.math.log2(l_s) - acc_hs / l_s) * tc.LN2)
        ent_t = tl.where(empty, 0.0, (tl.math.log2(l_t) - acc_ht / l_t) * tc.LN2)
        tl.store(ENT_S + o_off, ent_s, mask=row_ok)
        tl.store(ENT_T + o_off, ent_t, mask=row_ok)


@triton.jit
def _row_stats(LSE_S, LSE_T, ENT_S, G_KL, G_ENT, o_off, row_ok, ENT_GRAD: tl.constexpr):
    """Per-row inputs of the backward: ``(lse2_s, lse2_t, g_kl, g_ent, ent_s)``, both LSEs in base 2, the
    upstream KL gradient and, with ``ENT_GRAD``, the upstream entropy gradient and the student entropy
    (without it those two are stand-ins that :func:`_logit_grad` never reads).

    Empty rows store lse = -inf; any finite stand-in works since all their probabilities are 0.
    """
    lse2_s = tl.load(LSE_S + o_off, mask=row_ok, other=0.0) * tc.LOG2E
    lse2_t = tl.load(LSE_T + o_off, mask=row_ok, other=0.0) * tc.LOG2E
    lse2_s = tl.where(lse2_s == float("-inf"), 0.0, lse2_s)
    lse2_t = tl.where(lse2_t == float("-inf"), 0.0, lse2_t)
    g_kl = tl.load(G_KL + o_off, mask=row_ok, other=0.0)
    g_ent = g_kl
    ent_s = g_kl
    if ENT_GRAD:
        g_ent = tl.load(G_ENT + o_off, mask=row_ok, other=0.0)
        ent_s = tl.load(ENT_S + o_off, mask=row_ok, other=0.0)
    return lse2_s, lse2_t, g_kl, g_ent, ent_s


@triton.jit
def _logit_grad(t_s, t_t, vis, lse2_s, lse2_t, g_kl, g_ent, ent_s, ENT_GRAD: tl.constexpr):
    """``dL/ds_S = g (p_S - p_T) + e p_S (lse_S - H_S - s_S)`` on one tile (per-row values pre-broadcast)."""
    p_s = tl.math.exp2(tl.where(vis, t_s, float("-inf")) - lse2_s)
    p_t = tl.math.exp2(tl.where(vis, t_t, float("-inf")) - lse2_t)
    ds = g_kl * (p_s - p_t)
    if ENT_GRAD:
        ds += g_ent * p_s * ((lse2_s - t_s) * tc.LN2 - ent_s)
    return ds


@triton.jit
def attention_kl_bwd_dq_kernel(
    QS, KS, QT, KT, KPM, CU,
    LSE_S, LSE_T, ENT_S, G_KL, G_ENT, DQ,
    s_qs_b, s_qs_h, s_qs_n,
    s_ks_b, s_ks_h, s_ks_n,
    s_qt_b, s_qt_h, s_qt_n,
    s_kt_b, s_kt_h, s_kt_n,
    s_kpm_b,
    s_o_b, s_o_h, s_o_n,
    s_dq_b, s_dq_h, s_dq_n,
    n_q, n_k, H, GROUP_S, GROUP_T, window,
    qk_scale_s, qk_scale_t, sm_scale_s,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_KPM: tl.constexpr, IS_VARLEN: tl.constexpr,
    ENT_GRAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """dq_s for one (query block, batch * head): ``sm_scale_s * dS @ k_s`` over the visible key blocks."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    start, n_q, n_k = tc.document_bounds(CU, b, n_q, n_k, IS_VARLEN)
    m0 = pid_m * BLOCK_M
    if m0 >= n_q:
        return
    off = n_k - n_q
    b64 = b.to(tl.int64)
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    offs_m, row_ok, rows, q_s, q_t = _query_tiles(
        QS, QT, b64, h, start, m0, n_q, offs_d, d_ok, s_qs_b, s_qs_h, s_qs_n, s_qt_b, s_qt_h, s_qt_n, BLOCK_M
    )
    ks_base = KS + b64 * s_ks_b + (h // GROUP_S) * s_ks_h
    kt_base = KT + b64 * s_kt_b + (h // GROUP_T) * s_kt_h
    o_off = b64 * s_o_b + h * s_o_h + rows * s_o_n
    lse2_s, lse2_t, g_kl, g_ent, ent_s = _row_stats(LSE_S, LSE_T, ENT_S, G_KL, G_ENT, o_off, row_ok, ENT_GRAD)

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    # One masked loop over every visible key block (no mask-free interior stage in this kernel).
    lo, _, _, hi = tc.key_block_ranges(m0, n_k, off, window, CAUSAL, HAS_WINDOW, BLOCK_M, BLOCK_N)
    kpm_base = KPM + b64 * s_kpm_b
    for n0 in range(lo, hi, BLOCK_N):
        k_s, t_s, t_t, vis = _key_logits(
            q_s, q_t, ks_base, kt_base, kpm_base, s_ks_n, s_kt_n, start, n0, offs_m, offs_d, d_ok, n_q, n_k,
            off, window, qk_scale_s, qk_scale_t, True, CAUSAL, HAS_WINDOW, HAS_KPM, DOT_PRECISION, BLOCK_N,
        )  # fmt: skip
        ds = _logit_grad(
            t_s, t_t, vis, lse2_s[:, None], lse2_t[:, None], g_kl[:, None], g_ent[:, None], ent_s[:, None],
            ENT_GRAD,
        )  # fmt: skip
        dq += tc.mma(ds.to(k_s.dtype), k_s, None, DOT_PRECISION)
    dq = dq * sm_scale_s
    tl.store(
        DQ + b64 * s_dq_b + h * s_dq_h + rows[:, None] * s_dq_n + offs_d[None, :],
        dq.to(DQ.dtype.element_ty),
        mask=row_ok[:, None] & d_ok[None, :],
    )


@triton.jit
def attention_kl_bwd_dk_kernel(
    QS, KS, QT, KT, KPM, CU,
    LSE_S, LSE_T, ENT_S, G_KL, G_ENT, DK,
    s_qs_b, s_qs_h, s_qs_n,
    s_ks_b, s_ks_h, s_ks_n,
    s_qt_b, s_qt_h, s_qt_n,
    s_kt_b, s_kt_h, s_kt_n,
    s_kpm_b,
    s_o_b, s_o_h, s_o_n,
    s_dk_b, s_dk_h, s_dk_n,
    n_q, n_k, H_KV, GROUP_S, GROUP_T, window,
    qk_scale_s, qk_scale_t, sm_scale_s,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_KPM: tl.constexpr, IS_VARLEN: tl.constexpr,
    ENT_GRAD: tl.constexpr, DOT_PRECISION: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """dk_s for one (key block, batch * student kv head): ``sm_scale_s * dS^T @ q_s`` over its GQA group."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H_KV
    hk = pid_bh % H_KV
    start, n_q, n_k = tc.document_bounds(CU, b, n_q, n_k, IS_VARLEN)
    n0 = pid_n * BLOCK_N
    if n0 >= n_k:
        return
    off = n_k - n_q
    b64 = b.to(tl.int64)
    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    col_ok = offs_n < n_k
    d_ok = offs_d < HEAD_DIM
    cols = (start + offs_n).to(tl.int64)
    k_mask = col_ok[:, None] & d_ok[None, :]
    k_s = _load_rows(KS + b64 * s_ks_b + hk * s_ks_h, cols, offs_d, k_mask, s_ks_n)
    if HAS_KPM:
        key_ok = tc.key_kept(KPM + b64 * s_kpm_b, offs_n, 1, n_k, True)

    # Query blocks that can see this key block (one masked loop; no mask-free interior stage here).
    lo, _, _, hi = tc.query_block_ranges(n0, n_q, off, window, CAUSAL, HAS_WINDOW, BLOCK_M, BLOCK_N)
    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for g in range(0, GROUP_S):
        h = hk * GROUP_S + g
        k_t = _load_rows(KT + b64 * s_kt_b + (h // GROUP_T) * s_kt_h, cols, offs_d, k_mask, s_kt_n)
        for m0 in range(lo, hi, BLOCK_M):
            offs_m, row_ok, rows, q_s, q_t = _query_tiles(
                QS, QT, b64, h, start, m0, n_q, offs_d, d_ok, s_qs_b, s_qs_h, s_qs_n, s_qt_b, s_qt_h, s_qt_n,
                BLOCK_M,
            )  # fmt: skip
            o_off = b64 * s_o_b + h * s_o_h + rows * s_o_n
            lse2_s, lse2_t, g_kl, g_ent, ent_s = _row_stats(
                LSE_S, LSE_T, ENT_S, G_KL, G_ENT, o_off, row_ok, ENT_GRAD
            )
            # Transposed tiles (keys x queries) so that dk accumulates with one dot and no transpose of dS.
            t_s = tc.mma(k_s, tl.trans(q_s), None, DOT_PRECISION) * qk_scale_s
            t_t = tc.mma(k_t, tl.trans(q_t), None, DOT_PRECISION) * qk_scale_t
            vis = tc.visible(offs_m[None, :], offs_n[:, None], n_q, n_k, off, window, CAUSAL, HAS_WINDOW)
            if HAS_KPM:
                vis = vis & key_ok[:, None]
            ds = _logit_grad(
                t_s, t_t, vis, lse2_s[None, :], lse2_t[None, :], g_kl[None, :], g_ent[None, :],
                ent_s[None, :], ENT_GRAD,
            )  # fmt: skip
            dk += tc.mma(ds.to(q_s.dtype), q_s, None, DOT_PRECISION)
    dk = dk * sm_scale_s
    tl.store(
        DK + b64 * s_dk_b + hk * s_dk_h + cols[:, None] * s_dk_n + offs_d[None, :],
        dk.to(DK.dtype.element_ty),
        mask=k_mask,
    )
