"""Every unlearning method in one place: one module per method, and the registry that the rest reads.

Each module (``asu/methods/<name>.py``) defines its forget term as a function of the objective and the
micro-batch, the pure loss functions behind it (importable on their own, e.g.
``from asu.methods.npo import npo_loss``), and a :class:`~asu.methods.spec.Method` ``METHOD`` that declares
what the term reads (teacher outputs, refusal or alternate answers), whether it takes a retain term and
which, its parameters with their defaults and the files those come from. The retain terms are in
:mod:`asu.methods.retain` (and RMU's ``embed`` in :mod:`asu.methods.rmu`).

The registry here is what :class:`asu.unlearn.UnlearnConfig` validates against, what ``asu unlearn
--method`` offers, what the presets name and what :class:`asu.losses.UnlearnObjective` runs:
:func:`method_setup` resolves a method, a retain loss and parameter values into a :class:`MethodSetup`,
and :func:`check_setup` holds every rule about which teachers and options a setup can run with (the one
place those rules live).

Adding a method: a module with its term and ``METHOD`` (copy the closest one), its entry in ``_MODULES``
below, and a test against a plain computation on full logits (``tests/test_methods.py``).
"""

from __future__ import annotations

import warnings
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from asu.methods import (
    altpo,
    asu_attn,
    asu_idk,
    ceu,
    dpo,
    ga,
    gd,
    idk,
    llmu,
    me,
    npo,
    rmu,
    satimp,
    simnpo,
    undial,
    wga,
)
from asu.methods import asu as asu_method
from asu.methods.retain import AP, KL, NLL, RETAIN_REDUCTIONS
from asu.methods.spec import PARTS, Batches, Method, Param, RetainTerm
from asu.warning import AsuDeprecationWarning

__all__ = [
    "METHODS",
    "METHOD_NAMES",
    "METHOD_ALIASES",
    "RETAIN_TERMS",
    "RETAIN_LOSSES",
    "RETAIN_LOSS_ALIASES",
    "RETAIN_REDUCTIONS",
    "PARTS",
    "Batches",
    "Method",
    "MethodSetup",
    "Param",
    "RetainTerm",
    "get_method",
    "resolve_method",
    "resolve_retain_loss",
    "method_setup",
    "check_setup",
]

# The order of the README's method table and of ``--method``'s help.
_MODULES = (
    asu_method, asu_idk, asu_attn, ga, gd, npo, simnpo, idk, dpo, altpo, me, llmu, rmu, undial, satimp, wga,
    ceu,
)  # fmt: skip

#: Every method, by name.
METHODS: dict[str, Method] = {m.METHOD.name: m.METHOD for m in _MODULES}
METHOD_NAMES = tuple(METHODS)
#: Other accepted names of a method.
METHOD_ALIASES = {alias: m.name for m in METHODS.values() for alias in m.aliases}
#: Every retain term, by name.
RETAIN_TERMS: dict[str, RetainTerm] = {t.name: t for t in (NLL, KL, AP, rmu.EMBED)}
RETAIN_LOSSES = tuple(RETAIN_TERMS)
#: Deprecated names of a retain loss: ``gd`` was plain NLL, the retain term of GradDiff.
RETAIN_LOSS_ALIASES = {"gd": "nll"}


def get_method(name: str) -> Method:
    """The method called ``name`` (or one of its aliases); ValueError naming the choices if unknown."""
    key = METHOD_ALIASES.get(name, name) if isinstance(name, str) else name
    if key not in METHODS:
        raise ValueError(f"unknown method {name!r}; choose one of {', '.join(METHOD_NAMES)}")
    return METHODS[key]


def resolve_method(name: str) -> str:
    """The method's canonical name (``graddiff`` -> ``gd``); ValueError naming the choices if unknown."""
    return get_method(name).name


def resolve_retain_loss(retain_loss: str) -> str:
    """The retain loss's canonical name; a deprecated name (``gd``) maps to its loss with an
    ``AsuDeprecationWarning``; ValueError naming the choices if unknown."""
    if isinstance(retain_loss, str) and retain_loss in RETAIN_LOSS_ALIASES:
        name = RETAIN_LOSS_ALIASES[retain_loss]
        warnings.warn(
            f"retain_loss={retain_loss!r} is deprecated; use {name!r} (the same loss)",
            AsuDeprecationWarning,
            stacklevel=3,
        )
        return name
    if retain_loss not in RETAIN_TERMS:
        raise ValueError(f"unknown retain loss {retain_loss!r}; choose one of {', '.join(RETAIN_LOSSES)}")
    return retain_loss


