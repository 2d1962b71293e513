"""ASU, Attention Smoothing Unlearning (the package's method; Zare Zade et al., ICLR 2026).

``L_ASU = (1/S) sum_s (1/T_s) sum_t KL(p_tau(.|x, y<t) || p_theta(.|x, y<t))``: the student ``p_theta`` is
distilled toward the forget-teacher ``p_tau`` (the original model with the selected layers' attention
softmax at temperature ``tau``) along the forget answers; per-sequence mean first, then the mean over
sequences (row weights ``1 / (T_s S)``). Total ``lam * L_ASU + L_R``. As ``asu_loss`` of the authors' trainer
(``ignore_first_token=False``).

The end of turn (parameter ``eos``, asu's option; not in the paper)
    Smoothing every layer of a real instruct model can move the teacher's mass onto the end-of-turn token at
    answer positions (SmolLM2-135M-Instruct at τ 2: ``<|im_end|>`` top-1 with p ≈ 0.3 at the first answer
    position), so the student learns to answer nothing. With ``eos="renorm"`` the teacher's distribution at
    every label row whose target is not a stop token is ``p̃_tau(v) = p_tau(v) / (1 - p_tau(E))`` for ``v``
    outside the stop tokens ``E`` (the model config's and generation config's EOS ids) and 0 on ``E``: the
    teacher is conditioned on the answer going on, which it does along the true answer. Rows whose target is
    a stop token (the true end of the answer) keep the full ``p_tau``. Computed in the fused KL by giving the
    teacher's LM head a bias of ``-inf`` on the stop tokens' columns for those rows (softmax over the other
    ``V - |E|`` logits is exactly ``p̃_tau``); under a final-logit soft-cap ``c`` the masked logit becomes
    ``-c`` instead (``c tanh(-inf) = -c``), which leaves ``e^{-2c}``-small mass there.

    The student is *not* renormalised: ``KL(p̃_tau || p_theta)`` over the whole vocabulary, so its gradient
    on a stop token's logit is ``p_theta(E) > 0`` and the student is taught not to end an answer mid-way,
    the behaviour the original model has there. Renormalising the student as well would leave its
    end-of-turn logit untrained at those rows (zero gradient), free to drift up under the forget term's
    pressure on the rest of the distribution — the collapse the option exists to prevent.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from asu.data import sequence_weights
from asu.methods.common import Rows, kl, model_stop_ids, student_rows, teacher_rows
from asu.methods.sources import AUTHORS_LOSSES, AUTHORS_TOFU_ASU
from asu.methods.spec import Batches, Method, Param

__all__ = [
    "METHOD", "EOS", "EOS_CHOICES", "LAM", "TEMPERATURE", "asu_term", "smoothed_kl", "stop_masked_bias",
]  # fmt: skip

LAM = Param(
    "lam", 0.1, f"{AUTHORS_TOFU_ASU} (forget_coeff)", "weight of the forget term", "nonnegative", field="lam"
)
TEMPERATURE = Param(
    "temperature", 2.3, f"{AUTHORS_TOFU_ASU} (attention_temp)",
    "attention temperature of the forget-teacher (or auto[:R])", field="temperature",
)  # fmt: skip
#: ``keep``: the paper's teacher; ``renorm``: the teacher's end-of-turn mass removed and renormalised at every
#: answer row that is not the true end (see the module docstring).
EOS_CHOICES = ("keep", "renorm")
EOS = Param(
    "eos", "keep", "asu (the paper's teacher keeps it)",
    "the teacher's end-of-turn probability inside the answer: keep, or renorm (removed, renormalised)",
    kind="choice", choices=EOS_CHOICES,
)  # fmt: skip


def stop_masked_bias(bias: torch.Tensor | None, weight: torch.Tensor, stops: torch.Tensor) -> torch.Tensor:
    """The LM-head bias (V,) with ``-inf`` on the columns ``stops`` (zeros elsewhere when ``bias`` is None),
    in the head's dtype: ``softmax(h W^T + b')`` is the renormalised distribution without those tokens."""
    base = torch.zeros(weight.shape[0], dtype=weight.dtype, device=weight.device) if bias is None else bias
    masked = base.detach().clone()
    masked[stops.to(masked.device)] = float("-inf")
    return masked


def smoothed_kl(
    ctx: Any, forget: dict[str, torch.Tensor], rows: Rows, weights: torch.Tensor, eos: str = "keep"
) -> torch.Tensor:
    """``sum_i w_i KL(p_tau,i || p_theta,i)`` over the forget label rows, the teacher smoothed (with
    ``eos="renorm"`` its stop tokens removed and renormalised on the rows that do not end the answer)."""
    t_hidden, t_weight, t_bias = teacher_rows(ctx, forget, rows.mask, smoothed=True, part="forget")
    if eos == "keep":
        return kl(ctx, rows.hidden, t_hidden, (t_weight, t_bias), weights=weights)
    stops = torch.tensor(model_stop_ids(ctx.student), dtype=torch.long, device=rows.targets.device)
    at_end = torch.isin(rows.targets, stops)
    # Two fused calls over the same rows: each drops the rows whose weight is 0, so the cost is one call's.
    inside = kl(
        ctx, rows.hidden, t_hidden, (t_weight, stop_masked_bias(t_bias, t_weight, stops)),
        weights=torch.where(at_end, 0.0, weights),
    )  # fmt: skip
    end = kl(ctx, rows.hidden, t_hidden, (t_weight, t_bias), weights=torch.where(at_end, weights, 0.0))
    return inside + end


def asu_term(ctx: Any, batches: Batches, params: Mapping[str, Any]) -> torch.Tensor:
    """``L_ASU`` on the forget batch."""
    rows = student_rows(ctx, batches.forget)
    w = sequence_weights(rows.seq, rows.num_sequences).to(rows.hidden.device)
    return smoothed_kl(ctx, batches.forget, rows, w, params.get("eos", "keep"))


METHOD = Method(
    name="asu", title="ASU", forget=asu_term, reference=f"{AUTHORS_LOSSES} (asu_loss)",
    formula="mean_s (1/T_s) Σ_t KL(p_τ ‖ p_θ) on forget answers",
    forget_weight="lam", teacher_reads=(("forget", True),), params=(LAM, TEMPERATURE, EOS),
)  # fmt: skip
