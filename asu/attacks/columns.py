"""Robustness as table columns: what a benchmark calls per model (the quality benchmark on the embedded
worlds, and a real-model benchmark).

.. code-block:: python

    from asu.attacks.columns import robustness_columns, yardstick
    from asu.attacks.context import evaluator

    evaluate = evaluator(tokenizer, batch_size=32, max_new_tokens=200)
    specs = ["relearn:6:1e-3", "quant:nf4", "prefix"]
    ref = yardstick(oracle, tokenizer, forget, retain, evaluate, specs)          # once per forget set
    original = robustness_columns(model0, tokenizer, forget, retain, evaluate, specs, reference=ref)
    row = robustness_columns(unlearned, tokenizer, forget, retain, evaluate, specs, reference=ref,
                             original=original)

Columns (flat ``{key: number}``): every attack's summary entries (``relearn_R``, ``relearn_split_R``,
``relearn_forget_Q_A_Prob`` after, ``quant_nf4_Q``, ``quant_nf4_forget_Q_A_ROUGE`` after,
``prefix_forget_Q_A_ROUGE``, ``robustness``, ...), the same scores on ROUGE-L (``relearn_R_rouge``,
``relearn_split_R_rouge``, ``quant_nf4_Q_rouge``, ``robustness_rouge``), the values before the attacks
(``before_forget_Q_A_Prob``, ...), and with the original model's columns the split variant's recovery:
``relearn_split_recovered[_rouge] = (after − before) / (original − before)`` on the held-out half (the share
of what unlearning removed there that relearning the other half brought back: 0 nothing, 1 all).
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from torch import nn

from asu.attacks.context import AttackContext, Evaluate, tracked
from asu.attacks.registry import parse_attacks, run_attacks
from asu.attacks.scores import robustness_score
from asu.data import Rows

__all__ = ["robustness_columns", "yardstick"]

ROUGE = "forget_Q_A_ROUGE"


def _relearn_only(specs: Sequence[str]) -> list[str]:
    return [s for s in parse_attacks(specs) if s.kind == "relearn"]


def yardstick(
    oracle: nn.Module,
    tokenizer: Any,
    forget: Rows,
    retain: Rows | None,
    evaluate: Evaluate,
    specs: Sequence[str],
    *,
    seed: int = 0,
    template: Any = None,
    max_length: int = 512,
) -> dict[str, Any]:
    """The retain-only model's relearning under the ``relearn`` spec of ``specs``: ``{"relearn_R": entry}``,
    the ``reference`` of :func:`robustness_columns` (as the ``ASU_EVAL.json`` of its ``asu eval
    --attack``)."""
    relearn = _relearn_only(specs)
    if not relearn:
        raise ValueError("the yardstick is the oracle's relearning: give a relearn attack")
    before = evaluate(oracle, forget, retain)
    ctx = AttackContext(oracle, tokenizer, forget, retain, evaluate, before, template, None, seed, max_length)
    (outcome,) = run_attacks(relearn, ctx)
    return {"relearn_R": outcome.entries["relearn_R"]}


def _split_recovery(entry: Mapping[str, Any], original: Mapping[str, Any], metric: str) -> float | None:
    before, after = entry["split"]["before"].get(metric), entry["split"]["after"].get(metric)
    top = original.get(f"split_before_{metric}")
    if None in (before, after, top) or top - before <= 0:
        return None
    return (after - before) / (top - before)


def robustness_columns(
    model: nn.Module,
    tokenizer: Any,
    forget: Rows,
    retain: Rows | None,
    evaluate: Evaluate,
    specs: Sequence[str],
    *,
    reference: Mapping[str, Any] | None = None,
    original: Mapping[str, Any] | None = None,
    before: Mapping[str, Any] | None = None,
    seed: int = 0,
    template: Any = None,
    max_length: int = 512,
) -> dict[str, float]:
    """Attack ``model`` with ``specs`` (``--attack`` specs) and return its columns (module docstring).

    ``reference``: the :func:`yardstick` (needed for R); ``original``: the original model's columns (for the
    split recovery); ``before``: the model's evaluation summary when already computed."""
    before = evaluate(model, forget, retain) if before is None else before
    ctx = AttackContext(
        model, tokenizer, forget, retain, evaluate, before, template, reference, seed, max_length
    )
    outcomes = run_attacks(parse_attacks(specs), ctx)
    columns: dict[str, float] = {f"before_{k}": v for k, v in tracked(before).items()}
    for o in outcomes:
        columns |= o.summary
        for key, entry in o.entries.items():
            for score in ("R", "Q"):
                if isinstance(entry.get(score), dict) and entry[score].get(ROUGE) is not None:
                    columns[f"{key}_rouge"] = entry[score][ROUGE]
            if key == "relearn_R":
                split = entry["split"]
                columns |= {
                    f"split_before_{k}": v
                    for k, v in split["before"].items()
                    if k not in ("step", "lr", "loss")
                }
                if split["R"].get(ROUGE) is not None:
                    columns["relearn_split_R_rouge"] = split["R"][ROUGE]
                for metric, suffix in (("forget_Q_A_Prob", ""), (ROUGE, "_rouge")):
                    rec = _split_recovery(entry, original, metric) if original is not None else None
                    if rec is not None:
                        columns[f"relearn_split_recovered{suffix}"] = rec
    rouge = robustness_score(columns.get("relearn_R_rouge"), columns.get("quant_nf4_Q_rouge"))
    if rouge is not None:
        columns["robustness_rouge"] = rouge
    return columns
