"""The error boundary every ``asu`` subcommand runs inside (:func:`run_command`).

* An expected failure (bad flag, file, row, model folder, output folder, a run that stopped on a non-finite
  loss; any ``ValueError``, ``TypeError`` or ``OSError``) is one line on stderr,
  ``asu <command>: error: <what and where>``, and exit status 2.
* Anything else is a bug or an environment problem: one line naming the exception, a hint to rerun with
  ``--debug`` for the traceback, and exit status 1.
* Ctrl-C (``KeyboardInterrupt``) is one line and exit status 130 (128 + SIGINT, the shell's convention);
  nothing is cleaned up that a resume needs (``asu unlearn`` keeps its completed checkpoints).

``--debug`` (before or after the subcommand) prints the traceback of every failure as well.

Before a command runs, the boundary applies the finished-result rule to its ``--out``
(:func:`asu.commands.outputs.check_output_folder`): every command, present or future, refuses a folder
holding a finished result before it loads or writes anything.
"""

from __future__ import annotations

import argparse
import sys
import traceback
from collections.abc import Callable

from asu.commands.outputs import check_output_folder

__all__ = ["EXPECTED_ERRORS", "EXIT_ERROR", "EXIT_BUG", "EXIT_INTERRUPTED", "one_line", "run_command"]

#: Exceptions that describe bad input or a refused run (the library raises these with a message naming
#: the file, line, flag or step).
EXPECTED_ERRORS: tuple[type[BaseException], ...] = (ValueError, TypeError, OSError)
EXIT_ERROR = 2
EXIT_BUG = 1
EXIT_INTERRUPTED = 130
#: What an interrupted command says besides "interrupted".
INTERRUPTED_NOTES = {
    "unlearn": "completed checkpoints in --out are kept; rerun with --resume to continue",
    "continual": "finished steps and checkpoints in --out are kept; rerun with --resume to continue",
}


def one_line(error: BaseException) -> str:
    """The first non-empty line of the error's message (its type's name when it has none)."""
    for line in str(error).splitlines():
        if line.strip():
            return line.strip()
    return type(error).__name__


def _say(command: str, text: str) -> None:
    print(f"asu {command}: {text}", file=sys.stderr, flush=True)


def run_command(
    command: str, run: Callable[[argparse.Namespace], int | None], args: argparse.Namespace
) -> int:
    """``run(args)`` inside the boundary (see the module docstring); returns the exit status."""
    debug = bool(getattr(args, "debug", False))
    try:
        check_output_folder(args, command)
        return int(run(args) or 0)
    except KeyboardInterrupt:
        note = INTERRUPTED_NOTES.get(command)
        _say(command, "interrupted" + (f"; {note}" if note else ""))
        return EXIT_INTERRUPTED
    except EXPECTED_ERRORS as e:
        if debug:
            traceback.print_exc()
        _say(command, f"error: {one_line(e)}")
        return EXIT_ERROR
    except Exception as e:
        if debug:
            traceback.print_exc()
            _say(command, f"error: unexpected {type(e).__name__}: {one_line(e)}")
        else:
            _say(
                command,
                f"error: unexpected {type(e).__name__}: {one_line(e)} (rerun with --debug for the traceback)",
            )
        return EXIT_BUG
