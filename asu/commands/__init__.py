"""The ``asu`` command: one module per subcommand.

``asu <subcommand> ...`` (the console script, :func:`main`) or ``python -m asu.commands <subcommand> ...``
(for launchers that run a module, e.g. ``accelerate launch -m``). A subcommand module exposes
``add_arguments(parser)`` and ``run(args) -> int`` (the exit status). Argument parsing and exit codes live
here and in those modules only; the work itself is the library's (:mod:`asu.unlearn`, :mod:`asu.evaluate`,
:mod:`asu.inspection`) or the demo's (:mod:`asu.demo`). Every subcommand runs inside one error boundary
(:mod:`asu.commands.boundary`): an expected failure is one line and exit status 2, Ctrl-C exit status 130;
``--debug`` adds the traceback.
"""

from __future__ import annotations

import argparse
import importlib
import sys
from typing import Any

from asu.commands.boundary import EXIT_INTERRUPTED, run_command

SUBCOMMANDS = {
    "demo": ("asu.commands.demo", "forget authors of the embedded synthetic world with ASU and report"),
    "unlearn": ("asu.commands.unlearn", "unlearn a forget set from a Hugging Face model"),
    "continual": ("asu.commands.continual", "unlearn a sequence of forget requests, one after another"),
    "eval": ("asu.commands.eval", "TOFU-style evaluation of a model on forget/retain data"),
    "inspect": ("asu.commands.inspect", "per-layer/head attention entropy and KL under smoothing"),
    "convert": ("asu.commands.convert", "a GGUF model file (or smollm2) as a Hugging Face model folder"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="asu", description=__doc__.splitlines()[0])
    parser.add_argument("--debug", action="store_true", help=DEBUG_HELP)
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        module = importlib.import_module(module_name)
        module.add_arguments(p)
        # Also accepted after the subcommand; SUPPRESS keeps a --debug given before it.
        p.add_argument("--debug", action="store_true", default=argparse.SUPPRESS, help=DEBUG_HELP)
        p.set_defaults(_run=module.run)
    return parser


DEBUG_HELP = "print the traceback of a failure (for bug reports)"


def main(argv: list[str] | None = None) -> int:
    try:
        args = build_parser().parse_args(argv)
    except KeyboardInterrupt:  # Ctrl-C while the libraries are imported
        print("asu: interrupted", file=sys.stderr)
        return EXIT_INTERRUPTED
    return run_command(args.command, _with_model_resolved(args._run), args)


def _with_model_resolved(run: Any) -> Any:
    """``run`` with a GGUF ``--model`` (``PATH.gguf``, ``gguf:PATH``, ``smollm2``) replaced by its converted,
    cached folder first (:func:`asu.gguf_models.resolve_model`); other values are left as they are."""

    def resolved(args: argparse.Namespace) -> int | None:
        if isinstance(getattr(args, "model", None), str):
            from asu.gguf_models import resolve_model

            args.model = resolve_model(args.model)
        return run(args)

    return resolved
