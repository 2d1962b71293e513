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
  the scratch folders (``.result-*``) a result is assembled in, and rolls back a killed
  :func:`result_transaction` (below). Finished files are never touched.

Finished results (one rule for every command):

* a finished result is recognised by the record its run writes last (:data:`FINISHED_RECORDS`): the
  manifest ``asu-result.json`` (``asu eval``, ``inspect``, ``demo``: the command and every entry it wrote),
  ``unlearn()``'s ``run.json``, a continual run's ``continual.json``; :func:`finished_result` describes it and
  :func:`check_finished_result` refuses to write over it (``overwrite`` replaces a manifest result of the same
  command only);
* :func:`result_transaction` makes a run's writes into a folder one transaction: the entries it creates or
  changes become the manifest's list, written last; a result being replaced is moved aside into a journal
  folder (``.asu-journal-*``) first and restored if the run fails or is killed, so the folder holds the old
  result or the new one, never a mix.

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
from typing import Any, NamedTuple

__all__ = [
    "FINISHED_RECORDS",
    "LOCK_FILE",
    "RESULT_MANIFEST",
    "FinishedResult",
    "FinishedResultError",
    "OutputInUseError",
    "atomic_write",
    "atomic_write_bytes",
    "atomic_write_json",
    "atomic_write_text",
    "cache_root",
    "cached_folder",
    "check_finished_result",
    "check_not_in_use",
    "check_output_location",
    "did_you_mean",
    "finished_result",
    "finite_json",
    "in_passing",
    "output_lock",
    "read_json",
    "remove_stale_temporaries",
    "replace_section",
    "result_transaction",
]

