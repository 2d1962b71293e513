"""The relearning attack: fine-tune a copy of the model on forget data and watch the knowledge come back.

Protocol (:class:`RelearnProtocol`)
    open-unlearning's meta-evaluation (arXiv 2506.12618) relearns by fine-tuning on the forget set for one
    epoch at learning rate 2e-5; open-unlearning's main branch ships no relearning code, so the rest is its
    fine-tuning trainer's (``configs/trainer/finetune.yaml``) and transformers' Trainer defaults: AdamW (betas
    0.9/0.999, eps 1e-8), weight decay 0, no warm-up, the learning rate decaying linearly to 0 over the run,
    gradients clipped to norm 1, an effective batch of 32 rows (8 rows x 4 accumulation steps). The loss is
    the plain NLL of the answer tokens (answer + EOS, the question masked, rendered in the evaluation's
    template), averaged over every answer token of the effective batch (transformers' token mean across
    accumulation). An epoch is ``ceil(n / 32)`` steps (the last takes the remaining rows); the rows are
    shuffled with a seeded generator each epoch. ``relearn:STEPS:LR`` runs ``STEPS`` optimizer steps (going
    through further epochs when needed) at peak learning rate ``LR``.

Curves
    The copy is evaluated before training and at ``curve_points`` evenly spaced steps up to the last
    (forget rows only); the first and last points are ``before`` and ``after``.

Variants
    ``full``: train on every forget row, score every forget row (the meta-evaluation's). ``split`` (Deeb and
    Roger's test): the forget rows are shuffled with the seed and cut in two; train on the first half
    (``floor(n/2)`` rows), score the other: knowledge that comes back on rows never trained on was hidden,
    not removed.

Score
    With the reference (retain-only) model's relearning under the same protocol, ``R`` of
    :mod:`asu.attacks.scores` for the full and the split variant.
"""

from __future__ import annotations

import copy
import dataclasses
import math
from collections.abc import Callable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

from asu.attacks.context import AttackContext, AttackOutcome, tracked
from asu.attacks.scores import PRIMARY_METRIC, SCORED_METRICS, relearn_score
from asu.data import Rows, encode_rows, pad_right, rows_fingerprint
from asu.formatting import IGNORE_INDEX
from asu.metrics.scoring import pad_id

__all__ = [
    "RelearnProtocol",
    "attack",
    "protocol_record",
    "reference_variants",
    "relearn_curve",
    "split_indices",
]


@dataclass(frozen=True)
class RelearnProtocol:
    """How the copy is fine-tuned (see the module docstring for the defaults' origin).

    Attributes:
        steps: optimizer steps; None = one epoch of the rows trained on.
        lr: peak learning rate (linear decay to 0, no warm-up).
        batch_size: rows per forward pass; grad_accum: forward passes per optimizer step.
        weight_decay: AdamW's; max_grad_norm: the gradient-norm clip.
        seed: the data order and the split.
        curve_points: evaluations along the run, first and last included (>= 2).
        max_length: tokens per question + answer (the end of the answer is cut, as in training).
    """

    steps: int | None = None
    lr: float = 2e-5
    batch_size: int = 8
    grad_accum: int = 4
    weight_decay: float = 0.0
    max_grad_norm: float = 1.0
    seed: int = 0
    curve_points: int = 5
    max_length: int = 512

    def __post_init__(self) -> None:
        if self.steps is not None and (not isinstance(self.steps, int) or self.steps < 1):
            raise ValueError(f"relearning steps must be a positive integer, got {self.steps!r}")
        if not (isinstance(self.lr, (int, float)) and math.isfinite(self.lr) and self.lr > 0):
            raise ValueError(f"relearning learning rate must be a positive number, got {self.lr!r}")
        if self.batch_size < 1 or self.grad_accum < 1 or self.curve_points < 2 or self.max_length < 2:
            raise ValueError("batch_size and grad_accum must be >= 1, curve_points and max_length >= 2")
        if self.weight_decay < 0 or self.max_grad_norm <= 0:
            raise ValueError("weight_decay must be >= 0 and max_grad_norm > 0")

    @property
    def rows_per_step(self) -> int:
        return self.batch_size * self.grad_accum

    def total_steps(self, n_rows: int) -> int:
        """``steps``, or one epoch of ``n_rows`` rows."""
        return self.steps if self.steps is not None else math.ceil(n_rows / self.rows_per_step)

    def curve_steps(self, total: int) -> list[int]:
        """The steps evaluated: ``curve_points`` evenly spaced from 0 to ``total`` (fewer if ``total`` is
        small)."""
        return sorted({round(i * total / (self.curve_points - 1)) for i in range(self.curve_points)})

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


