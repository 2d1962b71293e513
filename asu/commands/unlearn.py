"""``asu unlearn``: unlearn a forget set from a Hugging Face causal LM directory and write the result.

Arguments map one to one onto :class:`asu.unlearn.UnlearnConfig` (whose defaults are the paper's TOFU
settings); ``--preset`` starts from one of the paper's recipes (:mod:`asu.presets`) and flags given
explicitly override it; ``--method NAME`` is any method of the registry (:mod:`asu.methods`) and
``--method-arg NAME=VALUE`` sets one of its parameters. The work is :func:`asu.unlearn.unlearn`. Everything is
validated before any file is written: the settings, the data, the model folder (its files readable, its
weights finite) and ``--out`` (not a file, not the model's folder nor inside or around it, no finished run in
it); failures reach the error boundary of :mod:`asu.commands.boundary` as one line, with the library's
argument names (``output_dir``, ...) replaced by this command's flags (:func:`flag_names`).
"""

from __future__ import annotations

import argparse
import contextlib
import json
import re
import sys
from collections.abc import Iterator
from typing import Any

import torch

from asu.data import load_idk_answers, load_rows
from asu.files import check_output_location
from asu.methods import METHOD_ALIASES, METHOD_NAMES, RETAIN_LOSS_ALIASES, RETAIN_LOSSES, RETAIN_REDUCTIONS
from asu.models import check_model_folder, load_model, load_tokenizer
from asu.presets import PRESETS, preset_values
from asu.smoothing import parse_layers
from asu.tau import DEFAULT_FRACTION, TauChoice, is_auto
from asu.teachers import TEACHER_SOURCES
from asu.templates import TEMPLATE_NAMES, check_template
from asu.unlearn import LR_SCHEDULES, UnlearnConfig, check_output_dir, unlearn

