"""Vocabulary KL and cross-entropy benchmark: forward+backward time and peak memory per provider.

The measured loss is ASU's forget loss on M token rows (hidden size d, vocabulary V), the mean over rows of
``KL(softmax(hT WT^T) || softmax(hS WS^T))``, with gradients to the student hidden states and LM head; the
teacher head is a separate frozen (V, d) weight. The retain cross-entropy is
``mean_i -log softmax(h W^T)[y_i]``.

Providers
    * ``eager``: materialised logits in the input dtype, ``log_softmax`` in fp32,
      ``F.kl_div(log_q, log_p, log_target=True, reduction="batchmean")`` / ``F.cross_entropy``.
    * ``liger``: Liger-Kernel's ``LigerFusedLinearJSD(jsd_beta=0)`` (forward KL) and
      ``LigerFusedLinearCrossEntropyLoss``, when importable.
    * ``ours``: ``asu_kernels.linear_kl`` / ``asu_kernels.linear_cross_entropy``.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.common import (
    Plan,
    Recorder,
    Rotating,
    Unavailable,
    ours_backend_note,
    peak_memory_gb,
    time_call,
)

PROVIDERS = ("eager", "liger", "ours")


@dataclass(frozen=True)
class LossShape:
    """M rows of hidden size d against a vocabulary of V, in ``dtype``."""

    loss: str  # "kl" | "ce"
    tokens: int
    hidden: int
    vocab: int
    dtype: torch.dtype

    def columns(self) -> dict[str, Any]:
        return {"dtype": self.dtype, "tokens": self.tokens, "hidden": self.hidden, "vocab": self.vocab}


def shapes(suite: str, device: str, tiny: bool = False) -> list[LossShape]:
    """The grid of a suite.

    * ``quick`` (CUDA): KL at M = 8192 and 32768, V = 128256, d = 4096; CE at M = 8192, V = 128256; bf16.
    * ``full`` (CUDA): KL and CE at d = 4096, V in (32000, 128256), M = 1k..32k, bf16.
    * CPU: fp32, d = 64, V = 1000 (not a multiple of any tile), M in (256, 1024) (``tiny``: M = 128, V = 300).
    """
    if suite not in ("quick", "full"):
        raise ValueError(f"suite must be 'quick' or 'full', got {suite!r}")
    if not device.startswith("cuda"):
        if tiny:
            return [LossShape(loss, 128, 64, 300, torch.float32) for loss in ("kl", "ce")]
        return [LossShape(loss, m, 64, 1000, torch.float32) for loss in ("kl", "ce") for m in (256, 1024)]
    if suite == "quick":
        return [
            LossShape("kl", 8192, 4096, 128256, torch.bfloat16),
            LossShape("kl", 32768, 4096, 128256, torch.bfloat16),
            LossShape("ce", 8192, 4096, 128256, torch.bfloat16),
        ]
    ms = (1024, 2048, 4096, 8192, 16384, 32768)
    return [
        LossShape(loss, m, 4096, v, torch.bfloat16)
        for loss in ("kl", "ce")
        for v in (32000, 128256)
        for m in ms
    ]


def eager_kl(hs: torch.Tensor, ws: torch.Tensor, ht: torch.Tensor, wt: torch.Tensor) -> torch.Tensor:
    """Mean over rows of KL(teacher || student) from materialised logits (the plain PyTorch way)."""
    log_q = F.log_softmax((hs @ ws.T).float(), dim=-1)
    with torch.no_grad():
        log_p = F.log_softmax((ht @ wt.T).float(), dim=-1)
    return F.kl_div(log_q, log_p, reduction="batchmean", log_target=True)


def eager_ce(h: torch.Tensor, w: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
    return F.cross_entropy((h @ w.T).float(), labels)


def make_loss(name: str, loss: str, device: str) -> Callable[..., torch.Tensor]:
    """The loss function of provider ``name``; raises :class:`Unavailable` when it cannot run here."""
    if name == "eager":
        return eager_kl if loss == "kl" else eager_ce
    if name == "ours":
        import asu_kernels

        if loss == "kl":
            return lambda hs, ws, ht, wt: asu_kernels.linear_kl(hs, ws, ht, wt)
        return lambda h, w, y: asu_kernels.linear_cross_entropy(h, w, y)
    if name == "liger":
        if not device.startswith("cuda"):
            raise Unavailable("Liger-Kernel needs CUDA")
        try:
            if loss == "kl":
                from liger_kernel.transformers import LigerFusedLinearJSD

                jsd = LigerFusedLinearJSD(jsd_beta=0.0)  # beta = 0: forward KL(teacher || student)
                return lambda hs, ws, ht, wt: jsd(hs, ws, ht, wt)
            from liger_kernel.transformers import LigerFusedLinearCrossEntropyLoss

            ce = LigerFusedLinearCrossEntropyLoss()
            return lambda h, w, y: ce(w, h, y)
        except ImportError as e:
            raise Unavailable(f"Liger-Kernel is not installed ({e})") from None
    raise ValueError(f"unknown loss provider {name!r}; known: {', '.join(PROVIDERS)}")


def _inputs(
    shape: LossShape, device: str, n_sets: int, seed: int
) -> tuple[list[tuple], tuple[torch.Tensor, ...]]:
    """Rotated per-row inputs (hidden states, labels) and the shared LM-head weights."""
    gen = torch.Generator(device=device).manual_seed(seed)
    d, v, m = shape.hidden, shape.vocab, shape.tokens

    def randn(*size: int, std: float = 1.0) -> torch.Tensor:
        return (torch.randn(*size, generator=gen, device=device) * std).to(shape.dtype)

    # Weight scale 1/sqrt(d) gives logits of O(1), as in a trained LM head.
    w_student = randn(v, d, std=d**-0.5).requires_grad_()
    if shape.loss == "kl":
        w_teacher = (w_student.detach() + randn(v, d, std=0.1 * d**-0.5)).requires_grad_(False)
        sets = [(randn(m, d).requires_grad_(), randn(m, d)) for _ in range(n_sets)]
        return sets, (w_student, w_teacher)
    sets = [
        (randn(m, d).requires_grad_(), torch.randint(0, v, (m,), generator=gen, device=device))
        for _ in range(n_sets)
    ]
    return sets, (w_student,)


def bench_shape(rec: Recorder, shape: LossShape, plan: Plan, *, seed: int) -> None:
    """Time and peak memory of forward+backward for each provider at one shape (``plan.modes`` is
    ``("fwd+bwd",)``: the loss is timed with its backward)."""
    providers, rep_ms = plan.providers, plan.rep_ms
    device = rec.device
    bench = "linear_kl" if shape.loss == "kl" else "linear_ce"
    n_sets = 2 if shape.tokens * shape.hidden * 2 > 5e8 else 3
    # E.g. the weights alone do not fit: one row per provider says so.
    inputs = rec.attempt(
        lambda: _inputs(shape, device, n_sets, seed),
        [{"benchmark": bench, "provider": name, "mode": "fwd+bwd", **shape.columns()} for name in providers],
    )
    if inputs is None:
        return
    sets, weights = inputs
    for name in providers:
        row = {"benchmark": bench, "provider": name, "mode": "fwd+bwd", **shape.columns()}

        def run(name=name, row=row) -> None:
            loss_fn = make_loss(name, shape.loss, device)
            note = ours_backend_note(sets[0][0]) if name == "ours" else ""
            if shape.loss == "kl":
                ws, wt = weights
                step = Rotating(lambda hs, ht: loss_fn(hs, ws, ht, wt).backward(), sets)
            else:
                (w,) = weights
                step = Rotating(lambda h, y: loss_fn(h, w, y).backward(), sets)
            leaves = [weights[0]] + [s[0] for s in sets]
            step()  # autotune / lazy init outside the timing
            stats = time_call(step, device, rep_ms=rep_ms, grad_to_none=leaves)
            rec.add(row, "ms", stats, note=note)
            for t in leaves:
                t.grad = None
            mem, what = peak_memory_gb(Rotating(step.fn, sets[:1]), device)
            rec.add(row, "GB", mem, note=f"{what}; {note}".strip("; "))
            for t in leaves:
                t.grad = None

        rec.guarded(row, run)


def run(rec: Recorder, suite: str, *, tiny: bool = False, providers: tuple[str, ...] = PROVIDERS) -> None:
    """Run the vocabulary-loss benchmark of ``suite`` on ``rec.device``."""
    plan = Plan(providers, ("fwd+bwd",), Plan.repetition_ms(rec.device, tiny))
    for i, shape in enumerate(shapes(suite, rec.device, tiny)):
        bench_shape(rec, shape, plan, seed=100 + i)
