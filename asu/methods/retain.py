"""The retain terms ``L_R``: what keeps the model's other knowledge while it forgets.

* ``nll``: the student's token-mean NLL on the retain batch (question masked): GradDiff's retain term
  (``gd_loss`` of the authors' code, open-unlearning's ``retain_loss_type: NLL``). Its former name ``gd`` is
  still accepted, with an ``AsuDeprecationWarning``.
* ``kl``: ``KL(p_ref || p_theta)`` over the retain label rows, with ``p_ref`` the original model at tau = 1,
  reduced by ``retain_reduction``: ``sequence`` (default) ``(1/S) sum_s (1/T_s) sum_t KL_st``, the
  per-sequence mean then the mean over sequences (the ASU term's reduction; the authors' ASU trainer in their
  open-unlearning copy and the first ``kl_loss`` of their TOFU code); ``token`` ``(sum_st KL_st) / (sum_s
  T_s)``, the token mean over the batch (their MUSE code's ``klr`` term).
* ``ap`` (the AP regulariser of "A Closer Look at Machine Unlearning for LLMs", the authors' ``ap_loss``):
  ``-(1/beta) mean_s log sigmoid(beta (NLL(idk_s|x_s) - NLL(y_s|x_s)))`` over retain questions ``x_s``, their
  answers ``y_s`` and a refusal ``idk_s`` (summed sequence NLLs, beta 0.1): the model should keep preferring
  the true retain answer over a refusal. Needs refusal answers (the ``retain_idk`` batch).
* ``embed`` (RMU only, :mod:`asu.methods.rmu`): the squared distance between the student's and the original
  model's outputs of RMU's decoder layer on retain tokens.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
import torch.nn.functional as F

from asu.data import sequence_weights
from asu.methods.common import cross_entropy, kl, sequence_nll, student_rows, teacher_rows
from asu.methods.sources import AUTHORS_LOSSES, AUTHORS_TOFU
from asu.methods.spec import Batches, Param, RetainTerm

__all__ = ["NLL", "KL", "AP", "RETAIN_REDUCTIONS", "ap_loss"]

#: How the ``kl`` retain term averages over label positions (``retain_reduction``).
RETAIN_REDUCTIONS = ("sequence", "token")

AUTHORS = AUTHORS_LOSSES


def nll_term(ctx: Any, batches: Batches, params: Mapping[str, Any]) -> torch.Tensor:
    """``nll``: token-mean NLL of the student on the retain batch."""
    rows = student_rows(ctx, batches.part("retain", ctx.method))
    return cross_entropy(ctx, rows.hidden, rows.targets)


def kl_term(ctx: Any, batches: Batches, params: Mapping[str, Any]) -> torch.Tensor:
    """``kl``: ``KL(p_ref || p_theta)`` on the retain batch, per sequence then over sequences, or the token
    mean (``ctx.retain_reduction``)."""
    retain = batches.part("retain", ctx.method)
    rows = student_rows(ctx, retain)
    ref, t_weight, t_bias = teacher_rows(ctx, retain, rows.mask, smoothed=False, part="retain")
    w = None  # the fused op's default 1/M per row: the token mean
    if ctx.retain_reduction == "sequence":
        w = sequence_weights(rows.seq, rows.num_sequences).to(rows.hidden.device)
    return kl(ctx, rows.hidden, ref, (t_weight, t_bias), weights=w)


def ap_loss(retain_nll: torch.Tensor, idk_nll: torch.Tensor, beta: float) -> torch.Tensor:
    """The AP regulariser from per-sequence summed NLLs (S,) of the retain answers and of the refusals:
    ``-(1/beta) mean_s log sigmoid(beta (idk_nll_s - retain_nll_s))``."""
    return -F.logsigmoid(beta * (idk_nll - retain_nll)).mean() / beta


def ap_term(ctx: Any, batches: Batches, params: Mapping[str, Any]) -> torch.Tensor:
    """``ap`` on the retain batch and its refusal rewrite (``retain_idk``)."""
    retain, refusals = batches.part("retain", ctx.method), batches.part("retain_idk", ctx.method)
    r, i = student_rows(ctx, retain), student_rows(ctx, refusals)
    if r.num_sequences != i.num_sequences:
        raise ValueError("the retain and retain_idk batches hold different numbers of examples")
    retain_nll, _ = sequence_nll(ctx, r.hidden, r.targets, r.seq, r.num_sequences)
    idk_nll, _ = sequence_nll(ctx, i.hidden, i.targets, i.seq, i.num_sequences)
    return ap_loss(retain_nll, idk_nll, params["ap_beta"])


NLL = RetainTerm(
    name="nll",
    loss=nll_term,
    formula="token-mean NLL of the retain answers",
    reference=f"{AUTHORS} (gd_loss); locuslab/open-unlearning: src/trainer/unlearn/grad_diff.py (NLL)",
)
KL = RetainTerm(
    name="kl",
    loss=kl_term,
    formula="KL(p_ref ‖ p_θ) on retain answers (per-sequence mean, then mean; or token mean)",
    reference=f"{AUTHORS} (first kl_loss); open-unlearning's ASU trainer",
    teacher_reads=(("retain", False),),
)
AP = RetainTerm(
    name="ap",
    loss=ap_term,
    formula="-(1/β) mean log σ(β (NLL(idk) − NLL(y))) on retain questions",
    reference=f"{AUTHORS} (ap_loss)",
    parts=("retain_idk",),
    params=(
        Param(
            "ap_beta", 0.1, f"{AUTHORS_TOFU} (beta)",
            "inverse temperature of the AP regulariser",
        ),
    ),
)  # fmt: skip
