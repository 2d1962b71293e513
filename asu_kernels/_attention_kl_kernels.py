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
converted back to natural units on the way out.
"""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def _dot(a, b, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr):
    """``a @ b`` with fp32 accumulation. The triton 3.6 interpreter multiplies bf16 operands wrongly (errors
    of 1e10), so under the interpreter bf16 operands are widened first: bf16 products are exact in fp32, so
    the result is the one a GPU computes, up to the order of the additions."""
    if UPCAST_DOT:
        return tl.dot(a.to(tl.float32), b.to(tl.float32), input_precision="ieee")
    return tl.dot(a, b, input_precision=DOT_PRECISION)


@triton.jit
def _fwd_step(
    q_s, q_t, ks_base, kt_base, kpm_base, s_ks_n, s_kt_n, start, n0, offs_m, offs_d, d_ok,
    n_k, off, window, qk_scale_s, qk_scale_t,
    m_s, m_t, l_s, l_t, acc_kl, acc_hs, acc_ht,
    MASKED: tl.constexpr, CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_KPM: tl.constexpr,
    WANT_ENTROPY: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """One key block of the forward stream: update both maps' running max / sum and the accumulators.

    ``MASKED=False`` is for interior blocks that every row sees whole (only padding, if any, is masked).
    """
    offs_n = n0 + tl.arange(0, BLOCK_N)
    cols = (start + offs_n).to(tl.int64)
    if MASKED:
        col_ok = offs_n < n_k
        k_mask = col_ok[:, None] & d_ok[None, :]
    else:
        k_mask = d_ok[None, :]
    k_s = tl.load(ks_base + cols[:, None] * s_ks_n + offs_d[None, :], mask=k_mask, other=0.0)
    k_t = tl.load(kt_base + cols[:, None] * s_kt_n + offs_d[None, :], mask=k_mask, other=0.0)
    # Raw (unmasked) base-2 logits are finite everywhere, so products with exp2(masked) are 0, not NaN.
    t_s = _dot(q_s, tl.trans(k_s), DOT_PRECISION, UPCAST_DOT) * qk_scale_s
    t_t = _dot(q_t, tl.trans(k_t), DOT_PRECISION, UPCAST_DOT) * qk_scale_t
    if MASKED:
        vis = (offs_m[:, None] >= 0) & col_ok[None, :]
        if CAUSAL:
            vis = vis & (offs_n[None, :] <= offs_m[:, None] + off)
        if HAS_WINDOW:
            vis = vis & ((offs_m[:, None] + off - offs_n[None, :]) < window)
        if HAS_KPM:
            kp = tl.load(kpm_base + offs_n, mask=col_ok, other=0)
            vis = vis & (kp != 0)[None, :]
        tt_m = tl.where(vis, t_t, float("-inf"))
        ts_m = tl.where(vis, t_s, float("-inf"))
    elif HAS_KPM:
        kp = tl.load(kpm_base + offs_n) != 0
        tt_m = tl.where(kp[None, :], t_t, float("-inf"))
        ts_m = tl.where(kp[None, :], t_s, float("-inf"))
    else:
        tt_m = t_t
        ts_m = t_s

    mt_new = tl.maximum(m_t, tl.max(tt_m, 1))
    alpha_t = tl.math.exp2(m_t - mt_new)
    e_t = tl.math.exp2(tt_m - mt_new[:, None])
    acc_kl = acc_kl * alpha_t + tl.sum(e_t * (t_t - t_s), 1)
    if WANT_ENTROPY:
        # sum exp(t - m)(t - m) re-based from m_old to m_new: (t - m_new) = (t - m_old) + (m_old - m_new).
        acc_ht = alpha_t * (acc_ht + (m_t - mt_new) * l_t) + tl.sum(e_t * (t_t - mt_new[:, None]), 1)
    l_t = l_t * alpha_t + tl.sum(e_t, 1)

    ms_new = tl.maximum(m_s, tl.max(ts_m, 1))
    alpha_s = tl.math.exp2(m_s - ms_new)
    e_s = tl.math.exp2(ts_m - ms_new[:, None])
    if WANT_ENTROPY:
        acc_hs = alpha_s * (acc_hs + (m_s - ms_new) * l_s) + tl.sum(e_s * (t_s - ms_new[:, None]), 1)
    l_s = l_s * alpha_s + tl.sum(e_s, 1)
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
    WANT_ENTROPY: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """One (query block, batch * head) program: stream the visible key blocks once for both maps."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    if IS_VARLEN:
        start = tl.load(CU + b)
        n_q = tl.load(CU + b + 1) - start
        n_k = n_q
    else:
        start = 0
    m0 = pid_m * BLOCK_M
    if m0 >= n_q:
        return
    off = n_k - n_q  # bottom-right alignment of the causal / window masks
    b64 = b.to(tl.int64)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < n_q
    d_ok = offs_d < HEAD_DIM
    rows = (start + offs_m).to(tl.int64)
    q_mask = row_ok[:, None] & d_ok[None, :]
    q_s = tl.load(
        QS + b64 * s_qs_b + h * s_qs_h + rows[:, None] * s_qs_n + offs_d[None, :], mask=q_mask, other=0.0
    )
    q_t = tl.load(
        QT + b64 * s_qt_b + h * s_qt_h + rows[:, None] * s_qt_n + offs_d[None, :], mask=q_mask, other=0.0
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

    hi = n_k
    if CAUSAL:
        hi = tl.minimum(n_k, m0 + BLOCK_M + off)
    lo = 0
    if HAS_WINDOW:
        lo = (tl.maximum(0, m0 + off - window + 1) // BLOCK_N) * BLOCK_N
    # Interior key blocks [a, b_end) are visible to every row of the block (inside the causal diagonal and
    # the window, no key past n_k): they skip the mask arithmetic, which only the boundary blocks [lo, a)
    # and [b_end, hi) pay. Rows past n_q need no mask: their values are never stored.
    full_lo = lo
    if HAS_WINDOW:
        full_lo = tl.cdiv(tl.maximum(m0 + BLOCK_M + off - window, 0), BLOCK_N) * BLOCK_N
    full_hi = (n_k // BLOCK_N) * BLOCK_N
    if CAUSAL:
        full_hi = tl.minimum(full_hi, ((m0 + off + 1) // BLOCK_N) * BLOCK_N)
    a = tl.minimum(tl.maximum(full_lo, lo), hi)
    kpm_base = KPM + b64 * s_kpm_b
    b_end = tl.maximum(full_hi, a)
    if HAS_WINDOW:  # without a window the interior starts at key 0: no leading boundary blocks
        for n0 in range(lo, a, BLOCK_N):
            m_s, m_t, l_s, l_t, acc_kl, acc_hs, acc_ht = _fwd_step(
                q_s, q_t, ks_base, kt_base, kpm_base, s_ks_n, s_kt_n, start, n0, offs_m, offs_d, d_ok,
                n_k, off, window, qk_scale_s, qk_scale_t, m_s, m_t, l_s, l_t, acc_kl, acc_hs, acc_ht,
                True, CAUSAL, HAS_WINDOW, HAS_KPM, WANT_ENTROPY, DOT_PRECISION, UPCAST_DOT, BLOCK_N,
            )  # fmt: skip
    for n0 in range(a, b_end, BLOCK_N):
        m_s, m_t, l_s, l_t, acc_kl, acc_hs, acc_ht = _fwd_step(
            q_s, q_t, ks_base, kt_base, kpm_base, s_ks_n, s_kt_n, start, n0, offs_m, offs_d, d_ok,
            n_k, off, window, qk_scale_s, qk_scale_t, m_s, m_t, l_s, l_t, acc_kl, acc_hs, acc_ht,
            False, CAUSAL, HAS_WINDOW, HAS_KPM, WANT_ENTROPY, DOT_PRECISION, UPCAST_DOT, BLOCK_N,
        )  # fmt: skip
    for n0 in range(b_end, hi, BLOCK_N):
        m_s, m_t, l_s, l_t, acc_kl, acc_hs, acc_ht = _fwd_step(
            q_s, q_t, ks_base, kt_base, kpm_base, s_ks_n, s_kt_n, start, n0, offs_m, offs_d, d_ok,
            n_k, off, window, qk_scale_s, qk_scale_t, m_s, m_t, l_s, l_t, acc_kl, acc_hs, acc_ht,
            True, CAUSAL, HAS_WINDOW, HAS_KPM, WANT_ENTROPY, DOT_PRECISION, UPCAST_DOT, BLOCK_N,
        )  # fmt: skip

    # Both maps share one mask, so a row is empty for both or for neither.
    empty = l_t == 0.0
    l_t = tl.where(empty, 1.0, l_t)
    l_s = tl.where(empty, 1.0, l_s)
    lse2_t = m_t + tl.math.log2(l_t)
    lse2_s = m_s + tl.math.log2(l_s)
    ln2 = 0.6931471805599453
    kl = tl.where(empty, 0.0, (acc_kl / l_t - lse2_t + lse2_s) * ln2)
    o_off = b64 * s_o_b + h * s_o_h + rows * s_o_n
    tl.store(KL + o_off, kl, mask=row_ok)
    tl.store(LSE_S + o_off, tl.where(empty, float("-inf"), lse2_s * ln2), mask=row_ok)
    tl.store(LSE_T + o_off, tl.where(empty, float("-inf"), lse2_t * ln2), mask=row_ok)
    if WANT_ENTROPY:
        ent_s = tl.where(empty, 0.0, (tl.math.log2(l_s) - acc_hs / l_s) * ln2)
        ent_t = tl.where(empty, 0.0, (tl.math.log2(l_t) - acc_ht / l_t) * ln2)
        tl.store(ENT_S + o_off, ent_s, mask=row_ok)
        tl.store(ENT_T + o_off, ent_t, mask=row_ok)


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
    qk_scale_s, qk_scale_t, grad_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_KPM: tl.constexpr, IS_VARLEN: tl.constexpr,
    ENT_GRAD: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
):  # fmt: skip
    """dq_s for one (query block, batch * head): ``scale_s * dS @ k_s`` over the visible key blocks."""
    pid_m = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H
    h = pid_bh % H
    if IS_VARLEN:
        start = tl.load(CU + b)
        n_q = tl.load(CU + b + 1) - start
        n_k = n_q
    else:
        start = 0
    m0 = pid_m * BLOCK_M
    if m0 >= n_q:
        return
    off = n_k - n_q
    b64 = b.to(tl.int64)
    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < n_q
    d_ok = offs_d < HEAD_DIM
    rows = (start + offs_m).to(tl.int64)
    q_mask = row_ok[:, None] & d_ok[None, :]
    q_s = tl.load(
        QS + b64 * s_qs_b + h * s_qs_h + rows[:, None] * s_qs_n + offs_d[None, :], mask=q_mask, other=0.0
    )
    q_t = tl.load(
        QT + b64 * s_qt_b + h * s_qt_h + rows[:, None] * s_qt_n + offs_d[None, :], mask=q_mask, other=0.0
    )
    ks_base = KS + b64 * s_ks_b + (h // GROUP_S) * s_ks_h
    kt_base = KT + b64 * s_kt_b + (h // GROUP_T) * s_kt_h
    o_off = b64 * s_o_b + h * s_o_h + rows * s_o_n
    log2e = 1.4426950408889634
    ln2 = 0.6931471805599453
    # Empty rows store lse = -inf; any finite stand-in works since all their probabilities are 0.
    lse2_s = tl.load(LSE_S + o_off, mask=row_ok, other=0.0) * log2e
    lse2_t = tl.load(LSE_T + o_off, mask=row_ok, other=0.0) * log2e
    lse2_s = tl.where(lse2_s == float("-inf"), 0.0, lse2_s)
    lse2_t = tl.where(lse2_t == float("-inf"), 0.0, lse2_t)
    g_kl = tl.load(G_KL + o_off, mask=row_ok, other=0.0)
    if ENT_GRAD:
        g_ent = tl.load(G_ENT + o_off, mask=row_ok, other=0.0)
        ent_s = tl.load(ENT_S + o_off, mask=row_ok, other=0.0)

    dq = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
    hi = n_k
    if CAUSAL:
        hi = tl.minimum(n_k, m0 + BLOCK_M + off)
    lo = 0
    if HAS_WINDOW:
        lo = (tl.maximum(0, m0 + off - window + 1) // BLOCK_N) * BLOCK_N
    for n0 in range(lo, hi, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        col_ok = offs_n < n_k
        cols = (start + offs_n).to(tl.int64)
        k_mask = col_ok[:, None] & d_ok[None, :]
        k_s = tl.load(ks_base + cols[:, None] * s_ks_n + offs_d[None, :], mask=k_mask, other=0.0)
        k_t = tl.load(kt_base + cols[:, None] * s_kt_n + offs_d[None, :], mask=k_mask, other=0.0)
        t_s = _dot(q_s, tl.trans(k_s), DOT_PRECISION, UPCAST_DOT) * qk_scale_s
        t_t = _dot(q_t, tl.trans(k_t), DOT_PRECISION, UPCAST_DOT) * qk_scale_t
        vis = row_ok[:, None] & col_ok[None, :]
        if CAUSAL:
            vis = vis & (offs_n[None, :] <= offs_m[:, None] + off)
        if HAS_WINDOW:
            vis = vis & ((offs_m[:, None] + off - offs_n[None, :]) < window)
        if HAS_KPM:
            kp = tl.load(KPM + b64 * s_kpm_b + offs_n, mask=col_ok, other=0)
            vis = vis & (kp != 0)[None, :]
        p_s = tl.math.exp2(tl.where(vis, t_s, float("-inf")) - lse2_s[:, None])
        p_t = tl.math.exp2(tl.where(vis, t_t, float("-inf")) - lse2_t[:, None])
        ds = g_kl[:, None] * (p_s - p_t)
        if ENT_GRAD:
            ds += g_ent[:, None] * p_s * ((lse2_s[:, None] - t_s) * ln2 - ent_s[:, None])
        dq += _dot(ds.to(k_s.dtype), k_s, DOT_PRECISION, UPCAST_DOT)
    dq = dq * grad_scale
    tl.store(
        DQ + b64 * s_dq_b + h * s_dq_h + rows[:, None] * s_dq_n + offs_d[None, :],
        dq.to(DQ.dtype.element_ty),
        mask=q_mask,
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
    qk_scale_s, qk_scale_t, grad_scale,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    CAUSAL: tl.constexpr, HAS_WINDOW: tl.constexpr, HAS_KPM: tl.constexpr, IS_VARLEN: tl.constexpr,
    ENT_GRAD: tl.constexpr, DOT_PRECISION: tl.constexpr, UPCAST_DOT: tl.constexpr,
    BLOCK_N: tl.constexpr, BLOCK_M: tl.constexpr,
):  # fmt: skip
    """dk_s for one (key block, batch * student kv head): ``scale_s * dS^T @ q_s`` over its GQA group."""
    pid_n = tl.program_id(0)
    pid_bh = tl.program_id(1)
    b = pid_bh // H_KV
    hk = pid_bh % H_KV
    if IS_VARLEN:
        start = tl.load(CU + b)
        n_q = tl.load(CU + b + 1) - start
        n_k = n_q
    else:
        start = 0
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
    k_s = tl.load(
        KS + b64 * s_ks_b + hk * s_ks_h + cols[:, None] * s_ks_n + offs_d[None, :], mask=k_mask, other=0.0
    )
    col_vis = col_ok
    if HAS_KPM:
        kp = tl.load(KPM + b64 * s_kpm_b + offs_n, mask=col_ok, other=0)
        col_vis = col_vis & (kp != 0)
    log2e = 1.4426950408889634
    ln2 = 0.6931471805599453

    # Query rows that can see this key block: causal gives a lower bound, the window an upper one.
    lo = 0
    if CAUSAL:
        lo = (tl.maximum(0, n0 - off) // BLOCK_M) * BLOCK_M
    hi = n_q
    if HAS_WINDOW:
        hi = tl.minimum(n_q, n0 + BLOCK_N - 1 + window - off)

    dk = tl.zeros([BLOCK_N, BLOCK_D], tl.float32)
    for g in range(0, GROUP_S):
        h = hk * GROUP_S + g
        kt_ptrs = KT + b64 * s_kt_b + (h // GROUP_T) * s_kt_h + cols[:, None] * s_kt_n + offs_d[None, :]
        k_t = tl.load(kt_ptrs, mask=k_mask, other=0.0)
        for m0 in range(lo, hi, BLOCK_M):
            offs_m = m0 + tl.arange(0, BLOCK_M)
            row_ok = offs_m < n_q
            rows = (start + offs_m).to(tl.int64)
            q_mask = row_ok[:, None] & d_ok[None, :]
            q_s = tl.load(
                QS + b64 * s_qs_b + h * s_qs_h + rows[:, None] * s_qs_n + offs_d[None, :],
                mask=q_mask,
                other=0.0,
            )
            q_t = tl.load(
                QT + b64 * s_qt_b + h * s_qt_h + rows[:, None] * s_qt_n + offs_d[None, :],
                mask=q_mask,
                other=0.0,
            )
            o_off = b64 * s_o_b + h * s_o_h + rows * s_o_n
            lse2_s = tl.load(LSE_S + o_off, mask=row_ok, other=0.0) * log2e
            lse2_t = tl.load(LSE_T + o_off, mask=row_ok, other=0.0) * log2e
            lse2_s = tl.where(lse2_s == float("-inf"), 0.0, lse2_s)
            lse2_t = tl.where(lse2_t == float("-inf"), 0.0, lse2_t)
            g_kl = tl.load(G_KL + o_off, mask=row_ok, other=0.0)
            # Transposed tiles (keys x queries) so that dk accumulates with one dot and no transpose of dS.
            t_s = _dot(k_s, tl.trans(q_s), DOT_PRECISION, UPCAST_DOT) * qk_scale_s
            t_t = _dot(k_t, tl.trans(q_t), DOT_PRECISION, UPCAST_DOT) * qk_scale_t
            vis = col_vis[:, None] & row_ok[None, :]
            if CAUSAL:
                vis = vis & (offs_n[:, None] <= offs_m[None, :] + off)
            if HAS_WINDOW:
                vis = vis & ((offs_m[None, :] + off - offs_n[:, None]) < window)
            p_s = tl.math.exp2(tl.where(vis, t_s, float("-inf")) - lse2_s[None, :])
            p_t = tl.math.exp2(tl.where(vis, t_t, float("-inf")) - lse2_t[None, :])
            ds = g_kl[None, :] * (p_s - p_t)
            if ENT_GRAD:
                g_ent = tl.load(G_ENT + o_off, mask=row_ok, other=0.0)
                ent_s = tl.load(ENT_S + o_off, mask=row_ok, other=0.0)
                ds += g_ent[None, :] * p_s * ((lse2_s[None, :] - t_s) * ln2 - ent_s[None, :])
            dk += _dot(ds.to(q_s.dtype), q_s, DOT_PRECISION, UPCAST_DOT)
    dk = dk * grad_scale
    tl.store(
        DK + b64 * s_dk_b + hk * s_dk_h + cols[:, None] * s_dk_n + offs_d[None, :],
        dk.to(DK.dtype.element_ty),
        mask=k_mask,
    )
