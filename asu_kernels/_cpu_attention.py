"""The CPU production path of the attention ops: exact, O(N) memory, never an (N x N) matrix.

These functions are the CPU bodies of the custom ops ``asu_kernels::attention_fwd`` / ``attention_bwd`` and
``asu_kernels::attention_kl_fwd`` / ``attention_kl_bwd`` (the same schemas, fakes and autograd as the Triton
kernels, so ``torch.compile`` sees the same opaque nodes). Which call runs where is decided by
:func:`asu_kernels._backend.cpu_fused_mode` (the dispatch rule is written out in that module's docstring):

* **fused**: PyTorch's CPU flash-attention kernel (``aten._scaled_dot_product_flash_attention_for_cpu``, what
  ``F.scaled_dot_product_attention`` runs on CPU), which returns the natural-log LSE, and its backward;
* **blocked**: an online softmax written in PyTorch. Query rows are taken in chunks of ``bq``; for each chunk
  only the key range its rows can see (causal end, window start) is visited, in blocks of ``bk``. Per row it
  keeps the running max ``m``, the running sum ``l = sum_j exp(s_ij - m)`` and the accumulator
  ``acc = sum_j exp(s_ij - m) v_j``, rescaled by ``exp(m_old - m_new)`` when the max grows; at the end
  ``out = acc / l`` and ``lse = m + log l``. The backward recomputes each tile from the stored LSE:
  ``p = exp(s - lse)``, ``dv += p^T do``, ``dp = do v^T``, ``ds = p (dp - Delta)`` with
  ``Delta_i = do_i . out_i - g_i`` (``g`` the LSE's upstream gradient), times ``1 - tanh^2`` under a soft-cap,
  ``dq += ds k * scale``, ``dk += ds^T q * scale``. Memory: the inputs, the outputs and a few tiles.

GQA reads key head ``h // (Hq / Hkv)`` by index: a query chunk (B, Hq, n, D) is viewed as (B, Hkv, G * n, D),
so one matmul against a key block (B, Hkv, bk, D) serves the whole group without copying the keys, and the
key gradients sum over the group inside that matmul. Inputs of any floating dtype below float64 compute in
fp32 and return in their dtype (the LSE and the KL rows in fp32). Masks are
:func:`asu_kernels.reference.visible` plus key padding and packed documents; a row that sees no key gives 0
and an LSE of ``-inf``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterator

import torch

from asu_kernels import reference
from asu_kernels._backend import cpu_fused_mode

__all__ = ["attention_forward", "attention_backward", "attention_kl_forward", "attention_kl_backward"]

# A tile holds at most this many fp32 logits (B x Hq x bq x bk): ~8 MB, a few of them live at once.
TILE_ELEMENTS = 1 << 21
MIN_BLOCK, MAX_BLOCK = 32, 1024

_FUSED = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu", None)
_FUSED_BWD = getattr(torch.ops.aten, "_scaled_dot_product_flash_attention_for_cpu_backward", None)
_NEG_INF = float("-inf")


# ----------------------------------------------------------------------------------------------- geometry


def block_size(batch_heads: int) -> int:
    """Rows (and keys) per tile: a (batch_heads, bq, bk) fp32 tile stays within :data:`TILE_ELEMENTS`."""
    side = math.isqrt(TILE_ELEMENTS // max(1, batch_heads))
    return max(MIN_BLOCK, min(MAX_BLOCK, 1 << max(0, side.bit_length() - 1)))


def key_range(a: int, b: int, n_q: int, n_k: int, causal: bool, window: int | None) -> tuple[int, int]:
    """``[lo, hi)``: the keys that query rows ``[a, b)`` can see (causal end, window start); empty if none."""
    lo, hi = 0, n_k
    if causal:
        hi = min(n_k, reference.aligned_key(b - 1, n_q, n_k) + 1)
    if window is not None:
        lo = max(0, reference.aligned_key(a, n_q, n_k) - window + 1)
    return lo, max(lo, hi)


class _Dense:
    """One dense problem of the blocked path: shapes, masks and the tiles its loops visit."""

    def __init__(self, b: int, hq: int, n_q: int, n_k: int, causal: bool, window: int | None, kpm):
        self.n_q, self.n_k, self.causal, self.window = n_q, n_k, causal, window
        self.kpm = None if kpm is None else kpm.to(torch.bool)
        self.block = block_size(b * hq)

    def chunks(self) -> Iterator[tuple[int, int, int, int]]:
        """``(a, b, lo, hi)``: query chunk ``[a, b)`` and the key range it sees."""
        for a in range(0, self.n_q, self.block):
            b = min(self.n_q, a + self.block)
            yield (a, b, *key_range(a, b, self.n_q, self.n_k, self.causal, self.window))

    def key_blocks(self, lo: int, hi: int) -> Iterator[tuple[int, int]]:
        for c in range(lo, hi, self.block):
            yield c, min(hi, c + self.block)

    def mask(self, a: int, b: int, c: int, d: int) -> torch.Tensor | None:
        """Visibility of keys ``[c, d)`` to rows ``[a, b)``: (bq, bk), (B, 1, bq, bk) with key padding, or
        None when every key of the tile is visible to every row."""
        n_q, n_k = self.n_q, self.n_k
        inside = (not self.causal or reference.aligned_key(a, n_q, n_k) >= d - 1) and (
            self.window is None or reference.aligned_key(b - 1, n_q, n_k) - c < self.window
        )
        mask = None
        if not inside:
            i = torch.arange(a, b)[:, None]
            j = torch.arange(c, d)[None, :]
            mask = reference.visible(i, j, n_q, n_k, causal=self.causal, window=self.window)
        if self.kpm is not None:
            keys = self.kpm[:, None, None, c:d]
            mask = keys if mask is None else mask & keys
        return mask


def _grouped_mm(x: torch.Tensor, y: torch.Tensor) -> torch.Tensor:
    """``x`` (B, Hq, n, K) times ``y`` (B, Hkv, K, M) with query head ``h`` using ``y``'s head
    ``h // (Hq / Hkv)``: (B, Hq, n, M), through a (B, Hkv, G * n, K) view (no copy of ``y``)."""
    b, hq, n, kdim = x.shape
    hkv = y.shape[1]
    return torch.matmul(x.reshape(b, hkv, (hq // hkv) * n, kdim), y).view(b, hq, n, y.shape[-1])


def _grouped_tmm(x: torch.Tensor, y: torch.Tensor, hkv: int) -> torch.Tensor:
    """``sum_g x_g^T y_g`` over the query heads ``g`` of each key head: x (B, Hq, n, M), y (B, Hq, n, K) ->
    (B, Hkv, M, K); the gradient of a key block from its query heads."""
    b, hq, n, m = x.shape
    g = hq // hkv
    return torch.matmul(x.reshape(b, hkv, g * n, m).transpose(-1, -2), y.reshape(b, hkv, g * n, y.shape[-1]))


def _logits(q_chunk: torch.Tensor, k_block_t: torch.Tensor, softcap: float | None):
    """Tile logits (B, Hq, bq, bk) of a query chunk already multiplied by the scale, and the ``tanh`` of the
    soft-cap (None without one), from the transposed key block (B, Hkv, D, bk)."""
    s = _grouped_mm(q_chunk, k_block_t)
    if softcap is None:
        return s, None
    t = torch.tanh(s.div_(softcap))
    return t * softcap, t


def _scaled_rows(x: torch.Tensor, a: int, b: int, scale: float) -> torch.Tensor:
    """Rows ``[a, b)`` of a (B, H, N, D) tensor, times ``scale``, as a new contiguous fp32 tensor."""
    return (x[:, :, a:b].float() * scale).contiguous()


def _safe(lse: torch.Tensor) -> torch.Tensor:
    """The LSE with ``-inf`` (rows that see no key) replaced by 0, so ``exp(s - lse)`` is 0 there, not NaN."""
    return lse.masked_fill(lse == _NEG_INF, 0.0)


# ---------------------------------------------------------------------------------------- blocked attention


def _blocked_forward(q, k, v, *, causal, sm_scale, window, kpm, softcap):
    """Dense blocked forward: q (B, Hq, Nq, D), k/v (B, Hkv, Nk, D) -> out (B, Hq, Nq, D) fp32, lse fp32."""
    bsz, hq, n_q, dim = q.shape
    geo = _Dense(bsz, hq, n_q, k.shape[2], causal, window, kpm)
    kt = k.float().transpose(-1, -2)  # (B, Hkv, D, Nk): key blocks are column slices
    vf = v.float()
    out = q.new_zeros((bsz, hq, n_q, dim), dtype=torch.float32)
    lse = q.new_full((bsz, hq, n_q), _NEG_INF, dtype=torch.float32)
    for a, b, lo, hi in geo.chunks():
        qc = _scaled_rows(q, a, b, sm_scale)
        m = q.new_full((bsz, hq, b - a), _NEG_INF, dtype=torch.float32)
        l = torch.zeros_like(m)  # noqa: E741 - the running sum of the online softmax
        acc = torch.zeros((bsz, hq, b - a, dim), dtype=torch.float32)
        for c, d in geo.key_blocks(lo, hi):
            s, _ = _logits(qc, kt[..., c:d], softcap)
            mask = geo.mask(a, b, c, d)
            if mask is not None:
                s.masked_fill_(~mask, _NEG_INF)
            m_new = torch.maximum(m, s.amax(-1))
            m_safe = _safe(m_new)
            p = s.sub_(m_safe[..., None]).exp_()
            alpha = torch.exp(m - m_safe)
            l.mul_(alpha).add_(p.sum(-1))
            acc.mul_(alpha[..., None]).add_(_grouped_mm(p, vf[:, :, c:d]))
            m = m_new
        seen = l > 0
        out[:, :, a:b] = torch.where(seen[..., None], acc / l.clamp_min(1e-30)[..., None], 0.0)
        lse[:, :, a:b] = torch.where(seen, m + torch.log(l.clamp_min(1e-30)), _NEG_INF)
    return out, lse


def _blocked_backward(do, q, k, v, out, lse, dlse, *, causal, sm_scale, window, kpm, softcap):
    """Dense blocked backward (recomputing each tile from ``lse``): (dq, dk, dv) in fp32."""
    bsz, hq, n_q, _ = q.shape
    hkv = k.shape[1]
    geo = _Dense(bsz, hq, n_q, k.shape[2], causal, window, kpm)
    kf, vf = k.float(), v.float()
    kt, vt = kf.transpose(-1, -2), vf.transpose(-1, -2)
    dof = do.float()
    delta = (dof * out.float()).sum(-1)
    if dlse is not None:
        delta = delta - dlse.float()
    lse_safe = _safe(lse.float())
    dq = torch.zeros(q.shape, dtype=torch.float32)
    dk = torch.zeros(k.shape, dtype=torch.float32)
    dv = torch.zeros(v.shape, dtype=torch.float32)
    for a, b, lo, hi in geo.chunks():
        qc = _scaled_rows(q, a, b, sm_scale)
        doc = dof[:, :, a:b].contiguous()
        lse_c, delta_c = lse_safe[:, :, a:b, None], delta[:, :, a:b, None]
        for c, d in geo.key_blocks(lo, hi):
            s, t = _logits(qc, kt[..., c:d], softcap)
            mask = geo.mask(a, b, c, d)
            if mask is not None:
                s.masked_fill_(~mask, _NEG_INF)
            p = s.sub_(lse_c).exp_()
            dv[:, :, c:d] += _grouped_tmm(p, doc, hkv)
            ds = _grouped_mm(doc, vt[..., c:d]).sub_(delta_c).mul_(p)
            if t is not None:
                ds.mul_(1.0 - t * t)
            dq[:, :, a:b] += _grouped_mm(ds, kf[:, :, c:d])
            dk[:, :, c:d] += _grouped_tmm(ds, qc, hkv)
    return dq.mul_(sm_scale), dk, dv


# ------------------------------------------------------------------------------------------ fused attention


def _padding_bias(kpm: torch.Tensor | None, dtype: torch.dtype) -> torch.Tensor | None:
    """Key padding as the fused kernel's additive (B, 1, 1, Nk) mask: 0 for real keys, -inf for padding."""
    if kpm is None:
        return None
    bias = torch.zeros((kpm.shape[0], 1, 1, kpm.shape[1]), dtype=dtype)
    return bias.masked_fill_(~kpm.to(torch.bool)[:, None, None, :], _NEG_INF)


def _fused_forward(q, k, v, *, is_causal, sm_scale, kpm):
    """The fused kernel on one dense call; rows of a sequence without any real key get 0 and ``-inf``."""
    out, lse = _FUSED(q, k, v, 0.0, is_causal, attn_mask=_padding_bias(kpm, q.dtype), scale=sm_scale)
    if kpm is not None:
        empty = ~kpm.to(torch.bool).any(-1)  # (B,): the kernel leaves such rows at 0 with an LSE of 0
        if bool(empty.any()):
            out = out.masked_fill(empty[:, None, None, None], 0.0)
            lse = lse.masked_fill(empty[:, None, None], _NEG_INF)
    return out, lse


def _fused_backward(do, q, k, v, out, lse, *, is_causal, sm_scale, kpm):
    return _FUSED_BWD(
        do.contiguous(), q, k, v, out, _safe(lse), 0.0, is_causal,
        attn_mask=_padding_bias(kpm, q.dtype), scale=sm_scale,
    )  # fmt: skip


# ------------------------------------------------------------------------------------------- entry points


def _fused_flag(n_q, n_k, *, causal, window, softcap, kpm) -> bool | None:
    if _FUSED is None:
        return None  # a torch without the CPU flash kernel: the blocked path serves every call
    padded = kpm is not None
    return cpu_fused_mode(n_q, n_k, causal=causal, window=window, softcap=softcap, key_padding=padded)


def _dense_forward(q, k, v, *, causal, sm_scale, window, kpm, softcap):
    flag = _fused_flag(q.shape[2], k.shape[2], causal=causal, window=window, softcap=softcap, kpm=kpm)
    if q.shape[2] == 0 or k.shape[2] == 0:  # the fused kernel crashes on empty sequences
        return q.new_zeros(q.shape), q.new_full(q.shape[:-1], _NEG_INF, dtype=torch.float32)
    if flag is not None:
        return _fused_forward(q, k, v, is_causal=flag, sm_scale=sm_scale, kpm=kpm)
    opts = dict(causal=causal, sm_scale=sm_scale, window=window, kpm=kpm, softcap=softcap)
    return _blocked_forward(q, k, v, **opts)


def _dense_backward(do, q, k, v, out, lse, dlse, *, causal, sm_scale, window, kpm, softcap):
    flag = _fused_flag(q.shape[2], k.shape[2], causal=causal, window=window, softcap=softcap, kpm=kpm)
    if q.shape[2] == 0 or k.shape[2] == 0:
        return torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
    if flag is not None and dlse is None:
        return _fused_backward(do, q, k, v, out, lse, is_causal=flag, sm_scale=sm_scale, kpm=kpm)
    return _blocked_backward(
        do, q, k, v, out, lse, dlse, causal=causal, sm_scale=sm_scale, window=window, kpm=kpm, softcap=softcap
    )


def _documents(cu_seqlens: torch.Tensor) -> list[tuple[int, int]]:
    bounds = cu_seqlens.tolist()
    return [(s, e) for s, e in zip(bounds[:-1], bounds[1:], strict=True) if e > s]


def _as_dense(t: torch.Tensor, s: int, e: int) -> torch.Tensor:
    """Rows ``[s, e)`` of a packed (total, H, ...) tensor as a dense (1, H, n, ...) view."""
    return t[s:e].transpose(0, 1)[None]


def _per_document(cu_seqlens, fn: Callable, outputs: tuple[torch.Tensor, ...], *packed) -> None:
    """Run ``fn`` on each document of a packed call (dense (1, H, n, ...) views of ``packed``) and write its
    results into the matching rows of ``outputs`` (packed (total, H, ...) tensors, zero elsewhere)."""
    for s, e in _documents(cu_seqlens):
        results = fn(*(None if t is None else _as_dense(t, s, e) for t in packed))
        for dst, res in zip(outputs, results, strict=True):
            dst[s:e] = res[0].transpose(0, 1)


def attention_forward(q, k, v, causal, sm_scale, window, cu_seqlens, key_padding_mask, softcap):
    """CPU body of ``asu_kernels::attention_fwd``: ``(out like q, lse fp32 shaped like q without D)``.

    ``window <= 0`` and ``softcap <= 0`` mean none (the op's encoding)."""
    opts = dict(causal=causal, sm_scale=sm_scale, window=window if window > 0 else None,
                softcap=softcap if softcap > 0 else None)  # fmt: skip
    out = torch.empty_like(q)
    lse = torch.empty(tuple(q.shape[:-1]), dtype=torch.float32)
    if cu_seqlens is None:
        o, l = _dense_forward(q, k, v, kpm=key_padding_mask, **opts)  # noqa: E741
        out.copy_(o)
        lse.copy_(l)
        return out, lse
    out.zero_()
    lse.fill_(_NEG_INF)
    _per_document(cu_seqlens, lambda *qkv: _dense_forward(*qkv, kpm=None, **opts), (out, lse), q, k, v)
    return out, lse


def attention_backward(do, q, k, v, out, lse, dlse, causal, sm_scale, window, cu_seqlens, key_padding_mask,
                       softcap):  # fmt: skip
    """CPU body of ``asu_kernels::attention_bwd``: ``(dq, dk, dv)`` shaped and typed like ``q, k, v``."""
    if dlse is not None and not bool(dlse.any()):
        dlse = None  # autograd hands in zeros when the LSE went unused: the fused backward serves the call
    opts = dict(causal=causal, sm_scale=sm_scale, window=window if window > 0 else None,
                softcap=softcap if softcap > 0 else None)  # fmt: skip
    dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
    if cu_seqlens is None:
        grads = _dense_backward(do, q, k, v, out, lse, dlse, kpm=key_padding_mask, **opts)
        for dst, g in zip((dq, dk, dv), grads, strict=True):
            dst.copy_(g)
        return dq, dk, dv
    for t in (dq, dk, dv):
        t.zero_()

    def one(do_d, q_d, k_d, v_d, out_d, lse_d, dlse_d):
        return _dense_backward(do_d, q_d, k_d, v_d, out_d, lse_d, dlse_d, kpm=None, **opts)

    _per_document(cu_seqlens, one, (dq, dk, dv), do, q, k, v, out, lse, dlse)
    return dq, dk, dv


# ---------------------------------------------------------------------------------------- attention-map KL


def _kl_row_terms(s_s, s_t, lse_s, lse_t, mask):
    """``p_S``, ``p_T`` and the log-probabilities of a tile (masked entries: p = 0, log p = 0)."""
    log_s = s_s - lse_s
    log_t = s_t - lse_t
    if mask is not None:
        log_s.masked_fill_(~mask, 0.0)
        log_t.masked_fill_(~mask, 0.0)
    p_s, p_t = torch.exp(log_s), torch.exp(log_t)
    if mask is not None:
        p_s.masked_fill_(~mask, 0.0)
        p_t.masked_fill_(~mask, 0.0)
    return p_s, p_t, log_s, log_t


def _kl_tiles(geo: _Dense, a, b, lo, hi, qs, qt, kst, ktt):
    """Yield ``(c, d, s_S, s_T, mask)`` over the key blocks of query chunk ``[a, b)``, masked logits fp32."""
    for c, d in geo.key_blocks(lo, hi):
        s_s, _ = _logits(qs, kst[..., c:d], None)
        s_t, _ = _logits(qt, ktt[..., c:d], None)
        mask = geo.mask(a, b, c, d)
        if mask is not None:
            s_s.masked_fill_(~mask, _NEG_INF)
            s_t.masked_fill_(~mask, _NEG_INF)
        yield c, d, s_s, s_t, mask


def _online_lse(m: torch.Tensor, l: torch.Tensor, s: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:  # noqa: E741
    """One step of the running log-sum-exp: the new max and sum after the tile's logits ``s``."""
    m_new = torch.maximum(m, s.amax(-1))
    m_safe = _safe(m_new)
    return m_new, l * torch.exp(m - m_safe) + torch.exp(s - m_safe[..., None]).sum(-1)


def _finish_lse(m: torch.Tensor, l: torch.Tensor) -> torch.Tensor:  # noqa: E741
    return torch.where(l > 0, m + torch.log(l.clamp_min(1e-30)), _NEG_INF)


def _dense_kl_forward(q_s, k_s, q_t, k_t, *, scale_s, scale_t, causal, window, kpm):
    """Per-row KL and entropies of one dense problem (all (B, Hq, Nq) fp32) and both LSEs.

    Two passes over each chunk's keys: running log-sum-exps of both maps, then the exact probabilities:
    ``KL_i = sum_j p_T (log p_T - log p_S)``, ``H_i = -sum_j p log p``."""
    bsz, hq, n_q, _ = q_s.shape
    geo = _Dense(bsz, hq, n_q, k_s.shape[2], causal, window, kpm)
    kst, ktt = k_s.float().transpose(-1, -2), k_t.float().transpose(-1, -2)
    rows = _kl_rows((bsz, hq, n_q))
    for a, b, lo, hi in geo.chunks():
        qs = _scaled_rows(q_s, a, b, scale_s)
        qt = _scaled_rows(q_t, a, b, scale_t)
        m_s = q_s.new_full((bsz, hq, b - a), _NEG_INF, dtype=torch.float32)
        m_t, l_s, l_t = m_s.clone(), torch.zeros_like(m_s), torch.zeros_like(m_s)
        for _, _, s_s, s_t, _ in _kl_tiles(geo, a, b, lo, hi, qs, qt, kst, ktt):
            m_s, l_s = _online_lse(m_s, l_s, s_s)
            m_t, l_t = _online_lse(m_t, l_t, s_t)
        lse_s, lse_t = _finish_lse(m_s, l_s), _finish_lse(m_t, l_t)
        ls, lt = _safe(lse_s)[..., None], _safe(lse_t)[..., None]
        for _, _, s_s, s_t, mask in _kl_tiles(geo, a, b, lo, hi, qs, qt, kst, ktt):
            p_s, p_t, log_s, log_t = _kl_row_terms(s_s, s_t, ls, lt, mask)
            rows[0][:, :, a:b] += (p_t * (log_t - log_s)).sum(-1)
            rows[3][:, :, a:b] -= (p_s * log_s).sum(-1)
            rows[4][:, :, a:b] -= (p_t * log_t).sum(-1)
        rows[1][:, :, a:b], rows[2][:, :, a:b] = lse_s, lse_t
    return rows


def _kl_rows(shape: tuple[int, ...]) -> tuple[torch.Tensor, ...]:
    """Fresh fp32 ``(kl, lse_s, lse_t, ent_s, ent_t)`` for rows that see no key: 0, -inf, -inf, 0, 0."""
    return tuple(torch.full(shape, v, dtype=torch.float32) for v in (0.0, _NEG_INF, _NEG_INF, 0.0, 0.0))


def _dense_kl_backward(g_kl, g_ent, q_s, k_s, q_t, k_t, lse_s, lse_t, ent_s, *, scale_s, scale_t, causal,
                       window, kpm):  # fmt: skip
    """``(dq_s, dk_s)`` fp32 of one dense problem: ``dL/ds_S = g (p_S - p_T) + e p_S (lse_S - H_S - s_S)``."""
    bsz, hq, n_q, _ = q_s.shape
    hkv = k_s.shape[1]
    geo = _Dense(bsz, hq, n_q, k_s.shape[2], causal, window, kpm)
    ksf = k_s.float()
    kst, ktt = ksf.transpose(-1, -2), k_t.float().transpose(-1, -2)
    ls_all, lt_all = _safe(lse_s.float()), _safe(lse_t.float())
    dq = torch.zeros(q_s.shape, dtype=torch.float32)
    dk = torch.zeros(k_s.shape, dtype=torch.float32)
    for a, b, lo, hi in geo.chunks():
        qs = _scaled_rows(q_s, a, b, scale_s)
        qt = _scaled_rows(q_t, a, b, scale_t)
        ls, lt = ls_all[:, :, a:b, None], lt_all[:, :, a:b, None]
        g = g_kl[:, :, a:b, None].float()
        for c, d, s_s, s_t, mask in _kl_tiles(geo, a, b, lo, hi, qs, qt, kst, ktt):
            p_s, p_t, log_s, _ = _kl_row_terms(s_s, s_t, ls, lt, mask)
            ds = (p_s - p_t).mul_(g)
            if g_ent is not None:
                # d H_S / d s_S,ij = -p_ij (log p_ij + H_i) = p_ij (lse_i - H_i - s_ij)
                e = g_ent[:, :, a:b, None].float()
                ds.sub_(p_s * (log_s + ent_s[:, :, a:b, None].float()) * e)
            dq[:, :, a:b] += _grouped_mm(ds, ksf[:, :, c:d])
            dk[:, :, c:d] += _grouped_tmm(ds, qs, hkv)
    return dq.mul_(scale_s), dk


def _kl_options(scale_s, scale_t, causal, window) -> dict:
    return dict(scale_s=scale_s, scale_t=scale_t, causal=causal, window=window if window > 0 else None)


def attention_kl_forward(q_s, k_s, q_t, k_t, cu_seqlens, key_padding_mask, scale_s, scale_t, causal, window,
                         want_entropy):  # fmt: skip
    """CPU body of ``asu_kernels::attention_kl_fwd``: fp32 ``(kl, lse_s, lse_t, ent_s, ent_t)`` shaped like
    q_s without D (the entropies empty unless ``want_entropy``)."""
    opts = _kl_options(scale_s, scale_t, causal, window)
    if cu_seqlens is None:
        rows = _dense_kl_forward(q_s, k_s, q_t, k_t, kpm=key_padding_mask, **opts)
    else:
        rows = _kl_rows(tuple(q_s.shape[:-1]))
        one = lambda *qk: _dense_kl_forward(*qk, kpm=None, **opts)  # noqa: E731
        _per_document(cu_seqlens, one, rows, q_s, k_s, q_t, k_t)
    kl, lse_s, lse_t, ent_s, ent_t = rows
    if not want_entropy:
        ent_s, ent_t = kl.new_empty(0), kl.new_empty(0)
    return kl, lse_s, lse_t, ent_s, ent_t


def attention_kl_backward(g_kl, g_ent, q_s, k_s, q_t, k_t, cu_seqlens, key_padding_mask, lse_s, lse_t, ent_s,
                          scale_s, scale_t, causal, window):  # fmt: skip
    """CPU body of ``asu_kernels::attention_kl_bwd``: ``(dq_s, dk_s)`` shaped and typed like q_s, k_s.
    ``g_ent`` None: no gradient through the student entropy."""
    opts = _kl_options(scale_s, scale_t, causal, window)
    dq, dk = q_s.new_empty(q_s.shape), k_s.new_empty(k_s.shape)
    if cu_seqlens is None:
        grads = _dense_kl_backward(
            g_kl, g_ent, q_s, k_s, q_t, k_t, lse_s, lse_t, ent_s, kpm=key_padding_mask, **opts
        )
        dq.copy_(grads[0])
        dk.copy_(grads[1])
        return dq, dk
    dq.zero_()
    dk.zero_()

    def one(g_d, e_d, qs_d, ks_d, qt_d, kt_d, ls_d, lt_d, ent_d):
        return _dense_kl_backward(g_d, e_d, qs_d, ks_d, qt_d, kt_d, ls_d, lt_d, ent_d, kpm=None, **opts)

    ent = ent_s if g_ent is not None else None
    _per_document(cu_seqlens, one, (dq, dk), g_kl, g_ent, q_s, k_s, q_t, k_t, lse_s, lse_t, ent)
    return dq, dk
