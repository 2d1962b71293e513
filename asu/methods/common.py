"""The pieces every method's loss is built from, each on the fused vocabulary ops.

No (tokens x vocabulary) logits tensor is built anywhere: every vocabulary quantity comes from
:func:`asu_kernels.linear_kl` (``sum_i w_i KL(teacher_i || student_i)``),
:func:`asu_kernels.linear_cross_entropy` (``sum_i w_i NLL_i``) or
:func:`asu_kernels.linear_cross_entropy_rows` (every row's NLL, no gradient) applied to final hidden states
and LM-head weights, with the model's own logit transform (:func:`asu.teachers.logit_head`: the scale folded
into hidden states and bias, the soft-cap passed on) on the student and teacher side alike.

``ctx`` is the objective (:class:`asu.losses.UnlearnObjective`): ``ctx.student``, ``ctx.teacher``,
``ctx.logit_head``. A batch's *label rows* are its positions that predict a label of the same example
(:func:`asu.data.label_positions`): ``M`` rows in row-major order, each example's rows contiguous.
"""

from __future__ import annotations

from typing import Any, NamedTuple

import torch

import asu_kernels
from asu.data import label_positions
from asu.teachers import decoder_hidden, output_head

__all__ = [
    "Rows",
    "student_rows",
    "teacher_rows",
    "cross_entropy",
    "kl",
    "nll_rows",
    "sequence_nll",
    "mean_nll",
    "reference_sequence_nll",
    "token_weights",
    "first_row_of_each_sequence",
    "rank_in_sequence",
    "in_example_order",
    "model_stop_ids",
]


class Rows(NamedTuple):
    """The student's label rows of a batch: ``hidden`` (M, d) with gradient, ``targets`` (M,), ``seq`` (M,)
    the owning example's index into ``example_ids``, ``mask`` (R, L) where they are, and ``num_sequences``."""

    hidden: torch.Tensor
    targets: torch.Tensor
    seq: torch.Tensor
    mask: torch.Tensor
    num_sequences: int


def student_rows(ctx: Any, batch: dict[str, torch.Tensor]) -> Rows:
    """The student's final hidden states at the label rows of ``batch`` (one decoder forward)."""
    mask, targets, seq = label_positions(batch)
    hidden = decoder_hidden(ctx.student, batch)
    return Rows(hidden[mask], targets, seq, mask, int(batch["example_ids"].numel()))


