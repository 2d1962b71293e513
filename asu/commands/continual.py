"""``asu continual``: unlearn a sequence of forget requests, each from the previous step's model.

``asu continual --model M --forget req1.jsonl --forget req2.jsonl ... --retain retain.jsonl --out DIR``
runs :func:`asu.continual.unlearn_sequence`: step ``k`` unlearns request ``k`` with the retain set plus the
requests still to come, its teacher made from the original model or the previous step
(``--teacher-anchor``), evaluates the model (:func:`asu.continual.step_evaluator`, unless ``--no-eval``),
and writes ``DIR/step-K/`` before the next step starts. ``DIR/continual.json`` (written before step 1) lists
the finished steps, ``continual.md`` / ``continual.png`` show forget and utility across them. ``--resume``
continues a run that was stopped at any point, without redoing finished steps, after checking that the
settings and the content of every request, the retain set, the refusals, the tokenizer and the template are
the ones it started with; ``--out`` is locked while the command runs. Everything that can be checked (the
flags, the data, the template, ``--out`` and what a resume would continue) is checked before the model is
loaded. Every other flag is ``asu unlearn``'s and applies to each
step (``--temperature auto`` chooses τ afresh at each step).

A command of its own rather than a repeated ``asu unlearn --forget``: its output is a directory per step
plus a summary, not ``asu unlearn``'s single finished run, and it has flags that mean nothing for one
request (the teacher anchor, the evaluation after each step).
"""

from __future__ import annotations

import argparse

from asu.commands.unlearn import (
    FORGET_HELP,
    _config_from_args,
    add_data_arguments,
    add_run_arguments,
    describe_temperature,
    flag_names,
    load_checked_tokenizer,
    load_idk,
    load_retain,
    load_unlearn_model,
)
from asu.continual import (
    ANCHORS,
    ContinualStep,
    check_continual_output,
    continual_settings,
    step_evaluator,
    unlearn_sequence,
    write_report,
)
from asu.data import load_rows
from asu.files import check_output_location
from asu.models import check_model_folder


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="path of a Hugging Face causal LM directory")
    add_data_arguments(parser)
    parser.add_argument(
        "--forget",
        action="append",
        required=True,
        help=f"a forget request, in the order to forget them; repeat the flag for each. {FORGET_HELP}",
    )
    parser.add_argument(
        "--teacher-anchor",
        choices=ANCHORS,
        default="original",
        help="the model every step's teacher is made from: the original model (default) or the model the "
        "step starts from",
    )
    parser.add_argument(
        "--eval",
        action=argparse.BooleanOptionalAction,
        default=True,
        help="evaluate after every step: the request, every request forgotten so far, those still to come "
        "and the retain set (default on)",
    )
    parser.add_argument(
        "--eval-max-new-tokens", type=int, default=200, help="answer length of the evaluation (default 200)"
    )
    add_run_arguments(parser)


def _print_step(step: ContinualStep, total: int) -> None:
    ev = (step.evaluation or {}).get("request", {})
    parts = [f"step {step.step}/{total}: {step.num_forget} forget rows, {step.num_retain} retain rows"]
    if step.resumed:
        parts.append("(already done)")
    tau = describe_temperature(step.stats)
    if tau:
        parts.append(tau)
    if ev:
        keys = ("forget_rouge", "retain_rouge", "model_utility")
        parts.append(", ".join(f"{k} {ev[k]:.3f}" for k in keys if k in ev))
    print("asu continual: " + "; ".join(parts), flush=True)


def run(args: argparse.Namespace) -> int:
    """``asu continual``: validate, load, unlearn the requests in turn, write ``--out``. Every failure is an
    exception for the command's error boundary (:mod:`asu.commands.boundary`)."""
    cfg = _config_from_args(args)
    cfg.validate()
    check_model_folder(args.model)
    check_output_location(args.out, {"--model": args.model})
    if args.eval_max_new_tokens < 1:
        raise ValueError(f"--eval-max-new-tokens must be >= 1, got {args.eval_max_new_tokens}")
    keys = {"question_key": args.question_key, "answer_key": args.answer_key}
    requests = [load_rows(source, **keys) for source in args.forget]
    retain_rows = load_retain(args, cfg)
    idk_answers = load_idk(args, cfg)
    tokenizer = load_checked_tokenizer(args, cfg, [row for rows in requests for row in rows])
    settings = continual_settings(requests, retain_rows, cfg, args.teacher_anchor, tokenizer, idk_answers)
    with flag_names():
        check_continual_output(args.out, settings, args.resume, args.forget)
    model = load_unlearn_model(args)
    evaluate = None
    if args.eval:
        evaluate = step_evaluator(
            tokenizer, requests, retain_rows, template=args.template, batch_size=32,
            max_new_tokens=args.eval_max_new_tokens,
        )  # fmt: skip
    with flag_names():
        result = unlearn_sequence(
            model, tokenizer, requests, retain_rows, cfg, output_dir=args.out,
            teacher_anchor=args.teacher_anchor, evaluate=evaluate, idk_answers=idk_answers,
            resume=args.resume, on_step=lambda s: _print_step(s, len(requests)), request_names=args.forget,
        )  # fmt: skip
    write_report(
        args.out, result.steps, f"asu continual ({cfg.method}, teacher anchor {args.teacher_anchor})"
    )
    print(f"asu continual: {len(result.steps)} steps done, wrote {args.out}")
    return 0
