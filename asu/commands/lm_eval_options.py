"""``asu eval --lm-eval TASKS``: general ability through lm-evaluation-harness on the model already loaded
(:mod:`asu.lm_eval_bridge`). The flags, the tasks and their data checked before the model loads, and the call
that adds lm-eval's numbers to the result.
"""

from __future__ import annotations

import argparse
from typing import Any

from asu import lm_eval_bridge
from asu.lm_eval_bridge import LmEvalPlan


def add_arguments(group: argparse._ArgumentGroup) -> None:
    group.add_argument(
        "--lm-eval",
        action="append",
        default=[],
        metavar="TASKS",
        help="lm-eval tasks, comma-separated and repeatable; 'paper' is the ASU paper's four (arc_challenge, "
        "mmlu, truthfulqa_mc1, gsm8k). Offline: the data must be local or cached",
    )
    group.add_argument(
        "--lm-eval-include", metavar="DIR", help="a folder of your own lm-eval task YAML files"
    )
    group.add_argument(
        "--lm-eval-limit",
        type=float,
        help="examples per task (a fraction if < 1); for trials, not comparable",
    )
    group.add_argument(
        "--lm-eval-batch-size",
        help="lm-eval's batch size (a number, auto, auto:N); default auto:4 on CUDA (the paper's), 8 on CPU",
    )
    group.add_argument(
        "--lm-eval-online",
        action="store_true",
        help="let lm-eval download task data from the Hugging Face hub",
    )


def _batch_size(text: str | None, device: str) -> int | str:
    if text is None:
        return "auto:4" if str(device).startswith("cuda") else 8
    if text == "auto" or text.startswith("auto:"):
        return text
    try:
        value = int(text)
    except ValueError:
        raise ValueError(f"--lm-eval-batch-size: a number, auto or auto:N, got {text!r}") from None
    if value < 1:
        raise ValueError(f"--lm-eval-batch-size must be >= 1, got {value}")
    return value


def prepare(args: argparse.Namespace) -> LmEvalPlan | None:
    """The validated plan (None without ``--lm-eval``); ValueError before the model is loaded."""
    extra = {
        "--lm-eval-include": args.lm_eval_include, "--lm-eval-limit": args.lm_eval_limit,
        "--lm-eval-batch-size": args.lm_eval_batch_size, "--lm-eval-online": args.lm_eval_online,
    }  # fmt: skip
    if not args.lm_eval:
        given = [flag for flag, value in extra.items() if value]
        if given:
            raise ValueError(f"{', '.join(given)}: only with --lm-eval TASKS")
        return None
    return lm_eval_bridge.prepare(
        args.lm_eval, args.lm_eval_include, args.lm_eval_limit,
        _batch_size(args.lm_eval_batch_size, args.device), args.lm_eval_online,
    )  # fmt: skip


def run(plan: LmEvalPlan | None, result: dict[str, Any], model: Any, tokenizer: Any) -> None:
    """lm-eval on ``model`` (already loaded), its numbers added to ``result``."""
    if plan is not None:
        lm_eval_bridge.attach(result, lm_eval_bridge.run(plan, model, tokenizer), plan)
