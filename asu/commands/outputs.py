"""A command's output folder: one rule for finished results, and the folder held for the duration of a run.

* :func:`check_output_folder` (run by the error boundary before every command, :mod:`asu.commands.boundary`):
  a folder holding a finished result (:func:`asu.files.finished_result`: ``asu-result.json``, ``run.json``,
  ``continual.json``) is refused, naming it, before anything is loaded or written; ``--overwrite`` lets a
  command replace its own earlier result. The rule is keyed on the record a finished run writes last, not on
  the names of its files, so a new output file or flag falls under it unchanged.
* :func:`locked_output` for the run itself: the folder locked, what killed runs left removed (a replacement
  they did not finish rolled back), the rule checked again under the lock, and the run's writes made one
  transaction (:func:`asu.files.result_transaction`): the manifest listing them is written last, a result
  being replaced is kept until the new one is complete, and a run that fails leaves the folder as it found
  it (a folder it created is removed).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

from asu.files import check_finished_result, output_lock, remove_stale_temporaries, result_transaction

__all__ = ["OVERWRITE_HELP", "add_overwrite_argument", "check_output_folder", "locked_output"]

OVERWRITE_HELP = (
    "replace a finished result of this command in --out (the old one is kept until the new one is "
    "complete); without it such a folder is refused"
)


def add_overwrite_argument(parser: argparse.ArgumentParser) -> None:
    """``--overwrite``, for a command whose results :func:`locked_output` writes."""
    parser.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)


def check_output_folder(args: argparse.Namespace, command: str) -> None:
    """The finished-result rule for ``args.out`` (when the command has one), before the command runs."""
    out = getattr(args, "out", None)
    if isinstance(out, (str, os.PathLike)) and os.path.isdir(out):
        check_finished_result(out, command, overwrite=bool(getattr(args, "overwrite", False)))


@contextlib.contextmanager
def locked_output(out: str | os.PathLike[str], command: str, overwrite: bool = False) -> Iterator[Path]:
    """Hold ``out``'s lock (:func:`asu.files.output_lock`, which creates the folder) for the block, after
    removing what killed runs left there, and write the block's files as one finished result (see the module
    docstring). ``overwrite``: replace a finished result of ``command`` found there."""
    folder = Path(out)
    created = not folder.exists()
    with output_lock(folder):
        for name in remove_stale_temporaries(folder):
            print(f"asu {command}: removed {folder / name}, left by an interrupted run", file=sys.stderr)
        replace = check_finished_result(folder, command, overwrite=overwrite)
        try:
            with result_transaction(folder, command, replace):
                yield folder
        except BaseException:
            if created:
                shutil.rmtree(folder, ignore_errors=True)
            raise
