"""Plain-PyTorch specifications of every asu kernel.

Each function here is the *definition* the Triton kernels and the CPU path (:mod:`asu_kernels._cpu_attention`)
are tested against (run in float64); float64 inputs of the attention ops run it. They favour clarity over
speed: attention materialises the full (N x N) score matrix and the vocabulary losses materialise the full
logits.

Conventions shared with the kernels
-----------------------------------
Attention
    * Dense layout: ``q`` (B, Hq, Nq, D), ``k``/``v`` (B, Hkv, Nk, D) with ``Hq % Hkv == 0`` (GQA/MQA:
      query head ``h`` reads key/value head ``h // (Hq // Hkv)``).
    * Varlen (packed) layout: ``q`` (total, Hq, D), ``k``/``v`` (total, Hkv, D) and ``cu_seqlens`` (B+1,)
      int32, non-decreasing from 0 to total; document ``b`` owns rows ``cu_seqlens[b]:cu_seqlens[b+1]``
      and attends only within itself.
    * Logit ``s_ij = (q_i . k_j) * scale / temperature``, ``scale`` defaulting to ``1/sqrt(D)``. With a
      ``softcap`` ``c`` the logit is soft-capped after the scale and the temperature:
      ``s_ij = c * tanh((q_i . k_j) * scale / (temperature * c))`` (Gemma-2's ``attn_logit_softcapping``;
      transformers' eager attention caps after its scaling, which smoothing divides by the temperature).
    * ``causal``: bottom-right aligned, as in FlashAttention-2 — query ``i`` of ``Nq`` sees key ``j`` of
      ``Nk`` iff ``j <= i + (Nk - Nq)`` (equal lengths: ``j <= i``; decoding one token: every key).
    * ``window`` (an int ``W >= 1``, Hugging Face's ``sliding_window``): query ``i`` sees key ``j`` iff
      ``(i + Nk - Nq) - j < W``, i.e. itself and the ``W - 1`` keys before it. Used together with causal.
    * Both rules are :func:`visible` (with :func:`aligned_key`); :func:`attention_mask` adds the key
      padding. The kernels' host code and the Triton kernels apply the same rule.
    * ``key_padding_mask`` (B, Nk) bool, True where the key is a real token (dense layout only).
    * ``lse`` is the natural-log log-sum-exp of the visible logits, fp32, shaped like ``q`` without its
      last dim: (B, Hq, Nq) dense, (total, Hq) varlen. A row with no visible key has ``lse = -inf`` and a
      zero output (never NaN), and passes zero gradient.

Vocabulary losses (rows are tokens, ``M`` of them; ``V`` is the vocabulary)
    * ``linear_kl``: ``sum_i w_i * KL(softmax(hT_i WT^T + bT) || softmax(hS_i WS^T + bS))``;
      ``weights=None`` means the plain mean over rows (``w_i = 1/M``).
    * ``linear_cross_entropy``: ``sum_i w_i * (-log softmax(h_i W^T + b)[y_i])`` over rows whose label is not
      ``ignore_index``; ``weights=None`` means the mean over those rows (0 when there are none).
    * ``softcap=c`` (both losses): every logit ``x = h W^T + b`` becomes ``c * tanh(x / c)`` before the
      softmax (Gemma-2's ``final_logit_softcapping``), on the student and the teacher side alike.
"""

from __future__ import annotations

import math

import torch
import torch.nn.functional as F

__all__ = [
    "aligned_key",
    "visible",
    "attention_mask",
    "attention",
    "attention_varlen",
    "linear_kl",
    "linear_cross_entropy",
    "attention_kl",
]


def aligned_key(i, n_q: int, n_k: int):
    """The key aligned with query ``i`` (int or int tensor) of ``Nq`` against ``Nk`` keys: ``i + Nk - Nq``.

    The masks are aligned bottom-right, as in FlashAttention-2: the last query faces the last key, so a
    decoding step (one query) sits at the end of its cache.
    """
    return i + (n_k - n_q)


