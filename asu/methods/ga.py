"""GA, gradient ascent: ``-(token-mean NLL)`` of the forget answers; no retain term.

As ``ga_loss`` of the authors' trainer and open-unlearning's ``GradAscent`` (``-model(**forget).loss``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from asu.methods.common import mean_nll
from asu.methods.sources import AUTHORS_LOSSES, ou_trainer
from asu.methods.spec import Batches, Method

__all__ = ["METHOD", "ga_term"]


def ga_term(ctx: Any, batches: Batches, params: Mapping[str, Any]) -> torch.Tensor:
    """``-(token-mean NLL)`` on the forget batch."""
    return -mean_nll(ctx, batches.forget)


METHOD = Method(
    name="ga", title="GA (gradient ascent)", forget=ga_term, formula="−NLL of forget answers (token mean)",
    reference=f"{AUTHORS_LOSSES} (ga_loss); {ou_trainer('grad_ascent')}", retain="none",
)  # fmt: skip
