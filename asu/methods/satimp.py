"""SatImp (Yang et al. 2025, "Exploring Criteria of Loss Reweighting to Enhance LLM Unlearning"), as
open-unlearning's ``compute_satimp_loss``: ``gamma * (-(1/M) sum_i p_i^beta1 (1 - p_i)^beta2 NLL_i) +
alpha * L_R`` over the forget label rows, the weight of each token's own probability detached
(saturation ``p^beta1`` times importance ``(1 - p)^beta2``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from asu.methods.sources import OU_UTILS, ou_config
from asu.methods.spec import Batches, Method, Param, weight_params
from asu.methods.weighted import weighted_ascent

__all__ = ["METHOD", "satimp_weights", "satimp_term"]

_CONFIG = ou_config("SatImp")


def satimp_weights(p: torch.Tensor, beta1: float, beta2: float) -> torch.Tensor:
    """SatImp's token weights ``p^beta1 (1 - p)^beta2``."""
    return p**beta1 * (1 - p) ** beta2


def satimp_term(ctx: Any, batches: Batches, params: Mapping[str, Any]) -> torch.Tensor:
    """SatImp's forget term (unweighted)."""
    return weighted_ascent(ctx, batches.forget, lambda p: satimp_weights(p, params["beta1"], params["beta2"]))


METHOD = Method(
    name="satimp", title="SatImp", forget=satimp_term, forget_weight="gamma", retain_weight="alpha",
    formula="−mean_t p^β1 (1 − p)^β2 NLL_t (weight detached)",
    reference=f"{OU_UTILS} (compute_satimp_loss), src/trainer/unlearn/satimp.py",
    params=(
        Param("beta1", 5.0, _CONFIG, "exponent of the saturation weight p", "nonnegative"),
        Param("beta2", 1.0, _CONFIG, "exponent of the importance weight 1 - p", "nonnegative"),
        *weight_params(0.1, 1.0, _CONFIG),
    ),
)  # fmt: skip
