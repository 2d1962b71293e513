"""The attacks by name: parsing ``--attack`` specs, running them, and adding their results to an evaluation.

Specs (``asu eval --attack SPEC``, repeatable or comma-separated)::

    quant[:nf4|fp4|int8]      4-bit NF4 (default) / FP4 block-wise, or LLM.int8() row-wise (asu.attacks.quant)
    relearn[:STEPS[:LR]]      fine-tune on the forget set, full and split (asu.attacks.relearn)
    paraphrase                paraphrased questions (or answers) (asu.attacks.probes)
    prefix                    the answer prefilled with "Sure, here is the answer:" (asu.attacks.probes)

Every attack's entries go into the evaluation's ``extras`` (``ASU_EVAL.json``) and ``summary``
(``summary.json`` and the summary table). With both a ``relearn`` R and a ``quant:nf4`` Q, ``robustness`` is
their harmonic mean (the meta-evaluation's aggregate, :mod:`asu.attacks.scores`).
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from asu.attacks import probes, quant, relearn
from asu.attacks.context import AttackContext, AttackOutcome
from asu.attacks.scores import robustness_score

__all__ = ["ATTACKS", "AttackSpec", "attach", "load_reference_attacks", "parse_attacks", "run_attacks"]


@dataclass(frozen=True)
class AttackSpec:
    """A parsed spec: the attack's ``kind``, its parameters, the ``name`` its entries are prefixed with."""

    kind: str
    params: dict[str, Any] = field(default_factory=dict)
    name: str = ""


def _no_args(kind: str, args: list[str]) -> dict[str, Any]:
    if args:
        raise ValueError(f"attack spec {kind} takes no arguments, got {':'.join(args)!r}")
    return {}


def _quant_args(args: list[str]) -> dict[str, Any]:
    if len(args) > 1:
        raise ValueError(f"attack spec quant[:FORMAT]: one format, got {':'.join(args)!r}")
    fmt = args[0] if args else "nf4"
    if fmt not in quant.FORMATS:
        raise ValueError(f"attack spec quant:{fmt}: the formats are {', '.join(quant.FORMATS)}")
    return {"fmt": fmt}


def _relearn_args(args: list[str]) -> dict[str, Any]:
    if len(args) > 2:
        raise ValueError(f"attack spec relearn[:STEPS[:LR]]: at most two values, got {':'.join(args)!r}")
    params: dict[str, Any] = {}
    if args and args[0]:
        if not args[0].isdigit() or int(args[0]) < 1:
            raise ValueError(f"attack spec relearn:STEPS: STEPS must be a positive integer, got {args[0]!r}")
        params["steps"] = int(args[0])
    if len(args) == 2:
        try:
            lr = float(args[1])
        except ValueError:
            lr = math.nan
        if not (math.isfinite(lr) and lr > 0):
            raise ValueError(f"attack spec relearn:STEPS:LR: LR must be a positive number, got {args[1]!r}")
        params["lr"] = lr
    return params


#: kind -> (argument parser, runner, name of its entries).
ATTACKS: dict[
    str, tuple[Callable[[list[str]], dict], Callable[..., AttackOutcome], Callable[[dict], str]]
] = {
    "quant": (_quant_args, quant.attack, lambda p: f"quant_{p['fmt']}"),
    "relearn": (_relearn_args, relearn.attack, lambda p: "relearn"),
    "paraphrase": (lambda a: _no_args("paraphrase", a), probes.attack_paraphrase, lambda p: "paraphrase"),
    "prefix": (lambda a: _no_args("prefix", a), probes.attack_prefix, lambda p: "prefix"),
}


def parse_attacks(specs: Iterable[str]) -> list[AttackSpec]:
    """Every spec of ``specs`` (each may be a comma-separated list), validated; ValueError naming the bad one.
    The same attack twice (same entry names) is an error."""
    out: list[AttackSpec] = []
    for text in specs:
        for item in (s.strip() for s in text.split(",")):
            if not item:
                continue
            kind, *args = item.split(":")
            if kind not in ATTACKS:
                raise ValueError(f"attack spec {item!r}: unknown attack; choose from {', '.join(ATTACKS)}")
            parse, _, name = ATTACKS[kind]
            params = parse(args)
            spec = AttackSpec(kind, params, name(params))
            if any(s.name == spec.name for s in out):
                raise ValueError(f"attack spec {item!r}: {spec.name} is asked for twice")
            out.append(spec)
    return out


def run_attacks(specs: Sequence[AttackSpec], ctx: AttackContext) -> list[AttackOutcome]:
    """Run every attack on ``ctx`` in order; then ``robustness`` when a relearn R and a quant:nf4 Q exist."""
    outcomes = [ATTACKS[s.kind][1](ctx, **s.params) for s in specs]
    entries = {k: e for o in outcomes for k, e in o.entries.items()}
    r, q = (entries.get(k, {}).get("agg_value") for k in ("relearn_R", "quant_nf4_Q"))
    if "relearn_R" in entries and "quant_nf4_Q" in entries:
        agg = AttackOutcome("robustness")
        agg.entries["robustness"] = {
            "agg_value": robustness_score(r, q),
            "formula": "harmonic mean of relearn_R and quant_nf4_Q",
            "R": r,
            "Q": q,
        }
        if r is None:
            agg.notes.append("robustness: not computed (relearn_R needs a reference)")
        outcomes.append(agg)
    return outcomes


def attach(result: dict[str, Any], outcomes: Sequence[AttackOutcome]) -> dict[str, Any]:
    """Add the attacks' entries to an evaluation result (:func:`asu.evaluate.evaluate_model`'s): ``extras``
    and ``metrics`` (so ``ASU_EVAL.json`` holds them), ``summary`` and ``notes``. Returns ``result``."""
    for o in outcomes:
        for key, entry in o.entries.items():
            if key in result["extras"] or key in result["logs"]:
                raise ValueError(f"attack entry {key} collides with a metric of the evaluation")
            result["extras"][key] = entry
            result["metrics"][key] = entry
        result["summary"].update(o.summary)
        result["notes"].extend(o.notes)
    return result


def load_reference_attacks(path: str | os.PathLike[str]) -> dict[str, Any] | None:
    """The attack entries of a reference evaluation: ``ASU_EVAL.json`` beside the reference's
    ``TOFU_EVAL.json`` (``path`` is that file or its directory). None when there is no ``ASU_EVAL.json``."""
    p = Path(path)
    asu_eval = (p if p.is_dir() else p.parent) / "ASU_EVAL.json"
    if not asu_eval.is_file():
        return None
    try:
        obj = json.loads(asu_eval.read_text(encoding="utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ValueError(f"{asu_eval}: not valid JSON ({e})") from None
    if not isinstance(obj, dict):
        raise ValueError(f"{asu_eval}: expected an object of metrics")
    return obj
