"""The ``asu`` command. Each subcommand lives in its own module, imported only when it runs.

A subcommand module exposes ``add_arguments(parser)`` and ``run(args) -> int``.
"""

from __future__ import annotations

import argparse
import importlib
import sys

SUBCOMMANDS = {
    "demo": ("asu.demo.run", "forget authors of the embedded synthetic world with ASU and report the metrics"),
    "unlearn": ("asu.unlearn", "unlearn a forget set from a Hugging Face model"),
    "eval": ("asu.evaluate", "TOFU-style evaluation of a model on forget/retain data"),
    "inspect": ("asu.inspect", "per-layer/head attention entropy and KL under smoothing"),
}


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="asu", description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (module_name, help_text) in SUBCOMMANDS.items():
        p = sub.add_parser(name, help=help_text, description=help_text)
        try:
            module = importlib.import_module(module_name)
        except ModuleNotFoundError as e:
            if e.name != module_name:
                raise
            p.set_defaults(_missing=module_name)
            continue
        module.add_arguments(p)
        p.set_defaults(_run=module.run)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "_missing", None):
        print(f"asu {args.command}: not available in this build ({args._missing} missing)", file=sys.stderr)
        return 2
    return int(args._run(args) or 0)


if __name__ == "__main__":
    sys.exit(main())
