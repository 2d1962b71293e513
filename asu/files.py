"""Writing a file atomically: a reader (or a run killed half-way) sees the old file or the new one, never a
half-written one.

Every writer goes through :func:`atomic_write`: the content goes into a temporary file in the target's own
directory (so the final rename never crosses a file system), is flushed to disk with ``fsync``, and the
temporary file is renamed over the target with ``os.replace`` (atomic on POSIX and Windows). On any failure
the temporary file is removed and the target is left as it was. Missing parent directories are created.

The file gets mode ``0o644`` (``mkstemp`` creates ``0o600``; results are meant to be read by everyone).

JSON is always valid JSON: :func:`atomic_write_json` writes a non-finite float (NaN, +-inf, which
``json.dumps`` would write as the invalid tokens ``NaN`` / ``Infinity``) as ``null`` and logs one note naming
the file and where the values were.

Output folders (the commands' ``--out``):

* :func:`check_output_location` refuses an output folder that is, contains or lies inside an input folder
  (the model), symlinks resolved, and one that exists as a file or cannot be written;
* :func:`output_lock` holds an exclusive ``fcntl.flock`` on ``DIR/.asu.lock`` for a run, so a second run
  into the same folder fails at once, naming the holder's process id;
* :func:`remove_stale_temporaries` deletes what a killed run left: ``atomic_write``'s temporary files and
  the scratch folders (``.result-*``) a result is assembled in. Finished files are never touched.

Cache entries (:func:`cached_folder`: the demo's tiny models, converted GGUF models) live under
:func:`cache_root`; an entry is built in a temporary folder beside it, a ``COMPLETE`` marker holding its
digest is written last and the folder is renamed into place, so an entry without the marker (a killed build)
is rebuilt, never read.
"""

from __future__ import annotations

import contextlib
import json
import logging
import math
import os
import re
import shutil
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

__all__ = [
    "LOCK_FILE",
    "OutputInUseError",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "cache_root",
    "cached_folder",
    "check_not_in_use",
    "check_output_location",
    "finite_json",
    "output_lock",
    "remove_stale_temporaries",
    "replace_section",
]

FILE_MODE = 0o644
#: The lock file :func:`output_lock` holds in an output folder.
LOCK_FILE = ".asu.lock"
# What atomic_write (mkstemp: 8 random characters) and a result's scratch folder (mkdtemp) are called.
_TEMPORARY = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp(\.[^./]*)?$")
_SCRATCH = re.compile(r"^\.result-[A-Za-z0-9_]{8}$")

log = logging.getLogger(__name__)


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
    their string form instead of failing. Non-finite floats are written as ``null`` (:func:`finite_json`),
    with one logged note naming the file and the first places they were found.
    """
    clean, where = finite_json(obj)
    wrap = None if default is None else (lambda value: finite_json(default(value))[0])
    text = json.dumps(clean, indent=indent, ensure_ascii=False, default=wrap, allow_nan=False)
    written = atomic_write_text(path, text + "\n")
    if where:
        shown = ", ".join(where[:5]) + (f" and {len(where) - 5} more" if len(where) > 5 else "")
        log.warning(f"note: {os.fspath(path)}: {len(where)} non-finite value(s) written as null ({shown})")
    return written


def finite_json(obj: Any, where: str = "$") -> tuple[Any, list[str]]:
    """``obj`` with every non-finite float (NaN, +-inf) replaced by None, and the paths of the replaced values
    (``$.summary.forget_Q_A_Prob``, ``$.losses[3].loss``). Dicts, lists and tuples are rebuilt (tuples as
    lists, as JSON writes them); everything else is returned as it is."""
    found: list[str] = []

    def walk(value: Any, at: str) -> Any:
        if isinstance(value, float):
            if math.isfinite(value):
                return value
            found.append(at)
            return None
        if isinstance(value, dict):
            return {k: walk(v, f"{at}.{k}") for k, v in value.items()}
        if isinstance(value, (list, tuple)):
            return [walk(v, f"{at}[{i}]") for i, v in enumerate(value)]
        return value

    return walk(obj, where), found


# ---------------------------------------------------------------------------------------------- out folders


class OutputInUseError(OSError):
    """Another run holds the output folder's lock."""


