"""Token-weighted gradient ascent: WGA and SatImp share one computation with different token weights.

Both are ``-(1/M) sum_i w_i NLL_i`` over the forget label rows with a detached weight ``w_i = f(p_i)`` of the
token's own probability ``p_i = p_theta(y_i | x, y<i)``: the per-row NLLs come without gradient from
:func:`asu_kernels.linear_cross_entropy_rows`, then one :func:`asu_kernels.linear_cross_entropy` call with
row weights ``-w_i / M`` gives the loss and its gradient.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch

from asu.methods.common import cross_entropy, nll_rows, student_rows, token_weights

__all__ = ["weighted_ascent"]


def weighted_ascent(
    ctx: Any, forget: dict[str, torch.Tensor], weight_of: Callable[[torch.Tensor], torch.Tensor]
) -> torch.Tensor:
    """``-(1/M) sum_i weight_of(p_i) NLL_i`` on ``forget`` (``weight_of`` maps probabilities (M,) to
    weights; they are detached)."""
    rows = student_rows(ctx, forget)
    p = torch.exp(-nll_rows(ctx, rows.hidden.detach(), rows.targets))
    w = -weight_of(p) * token_weights(rows)
    return cross_entropy(ctx, rows.hidden, rows.targets, weights=w)
