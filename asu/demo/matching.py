"""Comparing methods at matched forgetting: the learning-rate bisection and the interpolation between runs.

A baseline's forgetting grows with its learning rate, so "at ASU's forgetting" means: bisect the baseline's
learning rate until runs land close to ASU's forget ROUGE-L on both sides of it, then read every other
number of the baseline at exactly ASU's forget ROUGE-L by linear interpolation between those two runs
(:func:`values_at`). Used by ``asu demo`` and by ``benchmarks/quality.py``.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping, Sequence
from typing import Any

__all__ = [
    "BRACKET_TOLERANCE",
    "MATCH_KEY",
    "MATCH_TOLERANCE",
    "matched_runs",
    "next_matching_lr",
    "search_lr",
    "values_at",
]

#: The number runs are matched on, and how close a run must be to count as matched on its own.
MATCH_KEY = "forget_rouge"
MATCH_TOLERANCE = 0.05
#: Two runs on either side of the target, each at most this far from it, are interpolated between.
BRACKET_TOLERANCE = 0.1

Summary = Mapping[str, Any]


def next_matching_lr(forget_by_lr: Mapping[float, float], target: float) -> float | None:
    """The next learning rate to try so the forget ROUGE-L approaches ``target``.

    Forgetting grows with the learning rate, so take the largest lr that forgets too little and the smallest
    that forgets too much and try their geometric mean; beyond the tried range, step by 2x. ``None`` when
    the bracket has closed to within 5%, or when the results are not monotone enough to bracket.
    """
    above = [lr for lr, r in forget_by_lr.items() if r > target]  # forgets too little
    below = [lr for lr, r in forget_by_lr.items() if r < target]  # forgets too much
    if above and below:
        lo, hi = max(above), min(below)
        if hi <= lo or hi / lo < 1.05:
            return None
        return math.sqrt(lo * hi)
    if above:
        return 2.0 * max(above)
    if below:
        return 0.5 * min(below)
    return None


def _matched_enough(forget: Sequence[float], target: float, tolerance: float) -> bool:
    """Stop bisecting once a run is within 0.01 of the target, or matched runs sit on both sides of it."""
    near = [f - target for f in forget if abs(f - target) <= tolerance]
    return any(abs(d) <= 0.01 for d in near) or (any(d > 0 for d in near) and any(d < 0 for d in near))


def search_lr(
    run: Callable[[float], Summary],
    target: float,
    grid: Sequence[float],
    steps: int,
    *,
    key: str = MATCH_KEY,
    tolerance: float = MATCH_TOLERANCE,
) -> dict[float, Summary]:
    """Run ``run(lr)`` at every lr of ``grid``, then bisect (at most ``steps`` more runs) toward ``target``.

    Returns ``{lr: summary}`` of every run, in the order run.
    """
    runs: dict[float, Summary] = {}
    for lr in grid:
        if _matched_enough([r[key] for r in runs.values()], target, tolerance):
            break
        runs[lr] = run(lr)
    for _ in range(steps):
        if _matched_enough([r[key] for r in runs.values()], target, tolerance):
            break
        lr = next_matching_lr({lr: r[key] for lr, r in runs.items()}, target)
        if lr is None or lr in runs:
            break
        runs[lr] = run(lr)
    return runs


def matched_runs(
    runs: Mapping[str, Summary], target: float, key: str = MATCH_KEY, tolerance: float = MATCH_TOLERANCE
) -> list[str]:
    """The names of the runs within ``tolerance`` of ``target`` on ``key``."""
    return [n for n, s in runs.items() if abs(s[key] - target) <= tolerance]


def values_at(
    runs: Mapping[str, Summary],
    target: float,
    key: str = MATCH_KEY,
    tolerance: float = MATCH_TOLERANCE,
    bracket: float = BRACKET_TOLERANCE,
) -> dict[str, Any] | None:
    """Every number of the runs read at ``key == target``.

    With runs on both sides of ``target`` within ``bracket`` of it, each numeric value is interpolated
    linearly between the closest run on each side (the method's trade-off at exactly that forgetting);
    otherwise it is the value of the closest run within ``tolerance``. Returns ``{"values": {...}, "runs":
    [names], "how": ...}``, or ``None`` when no run is close enough.
    """
    forget = {n: s[key] for n, s in runs.items() if _number(s.get(key))}
    more = [n for n, f in forget.items() if target <= f <= target + bracket]  # forgets less (or as much)
    less = [n for n, f in forget.items() if target - bracket <= f < target]  # forgets more
    if more and less:
        a, b = min(more, key=forget.get), max(less, key=forget.get)
        w = (target - forget[b]) / (forget[a] - forget[b])
        values = {}
        for k, vb in runs[b].items():
            va = runs[a].get(k)
            if _number(va) and _number(vb):
                values[k] = vb + w * (va - vb)
        return {"values": values, "runs": [a, b], "how": "interpolated between the runs either side"}
    matched = matched_runs(runs, target, key, tolerance)
    if not matched:
        return None
    closest = min(matched, key=lambda n: abs(forget[n] - target))
    values = {k: v for k, v in runs[closest].items() if _number(v)}
    return {"values": values, "runs": [closest], "how": "the matched run closest to the target"}


def _number(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)
