"""The meta-evaluation's robustness scores (open-unlearning, arXiv 2506.12618, section 4), and their guards.

``m`` is a forget-knowledge metric: higher means the model shows more of the forget set. asu reports the
scores for ``forget_Q_A_Prob`` (the meta-evaluation's "Prob", :data:`PRIMARY_METRIC`: teacher-forced,
continuous, no generation) and for ``forget_Q_A_ROUGE`` (ROUGE-L recall of the greedy answer).

Relearning, ``R = min((m_ret_after − m_ret_before) / (m_unl_after − m_unl_before), 1)``
    ``unl``: the unlearned model, ``ret``: the retain-only (oracle) model, each fine-tuned on the forget set
    with the same protocol. R < 1 when the unlearned model regains more than a model that never saw the forget
    set gains by learning it: its forgetting hid the knowledge rather than removed it.
    Guards (the formula leaves them open): when the unlearned model gains nothing (``m_unl_after −
    m_unl_before <= 0``) nothing came back, ``R = 1``; when it gains and the oracle loses (a negative ratio),
    ``R = 0``, so R stays in [0, 1] and the harmonic mean below is defined.

Quantization, ``Q = min(m_unl_before / m_unl_after, 1)``
    ``after``: the quantized model. Q < 1 when quantization brings knowledge back. Guards:
    ``m_unl_after <= 0`` (nothing to recover after quantization) gives ``Q = 1``;
    ``m_unl_before <= 0 < m_unl_after`` gives ``Q = 0``.

Robustness, the harmonic mean ``2 R Q / (R + Q)`` (0 when either is 0; undefined when either is).
"""

from __future__ import annotations

import math
from typing import Any

__all__ = ["PRIMARY_METRIC", "SCORED_METRICS", "quant_score", "relearn_score", "robustness_score"]

PRIMARY_METRIC = "forget_Q_A_Prob"
SCORED_METRICS = ("forget_Q_A_Prob", "forget_Q_A_ROUGE")


def _finite(*values: Any) -> bool:
    return all(isinstance(v, (int, float)) and not isinstance(v, bool) and math.isfinite(v) for v in values)


def relearn_score(unl_before: Any, unl_after: Any, ret_before: Any, ret_after: Any) -> float | None:
    """``R`` (see the module docstring); None when a value is missing or not finite."""
    if not _finite(unl_before, unl_after, ret_before, ret_after):
        return None
    gain = unl_after - unl_before
    if gain <= 0:
        return 1.0
    return max(0.0, min((ret_after - ret_before) / gain, 1.0))


def quant_score(before: Any, after: Any) -> float | None:
    """``Q`` (see the module docstring); None when a value is missing or not finite."""
    if not _finite(before, after):
        return None
    if after <= 0:
        return 1.0
    if before <= 0:
        return 0.0
    return min(before / after, 1.0)


def robustness_score(r: float | None, q: float | None) -> float | None:
    """The harmonic mean of ``R`` and ``Q``; None when either is None."""
    if r is None or q is None:
        return None
    return 0.0 if r <= 0 or q <= 0 else 2 * r * q / (r + q)