#: UnlearnConfig fields a preset may set, each a flag of the same name. Their argparse default is None, so a
#: flag given on the command line can be told from one left out.
PRESET_FIELDS = (
    "method",
    "temperature",
    "lam",
    "retain_loss",
    "retain_reduction",
    "epochs",
    "lr",
    "batch_size",
    "grad_accum",
    "max_length",
    "weight_decay",
    "warmup_epochs",
    "lr_schedule",
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``asu unlearn``; defaults are :class:`UnlearnConfig`'s (the paper's TOFU settings)."""
    parser.add_argument("--model", required=True, help="path of a Hugging Face causal LM directory")
    add_data_arguments(parser)
    parser.add_argument("--forget", required=True, help=FORGET_HELP)
    add_run_arguments(parser)


#: What ``--forget`` accepts (``asu continual`` takes the flag several times).
FORGET_HELP = (
    "forget set: a .json/.jsonl/.csv/.parquet file, a datasets save_to_disk folder or a hub dataset "
    "NAME:CONFIG[:SPLIT] (e.g. locuslab/TOFU:forget10); QA rows (question/answer) or 'text' rows"
)


def add_run_arguments(parser: argparse.ArgumentParser) -> None:
    """Every flag after ``--forget``: the retain set, the method and its settings, the output."""
    parser.add_argument(
        "--retain", help="retain set, same kinds (required unless the method has no retain term: ga, ceu)"
    )
    d = UnlearnConfig()
    _add_method_arguments(parser.add_argument_group("method"), d)
    _add_training_arguments(parser.add_argument_group("training"), d)
    _add_run_control_arguments(parser.add_argument_group("model, output and run control"), d)


def _add_method_arguments(parser: argparse._ArgumentGroup, d: UnlearnConfig) -> None:
    """The recipe: preset, method, retain loss, temperature, lambda, smoothed layers, teacher."""
    parser.add_argument(
        "--preset",
        choices=sorted(PRESETS),
        help="start from the paper's recipe (tau, lambda, lr, epochs, schedule, batch, max length, weight "
        "decay, retain loss); flags given explicitly override it",
    )
    parser.add_argument(
        "--method",
        help=f"{'|'.join(METHOD_NAMES)} (default {d.method}; {_aliases(METHOD_ALIASES)}); the README's "
        "method table gives each one's terms, parameters and sources; asu-attn is EXPERIMENTAL",
    )
    parser.add_argument(
        "--method-arg",
        action="append",
        default=[],
        metavar="NAME=VALUE",
        help="a parameter of the method or retain term (repeatable; VALUE is JSON, else a string), e.g. "
        "--method-arg beta=0.2; each method's parameters are listed in the README",
    )
    parser.add_argument(
        "--retain-loss",
        help=f"{'|'.join(RETAIN_LOSSES)} (default: the method's, {d.retain_loss} for most; "
        f"deprecated: {_aliases(RETAIN_LOSS_ALIASES)})",
    )
    parser.add_argument(
        "--retain-reduction",
        choices=RETAIN_REDUCTIONS,
        help=f"how the kl retain term averages: per sequence then over sequences, or over all tokens "
        f"(default {d.retain_reduction})",
    )
    parser.add_argument(
        "--temperature",
        type=temperature_arg,
        help=f"attention temperature tau (default {d.temperature}), or auto[:R]: chosen before training by "
        "bisecting the smoothed-teacher preview until its forget ROUGE-L is R times the original model's "
        f"(default R {DEFAULT_FRACTION}); the chosen tau and the preview curve go to run.json",
    )
    parser.add_argument("--lam", type=float, help=f"weight of the ASU term (default {d.lam})")
    parser.add_argument("--layers", default="all", help="smoothed layers: all, 6-8, or 0,2,5-7")
    parser.add_argument(
        "--teacher",
        default=d.teacher,
        help=f"{'|'.join(TEACHER_SOURCES)} (self: self-smoothing, --method asu-attn only, no teacher model)",
    )


def _add_training_arguments(parser: argparse._ArgumentGroup, d: UnlearnConfig) -> None:
    """The optimisation: epochs, learning rate and its schedule, batch, length, packing, LoRA, precision."""
    parser.add_argument("--epochs", type=float, help=f"default {d.epochs}")
    parser.add_argument("--lr", type=float, help=f"default {d.lr}")
    parser.add_argument("--batch-size", type=int, help=f"examples per device step (default {d.batch_size})")
    parser.add_argument("--grad-accum", type=int, help=f"default {d.grad_accum}")
    parser.add_argument("--max-length", type=int, help=f"tokens per example (default {d.max_length})")
    parser.add_argument("--weight-decay", type=float, help=f"AdamW weight decay (default {d.weight_decay})")
    parser.add_argument(
        "--warmup-epochs", type=float, help=f"epochs of linear warm-up (default {d.warmup_epochs})"
    )
    parser.add_argument(
        "--lr-schedule",
        choices=LR_SCHEDULES,
        help=f"after the warm-up: linear decay to 0 or constant (default {d.lr_schedule})",
    )
    parser.add_argument("--pack", action=argparse.BooleanOptionalAction, default=d.pack)
    parser.add_argument("--lora-r", type=int, default=d.lora_r, help="LoRA rank (0 = full fine-tuning)")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None)


def _add_run_control_arguments(parser: argparse._ArgumentGroup, d: UnlearnConfig) -> None:
    """How the model is loaded, where results and checkpoints go, and how a run resumes or stops."""
    parser.add_argument("--cache-dir", help="keep the cache teacher's hidden states on disk there")
    parser.add_argument(
        "--idk-file",
        help="refusal answers, one per line, for the methods that train on refusals (idk, asu-idk, dpo, "
        "--retain-loss ap)",
    )
    parser.add_argument(
        "--save-steps", type=int, help="checkpoint every N optimizer steps (default: each epoch)"
    )
    parser.add_argument(
        "--dtype",
        default="auto",
        choices=["auto", "float32", "bfloat16", "float16"],
        help="dtype to load the weights in (auto = bfloat16 on a GPU that supports it, as the paper's runs; "
        "float32 otherwise)",
    )
    parser.add_argument(
        "--attn-implementation",
        default="auto",
        help="attention to load the model with (auto = asu on a GPU, sdpa on CPU)",
    )
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--seed", type=int, default=d.seed)
    parser.add_argument("--resume", action="store_true", help="continue an interrupted run in --out")
    parser.add_argument(
        "--max-nonfinite-steps",
        type=int,
        default=d.max_nonfinite_steps,
        help="optimizer steps with a NaN/infinite loss or gradient norm to skip before the run stops "
        f"with an error (default {d.max_nonfinite_steps}: stop at the first)",
    )
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


def add_data_arguments(parser: argparse.ArgumentParser) -> None:
    """The flags every command reading QA data shares: the prompt template and the column names."""
    parser.add_argument(
        "--template",
        default="auto",
        help=f"prompt format of QA rows: {'|'.join(TEMPLATE_NAMES)} or a .jinja file (default auto: the "
        "tokenizer's chat template, else 'Question: q\nAnswer: a'); use the format the model was fine-tuned "
        "in (tofu-llama2 for TOFU's Llama-2 models)",
    )
    parser.add_argument(
        "--system-prompt", help="system prompt of the template (default: the template's own, if any)"
    )
    parser.add_argument("--question-key", help="column holding the question (default question)")
    parser.add_argument("--answer-key", help="column holding the answer (default answer)")


def temperature_arg(text: str) -> float | str:
    """``--temperature``: a number, ``auto`` or ``auto:R`` (the value is checked with the other settings)."""
    if is_auto(text):
        return text.strip()
    try:
        return float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"expected a number, 'auto' or 'auto:R', got {text!r}") from None


def _aliases(names: dict[str, str]) -> str:
    return ", ".join(f"{old} = {new}" for old, new in names.items())


def _retain_loss(name: str) -> str:
    """The retain loss named on the command line; a deprecated name gets a one-line note on stderr."""
    if name in RETAIN_LOSS_ALIASES:
        new = RETAIN_LOSS_ALIASES[name]
        note = f"asu unlearn: note: --retain-loss {name} is deprecated; use --retain-loss {new} (same loss)"
        print(note, file=sys.stderr)
        return new
    return name


def method_args(items: list[str]) -> dict[str, Any]:
    """``--method-arg NAME=VALUE`` items as a dict; VALUE is read as JSON (numbers, lists), else kept as
    text."""
    out: dict[str, Any] = {}
    for item in items:
        name, sep, text = item.partition("=")
        if not sep or not name.strip():
            raise ValueError(f"--method-arg expects NAME=VALUE, got {item!r}")
        try:
            value = json.loads(text)
        except json.JSONDecodeError:
            value = text
        out[name.strip()] = value
    return out


def _config_from_args(args: argparse.Namespace) -> UnlearnConfig:
    """Defaults, then the preset's values, then every flag given explicitly."""
    values = preset_values(args.preset) if args.preset else {}
    values.update({name: getattr(args, name) for name in PRESET_FIELDS if getattr(args, name) is not None})
    if "retain_loss" in values:
        values["retain_loss"] = _retain_loss(values["retain_loss"])
    return UnlearnConfig(
        **values,
        preset=args.preset,
        method_args=method_args(args.method_arg),
        teacher=args.teacher,
        layers=None if str(args.layers).strip().lower() == "all" else args.layers,
        template=args.template,
        system_prompt=args.system_prompt,
        pack=args.pack,
        seed=args.seed,
        bf16=args.bf16,
        gradient_checkpointing=args.gradient_checkpointing,
        lora_r=args.lora_r,
        cache_dir=args.cache_dir,
        save_steps=args.save_steps,
        max_nonfinite_steps=args.max_nonfinite_steps,
        progress=not args.no_progress,
    )


