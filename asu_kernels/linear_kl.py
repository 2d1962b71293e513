"""Fused LM-head + KL(teacher || student) and fused LM-head + cross-entropy: the public entry points.

Semantics are defined in :mod:`asu_kernels.reference` (``linear_kl``, ``linear_cross_entropy``).
"""

from __future__ import annotations

import torch

from asu_kernels import reference


def linear_kl(
    student_hidden: torch.Tensor,
    student_weight: torch.Tensor,
    teacher_hidden: torch.Tensor,
    teacher_weight: torch.Tensor,
    weights: torch.Tensor | None = None,
    student_bias: torch.Tensor | None = None,
    teacher_bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """``sum_i w_i KL(softmax(hT_i WT^T + bT) || softmax(hS_i WS^T + bS))``; mean over rows if no weights."""
    return reference.linear_kl(
        student_hidden,
        student_weight,
        teacher_hidden.detach(),
        teacher_weight.detach(),
        weights,
        student_bias,
        None if teacher_bias is None else teacher_bias.detach(),
    )


def linear_cross_entropy(
    hidden: torch.Tensor,
    weight: torch.Tensor,
    labels: torch.Tensor,
    ignore_index: int = -100,
    weights: torch.Tensor | None = None,
    bias: torch.Tensor | None = None,
) -> torch.Tensor:
    """Cross-entropy of ``softmax(h W^T + b)`` against labels; see :func:`reference.linear_cross_entropy`."""
    return reference.linear_cross_entropy(hidden, weight, labels, ignore_index, weights, bias)
