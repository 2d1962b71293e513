"""``asu-attn`` (EXPERIMENTAL): ASU at the attention maps instead of the output distribution.

For each selected layer ``l``, answer-predicting row ``i`` (the rows and weights ``w_i = 1 / (T_s S)`` of
``asu``) and head ``h``, ``KL_lhi = KL(softmax(q_T k_T^T * scale / tau) || softmax(q_S k_S^T * scale))`` over
the row's visible keys (causal, per packed document, padding excluded), where ``q_S, k_S`` are the student's
post-RoPE queries and keys and ``q_T, k_T`` the original model's at ``tau = 1`` (teacher ``copy`` or ``base``)
or the student's own, detached (teacher ``self``: self-smoothing, no teacher forward). ``L_attn = sum_l sum_i
w_i mean_h KL_lhi`` (a sum over layers, a mean over heads); total ``lam * L_attn + L_R``. Computed by
:func:`asu_kernels.attention_kl`, linear in the sequence length. Not a published method: on the
embedded world it did not beat output-level ASU (``python -m asu.demo.asu_attn_comparison``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

import asu_kernels
from asu.data import label_positions, packed_documents, sequence_weights
from asu.methods.asu import LAM, TEMPERATURE
from asu.methods.spec import Batches, Method
from asu.qk import capture_qk
from asu.smoothing import attention_modules, parse_layers, scale_attribute
from asu.teachers import decoder_hidden

__all__ = ["METHOD", "attention_row_kl", "attention_term"]


def attention_row_kl(
    q_s: torch.Tensor,
    k_s: torch.Tensor,
    q_t: torch.Tensor | None,
    k_t: torch.Tensor | None,
    batch: dict[str, torch.Tensor],
    *,
    temperature: float,
    scale: float | None = None,
) -> torch.Tensor:
    """Head-mean attention-map ``KL(teacher at tau || student)`` per token, (R, L), for one layer of a batch.

    ``q_s`` (R, Hq, L, D), ``k_s`` (R, Hkv, L, D) post-RoPE (``q_t, k_t`` the same shapes, or None for
    self-smoothing). Padded batches (with ``attention_mask``) mask padded keys; packed ones (no mask) run
    per document, from the ``position_ids`` restarts. Gradient flows to ``q_s`` and ``k_s`` only.
    """
    rows, _, length, _ = q_s.shape
    mask = batch.get("attention_mask")
    if mask is not None:
        kpm = mask.to(device=q_s.device, dtype=torch.bool)
        kpm = None if bool(kpm.all()) else kpm
        kl = asu_kernels.attention_kl(
            q_s, k_s, q_t, k_t, temperature_t=temperature, causal=True, scale=scale, key_padding_mask=kpm
        )
        return kl.mean(1)
    position_ids = batch.get("position_ids")
    if position_ids is None:
        kl = asu_kernels.attention_kl(q_s, k_s, q_t, k_t, temperature_t=temperature, causal=True, scale=scale)
        return kl.mean(1)
    cu, max_len = packed_documents(position_ids.to(q_s.device))

    def flat(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.transpose(1, 2).reshape(rows * length, t.shape[1], t.shape[3])

    kl = asu_kernels.attention_kl(
        flat(q_s), flat(k_s), flat(q_t), flat(k_t), temperature_t=temperature, causal=True, scale=scale,
        cu_seqlens=cu, max_seqlen=max_len,
    )  # fmt: skip
    return kl.mean(-1).view(rows, length)


def _softmax_scale(module: nn.Module) -> float | None:
    """The attention module's own softmax scale (``scaling``, or ``scale`` where the family names it so)."""
    name = scale_attribute(module)
    return None if name is None else float(getattr(module, name))


def attention_term(ctx: Any, batches: Batches, params: Mapping[str, Any]) -> torch.Tensor:
    """``L_attn`` on the forget batch, a scalar.

    The student runs its decoder with hooks keeping each selected layer's post-RoPE q, k (with the autograd
    graph); the teacher's come from :meth:`asu.teachers.Teacher.attention_qk` (None: self-smoothing).
    """
    forget = batches.forget
    modules = dict(attention_modules(ctx.student))
    layers = parse_layers(ctx.teacher.layers, max(modules) + 1)
    mask, _, seq = label_positions(forget)
    weights = sequence_weights(seq, int(forget["example_ids"].numel())).to(mask.device)
    target = ctx.teacher.attention_qk(forget, layers)
    with capture_qk(ctx.student, layers) as captured:
        decoder_hidden(ctx.student, forget)
    total = torch.zeros((), dtype=torch.float32, device=mask.device)
    for layer in layers:
        q_s, k_s = captured[layer]
        q_t, k_t = (None, None) if target is None else target[layer]
        per_token = attention_row_kl(
            q_s, k_s, q_t, k_t, forget,
            temperature=ctx.teacher.temperature, scale=_softmax_scale(modules[layer]),
        )  # fmt: skip
        total = total + (per_token[mask].float() * weights).sum()
    return total


METHOD = Method(
    name="asu-attn", title="ASU on attention maps (experimental)", forget=attention_term, reads="attention",
    formula="Σ_layers mean_s (1/T_s) Σ_t mean_heads KL(attention_τ ‖ attention_θ)", experimental=True,
    reference="asu (no published reference)", forget_weight="lam", params=(LAM, TEMPERATURE),
)  # fmt: skip