@dataclass(frozen=True)
class MethodSetup:
    """A method with its retain term and parameter values resolved: what one run optimises.

    ``loss = forget_weight * method.forget(...) + retain_weight * retain.loss(...)``; ``retain`` is None when
    the method takes no retain term or its weight is 0.
    """

    method: Method
    retain_loss: str
    retain: RetainTerm | None
    params: Mapping[str, Any]

    @property
    def name(self) -> str:
        return self.method.name

    @property
    def forget_weight(self) -> float:
        w = self.method.forget_weight
        return 1.0 if w is None else float(self.params[w])

    @property
    def retain_weight(self) -> float:
        w = self.method.retain_weight
        return 1.0 if w is None else float(self.params[w])

    @property
    def teacher_reads(self) -> list[tuple[str, bool]]:
        """The ``(part, smoothed)`` teacher hidden states the objective reads (what a cache must hold)."""
        reads = list(self.method.teacher_reads)
        if self.retain is not None:
            reads += [r for r in self.retain.teacher_reads if r not in reads]
        return reads

    @property
    def hooks(self) -> str | None:
        """What the objective reads through hooks inside a decoder (``attention`` q, k or a ``layer``'s
        output), or None: no cache holds those, and gradient checkpointing would recompute them."""
        if self.method.reads is not None:
            return self.method.reads
        return "layer" if self.retain is not None and self.retain.reads_layer else None

    @property
    def uses_teacher(self) -> bool:
        """Whether the objective reads a teacher at all (hidden states, attention q, k or layer outputs)."""
        reads_layer = self.retain is not None and self.retain.reads_layer
        return bool(self.teacher_reads) or self.method.reads == "attention" or reads_layer

    @property
    def parts(self) -> tuple[str, ...]:
        """The batches a micro-batch must hold: ``forget``, ``retain`` when there is a retain term, and the
        rewrites the terms read."""
        parts = ["forget"] + (["retain"] if self.retain is not None else []) + list(self.method.parts)
        parts += list(self.retain.parts) if self.retain is not None else []
        return tuple(p for p in PARTS if p in parts)

    @property
    def needs_refusals(self) -> bool:
        """Whether refusal answers are needed (the ``idk`` or ``retain_idk`` rewrites)."""
        return "idk" in self.parts or "retain_idk" in self.parts


def _retain_term(method: Method, retain_loss: str, params: Mapping[str, Any]) -> RetainTerm | None:
    if method.retain == "none":
        return None
    if retain_loss not in method.retain_losses:
        choices = " | ".join(method.retain_losses)
        raise ValueError(f"method={method.name!r} takes retain_loss {choices}, not {retain_loss!r}")
    if method.retain == "weighted" and float(params[method.retain_weight]) == 0:
        return None
    return RETAIN_TERMS[retain_loss]


def _resolve_params(
    declared: tuple[Param, ...], owner: str, fields: Mapping[str, Any], method_args: Mapping[str, Any]
) -> dict[str, Any]:
    """Parameter values: a field parameter from ``fields`` (its default when absent), the others from
    ``method_args`` (checked) or their defaults."""
    names = {p.name for p in declared}
    unknown = sorted(set(method_args) - names)
    if unknown:
        have = ", ".join(sorted(names)) or "none"
        raise ValueError(f"{owner} has no parameter {', '.join(map(repr, unknown))}; its parameters: {have}")
    values: dict[str, Any] = {}
    for p in declared:
        if p.field is not None:
            if p.name in method_args:
                raise ValueError(f"{owner}'s parameter {p.name} is the setting {p.field}; set it there")
            values[p.name] = fields.get(p.field, p.default)
        else:
            values[p.name] = p.check(method_args.get(p.name, p.default), owner)
    return values


def method_setup(
    method: str,
    retain_loss: str | None = None,
    fields: Mapping[str, Any] | None = None,
    method_args: Mapping[str, Any] | None = None,
) -> MethodSetup:
    """Resolve ``method`` (a name or alias), its retain loss (None: the method's default) and its parameters.

    ``fields``: values of the :class:`asu.unlearn.UnlearnConfig` fields that hold parameters (``lam``,
    ``npo_beta``, ...); ``method_args``: every other parameter by name. ValueError naming the problem.
    """
    spec = get_method(method)
    retain_loss = spec.default_retain if retain_loss is None else resolve_retain_loss(retain_loss)
    fields, method_args = dict(fields or {}), dict(method_args or {})
    owner = f"method {spec.name!r}"
    retain_params = RETAIN_TERMS[retain_loss].params if spec.retain != "none" else ()
    params = _resolve_params(spec.params + retain_params, owner, fields, method_args)
    return MethodSetup(spec, retain_loss, _retain_term(spec, retain_loss, params), params)


def check_setup(
    setup: MethodSetup,
    teacher: str | None,
    *,
    lora: bool | None = None,
    gradient_checkpointing: bool = False,
) -> None:
    """Every rule about what a setup can run with; ValueError naming the first broken one.

    ``teacher``: the teacher source (``copy``, ``base``, ``cache``, ``self``) or None when none is given;
    ``lora``: whether the student gets LoRA adapters (None: not known here).
    """
    m, r = setup.name, setup.retain_loss
    if setup.uses_teacher and teacher is None:
        raise ValueError(f"method={m!r} with retain_loss={r!r} needs a teacher")
    hooks = setup.hooks
    if teacher == "cache" and setup.uses_teacher and hooks is not None:
        what = "attention q, k" if hooks == "attention" else "decoder-layer outputs"
        others = "'copy', 'base' or 'self'" if hooks == "attention" else "'copy' or 'base'"
        raise ValueError(
            f"method={m!r} cannot use the cache teacher: the cache holds final hidden states, not {what}; "
            f"use teacher {others}"
        )
    reads_layer = setup.retain is not None and setup.retain.reads_layer
    if teacher == "self" and (setup.teacher_reads or reads_layer):
        raise ValueError(
            f"teacher='self' is self-smoothing for method='asu-attn' only; method={m!r} with "
            f"retain_loss={r!r} reads teacher hidden states (use 'copy', 'base' or 'cache')"
        )
    if gradient_checkpointing and hooks is not None:
        # Hooks run in the forward only; checkpoint recomputation would see another graph.
        raise ValueError(f"method={m!r} does not support gradient_checkpointing (yet); turn it off")
    if lora is not None and teacher == "base" and not lora:
        raise ValueError("teacher='base' needs a LoRA student (lora_r > 0); use teacher='copy' or 'cache'")
    if lora and setup.method.prepare is not None:
        raise ValueError(f"method={m!r} chooses which of the model's own weights train; it takes no LoRA")
