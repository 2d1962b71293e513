"""Shared helpers of the benchmark suite: environment, timing, peak memory, OOM handling, CSV rows.

Every measurement becomes one CSV row (see :data:`COLUMNS`). A benchmark builds a ``base`` row with its shape
parameters and calls :meth:`Recorder.measure` / :meth:`Recorder.add`; the recorder rewrites its CSV atomically
after every row, so a run killed by a stage timeout still leaves every finished measurement on disk.

Timing
    CUDA: ``triton.testing.do_bench`` (it warms up, flushes the L2 cache between calls and repeats for
    ``rep_ms``), with the 50/20/80 % quantiles. CPU: a ``time.perf_counter`` loop with the same statistics.
    Benchmarks pass a callable that rotates over several freshly drawn input sets (:class:`Rotating`), so no
    provider is flattered by re-reading the same inputs from cache.

Memory
    CUDA: ``torch.cuda.max_memory_allocated`` after ``reset_peak_memory_stats``, i.e. the peak of everything
    allocated while the measured call ran, inputs included. CPU: the process's peak resident set size
    (``VmHWM``, reset through ``/proc/self/clear_refs``) minus its resident size before the call; an
    approximation, recorded as such in the row's note. Reported in GB = 1e9 bytes.
"""

from __future__ import annotations

import csv
import ctypes
import gc
import io
import itertools
import re
import statistics
import time
import traceback
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from asu.environment import environment as asu_environment
from asu.environment import machine
from asu.files import atomic_write_text

#: Column order of every results CSV. Shape columns a benchmark does not use stay empty.
COLUMNS: tuple[str, ...] = (
    "benchmark",  # attention | linear_kl | linear_ce | e2e | context
    "provider",  # eager, sdpa-<backend>, flex, flash-attn2/3, liger, authors, ours, ...
    "mode",  # fwd | bwd | fwd+bwd | epoch | step
    "dtype",
    "batch",
    "heads_q",
    "heads_kv",
    "seqlen",
    "head_dim",
    "causal",
    "temperature",
    "tokens",  # M, rows of the vocabulary losses
    "hidden",  # d
    "vocab",  # V
    "params",  # benchmark-specific key=value pairs separated by ';'
    "metric",  # ms | TFLOP/s | GB | compile_s | s | tokens/s | loss_first | loss_last | max_tokens
    "median",
    "p20",
    "p80",
    "status",  # ok | oom | skip | error
    "note",
    "device",
    "torch",
    "triton",
    "transformers",
    "date",
)

STATUSES = ("ok", "oom", "skip", "error")


class Unavailable(Exception):
    """A provider cannot run here (library missing, backend not supported on this device/shape)."""


# --------------------------------------------------------------------------------------------- environment


def device_name(device: str) -> str:
    """The card (``NVIDIA H100 80GB HBM3``) or ``CPU: <model> (<n> cores, <t> torch threads)``: the CSV's
    ``device`` column (the report tells CPU rows by the prefix)."""
    name = machine(device)
    return name if device.startswith("cuda") else f"CPU: {name}"


def environment(device: str) -> dict[str, str]:
    """The columns every row carries: device name, library versions and the run's UTC timestamp."""
    env = asu_environment(device)
    return {
        "device": device_name(device),
        **{k: str(env[k]) for k in ("torch", "triton", "transformers")},
        "date": str(env["date"]),
    }


def slug(text: str) -> str:
    """File-name-safe form of a device name: ``NVIDIA H100 80GB HBM3`` -> ``nvidia-h100-80gb-hbm3``."""
    return re.sub(r"[^a-z0-9]+", "-", text.lower()).strip("-") or "unknown"


