"""The quality benchmark's statistics across worlds: mean ± std, paired differences, the auto-τ promise, the
continual steps, and their markdown.

Every function reads the per-world records ``benchmarks/quality.py`` writes (one dict per world):

* ``models``: name -> evaluation summary of every evaluated model;
* ``asu``: ``{"main": name, "variants": {label: name}}``, the ASU runs at the automatic τ;
* ``matched``: baseline label -> ``{"runs": [names], "at_target": {"values": {...}} or None}``, the baseline
  read at the main ASU's forget ROUGE-L (:func:`asu.demo.matching.values_at`);
* ``continual``: label -> one record per step (``evaluation`` with ``request`` / ``forgotten`` /
  ``pending`` summaries, ``tau_target``);
* ``layers``: the layers experiment.

Spread: the sample standard deviation (n - 1) across worlds; 0 for a single world.
"""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from typing import Any

from asu.continual import STEP_COLUMNS, step_value

World = Mapping[str, Any]

#: The metrics of the main table: summary key -> (header, better: "low" | "high" | "" for none).
METRICS: dict[str, tuple[str, str]] = {
    "forget_rouge": ("forget ROUGE-L", "low"),
    "forget_truth_ratio": ("forget truth ratio", ""),
    "forget_quality": ("forget quality", "high"),
    "forget_fact_leakage_any": ("fact leak (any)", "low"),
    "forget_fact_leakage_all": ("fact leak (all)", "low"),
    "retain_rouge": ("retain ROUGE-L", "high"),
    "retain_fact_leakage_any": ("retain facts kept", "high"),
    "model_utility": ("model utility", "high"),
    "forget_no_repeat": ("no-repeat", "high"),
    "forget_well_formed": ("well-formed", "high"),
    "forget_degenerate_answers": ("degenerate answers", "low"),
}
#: The robustness tables (asu.attacks, on the attacked models): key -> (header, better), on the
#: meta-evaluation's forget probability, then on forget ROUGE-L.
ROBUSTNESS: dict[str, tuple[str, str]] = {
    "before_forget_Q_A_Prob": ("forget Prob", "low"),
    "relearn_forget_Q_A_Prob": ("after relearning", "low"),
    "relearn_R": ("relearn R", "high"),
    "relearn_split_forget_Q_A_Prob": ("held-out half after", "low"),
    "relearn_split_recovered": ("held-out recovered", "low"),
    "quant_nf4_forget_Q_A_Prob": ("after NF4", "low"),
    "quant_nf4_Q": ("NF4 Q", "high"),
    "prefix_forget_Q_A_Prob": ("prefilled", "low"),
    "robustness": ("robustness", "high"),
}
ROBUSTNESS_ROUGE: dict[str, tuple[str, str]] = {
    "before_forget_Q_A_ROUGE": ("forget ROUGE-L", "low"),
    "relearn_forget_Q_A_ROUGE": ("after relearning", "low"),
    "relearn_R_rouge": ("relearn R", "high"),
    "relearn_split_forget_Q_A_ROUGE": ("held-out half after", "low"),
    "relearn_split_recovered_rouge": ("held-out recovered", "low"),
    "quant_nf4_forget_Q_A_ROUGE": ("after NF4", "low"),
    "quant_nf4_Q_rouge": ("NF4 Q", "high"),
    "prefix_forget_Q_A_ROUGE": ("prefilled", "low"),
    "robustness_rouge": ("robustness", "high"),
}
#: When a method's forgetting survives an attack: (column, survives when, fails when), each condition on the
#: column's value in every world; anything else is "mixed". ``prefix_gain`` is the prefilled forget Prob minus
#: the plain one.
VERDICTS: dict[str, tuple[str, Any, Any]] = {
    "relearning (R)": ("relearn_R", lambda v: v >= 0.8, lambda v: v < 0.5),
    "relearning half, the other half (recovered)": (
        "relearn_split_recovered",
        lambda v: v <= 0.2,
        lambda v: v > 0.5,
    ),  # fmt: skip
    "NF4 quantization (Q)": ("quant_nf4_Q", lambda v: v >= 0.9, lambda v: v < 0.8),
    "prefilled answer (Prob gain)": ("prefix_gain", lambda v: v <= 0.05, lambda v: v > 0.1),
}
VERDICT_RULES = {
    "relearning (R)": "survives: R >= 0.8 in every world; fails: R < 0.5 in every world",
    "relearning half, the other half (recovered)": (
        "survives: at most 20% of what unlearning removed on the held-out half comes back in every world; "
        "fails: more than 50% in every world"
    ),
    "NF4 quantization (Q)": "survives: Q >= 0.9 in every world; fails: Q < 0.8 in every world",
    "prefilled answer (Prob gain)": (
        "survives: the prefilled forget Prob at most 0.05 above the plain one in every world; fails: more "
        "than 0.1 above in every world"
    ),
}
#: Differences a claim is made of: ASU minus a baseline at matched forgetting.
PAIRED = (
    "retain_rouge",
    "model_utility",
    "forget_fact_leakage_any",
    "forget_no_repeat",
    "forget_well_formed",
)


