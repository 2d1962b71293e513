"""Where rows come from besides JSON: CSV and Parquet files, ``datasets`` folders and the Hugging Face hub.

:func:`asu.data.load_rows` reads JSON / JSON Lines itself and hands every other kind of source here. Each
reader returns ``(rows, lines)``: the rows as dicts and, per row, the line it came from in the file (0 where a
row has no line: Parquet, ``datasets`` folders, the hub; errors then name the row index).

The ``datasets`` package is optional: it is imported only by the readers that need it (Parquet, saved
folders, the hub), and its absence is one clear error naming the source.

The hub is asked only when it answers: :func:`hub_unreachable` checks once per process, with a short timeout,
that its endpoint accepts a connection (or that offline mode is not set); when it does not, the hub clients
are switched to offline mode for the rest of the process, so what the local cache holds still loads and a
name that is not there fails at once, naming it (instead of after the clients' retries, half a minute).
Datasets and models (:mod:`asu.models`) follow this one rule.
"""

from __future__ import annotations

import contextlib
import csv
import io
import logging
import os
import re
import socket
import sys
import threading
from collections.abc import Iterator
from typing import Any
from urllib.parse import urlsplit

__all__ = [
    "DataError",
    "decode_utf8",
    "hub_unreachable",
    "is_hub_name",
    "read_csv",
    "read_parquet",
    "read_saved",
    "read_hub",
    "rename_columns",
]

#: ``NAME:CONFIG[:SPLIT]`` with NAME like ``locuslab/TOFU``.
_HUB = re.compile(r"^[A-Za-z0-9][\w.-]*(/[\w.-]+)?:[\w.-]+(:[\w.\[\]%+-]+)?$")
_INSTALL = "pip install datasets (or pip install 'asu[data]')"
#: Seconds the hub's endpoint has to accept a connection before it counts as unreachable.
HUB_TIMEOUT_S = 2.0
#: The answer of :func:`hub_unreachable` for this process, once known.
_HUB_STATE: dict[str, str | None] = {}


class DataError(ValueError):
    """A data source or row that cannot be used; the message names the source and line (or row)."""


def decode_utf8(data: bytes, source: str) -> str:
    """``data`` decoded as UTF-8 (a leading byte-order mark dropped); DataError naming the line, column and
    byte offset of the first byte that is not UTF-8 (a file saved as Latin-1 or cp1252, or a binary file)."""
    try:
        return data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        line = data.count(b"\n", 0, e.start) + 1
        column = e.start - (data.rfind(b"\n", 0, e.start) + 1) + 1
        raise DataError(
            f"{source}: line {line}: not UTF-8 text (byte 0x{data[e.start]:02x} at byte offset {e.start}, "
            f"column {column}: {e.reason}); save the file as UTF-8"
        ) from None


def is_hub_name(source: str) -> bool:
    """Whether ``source`` reads as a hub dataset ``NAME:CONFIG[:SPLIT]`` (checked after local paths)."""
    return bool(_HUB.match(source))


def _datasets(source: str, what: str) -> Any:
    try:
        import datasets
    except ImportError:
        raise DataError(f"{source}: reading {what} needs the 'datasets' package: {_INSTALL}") from None
    return datasets


def read_csv(path: str) -> tuple[list[dict[str, Any]], list[int]]:
    """Rows of a CSV file with a header row; every value is a string, lines count from 1 (the header)."""
    rows, lines = [], []
    with open(path, "rb") as f:
        text = decode_utf8(f.read(), path)
    reader = csv.DictReader(io.StringIO(text, newline=""))
    try:
        if not reader.fieldnames:
            raise DataError(f"{path}: the file is empty")
        for row in reader:
            if None in row:  # more fields than the header names
                raise DataError(f"{path}: line {reader.line_num}: more fields than the header names")
            rows.append(dict(row))
            lines.append(reader.line_num)
    except csv.Error as e:
        raise DataError(f"{path}: line {reader.line_num}: malformed CSV ({e})") from None
    return rows, lines


def read_parquet(path: str) -> tuple[list[dict[str, Any]], list[int]]:
    """Rows of a Parquet file (read with pyarrow, which ``datasets`` installs)."""
    _datasets(path, "Parquet")
    import pyarrow.parquet as pq

    try:
        rows = pq.read_table(path).to_pylist()
    except Exception as e:  # pyarrow raises its own error types for corrupt files
        raise DataError(f"{path}: not a readable Parquet file ({_first_line(e)})") from None
    return rows, [0] * len(rows)


