"""Unlearning objectives: ASU, the retain losses and the baselines, as one ``nn.Module`` around the student.

Every vocabulary loss is computed by the fused ops (:func:`asu_kernels.linear_kl`,
:func:`asu_kernels.linear_cross_entropy`) on final hidden states and the LM-head weight **inside**
:meth:`UnlearnObjective.forward`. Making the objective the module that the trainer (accelerate, FSDP,
DeepSpeed ZeRO-3) wraps means the LM-head weight is the gathered one there, and no (tokens x vocabulary)
logits tensor is ever built.

Notation: a batch holds S sequences; sequence ``s`` has ``T_s`` label positions (answer tokens plus the final
EOS for QA rows; the question is context only). ``p_theta`` is the student, ``p_tau`` the forget-teacher
(selected layers' attention at temperature ``tau``), ``p_ref`` the original model at ``tau = 1``.
``NLL(y|x) = -sum_t log p_theta(y_t | x, y_<t)`` is a sequence's summed negative log-likelihood.

Forget terms (``method``):
    * ``asu`` (default): ``L_ASU = (1/S) sum_s (1/T_s) sum_t KL(p_tau(.|x, y<t) || p_theta(.|x, y<t))``;
      per-sequence mean first, then the mean over sequences (row weights ``1 / (T_s S)``).
      Total ``lam * L_ASU + L_R``.
    * ``asu-attn`` (EXPERIMENTAL): ASU at the attention maps instead of the output distribution. For each
      selected layer ``l``, answer-predicting row ``i`` (the same rows and weights ``w_i = 1 / (T_s S)`` as
      ``asu``) and head ``h``, ``KL_lhi = KL(softmax(q_T k_T^T * scale / tau) || softmax(q_S k_S^T * scale))``
      over the row's visible keys (causal, per packed document, padding excluded), where ``q_S, k_S`` are the
      student's post-RoPE queries and keys and ``q_T, k_T`` the original model's at ``tau = 1`` (teacher
      ``copy`` or ``base``) or the student's own, detached (teacher ``self``: self-smoothing, no teacher
      forward). ``L_attn = sum_l sum_i w_i mean_h KL_lhi`` (a sum over layers, a mean over heads); total
      ``lam * L_attn + L_R``. Computed by :func:`asu_kernels.attention_kl`, linear in the sequence length.
    * ``ga`` (gradient ascent): ``-(token-mean NLL)`` on the forget batch; no retain term.
    * ``gd`` (GradDiff; ``graddiff`` is accepted as another name): ``-(token-mean NLL on forget) + L_R``.
    * ``npo`` (beta = 0.1):
      ``-(2/beta) mean_s log sigmoid(-beta (log p_theta(y_s|x_s) - log p_ref(y_s|x_s)))`` with summed
      sequence log-likelihoods, ``+ L_R`` (Zhang et al. 2024; open-unlearning's weights 1 and 1).
    * ``simnpo`` (beta = 4.5, delta = 0, gamma = 0.125):
      ``gamma * (-(2/beta) mean_s log sigmoid(beta (NLL(y_s|x_s) / T_s - delta))) + L_R``, as open-unlearning
      implements it (``delta`` the reward margin, ``gamma`` the forget-term weight); no reference model.
    * ``idk`` (IDK + GD): token-mean NLL of the forget questions answered with a refusal (``idk`` batch)
      ``+ L_R``.

Retain term ``L_R`` (``retain_loss``):
    * ``nll``: token-mean NLL of the student on the retain batch (question masked). Its former name ``gd``
      (GradDiff's retain term) is still accepted, with an ``AsuDeprecationWarning``.
    * ``kl``: ``KL(p_ref || p_theta)`` over retain label positions, reduced by ``retain_reduction``:
      ``sequence`` (default) ``(1/S) sum_s (1/T_s) sum_t KL_st``, the per-sequence mean then the mean over
      sequences (the ASU term's reduction; the authors' ASU trainer in their open-unlearning copy and the
      first ``kl_loss`` of their TOFU code); ``token`` ``(sum_st KL_st) / (sum_s T_s)``, the token mean over
      the batch (their MUSE code's ``klr`` term). ``nll`` is always the token mean, as both codes take it.

``lam`` weights only the ASU term; the baselines use their published unit weights (and SimNPO's gamma).

Per-sequence log-likelihoods (NPO, SimNPO) come from the fused cross-entropy too: a sequence's rows are
contiguous in the masked (M, d) hidden states, so one ``linear_cross_entropy`` call per sequence with unit
row weights returns its summed NLL. That is S small fused calls per batch instead of one (M, V) logits
tensor.

Every vocabulary distribution is the model's own: for models whose logits are not ``lm_head(h)`` the
objective folds the logit scale into the hidden states and bias and passes the final-logit soft-cap to the
fused ops (:func:`asu.teachers.logit_head`: Gemma-2/3's ``final_logit_softcapping``, Cohere's
``logit_scale``, Granite's ``logits_scaling``), on the student and the teacher side alike.
"""

