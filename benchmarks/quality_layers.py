"""Which layers to smooth: per-layer attention KL on forget versus retain answers (``asu inspect``'s).

For each layer, ``asu.inspection.inspect_model`` gives the mean over heads and answer rows of
``KL(softmax(q k^T s / τ) || softmax(q k^T s))``: how much smoothing at τ changes that layer's attention. Its
difference between the forget rows and the retain rows says where forget and retain attention respond
differently to smoothing. The selection tested by the quality benchmark smooths the ``k`` layers with the
largest forget - retain difference (``k`` = half the layers, rounded up).
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

from asu.data import encode_rows
from asu.inspection import inspect_model, tau_key

__all__ = ["attention_gap", "top_layers"]


def attention_gap(
    model: Any,
    tokenizer: Any,
    forget: Sequence[dict[str, Any]],
    retain: Sequence[dict[str, Any]],
    temperature: float,
    max_rows: int = 64,
) -> dict[str, Any]:
    """``{"temperature", "forget_kl", "retain_kl", "gap"}``: per layer (mean over heads), the smoothing KL on
    the forget answers, on the retain answers (the first ``max_rows`` of each set) and their difference."""
    examples = {
        "forget": encode_rows(tokenizer, list(forget[:max_rows]), 128),
        "retain": encode_rows(tokenizer, list(retain[:max_rows]), 128),
    }
    report = inspect_model(model, examples, temperatures=[temperature], layers="all")
    key = tau_key(temperature)
    per_layer = {
        name: [sum(heads) / len(heads) for heads in report["sets"][name]["kl"][key]] for name in examples
    }
    gap = [f - r for f, r in zip(per_layer["forget"], per_layer["retain"], strict=True)]
    return {
        "temperature": temperature,
        "layers": report["layers"],
        "forget_kl": per_layer["forget"],
        "retain_kl": per_layer["retain"],
        "gap": gap,
    }


def top_layers(gap: Sequence[float], k: int | None = None) -> list[int]:
    """The ``k`` layers with the largest gap (default half of them, rounded up), in layer order."""
    k = math.ceil(len(gap) / 2) if k is None else k
    if not 1 <= k <= len(gap):
        raise ValueError(f"k must be in [1, {len(gap)}], got {k}")
    order = sorted(range(len(gap)), key=lambda i: gap[i], reverse=True)
    return sorted(order[:k])
