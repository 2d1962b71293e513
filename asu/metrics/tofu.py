"""TOFU's metrics, as open-unlearning computes them (``src/evals/metrics/memorization.py``, ``privacy.py``,
``utility.py``), from per-answer losses and per-token correctness.

For an answer ``a`` of ``n`` label tokens (EOS included) after prompt ``x``, teacher-forced, the loss is the
per-token mean NLL ``L(a) = -(1/n) Σ_t log p(a_t | x, a_<t)`` (natural log), and:

* **probability** ``P(a) = exp(-L(a))``; aggregate: the mean over rows (for several answers per row, the
  mean over the row's answers first).
* **normalised probability** (real authors, world facts; ``probability_w_options``):
  ``P(a) / (P(a) + Σ_k P(p_k) + 1e-10)`` over the perturbed answers ``p_k``.
* **truth ratio** (``truth_ratio``, stored per row as false over true):
  ``TR = exp(-mean_k L(p_k)) / (exp(-L(c)) + 1e-10)`` with ``c`` the paraphrased answer on forget / retain
  rows and the answer itself on real-authors / world-facts rows. Aggregates: forget ``closer_to_1_better``
  ``mean(min(TR, 1 / (TR + 1e-10)))``; the others ``true_better`` ``mean(max(0, 1 - TR))``.
* **exact memorisation** (``exact_memorization``): the fraction of answer tokens, EOS excluded, whose
  teacher-forced argmax is the label.
* **extraction strength** (``extraction_strength``): over the answer tokens without EOS, ``1 - k/n`` for the
  smallest ``k`` in ``0..n-1`` whose suffix ``k..n-1`` is predicted entirely right; when not even the last
  token is right, open-unlearning's loop ends at ``k = n-1``, giving ``1/n``.
  :func:`extraction_strength_paper` lets ``k`` reach ``n`` (the empty suffix), giving 0 there, as the
  definition of the paper that introduced the metric (Wang et al., 2025) reads.
* **forget quality** (``ks_test``): the p-value of the two-sample Kolmogorov-Smirnov test between the forget
  truth ratios and the reference (retain-only) model's.
* **model utility** (``hm_aggregate``): the harmonic mean of the nine retain / real-authors / world-facts
  aggregates (probability or normalised probability, ROUGE-L recall, truth ratio).

The ``1e-10`` guards are open-unlearning's and are kept so that numbers match it to the last digit.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Sequence

import numpy as np

GUARD = 1e-10


def probability(avg_loss: float) -> float:
    """``exp(-L)``: the length-normalised probability of an answer from its per-token mean NLL."""
    return math.exp(-avg_loss)


def normalised_probability(correct_prob: float, wrong_probs: Sequence[float]) -> float:
    """``P(a) / (P(a) + Σ_k P(p_k) + 1e-10)``: the answer's share of the probability of all its options."""
    return float(correct_prob / (correct_prob + float(np.sum(wrong_probs)) + GUARD))


def truth_ratio(correct_loss: float, wrong_losses: Sequence[float]) -> float:
    """``exp(-mean_k L(p_k)) / (exp(-L(c)) + 1e-10)`` from per-token mean NLLs (false over true).

    ``correct_loss`` is ``L(c)``, the paraphrased answer's (forget, retain) or the answer's (real authors,
    world facts); ``wrong_losses`` the perturbed answers'.
    """
    if len(wrong_losses) == 0:
        raise ValueError("truth_ratio needs at least one perturbed answer")
    return float(math.exp(-float(np.mean(wrong_losses))) / (math.exp(-correct_loss) + GUARD))


def closer_to_1_better(ratios: Sequence[float]) -> float:
    """Forget aggregate of truth ratios: ``mean(min(TR, 1/(TR + 1e-10)))`` (1 when true and false answers
    are equally likely)."""
    tr = np.asarray(ratios, dtype=float)
    return float(np.mean(np.minimum(tr, 1.0 / (tr + GUARD))))


def true_better(ratios: Sequence[float]) -> float:
    """Retain / general aggregate of truth ratios: ``mean(max(0, 1 - TR))`` (higher: truth preferred)."""
    return float(np.mean(np.maximum(0.0, 1.0 - np.asarray(ratios, dtype=float))))


def exact_memorization(correct: Sequence[bool]) -> float | None:
    """Fraction of ``correct`` (per answer token, EOS already dropped); None for an empty answer, which
    open-unlearning leaves out of the mean."""
    if len(correct) == 0:
        return None
    return float(np.mean(np.asarray(correct, dtype=float)))


def extraction_strength(correct: Sequence[bool]) -> float:
    """open-unlearning's ``1 - k/n``: ``k`` the first index in ``0..n-1`` from which every prediction is
    right, ``n - 1`` when none is (its loop ends there: score ``1/n``); 0 for an empty answer."""
    n = len(correct)
    if n == 0:
        return 0.0
    k = next((k for k in range(n) if all(correct[k:])), n - 1)
    return 1.0 - k / n


def extraction_strength_paper(correct: Sequence[bool]) -> float:
    """``1 - k/n`` with ``k`` the smallest index in ``0..n`` whose suffix is all right (``k = n``, the empty
    suffix, when even the last token is wrong: score 0)."""
    n = len(correct)
    if n == 0:
        return 0.0
    k = n
    while k > 0 and correct[k - 1]:
        k -= 1
    return 1.0 - k / n


def forget_quality(
    truth_ratios: Sequence[float], reference_truth_ratios: Sequence[float]
) -> dict[str, float]:
    """Two-sample KS test of truth ratios against the reference model's: ``{"pvalue", "statistic"}``."""
    from scipy.stats import ks_2samp

    a, b = np.asarray(truth_ratios, dtype=float), np.asarray(reference_truth_ratios, dtype=float)
    if a.size == 0 or b.size == 0:
        raise ValueError("forget_quality needs non-empty truth-ratio samples")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("forget_quality: truth ratios must be finite")
    with warnings.catch_warnings():
        # scipy falls back from the exact p-value to the asymptotic one on large or tied samples and says so;
        # open-unlearning calls ks_2samp the same way and gets the same fallback: the reference's value.
        warnings.filterwarnings("ignore", "ks_2samp: Exact calculation unsuccessful", RuntimeWarning)
        res = ks_2samp(a, b)
    return {"pvalue": float(res.pvalue), "statistic": float(res.statistic)}


def harmonic_mean(values: Sequence[float]) -> float:
    """``n / Σ 1/v`` (``scipy.stats.hmean``); 0 when any value is 0 (a model that fails one part has no
    utility)."""
    v = np.asarray(values, dtype=float)
    if v.size == 0:
        raise ValueError("harmonic_mean of nothing")
    if (v < 0).any() or not np.isfinite(v).all():
        raise ValueError(f"harmonic_mean needs finite values >= 0, got {v.tolist()}")
    if (v == 0).any():
        return 0.0
    return float(v.size / (1.0 / v).sum())
