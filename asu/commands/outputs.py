"""A command's output folder for the duration of a run: locked, cleaned of what killed runs left, and removed
again when the run fails before it is complete and the folder did not exist before."""

from __future__ import annotations

import contextlib
import os
import shutil
import sys
from collections.abc import Iterator
from pathlib import Path

from asu.files import output_lock, remove_stale_temporaries

__all__ = ["locked_output"]


@contextlib.contextmanager
def locked_output(out: str | os.PathLike[str], command: str) -> Iterator[Path]:
    """Hold ``out``'s lock (:func:`asu.files.output_lock`, which creates the folder) for the block, after
    removing the temporary files a killed run left there. If the block fails and this run created the
    folder, the folder is removed, so a failed run leaves nothing that could pass for a result."""
    folder = Path(out)
    created = not folder.exists()
    with output_lock(folder):
        for name in remove_stale_temporaries(folder):
            print(f"asu {command}: removed {folder / name}, left by an interrupted run", file=sys.stderr)
        try:
            yield folder
        except BaseException:
            if created:
                shutil.rmtree(folder, ignore_errors=True)
            raise