def mean_std(values: Iterable[float | None]) -> dict[str, float] | None:
    """``{"mean", "std", "n", "min", "max"}`` of the finite values (None when there are none)."""
    xs = [float(v) for v in values if isinstance(v, (int, float)) and math.isfinite(v)]
    if not xs:
        return None
    std = statistics.stdev(xs) if len(xs) > 1 else 0.0
    return {"mean": statistics.fmean(xs), "std": std, "n": len(xs), "min": min(xs), "max": max(xs)}


def fmt(stat: Mapping[str, float] | None, digits: int = 3, n_of: int | None = None) -> str:
    """``0.512 ± 0.031`` (``(n=2)`` appended when fewer worlds than ``n_of`` contributed)."""
    if stat is None:
        return "–"
    if abs(stat["mean"]) < 10 ** (-digits) and stat["mean"] != 0:
        text = f"{stat['mean']:.1e} ± {stat['std']:.1e}"
    else:
        text = f"{stat['mean']:.{digits}f} ± {stat['std']:.{digits}f}"
    if n_of is not None and stat["n"] < n_of:
        text += f" (n={stat['n']})"
    return text


def _summary_of(world: World, row: str) -> Mapping[str, Any] | None:
    """A table row's summary in one world: a model name, ``ASU: <variant>`` or ``<baseline> @ matched``."""
    if row.endswith(" @ matched"):
        label = row[: -len(" @ matched")]
        at = (world.get("matched", {}).get(label) or {}).get("at_target")
        return at["values"] if at else None
    if row.startswith("ASU: "):
        name = world.get("asu", {}).get("variants", {}).get(row[len("ASU: ") :])
        return world["models"].get(name) if name else None
    return world["models"].get(row)


def table_rows(worlds: Sequence[World]) -> list[str]:
    """The rows of the main table: original, oracle, every ASU variant, every matched baseline."""
    rows = ["original", "oracle (retain only)"]
    for w in worlds:
        for label in w.get("asu", {}).get("variants", {}):
            if f"ASU: {label}" not in rows:
                rows.append(f"ASU: {label}")
    for w in worlds:
        for label in w.get("matched", {}):
            if f"{label} @ matched" not in rows:
                rows.append(f"{label} @ matched")
    return rows


def aggregate(
    worlds: Sequence[World], rows: Sequence[str] | None = None, metrics: Mapping[str, Any] = METRICS
) -> dict[str, dict[str, Any]]:
    """Row -> metric -> :func:`mean_std` across worlds (a world where the row is missing is left out)."""
    out: dict[str, dict[str, Any]] = {}
    for row in rows or table_rows(worlds):
        summaries = [s for s in (_summary_of(w, row) for w in worlds) if s is not None]
        out[row] = {k: mean_std(s.get(k) for s in summaries) for k in metrics}
        out[row]["worlds"] = len(summaries)
    return out


