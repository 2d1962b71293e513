"""IDK (+GD): train the forget questions toward a refusal, ``NLL(idk | x) + L_R``.

Token-mean NLL of the forget questions answered with a refusal drawn from the refusal answers (one per
example, seeded), as ``idk_loss`` of the authors' trainer (``IDK+GD``, ``IDK+KL``, ``IDK+AP``).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from asu.methods.common import mean_nll
from asu.methods.sources import AUTHORS_LOSSES
from asu.methods.spec import Batches, Method

__all__ = ["METHOD", "idk_term"]


def idk_term(ctx: Any, batches: Batches, params: Mapping[str, Any]) -> torch.Tensor:
    """Token-mean NLL of the refusal rewrite of the forget batch."""
    return mean_nll(ctx, batches.part("idk", ctx.method))


METHOD = Method(
    name="idk", title="IDK", forget=idk_term, parts=("idk",), reference=f"{AUTHORS_LOSSES} (idk_loss)",
    formula="NLL of refusals to forget questions (token mean)",
)  # fmt: skip