from __future__ import annotations

import warnings
from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

import asu_kernels
from asu.data import label_positions, packed_documents, sequence_weights
from asu.qk import capture_qk
from asu.smoothing import attention_modules, parse_layers, scale_attribute
from asu.teachers import Teacher, decoder_hidden, logit_head, output_head
from asu.warning import AsuDeprecationWarning

__all__ = [
    "METHODS",
    "RETAIN_LOSSES",
    "RETAIN_REDUCTIONS",
    "DEFAULTS",
    "UnlearnObjective",
    "METHOD_ALIASES",
    "RETAIN_LOSS_ALIASES",
    "resolve_method",
    "resolve_retain_loss",
    "teacher_outputs_needed",
    "uses_teacher",
    "attention_row_kl",
]

METHODS = ("asu", "asu-attn", "ga", "gd", "npo", "simnpo", "idk")
RETAIN_LOSSES = ("nll", "kl")
#: How the ``kl`` retain term averages over label positions (see the module docstring).
RETAIN_REDUCTIONS = ("sequence", "token")
#: Other accepted names of a method.
METHOD_ALIASES = {"graddiff": "gd"}
#: Deprecated names of a retain loss: ``gd`` was plain NLL, the retain term of GradDiff.
RETAIN_LOSS_ALIASES = {"gd": "nll"}
#: Baseline hyper-parameters (open-unlearning's TOFU defaults).
DEFAULTS = {"npo_beta": 0.1, "simnpo_beta": 4.5, "simnpo_delta": 0.0, "simnpo_gamma": 0.125}


def resolve_method(method: str) -> str:
    """The method's canonical name (``graddiff`` -> ``gd``); ValueError naming the choices if unknown."""
    name = METHOD_ALIASES.get(method, method) if isinstance(method, str) else method
    if name not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose one of {', '.join(METHODS)}")
    return name


def resolve_retain_loss(retain_loss: str) -> str:
    """The retain loss's canonical name; a deprecated name (``gd``) maps to its loss with a
    ``AsuDeprecationWarning``; ValueError naming the choices if unknown."""
    if isinstance(retain_loss, str) and retain_loss in RETAIN_LOSS_ALIASES:
        name = RETAIN_LOSS_ALIASES[retain_loss]
        warnings.warn(
            f"retain_loss={retain_loss!r} is deprecated; use {name!r} (the same loss)",
            AsuDeprecationWarning,
            stacklevel=3,
        )
        return name
    if retain_loss not in RETAIN_LOSSES:
        raise ValueError(f"unknown retain loss {retain_loss!r}; choose one of {', '.join(RETAIN_LOSSES)}")
    return retain_loss


def teacher_outputs_needed(method: str, retain_loss: str) -> list[tuple[str, bool]]:
    """The ``(set, smoothed)`` teacher hidden-state outputs an objective reads (what a cache must hold).

    ``asu-attn`` reads the teacher's attention q, k instead (:meth:`asu.teachers.Teacher.attention_qk`),
    which no cache holds, so it adds nothing here; see :func:`uses_teacher`.
    """
    needs = []
    if method == "asu":
        needs.append(("forget", True))
    if method == "npo":
        needs.append(("forget", False))
    if method != "ga" and retain_loss == "kl":
        needs.append(("retain", False))
    return needs


def uses_teacher(method: str, retain_loss: str) -> bool:
    """Whether the objective reads a teacher at all (hidden states, or attention q, k for ``asu-attn``)."""
    return bool(teacher_outputs_needed(method, retain_loss)) or method == "asu-attn"


