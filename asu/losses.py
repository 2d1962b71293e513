"""Unlearning objectives: ASU, the retain losses and the baselines, as one ``nn.Module`` around the student.

Every vocabulary loss is computed by the fused ops (:func:`asu_kernels.linear_kl`,
:func:`asu_kernels.linear_cross_entropy`) on final hidden states and the LM-head weight **inside**
:meth:`UnlearnObjective.forward`. Making the objective the module that the trainer (accelerate, FSDP,
DeepSpeed ZeRO-3) wraps means the LM-head weight is the gathered one there, and no (tokens x vocabulary)
logits tensor is ever built.

Notation: a batch holds S sequences; sequence ``s`` has ``T_s`` label positions (answer tokens plus the final
EOS for QA rows; the question is context only). ``p_theta`` is the student, ``p_tau`` the forget-teacher
(selected layers' attention at temperature ``tau``), ``p_ref`` the original model at ``tau = 1``.
``NLL(y|x) = -sum_t log p_theta(y_t | x, y_<t)`` is a sequence's summed negative log-likelihood.

Forget terms (``method``):
    * ``asu`` (default): ``L_ASU = (1/S) sum_s (1/T_s) sum_t KL(p_tau(.|x, y<t) || p_theta(.|x, y<t))``;
      per-sequence mean first, then the mean over sequences (row weights ``1 / (T_s S)``).
      Total ``lam * L_ASU + L_R``.
    * ``ga`` (gradient ascent): ``-(token-mean NLL)`` on the forget batch; no retain term.
    * ``gd`` (GradDiff): ``-(token-mean NLL on forget) + L_R``.
    * ``npo`` (beta = 0.1):
      ``-(2/beta) mean_s log sigmoid(-beta (log p_theta(y_s|x_s) - log p_ref(y_s|x_s)))`` with summed
      sequence log-likelihoods, ``+ L_R`` (Zhang et al. 2024; open-unlearning's weights 1 and 1).
    * ``simnpo`` (beta = 4.5, delta = 0, gamma = 0.125):
      ``gamma * (-(2/beta) mean_s log sigmoid(beta (NLL(y_s|x_s) / T_s - delta))) + L_R``, as open-unlearning
      implements it (``delta`` the reward margin, ``gamma`` the forget-term weight); no reference model.
    * ``idk`` (IDK + GD): token-mean NLL of the forget questions answered with a refusal (``idk`` batch)
      ``+ L_R``.

Retain term ``L_R`` (``retain_loss``):
    * ``gd``: token-mean NLL of the student on the retain batch (question masked).
    * ``kl``: token mean over retain label positions of ``KL(p_ref || p_theta)``.

``lam`` weights only the ASU term; the baselines use their published unit weights (and SimNPO's gamma).

Per-sequence log-likelihoods (NPO, SimNPO) come from the fused cross-entropy too: a sequence's rows are
contiguous in the masked (M, d) hidden states, so one ``linear_cross_entropy`` call per sequence with unit
row weights returns its summed NLL. That is S small fused calls per batch instead of one (M, V) logits
tensor.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import asu_kernels
from asu.data import label_positions, sequence_weights
from asu.teachers import Teacher, check_plain_head, decoder_hidden, output_head

__all__ = ["METHODS", "RETAIN_LOSSES", "DEFAULTS", "UnlearnObjective", "teacher_needs"]

METHODS = ("asu", "ga", "gd", "npo", "simnpo", "idk")
RETAIN_LOSSES = ("gd", "kl")
#: Baseline hyper-parameters (open-unlearning's TOFU defaults).
DEFAULTS = {"npo_beta": 0.1, "simnpo_beta": 4.5, "simnpo_delta": 0.0, "simnpo_gamma": 0.125}


def teacher_needs(method: str, retain_loss: str) -> list[tuple[str, bool]]:
    """The ``(set, smoothed)`` teacher outputs an objective reads (what a cache must hold)."""
    needs = []
    if method == "asu":
        needs.append(("forget", True))
    if method == "npo":
        needs.append(("forget", False))
    if method != "ga" and retain_loss == "kl":
        needs.append(("retain", False))
    return needs


class UnlearnObjective(nn.Module):
    """The training objective as a module: ``forward(forget=..., retain=..., idk=...)`` -> loss terms.

    Args:
        student: the causal LM being unlearned (a transformers model or a PEFT wrapper of one).
        method: ``asu|ga|gd|npo|simnpo|idk`` (see the module docstring).
        retain_loss: ``gd|kl``.
        lam: weight of the ASU term, ``>= 0``.
        teacher: a :class:`asu.teachers.Teacher`; required for ``asu``, ``npo`` and retain ``kl``.
        npo_beta, simnpo_beta, simnpo_delta, simnpo_gamma: baseline hyper-parameters.

    ``forward`` returns a dict of scalars: ``loss`` (what is optimised), ``forget_loss`` (the unweighted
    forget term) and ``retain_loss`` (when there is one).
    """

    def __init__(
        self,
        student: nn.Module,
        method: str = "asu",
        retain_loss: str = "gd",
        lam: float = 0.1,
        teacher: Teacher | None = None,
        npo_beta: float = DEFAULTS["npo_beta"],
        simnpo_beta: float = DEFAULTS["simnpo_beta"],
        simnpo_delta: float = DEFAULTS["simnpo_delta"],
        simnpo_gamma: float = DEFAULTS["simnpo_gamma"],
    ) -> None:
        super().__init__()
        if method not in METHODS:
            raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
        if retain_loss not in RETAIN_LOSSES:
            raise ValueError(f"unknown retain loss {retain_loss!r}; choose one of {', '.join(RETAIN_LOSSES)}")
        if not (isinstance(lam, (int, float)) and lam >= 0):
            raise ValueError(f"lam must be a number >= 0, got {lam!r}")
        for name, value in (("npo_beta", npo_beta), ("simnpo_beta", simnpo_beta)):
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value!r}")
        if teacher_needs(method, retain_loss) and teacher is None:
            raise ValueError(f"method={method!r} with retain_loss={retain_loss!r} needs a teacher")
        check_plain_head(student)
        self.student = student
        # FSDP's transformer-layer auto-wrap reads the root's _no_split_modules: the student's decoder layers.
        self._no_split_modules = list(getattr(student, "_no_split_modules", None) or [])
        self.teacher = teacher
        self.method = method
        self.retain_kind = retain_loss
        self.lam = float(lam)
        self.npo_beta = float(npo_beta)
        self.simnpo_beta = float(simnpo_beta)
        self.simnpo_delta = float(simnpo_delta)
        self.simnpo_gamma = float(simnpo_gamma)

    # -- pieces -------------------------------------------------------------------------------------------

    def _student_rows(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """Student hidden rows at label positions (M, d), their targets (M,), owners (M,) and the mask."""
        mask, targets, seq = label_positions(batch)
        hidden = decoder_hidden(self.student, batch)
        return hidden[mask], targets, seq, mask

    def _sequence_nll(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        seq: torch.Tensor,
        num_sequences: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed NLL per sequence (S',) and label counts (S',) for sequences with at least one label."""
        counts = torch.bincount(seq, minlength=num_sequences)
        nll, lengths = [], []
        start = 0
        for n in counts.tolist():
            if n == 0:
                continue
            sl = slice(start, start + n)
            ones = torch.ones(n, dtype=torch.float32, device=hidden.device)
            nll.append(
                asu_kernels.linear_cross_entropy(hidden[sl], weight, targets[sl], weights=ones, bias=bias)
            )
            lengths.append(n)
            start += n
        return torch.stack(nll).float(), torch.tensor(lengths, dtype=torch.float32, device=hidden.device)

    def retain_term(self, retain: dict[str, torch.Tensor]) -> torch.Tensor:
        """``L_R`` on a retain batch (``gd``: token-mean NLL; ``kl``: token-mean KL(p_ref || p_theta))."""
        hidden, targets, _, mask = self._student_rows(retain)
        weight, bias = output_head(self.student)
        if self.retain_kind == "gd":
            return asu_kernels.linear_cross_entropy(hidden, weight, targets, bias=bias)
        ref = self.teacher.hidden_states(retain, mask, smoothed=False, part="retain")
        t_weight, t_bias = self.teacher.lm_head()
        return asu_kernels.linear_kl(hidden, weight, ref, t_weight, student_bias=bias, teacher_bias=t_bias)

    def forget_term(
        self, forget: dict[str, torch.Tensor], idk: dict[str, torch.Tensor] | None
    ) -> torch.Tensor:
        """The method's forget term, unweighted (see the module docstring)."""
        weight, bias = output_head(self.student)
        if self.method == "idk":
            if idk is None:
                raise ValueError("method='idk' needs an 'idk' batch (forget questions with refusal answers)")
            hidden, targets, _, _ = self._student_rows(idk)
            return asu_kernels.linear_cross_entropy(hidden, weight, targets, bias=bias)
        hidden, targets, seq, mask = self._student_rows(forget)
        num_seq = int(forget["example_ids"].numel())
        if self.method == "asu":
            teacher_hidden = self.teacher.hidden_states(forget, mask, smoothed=True, part="forget")
            t_weight, t_bias = self.teacher.lm_head()
            w = sequence_weights(seq, num_seq).to(hidden.device)
            return asu_kernels.linear_kl(
                hidden, weight, teacher_hidden, t_weight, weights=w, student_bias=bias, teacher_bias=t_bias
            )
        if self.method in ("ga", "gd"):
            return -asu_kernels.linear_cross_entropy(hidden, weight, targets, bias=bias)
        nll, lengths = self._sequence_nll(hidden, weight, bias, targets, seq, num_seq)
        if self.method == "npo":
            ref_hidden = self.teacher.hidden_states(forget, mask, smoothed=False, part="forget")
            t_weight, t_bias = self.teacher.lm_head()
            with torch.no_grad():
                ref_nll, _ = self._sequence_nll(ref_hidden, t_weight, t_bias, targets, seq, num_seq)
            # log p_theta - log p_ref = ref_nll - nll
            log_ratio = ref_nll - nll
            return -(2.0 / self.npo_beta) * F.logsigmoid(-self.npo_beta * log_ratio).mean()
        # simnpo
        avg_nll = nll / lengths - self.simnpo_delta
        return -(2.0 / self.simnpo_beta) * F.logsigmoid(self.simnpo_beta * avg_nll).mean()

    # -- the objective ------------------------------------------------------------------------------------

    def forward(
        self,
        forget: dict[str, torch.Tensor],
        retain: dict[str, torch.Tensor] | None = None,
        idk: dict[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        forget_loss = self.forget_term(forget, idk)
        out: dict[str, Any] = {"forget_loss": forget_loss}
        if self.method == "asu":
            loss = self.lam * forget_loss
        elif self.method == "simnpo":
            loss = self.simnpo_gamma * forget_loss
        else:
            loss = forget_loss
        if self.method != "ga":
            if retain is None:
                raise ValueError(f"method={self.method!r} needs a retain batch")
            retain_loss = self.retain_term(retain)
            out["retain_loss"] = retain_loss
            loss = loss + retain_loss
        out["loss"] = loss
        return out

    def train(self, mode: bool = True) -> UnlearnObjective:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.train(False)  # frozen teacher: never dropout
        return self