def _resolved(path: str | os.PathLike[str]) -> Path:
    return Path(os.path.realpath(os.path.expanduser(os.fspath(path))))


def check_output_location(
    out: str | os.PathLike[str],
    inputs: dict[str, str | os.PathLike[str] | None] | None = None,
    flag: str = "--out",
) -> None:
    """Refuse an output folder that would overwrite an input or cannot be written, before anything is.

    ``inputs``: ``{flag: folder}`` of input folders (``{"--model": path}``); ``out`` may not be one of them,
    lie inside one or contain one (symlinks resolved). ValueError names the flags; PermissionError an output
    folder (or its nearest existing parent) that is not writable; NotADirectoryError one that is a file.
    """
    target = _resolved(out)
    for name, folder in (inputs or {}).items():
        if folder is None or not os.path.isdir(folder):
            continue
        source = _resolved(folder)
        if target == source:
            raise ValueError(f"{flag} {out} is the {name} folder; write the result to another folder")
        if source in target.parents:
            raise ValueError(f"{flag} {out} lies inside the {name} folder {folder}; choose another folder")
        if target in source.parents:
            raise ValueError(f"{flag} {out} contains the {name} folder {folder}; choose another folder")
    if target.exists() and not target.is_dir():
        raise NotADirectoryError(f"{flag} {out} exists and is not a directory")
    existing = target
    while not existing.exists():
        existing = existing.parent
    if not existing.is_dir():
        raise NotADirectoryError(f"{flag} {out}: {existing} is a file, so the folder cannot be created")
    if not os.access(existing, os.W_OK | os.X_OK):
        raise PermissionError(f"{flag} {out}: {existing} is not writable")
    check_not_in_use(out, flag)


def _in_use_error(directory: str | os.PathLike[str], holder: str, flag: str) -> OutputInUseError:
    return OutputInUseError(
        f"{flag} {os.fspath(directory)} is in use by another asu run (pid {holder}); wait for it to finish "
        "or choose another folder"
    )


def check_not_in_use(directory: str | os.PathLike[str], flag: str = "--out") -> None:
    """:class:`OutputInUseError` naming the holder's pid when another run holds ``directory``'s lock.

    A probe for validation, before a run takes the lock itself: it holds a shared lock for an instant (a run
    taking the lock meanwhile retries, see :func:`output_lock`)."""
    path = Path(directory) / LOCK_FILE
    try:
        import fcntl

        fd = os.open(path, os.O_RDONLY)
    except (ImportError, OSError):  # not POSIX, or no lock file: nobody holds it
        return
    try:
        try:
            fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip() or "unknown"
            if holder == str(os.getpid()):
                return  # this process holds it (a check repeated under its own lock)
            raise _in_use_error(directory, holder, flag) from None
        fcntl.flock(fd, fcntl.LOCK_UN)
    finally:
        os.close(fd)


@contextlib.contextmanager
def output_lock(directory: str | os.PathLike[str], flag: str = "--out") -> Iterator[Path]:
    """Hold an exclusive lock on ``directory`` (created if missing) for the block.

    The lock is ``fcntl.flock`` on ``DIR/.asu.lock``, which holds the holder's process id and is removed
    when the block ends; the kernel releases the lock when a process dies, so a killed run never leaves the
    folder locked. A second holder fails at once with :class:`OutputInUseError` naming the first one's pid.
    Where ``fcntl`` does not exist (Windows) the block runs unlocked.
    """
    try:
        import fcntl
    except ImportError:  # pragma: no cover - not POSIX
        yield Path(directory) / LOCK_FILE
        return
    folder = Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / LOCK_FILE
    attempts = 0
    while True:
        fd = os.open(path, os.O_RDWR | os.O_CREAT, FILE_MODE)
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            holder = os.pread(fd, 32, 0).decode("ascii", "replace").strip()
            os.close(fd)
            attempts += 1
            if holder or attempts >= 10:  # no pid yet: a probe (check_not_in_use) holds it for an instant
                raise _in_use_error(directory, holder or "unknown", flag) from None
            time.sleep(0.05)
            continue
        # The previous holder removes the file before unlocking: a lock taken on a removed file is no lock.
        mine = os.fstat(fd)
        try:
            now = os.stat(path)
        except FileNotFoundError:
            now = None
        if now is not None and (now.st_ino, now.st_dev) == (mine.st_ino, mine.st_dev):
            break
        os.close(fd)
    try:
        os.ftruncate(fd, 0)
        os.pwrite(fd, f"{os.getpid()}\n".encode("ascii"), 0)
        yield path
    finally:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(path)
        os.close(fd)