def visible(i, j, n_q: int, n_k: int, *, causal: bool, window: int | None):
    """Whether query ``i`` of ``Nq`` sees key ``j`` of ``Nk`` (ints or broadcastable int tensors).

    Within bounds; ``causal``: ``j <= aligned_key(i)``; ``window`` ``W``: ``aligned_key(i) - j < W`` (the
    aligned key and the ``W - 1`` before it). Key padding and packed documents are applied on top: see
    :func:`attention_mask` and :func:`attention_varlen`. The Triton kernels apply the same rule
    (:func:`asu_kernels._triton_common.visible`).
    """
    diag = aligned_key(i, n_q, n_k)
    ok = (i < n_q) & (j < n_k)
    if causal:
        ok = ok & (j <= diag)
    if window is not None:
        ok = ok & (diag - j < window)
    return ok


def attention_mask(
    n_q: int,
    n_k: int,
    *,
    causal: bool,
    window: int | None,
    key_padding_mask: torch.Tensor | None = None,
    device: torch.device | str = "cpu",
) -> torch.Tensor:
    """Boolean visibility mask, True = the query may attend to the key (:func:`visible`).

    (Nq, Nk); with ``key_padding_mask`` (B, Nk) (True = real key) the padded keys are hidden too and the
    mask is (B, 1, Nq, Nk), broadcastable over heads.
    """
    i = torch.arange(n_q, device=device)[:, None]
    j = torch.arange(n_k, device=device)[None, :]
    mask = visible(i, j, n_q, n_k, causal=causal, window=window)
    if key_padding_mask is not None:
        mask = mask & key_padding_mask[:, None, None, :].to(torch.bool)
    return mask


def _scores(
    q: torch.Tensor, k: torch.Tensor, scale: float | None, temperature: float, softcap: float | None = None
) -> torch.Tensor:
    """(B, Hq, Nq, Nk) logits ``q k^T * scale / temperature``, then ``softcap * tanh(. / softcap)`` when a
    cap is given; GQA by index (query head ``h`` reads key head ``h // (Hq // Hkv)``): broadcasting the key
    head over its group of query heads is the definition."""
    scale = 1.0 / math.sqrt(q.shape[-1]) if scale is None else scale
    k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
    scores = torch.matmul(q, k.transpose(-1, -2)) * (scale / temperature)
    return scores if softcap is None else softcap * torch.tanh(scores / softcap)


