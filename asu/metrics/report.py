"""What an evaluation leaves behind for people and programs: the files and the one-screen table."""

from __future__ import annotations

import math
import os
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from asu.files import atomic_write_json, atomic_write_text

#: The names the demo and earlier versions used (``forget_rouge`` for ``forget_Q_A_ROUGE``, likewise for
#: retain and ``Prob``), kept in ``summary`` as aliases of open-unlearning's.
LEGACY_SUMMARY_KEYS = {
    f"{split}_{metric.lower()}": f"{split}_Q_A_{metric}"
    for metric in ("ROUGE", "Prob")
    for split in ("forget", "retain")
}


#: A set whose share of degenerate answers (``S_degenerate_answers``) reaches this gets a warning line above
#: the table: from a quarter of the answers on, the set's generation metrics mostly score no answer at all.
DEGENERATE_WARNING = 0.25
_DEGENERATE = "_degenerate_answers"


def _count(entry: dict[str, Any] | None) -> int:
    """How many rows of a 0/1 ``score`` entry are 1."""
    return round(sum(v["score"] for v in (entry or {}).get("value_by_index", {}).values()))


def degenerate_warnings(metrics: dict[str, Any], threshold: float = DEGENERATE_WARNING) -> list[str]:
    """One line per set whose ``S_degenerate_answers`` share is at least ``threshold``: how many of its
    answers are degenerate, empty and stop at once, and what that does to the set's numbers."""
    out = []
    for key, entry in metrics.items():
        share = entry.get("agg_value") if key.endswith(_DEGENERATE) else None
        if share is None or not share >= threshold:
            continue
        split = key[: -len(_DEGENERATE)]
        n = len(entry["value_by_index"])
        empty, immediate = (_count(metrics.get(f"{split}_{k}")) for k in ("empty_answers", "immediate_stop"))
        effect = (
            "its ROUGE, fact leakage and fluency score silence or babble, not forgetting"
            if split.startswith("forget")
            else "its ROUGE and fact numbers score silence or babble"
        )
        out.append(
            f"{split}: {_count(entry)} of {n} answers ({share:.0%}) are degenerate ({empty} empty, "
            f"{immediate} stop at once); {effect} (teacher-forced probabilities and truth ratios are "
            "unaffected)"
        )
    return out


def _fmt(v: Any) -> str:
    if v is None:
        return ""
    if not isinstance(v, (int, float)) or not math.isfinite(v):
        return str(v)
    return f"{v:.3g}" if (abs(v) < 1e-3 and v != 0) or abs(v) >= 1e3 else f"{v:.3f}"


def markdown_table(columns: dict[str, dict[str, float]], metric_names: Sequence[str] | None = None) -> str:
    """A markdown table with one row per metric and one column per named summary."""
    names = list(metric_names) if metric_names is not None else []
    if not names:
        for summary in columns.values():
            names += [k for k in summary if k not in names]
    head = "| metric | " + " | ".join(columns) + " |\n|---|" + "---|" * len(columns) + "\n"
    body = "".join(f"| {n} | " + " | ".join(_fmt(s.get(n)) for s in columns.values()) + " |\n" for n in names)
    return head + body


_DESCRIPTIONS = {
    "Q_A_ROUGE": "ROUGE-L recall of the greedy answer",
    "Q_A_Prob": "answer probability exp(-mean NLL)",
    "Q_A_Prob_normalised": "answer probability / all options'",
    "Truth_Ratio": "truth ratio, mean max(0, 1 - TR)",
    "truth_ratio": "truth ratio, mean min(TR, 1/TR)",
    "knowmem_ROUGE": "KnowMem: ROUGE-L F1 of few-shot answers",
    "verbmem_ROUGE": "VerbMem: ROUGE-L F1 of continuations",
    "fact_leakage_any": "answers stating at least one true fact",
    "fact_leakage_all": "answers stating all their true facts",
    "forget_quality": "KS p-value of forget TR vs the reference",
    "model_utility": "harmonic mean of retain / general parts",
    "extraction_strength": "1 - k/n, k the first all-right suffix",
    "extraction_strength_paper": "the same, 0 when the last token is wrong",
    "exact_memorization": "answer tokens predicted right",
    "mia_min_k": "MIA AUC, min-k% (k 0.4): 0.5 = unseen",
    "mia_min_k_plus_plus": "MIA AUC, min-k%++",
    "mia_loss": "MIA AUC, loss",
    "mia_zlib": "MIA AUC, loss / zlib length",
    "privleak": "(1-AUC) vs the reference's, %: 0 = as private",
    "forget_token_entropy": "normalised token entropy of forget answers",
    "forget_no_repeat": "forget answers non-empty, no repeated 3-gram",
    "forget_well_formed": "forget answers in the world's grammar",
    "degenerate_answers": "answers empty, without letters, or looping",
    "empty_answers": "answers empty (whitespace, or an opener then end of turn)",
    "immediate_stop": "answers whose first token is EOS / end of turn",
    # asu eval --attack (asu.attacks): the robustness scores.
    "relearn_R": "relearning vs the reference's: min(Δref/Δmodel, 1)",
    "relearn_split_R": "the same, trained on half, scored on the rest",
    "Q": "quantization: min(before/after, 1)",
    "robustness": "harmonic mean of relearn_R and quant_nf4_Q",
}


