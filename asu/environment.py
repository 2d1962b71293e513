"""Where numbers came from: the machine, the library versions and the time, as written into results.

``run.json`` of :func:`asu.unlearn.unlearn` records :func:`library_versions`; the demo's ``results.json``
and the asu-attn comparison record :func:`environment`; every benchmark CSV row carries the machine and
the versions too (``benchmarks/common.py``).
"""

from __future__ import annotations

import datetime
import importlib.metadata
import os
import platform

import torch

__all__ = ["LIBRARIES", "cpu_model", "environment", "library_versions", "machine", "utc_timestamp"]

#: The distributions whose versions a run records (those not installed are left out).
LIBRARIES = ("asu", "torch", "transformers", "triton", "peft", "accelerate", "tokenizers")


def cpu_model() -> str:
    """The CPU's model name from ``/proc/cpuinfo`` (else ``platform``'s processor or machine name)."""
    try:
        with open("/proc/cpuinfo", encoding="utf-8") as f:
            for line in f:
                if line.lower().startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine() or "cpu"


def machine(device: str | None = None) -> str:
    """The card for a CUDA ``device`` (``NVIDIA H100 80GB HBM3``), else the CPU with its core and torch
    thread counts. ``None``: the first CUDA device when there is one, else the CPU."""
    if device is None:
        device = "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda"):
        return torch.cuda.get_device_name(torch.device(device))
    return f"{cpu_model()} ({os.cpu_count()} cores, {torch.get_num_threads()} torch threads)"


def library_versions(names: tuple[str, ...] = LIBRARIES) -> dict[str, str]:
    """``{distribution: version}`` of the installed ones among ``names``."""
    out = {}
    for name in names:
        try:
            out[name] = importlib.metadata.version(name)
        except importlib.metadata.PackageNotFoundError:
            continue
    return out


def utc_timestamp() -> str:
    """Now, in UTC: ``2026-01-31T12:00:00Z``."""
    return datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ")


def environment(device: str | None = None) -> dict[str, object]:
    """``machine``, ``torch_threads``, ``python``, the ``torch``/``transformers``/``triton`` versions
    (``absent`` when not installed) and ``date`` (UTC)."""
    versions = library_versions(("transformers", "triton"))
    return {
        "machine": machine(device),
        "torch_threads": torch.get_num_threads(),
        "torch": torch.__version__,
        "transformers": versions.get("transformers", "absent"),
        "triton": versions.get("triton", "absent"),
        "python": platform.python_version(),
        "date": utc_timestamp(),
    }
