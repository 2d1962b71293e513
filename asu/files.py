"""Writing a file atomically: a reader (or a run killed half-way) sees the old file or the new one, never a
half-written one.

Every writer goes through :func:`atomic_write`: the content goes into a temporary file in the target's own
directory (so the final rename never crosses a file system), is flushed to disk with ``fsync``, and the
temporary file is renamed over the target with ``os.replace`` (atomic on POSIX and Windows). On any failure
the temporary file is removed and the target is left as it was. Missing parent directories are created.

The file gets mode ``0o644`` (``mkstemp`` creates ``0o600``; results are meant to be read by everyone).
"""

from __future__ import annotations

import json
import os
import tempfile
from collections.abc import Callable
from pathlib import Path
from typing import Any

__all__ = ["atomic_write", "atomic_write_bytes", "atomic_write_json", "atomic_write_text"]

FILE_MODE = 0o644


def atomic_write(path: str | os.PathLike[str], write: Callable[[str], Any]) -> Path:
    """Call ``write(tmp)`` to fill a temporary file beside ``path``, then move it into place; returns it.

    ``write`` receives the temporary file's path as a string. The temporary name ends in the target's
    suffix, so writers that pick a format from the extension (``matplotlib``'s ``savefig``) pick the right
    one; writers that take a format argument (``safetensors``' ``save_file``) are unaffected.
    """
    target = Path(path)
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=f".{target.name}.", suffix=f".tmp{target.suffix}")
    os.close(fd)
    try:
        write(tmp)
        with open(tmp, "rb") as f:
            os.fsync(f.fileno())
        os.chmod(tmp, FILE_MODE)
        os.replace(tmp, target)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise
    return target


def atomic_write_bytes(path: str | os.PathLike[str], data: bytes) -> Path:
    """Write ``data`` to ``path`` atomically."""

    def write(tmp: str) -> None:
        with open(tmp, "wb") as f:
            f.write(data)

    return atomic_write(path, write)


def atomic_write_text(path: str | os.PathLike[str], text: str) -> Path:
    """Write ``text`` (UTF-8) to ``path`` atomically."""
    return atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(
    path: str | os.PathLike[str],
    obj: Any,
    *,
    indent: int | None = 1,
    default: Callable[[Any], Any] | None = None,
) -> Path:
    """Write ``obj`` as JSON (UTF-8, non-ASCII kept as is, a final newline) to ``path`` atomically.

    ``default`` is :func:`json.dumps`'s: e.g. ``str`` writes values JSON does not know (dtypes, paths) as
    their string form instead of failing.
    """
    return atomic_write_text(path, json.dumps(obj, indent=indent, ensure_ascii=False, default=default) + "\n")
