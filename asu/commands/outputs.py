"""A command's output folder: one rule for finished results, and the folder held for the duration of a run.

* :func:`check_output_folder` (run by the error boundary before every command, :mod:`asu.commands.boundary`):
  a folder holding a finished result (:func:`asu.files.finished_result`: ``asu-result.json``, ``run.json``,
  ``continual.json``) is refused, naming it, before anything is loaded or written; ``--overwrite`` lets a
  command replace its own earlier result. The rule is keyed on the record a finished run writes last, not on
  the names of its files, so a new output file or flag falls under it unchanged.
* :func:`locked_output` for the run itself: the folder locked, what killed runs left removed (a replacement
  they did not finish rolled back), the rule checked again under the lock; the run computes, then writes
  its result inside :meth:`LockedOutput.writing` as one transaction (:func:`asu.files.result_transaction`):
  the manifest listing the files is written last, a result being replaced stays in place while the run
  computes and is moved aside only while the new one is written (restored if that fails or is killed), and
  a run that fails leaves the folder as it found it (a folder it created is removed).
"""

from __future__ import annotations

import argparse
import contextlib
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

from asu.files import (
    FinishedResult,
    check_finished_result,
    check_not_in_use,
    output_lock,
    remove_stale_temporaries,
    result_transaction,
)

__all__ = [
    "OVERWRITE_HELP",
    "LockedOutput",
    "add_overwrite_argument",
    "check_output_folder",
    "locked_output",
]

OVERWRITE_HELP = (
    "replace a finished result of this command in --out (the old one is kept until the new one is "
    "complete); without it such a folder is refused"
)


def add_overwrite_argument(parser: argparse.ArgumentParser) -> None:
    """``--overwrite``, for a command whose results :func:`locked_output` writes."""
    parser.add_argument("--overwrite", action="store_true", help=OVERWRITE_HELP)


def check_output_folder(args: argparse.Namespace, command: str) -> None:
    """The finished-result rule for ``args.out`` (when the command has one), before the command runs; a folder
    another run holds is named as such first (:func:`asu.files.check_not_in_use`)."""
    out = getattr(args, "out", None)
    if isinstance(out, (str, os.PathLike)) and os.path.isdir(out):
        check_not_in_use(out)  # a busy folder names the run holding it, whatever else it holds
        check_finished_result(out, command, overwrite=bool(getattr(args, "overwrite", False)))


class LockedOutput:
    """An output folder held by :func:`locked_output`: ``path``, and :meth:`writing` for the block that
    writes the run's result into it."""

    def __init__(self, path: Path, command: str, replace: FinishedResult | None) -> None:
        self.path, self.command, self.replace = path, command, replace

    @contextlib.contextmanager
    def writing(self) -> Iterator[Path]:
        """The block's writes as one finished result (:func:`asu.files.result_transaction`). A result being
        replaced is moved aside only here, so while the run computes (minutes or hours) the folder still
        shows the old result, and a run killed before it writes leaves it in place."""
        with result_transaction(self.path, self.command, self.replace):
            yield self.path


@contextlib.contextmanager
def locked_output(
    out: str | os.PathLike[str], command: str, overwrite: bool = False
) -> Iterator[LockedOutput]:
    """Hold ``out``'s lock (:func:`asu.files.output_lock`, which creates the folder) for the block, after
    removing what killed runs left there and checking the finished-result rule again under the lock; the
    block writes its result inside :meth:`LockedOutput.writing` (see the module docstring). ``overwrite``:
    replace a finished result of ``command`` found there. A block that fails leaves the folder as it was
    found (one this run created is removed)."""
    folder = Path(out)
    created = not folder.exists()
    with output_lock(folder):
        for name in remove_stale_temporaries(folder):
            print(f"asu {command}: removed {folder / name}, left by an interrupted run", file=sys.stderr)
        replace = check_finished_result(folder, command, overwrite=overwrite)
        try:
            yield LockedOutput(folder, command, replace)
        except BaseException:
            if created:
                shutil.rmtree(folder, ignore_errors=True)
            raise
