"""``asu eval --metrics closer-look`` and ``--benchmark real-world``: closer-look's metrics
(:mod:`asu.closer_look`) beside open-unlearning's, or alone for the real-world setting. The flags, their
validation (rows' fields, the format, the judges loaded) before the model is loaded, and the call that adds
the numbers to the result.
"""

from __future__ import annotations

import argparse
import dataclasses
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from asu import closer_look
from asu.judges import DEFAULT_EMBEDDING_MODEL, DEFAULT_NLI_MODEL, Judges, load_judges
from asu.models import load_tokenizer

METRIC_FAMILIES = ("closer-look",)
REAL_WORLD = "real-world"


def add_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--metrics",
        action="append",
        default=[],
        metavar="NAME",
        help="more metrics beside open-unlearning's (TOFU): closer-look (its per-set components and MU / FE "
        "/ Avg, the ASU paper's currency); --benchmark real-world computes closer-look's alone",
    )
    group.add_argument(
        "--nli-model",
        default=DEFAULT_NLI_MODEL,
        help="NLI model of the entailment score (a directory or hub name)",
    )
    group.add_argument(
        "--embedding-model",
        default=DEFAULT_EMBEDDING_MODEL,
        help="sentence-transformers model of the cosine similarity (a directory or hub name)",
    )
    group.add_argument(
        "--closer-look-format",
        choices=tuple(closer_look.FORMATS),
        help="closer-look's prompt tags (default: the one --template writes: tofu-llama2 -> llama2-7b, plain "
        "-> phi; Llama-3-8B-Instruct: llama3-8b)",
    )
    group.add_argument(
        "--closer-look-rows",
        type=int,
        help=f"rows per set (default: TOFU {closer_look.TOFU_ROWS}, closer-look's ds_size; real-world all)",
    )
    group.add_argument(
        "--closer-look-max-length",
        type=int,
        help=f"tokens per encoded row and per prompt + answer (default {closer_look.MAX_LENGTH}, "
        "closer-look's generation.max_length)",
    )


def wanted(args: argparse.Namespace) -> bool:
    """Whether closer-look's metrics run: ``--metrics closer-look`` or the real-world benchmark."""
    names = [m.strip() for value in args.metrics for m in value.split(",") if m.strip()]
    unknown = sorted(set(names) - set(METRIC_FAMILIES))
    if unknown:
        raise ValueError(f"--metrics {', '.join(unknown)}: unknown; choose {', '.join(METRIC_FAMILIES)}")
    if names and args.benchmark == "muse":
        raise ValueError("--metrics closer-look applies to TOFU and the real-world setting, not MUSE")
    return bool(names) or args.benchmark == REAL_WORLD


def real_world_sources(args: argparse.Namespace) -> dict[str, Any]:
    """The real-world setting's files: ``--data`` (closer-look's ``forget_perturbed.json``) and ``--retain``
    (its neighbour set, ``neighbor_perturbed.json``); every other set and TOFU-only setting refused."""
    other = {
        "--split": args.split, "--general": args.general, "--real-authors": args.real_authors,
        "--world-facts": args.world_facts, "--holdout": args.holdout, "--reference": args.reference,
        "--temperature": args.temperature, "--skip": args.skip, "--require": args.require,
        "--max-new-tokens": args.max_new_tokens, "--max-length": args.max_length, "--world": args.world,
    }  # fmt: skip
    given = [flag for flag, value in other.items() if value]
    if given:
        raise ValueError(
            f"{', '.join(given)}: not part of the real-world setting (--data forget_perturbed.json, --retain "
            "neighbor_perturbed.json, closer-look's metrics and their settings)"
        )
    if not args.data:
        raise ValueError(
            "--benchmark real-world needs --data (closer-look's data/real_world/forget_perturbed.json)"
        )
    return {"forget": args.data, "retain": args.retain}


@dataclass
class Plan:
    """Validated closer-look settings and the loaded judges."""

    fmt: closer_look.Format
    protocol: closer_look.Protocol
    judges: Judges
    sets: dict[str, Any]
    notes: list[str]

    def record(self) -> dict[str, Any]:
        return {
            "format": self.fmt.name,
            "protocol": self.protocol.name,
            "rows_per_set": self.protocol.max_rows,
            "max_length": self.protocol.max_length,
            "nli_model": self.judges.nli_model,
            "embedding_model": self.judges.embedding_model,
            "sets": {name: len(rows) for name, rows in self.sets.items()},
        }


def _sets(rows: dict[str, Any], protocol: closer_look.Protocol) -> tuple[dict[str, Any], list[str]]:
    """closer-look's sets from the loaded rows (``general``'s ``ra`` / ``wf``), each cut to the protocol's
    row count and its fields checked; notes for general sets closer-look does not count."""
    sets = {"forget": rows["forget"], "retain": rows.get("retain")}
    general = rows.get("general") or {}
    sets |= {name: general.get(name) for name in ("ra", "wf")}
    notes = [
        f"closer-look: general set {name} left out (closer-look counts real authors, ra, and world facts, wf)"
        for name in general
        if name not in ("ra", "wf")
    ]
    sets = {name: list(r)[: protocol.max_rows] for name, r in sets.items() if r is not None}
    for name, r in sets.items():
        closer_look.check_set(name, r, protocol)
    if "retain" not in sets:
        notes.append("closer-look: model utility not computed (no retain set)")
    return sets, notes


def prepare(args: argparse.Namespace, rows: dict[str, Any], template: str | None) -> Plan | None:
    """The plan (None when closer-look's metrics are not asked for); ValueError before the model loads."""
    if not wanted(args):
        return None
    protocol = closer_look.REAL_WORLD if args.benchmark == REAL_WORLD else closer_look.TOFU
    if args.closer_look_rows is not None:
        if args.closer_look_rows < 1:
            raise ValueError(f"--closer-look-rows must be >= 1, got {args.closer_look_rows}")
        protocol = dataclasses.replace(protocol, max_rows=args.closer_look_rows)
    if args.closer_look_max_length is not None:
        if args.closer_look_max_length < 2:
            raise ValueError(f"--closer-look-max-length must be >= 2, got {args.closer_look_max_length}")
        protocol = dataclasses.replace(protocol, max_length=args.closer_look_max_length)
    sets, notes = _sets(rows, protocol)
    fmt = closer_look.resolve_format(args.closer_look_format, template, load_tokenizer(Path(args.model)))
    judges = load_judges(args.nli_model, args.embedding_model, args.device)
    return Plan(fmt, protocol, judges, sets, notes)


def base_result(*_: Any) -> dict[str, Any]:
    """The result of the real-world benchmark before closer-look's numbers are added (no open-unlearning
    metrics): the layout of :func:`asu.evaluate.evaluate_model`'s, empty."""
    keys = ("logs", "headline", "extras", "metrics", "summary", "generations")
    return {"benchmark": "REAL_WORLD", **{k: {} for k in keys}, "notes": [], "warnings": []}


def run(plan: Plan | None, result: dict[str, Any], model: Any, tokenizer: Any) -> None:
    """closer-look's evaluation of ``model``, added to ``result`` (:func:`asu.closer_look.attach`)."""
    if plan is None:
        return
    runs = closer_look.evaluate(model, tokenizer, plan.sets, plan.fmt, plan.protocol, plan.judges)
    closer_look.attach(result, runs, plan.record(), degenerate=plan.protocol.name == REAL_WORLD)
    result["notes"].extend(plan.notes)
