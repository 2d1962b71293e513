"""The quality benchmark's plots (drawn with :mod:`asu.charts`): the methods as a forget-vs-retain trade-off
with their spread, continual unlearning across steps, and the automatic τ's target against what unlearning
reached. Each is skipped (with a note) without matplotlib."""

from __future__ import annotations

from pathlib import Path
from typing import Any

from asu.charts import TradeoffPoint, load_pyplot, save_figure, tradeoff_chart
from asu.continual import STEP_COLUMNS

__all__ = ["plot_all", "tradeoff_points"]

ORIGINAL, ORACLE = "original", "oracle (retain only)"


def _mean(stat: dict[str, float] | None) -> float | None:
    return None if stat is None else stat["mean"]


def tradeoff_points(table: dict[str, dict[str, Any]], main_row: str) -> list[TradeoffPoint]:
    """Every row of the main table with both ROUGE-L means as a point (mean ± std across worlds): the
    original and the oracle as references, ``main_row`` (the main ASU) emphasised."""
    points = []
    for row, values in table.items():
        forget, retain = values.get("forget_rouge"), values.get("retain_rouge")
        if forget is None or retain is None:
            continue
        kind = {ORIGINAL: "original", ORACLE: "oracle", main_row: "main"}.get(row, "run")
        points.append(
            TradeoffPoint(row, forget["mean"], retain["mean"], kind, forget_err=forget["std"],
                          retain_err=retain["std"], degenerate=_mean(values.get("forget_degenerate_answers")))
        )  # fmt: skip
    return points


def runs_behind(worlds: list[dict[str, Any]], table: dict[str, Any]) -> dict[str, list[tuple[float, float]]]:
    """Per row of the main table, the single runs behind its mean: (forget, retain) ROUGE-L of the row's
    model in each world, and for a matched baseline every run of its learning-rate bisection."""
    out: dict[str, list[tuple[float, float]]] = {}
    for w in worlds:
        names = {ORIGINAL: [ORIGINAL], ORACLE: [ORACLE]}
        names |= {f"ASU: {label}": [name] for label, name in w.get("asu", {}).get("variants", {}).items()}
        names |= {f"{label} @ matched": m.get("runs", []) for label, m in w.get("matched", {}).items()}
        for row, models in names.items():
            for name in models:
                s = w["models"].get(name) or {}
                if row in table and s.get("forget_rouge") is not None and s.get("retain_rouge") is not None:
                    out.setdefault(row, []).append((s["forget_rouge"], s["retain_rouge"]))
    return out


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
            if not any(r.get(key) for r in steps):
                continue  # not measured in this run (a column added after it)
            means = [r[key]["mean"] if r.get(key) else float("nan") for r in steps]
            stds = [r[key]["std"] if r.get(key) else 0.0 for r in steps]
            ax.errorbar(xs, means, yerr=stds, marker="o", capsize=2, label=name)
        ax.set_title(label, fontsize=9)
        ax.set_xlabel("step (forget request)")
        ax.set_xticks(xs)
        ax.set_ylim(0, 1.05)
    axes[0][0].legend(fontsize=7)
    save_figure(fig, path, dpi=120)


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
    save_figure(fig, path, dpi=120)


def plot_all(out: Path, worlds: list[dict[str, Any]], aggregate: dict[str, Any], s: Any) -> None:
    """``methods.png`` (the trade-off), ``continual.png`` and ``tau_promise.png`` under ``out``."""
    plt = load_pyplot()
    if plt is None:
        return
    n = len(worlds)
    points = tradeoff_points(aggregate["table"], f"ASU: {s.main_variant}")
    title = f"{n} worlds ({s.mode}): mean ± std; faint: each world's runs (baselines: every learning rate)"
    tradeoff_chart(points, out / "methods.png", title, behind=runs_behind(worlds, aggregate["table"]))
    plot_continual(plt, aggregate["continual"], out / "continual.png")
    plot_promise(plt, aggregate["tau_promise"], out / "tau_promise.png")
