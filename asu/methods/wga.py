"""WGA, weighted gradient ascent (Wang et al. 2025, "Rethinking LLM Unlearning Objectives"), as
open-unlearning's ``compute_wga_loss``: ``gamma * (-(1/M) sum_i p_i^beta NLL_i) + alpha * L_R`` over the
forget label rows, the weight ``p_i^beta`` of each token's own probability detached.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from asu.methods.sources import OU_UTILS, ou_config
from asu.methods.spec import Batches, Method, Param, weight_params
from asu.methods.weighted import weighted_ascent

__all__ = ["METHOD", "wga_weights", "wga_term"]

_CONFIG = ou_config("WGA")
BETA = Param("beta", 1.0, _CONFIG, "exponent of the token weight", "nonnegative")


def wga_weights(p: torch.Tensor, beta: float) -> torch.Tensor:
    """WGA's token weights ``p^beta`` from the tokens' probabilities."""
    return p**beta


def wga_term(ctx: Any, batches: Batches, params: Mapping[str, Any]) -> torch.Tensor:
    """WGA's forget term (unweighted)."""
    return weighted_ascent(ctx, batches.forget, lambda p: wga_weights(p, params["beta"]))


METHOD = Method(
    name="wga", title="WGA", forget=wga_term, formula="−mean_t p(y_t)^β NLL_t (weight detached)",
    reference=f"{OU_UTILS} (compute_wga_loss), src/trainer/unlearn/wga.py", forget_weight="gamma",
    retain_weight="alpha", params=(BETA, *weight_params(1.0, 1.0, _CONFIG)),
)  # fmt: skip
