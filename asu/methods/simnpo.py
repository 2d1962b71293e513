"""SimNPO (Fan et al. 2024): NPO without a reference model, on length-normalised likelihoods.

``gamma * (-(2/beta) mean_s log sigmoid(beta (NLL(y_s|x_s) / T_s - delta))) + L_R``, as open-unlearning
implements it (``delta`` the reward margin, ``gamma`` the forget-term weight).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from asu.methods.common import sequence_nll, student_rows
from asu.methods.sources import ou_config, ou_trainer
from asu.methods.spec import Batches, Method, Param

__all__ = ["METHOD", "simnpo_loss", "simnpo_term"]

_CONFIG = ou_config("SimNPO")


def simnpo_loss(nll: torch.Tensor, lengths: torch.Tensor, beta: float, delta: float) -> torch.Tensor:
    """SimNPO's forget term from per-sequence summed NLLs (S,) and label counts (S,)."""
    avg_nll = nll / lengths - delta
    return -(2.0 / beta) * F.logsigmoid(beta * avg_nll).mean()


def simnpo_term(ctx: Any, batches: Batches, params: Mapping[str, Any]) -> torch.Tensor:
    """SimNPO on the forget batch (unweighted)."""
    rows = student_rows(ctx, batches.forget)
    nll, lengths = sequence_nll(ctx, rows.hidden, rows.targets, rows.seq, rows.num_sequences)
    return simnpo_loss(nll, lengths, params["beta"], params["delta"])


METHOD = Method(
    name="simnpo", title="SimNPO", forget=simnpo_term, formula="−(2/β) mean log σ(β (NLL(y|x)/|y| − δ))",
    reference=ou_trainer("simnpo"), forget_weight="gamma",
    params=(
        Param("beta", 4.5, _CONFIG, "inverse temperature", field="simnpo_beta"),
        Param("delta", 0.0, _CONFIG, "reward margin", "number", field="simnpo_delta"),
        Param("gamma", 0.125, _CONFIG, "weight of the forget term", "nonnegative", field="simnpo_gamma"),
    ),
)  # fmt: skip