def _describe(name: str) -> str:
    if name in _DESCRIPTIONS:
        return _DESCRIPTIONS[name]
    for suffix in sorted(_DESCRIPTIONS, key=len, reverse=True):
        if name.endswith("_" + suffix):
            return _DESCRIPTIONS[suffix]
    return ""


def _table_names(result: dict[str, Any]) -> list[str]:
    """The rows of the table for people: the headline metrics, then each other set's probability, ROUGE and
    truth ratio (the parts of model utility), then asu's additions."""
    names = list(result["headline"])
    parts = ("_Q_A_ROUGE", "_Prob_normalised", "_Truth_Ratio", "_knowmem_ROUGE")
    for key in result["logs"]:
        if key not in names and (
            key == "retain_Q_A_Prob" or (key.endswith(parts) and not key.startswith("forget_"))
        ):
            names.append(key)
    breakdown = ("_empty_answers", "_immediate_stop")
    for key in result["extras"]:
        # the shares of empty answers only where there are some (they are part of the degenerate share)
        if key not in names and not (key.endswith(breakdown) and not result["summary"].get(key)):
            names.append(key)
    names += [k for k in result.get("added", ()) if k not in names]  # other currencies: closer-look, lm-eval
    return [n for n in names if result["summary"].get(n) is not None]


def summary_table(result: dict[str, Any], title: str | None = None) -> str:
    """The one-screen markdown table of an evaluation: the warnings (:func:`degenerate_warnings`), then
    metric, value, what it measures; then the notes."""
    lines = [f"### {title or result['benchmark'] + ' evaluation'}", ""]
    for warning in result.get("warnings") or ():
        lines += [f"**Warning:** {warning}", ""]
    lines += ["| metric | value | meaning |", "|---|---|---|"]
    described = result.get("descriptions") or {}
    lines += [
        f"| {n} | {_fmt(result['summary'][n])} | {described.get(n) or _describe(n)} |"
        for n in _table_names(result)
    ]
    if result["notes"]:
        lines += [""] + [f"* {n}" for n in result["notes"]]
    return "\n".join(lines) + "\n"


def write_results(
    result: dict[str, Any], out_dir: str | os.PathLike[str], title: str | None = None
) -> list[Path]:
    """``{TOFU,MUSE}_EVAL.json`` and ``_SUMMARY.json`` (open-unlearning's layout, keys sorted, indent 4; left
    out when no open-unlearning metric was computed), ``ASU_EVAL.json``, ``summary.json``, ``summary.md``,
    ``generations.json`` and the result's other ``files`` (name -> object: closer-look's, lm-eval's) under
    ``out_dir``, each written atomically; returns their paths."""
    out, bench = Path(out_dir), result["benchmark"]
    summary = {k: v for k, v in result["summary"].items() if k not in LEGACY_SUMMARY_KEYS}
    written = []
    if result["logs"]:
        written += [
            atomic_write_json(out / f"{bench}_EVAL.json", dict(sorted(result["logs"].items())), indent=4),
            atomic_write_json(
                out / f"{bench}_SUMMARY.json", dict(sorted(result["headline"].items())), indent=4
            ),
        ]
    return written + [
        atomic_write_json(out / "ASU_EVAL.json", dict(sorted(result["extras"].items())), indent=4),
        atomic_write_json(out / "summary.json", summary),
        atomic_write_json(out / "generations.json", result["generations"]),
        atomic_write_text(out / "summary.md", summary_table(result, title)),
        *(atomic_write_json(out / name, obj, indent=4) for name, obj in (result.get("files") or {}).items()),
    ]