def _load_dtype(name: str) -> torch.dtype:
    if name == "auto":
        bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16 else torch.float32
    return getattr(torch, name)


def load_checked_tokenizer(args: argparse.Namespace, cfg: UnlearnConfig, rows: Any = None) -> Any:
    """The tokenizer of ``--model``, after the layer selection is checked against the model's config and the
    prompt template has rendered the first QA row of ``rows`` with it (:func:`asu.templates.check_template`):
    both fail before any weights are read."""
    from transformers import AutoConfig
    from transformers.utils import logging as hf_logging

    if args.no_progress:
        hf_logging.disable_progress_bar()
    model_config = AutoConfig.from_pretrained(args.model)
    num_layers = getattr(model_config, "num_hidden_layers", None)
    if cfg.layers is not None and isinstance(num_layers, int):
        parse_layers(cfg.layers, num_layers)
    tokenizer = load_tokenizer(args.model)
    if rows is not None:
        check_template(cfg.prompt_template(), tokenizer, rows)
    return tokenizer


def load_unlearn_model(args: argparse.Namespace) -> Any:
    """The model of ``--model`` in ``--dtype`` with ``--attn-implementation``."""
    attn = args.attn_implementation
    if attn == "auto":
        attn = "asu" if torch.cuda.is_available() else "sdpa"
    if attn == "asu":
        import asu.attention  # noqa: F401  (registers the "asu" attention)
    return load_model(args.model, dtype=_load_dtype(args.dtype), attn_implementation=attn)


