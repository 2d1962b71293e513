"""What every attack is given (:class:`AttackContext`) and what it gives back (:class:`AttackOutcome`)."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from asu.data import Rows

__all__ = ["ATTACK_SKIP", "TRACKED", "AttackContext", "AttackOutcome", "Evaluate", "evaluator", "tracked"]

#: The summary values an attack records before and after: forget knowledge first, then the retain side.
TRACKED = (
    "forget_Q_A_Prob",
    "forget_Q_A_ROUGE",
    "forget_fact_leakage_any",
    "extraction_strength",
    "exact_memorization",
    "retain_Q_A_Prob",
    "retain_Q_A_ROUGE",
)

#: ``evaluate(model, forget_rows, retain_rows=None, template=None) -> summary``: the evaluation's flat
#: ``{metric: value}`` of ``model`` on those rows (as :func:`asu.evaluate.evaluate_model`'s ``summary``),
#: ``template`` replacing the prompt template when given.
Evaluate = Callable[..., Mapping[str, Any]]


def tracked(summary: Mapping[str, Any]) -> dict[str, float]:
    """The :data:`TRACKED` values present in ``summary``."""
    return {k: summary[k] for k in TRACKED if summary.get(k) is not None}


@dataclass
class AttackContext:
    """The evaluated model and everything an attack needs to attack and re-evaluate it.

    Attributes:
        model: the model under attack (never modified: attacks work on copies).
        tokenizer: its tokenizer.
        forget: the forget rows; retain: the retain rows (or None).
        evaluate: see :data:`Evaluate`.
        before: the model's own summary (what the attack is compared with).
        template: the prompt template the rows are rendered in (None: the default), for training and probes.
        reference: the reference (retain-only) model's attack sections, ``{section name: section}`` from its
            ``ASU_EVAL.json``, or None: relearning's R needs the reference's relearning.
        seed: seeds the relearning's data order and the split of the forget rows.
        max_length: tokens per question + answer when training (as the evaluation cuts them).
    """

    model: nn.Module
    tokenizer: Any
    forget: Rows
    retain: Rows | None
    evaluate: Evaluate
    before: Mapping[str, Any]
    template: Any = None
    reference: Mapping[str, Any] | None = None
    seed: int = 0
    max_length: int = 512


@dataclass
class AttackOutcome:
    """One attack's results as entries of ``ASU_EVAL.json`` in open-unlearning's layout: ``{key: {"agg_value":
    number or None, ...details}}``, the attack's score entry first (with the protocol, the values before and
    after, curves), then one entry per value after the attack; and notes for people (what could not be
    computed, and why)."""

    name: str
    entries: dict[str, dict[str, Any]] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)

    @property
    def summary(self) -> dict[str, float]:
        """``{key: agg_value}`` of the entries that have a value (the rows of the summary table)."""
        return {k: e["agg_value"] for k, e in self.entries.items() if e.get("agg_value") is not None}

    def add_values(self, prefix: str, values: Mapping[str, Any]) -> None:
        """One entry ``{prefix}_{metric}`` per value (the values after the attack)."""
        for k, v in values.items():
            self.entries[f"{prefix}_{k}"] = {"agg_value": v}


#: Metrics the attacks' re-evaluations leave out: they score knowledge by probability and ROUGE-L; the truth
#: ratios would cost a pass over every perturbed answer per re-evaluation.
ATTACK_SKIP = ("forget_truth_ratio", "retain_Truth_Ratio")


def evaluator(tokenizer: Any, *, skip: Any = (), template: Any = None, **kwargs: Any) -> Evaluate:
    """An :data:`Evaluate` running :func:`asu.evaluate.evaluate_model` on the given rows (no general or
    holdout sets, no reference; :data:`ATTACK_SKIP` and ``skip`` left out) with ``template`` and ``kwargs``
    (``batch_size``, ``max_new_tokens``, ``max_length``, ``well_formed``, ``progress``)."""
    from asu.evaluate import evaluate_model

    def evaluate(model: nn.Module, forget: Rows, retain: Rows | None = None, template: Any = template) -> Any:
        skipped = {*skip, *ATTACK_SKIP}
        res = evaluate_model(
            model, tokenizer, forget, retain, None, None, skip=skipped, template=template, **kwargs
        )
        return res["summary"]

    return evaluate
