"""The ``asu`` command: one module per subcommand.

``asu <subcommand> ...`` (the console script, :func:`main`) or ``python -m asu.commands <subcommand> ...``
(for launchers that run a module, e.g. ``accelerate launch -m``). A subcommand module exposes
``add_arguments(parser)`` and ``run(args) -> int`` (the exit status). Argument parsing and exit codes live
here and in those modules only; the work itself is the library's (:mod:`asu.unlearn`, :mod:`asu.evaluate`,
:mod:`asu.inspection`) or the demo's (:mod:`asu.demo`).
"""

from __future__ import annotations

import argparse
import importlib

SUBCOMMANDS = {
    "demo": ("asu.commands.demo", "forget authors of the embedded synthetic world with ASU and report"),
    "unlearn": ("asu.commands.unlearn", "unlearn a forget set from a Hugging Face model"),
    "continual": ("asu.commands.continual", "unlearn a sequence of forget requests, one after another"),
    "eval": ("asu.commands.eval", "TOFU-style evaluation of a model on forget/retain data"),
    "inspect": ("asu.commands.inspect", "per-layer/head attention entropy and KL under smoothing"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="asu", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        module = importlib.import_module(module_name)
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return int(args._run(args) or 0)