def synchronize(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


# --------------------------------------------------------------------------------------------------- timing


@dataclass(frozen=True)
class Plan:
    """What a suite measures at every shape: each of ``providers`` in each of ``modes`` (``fwd``, ``bwd``,
    ``fwd+bwd``), every measurement repeated for ``rep_ms`` milliseconds."""

    providers: tuple[str, ...]
    modes: tuple[str, ...]
    rep_ms: float

    @staticmethod
    def repetition_ms(device: str, tiny: bool) -> float:
        """100 ms a measurement; 20 ms for the tiny suite on a CPU (it shows that all runs, not speed)."""
        return 20.0 if tiny and not device.startswith("cuda") else 100.0


@dataclass(frozen=True)
class Stats:
    """Median and 20th/80th percentiles of a measured quantity."""

    median: float
    p20: float
    p80: float

    def inverse(self, numerator: float) -> Stats:
        """``numerator / x`` of a time (FLOPs -> FLOP/s); a rate's 20th percentile is the time's 80th."""
        return Stats(numerator / self.median, numerator / self.p80, numerator / self.p20)

    def scaled(self, factor: float) -> Stats:
        return Stats(self.median * factor, self.p20 * factor, self.p80 * factor)


def quantile_stats(samples: Sequence[float]) -> Stats:
    """Median and 20/80 % quantiles (linear interpolation, as ``torch.quantile``) of a non-empty sample."""
    if not samples:
        raise ValueError("quantile_stats needs at least one sample")
    xs = sorted(float(s) for s in samples)
    if len(xs) == 1:
        return Stats(xs[0], xs[0], xs[0])
    q = statistics.quantiles(xs, n=10, method="inclusive")  # deciles: q[1] = 20 %, q[7] = 80 %
    return Stats(statistics.median(xs), q[1], q[7])


class Rotating:
    """A zero-argument callable that calls ``fn(*inputs)`` on the next of several input sets in turn.

    Args:
        fn: the measured function.
        input_sets: one tuple of positional arguments per freshly drawn input set.
    """

    def __init__(self, fn: Callable[..., Any], input_sets: Sequence[tuple[Any, ...]]):
        if not input_sets:
            raise ValueError("Rotating needs at least one input set")
        self.fn = fn
        self.input_sets = list(input_sets)
        self._cycle = itertools.cycle(range(len(self.input_sets)))

    def __call__(self) -> Any:
        return self.fn(*self.input_sets[next(self._cycle)])


def time_call(
    fn: Callable[[], Any],
    device: str,
    *,
    warmup_ms: float = 25.0,
    rep_ms: float = 100.0,
    grad_to_none: Iterable[torch.Tensor] | None = None,
    min_reps: int = 3,
    max_reps: int = 1000,
) -> Stats:
    """Milliseconds per call of ``fn``: median and 20/80 % quantiles.

    On CUDA this is ``triton.testing.do_bench(fn, warmup, rep, grad_to_none, quantiles=[0.5, 0.2, 0.8])``.
    On CPU, ``fn`` runs once to warm up, then for about ``rep_ms`` (at least ``min_reps`` times); gradients of
    ``grad_to_none`` are reset before each call as do_bench does, so accumulation is not timed.
    """
    grads = list(grad_to_none or [])
    if device.startswith("cuda"):
        import triton.testing

        med, p20, p80 = triton.testing.do_bench(
            fn, warmup=int(warmup_ms), rep=int(rep_ms), grad_to_none=grads or None, quantiles=[0.5, 0.2, 0.8]
        )
        return Stats(float(med), float(p20), float(p80))
    samples: list[float] = []
    deadline = None
    for i in range(max_reps + 1):
        for g in grads:
            g.grad = None
        t0 = time.perf_counter()
        fn()
        elapsed = (time.perf_counter() - t0) * 1e3
        if i == 0:  # warm-up call, not recorded
            deadline = time.perf_counter() + rep_ms / 1e3
            continue
        samples.append(elapsed)
        if len(samples) >= min_reps and time.perf_counter() >= deadline:
            break
    return quantile_stats(samples)


# --------------------------------------------------------------------------------------------------- memory


def _trim_malloc() -> None:
    """Return freed heap pages to the OS so the next RSS measurement starts from a true baseline."""
    try:
        ctypes.CDLL("libc.so.6").malloc_trim(0)
    except (OSError, AttributeError):
        pass


def _read_status_kb(field: str) -> int | None:
    try:
        with open("/proc/self/status", encoding="ascii") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        return None
    return None


def _reset_cpu_peak() -> bool:
    try:
        with open("/proc/self/clear_refs", "w", encoding="ascii") as f:
            f.write("5")  # 5 = reset the peak resident set size (VmHWM) to the current one
        return True
    except OSError:
        return False


def peak_memory_gb(fn: Callable[[], Any], device: str) -> tuple[float, str]:
    """Run ``fn`` once and return (peak memory in GB, what was measured).

    CUDA: peak allocated bytes while ``fn`` ran (inputs already allocated count too). CPU: increase of the
    peak RSS over the RSS before the call; NaN when /proc is not available.
    """
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.synchronize()
        torch.cuda.empty_cache()
        torch.cuda.reset_peak_memory_stats()
        fn()
        torch.cuda.synchronize()
        return torch.cuda.max_memory_allocated() / 1e9, "peak allocated incl. inputs"
    _trim_malloc()
    before = _read_status_kb("VmRSS")
    if before is None or not _reset_cpu_peak():
        fn()
        return float("nan"), "CPU peak RSS unavailable"
    fn()
    peak = _read_status_kb("VmHWM") or before
    return max(peak - before, 0) * 1024 / 1e9, "CPU: peak RSS increase over the call"


def release_memory(device: str) -> None:
    """Drop cached blocks between measurements so one provider's cache does not count against the next."""
    gc.collect()
    if device.startswith("cuda"):
        torch.cuda.empty_cache()
    else:
        _trim_malloc()


def is_oom(exc: BaseException) -> bool:
    """True for CUDA/CPU out-of-memory errors (not for Triton's shared-memory OutOfResources)."""
    oom_type = getattr(torch, "OutOfMemoryError", None) or getattr(torch.cuda, "OutOfMemoryError", None)
    if oom_type is not None and isinstance(exc, oom_type):
        return True
    text = str(exc).lower()
    return isinstance(exc, (RuntimeError, MemoryError)) and (
        "out of memory" in text or "can't allocate memory" in text or isinstance(exc, MemoryError)
    )


# ------------------------------------------------------------------------------------------------- recorder


def classify(exc: BaseException) -> tuple[str, str]:
    """(status, note) of a failed measurement: ``skip`` for Unavailable, ``oom``, else ``error`` (traceback
    printed, since an error is a bug to look at)."""
    if isinstance(exc, Unavailable):
        return "skip", str(exc)
    if is_oom(exc):
        return "oom", short_error(exc, 120)
    traceback.print_exception(exc)
    return "error", short_error(exc)


def write_csv_atomic(path: Path, rows: Sequence[dict[str, Any]]) -> None:
    """Write ``rows`` (dicts over :data:`COLUMNS`) to ``path`` atomically (:mod:`asu.files`)."""
    buf = io.StringIO()
    writer = csv.DictWriter(buf, fieldnames=list(COLUMNS), extrasaction="raise", lineterminator="\n")
    writer.writeheader()
    for row in rows:
        writer.writerow({c: _fmt(row.get(c, "")) for c in COLUMNS})
    atomic_write_text(path, buf.getvalue())


def read_csv(path: Path) -> list[dict[str, str]]:
    """Rows of a results CSV; raises ValueError when its header is not :data:`COLUMNS`."""
    with open(path, newline="", encoding="utf-8") as f:
        reader = csv.DictReader(f)
        if tuple(reader.fieldnames or ()) != COLUMNS:
            raise ValueError(f"{path} is not a results CSV: header {reader.fieldnames} != {list(COLUMNS)}")
        return list(reader)


def _fmt(value: Any) -> str:
    if value is None:
        return ""
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float):
        if value != value:  # NaN
            return "nan"
        return f"{value:.6g}"
    if isinstance(value, torch.dtype):
        return str(value).replace("torch.", "")
    return str(value)


