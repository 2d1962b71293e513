"""ASU, Attention Smoothing Unlearning (the package's method; Zare Zade et al., ICLR 2026).

``L_ASU = (1/S) sum_s (1/T_s) sum_t KL(p_tau(.|x, y<t) || p_theta(.|x, y<t))``: the student ``p_theta`` is
distilled toward the forget-teacher ``p_tau`` (the original model with the selected layers' attention
softmax at temperature ``tau``) along the forget answers; per-sequence mean first, then the mean over
sequences (row weights ``1 / (T_s S)``). Total ``lam * L_ASU + L_R``. As ``asu_loss`` of the authors' trainer
(``ignore_first_token=False``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from asu.data import sequence_weights
from asu.methods.common import Rows, kl, student_rows, teacher_rows
from asu.methods.sources import AUTHORS_LOSSES, AUTHORS_TOFU_ASU
from asu.methods.spec import Batches, Method, Param

__all__ = ["METHOD", "LAM", "TEMPERATURE", "asu_term", "smoothed_kl"]

LAM = Param(
    "lam", 0.1, f"{AUTHORS_TOFU_ASU} (forget_coeff)", "weight of the forget term", "nonnegative", field="lam"
)
TEMPERATURE = Param(
    "temperature", 2.3, f"{AUTHORS_TOFU_ASU} (attention_temp)",
    "attention temperature of the forget-teacher (or auto[:R])", field="temperature",
)  # fmt: skip


def smoothed_kl(ctx: Any, forget: dict[str, torch.Tensor], rows: Rows, weights: torch.Tensor) -> torch.Tensor:
    """``sum_i w_i KL(p_tau,i || p_theta,i)`` over the forget label rows, the teacher smoothed."""
    t_hidden, t_weight, t_bias = teacher_rows(ctx, forget, rows.mask, smoothed=True, part="forget")
    return kl(ctx, rows.hidden, t_hidden, (t_weight, t_bias), weights=weights)


def asu_term(ctx: Any, batches: Batches, params: Mapping[str, Any]) -> torch.Tensor:
    """``L_ASU`` on the forget batch."""
    rows = student_rows(ctx, batches.forget)
    w = sequence_weights(rows.seq, rows.num_sequences).to(rows.hidden.device)
    return smoothed_kl(ctx, batches.forget, rows, w)


METHOD = Method(
    name="asu", title="ASU", forget=asu_term, reference=f"{AUTHORS_LOSSES} (asu_loss)",
    formula="mean_s (1/T_s) Σ_t KL(p_τ ‖ p_θ) on forget answers",
    forget_weight="lam", teacher_reads=(("forget", True),), params=(LAM, TEMPERATURE),
)  # fmt: skip
