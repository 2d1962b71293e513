"""NPO, negative preference optimisation (Zhang et al. 2024).

``-(2/beta) mean_s log sigmoid(-beta (log p_theta(y_s|x_s) - log p_ref(y_s|x_s)))`` with summed sequence
log-likelihoods and ``p_ref`` the original model, ``+ L_R`` (open-unlearning's weights 1 and 1; the authors'
``npo_loss``, beta 0.1).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from asu.methods.common import reference_sequence_nll, sequence_nll, student_rows
from asu.methods.sources import AUTHORS_LOSSES, ou_config, ou_trainer
from asu.methods.spec import Batches, Method, Param

__all__ = ["METHOD", "npo_loss", "npo_term"]


def npo_loss(nll: torch.Tensor, ref_nll: torch.Tensor, beta: float) -> torch.Tensor:
    """NPO from per-sequence summed NLLs (S,) of the student and the reference model:
    ``log p_theta - log p_ref = ref_nll - nll``."""
    log_ratio = ref_nll - nll
    return -(2.0 / beta) * F.logsigmoid(-beta * log_ratio).mean()


def npo_term(ctx: Any, batches: Batches, params: Mapping[str, Any]) -> torch.Tensor:
    """NPO on the forget batch."""
    rows = student_rows(ctx, batches.forget)
    nll, _ = sequence_nll(ctx, rows.hidden, rows.targets, rows.seq, rows.num_sequences)
    ref_nll = reference_sequence_nll(ctx, batches.forget, rows, "forget")
    return npo_loss(nll, ref_nll, params["beta"])


METHOD = Method(
    name="npo", title="NPO", forget=npo_term, formula="−(2/β) mean log σ(−β (log p_θ(y|x) − log p_ref(y|x)))",
    reference=f"{AUTHORS_LOSSES} (npo_loss); {ou_trainer('npo')}", teacher_reads=(("forget", False),),
    params=(Param("beta", 0.1, ou_config("NPO"), "inverse temperature", field="npo_beta"),),
)  # fmt: skip