FILE_MODE = 0o644
#: The lock file :func:`output_lock` holds in an output folder.
LOCK_FILE = ".asu.lock"
# What atomic_write (mkstemp: 8 random characters) and a result's scratch folder (mkdtemp) are called.
_TEMPORARY = re.compile(r"^\..+\.[A-Za-z0-9_]{8}\.tmp(\.[^./]*)?$")
_SCRATCH = re.compile(r"^\.result-[A-Za-z0-9_]{8}$")
#: The manifest of a finished ``asu eval`` / ``inspect`` / ``demo`` result, written last.
RESULT_MANIFEST = "asu-result.json"
#: unlearn()'s record of a finished run and a continual run's summary, each written last by its run.
RUN_RECORD = "run.json"
CONTINUAL_RECORD = "continual.json"
#: The records a finished result is recognised by -> the command that made it ("" = the manifest names it).
FINISHED_RECORDS = {RESULT_MANIFEST: "", RUN_RECORD: "unlearn", CONTINUAL_RECORD: "continual"}
#: The folder a result transaction keeps its journal (and a result being replaced) in (mkdtemp's 8 chars).
_JOURNAL_PREFIX = ".asu-journal-"
_JOURNAL = re.compile(r"^\.asu-journal-[A-Za-z0-9_]{8}$")

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
    scratch folders a killed run left, after rolling back a killed :func:`result_transaction`; returns the
    names removed. Call it only while holding the folder's :func:`output_lock` (a running writer's temporary
    file looks the same)."""
    removed: list[str] = []
    if not os.path.isdir(directory):
        return removed
    for name in sorted(os.listdir(directory)):
        if _JOURNAL.match(name) and os.path.isdir(os.path.join(directory, name)):
            removed += _recover(Path(directory), Path(directory) / name)
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


def read_json(path: str | os.PathLike[str]) -> Any:
    """The JSON document in ``path``; ValueError naming the file when it is not UTF-8 or not valid JSON (a
    record edited by hand, or cut short by a full disk)."""
    data = Path(path).read_bytes()
    try:
        return json.loads(data.decode("utf-8"))
    except UnicodeDecodeError as e:
        raise ValueError(f"{os.fspath(path)}: not UTF-8 text (byte offset {e.start})") from None
    except json.JSONDecodeError as e:
        raise ValueError(f"{os.fspath(path)}: not valid JSON (line {e.lineno}: {e.msg})") from None


def did_you_mean(path: str | os.PathLike[str], want: Callable[[Path], bool] | None = None) -> str:
    """`` (did you mean P?)`` naming the entry beside the missing ``path`` whose name is closest to its own
    (and passes ``want``, e.g. "is a model folder"), or an empty string when none is close."""
    import difflib

    target = Path(os.path.expanduser(os.fspath(path)))
    parent = target.parent
    try:
        names = [p.name for p in parent.iterdir() if want is None or want(p)]
    except OSError:
        return ""
    close = difflib.get_close_matches(target.name, names, n=1, cutoff=0.75)
    if not close:
        return ""
    shown = os.path.join(os.path.dirname(os.fspath(path)), close[0])
    return f" (did you mean {shown}?)"


# ----------------------------------------------------------------------------------------- finished results


class FinishedResultError(ValueError):
    """The output folder holds a finished result that a run would overwrite."""


def _read_manifest(path: Path) -> tuple[str, str, tuple[str, ...]]:
    """The command and the entries of the manifest ``path``; :class:`FinishedResultError` when it is not one
    asu wrote: not JSON, no command, or an entry that is not a plain name in its folder (``--overwrite`` moves
    the entries aside and deletes them, so a hand-made ``../x`` or ``/x`` must never be followed)."""
    why = None
    try:
        manifest = read_json(path)
    except ValueError as e:
        manifest, why = None, str(e).removeprefix(f"{path}: ")
    entries = manifest.get("entries", []) if isinstance(manifest, dict) else []
    if why is None and not (isinstance(manifest, dict) and isinstance(manifest.get("command"), str)):
        why = "no command"
    elif why is None and (not isinstance(entries, list) or not all(_plain_name(e) for e in entries)):
        why = "an entry that is not a file name in its folder"
    if why is not None:
        raise FinishedResultError(
            f"{path}: not a result manifest written by asu ({why}); it marks its folder as holding a "
            "finished result: remove it (and the files it lists) or choose another folder"
        )
    return manifest["command"], tuple(entries)


def _plain_name(entry: Any) -> bool:
    """Whether ``entry`` names something directly in a folder (not ``.``, ``..``, a path, a temporary)."""
    return (
        isinstance(entry, str)
        and entry not in ("", ".", "..", RESULT_MANIFEST)
        and "/" not in entry
        and os.sep not in entry
        and "\0" not in entry
        and not in_passing(entry)
    )


class FinishedResult(NamedTuple):
    """A finished result in a folder: the ``command`` that made it, the entries the manifest lists (``asu
    eval`` / ``inspect`` / ``demo`` only; empty otherwise) and the ``record`` it is recognised by."""

    command: str
    entries: tuple[str, ...] = ()
    record: str = RESULT_MANIFEST

    @property
    def replaceable(self) -> bool:
        """A manifest result (``--overwrite`` may replace it); unlearn and continual runs never are."""
        return self.record == RESULT_MANIFEST

    def describe(self) -> str:
        if not self.replaceable:
            kind = "a finished asu unlearn run" if self.command == "unlearn" else "an asu continual run"
            return f"{kind} ({self.record})"
        shown = ", ".join(self.entries[:4]) + (", ..." if len(self.entries) > 4 else "")
        return f"a finished asu {self.command} result ({self.record}: {shown})"


def finished_result(directory: str | os.PathLike[str]) -> FinishedResult | None:
    """The finished result ``directory`` holds (see the module docstring), or None."""
    folder = Path(directory)
    for record, command in FINISHED_RECORDS.items():
        path = folder / record
        if not path.is_file():
            continue
        if command:
            return FinishedResult(command, record=record)
        return FinishedResult(*_read_manifest(path), record=record)
    return None


def check_finished_result(
    directory: str | os.PathLike[str], command: str, *, overwrite: bool = False, flag: str = "--out"
) -> FinishedResult | None:
    """Refuse (:class:`FinishedResultError`, naming what is there) to write ``command``'s output into a folder
    holding a finished result, unless it is a manifest result of the same command and ``overwrite`` is
    given; returns that result (the one to replace). A run record of the same command (``run.json`` for
    unlearn, ``continual.json`` for continual) is returned for the command's own rules (resume)."""
    found = finished_result(directory)
    if found is None or (found.command == command and (overwrite or not found.replaceable)):
        return found
    if found.command == command:
        hint = "pass --overwrite to replace it, or choose another folder"
    else:
        hint = f"choose another folder (asu {command} never writes over another command's result)"
    raise FinishedResultError(f"{flag} {os.fspath(directory)} already holds {found.describe()}; {hint}")


