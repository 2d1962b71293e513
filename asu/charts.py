"""Charts written beside results: matplotlib on its file-only Agg backend, saved atomically.

matplotlib is a dependency; where it cannot be imported :func:`load_pyplot` returns None and the caller skips
its chart.

:func:`tradeoff_chart` is the main figure of the demo and the quality benchmark: forgetting against what is
kept, one point per model (the original and the retain-only oracle marked), so that a method is read by
where it lands and not by one bar at a time.
"""

from __future__ import annotations

import math
import os
import sys
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from asu.files import atomic_write
from asu.metrics.report import DEGENERATE_WARNING

__all__ = ["TradeoffPoint", "load_pyplot", "save_figure", "tradeoff_chart"]


def load_pyplot(quiet: bool = False) -> Any | None:
    """``matplotlib.pyplot`` on the Agg backend (no display needed), or None when matplotlib is not installed
    (saying so on stderr unless ``quiet``)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        if not quiet:
            print("matplotlib is not installed: no chart", file=sys.stderr)
        return None
    return plt


def save_figure(fig: Any, path: str | os.PathLike[str], dpi: int) -> None:
    """Lay ``fig`` out tightly, write it to ``path`` atomically (format from the suffix) and close it, also
    when writing fails (pyplot keeps every open figure alive)."""
    import matplotlib.pyplot as plt

    try:
        fig.tight_layout()
        atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=dpi))
    finally:
        plt.close(fig)


@dataclass(frozen=True)
class TradeoffPoint:
    """One model on the trade-off chart.

    ``kind`` is ``"original"`` or ``"oracle"`` (drawn as the fixed references), ``"main"`` (the method the
    chart is about: a larger diamond, on top) or anything else; points of one ``group`` share a colour and a
    legend entry, and are joined by a line (sorted by ``forget``) when
    the group has several (a learning-rate or τ sweep). ``note`` is written beside the point; the errors
    are half-widths of error bars (a spread across worlds); a ``degenerate`` share (of the forget answers)
    of at least :data:`asu.metrics.report.DEGENERATE_WARNING` rings the point in red and says so."""

    group: str
    forget: float
    retain: float
    kind: str = "run"
    note: str = ""
    forget_err: float = 0.0
    retain_err: float = 0.0
    degenerate: float | None = None


_REFERENCES = {
    "original": {"marker": "s", "color": "black", "markersize": 8},
    "oracle": {"marker": "*", "color": "tab:green", "markersize": 14},
}
_COLOURS = (
    "tab:blue",
    "tab:orange",
    "tab:purple",
    "tab:brown",
    "tab:pink",
    "tab:olive",
    "tab:cyan",
    "tab:red",
)


def _style(kind: str, colour: str) -> dict[str, Any]:
    if kind in _REFERENCES:
        return _REFERENCES[kind]
    return {
        "marker": "D" if kind == "main" else "o",
        "color": colour,
        "markersize": 9 if kind == "main" else 6,
    }


def _draw_group(ax: Any, points: Sequence[TradeoffPoint], style: dict[str, Any]) -> None:
    """One group: error bars and markers (a line through them when there are several), notes, red rings."""
    pts = sorted(points, key=lambda p: p.forget)
    main = pts[0].kind == "main"
    ax.errorbar(
        [p.forget for p in pts], [p.retain for p in pts],
        xerr=[p.forget_err for p in pts], yerr=[p.retain_err for p in pts],
        linestyle="-" if len(pts) > 1 else "none", linewidth=0.8, capsize=2, label=pts[0].group,
        zorder=5 if main else 3, **style,
    )  # fmt: skip
    for p in pts:
        note = p.note
        if p.degenerate is not None and p.degenerate >= DEGENERATE_WARNING:
            ax.scatter([p.forget], [p.retain], s=260, facecolors="none", edgecolors="red", zorder=4)
            note = f"{note} ({p.degenerate:.0%} degenerate)".strip()
        if note:  # the main method's note below left of its marker, the others' below right; above markers
            offset, align = ((-8, -10), "right") if main else ((4, -9), "left")
            ax.annotate(note, (p.forget, p.retain), textcoords="offset points", xytext=offset, ha=align,
                        fontsize=6, zorder=6)  # fmt: skip


def _limits(values: Sequence[float]) -> tuple[float, float]:
    """From 0.1 below the lowest value (rounded down to a tenth, at least 0) to just above 1."""
    return max(0.0, math.floor((min(values) - 0.1) * 10) / 10) - 0.02, 1.05


def tradeoff_chart(
    points: Sequence[TradeoffPoint],
    path: str | os.PathLike[str],
    title: str,
    x_label: str = "forget ROUGE-L (lower: more forgotten)",
    y_label: str = "retain ROUGE-L (higher: more kept)",
    behind: Mapping[str, Sequence[tuple[float, float]]] | None = None,
    dpi: int = 120,
) -> bool:
    """Forget (x) against retain (y), one point per model, saved to ``path``.

    The best corner is the top left; the oracle's forget value (what never having seen the forget set
    gives) is a dotted vertical line and the original's retain value a dotted horizontal one. ``behind``
    maps a group to the single runs its point summarises (per world, per learning rate), drawn small and
    faint in its colour. Returns False (and draws nothing) without matplotlib or points."""
    plt = load_pyplot()
    if plt is None or not points:
        return False
    groups: dict[str, list[TradeoffPoint]] = {}
    for p in points:
        groups.setdefault(p.group, []).append(p)
    colours = iter(_COLOURS * (1 + len(groups) // len(_COLOURS)))
    styles = {
        g: _style(pts[0].kind, "" if pts[0].kind in _REFERENCES else next(colours))
        for g, pts in groups.items()
    }
    fig, ax = plt.subplots(figsize=(6.6, 5.0))
    for group, runs in (behind or {}).items():
        if runs and group in styles:
            xs, ys = zip(*runs, strict=True)
            ax.scatter(xs, ys, s=10, color=styles[group]["color"], alpha=0.35, linewidths=0, zorder=2)
    for group, pts in groups.items():
        _draw_group(ax, pts, styles[group])
    for p in points:
        if p.kind == "oracle":
            ax.axvline(p.forget, color="tab:green", linestyle=":", linewidth=0.8)
        if p.kind == "original":
            ax.axhline(p.retain, color="black", linestyle=":", linewidth=0.8)
    shown = [p.retain - p.retain_err for p in points] + [
        y for runs in (behind or {}).values() for _, y in runs
    ]
    ax.set_xlim(-0.02, 1.05)
    ax.set_ylim(*_limits(shown))
    ax.set_xlabel(x_label)
    ax.set_ylabel(y_label)
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=7, loc="lower right")
    save_figure(fig, path, dpi=dpi)
    return True