def split_indices(n: int, seed: int) -> tuple[list[int], list[int]]:
    """The split variant's ``(train, score)`` row indices: a seeded permutation cut after ``floor(n/2)``."""
    if n < 2:
        raise ValueError(f"the split variant needs at least 2 forget rows, got {n}")
    perm = torch.randperm(n, generator=torch.Generator().manual_seed(seed)).tolist()
    return sorted(perm[: n // 2]), sorted(perm[n // 2 :])


def _steps(n: int, protocol: RelearnProtocol, total: int) -> Iterator[list[int]]:
    """The row indices of each optimizer step: epochs of seeded permutations cut into effective batches."""
    gen = torch.Generator().manual_seed(protocol.seed)
    done = 0
    while True:
        perm = torch.randperm(n, generator=gen).tolist()
        for start in range(0, n, protocol.rows_per_step):
            if done == total:
                return
            yield perm[start : start + protocol.rows_per_step]
            done += 1


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


def _step_loss(
    model: nn.Module, examples: Sequence[dict], idx: list[int], protocol: RelearnProtocol, pad: int
) -> float:
    """Forward and backward of one optimizer step's rows; the loss is the NLL summed over every answer token
    of the step divided by their number (the token mean over the effective batch). Returns the loss."""
    n_tokens = sum(sum(1 for lab in examples[i]["labels"][1:] if lab != IGNORE_INDEX) for i in idx)
    total = 0.0
    device = _device(model)
    for start in range(0, len(idx), protocol.batch_size):
        batch = pad_right([examples[i] for i in idx[start : start + protocol.batch_size]], pad)
        batch = {k: v.to(device) for k, v in batch.items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        nll = F.cross_entropy(
            logits[:, :-1].float().reshape(-1, logits.shape[-1]),
            batch["labels"][:, 1:].reshape(-1),
            ignore_index=IGNORE_INDEX,
            reduction="sum",
        )
        loss = nll / n_tokens
        if not torch.isfinite(loss):
            raise ValueError("relearning diverged: the loss is not finite (lower the learning rate)")
        loss.backward()
        total += float(loss.detach())
    return total


def relearn_curve(
    model: nn.Module,
    tokenizer: Any,
    train_rows: Rows,
    protocol: RelearnProtocol,
    evaluate: Callable[[nn.Module], Mapping[str, Any]],
    template: Any = None,
) -> list[dict[str, Any]]:
    """Fine-tune a deep copy of ``model`` on ``train_rows`` with ``protocol``; ``evaluate(copy)`` (a flat
    summary) at every step of :meth:`RelearnProtocol.curve_steps`. ``model`` is not touched.

    Returns ``[{"step": s, "lr": ..., "loss": ..., **tracked values}, ...]`` (``loss``: the step's training
    loss; None at step 0).
    """
    from transformers import get_linear_schedule_with_warmup

    examples = encode_rows(tokenizer, train_rows, protocol.max_length, "relearning rows", template)
    total = protocol.total_steps(len(examples))
    marks = set(protocol.curve_steps(total))
    student = copy.deepcopy(model)
    params = [p for p in student.parameters() if p.requires_grad]
    opt = torch.optim.AdamW(params, lr=protocol.lr, weight_decay=protocol.weight_decay)
    schedule = get_linear_schedule_with_warmup(opt, 0, total)
    curve = [{"step": 0, "lr": protocol.lr, "loss": None, **tracked(_evaluated(student, evaluate))}]
    try:
        for step, idx in enumerate(_steps(len(examples), protocol, total), start=1):
            student.train()
            lr = schedule.get_last_lr()[0]
            loss = _step_loss(student, examples, idx, protocol, pad_id(tokenizer))
            torch.nn.utils.clip_grad_norm_(params, protocol.max_grad_norm)
            opt.step()
            schedule.step()
            opt.zero_grad(set_to_none=True)
            if step in marks:
                curve.append({"step": step, "lr": lr, "loss": loss, **tracked(_evaluated(student, evaluate))})
    finally:
        del student, opt
    return curve


def _evaluated(model: nn.Module, evaluate: Callable[[nn.Module], Mapping[str, Any]]) -> Mapping[str, Any]:
    model.eval()
    with torch.no_grad():
        return evaluate(model)


# ------------------------------------------------------------------------------------------------ attack


def _variant(curve: list[dict[str, Any]], rows: dict[str, Any]) -> dict[str, Any]:
    return {"rows": rows, "curve": curve, "before": curve[0], "after": curve[-1]}


def _scores(ours: Mapping[str, Any], theirs: Mapping[str, Any] | None) -> dict[str, float | None]:
    if theirs is None:
        return {m: None for m in SCORED_METRICS}
    return {
        m: relearn_score(
            ours["before"].get(m), ours["after"].get(m), theirs["before"].get(m), theirs["after"].get(m)
        )
        for m in SCORED_METRICS
    }


def reference_variants(
    reference: Mapping[str, Any] | None, protocol: dict[str, Any]
) -> dict[str, Any] | None:
    """The reference's ``relearn_R`` section when it was made with the same protocol and forget rows, else
    None. A different protocol is an error (R compares two relearning runs of the same protocol)."""
    section = (reference or {}).get("relearn_R")
    if section is None:
        return None
    if section.get("protocol") != protocol:
        raise ValueError(
            "the reference's relearning used another protocol or other forget rows than this one "
            f"(reference {section.get('protocol')}, here {protocol}); evaluate the reference with the same "
            "relearn attack settings and forget rows"
        )
    return section


def protocol_record(forget: Rows, protocol: RelearnProtocol) -> dict[str, Any]:
    """What two relearning runs must share for ``R`` to compare them: the protocol and the forget rows."""
    return protocol.to_dict() | {"forget_rows": rows_fingerprint(forget), "n_forget": len(forget)}


def attack(ctx: AttackContext, steps: int | None = None, lr: float = 2e-5) -> AttackOutcome:
    """``relearn[:STEPS[:LR]]``: the full and the split relearning curves; with the reference's relearning,
    ``R`` for each (entries ``relearn_R``, ``relearn_split_R``, and the values after each variant)."""
    protocol = RelearnProtocol(steps=steps, lr=lr, seed=ctx.seed, max_length=ctx.max_length)
    train, score = split_indices(len(ctx.forget), ctx.seed)
    record = protocol_record(ctx.forget, protocol)
    reference = reference_variants(ctx.reference, record)

    def curve(train_rows: Rows, score_rows: Rows) -> list[dict[str, Any]]:
        evaluate = lambda m: ctx.evaluate(m, score_rows)  # noqa: E731
        return relearn_curve(ctx.model, ctx.tokenizer, train_rows, protocol, evaluate, ctx.template)

    full = _variant(curve(ctx.forget, ctx.forget), {"train": "all", "score": "all"})
    split_rows = {"train": train, "score": score}
    split = _variant(curve([ctx.forget[i] for i in train], [ctx.forget[i] for i in score]), split_rows)
    r_full = _scores(full, reference)
    r_split = _scores(split, reference["split"] if reference else None)
    out = AttackOutcome("relearn")
    common = {"attack": f"relearn:{protocol.total_steps(len(ctx.forget))}:{lr:g}", "metric": PRIMARY_METRIC}
    out.entries["relearn_R"] = {
        "agg_value": r_full[PRIMARY_METRIC],
        **common,
        "formula": "min((m_ret_after - m_ret_before) / (m_unl_after - m_unl_before), 1)",
        "protocol": record,
        **full,
        "R": r_full,
        "split": split | {"R": r_split},
        "reference": None
        if reference is None
        else {"before": reference["before"], "after": reference["after"]},
    }
    out.entries["relearn_split_R"] = {"agg_value": r_split[PRIMARY_METRIC], **common, "variant": "split"}
    out.add_values("relearn", _values(full["after"]))
    out.add_values("relearn_split", _values(split["after"]))
    if reference is None:
        out.notes.append(
            "relearn_R: no reference relearning (evaluate the retain-only model with the same --attack "
            "relearn and give its evaluation as --reference); the curves are in ASU_EVAL.json"
        )
    return out


def _values(point: Mapping[str, Any]) -> dict[str, Any]:
    """A curve point's evaluation values (without its step, learning rate and loss)."""
    return {k: v for k, v in point.items() if k not in ("step", "lr", "loss")}
