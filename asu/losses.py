"""The training objective as one ``nn.Module`` around the student: ``w_f * forget term + w_r * retain term``.

Which forget term, which retain term, their weights and parameters come from the method registry
(:mod:`asu.methods`, one module per method, the formulas in their docstrings): ASU (the package's method),
ASU+IDK, the experimental ``asu-attn``, GA, GD (GradDiff), NPO, SimNPO, IDK, DPO, AltPO, ME, LLMU, RMU,
UNDIAL, SatImp, WGA and CE-U, with the retain terms ``nll``, ``kl``, ``ap`` and RMU's ``embed``.

Every vocabulary loss is computed by the fused ops (:func:`asu_kernels.linear_kl`,
:func:`asu_kernels.linear_cross_entropy`, :func:`asu_kernels.linear_cross_entropy_rows`) on final hidden
states and the LM-head weight **inside** :meth:`UnlearnObjective.forward`. Making the objective the module
that the trainer (accelerate, FSDP, DeepSpeed ZeRO-3) wraps means the LM-head weight is the gathered one
there, and no (tokens x vocabulary) logits tensor is ever built.

Notation: a batch holds S sequences; sequence ``s`` has ``T_s`` label positions (answer tokens plus the final
EOS for QA rows; the question is context only). ``p_theta`` is the student, ``p_tau`` the forget-teacher
(selected layers' attention at temperature ``tau``), ``p_ref`` the original model at ``tau = 1``.

``lam`` weights the forget term of the methods whose reference weights it (ASU, ASU+IDK, ``asu-attn``, ME:
the authors' ``forget_coeff``); the other methods use their published weights (SimNPO's ``gamma``;
open-unlearning's ``gamma`` and ``alpha`` for AltPO, RMU, UNDIAL, SatImp, WGA).

Every vocabulary distribution is the model's own: for models whose logits are not ``lm_head(h)`` the
objective folds the logit scale into the hidden states and bias and passes the final-logit soft-cap to the
fused ops (:func:`asu.teachers.logit_head`: Gemma-2/3's ``final_logit_softcapping``, Cohere's
``logit_scale``, Granite's ``logits_scaling``), on the student and the teacher side alike.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from asu.methods import (
    METHOD_ALIASES,
    METHOD_NAMES,
    RETAIN_LOSS_ALIASES,
    RETAIN_LOSSES,
    RETAIN_REDUCTIONS,
    Batches,
    check_setup,
    method_setup,
    resolve_method,
    resolve_retain_loss,
)
from asu.methods.asu_attn import attention_row_kl
from asu.methods.npo import METHOD as NPO
from asu.methods.simnpo import METHOD as SIMNPO
from asu.teachers import Teacher, logit_head

__all__ = [
    "METHODS",
    "RETAIN_LOSSES",
    "RETAIN_REDUCTIONS",
    "DEFAULTS",
    "UnlearnObjective",
    "METHOD_ALIASES",
    "RETAIN_LOSS_ALIASES",
    "resolve_method",
    "resolve_retain_loss",
    "teacher_outputs_needed",
    "uses_teacher",
    "attention_row_kl",
]

#: Every method's name (the registry's order).
METHODS = METHOD_NAMES
#: The baseline hyper-parameters with a field of their own (open-unlearning's TOFU defaults).
DEFAULTS = {
    "npo_beta": NPO.param("beta").default,
    "simnpo_beta": SIMNPO.param("beta").default,
    "simnpo_delta": SIMNPO.param("delta").default,
    "simnpo_gamma": SIMNPO.param("gamma").default,
}


def teacher_outputs_needed(method: str, retain_loss: str) -> list[tuple[str, bool]]:
    """The ``(set, smoothed)`` teacher hidden-state outputs an objective reads (what a cache must hold).

    ``asu-attn`` reads the teacher's attention q, k and RMU's ``embed`` retain term a decoder layer's output
    instead, which no cache holds, so they add nothing here; see :func:`uses_teacher`.
    """
    return method_setup(method, retain_loss).teacher_reads


def uses_teacher(method: str, retain_loss: str) -> bool:
    """Whether the objective reads a teacher at all (hidden states, attention q, k or layer outputs)."""
    return method_setup(method, retain_loss).uses_teacher


class UnlearnObjective(nn.Module):
    """The training objective as a module: ``forward(forget=..., retain=..., idk=..., ...)`` -> loss terms.

    Args:
        student: the causal LM being unlearned (a transformers model or a PEFT wrapper of one).
        method: a name of :data:`asu.methods.METHODS` (or an alias: ``graddiff`` = ``gd``).
        retain_loss: ``nll|kl|ap|embed`` (``gd``: deprecated name of ``nll``); None = the method's default.
        retain_reduction: ``sequence|token``: how the ``kl`` retain term averages (``nll`` is a token mean).
        lam: weight of the forget term of ASU, ASU+IDK, ``asu-attn`` and ME, ``>= 0``.
        teacher: a :class:`asu.teachers.Teacher`; required when the method or retain term reads one (ASU,
            NPO, DPO, UNDIAL, retain ``kl``, ...; ``asu-attn`` takes ``copy``, ``base`` or ``self``).
        npo_beta, simnpo_beta, simnpo_delta, simnpo_gamma: NPO's and SimNPO's parameters.
        method_args: every other parameter of the method or retain term, by name (see its module).
        seed: seeds what a method draws once per run (RMU's control vector).

    ``forward`` returns a dict of scalars: ``loss`` (what is optimised), ``forget_loss`` (the unweighted
    forget term) and ``retain_loss`` (when there is one).
    """

    def __init__(
        self,
        student: nn.Module,
        method: str = "asu",
        retain_loss: str | None = None,
        lam: float = 0.1,
        teacher: Teacher | None = None,
        npo_beta: float = DEFAULTS["npo_beta"],
        simnpo_beta: float = DEFAULTS["simnpo_beta"],
        simnpo_delta: float = DEFAULTS["simnpo_delta"],
        simnpo_gamma: float = DEFAULTS["simnpo_gamma"],
        retain_reduction: str = "sequence",
        method_args: Mapping[str, Any] | None = None,
        seed: int = 0,
    ) -> None:
        super().__init__()
        resolve_method(method)  # an unknown name is named before anything else
        if retain_loss is not None:
            retain_loss = resolve_retain_loss(retain_loss)
        if retain_reduction not in RETAIN_REDUCTIONS:
            raise ValueError(
                f"unknown retain reduction {retain_reduction!r}; choose one of {', '.join(RETAIN_REDUCTIONS)}"
            )
        if not (isinstance(lam, (int, float)) and lam >= 0):
            raise ValueError(f"lam must be a number >= 0, got {lam!r}")
        for name, value in (("npo_beta", npo_beta), ("simnpo_beta", simnpo_beta)):
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value!r}")
        fields = {
            "lam": float(lam), "npo_beta": float(npo_beta), "simnpo_beta": float(simnpo_beta),
            "simnpo_delta": float(simnpo_delta), "simnpo_gamma": float(simnpo_gamma),
            "temperature": getattr(teacher, "temperature", None),
        }  # fmt: skip
        self.setup = method_setup(method, retain_loss, fields, method_args)
        check_setup(self.setup, getattr(teacher, "kind", None) if teacher is not None else None)
        # The model's own logits: the scale folded into hidden states and bias, the final-logit cap passed on.
        self.logit_head = logit_head(student)
        self.student = student
        # FSDP's transformer-layer auto-wrap reads the root's _no_split_modules: the student's decoder layers.
        self._no_split_modules = list(getattr(student, "_no_split_modules", None) or [])
        self.teacher = teacher
        self.method = self.setup.name
        self.retain_kind = self.setup.retain_loss
        self.retain_reduction = retain_reduction
        self.lam = float(lam)
        self.seed = int(seed)
        #: What a method draws once per run (RMU's control vector), kept here between steps.
        self.state: dict[Any, Any] = {}

    # -- the terms ----------------------------------------------------------------------------------------

    def forget_term(self, forget: dict[str, torch.Tensor], idk: dict[str, torch.Tensor] | None = None,
                    **parts: dict[str, torch.Tensor] | None) -> torch.Tensor:  # fmt: skip
        """The method's forget term, unweighted (see its module in :mod:`asu.methods`)."""
        batches = Batches(forget=forget, idk=idk, **parts)
        return self.setup.method.forget(self, batches, self.setup.params)

    def retain_term(
        self, retain: dict[str, torch.Tensor], **parts: dict[str, torch.Tensor] | None
    ) -> torch.Tensor:
        """``L_R`` on a retain batch (``retain_idk`` too for ``ap``), unweighted; ValueError when the method
        has no retain term."""
        if self.setup.retain is None:
            raise ValueError(f"method={self.method!r} has no retain term here")
        batches = Batches(forget={}, retain=retain, **parts)
        return self.setup.retain.loss(self, batches, self.setup.params)

    # -- the objective ------------------------------------------------------------------------------------

    def forward(
        self,
        forget: dict[str, torch.Tensor],
        retain: dict[str, torch.Tensor] | None = None,
        idk: dict[str, torch.Tensor] | None = None,
        retain_idk: dict[str, torch.Tensor] | None = None,
        mismatch: dict[str, torch.Tensor] | None = None,
        alternate: dict[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        batches = Batches(forget, retain, idk, retain_idk, mismatch, alternate)
        setup = self.setup
        forget_loss = setup.method.forget(self, batches, setup.params)
        out: dict[str, Any] = {"forget_loss": forget_loss}
        loss = setup.forget_weight * forget_loss
        if setup.retain is not None:
            if retain is None:
                raise ValueError(f"method={self.method!r} needs a retain batch")
            retain_loss = setup.retain.loss(self, batches, setup.params)
            out["retain_loss"] = retain_loss
            loss = loss + setup.retain_weight * retain_loss
        out["loss"] = loss
        return out

    def train(self, mode: bool = True) -> UnlearnObjective:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.train(False)  # frozen teacher: never dropout
        return self
