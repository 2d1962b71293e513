"""open-unlearning's result layout: the entry of each metric, and reading a reference evaluation.

Every metric is an entry ``{"agg_value": float | None, "value_by_index": {"0": {...}, "1": {...}, ...}}``
(row indices as strings, in row order), the per-row object named as open-unlearning names it: ``prob`` and
``avg_loss`` (probability; lists for the several perturbed answers of a row), ``score`` (truth ratio,
extraction strength, exact memorisation, MIA scores), ``rouge1_recall`` / ``rougeL_f1`` / ``rougeL_recall``
with ``input`` / ``ground_truth`` / ``generation`` (ROUGE). Aggregates (``forget_quality``,
``model_utility``, ``privleak``) are ``{"agg_value": float}`` only; an MIA metric is
``{"forget": entry, "holdout": entry, "auc": float, "agg_value": float}``.
"""

from __future__ import annotations

import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from asu.metrics import privacy, tofu
from asu.metrics.scoring import TokenScores
from asu.metrics.text import (
    EMPTY_REASONS,
    STOPS_AT_ONCE,
    degenerate_reason,
    fact_leakage,
    has_repeat,
    token_entropy,
)

# ------------------------------------------------------------------------------------------- reference


@dataclass(frozen=True)
class Reference:
    """What a later run needs of the reference (retain-only) model's evaluation."""

    truth_ratios: list[float] | None
    """Per forget row, its truth ratio (``forget_truth_ratio``): forget quality's reference sample."""
    mia_min_k_auc: float | None
    """Its ``mia_min_k`` AUC: privleak's reference."""


def load_reference_stats(path: str | os.PathLike[str]) -> dict[str, Any]:
    """The JSON of a reference evaluation: ``TOFU_EVAL.json`` / ``MUSE_EVAL.json`` (asu's or
    open-unlearning's; a directory holding one is accepted) or a legacy statistics file
    (``{"truth_ratio": {index: value}}``)."""
    p = Path(path)
    if p.is_dir():
        found = [p / n for n in ("TOFU_EVAL.json", "MUSE_EVAL.json") if (p / n).is_file()]
        if not found:
            raise FileNotFoundError(f"reference directory {p} holds no TOFU_EVAL.json or MUSE_EVAL.json")
        p = found[0]
    if not p.is_file():
        raise FileNotFoundError(f"reference not found: {p}")
    try:
        obj = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: not valid JSON ({e})") from None
    reference_from(obj, str(p))
    return obj


def _finite(v: Any) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v)


def reference_from(obj: Any, name: str = "reference", n_forget: int | None = None) -> Reference:
    """The reference's forget truth ratios and MIA AUC from an evaluation in open-unlearning's layout
    (``forget_truth_ratio`` / ``mia_min_k`` entries) or a legacy statistics dict (``truth_ratio``).

    With ``n_forget`` the number of truth ratios must match the forget rows (same forget set)."""
    if obj is None:
        return Reference(None, None)
    if not isinstance(obj, dict):
        raise ValueError(f"{name}: expected a JSON object, got {type(obj).__name__}")
    if "forget_truth_ratio" in obj or "mia_min_k" in obj:
        ratios = None
        if "forget_truth_ratio" in obj:
            by_index = (obj["forget_truth_ratio"] or {}).get("value_by_index")
            if not isinstance(by_index, dict) or not by_index:
                raise ValueError(f"{name}: forget_truth_ratio has no value_by_index")
            ratios = [v.get("score") if isinstance(v, dict) else v for _, v in _by_int_key(by_index, name)]
        auc = (obj.get("mia_min_k") or {}).get("agg_value")
        if auc is not None and not _finite(auc):
            raise ValueError(f"{name}: mia_min_k agg_value {auc!r} is not a number")
    elif isinstance(obj.get("truth_ratio"), dict):
        validate_stats(obj, name)
        ratios, auc = stats_values(obj), None
    else:
        raise ValueError(
            f"{name}: expected an evaluation in open-unlearning's layout (TOFU_EVAL.json with "
            "forget_truth_ratio, or with mia_min_k) or a statistics file with a 'truth_ratio' mapping"
        )
    if ratios is not None:
        _check_truth_ratios(
            {f"truth ratio of forget row {i}": v for i, v in enumerate(ratios)}, n_forget, name
        )
    return Reference([float(v) for v in ratios] if ratios is not None else None, auc)


def _by_int_key(mapping: dict[str, Any], name: str) -> list[tuple[int, Any]]:
    try:
        return sorted(((int(k), v) for k, v in mapping.items()), key=lambda kv: kv[0])
    except ValueError:
        raise ValueError(f"{name}: value_by_index keys must be row indices") from None