def _signature(path: Path) -> tuple:
    """What changes when an entry is written: size, mtime and inode of a file (of every file in a folder)."""
    st = path.lstat()
    if not path.is_dir() or path.is_symlink():
        return (st.st_size, st.st_mtime_ns, st.st_ino)
    parts = []
    for root, _, files in os.walk(path):
        for name in sorted(files):
            f = os.lstat(os.path.join(root, name))
            parts.append(
                (os.path.relpath(os.path.join(root, name), path), f.st_size, f.st_mtime_ns, f.st_ino)
            )
    return (st.st_ino, tuple(sorted(parts)))


def in_passing(name: str) -> bool:
    """Whether ``name`` is something asu writes in passing into an output folder: the lock, an
    :func:`atomic_write` temporary, a result's scratch folder or a transaction's journal."""
    return name == LOCK_FILE or any(p.match(name) for p in (_TEMPORARY, _SCRATCH, _JOURNAL))


def _entries(folder: Path) -> dict[str, tuple]:
    """The folder's entries (not those written :func:`in_passing`) -> their :func:`_signature`."""
    return {p.name: _signature(p) for p in folder.iterdir() if not in_passing(p.name)}


def _remove(path: Path) -> None:
    if path.is_dir() and not path.is_symlink():
        shutil.rmtree(path, ignore_errors=True)
    elif path.exists() or path.is_symlink():
        path.unlink()


@contextlib.contextmanager
def result_transaction(
    directory: str | os.PathLike[str], command: str, replace: FinishedResult | None = None
) -> Iterator[Path]:
    """The block's writes into ``directory`` as one finished result of ``command``; call it holding the
    folder's :func:`output_lock`.

    A journal folder records the entries present at the start; ``replace`` (a finished manifest result) is
    moved into it, manifest first. When the block completes, the entries it created or changed are listed in
    a new :data:`RESULT_MANIFEST`, written last, and the journal (with the old result) is deleted. When the
    block fails, or the run is killed and the next run into the folder finds the journal
    (:func:`remove_stale_temporaries`), the entries created since the start are removed and the old result is
    moved back: the folder holds the old result or the new one, never a mix, never a half-written file.
    """
    folder = Path(directory)
    journal = Path(tempfile.mkdtemp(dir=folder, prefix=_JOURNAL_PREFIX))
    atomic_write_json(journal / "journal.json", {"command": command, "present": sorted(_entries(folder))})
    if replace is not None:
        (journal / "old").mkdir()
        for name in (RESULT_MANIFEST, *replace.entries):
            if (folder / name).exists() or (folder / name).is_symlink():
                os.replace(folder / name, journal / "old" / name)
    before = _entries(folder)
    try:
        yield folder
    except BaseException:
        _recover(folder, journal)
        raise
    made = sorted(name for name, sig in _entries(folder).items() if before.get(name) != sig)
    finished = time.strftime("%Y-%m-%dT%H:%M:%S%z")
    record = {"command": command, "entries": made, "finished": finished, "journal": journal.name}
    atomic_write_json(folder / RESULT_MANIFEST, record, indent=2)
    shutil.rmtree(journal, ignore_errors=True)


def _recover(folder: Path, journal: Path) -> list[str]:
    """Finish or roll back the transaction of ``journal`` (see :func:`result_transaction`); returns the names
    of the entries removed (the journal's, and those the unfinished run had written)."""
    try:
        manifest = read_json(folder / RESULT_MANIFEST) if (folder / RESULT_MANIFEST).is_file() else None
    except ValueError:
        manifest = None
    removed = []
    committed = isinstance(manifest, dict) and manifest.get("journal") == journal.name
    if not committed and (journal / "journal.json").is_file():
        present = set(read_json(journal / "journal.json").get("present", []))
        for name in sorted(_entries(folder)):
            if name not in present:
                _remove(folder / name)
                removed.append(name)
        old = journal / "old"
        for path in sorted(old.iterdir()) if old.is_dir() else []:
            _remove(folder / path.name)
            os.replace(path, folder / path.name)
    shutil.rmtree(journal, ignore_errors=True)
    return [*removed, journal.name]


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