def teacher_rows(
    ctx: Any, batch: dict[str, torch.Tensor], mask: torch.Tensor, *, smoothed: bool, part: str
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """The teacher's hidden states at ``mask`` (no gradient) and its LM head: ``(hidden, weight, bias)``;
    ``smoothed`` selects the forget-teacher at tau, else the original model at tau = 1."""
    hidden = ctx.teacher.hidden_states(batch, mask, smoothed=smoothed, part=part)
    weight, bias = ctx.teacher.lm_head()
    return hidden, weight, bias


def cross_entropy(
    ctx: Any,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    weights: torch.Tensor | None = None,
    head: tuple[torch.Tensor, torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """``sum_i w_i NLL_i`` of the model's own logits (token mean without ``weights``); ``head`` (weight,
    bias) defaults to the student's LM head."""
    weight, bias = output_head(ctx.student) if head is None else head
    lh = ctx.logit_head
    return asu_kernels.linear_cross_entropy(
        lh.hidden(hidden), weight, targets, bias=lh.bias(bias), softcap=lh.softcap, weights=weights
    )


def kl(
    ctx: Any,
    hidden: torch.Tensor,
    t_hidden: torch.Tensor,
    t_head: tuple[torch.Tensor, torch.Tensor | None],
    weights: torch.Tensor | None = None,
    head: tuple[torch.Tensor, torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """``sum_i w_i KL(p_teacher,i || p_student,i)`` of the model's own logits on both sides (``1/M`` each
    without ``weights``); gradient to the student side only."""
    weight, bias = output_head(ctx.student) if head is None else head
    t_weight, t_bias = t_head
    lh = ctx.logit_head
    return asu_kernels.linear_kl(
        lh.hidden(hidden), weight, lh.hidden(t_hidden), t_weight, weights=weights,
        student_bias=lh.bias(bias), teacher_bias=lh.bias(t_bias), softcap=lh.softcap,
    )  # fmt: skip


def nll_rows(
    ctx: Any,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    head: tuple[torch.Tensor, torch.Tensor | None] | None = None,
) -> torch.Tensor:
    """Every row's NLL ``-log p(y_i)``, (M,) fp32, no gradient (for detached per-token weights)."""
    weight, bias = output_head(ctx.student) if head is None else head
    lh = ctx.logit_head
    return asu_kernels.linear_cross_entropy_rows(
        lh.hidden(hidden), weight, targets, bias=lh.bias(bias), softcap=lh.softcap
    )


def sequence_nll(
    ctx: Any,
    hidden: torch.Tensor,
    targets: torch.Tensor,
    seq: torch.Tensor,
    num_sequences: int,
    head: tuple[torch.Tensor, torch.Tensor | None] | None = None,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Summed NLL per example ``NLL(y_s|x_s)`` (S',) and label counts ``T_s`` (S',), for the examples with at
    least one label row, in ``example_ids`` order.

    An example's rows are contiguous, so one fused call per example with unit row weights gives its sum: S
    small calls instead of one (M, V) logits tensor.
    """
    counts = torch.bincount(seq, minlength=num_sequences)
    nll, lengths = [], []
    start = 0
    for n in counts.tolist():
        if n == 0:
            continue
        sl = slice(start, start + n)
        ones = torch.ones(n, dtype=torch.float32, device=hidden.device)
        nll.append(cross_entropy(ctx, hidden[sl], targets[sl], weights=ones, head=head))
        lengths.append(n)
        start += n
    return torch.stack(nll).float(), torch.tensor(lengths, dtype=torch.float32, device=hidden.device)


def mean_nll(ctx: Any, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The student's token-mean NLL over the label rows of ``batch`` (what ``model(**batch).loss`` is)."""
    rows = student_rows(ctx, batch)
    return cross_entropy(ctx, rows.hidden, rows.targets)


@torch.no_grad()
def reference_sequence_nll(ctx: Any, batch: dict[str, torch.Tensor], rows: Rows, part: str) -> torch.Tensor:
    """The original model's (teacher at tau = 1) summed NLL per example of ``batch``, no gradient."""
    hidden, weight, bias = teacher_rows(ctx, batch, rows.mask, smoothed=False, part=part)
    nll, _ = sequence_nll(ctx, hidden, rows.targets, rows.seq, rows.num_sequences, head=(weight, bias))
    return nll


def token_weights(rows: Rows, keep: torch.Tensor | None = None) -> torch.Tensor:
    """``1 / M'`` on each kept row (``keep`` (M,) bool; all rows by default), 0 elsewhere: the token mean over
    the batch's kept label rows."""
    keep = torch.ones_like(rows.targets, dtype=torch.bool) if keep is None else keep
    return keep.float() / keep.sum().clamp(min=1).float()


def first_row_of_each_sequence(seq: torch.Tensor) -> torch.Tensor:
    """(M,) bool: True on each example's first label row (the row predicting its first answer token)."""
    first = torch.ones_like(seq, dtype=torch.bool)
    first[1:] = seq[1:] != seq[:-1]
    return first


def rank_in_sequence(seq: torch.Tensor) -> torch.Tensor:
    """(M,) int: each label row's index within its example (0 on the row predicting the first answer
    token)."""
    first = first_row_of_each_sequence(seq)
    index = torch.arange(seq.numel(), device=seq.device)
    starts = torch.where(first, index, torch.zeros_like(index)).cummax(0).values
    return index - starts


def in_example_order(values: torch.Tensor, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per-example ``values`` (S,) of ``batch`` (in its ``example_ids`` order) sorted by example id.

    Packing reorders examples (first fit), so two parts of a micro-batch (the forget answers and their refusal
    rewrites, say) list the same examples in different orders; sorting both by example id pairs them up.
    """
    order = torch.argsort(batch["example_ids"].to(values.device), stable=True)
    return values[order]


def model_stop_ids(model: Any) -> list[int]:
    """The token ids that end a model's answer: its config's ``eos_token_id`` and every EOS id of its
    generation config (chat models list their end-of-turn token there); ValueError when neither names one."""
    ids: list[int] = []
    for source in (getattr(model, "config", None), getattr(model, "generation_config", None)):
        value = getattr(source, "eos_token_id", None)
        for i in value if isinstance(value, (list, tuple)) else [value]:
            if i is not None and int(i) not in ids:
                ids.append(int(i))
    if not ids:
        raise ValueError(
            "removing the end-of-turn token from the teacher (eos=renorm) needs the model's EOS id: set "
            "eos_token_id in its config or generation config"
        )
    return ids
