"""UNDO's shrink-and-perturb (Lee et al., "Distillation robustifies unlearning", arXiv 2506.06278).

UNDO found that a model fine-tuned to imitate an oracle's outputs keeps the capability latent (relearning
brings it back), while distilling into a damaged copy of the weights removes it. Its damage is one
shrink-and-perturb of the student before distillation (``do_corruption`` in the authors' code, applied once)::

    w <- (1 - alpha) * w + alpha * beta * eps

for every trainable parameter, ``eps`` Xavier-uniform (``U(-a, a)``, ``a = sqrt(6 / (fan_in + fan_out))``)
for 2-D parameters and 0 for the others (norm weights and biases are only shrunk). Defaults: ``alpha = 0.25``
(the authors' WMDP runs; their language sweeps go 0.1-0.7) and ``beta = 0.1`` (``do_corruption``'s default).

As an option of :func:`asu.unlearn.unlearn` (``UnlearnConfig.shrink_perturb = (alpha, beta)``), the student is
damaged after the forget-teacher is built from the undamaged model and before training: ASU then distils the
smoothed teacher on forget rows (and the retain term on retain rows) into the damaged copy. It needs a
teacher that does not share the student's weights (``copy`` or ``cache``) and full fine-tuning (no LoRA).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch import nn

__all__ = ["UNDO_ALPHA", "UNDO_BETA", "check_shrink_perturb", "shrink_and_perturb", "shrink_perturb_student"]

UNDO_ALPHA = 0.25
UNDO_BETA = 0.1


@torch.no_grad()
def shrink_and_perturb(
    model: nn.Module, alpha: float = UNDO_ALPHA, beta: float = UNDO_BETA, seed: int = 0
) -> float:
    """``w <- (1 - alpha) w + alpha beta eps`` on every trainable parameter of ``model``, in place (see the
    module docstring); ``eps`` drawn on the CPU from a generator seeded with ``seed``, parameter by parameter
    in ``model.parameters()`` order. Returns the fraction of the parameters that were changed."""
    if not (0.0 <= alpha <= 1.0 and 0.0 <= beta <= 1.0):
        raise ValueError(f"shrink-and-perturb needs 0 <= alpha, beta <= 1, got alpha={alpha}, beta={beta}")
    gen = torch.Generator().manual_seed(seed)
    changed = total = 0
    for p in model.parameters():
        total += p.numel()
        if not p.requires_grad:
            continue
        changed += p.numel()
        p.mul_(1.0 - alpha)
        if p.dim() == 2:
            fan_out, fan_in = p.shape
            bound = math.sqrt(6.0 / (fan_in + fan_out))
            eps = (torch.rand(p.shape, generator=gen, dtype=torch.float32) * 2.0 - 1.0) * bound
            p.add_(eps.to(device=p.device, dtype=p.dtype), alpha=alpha * beta)
    return changed / max(total, 1)


def check_shrink_perturb(cfg: Any) -> tuple[float, float] | None:
    """``cfg.shrink_perturb`` as ``(alpha, beta)`` floats, or None; ValueError when it is malformed or the run
    cannot use it (a teacher sharing the student's weights, a LoRA student)."""
    value = cfg.shrink_perturb
    if value is None:
        return None
    try:
        alpha, beta = (float(v) for v in value)
    except (TypeError, ValueError):
        raise ValueError(f"shrink_perturb must be (alpha, beta), got {value!r}") from None
    if not (0.0 < alpha <= 1.0 and 0.0 <= beta <= 1.0):
        raise ValueError(f"shrink_perturb needs 0 < alpha <= 1 and 0 <= beta <= 1, got {value!r}")
    if cfg.lora_r > 0 or cfg.teacher not in ("copy", "cache"):
        raise ValueError("shrink_perturb needs full fine-tuning (lora_r 0) and teacher 'copy' or 'cache'")
    return alpha, beta


def shrink_perturb_student(student: nn.Module, cfg: Any) -> None:
    """Apply ``cfg.shrink_perturb`` to the student (seeded by ``cfg.seed``); nothing when it is None."""
    if cfg.shrink_perturb is not None:
        alpha, beta = cfg.shrink_perturb
        shrink_and_perturb(student, alpha, beta, seed=cfg.seed)
