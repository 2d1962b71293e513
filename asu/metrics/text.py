"""Text-level scores of one generation: ROUGE against the reference, fluency, and fact leakage.

ROUGE comes from ``rouge_score`` (imported on first use, so importing this module needs only the standard
library and numpy). Its tokenizer lowercases, keeps runs of ``[a-z0-9]`` and, with the stemmer, Porter-stems
words longer than three letters. For a reference of ``m`` words, a prediction of ``n`` words and ``l`` the
length of their longest common subsequence: ROUGE-L recall ``l / m``, precision ``l / n``, F1 their
harmonic mean; ROUGE-1 counts shared unigrams instead of the LCS.
"""

from __future__ import annotations

import math
import re
from collections.abc import Sequence
from typing import Any

import numpy as np

REPEAT_N = 3
REPEAT_WINDOW = 10

_SCORERS: dict[bool, Any] = {}


def rouge_scores(reference: str, prediction: str, use_stemmer: bool = True) -> dict[str, float]:
    """``{"rouge1_recall", "rougeL_f1", "rougeL_recall"}`` of ``prediction`` against ``reference``.

    The three numbers open-unlearning stores per row (its ``eval_text_similarity``); the stemmer is on there
    (TOFU, MUSE in open-unlearning) and off in MUSE's own code.
    """
    scorer = _SCORERS.get(use_stemmer)
    if scorer is None:
        from rouge_score import rouge_scorer

        scorer = _SCORERS[use_stemmer] = rouge_scorer.RougeScorer(
            ["rouge1", "rougeL"], use_stemmer=use_stemmer
        )
    s = scorer.score(reference, prediction)
    return {
        "rouge1_recall": float(s["rouge1"].recall),
        "rougeL_f1": float(s["rougeL"].fmeasure),
        "rougeL_recall": float(s["rougeL"].recall),
    }


def rouge_l_recall(reference: str, prediction: str) -> float:
    """ROUGE-L recall of ``prediction`` against ``reference`` (LCS / reference length, stemmed words)."""
    return rouge_scores(reference, prediction)["rougeL_recall"]


def token_entropy(ids: Sequence[int]) -> float:
    """Normalised entropy of the token frequencies of one generation of ``m`` tokens:
    ``-(1/log m) Σ_w (c_w/m) log(c_w/m)``; 1 when all tokens differ, 0 when ``m < 2``."""
    m = len(ids)
    if m < 2:
        return 0.0
    _, counts = np.unique(np.asarray(ids), return_counts=True)
    f = counts / m
    return float(-(f * np.log(f)).sum() / math.log(m))


def has_repeat(ids: Sequence[int], n: int = REPEAT_N, window: int = REPEAT_WINDOW) -> bool:
    """Whether some token n-gram occurs twice (overlaps allowed) among the first ``window`` tokens."""
    head = list(ids[:window])
    grams = [tuple(head[i : i + n]) for i in range(len(head) - n + 1)]
    return len(set(grams)) < len(grams)


def words(text: str) -> list[str]:
    """Lowercased runs of letters and digits: ``'The "Silent Harbor", 1979.'`` -> the silent harbor 1979."""
    return re.findall(r"[a-z0-9]+", text.lower())


def states_fact(generation: str, fact: str) -> bool:
    """Whether the word sequence of ``fact`` occurs, contiguous and whole-word, in ``generation``'s.

    Case, punctuation and spacing are ignored (``words``); a fact never matches part of a word ("baker" is
    not stated by "bakery").
    """
    target = words(fact)
    if not target:
        raise ValueError(f"fact {fact!r} has no letters or digits to look for")
    have = words(generation)
    n = len(target)
    return any(have[i : i + n] == target for i in range(len(have) - n + 1))


def fact_leakage(generations: Sequence[str], facts: Sequence[Sequence[str]]) -> dict[str, list[float]]:
    """Per row, whether its generation still states its true facts: ``{"any": [...], "all": [...]}``.

    Row ``i`` with facts ``F_i`` (non-empty) and generation ``g_i``: ``any_i = 1`` when ``g_i`` states at
    least one fact of ``F_i`` (:func:`states_fact`), ``all_i = 1`` when it states every one; else 0. The
    means over rows are the fractions of answers that leak some / all of what was to be forgotten.
    """
    if len(generations) != len(facts):
        raise ValueError(f"{len(generations)} generations but {len(facts)} fact lists")
    out: dict[str, list[float]] = {"any": [], "all": []}
    for i, (g, fs) in enumerate(zip(generations, facts, strict=True)):
        if isinstance(fs, str) or not fs:
            raise ValueError(f"row {i}: 'facts' must be a non-empty list of strings, got {fs!r}")
        stated = [states_fact(g, f) for f in fs]
        out["any"].append(float(any(stated)))
        out["all"].append(float(all(stated)))
    return out
