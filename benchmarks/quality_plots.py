"""The quality benchmark's plots: the methods with their spread, continual unlearning across steps, and the
automatic τ's target against what unlearning reached. Each is skipped (with a note) without matplotlib."""

from __future__ import annotations

import sys
from pathlib import Path
from typing import Any

from asu.continual import STEP_COLUMNS
from asu.files import atomic_write

__all__ = ["plot_all"]

BARS = (
    ("forget_rouge", "forget ROUGE-L ↓"),
    ("forget_fact_leakage_any", "fact leak ↓"),
    ("retain_rouge", "retain ROUGE-L ↑"),
    ("model_utility", "model utility ↑"),
    ("forget_no_repeat", "no-repeat ↑"),
)


def _pyplot() -> Any | None:
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        print("matplotlib is not installed: no plots", file=sys.stderr)
        return None
    return plt


def _save(plt: Any, fig: Any, path: Path) -> None:
    try:
        fig.tight_layout()
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120))
    finally:
        plt.close(fig)


def plot_methods(plt: Any, table: dict[str, dict[str, Any]], path: Path, title: str) -> None:
    """Grouped bars, one group per model row, error bars = std across worlds."""
    rows = list(table)
    fig, ax = plt.subplots(figsize=(max(7.0, 1.2 * len(rows)), 4.2))
    width = 0.8 / len(BARS)
    for j, (key, label) in enumerate(BARS):
        xs = [i + (j - (len(BARS) - 1) / 2) * width for i in range(len(rows))]
        stats = [table[r].get(key) for r in rows]
        ax.bar(
            xs,
            [s["mean"] if s else 0.0 for s in stats],
            width,
            yerr=[s["std"] if s else 0.0 for s in stats],
            capsize=2,
            label=label,
        )
    ax.set_xticks(range(len(rows)))
    ax.set_xticklabels(rows, rotation=25, ha="right", fontsize=7)
    ax.set_ylim(0, 1.08)
    ax.set_title(title, fontsize=9)
    ax.legend(fontsize=7, ncol=len(BARS), loc="upper center", bbox_to_anchor=(0.5, -0.35))
    _save(plt, fig, path)


def plot_continual(plt: Any, continual: dict[str, list[dict[str, Any]]], path: Path) -> None:
    """Per continual run: each :data:`asu.continual.STEP_COLUMNS` value (mean ± std over worlds) per step."""
    runs = {k: v for k, v in continual.items() if v}
    if not runs:
        return
    fig, axes = plt.subplots(1, len(runs), figsize=(4.2 * len(runs), 3.6), squeeze=False, sharey=True)
    series = [(f"{part}.{key}", name) for part, key, name in STEP_COLUMNS]
    for ax, (label, steps) in zip(axes[0], runs.items(), strict=True):
        xs = [r["step"] for r in steps]
        for key, name in series:
            means = [r[key]["mean"] if r.get(key) else float("nan") for r in steps]
            stds = [r[key]["std"] if r.get(key) else 0.0 for r in steps]
            ax.errorbar(xs, means, yerr=stds, marker="o", capsize=2, label=name)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("step (forget request)")
        ax.set_xticks(xs)
        ax.set_ylim(0, 1.05)
    axes[0][0].legend(fontsize=7)
    _save(plt, fig, path)


def plot_promise(plt: Any, promise: dict[str, Any], path: Path) -> None:
    """Each ASU run at an automatic τ: the preview's target against the forget ROUGE-L after unlearning."""
    samples = promise["samples"]
    if not samples:
        return
    fig, ax = plt.subplots(figsize=(4.4, 4.0))
    single = [s for s in samples if " step " not in s["run"]]
    steps = [s for s in samples if " step " in s["run"]]
    for group, marker, label in ((single, "o", "single runs"), (steps, "x", "continual steps")):
        if group:
            ax.scatter([s["target"] for s in group], [s["after"] for s in group], marker=marker, label=label)
    lo = min(min(s["target"] for s in samples), min(s["after"] for s in samples)) - 0.05
    hi = max(max(s["target"] for s in samples), max(s["after"] for s in samples)) + 0.05
    ax.plot([lo, hi], [lo, hi], "k--", lw=0.8, label="after = target")
    tol = promise["tolerance"]
    ax.plot([lo, hi], [lo + tol, hi + tol], "k:", lw=0.8, label=f"target + {tol}")
    ax.set_xlabel("preview target (teacher forget ROUGE-L)")
    ax.set_ylabel("forget ROUGE-L after unlearning")
    ax.legend(fontsize=7)
    ax.set_title("automatic τ: target vs reached", fontsize=9)
    _save(plt, fig, path)


def plot_all(out: Path, worlds: list[dict[str, Any]], aggregate: dict[str, Any], s: Any) -> None:
    plt = _pyplot()
    if plt is None:
        return
    n = len(worlds)
    plot_methods(plt, aggregate["table"], out / "methods.png", f"{n} worlds, mean ± std ({s.mode})")
    plot_continual(plt, aggregate["continual"], out / "continual.png")
    plot_promise(plt, aggregate["tau_promise"], out / "tau_promise.png")
