"""LLMU (Yao et al. 2023, "Large Language Model Unlearning"), as the authors' trainer implements it.

Forget term ``-NLL(y|x) + NLL(r|x)``: gradient ascent on the forget answers plus the token-mean NLL of the
forget questions answered with a (mismatched) retain answer ``r``; retain term ``kl`` by default. Unit
weights. In the authors' ``get_loss`` the mismatch NLL sits in the regularisation term next to
``kl_loss``; the total is the same.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from asu.methods.common import mean_nll
from asu.methods.sources import AUTHORS_LOSSES
from asu.methods.spec import Batches, Method

__all__ = ["METHOD", "llmu_term"]


def llmu_term(ctx: Any, batches: Batches, params: Mapping[str, Any]) -> torch.Tensor:
    """``-NLL(forget) + NLL(mismatch)``, token means."""
    return -mean_nll(ctx, batches.forget) + mean_nll(ctx, batches.part("mismatch", ctx.method))


METHOD = Method(
    name="llmu", title="LLMU", forget=llmu_term, parts=("mismatch",), retain_losses=("kl", "nll", "ap"),
    formula="−NLL(y|x) + NLL(random retain answer|x)",
    reference=f"{AUTHORS_LOSSES} (get_loss 'LLMU': ga_loss, mismatch_loss, kl_loss)",
)  # fmt: skip