def attention_row_kl(
    q_s: torch.Tensor,
    k_s: torch.Tensor,
    q_t: torch.Tensor | None,
    k_t: torch.Tensor | None,
    batch: dict[str, torch.Tensor],
    *,
    temperature: float,
    scale: float | None = None,
) -> torch.Tensor:
    """Head-mean attention-map ``KL(teacher at tau || student)`` per token, (R, L), for one layer of a batch.

    ``q_s`` (R, Hq, L, D), ``k_s`` (R, Hkv, L, D) post-RoPE (``q_t, k_t`` the same shapes, or None for
    self-smoothing). Padded batches (with ``attention_mask``) mask padded keys; packed ones (no mask) run
    per document, from the ``position_ids`` restarts. Gradient flows to ``q_s`` and ``k_s`` only.
    """
    rows, _, length, _ = q_s.shape
    mask = batch.get("attention_mask")
    if mask is not None:
        kpm = mask.to(device=q_s.device, dtype=torch.bool)
        kpm = None if bool(kpm.all()) else kpm
        kl = asu_kernels.attention_kl(
            q_s, k_s, q_t, k_t, temperature_t=temperature, causal=True, scale=scale, key_padding_mask=kpm
        )
        return kl.mean(1)
    position_ids = batch.get("position_ids")
    if position_ids is None:
        kl = asu_kernels.attention_kl(q_s, k_s, q_t, k_t, temperature_t=temperature, causal=True, scale=scale)
        return kl.mean(1)
    cu, max_len = packed_documents(position_ids.to(q_s.device))

    def flat(t: torch.Tensor | None) -> torch.Tensor | None:
        return None if t is None else t.transpose(1, 2).reshape(rows * length, t.shape[1], t.shape[3])

    kl = asu_kernels.attention_kl(
        flat(q_s), flat(k_s), flat(q_t), flat(k_t), temperature_t=temperature, causal=True, scale=scale,
        cu_seqlens=cu, max_seqlen=max_len,
    )  # fmt: skip
    return kl.mean(-1).view(rows, length)


def _softmax_scale(module: nn.Module) -> float | None:
    """The attention module's own softmax scale (``scaling``, or ``scale`` where the family names it so)."""
    name = scale_attribute(module)
    return None if name is None else float(getattr(module, name))


