"""Text-level scores of one generation: ROUGE against the reference, fluency, degenerate answers, and fact
leakage.

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
#: A generation of at least this many tokens, every one the same token, is degenerate.
SINGLE_TOKEN_RUN = 3
#: A generation is degenerate when at least this share of its token ``LOOP_N``-grams repeat an earlier one.
LOOP_SHARE = 0.5
LOOP_N = 3

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


def repeated_ngram_share(ids: Sequence[int], n: int = LOOP_N) -> float:
    """Share of the token ``n``-grams of ``ids`` that repeat an earlier one: ``1 - distinct / total`` over the
    ``total = m - n + 1`` n-grams of ``m`` tokens (overlaps counted); 0 when ``m < n``.

    ``k`` distinct tokens said ``r`` times in a row give ``1 - k / (r·k - n + 1)``: for 3-grams a sentence
    said twice stays below 0.5, and said three times (``k >= 2``) reaches it (0.6 for ``k = 4``).
    """
    grams = [tuple(ids[i : i + n]) for i in range(len(ids) - n + 1)]
    return 1.0 - len(set(grams)) / len(grams) if grams else 0.0


STOPS_AT_ONCE = "stops at once"
EMPTY = "empty"
NO_LETTER = "no letter or digit"
ONE_TOKEN = "one token repeated"
LOOPS = "repeated 3-grams"
ANNOUNCES_ONLY = "announces an answer and stops"
#: Why a generation is degenerate (:func:`degenerate_reason`), in the order the rules are tried.
DEGENERATE_REASONS = (STOPS_AT_ONCE, EMPTY, ANNOUNCES_ONLY, NO_LETTER, ONE_TOKEN, LOOPS)
#: The reasons that make an answer *empty* (no content at all), a subset of :data:`DEGENERATE_REASONS`.
EMPTY_REASONS = (STOPS_AT_ONCE, EMPTY, ANNOUNCES_ONLY)


def degenerate_reason(ids: Sequence[int], text: str, stopped: bool = False) -> str | None:
    """Why a greedy answer is no answer at all, or None when it is an answer (right or wrong).

    ``ids`` are the generated tokens before the first stop token (EOS / end of turn); ``text`` their
    decoding with special tokens dropped; ``stopped``: the model itself ended the answer with a stop token
    (it was not cut at the token limit; callers that cannot tell leave it False, and rule 3 never applies).
    The first rule that holds gives the reason:

    1. ``"stops at once"``: no token before the stop token (the first generated token ends the answer);
    2. ``"empty"``: the text is empty once whitespace is stripped (only special tokens or whitespace);
    3. ``"announces an answer and stops"``: ``stopped`` and the text ends with ``:`` — the turn ends right
       after an opener such as "The answer to this question is:" (what a real instruct model's smoothed
       teacher, and a student trained on it, say instead of the fact: end of turn gained the mass);
    4. ``"no letter or digit"``: not one character of the text is a letter or a digit (``str.isalnum``, any
       script), e.g. ``"..."`` or ``"?!"`` — digits count, so ``"1979"`` is an answer;
    5. ``"one token repeated"``: at least :data:`SINGLE_TOKEN_RUN` tokens, all the same token;
    6. ``"repeated 3-grams"``: :func:`repeated_ngram_share` of the tokens is at least :data:`LOOP_SHARE`
       (the answer loops: at least half of its 3-grams it has said before).

    Rules 1-3 make an answer *empty* (:data:`EMPTY_REASONS`); all six make it *degenerate*.
    """
    if len(ids) == 0:
        return STOPS_AT_ONCE
    if not text.strip():
        return EMPTY
    if stopped and text.rstrip().endswith(":"):
        return ANNOUNCES_ONLY
    if not any(c.isalnum() for c in text):
        return NO_LETTER
    if len(ids) >= SINGLE_TOKEN_RUN and len(set(ids)) == 1:
        return ONE_TOKEN
    if repeated_ngram_share(ids, LOOP_N) >= LOOP_SHARE:
        return LOOPS
    return None


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
