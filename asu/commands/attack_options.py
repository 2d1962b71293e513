"""``asu eval --attack``: the attacks' flags, their validation, and the call that runs them after the
evaluation (:mod:`asu.attacks`). Each attack adds its entries to ``ASU_EVAL.json``, ``summary.json`` and the
summary table.
"""

from __future__ import annotations

import argparse
from dataclasses import dataclass
from typing import Any

from asu.attacks import AttackContext, AttackSpec, attach, parse_attacks, run_attacks
from asu.attacks.context import evaluator
from asu.attacks.registry import load_reference_attacks
from asu.attacks.relearn import RelearnProtocol, protocol_record, reference_variants
from asu.evaluate import TOFU_MAX_LENGTH

#: The evaluation settings the attacks' re-evaluations share with the evaluation itself.
SHARED_SETTINGS = (
    "batch_size",
    "max_new_tokens",
    "max_length",
    "well_formed",
    "progress",
    "skip",
    "template",
)


@dataclass
class AttackPlan:
    """The parsed ``--attack`` specs, the seed and the reference's attack entries (or None)."""

    specs: list[AttackSpec]
    seed: int
    reference: dict[str, Any] | None


def add_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--attack",
        action="append",
        default=[],
        metavar="SPEC",
        help="attack the model and re-evaluate it (TOFU): quant[:nf4|fp4|int8], relearn[:STEPS[:LR]], "
        "paraphrase, prefix; repeatable or comma-separated. relearn's R needs --reference: the retain-only "
        "model's evaluation made with the same --attack relearn",
    )
    group.add_argument(
        "--attack-seed", type=int, default=0, help="relearning data order and split (default 0)"
    )


def prepare(args: argparse.Namespace, rows: dict[str, Any]) -> AttackPlan | None:
    """The validated plan (None without ``--attack``); ValueError before anything is loaded or written."""
    specs = parse_attacks(args.attack)
    if not specs:
        return None
    if args.benchmark != "tofu":
        raise ValueError("--attack applies to TOFU evaluations (QA rows), not MUSE")
    reference = load_reference_attacks(args.reference) if args.reference else None
    for spec in specs:
        if spec.kind == "relearn":
            protocol = RelearnProtocol(
                **spec.params, seed=args.attack_seed, max_length=args.max_length or TOFU_MAX_LENGTH
            )
            reference_variants(reference, protocol_record(rows["forget"], protocol))
    return AttackPlan(specs, args.attack_seed, reference)


def run(plan: AttackPlan | None, result: dict[str, Any], model: Any, tokenizer: Any, rows: dict[str, Any],
        settings: dict[str, Any]) -> None:  # fmt: skip
    """Run the plan's attacks on ``model`` and add them to ``result`` (``settings``: the evaluation's
    keyword arguments, of which :data:`SHARED_SETTINGS` are reused)."""
    if plan is None:
        return
    evaluate = evaluator(tokenizer, **{k: settings[k] for k in SHARED_SETTINGS})
    ctx = AttackContext(
        model, tokenizer, rows["forget"], rows["retain"], evaluate, result["summary"],
        template=settings["template"], reference=plan.reference, seed=plan.seed,
        max_length=settings["max_length"],
    )  # fmt: skip
    attach(result, run_attacks(plan.specs, ctx))