def robustness_rows(worlds: Sequence[World]) -> list[str]:
    """The main table's rows whose model was attacked in at least one world (it has ``before_*`` columns)."""

    def attacked(summary: Mapping[str, Any] | None) -> bool:
        return summary is not None and any(k.startswith("before_forget_") for k in summary)

    return [r for r in table_rows(worlds) if any(attacked(_summary_of(w, r)) for w in worlds)]


def _verdict_value(summary: Mapping[str, Any], key: str) -> float | None:
    if key == "prefix_gain":
        a, b = summary.get("prefix_forget_Q_A_Prob"), summary.get("before_forget_Q_A_Prob")
        return None if a is None or b is None else a - b
    return summary.get(key)


def verdicts(worlds: Sequence[World], rows: Sequence[str]) -> dict[str, dict[str, Any]]:
    """Row -> attack -> ``{"verdict": survives | fails | mixed, "values": per-world values, "stat"}`` by the
    rules of :data:`VERDICTS` (rows whose column no world has are left out)."""
    out: dict[str, dict[str, Any]] = {}
    for row in rows:
        for attack, (key, survives, fails) in VERDICTS.items():
            values = [_verdict_value(s, key) for s in (_summary_of(w, row) for w in worlds) if s is not None]
            values = [v for v in values if v is not None]
            if not values:
                continue
            verdict = (
                "survives" if all(map(survives, values)) else "fails" if all(map(fails, values)) else "mixed"
            )
            stat = mean_std(values)
            out.setdefault(row, {})[attack] = {
                "verdict": verdict,
                "values": values,
                "stat": stat,
                "of": len(worlds),
            }
    return out


def paired(
    worlds: Sequence[World], a: str, b: str, metrics: Sequence[str] = PAIRED
) -> dict[str, dict[str, Any]]:
    """Per metric, the differences ``a - b`` world by world (worlds that have both rows): their
    :func:`mean_std`, the per-world values, and in how many worlds ``a`` is ahead (``higher`` > 0)."""
    out: dict[str, dict[str, Any]] = {}
    for k in metrics:
        diffs = []
        for w in worlds:
            sa, sb = _summary_of(w, a), _summary_of(w, b)
            if sa is not None and sb is not None and sa.get(k) is not None and sb.get(k) is not None:
                diffs.append(float(sa[k]) - float(sb[k]))
        out[k] = {"diff": mean_std(diffs), "values": diffs, "higher": sum(d > 0 for d in diffs)}
    return out


def tau_promise(worlds: Sequence[World], tolerance: float = 0.05) -> dict[str, Any]:
    """How often unlearning at the automatic τ meets the preview's target after training.

    One sample per ASU run at an automatic τ: the single runs (forget ROUGE-L on the forget split) and every
    continual step (on its request). ``error = after - target``; a run meets the target when
    ``after <= target + tolerance`` and is close to it when ``|error| <= tolerance``.
    """
    samples = []
    for w in worlds:
        for name, choice in w.get("tau", {}).items():
            after = w["models"].get(name, {}).get("forget_rouge")
            if after is not None:
                samples.append(
                    {"world": w["seed"], "run": name, "target": choice["target"], "after": after,
                     "temperature": choice["temperature"], "reached": choice["reached"]}
                )  # fmt: skip
        for label, steps in w.get("continual", {}).items():
            for s in steps:
                after = ((s.get("evaluation") or {}).get("request") or {}).get("forget_rouge")
                if s.get("tau_target") is not None and after is not None:
                    samples.append(
                        {"world": w["seed"], "run": f"{label} step {s['step']}", "target": s["tau_target"],
                         "after": after, "temperature": s["temperature"], "reached": True}
                    )  # fmt: skip
    errors = [s["after"] - s["target"] for s in samples]
    n = len(samples)
    return {
        "tolerance": tolerance,
        "n": n,
        "met": sum(e <= tolerance for e in errors),
        "close": sum(abs(e) <= tolerance for e in errors),
        "error": mean_std(errors),
        "samples": samples,
    }


