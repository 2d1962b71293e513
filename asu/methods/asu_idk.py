"""ASU+IDK: the ASU term with each answer's first token left out, plus the IDK loss (the authors' own
combination).

``L = lam * (L_ASU' + L_IDK) + L_R``, where ``L_ASU'`` is ASU's per-sequence-mean KL to the smoothed teacher
over every forget label row except the one predicting the answer's first token (weights
``1 / ((T_s - 1) S)``; the IDK loss already fixes that token toward the refusal), and ``L_IDK`` the token-mean
NLL of the forget questions answered with a refusal. As the ``ASU`` + ``IDK`` branch of ``get_loss`` in the
authors' trainer (``asu_loss(..., ignore_first_token=True) + idk_loss``; ``lam`` is their ``forget_coeff``,
which multiplies the whole forget term). In their published ``get_loss`` that branch is unreachable: the
``'IDK' in loss_type`` test comes first, so a loss type naming both runs IDK alone; this is the branch as
written. An answer with a single label row contributes 0 to ``L_ASU'`` and still counts in ``S``.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from asu.methods.asu import EOS, LAM, TEMPERATURE, smoothed_kl
from asu.methods.common import first_row_of_each_sequence, mean_nll, student_rows
from asu.methods.sources import AUTHORS_LOSSES
from asu.methods.spec import Batches, Method

__all__ = ["METHOD", "asu_idk_term", "weights_without_first_row"]


def weights_without_first_row(seq: torch.Tensor, num_sequences: int) -> torch.Tensor:
    """Row weights ``1 / ((T_s - 1) S)`` with each example's first label row at 0 (S: the examples with at
    least one label row; an example with one row gets weight 0 throughout)."""
    keep = ~first_row_of_each_sequence(seq)
    counts = torch.bincount(seq[keep], minlength=num_sequences).to(torch.float64)
    present = int((torch.bincount(seq, minlength=num_sequences) > 0).sum())
    per_row = torch.where(keep, 1.0 / (counts[seq].clamp(min=1) * max(present, 1)), 0.0)
    return per_row.to(torch.float32)


def asu_idk_term(ctx: Any, batches: Batches, params: Mapping[str, Any]) -> torch.Tensor:
    """``L_ASU' + L_IDK`` (unweighted)."""
    rows = student_rows(ctx, batches.forget)
    w = weights_without_first_row(rows.seq, rows.num_sequences).to(rows.hidden.device)
    asu = smoothed_kl(ctx, batches.forget, rows, w, params.get("eos", "keep"))
    return asu + mean_nll(ctx, batches.part("idk", ctx.method))


METHOD = Method(
    name="asu-idk", title="ASU+IDK", forget=asu_idk_term, parts=("idk",), params=(LAM, TEMPERATURE, EOS),
    formula="ASU without each answer's first token + NLL of refusals", teacher_reads=(("forget", True),),
    reference=f"{AUTHORS_LOSSES} (asu_loss with ignore_first_token, idk_loss)", forget_weight="lam",
)  # fmt: skip