def validate_stats(stats: Any, name: str = "reference statistics", n_items: int | None = None) -> None:
    """A legacy statistics dict needs ``truth_ratio``: row index -> finite float (``n_items`` of them)."""
    if not isinstance(stats, dict) or not isinstance(stats.get("truth_ratio"), dict):
        raise ValueError(f"{name}: expected an object with a 'truth_ratio' mapping of item index -> value")
    _check_truth_ratios({f"truth_ratio[{k!r}]": v for k, v in stats["truth_ratio"].items()}, n_items, name)


def _check_truth_ratios(labelled: dict[str, Any], n_forget: int | None, name: str) -> None:
    """Every reference truth ratio (label -> value) is a finite number and, with ``n_forget``, there is one
    per forget row (the reference comes from the same forget set)."""
    for label, v in labelled.items():
        if not _finite(v):
            raise ValueError(f"{name}: {label} is {v!r}, not a finite number")
    if n_forget is not None and len(labelled) != n_forget:
        raise ValueError(
            f"{name}: {len(labelled)} reference truth ratios but {n_forget} forget rows; the reference "
            "must come from the same forget set"
        )


def stats_values(stats: dict[str, dict[str, float]], key: str = "truth_ratio") -> list[float]:
    """The per-item values of one legacy statistic, ordered by integer index."""
    return [float(v) for _, v in _by_int_key(stats[key], key)]


# ------------------------------------------------------------------------------- entries in the layout


def _mean(values: Sequence[float | None]) -> float:
    kept = [v for v in values if v is not None]
    return float(np.mean(kept)) if kept else float("nan")