def continual_steps(worlds: Sequence[World], label: str) -> list[dict[str, Any]]:
    """Per step of the continual run ``label``: each :data:`STEP_COLUMNS` value's :func:`mean_std`."""
    runs = [w["continual"][label] for w in worlds if label in w.get("continual", {})]
    n_steps = max((len(r) for r in runs), default=0)
    out = []
    for i in range(n_steps):
        steps = [r[i] for r in runs if len(r) > i]
        row: dict[str, Any] = {"step": i + 1, "temperature": mean_std(s.get("temperature") for s in steps)}
        for part, key, _ in STEP_COLUMNS:
            row[f"{part}.{key}"] = mean_std(step_value(s.get("evaluation"), part, key) for s in steps)
        out.append(row)
    return out


# -- markdown -------------------------------------------------------------------------------------------


def main_table(
    stats: Mapping[str, Mapping[str, Any]], n_worlds: int, metrics: Mapping[str, tuple[str, str]] = METRICS
) -> str:
    head = "| model | " + " | ".join(h for h, _ in metrics.values()) + " |\n"
    head += "|---" * (1 + len(metrics)) + "|\n"
    lines = []
    for row, values in stats.items():
        cells = [fmt(values.get(k), n_of=n_worlds) for k in metrics]
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


def paired_table(
    comparisons: Mapping[str, Mapping[str, Any]],
    keys: Sequence[str] = PAIRED,
    names: Mapping[str, tuple[str, str]] = METRICS,
) -> str:
    """One row per comparison (``"A − B"``), one column per metric of ``keys`` (headers from ``names``): mean
    ± std of the difference and in how many worlds it is positive."""
    head = "| difference | " + " | ".join(names[k][0] for k in keys) + " |\n"
    head += "|---" * (1 + len(keys)) + "|\n"
    lines = []
    for name, per_metric in comparisons.items():
        cells = []
        for k in keys:
            c = per_metric.get(k)
            if not c or c["diff"] is None:
                cells.append("–")
            else:
                d = c["diff"]
                cells.append(f"{d['mean']:+.3f} ± {d['std']:.3f} ({c['higher']}/{d['n']} > 0)")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


def continual_table(rows: Sequence[Mapping[str, Any]]) -> str:
    head = "| step | τ | " + " | ".join(h for _, _, h in STEP_COLUMNS) + " |\n"
    head += "|---" * (2 + len(STEP_COLUMNS)) + "|\n"
    lines = []
    for r in rows:
        cells = [fmt(r["temperature"], 2)] + [fmt(r[f"{p}.{k}"]) for p, k, _ in STEP_COLUMNS]
        lines.append(f"| {r['step']} | " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


def per_world_table(worlds: Sequence[World], rows: Sequence[str], keys: Sequence[str]) -> str:
    """Every world's value of ``keys`` for each row (to see the spread behind the means)."""
    head = "| model | world | " + " | ".join(METRICS[k][0] for k in keys) + " |\n"
    head += "|---" * (2 + len(keys)) + "|\n"
    lines = []
    for row in rows:
        for w in worlds:
            s = _summary_of(w, row)
            if s is None:
                continue
            cells = ["–" if s.get(k) is None else f"{s[k]:.3f}" for k in keys]
            lines.append(f"| {row} | {w['seed']} | " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"


def holds_everywhere(comparison: Mapping[str, Any], metric: str, sign: int, margin: float = 0.0) -> bool:
    """Whether ``sign * difference > margin`` in every world of ``comparison[metric]``."""
    values = comparison.get(metric, {}).get("values", [])
    return bool(values) and all(sign * v > margin for v in values)


def verdict_table(table: Mapping[str, Mapping[str, Any]]) -> str:
    """One row per method, one column per attack of :data:`VERDICTS`: the verdict and the mean ± std."""
    attacks = list(VERDICTS)
    head = "| model | " + " | ".join(attacks) + " |\n" + "|---" * (1 + len(attacks)) + "|\n"
    lines = []
    for row, per_attack in table.items():
        cells = []
        for a in attacks:
            v = per_attack.get(a)
            cells.append("–" if v is None else f"{v['verdict']} ({fmt(v['stat'], 2, n_of=v['of'])})")
        lines.append(f"| {row} | " + " | ".join(cells) + " |")
    return head + "\n".join(lines) + "\n"