class UnlearnObjective(nn.Module):
    """The training objective as a module: ``forward(forget=..., retain=..., idk=...)`` -> loss terms.

    Args:
        student: the causal LM being unlearned (a transformers model or a PEFT wrapper of one).
        method: ``asu|asu-attn|ga|gd|npo|simnpo|idk`` (see the module docstring; ``asu-attn`` is
            experimental; ``graddiff`` = ``gd``).
        retain_loss: ``nll|kl`` (``gd``: deprecated name of ``nll``).
        retain_reduction: ``sequence|token``: how the ``kl`` retain term averages (``nll`` is a token mean).
        lam: weight of the ASU term, ``>= 0``.
        teacher: a :class:`asu.teachers.Teacher`; required for ``asu``, ``npo``, retain ``kl`` and
            ``asu-attn`` (``copy``, ``base`` or ``self``; its ``temperature`` and ``layers`` define the
            attention term).
        npo_beta, simnpo_beta, simnpo_delta, simnpo_gamma: baseline hyper-parameters.

    ``forward`` returns a dict of scalars: ``loss`` (what is optimised), ``forget_loss`` (the unweighted
    forget term) and ``retain_loss`` (when there is one).
    """

    def __init__(
        self,
        student: nn.Module,
        method: str = "asu",
        retain_loss: str = "nll",
        lam: float = 0.1,
        teacher: Teacher | None = None,
        npo_beta: float = DEFAULTS["npo_beta"],
        simnpo_beta: float = DEFAULTS["simnpo_beta"],
        simnpo_delta: float = DEFAULTS["simnpo_delta"],
        simnpo_gamma: float = DEFAULTS["simnpo_gamma"],
        retain_reduction: str = "sequence",
    ) -> None:
        super().__init__()
        method = resolve_method(method)
        retain_loss = resolve_retain_loss(retain_loss)
        if retain_reduction not in RETAIN_REDUCTIONS:
            raise ValueError(
                f"unknown retain reduction {retain_reduction!r}; choose one of {', '.join(RETAIN_REDUCTIONS)}"
            )
        if not (isinstance(lam, (int, float)) and lam >= 0):
            raise ValueError(f"lam must be a number >= 0, got {lam!r}")
        for name, value in (("npo_beta", npo_beta), ("simnpo_beta", simnpo_beta)):
            if not value > 0:
                raise ValueError(f"{name} must be > 0, got {value!r}")
        if uses_teacher(method, retain_loss) and teacher is None:
            raise ValueError(f"method={method!r} with retain_loss={retain_loss!r} needs a teacher")
        kind = getattr(teacher, "kind", None)
        if method == "asu-attn" and kind == "cache":
            raise ValueError(
                "method='asu-attn' cannot use the cache teacher: the cache stores final hidden states, not "
                "attention q, k; use teacher 'copy', 'base' or 'self' (self-smoothing)"
            )
        if kind == "self" and teacher_outputs_needed(method, retain_loss):
            raise ValueError(
                f"teacher='self' is self-smoothing for method='asu-attn' only; method={method!r} with "
                f"retain_loss={retain_loss!r} reads teacher hidden states (use 'copy', 'base' or 'cache')"
            )
        # The model's own logits: the scale folded into hidden states and bias, the final-logit cap passed on.
        self.logit_head = logit_head(student)
        self.student = student
        # FSDP's transformer-layer auto-wrap reads the root's _no_split_modules: the student's decoder layers.
        self._no_split_modules = list(getattr(student, "_no_split_modules", None) or [])
        self.teacher = teacher
        self.method = method
        self.retain_kind = retain_loss
        self.retain_reduction = retain_reduction
        self.lam = float(lam)
        self.npo_beta = float(npo_beta)
        self.simnpo_beta = float(simnpo_beta)
        self.simnpo_delta = float(simnpo_delta)
        self.simnpo_gamma = float(simnpo_gamma)

    # -- pieces -------------------------------------------------------------------------------------------

    def _cross_entropy(self, hidden, weight, targets, bias=None, **kwargs) -> torch.Tensor:
        """``linear_cross_entropy`` of the model's own logits (:class:`asu.teachers.LogitHead`)."""
        head = self.logit_head
        return asu_kernels.linear_cross_entropy(
            head.hidden(hidden), weight, targets, bias=head.bias(bias), softcap=head.softcap, **kwargs
        )

    def _kl(self, hidden, weight, t_hidden, t_weight, *, bias=None, t_bias=None, **kwargs) -> torch.Tensor:
        """``linear_kl`` (teacher || student) of the model's own logits on both sides."""
        head = self.logit_head
        return asu_kernels.linear_kl(
            head.hidden(hidden), weight, head.hidden(t_hidden), t_weight, student_bias=head.bias(bias),
            teacher_bias=head.bias(t_bias), softcap=head.softcap, **kwargs,
        )  # fmt: skip

    def _student_rows(self, batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, ...]:
        """Student hidden rows at label positions (M, d), their targets (M,), owners (M,) and the mask."""
        mask, targets, seq = label_positions(batch)
        hidden = decoder_hidden(self.student, batch)
        return hidden[mask], targets, seq, mask

    def _sequence_nll(
        self,
        hidden: torch.Tensor,
        weight: torch.Tensor,
        bias: torch.Tensor | None,
        targets: torch.Tensor,
        seq: torch.Tensor,
        num_sequences: int,
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Summed NLL per sequence (S',) and label counts (S',) for sequences with at least one label."""
        counts = torch.bincount(seq, minlength=num_sequences)
        nll, lengths = [], []
        start = 0
        for n in counts.tolist():
            if n == 0:
                continue
            sl = slice(start, start + n)
            ones = torch.ones(n, dtype=torch.float32, device=hidden.device)
            nll.append(self._cross_entropy(hidden[sl], weight, targets[sl], bias, weights=ones))
            lengths.append(n)
            start += n
        return torch.stack(nll).float(), torch.tensor(lengths, dtype=torch.float32, device=hidden.device)

    def retain_term(self, retain: dict[str, torch.Tensor]) -> torch.Tensor:
        """``L_R`` on a retain batch (``nll``: token-mean NLL; ``kl``: KL(p_ref || p_theta) averaged per
        sequence then over sequences, or over all tokens with ``retain_reduction="token"``)."""
        hidden, targets, seq, mask = self._student_rows(retain)
        weight, bias = output_head(self.student)
        if self.retain_kind == "nll":
            return self._cross_entropy(hidden, weight, targets, bias)
        ref = self.teacher.hidden_states(retain, mask, smoothed=False, part="retain")
        t_weight, t_bias = self.teacher.lm_head()
        w = None  # the fused op's default 1/M per row: the token mean
        if self.retain_reduction == "sequence":
            w = sequence_weights(seq, int(retain["example_ids"].numel())).to(hidden.device)
        return self._kl(hidden, weight, ref, t_weight, bias=bias, t_bias=t_bias, weights=w)

    def attention_term(self, forget: dict[str, torch.Tensor]) -> torch.Tensor:
        """``L_attn`` of ``asu-attn`` on a forget batch (see the module docstring), a scalar.

        The student runs its decoder with hooks keeping each selected layer's post-RoPE q, k (with the
        autograd graph); the teacher's come from :meth:`asu.teachers.Teacher.attention_qk` (None: self).
        """
        modules = dict(attention_modules(self.student))
        layers = parse_layers(self.teacher.layers, max(modules) + 1)
        mask, _, seq = label_positions(forget)
        weights = sequence_weights(seq, int(forget["example_ids"].numel())).to(mask.device)
        target = self.teacher.attention_qk(forget, layers)
        with capture_qk(self.student, layers) as captured:
            decoder_hidden(self.student, forget)
        total = torch.zeros((), dtype=torch.float32, device=mask.device)
        for layer in layers:
            q_s, k_s = captured[layer]
            q_t, k_t = (None, None) if target is None else target[layer]
            per_token = attention_row_kl(
                q_s, k_s, q_t, k_t, forget,
                temperature=self.teacher.temperature, scale=_softmax_scale(modules[layer]),
            )  # fmt: skip
            total = total + (per_token[mask].float() * weights).sum()
        return total

    def forget_term(
        self, forget: dict[str, torch.Tensor], idk: dict[str, torch.Tensor] | None
    ) -> torch.Tensor:
        """The method's forget term, unweighted (see the module docstring)."""
        weight, bias = output_head(self.student)
        if self.method == "idk":
            if idk is None:
                raise ValueError("method='idk' needs an 'idk' batch (forget questions with refusal answers)")
            hidden, targets, _, _ = self._student_rows(idk)
            return self._cross_entropy(hidden, weight, targets, bias)
        if self.method == "asu-attn":
            return self.attention_term(forget)
        hidden, targets, seq, mask = self._student_rows(forget)
        num_seq = int(forget["example_ids"].numel())
        if self.method == "asu":
            teacher_hidden = self.teacher.hidden_states(forget, mask, smoothed=True, part="forget")
            t_weight, t_bias = self.teacher.lm_head()
            w = sequence_weights(seq, num_seq).to(hidden.device)
            return self._kl(hidden, weight, teacher_hidden, t_weight, bias=bias, t_bias=t_bias, weights=w)
        if self.method in ("ga", "gd"):
            return -self._cross_entropy(hidden, weight, targets, bias)
        nll, lengths = self._sequence_nll(hidden, weight, bias, targets, seq, num_seq)
        if self.method == "npo":
            ref_hidden = self.teacher.hidden_states(forget, mask, smoothed=False, part="forget")
            t_weight, t_bias = self.teacher.lm_head()
            with torch.no_grad():
                ref_nll, _ = self._sequence_nll(ref_hidden, t_weight, t_bias, targets, seq, num_seq)
            # log p_theta - log p_ref = ref_nll - nll
            log_ratio = ref_nll - nll
            return -(2.0 / self.npo_beta) * F.logsigmoid(-self.npo_beta * log_ratio).mean()
        # simnpo
        avg_nll = nll / lengths - self.simnpo_delta
        return -(2.0 / self.simnpo_beta) * F.logsigmoid(self.simnpo_beta * avg_nll).mean()

    # -- the objective ------------------------------------------------------------------------------------

    def forward(
        self,
        forget: dict[str, torch.Tensor],
        retain: dict[str, torch.Tensor] | None = None,
        idk: dict[str, torch.Tensor] | None = None,
    ) -> dict[str, torch.Tensor]:
        forget_loss = self.forget_term(forget, idk)
        out: dict[str, Any] = {"forget_loss": forget_loss}
        if self.method in ("asu", "asu-attn"):
            loss = self.lam * forget_loss
        elif self.method == "simnpo":
            loss = self.simnpo_gamma * forget_loss
        else:
            loss = forget_loss
        if self.method != "ga":
            if retain is None:
                raise ValueError(f"method={self.method!r} needs a retain batch")
            retain_loss = self.retain_term(retain)
            out["retain_loss"] = retain_loss
            loss = loss + retain_loss
        out["loss"] = loss
        return out

    def train(self, mode: bool = True) -> UnlearnObjective:
        super().train(mode)
        if self.teacher is not None:
            self.teacher.train(False)  # frozen teacher: never dropout
        return self