def load_model_and_tokenizer(
    args: argparse.Namespace, cfg: UnlearnConfig, rows: Any = None
) -> tuple[Any, Any]:
    """:func:`load_checked_tokenizer`, then :func:`load_unlearn_model`."""
    tokenizer = load_checked_tokenizer(args, cfg, rows)
    return load_unlearn_model(args), tokenizer


def load_retain(args: argparse.Namespace, cfg: UnlearnConfig) -> list[dict[str, Any]] | None:
    """The rows of ``--retain`` (None when not given); ValueError when the method's retain term needs it."""
    if "retain" in cfg.method_setup().parts and not args.retain:
        raise ValueError(f"--method {cfg.method} needs --retain")
    keys = {"question_key": args.question_key, "answer_key": args.answer_key}
    return load_rows(args.retain, **keys) if args.retain else None


def load_idk(args: argparse.Namespace, cfg: UnlearnConfig) -> list[str] | None:
    """The refusal answers of ``--idk-file`` for the methods and retain terms that train on refusals (None
    for the others)."""
    if not cfg.method_setup().needs_refusals:
        return None
    if not args.idk_file:
        uses = f"--method {cfg.method}" + (" --retain-loss ap" if cfg.retain_loss == "ap" else "")
        raise ValueError(f"{uses} needs --idk-file (refusal answers, one per line)")
    return load_idk_answers(args.idk_file)


#: The library's argument names as its errors give them, and this command's flags for them.
FLAGS_OF_NAMES = {
    "output_dir": "--out",
    "max_nonfinite_steps": "--max-nonfinite-steps",
    "idk_answers": "--idk-file",
    "method_args": "--method-arg",
}


@contextlib.contextmanager
def flag_names() -> Iterator[None]:
    """Errors raised in the block name this command's flags instead of the library's argument names."""
    try:
        yield
    except (ValueError, TypeError, OSError) as e:
        text = str(e)
        pattern = r"\b(" + "|".join(FLAGS_OF_NAMES) + r")\b"
        renamed = re.sub(pattern, lambda m: FLAGS_OF_NAMES[m.group(1)], text)
        if renamed != text and len(e.args) == 1:
            e.args = (renamed,)
        raise


def describe_temperature(stats: dict[str, Any]) -> str | None:
    """One line on the automatic temperature of a finished run (None when τ was given)."""
    auto = stats.get("temperature_auto")
    return TauChoice(**auto).describe() if auto else None


def run(args: argparse.Namespace) -> int:
    """``asu unlearn``: validate everything, load, unlearn, write ``--out``. Returns the exit status; every
    failure is an exception for the command's error boundary."""
    cfg = _config_from_args(args)
    cfg.validate()
    check_model_folder(args.model)
    check_output_location(args.out, {"--model": args.model})
    if args.cache_dir:
        check_output_location(args.cache_dir, {"--model": args.model}, flag="--cache-dir")
    keys = {"question_key": args.question_key, "answer_key": args.answer_key}
    forget_rows = load_rows(args.forget, **keys)
    retain_rows = load_retain(args, cfg)
    idk_answers = load_idk(args, cfg)
    with flag_names():
        check_output_dir(args.out, args.resume)
    model, tokenizer = load_model_and_tokenizer(args, cfg, forget_rows)
    with flag_names():
        result = unlearn(
            model, tokenizer, forget_rows, retain_rows, cfg, output_dir=args.out, idk_answers=idk_answers,
            resume=args.resume,
        )  # fmt: skip
    final = result.history[-1] if result.history else {}
    print(
        f"asu unlearn: {cfg.method} done, {result.stats['optimizer_steps']} steps, "
        f"final loss {final.get('loss', float('nan')):.6g}, wrote {args.out}"
    )
    tau_line = describe_temperature(result.stats)
    if tau_line:
        print(f"asu unlearn: {tau_line}")
    teacher = result.stats.get("teacher", {})
    if teacher.get("source") == "cache":
        print(
            f"asu unlearn: teacher cache: {teacher['teacher_forward_passes']} teacher forward passes "
            f"({teacher['teacher_forward_passes_saved']} saved), {teacher['cache_bytes'] / 2**20:.1f} MiB "
            f"cached on {teacher['cache_location']}, {teacher['teacher_bytes_freed'] / 2**20:.1f} MiB of "
            "teacher weights never held"
        )
    return 0
