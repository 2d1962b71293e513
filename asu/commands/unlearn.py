"""``asu unlearn``: unlearn a forget set from a Hugging Face causal LM directory and write the result.

Arguments map one to one onto :class:`asu.unlearn.UnlearnConfig` (whose defaults are the paper's TOFU
settings); the work is :func:`asu.unlearn.unlearn`. Everything is validated before any file is written.
"""

from __future__ import annotations

import argparse
import os
import sys

import torch

from asu.data import DataError, load_idk_answers, load_rows
from asu.losses import METHOD_ALIASES, METHODS, RETAIN_LOSS_ALIASES, RETAIN_LOSSES
from asu.smoothing import parse_layers
from asu.teachers import TEACHER_SOURCES
from asu.unlearn import UnlearnConfig, check_output_dir, unlearn


def add_arguments(parser: argparse.ArgumentParser) -> None:
    """Flags of ``asu unlearn``; defaults are :class:`UnlearnConfig`'s (the paper's TOFU settings)."""
    d = UnlearnConfig()
    parser.add_argument("--model", required=True, help="path of a Hugging Face causal LM directory")
    parser.add_argument(
        "--forget", required=True, help="forget set (.json/.jsonl, TOFU format or 'text' rows)"
    )
    parser.add_argument("--retain", help="retain set (required except for --method ga)")
    parser.add_argument(
        "--method",
        default=d.method,
        help=f"{'|'.join(METHODS)} (default {d.method}; {_aliases(METHOD_ALIASES)}); asu-attn is "
        "EXPERIMENTAL: distils each selected layer's attention rows toward the smoothed teacher's on forget "
        "data (teacher copy, base or self)",
    )
    parser.add_argument(
        "--retain-loss",
        default=d.retain_loss,
        help=f"{'|'.join(RETAIN_LOSSES)} (default {d.retain_loss}; "
        f"deprecated: {_aliases(RETAIN_LOSS_ALIASES)})",
    )
    parser.add_argument("--temperature", type=float, default=d.temperature, help="attention temperature tau")
    parser.add_argument("--lam", type=float, default=d.lam, help="weight of the ASU term")
    parser.add_argument("--layers", default="all", help="smoothed layers: all, 6-8, or 0,2,5-7")
    parser.add_argument(
        "--teacher",
        default=d.teacher,
        help=f"{'|'.join(TEACHER_SOURCES)} (self: self-smoothing, --method asu-attn only, no teacher model)",
    )
    parser.add_argument("--epochs", type=float, default=d.epochs)
    parser.add_argument("--lr", type=float, default=d.lr)
    parser.add_argument("--batch-size", type=int, default=d.batch_size, help="examples per device step")
    parser.add_argument("--grad-accum", type=int, default=d.grad_accum)
    parser.add_argument("--max-length", type=int, default=d.max_length)
    parser.add_argument("--pack", action=argparse.BooleanOptionalAction, default=d.pack)
    parser.add_argument("--lora-r", type=int, default=d.lora_r, help="LoRA rank (0 = full fine-tuning)")
    parser.add_argument("--gradient-checkpointing", action="store_true")
    parser.add_argument("--bf16", action=argparse.BooleanOptionalAction, default=None)
    parser.add_argument("--cache-dir", help="keep the cache teacher's hidden states on disk there")
    parser.add_argument("--idk-file", help="refusal answers for --method idk, one per line")
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
    parser.add_argument("--no-progress", action="store_true", help="no progress bar")


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


def _config_from_args(args: argparse.Namespace) -> UnlearnConfig:
    return UnlearnConfig(
        method=args.method,
        temperature=args.temperature,
        lam=args.lam,
        retain_loss=_retain_loss(args.retain_loss),
        teacher=args.teacher,
        layers=None if str(args.layers).strip().lower() == "all" else args.layers,
        lr=args.lr,
        epochs=args.epochs,
        batch_size=args.batch_size,
        grad_accum=args.grad_accum,
        max_length=args.max_length,
        pack=args.pack,
        seed=args.seed,
        bf16=args.bf16,
        gradient_checkpointing=args.gradient_checkpointing,
        lora_r=args.lora_r,
        cache_dir=args.cache_dir,
        save_steps=args.save_steps,
        progress=not args.no_progress,
    )


def _load_dtype(name: str) -> torch.dtype:
    if name == "auto":
        bf16 = torch.cuda.is_available() and torch.cuda.is_bf16_supported()
        return torch.bfloat16 if bf16 else torch.float32
    return getattr(torch, name)


def _error(message: str) -> int:
    first = str(message).strip().splitlines()[0] if str(message).strip() else "failed"
    print(f"asu unlearn: error: {first}", file=sys.stderr)
    return 2


def run(args: argparse.Namespace) -> int:
    """``asu unlearn``: validate everything, load, unlearn, write ``--out``. Returns the exit status."""
    try:
        cfg = _config_from_args(args)
        cfg.validate()
        if not os.path.isdir(args.model):
            raise ValueError(f"model path {args.model} does not exist (or is not a directory)")
        forget_rows = load_rows(args.forget)
        if cfg.method != "ga" and not args.retain:
            raise ValueError(f"--method {cfg.method} needs --retain")
        retain_rows = load_rows(args.retain) if args.retain else None
        idk_answers = None
        if cfg.method == "idk":
            if not args.idk_file:
                raise ValueError("--method idk needs --idk-file (refusal answers, one per line)")
            idk_answers = load_idk_answers(args.idk_file)
        check_output_dir(args.out, args.resume)

        from transformers import AutoConfig, AutoModelForCausalLM, AutoTokenizer
        from transformers.utils import logging as hf_logging

        if args.no_progress:
            hf_logging.disable_progress_bar()
        # Check the layer selection against the config before loading any weights.
        model_config = AutoConfig.from_pretrained(args.model)
        num_layers = getattr(model_config, "num_hidden_layers", None)
        if cfg.layers is not None and isinstance(num_layers, int):
            parse_layers(cfg.layers, num_layers)
        attn = args.attn_implementation
        if attn == "auto":
            attn = "asu" if torch.cuda.is_available() else "sdpa"
        if attn == "asu":
            import asu.attention  # noqa: F401  (registers the "asu" attention)
        tokenizer = AutoTokenizer.from_pretrained(args.model)
        model = AutoModelForCausalLM.from_pretrained(
            args.model, dtype=_load_dtype(args.dtype), attn_implementation=attn
        )
        result = unlearn(
            model,
            tokenizer,
            forget_rows,
            retain_rows,
            cfg,
            output_dir=args.out,
            idk_answers=idk_answers,
            resume=args.resume,
        )
    except (DataError, ValueError, TypeError, OSError) as e:
        return _error(str(e))
    final = result.history[-1] if result.history else {}
    print(
        f"asu unlearn: {cfg.method} done, {result.stats['optimizer_steps']} steps, "
        f"final loss {final.get('loss', float('nan')):.6g}, wrote {args.out}"
    )
    teacher = result.stats.get("teacher", {})
    if teacher.get("source") == "cache":
        print(
            f"asu unlearn: teacher cache: {teacher['teacher_forward_passes']} teacher forward passes "
            f"({teacher['teacher_forward_passes_saved']} saved), {teacher['cache_bytes'] / 2**20:.1f} MiB "
            f"cached on {teacher['cache_location']}, {teacher['teacher_bytes_freed'] / 2**20:.1f} MiB of "
            "teacher weights never held"
        )
    return 0
