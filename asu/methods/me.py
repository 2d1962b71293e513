"""ME, maximising entropy on the forget answers (the authors' ``me_loss``, from "A Closer Look at Machine
Unlearning for LLMs").

``(1/M) sum_i KL(U || p_theta,i)`` over the forget label rows (``U`` uniform over the vocabulary, the token
mean over the batch), ``lam * ME + L_R`` (``ME+GD``, ``ME+KL``; ``lam`` is the authors' ``forget_coeff``, 0.1
in their TOFU scripts). Computed by :func:`asu_kernels.linear_kl` with a teacher whose logits are all zero.

Differences from the authors' code, both documented: it takes ``log(p + 1e-12)`` where this takes
``log p``, which differs on rows whose smallest probabilities fall below about 1e-12; and their scripts run ME
with ``mask=false``, so the term also covers the question tokens and every padding position of their
500-token rows; here it covers the answer rows, as every other method (packed batches have no padding).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from asu.methods.asu import LAM
from asu.methods.common import kl, student_rows, token_weights
from asu.methods.sources import AUTHORS_LOSSES
from asu.methods.spec import Batches, Method
from asu.teachers import output_head

__all__ = ["METHOD", "me_term"]


def me_term(ctx: Any, batches: Batches, params: Mapping[str, Any]) -> torch.Tensor:
    """Token-mean ``KL(U || p_theta)`` on the forget batch."""
    rows = student_rows(ctx, batches.forget)
    weight, _ = output_head(ctx.student)
    uniform = torch.zeros_like(rows.hidden)  # zero logits: the uniform distribution
    return kl(ctx, rows.hidden, uniform, (weight.detach(), None), weights=token_weights(rows))


METHOD = Method(
    name="me", title="ME (maximum entropy)", forget=me_term, forget_weight="lam", params=(LAM,),
    formula="mean_t KL(U ‖ p_θ) on forget answers (U uniform)", reference=f"{AUTHORS_LOSSES} (me_loss)",
)  # fmt: skip
