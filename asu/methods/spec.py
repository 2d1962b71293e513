"""What a method is, as data: its forget term, what it reads, its retain terms and its parameters.

A :class:`Method` is everything the rest of the package needs to know about one unlearning method: the
function computing its forget term, which teacher outputs and extra batches that term reads, whether it
takes a retain term (and which ones), how the two are weighted, and its parameters with their defaults and
where those defaults come from. A :class:`RetainTerm` is the same for a retain term. The registry
(:mod:`asu.methods`) collects them; :class:`asu.unlearn.UnlearnConfig`, the ``asu unlearn`` command, the
presets and :class:`asu.losses.UnlearnObjective` read the registry and nothing else.

A term is a function ``term(ctx, batches, params) -> loss`` (a 0-dim fp32 tensor): ``ctx`` is the objective
(:class:`asu.losses.UnlearnObjective`: the student, the teacher, the model's logit head, per-run state),
``batches`` the micro-batch's parts (:class:`Batches`) and ``params`` the resolved parameter values, by name.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field, fields
from typing import Any

import torch

__all__ = ["Param", "Method", "RetainTerm", "Batches", "PARTS", "Term", "weight_params"]

#: The batches a micro-batch may hold: the forget and retain examples and the rewrites some methods train
#: on, each aligned with the forget example it comes from (see :func:`asu.methods.parts.part_rows`).
PARTS = ("forget", "retain", "idk", "retain_idk", "mismatch", "alternate")

#: What a part is, for the error that names a missing one.
PART_MEANING = {
    "idk": "the forget questions answered with a refusal",
    "retain_idk": "the retain questions answered with a refusal",
    "mismatch": "the forget questions answered with a retain answer",
    "alternate": "the forget questions answered with their alternate answer",
    "retain": "retain examples",
}


@dataclass
class Batches:
    """One micro-batch's parts (collated tensors, see :mod:`asu.data`); absent parts are None."""

    forget: dict[str, torch.Tensor]
    retain: dict[str, torch.Tensor] | None = None
    idk: dict[str, torch.Tensor] | None = None
    retain_idk: dict[str, torch.Tensor] | None = None
    mismatch: dict[str, torch.Tensor] | None = None
    alternate: dict[str, torch.Tensor] | None = None

    def part(self, name: str, method: str) -> dict[str, torch.Tensor]:
        """Part ``name``, or a ValueError naming what ``method`` needs."""
        batch = getattr(self, name)
        if batch is None:
            raise ValueError(f"method={method!r} needs a {name!r} batch ({PART_MEANING.get(name, name)})")
        return batch


#: ``term(ctx, batches, params) -> 0-dim loss``.
Term = Callable[[Any, Batches, Mapping[str, Any]], torch.Tensor]

_KINDS = ("positive", "nonnegative", "number", "count", "patterns", "choice")


@dataclass(frozen=True)
class Param:
    """A parameter of a method or a retain term.

    Attributes:
        name: its name in ``UnlearnConfig.method_args`` and ``asu unlearn --method-arg NAME=VALUE``.
        default: the value used when none is given.
        source: where the default comes from (a file of the reference implementation, or the paper).
        help: what it does, one line.
        kind: ``positive`` (a number > 0), ``nonnegative``, ``number``, ``count`` (an int >= 0),
            ``patterns`` (regular expressions: a string or a list of strings) or ``choice`` (one of
            ``choices``, a string).
        field: the :class:`asu.unlearn.UnlearnConfig` field holding it, for parameters that have one of their
            own (``lam``, ``temperature``, NPO's and SimNPO's); None = it lives in ``method_args``.
    """

    name: str
    default: Any
    source: str
    help: str
    kind: str = "positive"
    field: str | None = None
    choices: tuple[str, ...] = ()

    def __post_init__(self) -> None:
        if self.kind not in _KINDS:
            raise ValueError(f"parameter {self.name}: unknown kind {self.kind!r}")
        is_choice = self.kind == "choice"
        if is_choice != bool(self.choices) or (is_choice and self.default not in self.choices):
            raise ValueError(f"parameter {self.name}: a choice parameter needs choices holding its default")

    def check(self, value: Any, owner: str) -> Any:
        """``value`` in its canonical form (a float, an int, a tuple of patterns or one of the choices); a
        TypeError/ValueError naming ``owner``'s parameter otherwise."""
        what = f"{owner}'s parameter {self.name}"
        if self.kind == "choice":
            if value not in self.choices:
                raise ValueError(f"{what} must be one of {', '.join(self.choices)}, got {value!r}")
            return value
        if self.kind == "patterns":
            return _patterns(value, what)
        if self.kind == "count":
            if isinstance(value, bool) or not isinstance(value, int) or value < 0:
                raise ValueError(f"{what} must be an int >= 0, got {value!r}")
            return value
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise TypeError(f"{what} must be a finite number, got {value!r}")
        if self.kind == "positive" and value <= 0:
            raise ValueError(f"{what} must be > 0, got {value!r}")
        if self.kind == "nonnegative" and value < 0:
            raise ValueError(f"{what} must be >= 0, got {value!r}")
        return float(value)


