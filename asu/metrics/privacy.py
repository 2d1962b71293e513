"""Membership inference on the forget set against a holdout set, and ``privleak``, as open-unlearning defines
them (``src/evals/metrics/mia/*.py``, ``privacy.py``).

Every score is signed like a loss: higher means "less likely a training member". Per sample, over its label
tokens ``t = 1..n`` (for QA rows the answer and EOS; the prompt never counts):

* **LOSS**: the per-token mean NLL ``L`` (EOS included).
* **zlib**: ``L / len(zlib.compress(text))``, ``text`` the decoded label tokens (UTF-8 bytes).
* **min-k%**: with ``lp_t = log p(x_t | x_<t)`` over the label tokens *without* the last one (EOS for QA
  rows), the negated mean of the ``max(1, floor(k m))`` smallest of the ``m`` values; 0 when ``m = 0``.
* **min-k%++**: the same over ``z_t = (lp_t - mu_t) / sigma_t``, with ``mu_t = Σ_v p_v log p_v`` and
  ``sigma_t^2 = max(Σ_v p_v (log p_v)^2 - mu_t^2, 1e-6)`` the mean and variance of the log-probability of a
  token drawn from the model's next-token distribution at ``t``.

``k = 0.4`` for both (open-unlearning's TOFU and MUSE configs). The attack's **AUC** is the ROC AUC of the
scores with the forget samples labelled 0 and the holdout samples 1: the probability that a holdout sample
scores above a forget sample, ties counting one half (``sklearn.metrics.roc_auc_score``). 0.5 means the model
cannot tell forget from holdout, 1 that it has seen the forget samples.

**privleak** compares the AUC with a reference (retain-only) model's, in MUSE's orientation (``1 - AUC``):
``((1 - auc) - (1 - ref)) / ((1 - ref) + 1e-10) * 100``; without a reference, ``ref = 0.5``.
"""

from __future__ import annotations

import math
import zlib
from collections.abc import Sequence

import numpy as np

MIN_K = 0.4
DEFAULT_REFERENCE_AUC = 0.5
GUARD = 1e-10


def zlib_score(avg_loss: float, text: str) -> float:
    """``L / len(zlib.compress(text.encode("utf-8")))``."""
    return float(avg_loss / len(zlib.compress(text.encode("utf-8"))))


def min_k_score(values: Sequence[float], k: float = MIN_K) -> float:
    """``-mean`` of the ``max(1, floor(k m))`` smallest of ``m`` per-token values; 0 when ``m = 0``.

    ``values`` are token log-probabilities (min-k%) or their standardised form (min-k%++).
    """
    if not 0.0 < k <= 1.0:
        raise ValueError(f"k must be in (0, 1], got {k}")
    v = np.sort(np.asarray(values, dtype=float))
    if v.size == 0:
        return 0.0
    return float(-np.mean(v[: max(1, int(v.size * k))]))


def roc_auc(labels: Sequence[int], scores: Sequence[float]) -> float:
    """ROC AUC of binary ``labels`` (0/1) against ``scores``: the Mann-Whitney statistic of the positives.

    ``(R_1 - n_1 (n_1 + 1) / 2) / (n_1 n_0)`` with ``R_1`` the sum of the positives' ranks among all scores,
    ties given their average rank (so a tie counts one half), as ``sklearn.metrics.roc_auc_score``.
    """
    from scipy.stats import rankdata

    y = np.asarray(labels)
    s = np.asarray(scores, dtype=float)
    if y.shape != s.shape or y.ndim != 1:
        raise ValueError(f"labels {y.shape} and scores {s.shape} must be two 1-D arrays of one length")
    if not set(np.unique(y).tolist()) <= {0, 1}:
        raise ValueError("labels must be 0 or 1")
    n1 = int((y == 1).sum())
    n0 = y.size - n1
    if n1 == 0 or n0 == 0:
        raise ValueError("roc_auc needs both classes (forget and holdout samples)")
    if not np.isfinite(s).all():
        raise ValueError("roc_auc: scores must be finite")
    ranks = rankdata(s)  # average ranks for ties
    return float((ranks[y == 1].sum() - n1 * (n1 + 1) / 2.0) / (n1 * n0))


def mia_auc(forget_scores: Sequence[float], holdout_scores: Sequence[float]) -> float:
    """The attack's AUC: forget samples labelled 0, holdout samples 1 (1 = the forget set is recognised)."""
    labels = [0] * len(forget_scores) + [1] * len(holdout_scores)
    return roc_auc(labels, list(forget_scores) + list(holdout_scores))


def privleak(auc: float, reference_auc: float = DEFAULT_REFERENCE_AUC) -> float:
    """``((1 - auc) - (1 - ref)) / ((1 - ref) + 1e-10) * 100``: the relative gap to the reference model's
    AUC, in percent (0: as private as the reference; negative: the forget set is still recognised)."""
    for name, v in (("auc", auc), ("reference_auc", reference_auc)):
        if not (isinstance(v, (int, float)) and math.isfinite(v) and 0.0 <= v <= 1.0):
            raise ValueError(f"privleak: {name} must be a number in [0, 1], got {v!r}")
    score, ref = 1.0 - auc, 1.0 - reference_auc
    return float((score - ref) / (ref + GUARD) * 100.0)