def read_saved(path: str) -> tuple[list[dict[str, Any]], list[int]]:
    """Rows of a folder written by ``datasets``' ``save_to_disk`` (a Dataset, or a one-split DatasetDict)."""
    marks = ("dataset_info.json", "state.json", "dataset_dict.json")
    if not any(os.path.isfile(os.path.join(path, m)) for m in marks):
        raise DataError(
            f"{path}: is a directory but not one written by datasets' save_to_disk (no {' / '.join(marks)})"
        )
    datasets = _datasets(path, "a saved dataset folder")
    try:
        data = datasets.load_from_disk(path)
    except Exception as e:
        raise DataError(f"{path}: cannot load the saved dataset ({_first_line(e)})") from None
    if isinstance(data, datasets.DatasetDict):
        if len(data) != 1:
            raise DataError(
                f"{path}: holds the splits {', '.join(data)}; name one: {os.path.join(path, '<split>')}"
            )
        data = next(iter(data.values()))
    rows = data.to_list()
    return rows, [0] * len(rows)


@contextlib.contextmanager
def _quiet_hub() -> Iterator[None]:
    """Silence the hub client's per-retry warnings: a failed load ends in one error line of ours."""
    loggers = [logging.getLogger(name) for name in ("huggingface_hub", "datasets")]
    levels = [lg.level for lg in loggers]
    for lg in loggers:
        lg.setLevel(logging.ERROR)
    try:
        yield
    finally:
        for lg, level in zip(loggers, levels, strict=True):
            lg.setLevel(level)


def _connects(host: str, port: int, timeout: float) -> str | None:
    """None when ``host:port`` accepts a TCP connection within ``timeout`` seconds, else why not. The name
    lookup runs in a thread too, since ``getaddrinfo`` has no timeout of its own."""
    outcome: list[str | None] = []

    def probe() -> None:
        try:
            socket.create_connection((host, port), timeout=timeout).close()
            outcome.append(None)
        except OSError as e:
            outcome.append(e.strerror or str(e) or type(e).__name__)

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout + 0.5)
    return outcome[0] if outcome else f"no answer within {timeout:g} s"


def hub_unreachable() -> str | None:
    """Why the Hugging Face hub cannot be used by this process (None when it can): offline mode set
    (``HF_HUB_OFFLINE``), or no connection to its endpoint (``HF_ENDPOINT``) within :data:`HUB_TIMEOUT_S`.
    Checked once per process; when the hub is unreachable its clients are switched to offline mode (see the
    module docstring)."""
    if "reason" in _HUB_STATE:
        return _HUB_STATE["reason"]
    from huggingface_hub import constants

    reason = None
    if constants.HF_HUB_OFFLINE:
        reason = "offline mode is set: HF_HUB_OFFLINE"
    else:
        url = urlsplit(constants.ENDPOINT)
        port = url.port or (443 if url.scheme == "https" else 80)
        why = _connects(url.hostname or "", port, HUB_TIMEOUT_S)
        if why is not None:
            reason = f"{constants.ENDPOINT}: {why}"
            constants.HF_HUB_OFFLINE = True  # the cache still answers; nothing waits for retries
            if "datasets.config" in sys.modules:
                sys.modules["datasets.config"].HF_HUB_OFFLINE = True
    _HUB_STATE["reason"] = reason
    return reason


def read_hub(source: str) -> tuple[list[dict[str, Any]], list[int]]:
    """Rows of hub dataset ``NAME:CONFIG[:SPLIT]`` (split ``train`` by default), via ``datasets``; from the
    local cache alone when the hub is unreachable (:func:`hub_unreachable`)."""
    datasets = _datasets(source, "a hub dataset")
    name, config, *rest = source.split(":", 2)
    split = rest[0] if rest else "train"
    unreachable = hub_unreachable()
    try:
        with _quiet_hub():
            data = datasets.load_dataset(name, config, split=split)
    except Exception as e:
        if unreachable:
            raise DataError(
                f"{source}: the Hugging Face hub is unreachable ({unreachable}) and the local cache does not "
                f"hold {name} (config {config}, split {split}); connect, or give a local file"
            ) from None
        raise DataError(
            f"{source}: cannot load {name} (config {config}, split {split}) from the Hugging Face hub: "
            f"{_first_line(e)}"
        ) from None
    rows = data.to_list()
    return rows, [0] * len(rows)


def rename_columns(
    rows: list[Any],
    source: str,
    lines: list[int],
    question_key: str | None = None,
    answer_key: str | None = None,
) -> list[Any]:
    """Copy column ``question_key`` to ``question`` and ``answer_key`` to ``answer`` in every row."""
    keys = [(k, to) for k, to in ((question_key, "question"), (answer_key, "answer")) if k and k != to]
    if not keys:
        return rows
    out = []
    for i, row in enumerate(rows):
        if not isinstance(row, dict):
            out.append(row)  # validation names it
            continue
        for key, _ in keys:
            if key not in row:
                where = f"{source}: line {lines[i]}" if lines and lines[i] else f"{source}: row {i}"
                raise DataError(f"{where}: no column {key!r} (columns: {', '.join(map(str, row))})")
        out.append({**row, **{to: row[key] for key, to in keys}})
    return out


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__
