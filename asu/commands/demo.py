"""``asu demo``: forget authors of the embedded world with ASU, against GA+GD, and report (see
:mod:`asu.demo.run`).

On a CPU the demo runs torch on one thread unless told otherwise (``--threads``, or ``OMP_NUM_THREADS`` set in
the environment): its model is tiny, so the work of one operation is too small to split, and with two or
more threads every operation waits for all of them; on a machine whose cores are busy with other work a
thread that is not scheduled stalls the others (measured by ``benchmarks/demo_threads.py``; README
"Guarantees").
"""

from __future__ import annotations

import argparse
import os
from dataclasses import replace
from typing import Any

import torch

from asu.commands.outputs import add_overwrite_argument, locked_output
from asu.commands.unlearn import temperature_arg
from asu.demo.run import DemoSettings, default_settings, run_demo
from asu.tau import is_auto, parse_auto

#: torch threads of a CPU demo run when neither --threads nor OMP_NUM_THREADS says otherwise.
DEMO_CPU_THREADS = 1


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--cache-dir", help="model cache (default $ASU_CACHE or ~/.cache/asu)")
    parser.add_argument("--out", default="asu-demo", help="output directory (default ./asu-demo)")
    add_overwrite_argument(parser)
    parser.add_argument(
        "--method", default="asu", help="unlearning method to show against GA+GD (default asu)"
    )
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--quick", action="store_true", help="a tiny world and model (a smoke run)")
    parser.add_argument(
        "--temperature",
        type=temperature_arg,
        help="ASU attention temperature τ, or auto[:R] (default auto:0.5: chosen by the smoothed-teacher "
        "preview so the teacher's forget ROUGE-L is R times the original's)",
    )
    parser.add_argument("--layers", help='layers ASU smooths, e.g. "0-1" or "all" (default all)')
    parser.add_argument("--lam", type=float, help="weight λ of the ASU forget loss")
    parser.add_argument("--lr", type=float, help="ASU learning rate")
    parser.add_argument("--ga-lrs", help="comma-separated GA+GD learning rates")
    parser.add_argument("--epochs", type=int, help="unlearning epochs")
    parser.add_argument(
        "--threads",
        type=int,
        help=f"CPU threads for torch (default {DEMO_CPU_THREADS} on a CPU, or OMP_NUM_THREADS when set: the "
        "demo's model is too small to gain from more, and a busy machine makes them wait on each other)",
    )
    parser.add_argument("--no-progress", action="store_true")
    parser.add_argument(
        "--real", action="store_true",
        help="forget three capitals from SmolLM2-135M-Instruct instead (needs the real extra; asu.demo.real)",
    )  # fmt: skip


def _settings_from_args(args: argparse.Namespace) -> DemoSettings:
    s = default_settings(args.seed, args.quick)
    changes: dict[str, Any] = {}
    if args.temperature is not None:
        changes["temperature"] = args.temperature
    if args.lam is not None:
        changes["lam"] = args.lam
    if args.layers is not None:
        changes["layers"] = None if args.layers.strip().lower() == "all" else args.layers.strip()
    if args.lr is not None:
        changes["asu_lr"] = args.lr
    if args.epochs is not None:
        changes["epochs"] = args.epochs
    if args.ga_lrs:
        try:
            changes["ga_lrs"] = tuple(float(x) for x in args.ga_lrs.split(",") if x.strip())
        except ValueError:
            raise ValueError(f"--ga-lrs: expected comma-separated numbers, got {args.ga_lrs!r}") from None
    s = replace(s, **changes)
    if s.layers is not None:
        from asu.smoothing import parse_layers

        parse_layers(s.layers, s.model.n_layers)  # a bad spec fails now, not after the models are trained
    if is_auto(s.temperature):
        s = replace(s, temperature=parse_auto(s.temperature).spec)  # a bad target fails now
    elif s.temperature <= 0:
        raise ValueError(f"temperature must be > 0, 'auto' or 'auto:R', got {s.temperature:g}")
    if s.asu_lr <= 0 or s.epochs < 1 or any(lr <= 0 for lr in s.ga_lrs):
        raise ValueError("learning rates must be > 0 and epochs >= 1")
    return s


def cpu_threads(requested: int | None) -> int | None:
    """The torch thread count to set: ``requested`` (>= 1), else :data:`DEMO_CPU_THREADS` on a CPU-only
    machine unless ``OMP_NUM_THREADS`` is set; None = leave torch's setting."""
    if requested is not None:
        if requested < 1:
            raise ValueError(f"--threads must be >= 1, got {requested}")
        return requested
    if torch.cuda.is_available() or os.environ.get("OMP_NUM_THREADS"):
        return None
    return DEMO_CPU_THREADS


def run(args: argparse.Namespace) -> int:
    """``asu demo``; failures are exceptions for the command's error boundary."""
    settings = _settings_from_args(args)
    threads = cpu_threads(args.threads)
    if threads is not None:
        torch.set_num_threads(threads)
    if args.real:
        from asu.demo.real import run_real_demo

        with locked_output(args.out, "demo", args.overwrite) as output, output.writing():
            run_real_demo(args.out, args.cache_dir, progress=not args.no_progress)
        return 0
    with locked_output(args.out, "demo", args.overwrite) as output, output.writing():
        run_demo(settings, args.out, args.cache_dir, args.method, progress=not args.no_progress)
    return 0
