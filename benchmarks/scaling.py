"""Scaling sweeps: each provider at growing N, one isolated process per point, then tables and a plot.

Shared by :mod:`benchmarks.bench_cpu_attention` and :mod:`benchmarks.long_context`. A sweep runs every
provider at each length in turn (:func:`run_sweep`), each point in a fresh process
(:func:`benchmarks.isolated.run_isolated`), and records rows in the results CSV (:data:`benchmarks.common.
COLUMNS`): metric ``s`` (median of the child's timed runs, 20/80 % quantiles), ``GB`` (the child's peak
resident set size) and any extra metrics the child reports. A provider stops at its first length that fails
(over the memory cap, past the timeout): longer inputs would not fit either. A sweep-wide deadline records
the points it leaves out as ``skip``.
"""

from __future__ import annotations

import math
import os
import re
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from asu.files import atomic_write, atomic_write_text
from benchmarks.common import Recorder, quantile_stats
from benchmarks.isolated import run_isolated

Row = dict[str, str]


@dataclass
class Sweep:
    """What a sweep runs: ``module``'s ``--child`` with ``spec(provider, n)`` for each provider and length."""

    module: str
    benchmark: str
    mode: str
    columns: dict[str, Any]
    providers: Sequence[str]
    lengths: Sequence[int]
    spec: Callable[[str, int], dict[str, Any]]
    cap_gb: float
    timeout_s: float
    deadline: float = math.inf  # time.perf_counter() value after which no point starts
    threads: int = 1
    notes: dict[str, str] = field(default_factory=dict)  # provider -> note on its time rows


def keep_other_points(
    rows: Sequence[Row], providers: Sequence[str], lengths: Sequence[int] | None
) -> list[Row]:
    """The rows of an appended-to CSV that a rerun of ``providers`` at ``lengths`` does not replace: only the
    (provider, N) points being measured again go (``lengths`` None: every N of those providers), so a rerun
    at one N never drops the same provider's other lengths."""
    chosen = set(providers)
    rerun = None if lengths is None else set(lengths)
    return [
        r
        for r in rows
        if r["provider"] not in chosen or (rerun is not None and int(float(r["seqlen"])) not in rerun)
    ]


def run_sweep(rec: Recorder, sw: Sweep) -> None:
    """Measure every provider at every length (see the module docstring).

    Lengths are the outer loop and providers the inner one, so the providers of one length run close together
    in time: on a machine shared with other jobs the load drifts, and a comparison at one N should see one
    load, not whatever each provider's turn met.
    """
    failed: dict[str, str] = {}
    for n in sw.lengths:
        for provider in sw.providers:
            base = {
                **sw.columns,
                "benchmark": sw.benchmark,
                "provider": provider,
                "mode": sw.mode,
                "seqlen": n,
            }
            if provider in failed:
                rec.status_row(base, "skip", f"not run: {failed[provider]}", metric="s")
                continue
            if time.perf_counter() > sw.deadline:
                rec.status_row(base, "skip", "not run: the sweep's time budget was spent", metric="s")
                continue
            load = load_average()
            res = run_isolated(
                sw.module,
                sw.spec(provider, n),
                timeout_s=sw.timeout_s,
                rss_cap_gb=sw.cap_gb,
                threads=sw.threads,
            )
            if res.status != "ok":
                rec.status_row(base, res.status, res.note, metric="s")
                failed[provider] = f"{res.status} at N={n}"
                continue
            record_point(rec, base, res.payload, sw.notes.get(provider, ""), load)


def record_point(
    rec: Recorder, base: dict[str, Any], payload: dict[str, Any], note: str, load: float | None = None
) -> None:
    """The rows of one successful point: time (its note with the load average when the point started), peak
    RSS and the child's extra metrics."""
    note = note or f"{len(payload['times'])} timed run(s)"
    if load is not None:
        note += f"; load average {load:.1f} at the start"
    rec.add(base, "s", quantile_stats(payload["times"]), note=note)
    rec.add(base, "GB", payload["peak_rss_gb"], note="peak RSS of the whole process")
    if payload.get("rss_before_gb") is not None:
        extra = payload["peak_rss_gb"] - payload["rss_before_gb"]
        rec.add(base, "GB_extra", extra, note="peak RSS minus the RSS once the model and inputs existed")
    for metric, value in payload.get("metrics", {}).items():
        rec.add(base, metric, float(value))


def load_average() -> float | None:
    """The 1-minute load average (None where the system does not report it)."""
    try:
        return os.getloadavg()[0]
    except OSError:
        return None


