"""Every ``asu`` command line the README shows still parses: its subcommand and flags exist and take the
values shown. Optional groups (``[--flag a|b]``) are expanded with each alternative in turn."""

from __future__ import annotations

import re
import shlex
from pathlib import Path

import pytest

README = Path(__file__).resolve().parent.parent / "README.md"
OPTIONAL = re.compile(r"\[([^\[\]]+)\]")


def _readme_commands() -> list[str]:
    """The ``asu ...`` lines of the README's code blocks, continuation lines joined, comments dropped."""
    commands, in_block, current = [], False, None
    for line in README.read_text(encoding="utf-8").splitlines():
        if line.startswith("```"):
            in_block = not in_block
            continue
        if not in_block:
            continue
        text = line.split("#", 1)[0].rstrip() if " #" in line else line.rstrip()
        if current is not None:
            current += " " + text.strip().rstrip("\\").strip()
            if not text.endswith("\\"):
                commands.append(current)
                current = None
        elif text.startswith("asu "):
            current = text.rstrip("\\").strip()
            if not text.endswith("\\"):
                commands.append(current)
                current = None
    return commands


def _variants(command: str) -> list[list[str]]:
    """The command with every optional group left out, and with each group in, once per alternative of its
    value (``a|b``); prose groups such as ``[every asu unlearn flag]`` and ``...`` are dropped."""
    groups = OPTIONAL.findall(command)
    base = OPTIONAL.sub(" ", command).replace(" ... ", " ")
    variants = [shlex.split(base)[1:]]
    for group in groups:
        words = group.split()
        if not words[0].startswith("--"):
            continue
        values = words[1].split("|") if len(words) > 1 else [None]
        for value in values:
            variants.append(shlex.split(base)[1:] + [words[0]] + ([value] if value else []))
    return variants


COMMANDS = _readme_commands()


def test_the_readme_shows_every_subcommand():
    from asu.commands import SUBCOMMANDS

    shown = {c.split()[1] for c in COMMANDS}
    assert set(SUBCOMMANDS) <= shown, f"README shows no command line for {set(SUBCOMMANDS) - shown}"


@pytest.mark.parametrize("command", COMMANDS)
def test_readme_command_parses(command):
    from asu.commands import build_parser

    parser = build_parser()
    for argv in _variants(command):
        try:
            args = parser.parse_args(argv)
        except SystemExit as e:  # argparse's exit on an unknown flag or a bad value
            pytest.fail(f"README command does not parse: asu {' '.join(argv)} (exit {e.code})")
        assert args.command == argv[0]


def test_the_readme_method_tables_are_the_registrys():
    """The README's methods section is what ``python -m asu.methods.table --readme`` writes from the registry
    (run it after adding or changing a method)."""
    from asu.methods.table import README_MARKERS, markdown

    text = README.read_text(encoding="utf-8")
    first, last = README_MARKERS
    assert first in text and last in text, "the README has no methods section markers"
    section = text[text.index(first) + len(first) : text.index(last)]
    assert section.strip("\n") == markdown().strip("\n"), (
        "README method tables are stale: python -m asu.methods.table --readme"
    )
