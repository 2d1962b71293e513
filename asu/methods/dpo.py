"""DPO with a refusal as the preferred answer (Rafailov et al. 2023; the unlearning use of Maini et al. 2024).

``-(2/beta) mean_s log sigmoid(beta ((log p_theta(w_s|x_s) - log p_ref(w_s|x_s)) - (log p_theta(y_s|x_s) -
log p_ref(y_s|x_s))))`` with summed sequence log-likelihoods, the refusal ``w_s`` preferred over the forget
answer ``y_s`` and ``p_ref`` the original model, ``+ L_R``: the authors' ``dpo_loss`` (``DPO+GD``,
``DPO+KL``, beta 0.1) and open-unlearning's ``compute_dpo_loss`` (win = the refusal, lose = the answer).
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from asu.methods.common import in_example_order, reference_sequence_nll, sequence_nll, student_rows
from asu.methods.sources import AUTHORS_LOSSES, AUTHORS_TOFU, OU_UTILS, ou_config
from asu.methods.spec import Batches, Method, Param

__all__ = ["METHOD", "dpo_loss", "preference_term", "BETA"]

BETA = Param("beta", 0.1, f"{AUTHORS_TOFU} (beta); {ou_config('DPO')}", "inverse temperature")


def dpo_loss(
    win_nll: torch.Tensor,
    lose_nll: torch.Tensor,
    win_ref_nll: torch.Tensor,
    lose_ref_nll: torch.Tensor,
    beta: float,
) -> torch.Tensor:
    """DPO from per-sequence summed NLLs (S,), paired by position: the preferred (``win``) and rejected
    (``lose``) answers under the student and the reference model."""
    win_log_ratio = win_ref_nll - win_nll
    lose_log_ratio = lose_ref_nll - lose_nll
    return -(2.0 / beta) * F.logsigmoid(beta * (win_log_ratio - lose_log_ratio)).mean()


def _nll_pair(ctx: Any, batch: dict[str, torch.Tensor], part: str) -> tuple[torch.Tensor, torch.Tensor]:
    """The student's and the reference model's summed NLL per example of ``batch``, by example id."""
    rows = student_rows(ctx, batch)
    nll, _ = sequence_nll(ctx, rows.hidden, rows.targets, rows.seq, rows.num_sequences)
    ref = reference_sequence_nll(ctx, batch, rows, part)
    return in_example_order(nll, batch), in_example_order(ref, batch)


def preference_term(ctx: Any, batches: Batches, params: Mapping[str, Any], winner: str) -> torch.Tensor:
    """DPO with part ``winner`` (``idk`` or ``alternate``) preferred over the forget answers."""
    win = batches.part(winner, ctx.method)
    lose_nll, lose_ref = _nll_pair(ctx, batches.forget, "forget")
    win_nll, win_ref = _nll_pair(ctx, win, winner)
    if win_nll.shape != lose_nll.shape:
        raise ValueError(f"the forget and {winner} batches hold different numbers of examples")
    return dpo_loss(win_nll, lose_nll, win_ref, lose_ref, params["beta"])


def dpo_term(ctx: Any, batches: Batches, params: Mapping[str, Any]) -> torch.Tensor:
    """DPO with the refusal rewrite (``idk``) preferred."""
    return preference_term(ctx, batches, params, "idk")


METHOD = Method(
    name="dpo", title="DPO (refusal preferred)", forget=dpo_term, parts=("idk",), params=(BETA,),
    formula="−(2/β) mean log σ(β ((log p_θ − log p_ref)(idk|x) − (log p_θ − log p_ref)(y|x)))",
    reference=f"{AUTHORS_LOSSES} (dpo_loss); {OU_UTILS} (compute_dpo_loss)",
    teacher_reads=(("forget", False), ("idk", False)),
)  # fmt: skip
