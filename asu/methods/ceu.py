"""CE-U, cross-entropy unlearning (Yang et al. 2025, arXiv 2503.01224), as open-unlearning's ``CEU``.

For each forget label row the target is the student's own distribution (detached) with the true token
removed, ``t_i = softmax(z_i with z_i[y_i] = -inf)``; the loss is the mean cross-entropy
``(1/M') sum_i H(t_i, p_theta,i)`` over the label rows except the first ``ignore_first`` of every answer
(the paper's footnote; open-unlearning's default 1). No retain term.

Through the fused ops, with ``p_i = p_theta(y_i)`` from :func:`asu_kernels.linear_cross_entropy_rows`: the
gradient of ``H(t_i, p_i)`` with respect to the logits is ``p_i - t_i = -(p_i / (1 - p_i)) (p_i - e_{y_i})``,
that of ``-(p_i / (1 - p_i)) NLL_i`` with the weight detached, so one ``linear_cross_entropy`` with row
weights ``-p_i / ((1 - p_i) M')`` carries the gradient; the value is ``H(t_i, p_i) = -log(1 - p_i) + (H(p_i) -
h(p_i)) / (1 - p_i)`` (``h`` the binary entropy), with ``sum_i H(p_i) / ((1 - p_i) M')`` from one
``linear_kl`` against the uniform distribution. The value loses precision (not the gradient) on tokens whose
probability is within about 1e-5 of 1, where ``H(p_i) - h(p_i)`` is a difference of nearly equal numbers.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from typing import Any

import torch

from asu.methods.common import cross_entropy, kl, nll_rows, rank_in_sequence, student_rows, token_weights
from asu.methods.sources import ou_config, ou_trainer
from asu.methods.spec import Batches, Method, Param
from asu.teachers import output_head

__all__ = ["METHOD", "ceu_term"]

#: ``1 - p`` below this is taken as this (a token the model is certain of has an undefined target).
_MIN_REST = 1e-12


def _binary_entropy(p: torch.Tensor, rest: torch.Tensor) -> torch.Tensor:
    """``-p log p - (1 - p) log(1 - p)`` with ``rest = 1 - p`` computed accurately by the caller."""
    return -torch.xlogy(p, p) - torch.xlogy(rest, rest)


def ceu_term(ctx: Any, batches: Batches, params: Mapping[str, Any]) -> torch.Tensor:
    """CE-U on the forget batch: the exact value, with the gradient of the detached-weight surrogate."""
    rows = student_rows(ctx, batches.forget)
    keep = rank_in_sequence(rows.seq) >= params["ignore_first"]
    m = token_weights(rows, keep)
    weight, bias = output_head(ctx.student)
    with torch.no_grad():
        nll = nll_rows(ctx, rows.hidden, rows.targets)
        p = torch.exp(-nll)
        rest = (-torch.expm1(-nll)).clamp(min=_MIN_REST)  # 1 - p, accurate near p = 1
        c = m / rest
        # sum_i c_i H(p_i) = log V sum_i c_i - sum_i c_i KL(p_i || U), U from a zero-logit "student".
        own = rows.hidden.detach()
        to_uniform = kl(ctx, torch.zeros_like(own), own, (weight, bias), weights=c, head=(weight, None))
        entropy = math.log(weight.shape[0]) * c.sum() - to_uniform
        value = (m * -torch.log(rest)).sum() + entropy - (c * _binary_entropy(p, rest)).sum()
    surrogate = cross_entropy(ctx, rows.hidden, rows.targets, weights=-(p / rest) * m)
    return value + (surrogate - surrogate.detach())


METHOD = Method(
    name="ceu", title="CE-U", forget=ceu_term, reference=ou_trainer("ceu"), retain="none",
    formula="mean_t H(softmax(z with z_y = −∞), p_θ), first answer token left out",
    params=(Param("ignore_first", 1, ou_config("CEU"), "answer tokens left out at the start", "count"),),
)  # fmt: skip
