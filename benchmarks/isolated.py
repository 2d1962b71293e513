"""One measurement per fresh process, so that peak memory belongs to that measurement alone.

The parent runs ``python -m <module> --child '<json spec>'`` (:func:`run_isolated`), watches the child's
resident memory through ``/proc/<pid>/status`` every 50 ms and kills it above a cap (so a configuration that
would exhaust a shared machine stops early and is recorded as ``oom``), and stops it after a timeout. The
child does its work and ends with :func:`report`, which prints one line ``ISOLATED-RESULT <json>`` holding
its measurements plus its peak resident set size (``resource.getrusage(...).ru_maxrss``: the whole process,
interpreter, libraries, model and inputs included) and the resident size when the measured part began.

Memory is reported in GB (1e9 bytes).
"""

from __future__ import annotations

import json
import os
import resource
import subprocess
import sys
import threading
import time
from dataclasses import dataclass, field
from typing import Any

MARK = "ISOLATED-RESULT "


def rss_gb(pid: int | str = "self") -> float | None:
    """Current resident set size of a process (``VmRSS``), or None when it cannot be read."""
    try:
        with open(f"/proc/{pid}/status", encoding="ascii") as f:
            for line in f:
                if line.startswith("VmRSS:"):
                    return int(line.split()[1]) * 1024 / 1e9
    except (OSError, ValueError):
        return None
    return None


def peak_rss_gb() -> float:
    """Peak resident set size of this process so far (Linux reports ``ru_maxrss`` in KiB)."""
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024 / 1e9


def report(payload: dict[str, Any], rss_before_gb: float | None) -> None:
    """The child's last act: print its measurements with its peak RSS and the RSS before the measured part."""
    out = {**payload, "peak_rss_gb": peak_rss_gb(), "rss_before_gb": rss_before_gb}
    print(MARK + json.dumps(out), flush=True)


@dataclass
class ChildResult:
    """What one isolated run gave: ``status`` ok / oom / timeout / error, the child's payload, a note."""

    status: str
    payload: dict[str, Any] = field(default_factory=dict)
    note: str = ""
    wall_s: float = 0.0


def _last_result(text: str) -> dict[str, Any] | None:
    for line in reversed(text.splitlines()):
        if line.startswith(MARK):
            return json.loads(line[len(MARK) :])
    return None


def run_isolated(
    module: str,
    spec: dict[str, Any],
    *,
    timeout_s: float,
    rss_cap_gb: float,
    threads: int = 1,
    env: dict[str, str] | None = None,
) -> ChildResult:
    """Run ``python -m module --child <spec>`` in a fresh process with ``threads`` intra-op threads.

    The child is killed when its RSS exceeds ``rss_cap_gb`` (status ``oom``) or it runs past ``timeout_s``
    (status ``timeout``); a non-zero exit without a result is ``error`` with the end of its output.
    """
    child_env = {
        **os.environ,
        **(env or {}),
        "OMP_NUM_THREADS": str(threads),
        "MKL_NUM_THREADS": str(threads),
    }
    cmd = [sys.executable, "-m", module, "--child", json.dumps(spec)]
    start = time.perf_counter()
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True, env=child_env)
    status, note, peak_seen = "", "", 0.0
    chunks: list[str] = []
    reader = threading.Thread(target=lambda: chunks.append(proc.stdout.read()), daemon=True)
    reader.start()
    while proc.poll() is None:
        rss = rss_gb(proc.pid) or 0.0
        peak_seen = max(peak_seen, rss)
        if rss > rss_cap_gb:
            status, note = "oom", f"killed at {rss:.1f} GB resident, above the {rss_cap_gb:g} GB cap"
        elif time.perf_counter() - start > timeout_s:
            status, note = "timeout", f"killed after the {timeout_s:g} s timeout"
        if status:
            proc.kill()
            break
        time.sleep(0.05)
    proc.wait()
    reader.join(timeout=10)
    wall = time.perf_counter() - start
    text = "".join(chunks)
    if status:
        return ChildResult(status, {"peak_rss_seen_gb": peak_seen}, note, wall)
    result = _last_result(text)
    if proc.returncode != 0 or result is None:
        tail = " ".join(text.strip().splitlines()[-3:])[-300:]
        kind = "oom" if "out of memory" in tail.lower() or "MemoryError" in tail else "error"
        return ChildResult(kind, {}, f"exit {proc.returncode}: {tail}", wall)
    return ChildResult("ok", result, "", wall)