def remove_stale_temporaries(directory: str | os.PathLike[str]) -> list[str]:
    """Delete, directly in ``directory``, the temporary files of :func:`atomic_write` and the ``.result-*``
    scratch folders a killed run left; returns their names. Call it only while holding the folder's
    :func:`output_lock` (a running writer's temporary file looks the same)."""
    removed = []
    if not os.path.isdir(directory):
        return removed
    for name in sorted(os.listdir(directory)):
        path = os.path.join(directory, name)
        if _SCRATCH.match(name) and os.path.isdir(path) and not os.path.islink(path):
            shutil.rmtree(path, ignore_errors=True)
        elif _TEMPORARY.match(name) and os.path.isfile(path) and not os.path.islink(path):
            os.unlink(path)
        else:
            continue
        removed.append(name)
    return removed


def replace_section(path: str | os.PathLike[str], section: str, markers: tuple[str, str]) -> bool:
    """Replace the text between the two ``markers`` of the text file ``path`` by ``section`` (atomically, only
    when it changes); False, and the file untouched, without both markers or without the file. How the
    README's generated sections (performance, quality, the method tables) are refreshed."""
    path = Path(path)
    if not path.is_file():
        return False
    text = path.read_text(encoding="utf-8")
    first, last = markers
    start, end = text.find(first), text.find(last)
    if start < 0 or end < 0 or end < start:
        return False
    new = text[: start + len(first)] + "\n" + section.strip("\n") + "\n\n" + text[end:]
    if new != text:
        atomic_write_text(path, new)
    return True


#: The file whose content (the entry's digest) marks a complete cache entry.
CACHE_MARKER = "COMPLETE"


def cache_root(cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """``cache_dir``, else ``$ASU_CACHE``, else ``~/.cache/asu``."""
    if cache_dir is not None:
        return Path(cache_dir)
    env = os.environ.get("ASU_CACHE")
    return Path(env) if env else Path.home() / ".cache" / "asu"


def is_complete_entry(path: str | os.PathLike[str], digest: str) -> bool:
    """Whether ``path`` is a cache entry whose marker holds ``digest``."""
    marker = Path(path) / CACHE_MARKER
    try:
        return marker.is_file() and marker.read_text().strip() == digest
    except OSError:
        return False


def cached_folder(path: str | os.PathLike[str], digest: str, build: Callable[[Path], Any]) -> Path:
    """The cache entry ``path`` for ``digest``: returned as it is when complete, else built.

    ``build(tmp)`` writes the entry's files into a fresh temporary folder beside ``path``; the marker is
    written last and the folder renamed into place (a half-built or stale entry is removed first). When
    another process completes the same entry meanwhile, its entry is kept and ours dropped.
    """
    path = Path(path)
    if is_complete_entry(path, digest):
        return path
    if path.exists():
        shutil.rmtree(path, ignore_errors=True)  # a half-written or stale entry: never read it
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(dir=path.parent, prefix=f".{path.name}."))
    try:
        build(tmp)
        atomic_write_text(tmp / CACHE_MARKER, digest + "\n")  # last: its presence means the entry is whole
        if is_complete_entry(path, digest):
            shutil.rmtree(tmp, ignore_errors=True)
        else:
            shutil.rmtree(path, ignore_errors=True)
            os.replace(tmp, path)
    except BaseException:
        shutil.rmtree(tmp, ignore_errors=True)
        raise
    return path