def short_error(exc: BaseException, limit: int = 200) -> str:
    """One line naming the exception, short enough for a CSV cell."""
    text = " ".join(f"{type(exc).__name__}: {exc}".split())
    return text if len(text) <= limit else text[: limit - 3] + "..."


class Recorder:
    """Collects rows and keeps ``path`` (a CSV with :data:`COLUMNS`) up to date after every row.

    Args:
        path: CSV file to (re)write.
        device: ``cuda`` / ``cuda:N`` / ``cpu``; fills the environment columns.
        verbose: print each row as it is recorded.
        append: keep the rows ``path`` already holds (several runs into one CSV).
    """

    def __init__(self, path: Path, device: str, *, verbose: bool = True, append: bool = False):
        self.path = Path(path)
        self.device = device
        self.env = environment(device)
        self.rows: list[dict[str, Any]] = []
        if append and self.path.exists():
            self.rows = list(read_csv(self.path))
        self.verbose = verbose

    def add(
        self,
        base: dict[str, Any],
        metric: str,
        stats: Stats | float | None,
        status: str = "ok",
        note: str = "",
    ) -> dict[str, Any]:
        """Record one row: ``base`` shape columns + metric + statistics + status."""
        if status not in STATUSES:
            raise ValueError(f"status must be one of {STATUSES}, got {status!r}")
        unknown = set(base) - set(COLUMNS)
        if unknown:
            raise ValueError(f"unknown CSV columns {sorted(unknown)}")
        if isinstance(stats, (int, float)):
            stats = Stats(float(stats), float(stats), float(stats))
        row = {**base, **self.env, "metric": metric, "status": status, "note": note}
        if stats is not None:
            row.update(median=stats.median, p20=stats.p20, p80=stats.p80)
        self.rows.append(row)
        write_csv_atomic(self.path, self.rows)
        if self.verbose:
            shape = " ".join(f"{k}={base[k]}" for k in base if k not in ("benchmark", "provider", "mode"))
            value = "" if stats is None else f"{stats.median:.4g} [{stats.p20:.4g}, {stats.p80:.4g}]"
            print(
                f"[{base.get('benchmark')}] {base.get('provider'):>15} {base.get('mode', ''):>8} {shape} "
                f"{metric}={value} {status} {note}".rstrip(),
                flush=True,
            )
        return row

    def status_row(self, base: dict[str, Any], status: str, note: str, metric: str = "ms") -> None:
        """A row that says why there is no number (skip / oom / error)."""
        self.add(base, metric, None, status=status, note=note)

    def guarded(self, base: dict[str, Any], body: Callable[[], None], metric: str = "ms") -> bool:
        """Run ``body``; on OOM / Unavailable / any error record a status row instead of crashing.

        Returns True when ``body`` finished. Memory is released afterwards either way; the exception (and the
        tensors its traceback holds) is dropped before releasing, or the OOM'd memory would stay allocated.
        """
        outcome: tuple[str, str] | None = None
        try:
            body()
        except Exception as e:  # noqa: BLE001 - one failing provider must not stop the suite
            outcome = classify(e)
        if outcome is not None:
            release_memory(self.device)
            self.status_row(base, outcome[0], outcome[1], metric=metric)
        release_memory(self.device)
        return outcome is None

    def attempt(self, make: Callable[[], Any], rows: Sequence[dict[str, Any]]) -> Any | None:
        """``make()`` (a provider, the inputs); when it fails, None and one status row (skip / oom / error)
        for each base row of ``rows``, the rows' measurements being impossible. Memory is released after a
        failure, the exception dropped first."""
        try:
            return make()
        except Exception as e:  # noqa: BLE001 - recorded for every row it prevents; the suite goes on
            status, note = classify(e)
        release_memory(self.device)
        for base in rows:
            self.status_row(base, status, note)
        return None

    def providers(
        self,
        benchmark: str,
        columns: dict[str, Any],
        names: Sequence[str],
        modes: Sequence[str],
        make: Callable[[str], Any],
    ) -> Iterator[tuple[str, dict[str, Any], Any]]:
        """``(name, base row, provider)`` for each of ``names`` that ``make(name)`` could build; for one that
        it could not, one status row per mode instead (see :meth:`attempt`)."""
        for name in names:
            base = {"benchmark": benchmark, "provider": name, **columns}
            prov = self.attempt(lambda name=name: make(name), [{**base, "mode": m} for m in modes])
            if prov is not None:
                yield name, base, prov

    def summary(self) -> dict[str, int]:
        counts = dict.fromkeys(STATUSES, 0)
        for row in self.rows:
            counts[row["status"]] += 1
        return counts


def ours_backend_note(t: torch.Tensor) -> str:
    """Which implementation ``asu_kernels`` runs for tensors like ``t`` (Triton, interpreter, the PyTorch CPU
    path or the reference; :mod:`asu_kernels._backend`)."""
    from asu_kernels._backend import backend, interpreting

    family = backend(t)
    if family == "reference":
        return "PyTorch reference path"
    if family == "cpu":
        return "PyTorch CPU path"
    return "Triton interpreter" if interpreting() and not t.is_cuda else "Triton"