def load_range(rows: Sequence[Row]) -> str:
    """The span of the load averages the time rows recorded when their points started (empty when none)."""
    loads = [
        float(m.group(1)) for r in rows if (m := re.search(r"load average ([0-9.]+) at the start", r["note"]))
    ]
    return f"load average {min(loads):.1f} to {max(loads):.1f} when the points started" if loads else ""


def machine_line(rows: Sequence[Row], load: str | None) -> str:
    """The results header's line: machine, versions, date of the first row, and the machine's load (at the
    run's start when known, and over the points' starts)."""
    first = rows[0]
    loads = [x for x in (f"at the start: {load}" if load else "", load_range(rows)) if x]
    return (
        f"Machine: **{first['device']}**; torch {first['torch']}, triton {first['triton']}, transformers "
        f"{first['transformers']}; {first['date']}." + (f" Load: {'; '.join(loads)}." if loads else "")
    )


def row_cap(row: Row) -> float | None:
    """The memory cap (GB) one row's ``params`` record (``cap_gb=...``), None when absent."""
    for part in row["params"].split(";"):
        if part.startswith("cap_gb="):
            return float(part.split("=", 1)[1])
    return None


def caps_of(rows: Sequence[Row]) -> list[float]:
    """The distinct memory caps (GB, ascending) the rows record: several when points were added to a results
    folder under another ``--cap-gb``."""
    return sorted({cap for cap in map(row_cap, rows) if cap is not None})


def cap_of(rows: Sequence[Row]) -> float | None:
    """The memory cap (GB) of the rows, the largest where they differ; None when none is recorded."""
    caps = caps_of(rows)
    return caps[-1] if caps else None


def cap_phrase(rows: Sequence[Row]) -> str:
    """`` within 16 GB resident`` / `` within each point's memory cap (12 to 16 GB resident)`` / ``""``."""
    caps = caps_of(rows)
    if not caps:
        return ""
    if len(caps) == 1:
        return f" within {caps[0]:g} GB resident"
    return f" within each point's memory cap ({caps[0]:g} to {caps[-1]:g} GB resident)"


def load_state() -> str:
    """The machine's load average when the run started (other jobs share its cores)."""
    try:
        one, five, fifteen = os.getloadavg()
    except OSError:
        return "load average unavailable"
    return f"load average {one:.2f} / {five:.2f} / {fifteen:.2f} (1 / 5 / 15 min) on {os.cpu_count()} cores"


# -------------------------------------------------------------------------------------------------- reading


def value(rows: Sequence[Row], provider: str, n: int, metric: str) -> float | None:
    """The ``ok`` median of ``metric`` for ``provider`` at ``seqlen == n`` (None when absent)."""
    for r in rows:
        if (
            r["provider"] == provider
            and r["seqlen"] == str(n)
            and r["metric"] == metric
            and r["status"] == "ok"
        ):
            return float(r["median"])
    return None


def failure(rows: Sequence[Row], provider: str, n: int) -> Row | None:
    for r in rows:
        if r["provider"] == provider and r["seqlen"] == str(n) and r["status"] != "ok":
            return r
    return None


def lengths(rows: Sequence[Row]) -> list[int]:
    return sorted({int(r["seqlen"]) for r in rows if r.get("seqlen")})


def providers(rows: Sequence[Row], order: Sequence[str]) -> list[str]:
    present = {r["provider"] for r in rows}
    return [p for p in order if p in present] + sorted(present - set(order))


def longest(rows: Sequence[Row], provider: str) -> int | None:
    """The longest N at which ``provider`` ran (an ``ok`` time row)."""
    ok = [
        int(r["seqlen"])
        for r in rows
        if r["provider"] == provider and r["metric"] == "s" and r["status"] == "ok"
    ]
    return max(ok) if ok else None


def cell(rows: Sequence[Row], provider: str, n: int, metric: str, fmt: str = ".2f") -> str:
    """The ``metric`` median formatted with ``fmt`` (thousands separated from 100 up, unless ``fmt`` is an
    exponent format), or why there is none."""
    v = value(rows, provider, n, metric)
    if v is not None:
        return f"{v:{fmt}}" if v < 100 or "e" in fmt else f"{v:,.0f}"
    bad = failure(rows, provider, n)
    if bad is None:
        return "—"
    return {"oom": "over cap", "timeout": "timeout", "skip": "not run", "error": "error"}.get(
        bad["status"], "—"
    )


