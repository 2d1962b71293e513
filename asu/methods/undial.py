"""UNDIAL, self-distillation with adjusted logits (Dong et al. 2024), as open-unlearning's
``compute_undial_loss``.

The target of each forget label row is the original model's distribution with the logit of the true token
lowered by ``beta``: ``q'_i = softmax(z_ref,i - beta e_{y_i})``; the loss is the mean cross-entropy
``(1/M) sum_i H(q'_i, p_theta,i)``, ``gamma * UNDIAL + alpha * L_R`` (open-unlearning's config: beta 10,
alpha 0, so no retain term by default).

Through the fused ops, with ``q_i = softmax(z_ref,i)``, ``a_i = q_i[y_i] (1 - e^-beta)`` and ``Z_i = 1 - a_i``
(all detached): ``q'_i = (q_i - a_i e_{y_i}) / Z_i``, so
``H(q'_i, p_i) = (KL(q_i || p_i) + H(q_i) - a_i NLL_i) / Z_i``: one ``linear_kl`` with row weights
``1 / (M Z_i)``, one ``linear_cross_entropy`` with ``a_i / (M Z_i)``, and the constant ``H(q_i)`` from
``log V - KL(q_i || U)``. Same value and gradient, no (M, V) logits.

Difference from open-unlearning: its loss runs over every position of its padded rows (question and padding
too, where the label ``-100`` indexes the vocabulary from the end) and averages over all of them; here it runs
over the forget label rows, as the method is defined, and averages over those.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from asu.methods.common import cross_entropy, kl, nll_rows, student_rows, teacher_rows, token_weights
from asu.methods.sources import OU_UTILS, ou_config
from asu.methods.spec import Batches, Method, Param, weight_params

__all__ = ["METHOD", "undial_term"]

_CONFIG = ou_config("UNDIAL")


def undial_term(ctx: Any, batches: Batches, params: Mapping[str, Any]) -> torch.Tensor:
    """UNDIAL's forget term (unweighted) on the forget batch."""
    rows = student_rows(ctx, batches.forget)
    t_hidden, t_weight, t_bias = teacher_rows(ctx, batches.forget, rows.mask, smoothed=False, part="forget")
    t_head = (t_weight, t_bias)
    with torch.no_grad():
        q_y = torch.exp(-nll_rows(ctx, t_hidden, rows.targets, head=t_head))
        a = q_y * (1.0 - math.exp(-params["beta"]))
        c = token_weights(rows) / (1.0 - a)
        # sum_i c_i H(q_i) = log V sum_i c_i - sum_i c_i KL(q_i || U): U from a zero-logit "student".
        uniform = torch.zeros_like(t_hidden)
        to_uniform = kl(ctx, uniform, t_hidden, t_head, weights=c, head=(t_weight, None))
        entropy = math.log(t_weight.shape[0]) * c.sum() - to_uniform
    divergence = kl(ctx, rows.hidden, t_hidden, t_head, weights=c)
    return divergence - cross_entropy(ctx, rows.hidden, rows.targets, weights=a * c) + entropy


METHOD = Method(
    name="undial", title="UNDIAL", forget=undial_term, formula="mean_t H(softmax(z_ref − β e_y), p_θ)",
    reference=f"{OU_UTILS} (compute_undial_loss), src/trainer/unlearn/undial.py", retain="weighted",
    forget_weight="gamma", retain_weight="alpha", teacher_reads=(("forget", False),),
    params=(
        Param("beta", 10.0, _CONFIG, "how far the true token's logit is lowered", "nonnegative"),
        *weight_params(1.0, 0.0, _CONFIG),
    ),
)  # fmt: skip