def _by_index(items: Sequence[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    return {str(i): item for i, item in enumerate(items)}


def score_entry(values: Sequence[float | None]) -> dict[str, Any]:
    """``{"agg_value": mean (None left out), "value_by_index": {i: {"score": v}}}``."""
    return {"agg_value": _mean(values), "value_by_index": _by_index([{"score": v} for v in values])}


def prob_entry(scores: Sequence[TokenScores]) -> dict[str, Any]:
    """open-unlearning's ``probability`` of one answer per row."""
    items = [{"prob": tofu.probability(s.avg_loss), "avg_loss": s.avg_loss} for s in scores]
    return {"agg_value": _mean([it["prob"] for it in items]), "value_by_index": _by_index(items)}


def options_entry(scores: Sequence[Sequence[TokenScores]]) -> dict[str, Any]:
    """``probability`` of several answers per row: lists per row; aggregate the mean of the row means."""
    items = [
        {"prob": [tofu.probability(s.avg_loss) for s in row], "avg_loss": [s.avg_loss for s in row]}
        for row in scores
    ]
    return {
        "agg_value": _mean([float(np.mean(it["prob"])) for it in items]),
        "value_by_index": _by_index(items),
    }


def truth_ratio_entry(
    correct: Sequence[TokenScores], wrong: Sequence[Sequence[TokenScores]], aggregate: Callable
) -> dict[str, Any]:
    ratios = [
        tofu.truth_ratio(c.avg_loss, [w.avg_loss for w in ws]) for c, ws in zip(correct, wrong, strict=True)
    ]
    return {"agg_value": aggregate(ratios), "value_by_index": _by_index([{"score": r} for r in ratios])}


def normalised_entry(
    correct: Sequence[TokenScores], wrong: Sequence[Sequence[TokenScores]]
) -> dict[str, Any]:
    probs = [
        tofu.normalised_probability(tofu.probability(c.avg_loss), [tofu.probability(w.avg_loss) for w in ws])
        for c, ws in zip(correct, wrong, strict=True)
    ]
    return {"agg_value": _mean(probs), "value_by_index": _by_index([{"prob": p} for p in probs])}


def rouge_entry(generations: Sequence[dict[str, Any]], key: str) -> dict[str, Any]:
    """open-unlearning's ``rouge``: per row the three ROUGE numbers, input, ground truth and generation;
    aggregate the mean of ``key`` (``rougeL_recall`` for TOFU, ``rougeL_f1`` for MUSE)."""
    items = [{k: v for k, v in g.items() if k not in ("ids", "stopped")} for g in generations]
    return {"agg_value": _mean([it[key] for it in items]), "value_by_index": _by_index(items)}


def mia_entries(tokenizer: Any, forget: Sequence[TokenScores], holdout: Sequence[TokenScores]) -> dict:
    """``mia_loss``, ``mia_zlib``, ``mia_min_k``, ``mia_min_k_plus_plus``: per set the scores, and the AUC."""
    attacks: dict[str, Callable[[TokenScores], float]] = {
        "mia_loss": lambda s: s.avg_loss,
        "mia_zlib": lambda s: privacy.zlib_score(
            s.avg_loss, tokenizer.decode(s.label_ids, skip_special_tokens=True)
        ),
        # Both min-k attacks leave out the last label token (EOS for QA rows), as open-unlearning does.
        "mia_min_k": lambda s: privacy.min_k_score(s.logprobs[:-1]),
        "mia_min_k_plus_plus": lambda s: privacy.min_k_score(s.standardised[:-1]),
    }
    out = {}
    for name, score in attacks.items():
        f, h = [score(s) for s in forget], [score(s) for s in holdout]
        auc = privacy.mia_auc(f, h)
        out[name] = {"forget": score_entry(f), "holdout": score_entry(h), "auc": auc, "agg_value": auc}
    return out


def memorisation_entries(scores: Sequence[TokenScores]) -> tuple[dict[str, Any], dict[str, Any]]:
    """open-unlearning's ``extraction_strength`` / ``exact_memorization`` (answer tokens without the last
    label, EOS for QA rows), and asu's ``extraction_strength_paper`` on the same tokens."""
    tokens = [list(s.correct[:-1]) for s in scores]
    logs = {
        "extraction_strength": score_entry([tofu.extraction_strength(c) for c in tokens]),
        "exact_memorization": score_entry([tofu.exact_memorization(c) for c in tokens]),
    }
    return logs, {
        "extraction_strength_paper": score_entry([tofu.extraction_strength_paper(c) for c in tokens])
    }


def _empty(generation: dict[str, Any]) -> bool:
    """No answer: whitespace only, or (when the model ended it) an opener such as "The answer is:"."""
    reason = degenerate_reason(generation["ids"], generation["generation"], generation.get("stopped", False))
    return reason in EMPTY_REASONS


def fluency_entries(
    split: str, generations: Sequence[dict[str, Any]], well_formed: Callable[[str], bool] | None
) -> dict[str, Any]:
    """Token entropy, no-repeat fraction and (with a checker) well-formed fraction of the generations.

    An empty answer (nothing but whitespace once special tokens are dropped, or an opener the model ended its
    turn after, :data:`asu.metrics.text.EMPTY_REASONS`) is not fluent: it counts as repeating and is not well
    formed (a whitespace-only answer's token entropy is 0 as well; an opener keeps its own)."""
    out = {
        f"{split}_token_entropy": score_entry([token_entropy(g["ids"]) for g in generations]),
        f"{split}_no_repeat": score_entry(
            [0.0 if _empty(g) or has_repeat(g["ids"]) else 1.0 for g in generations]
        ),
    }
    if well_formed is not None:
        out[f"{split}_well_formed"] = score_entry(
            [0.0 if _empty(g) else float(well_formed(g["generation"])) for g in generations]
        )
    return out


#: The shares of degenerate answers per set, from the narrowest to the widest (each includes the one before).
DEGENERATE_METRICS = ("immediate_stop", "empty_answers", "degenerate_answers")


def degenerate_entries(split: str, generations: Sequence[dict[str, Any]]) -> dict[str, Any]:
    """``{split}_immediate_stop``, ``_empty_answers``, ``_degenerate_answers``: per row 1.0 / 0.0 and the
    share over rows, by :func:`asu.metrics.text.degenerate_reason` (each row of ``_degenerate_answers`` also
    carries its ``reason``, or None). A generation's ``stopped`` (the model ended it: not cut at the token
    cap) lets an answer that only announces one count as empty."""
    reasons = [degenerate_reason(g["ids"], g["generation"], g.get("stopped", False)) for g in generations]
    flags = {
        "immediate_stop": [float(r == STOPS_AT_ONCE) for r in reasons],
        "empty_answers": [float(r in EMPTY_REASONS) for r in reasons],
        "degenerate_answers": [float(r is not None) for r in reasons],
    }
    out = {f"{split}_{k}": score_entry(v) for k, v in flags.items()}
    for i, r in enumerate(reasons):
        out[f"{split}_degenerate_answers"]["value_by_index"][str(i)]["reason"] = r
    return out


def leakage_entries(
    split: str, rows: Sequence[dict], generations: Sequence[dict[str, Any]]
) -> dict[str, Any]:
    """``{split}_fact_leakage_any`` / ``_all`` when the rows carry ``facts``."""
    if not rows or "facts" not in rows[0]:
        return {}
    leak = fact_leakage([g["generation"] for g in generations], [r["facts"] for r in rows])
    return {f"{split}_fact_leakage_{k}": score_entry(v) for k, v in leak.items()}