def table(rows: Sequence[Row], order: Sequence[str], metric: str, fmt: str = ".2f") -> list[str]:
    """Markdown: N down, providers across, the ``metric`` median (or why there is none) in each cell."""
    provs = providers(rows, order)
    out = ["| N | " + " | ".join(provs) + " |", "|---|" + "---|" * len(provs)]
    for n in lengths(rows):
        out.append(f"| {n:,} | " + " | ".join(cell(rows, p, n, metric, fmt) for p in provs) + " |")
    return out


def time_memory_table(rows: Sequence[Row], order: Sequence[str]) -> list[str]:
    """Markdown: N down, providers across, ``seconds / peak GB (+ the measured part's own increase)`` in each
    cell, or why there is no number."""
    provs = providers(rows, order)
    out = ["| N | " + " | ".join(provs) + " |", "|---|" + "---|" * len(provs)]
    for n in lengths(rows):
        cells = []
        for p in provs:
            s, gb, extra = (value(rows, p, n, m) for m in ("s", "GB", "GB_extra"))
            if s is None or gb is None:
                cells.append(cell(rows, p, n, "s"))
                continue
            cells.append(f"{s:.2f} s / {gb:.2f} GB" + (f" (+{extra:.2f})" if extra is not None else ""))
        out.append(f"| {n:,} | " + " | ".join(cells) + " |")
    return out


def ratio_table(rows: Sequence[Row], ours: str, others: Sequence[str]) -> list[str]:
    """Markdown: per N, ``other / ours`` for time and for peak memory (how many times ours is faster /
    smaller)."""
    others = [o for o in others if any(r["provider"] == o for r in rows)]
    head = [f"{o} / {ours} time" for o in others] + [f"{o} / {ours} peak RSS" for o in others]
    out = ["| N | " + " | ".join(head) + " |", "|---|" + "---|" * len(head)]
    for n in lengths(rows):
        cells = []
        for metric in ("s", "GB"):
            for o in others:
                a, b = value(rows, o, n, metric), value(rows, ours, n, metric)
                cells.append(f"{a / b:.2f}x" if a is not None and b else "—")
        out.append(f"| {n:,} | " + " | ".join(cells) + " |")
    return out


def plot(rows: Sequence[Row], order: Sequence[str], path: Path, title: str, cap_gb: float | None) -> str:
    """Time and peak RSS against N (log-log), one line per provider; returns a note when not plotted."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
        from matplotlib import ticker
    except ImportError:
        return "matplotlib is not installed: no plot"
    fig, axes = plt.subplots(1, 2, figsize=(10, 3.8))
    for ax, metric, label in ((axes[0], "s", "seconds"), (axes[1], "GB", "peak RSS, GB")):
        for p in providers(rows, order):
            pts = [(n, value(rows, p, n, metric)) for n in lengths(rows)]
            pts = [(n, v) for n, v in pts if v is not None]
            if pts:
                ax.plot([n for n, _ in pts], [v for _, v in pts], marker="o", label=p)
        if metric == "GB" and cap_gb:
            ax.axhline(cap_gb, color="grey", linestyle="--", linewidth=1, label=f"cap {cap_gb:g} GB")
        ax.set_xscale("log", base=2)
        ax.set_yscale("log")
        ax.yaxis.set_major_locator(ticker.LogLocator(base=10, subs=(1.0, 2.0, 5.0)))
        ax.yaxis.set_major_formatter(ticker.FuncFormatter(lambda v, _: f"{v:g}"))
        ax.yaxis.set_minor_formatter(ticker.NullFormatter())
        ax.set_xlabel("N (tokens)")
        ax.set_ylabel(label)
        ax.grid(alpha=0.3, which="both")
        ax.legend(fontsize=7)
    fig.suptitle(title, fontsize=10)
    try:
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, bbox_inches="tight", format="png"))
    finally:
        plt.close(fig)
    return ""


def write_results_md(out: Path, lines: list[str], plot_note: str, who: str) -> Path:
    """``out/results.md``: ``lines``, then the plot (or the note saying why there is none)."""
    path = out / "results.md"
    text = "\n".join([*lines, plot_note or "![time and memory against N](results.png)", ""])
    atomic_write_text(path, text)
    print(f"{who}: wrote {path}")
    return path


def newest_results(root: Path, prefix: str) -> Path | None:
    """The newest ``<root>/<prefix>-*/results.csv`` (by folder name, which ends in the date)."""
    found = sorted(p for p in root.glob(f"{prefix}-*/results.csv") if p.is_file())
    return found[-1] if found else None