def weight_params(gamma: float, alpha: float, source: str) -> tuple[Param, Param]:
    """open-unlearning's two weights, ``gamma * forget + alpha * retain``, with their defaults."""
    return (
        Param("gamma", gamma, source, "weight of the forget term", "nonnegative"),
        Param("alpha", alpha, source, "weight of the retain term (0: none)", "nonnegative"),
    )


def _patterns(value: Any, what: str) -> tuple[str, ...]:
    items = (value,) if isinstance(value, str) else value
    if not isinstance(items, (list, tuple)) or not items or not all(isinstance(p, str) for p in items):
        raise TypeError(f"{what} must be a regular expression or a non-empty list of them, got {value!r}")
    for p in items:
        try:
            re.compile(p)
        except re.error as e:
            raise ValueError(f"{what}: {p!r} is not a regular expression ({e})") from None
    return tuple(items)


@dataclass(frozen=True)
class RetainTerm:
    """A retain term ``L_R`` (see :class:`Method` for the shared attributes).

    Attributes:
        teacher_reads: the ``(part, smoothed)`` teacher hidden states it reads (what a cache must hold).
        reads_layer: it reads a decoder layer's output of the original model (no cache holds those).
    """

    name: str
    loss: Term
    formula: str
    reference: str
    teacher_reads: tuple[tuple[str, bool], ...] = ()
    reads_layer: bool = False
    parts: tuple[str, ...] = ()
    params: tuple[Param, ...] = ()


@dataclass(frozen=True)
class Method:
    """An unlearning method: ``loss = w_f * forget(...) + w_r * L_R`` (see the module docstring).

    Attributes:
        name: its name for ``asu unlearn --method``, ``UnlearnConfig.method`` and presets.
        title: the name the field knows it by (``GradDiff``, ``NPO``, ...).
        forget: the forget term, unweighted.
        formula: the forget term in one line of plain math (the README's method table).
        reference: the implementation it reproduces (repository and file).
        aliases: other accepted names.
        forget_weight: the parameter weighting the forget term (None = 1).
        retain: ``required`` (a retain set and term, weighted by ``retain_weight``), ``none`` (no retain
            term) or ``weighted`` (a retain term only when the ``retain_weight`` parameter is > 0).
        retain_weight: the parameter weighting the retain term (None = 1).
        retain_losses: the retain terms it takes; the first is its default.
        teacher_reads: the ``(part, smoothed)`` teacher hidden states the forget term reads.
        reads: ``attention`` (the teacher's post-RoPE q, k) or ``layer`` (hidden states captured inside the
            student's decoder): read through hooks, so no cache holds them and gradient checkpointing is off.
        parts: the extra batches the forget term reads (``idk``, ``mismatch``, ``alternate``).
        params: its parameters (their defaults and sources).
        experimental: not a published method (documented as such).
        prepare: called once with the student and the resolved parameters before training (RMU chooses which
            weights train there).
    """

    name: str
    title: str
    forget: Term
    formula: str
    reference: str
    aliases: tuple[str, ...] = ()
    forget_weight: str | None = None
    retain: str = "required"
    retain_weight: str | None = None
    retain_losses: tuple[str, ...] = ("nll", "kl", "ap")
    teacher_reads: tuple[tuple[str, bool], ...] = ()
    reads: str | None = None
    parts: tuple[str, ...] = ()
    params: tuple[Param, ...] = ()
    experimental: bool = False
    prepare: Callable[[torch.nn.Module, Mapping[str, Any]], None] | None = field(default=None, repr=False)

    def __post_init__(self) -> None:
        if self.retain not in ("required", "none", "weighted"):
            raise ValueError(f"method {self.name}: retain must be required, none or weighted")
        names = {p.name for p in self.params}
        for weight in (self.forget_weight, self.retain_weight):
            if weight is not None and weight not in names:
                raise ValueError(f"method {self.name}: weight {weight!r} is not one of its parameters")
        if self.retain == "weighted" and self.retain_weight is None:
            raise ValueError(f"method {self.name}: a weighted retain term needs retain_weight")
        unknown = set(self.parts) - set(PARTS)
        if unknown:
            raise ValueError(f"method {self.name}: unknown parts {sorted(unknown)}")

    @property
    def default_retain(self) -> str:
        return self.retain_losses[0]

    @property
    def smoothed(self) -> bool:
        """Whether the method reads the smoothed teacher (the temperature matters to it)."""
        return any(p.name == "temperature" for p in self.params)

    def param(self, name: str) -> Param:
        return next(p for p in self.params if p.name == name)


def field_names(cls: type) -> set[str]:
    """The dataclass fields of ``cls`` (used to check that every ``Param.field`` exists)."""
    return {f.name for f in fields(cls)}