def _per_document(
    dense_fn, cu_seqlens: torch.Tensor, *packed: torch.Tensor
) -> tuple[torch.Tensor, ...] | None:
    """``dense_fn`` on each document of a packed batch, its results concatenated over the documents.

    Document ``b`` is rows ``cu_seqlens[b]:cu_seqlens[b+1]`` of each (total, H, ...) tensor, handed to
    ``dense_fn`` as (1, H, n, ...); each (1, H, n[, D]) result comes back as (n, H[, D]). None for a batch
    without documents.
    """
    outs = []
    bounds = cu_seqlens.tolist()
    for start, end in zip(bounds[:-1], bounds[1:], strict=True):
        res = dense_fn(*(t[start:end].transpose(0, 1)[None] for t in packed))
        outs.append([r[0].transpose(0, 1) for r in res])
    if not outs:
        return None
    return tuple(torch.cat(parts) for parts in zip(*outs, strict=True))


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    causal: bool = True,
    scale: float | None = None,
    temperature: float = 1.0,
    window: int | None = None,
    key_padding_mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
    softcap: float | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Temperature-scaled attention, computed in the dtype of the inputs.

    Args:
        q: (B, Hq, Nq, D); k, v: (B, Hkv, Nk, D). With ``cu_seqlens`` (B+1,) integer offsets the layout is
            packed instead: q (total, Hq, D), k/v (total, Hkv, D), each document attending only within itself.
        key_padding_mask: optional (B, Nk) bool, True = real key (dense layout only).
        softcap: optional logit soft-cap ``c > 0`` (see the module docstring).

    Returns:
        out shaped like q, in q's dtype, and lse shaped like q without its last dim, in float32 (float64
        when q is float64).
    """
    if cu_seqlens is not None:
        return _attention_packed(q, k, v, cu_seqlens, causal=causal, scale=scale, temperature=temperature,
                                 window=window, softcap=softcap)  # fmt: skip
    b, hq, n_q, _ = q.shape
    n_k = k.shape[2]
    scores = _scores(q, k, scale, temperature, softcap)
    v = v.repeat_interleave(hq // v.shape[1], dim=1)
    mask = attention_mask(
        n_q, n_k, causal=causal, window=window, key_padding_mask=key_padding_mask, device=q.device
    ).expand(b, hq, n_q, n_k)
    scores = scores.masked_fill(~mask, float("-inf"))
    lse = torch.logsumexp(scores, dim=-1)
    # Rows with no visible key: exp(-inf - (-inf)) would be NaN; define p = 0 there instead.
    probs = torch.exp(scores - torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)[..., None])
    out = torch.matmul(probs, v)
    return out.to(q.dtype), lse.to(_lse_dtype(q))


def _lse_dtype(q: torch.Tensor) -> torch.dtype:
    return torch.float64 if q.dtype == torch.float64 else torch.float32


def _attention_packed(q, k, v, cu_seqlens, **options) -> tuple[torch.Tensor, torch.Tensor]:
    """Each document of ``cu_seqlens`` through the dense definition; (total, Hq, D) out, (total, Hq) lse."""
    res = _per_document(lambda *qkv: attention(*qkv, **options), cu_seqlens, q, k, v)
    if res is None:
        return q.new_zeros(q.shape), q.new_zeros(q.shape[:-1], dtype=_lse_dtype(q))
    return res  # type: ignore[return-value]


def attention_varlen(q, k, v, cu_seqlens, **options) -> tuple[torch.Tensor, torch.Tensor]:
    """Packed attention: the same as ``attention(q, k, v, cu_seqlens=cu_seqlens, ...)``."""
    return attention(q, k, v, cu_seqlens=cu_seqlens, **options)


def _logits(
    hidden: torch.Tensor, weight: torch.Tensor, bias: torch.Tensor | None, softcap: float | None = None
) -> torch.Tensor:
    logits = hidden @ weight.T
    logits = logits if bias is None else logits + bias
    return logits if softcap is None else softcap * torch.tanh(logits / softcap)


def linear_kl(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    weights: torch.Tensor | None = None,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
    *,
    softcap: float | None = None,
) -> torch.Tensor:
    """``sum_i w_i * KL(p_T,i || p_S,i)`` with ``p = softmax(h W^T + b)`` (soft-capped logits with
    ``softcap``), materialising the logits.

    Args:
        student_hidden, teacher_hidden: (M, d). student_weight, teacher_weight: (V, d). weights: (M,).

    Returns:
        A scalar in the hidden states' dtype. Gradients flow to the student side only when the caller
        detaches the teacher (the fused kernel never produces teacher gradients).
    """
    log_p_s = torch.log_softmax(_logits(student_hidden, student_weight, student_bias, softcap), dim=-1)
    log_p_t = torch.log_softmax(_logits(teacher_hidden, teacher_weight, teacher_bias, softcap), dim=-1)
    per_row = F.kl_div(log_p_s, log_p_t, reduction="none", log_target=True).sum(-1)
    if weights is None:
        return per_row.mean() if per_row.numel() else per_row.sum()
    return (per_row * weights.to(per_row.dtype)).sum()


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    weights: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
    *,
    softcap: float | None = None,
) -> torch.Tensor:
    """Cross-entropy of ``softmax(h W^T + b)`` (soft-capped logits with ``softcap``) against ``labels``,
    materialising the logits.

    Args:
        hidden: (M, d). weight: (V, d). labels: (M,) int64. weights: (M,).

    Returns:
        ``sum_i w_i * CE_i`` over rows whose label is not ``ignore_index``; with ``weights=None`` the mean
        over those rows (0 when every row is ignored).
    """
    logits = _logits(hidden, weight, bias, softcap)
    per_row = F.cross_entropy(logits, labels, ignore_index=ignore_index, reduction="none")
    valid = labels != ignore_index
    if weights is None:
        count = valid.sum()
        return per_row.sum() / count.clamp(min=1).to(per_row.dtype)
    return (per_row * weights.to(per_row.dtype) * valid.to(per_row.dtype)).sum()


def _attention_kl_dense(
    q_s: torch.Tensor,
    k_s: torch.Tensor,
    q_t: torch.Tensor,
    k_t: torch.Tensor,
    *,
    temperature_t: float,
    temperature_s: float,
    causal: bool,
    window: int | None,
    scale: float | None,
    key_padding_mask: torch.Tensor | None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    b, hq, n_q, _ = q_s.shape
    n_k = k_s.shape[2]
    s_s = _scores(q_s, k_s, scale, temperature_s)
    s_t = _scores(q_t, k_t, scale, temperature_t)
    mask = attention_mask(
        n_q, n_k, causal=causal, window=window, key_padding_mask=key_padding_mask, device=q_s.device
    ).expand(b, hq, n_q, n_k)
    # Rows with no visible key get finite dummy logits so that neither logsumexp nor its gradient is NaN;
    # every probability of such a row is zeroed below, making its KL and entropies 0.
    empty = ~mask.any(-1, keepdim=True)
    keep = mask | empty
    log_p_s = torch.log_softmax(s_s.masked_fill(~keep, float("-inf")), dim=-1)
    log_p_t = torch.log_softmax(s_t.masked_fill(~keep, float("-inf")), dim=-1)
    log_p_s = torch.where(mask, log_p_s, torch.zeros_like(log_p_s))
    log_p_t = torch.where(mask, log_p_t, torch.zeros_like(log_p_t))
    p_s = torch.exp(log_p_s) * mask
    p_t = torch.exp(log_p_t) * mask
    kl = (p_t * (log_p_t - log_p_s)).sum(-1)
    return kl, -(p_s * log_p_s).sum(-1), -(p_t * log_p_t).sum(-1)


def attention_kl(
    q_s: torch.Tensor,
    k_s: torch.Tensor,
    q_t: torch.Tensor,
    k_t: torch.Tensor,
    *,
    temperature_t: float,
    temperature_s: float = 1.0,
    causal: bool = True,
    window: int | None = None,
    scale: float | None = None,
    key_padding_mask: torch.Tensor | None = None,
    cu_seqlens: torch.Tensor | None = None,
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Per-query-row ``KL(p_T || p_S)`` between two attention maps, and the entropy of each, materialised.

    ``p_T = softmax(q_t k_t^T * scale / temperature_t)`` (teacher) and ``p_S = softmax(q_s k_s^T * scale /
    temperature_s)`` (student) over the same visible keys (causal / window / padding / varlen mask):
    ``KL_i = sum_j p_T,ij (log p_T,ij - log p_S,ij)`` and ``H_i = -sum_j p_ij log p_ij`` for either side.

    Args:
        q_s, q_t: (B, Hq, Nq, D); k_s: (B, Hkv_s, Nk, D); k_t: (B, Hkv_t, Nk, D); GQA by index on each side.
            Varlen: (total, H, D) tensors with ``cu_seqlens`` (B+1,).
        key_padding_mask: (B, Nk) bool, True = real key (dense layout only).

    Returns:
        ``(kl, entropy_s, entropy_t)``, each (B, Hq, Nq) dense or (total, Hq) varlen, in the inputs' dtype.
        Rows with no visible key give 0 for all three. Gradients flow to whichever inputs require them.
    """
    kw = dict(
        temperature_t=temperature_t, temperature_s=temperature_s, causal=causal, window=window, scale=scale
    )
    if cu_seqlens is None:
        return _attention_kl_dense(q_s, k_s, q_t, k_t, key_padding_mask=key_padding_mask, **kw)
    res = _per_document(
        lambda *qk: _attention_kl_dense(*qk, key_padding_mask=None, **kw), cu_seqlens, q_s, k_s, q_t, k_t
    )
    if res is None:
        z = q_s.new_zeros(q_s.shape[:-1])
        return z, z.clone(), z.clone()
    return res  # type: ignore[return-value]
