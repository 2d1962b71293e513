"""Everything that defines an unlearning run: :class:`UnlearnConfig` and its validation.

The defaults are the paper's TOFU settings (Llama-2-7B-chat): ``tau = 2.3``, ``lam = 0.1``, retain ``nll``,
lr 1e-5 with one warm-up epoch then linear decay, weight decay 0.01, 5 epochs, effective batch 32
(8 x 4 accumulation), max length 500, bf16 on GPUs that support it. Which methods exist, which retain
terms and parameters each takes and which teachers each can run with is the method registry's
(:mod:`asu.methods`); :meth:`UnlearnConfig.validate` asks it.
"""

from __future__ import annotations

import dataclasses
import math
import os
from dataclasses import dataclass, field
from typing import Any

from asu.methods import (
    RETAIN_REDUCTIONS,
    MethodSetup,
    check_setup,
    get_method,
    method_setup,
    resolve_method,
    resolve_retain_loss,
)
from asu.methods.npo import METHOD as NPO
from asu.methods.simnpo import METHOD as SIMNPO
from asu.tau import is_auto, parse_auto
from asu.teachers import TEACHER_SOURCES
from asu.templates import Template, get_template
from asu.undo import check_shrink_perturb

__all__ = ["UnlearnConfig", "LR_SCHEDULES", "PARAMETER_FIELDS"]

#: ``linear``: warm-up then linear decay to 0 (the paper's TOFU runs); ``constant``: warm-up then constant
#: (the authors' MUSE runs).
LR_SCHEDULES = ("linear", "constant")
#: The fields that hold a method's parameter (every other parameter is in ``method_args``).
PARAMETER_FIELDS = ("lam", "temperature", "npo_beta", "simnpo_beta", "simnpo_delta", "simnpo_gamma")


def _number(name: str, value: Any) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise TypeError(f"{name} must be a finite number, got {value!r}")
    return float(value)


def _positive_int(name: str, value: Any, minimum: int = 1) -> None:
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be a positive int, got {value!r}")


@dataclass
class UnlearnConfig:
    """Everything that defines an unlearning run (see the module docstring for the defaults' origin).

    Attributes:
        method: a method of the registry (:data:`asu.methods.METHODS`: ``asu``, ``asu-idk``, ``asu-attn``
            (EXPERIMENTAL), ``ga``, ``gd`` (``graddiff``), ``npo``, ``simnpo``, ``idk``, ``dpo``, ``altpo``,
            ``me``, ``llmu``, ``rmu``, ``undial``, ``satimp``, ``wga``, ``ceu``; README "Methods").
        temperature: attention temperature ``tau > 0`` of the forget-teacher (ASU), or ``"auto"`` /
            ``"auto:R"``: chosen before training by bisecting the smoothed-teacher preview until the teacher's
            forget ROUGE-L is ``R`` times the original model's (:mod:`asu.tau`; default ``R`` 0.5). The
            chosen value and the preview curve are in ``result.stats["temperature_auto"]`` and ``run.json``.
        lam: weight ``lambda >= 0`` of the forget term of ASU, ASU+IDK, ``asu-attn`` and ME
            (``lambda * L_forget + L_R``).
        retain_loss: ``nll``, ``kl`` (KL to the original model at ``tau = 1``), ``ap`` (the AP regulariser)
            or ``embed`` (RMU); None = the method's default (``nll``; ``kl`` for LLMU, ``embed`` for RMU).
            ``gd``, the former name of ``nll``, is accepted with an ``AsuDeprecationWarning``.
        retain_reduction: ``sequence`` (per-sequence mean, then the mean over sequences, as the ASU term) or
            ``token`` (token mean over the batch) for the ``kl`` retain term; ``nll`` is always a token mean.
        method_args: the method's (and retain term's) other parameters by name, e.g. ``{"beta": 0.1}`` for
            DPO; each method's module lists them with their defaults and sources.
        teacher: ``copy`` (frozen copy), ``base`` (PEFT student with adapters off), ``cache``, or ``self``
            (``asu-attn`` only: self-smoothing, the student's own detached attention at ``tau``; no teacher
            model). ``asu-attn`` and RMU's ``embed`` retain term never take ``cache``.
        layers: smoothed layers: ``None``/``"all"``, a list of indices, or a string like ``"6-8"``.
        lr, epochs, batch_size, grad_accum, weight_decay, warmup_epochs: optimisation (AdamW,
            ``warmup_epochs`` of linear warm-up, then ``lr_schedule``).
        lr_schedule: ``linear`` (decay to 0) or ``constant`` after the warm-up.
        max_length: tokens per example (answers are truncated to fit).
        template: the prompt template QA rows are rendered in (:mod:`asu.templates`): ``auto`` (the
            tokenizer's chat template, else ``plain``), ``plain``, ``phi``, ``tofu-llama2``, ``llama3``, a
            path to a ``.jinja`` file, or a :class:`asu.templates.Template`. Use the format the model was
            fine-tuned in.
        system_prompt: replaces the template's system prompt (None = the template's own).
        preset: the name of the recipe (:mod:`asu.presets`) the values came from, recorded only.
        pack: pack examples into rows of ``pack_tokens`` (default ``max_length``) tokens instead of padding.
        seed: seeds model-independent randomness, the forget/retain pairing, the data order, the refusal and
            alternate answers drawn per example and RMU's control vector.
        bf16: bf16 mixed precision; ``None`` = on where a CUDA GPU supports it.
        gradient_checkpointing: recompute activations in backward.
        lora_r: LoRA rank (0 = full fine-tuning); ``lora_alpha`` defaults to ``2 r``; ``lora_target`` is
            PEFT's ``target_modules`` (``"all-linear"`` = every projection, not the LM head).
        cache_dtype, cache_dir: storage of the ``cache`` teacher (bf16 in CPU memory by default).
        npo_beta, simnpo_beta, simnpo_delta, simnpo_gamma: NPO's and SimNPO's parameters.
        save_steps: checkpoint every this many optimizer steps (``None`` = every epoch).
        max_steps: stop after this many optimizer steps (``-1`` = run all epochs).
        keep_checkpoints: keep ``DIR/checkpoints`` after a finished run.
        max_nonfinite_steps: optimizer steps with a NaN/infinite loss or gradient norm that are skipped
            (weights left unchanged) before the run stops with an error; 0 = stop at the first one.
        progress: show the progress bar.
        shrink_perturb: ``(alpha, beta)``: UNDO's shrink-and-perturb of the student before training
            (:mod:`asu.undo`; EXPERIMENTAL, measured in the README's UNDO section), or None (off).
    """

    method: str = "asu"
    temperature: float | str = 2.3
    lam: float = 0.1
    retain_loss: str | None = None
    retain_reduction: str = "sequence"
    teacher: str = "copy"
    layers: str | list[int] | None = None
    lr: float = 1e-5
    epochs: float = 5
    batch_size: int = 8
    grad_accum: int = 4
    max_length: int = 500
    pack: bool = True
    pack_tokens: int | None = None
    seed: int = 0
    weight_decay: float = 0.01
    warmup_epochs: float = 1.0
    lr_schedule: str = "linear"
    template: str | Template = "auto"
    system_prompt: str | None = None
    preset: str | None = None
    bf16: bool | None = None
    gradient_checkpointing: bool = False
    lora_r: int = 0
    lora_alpha: int | None = None
    lora_dropout: float = 0.0
    lora_target: str | list[str] = "all-linear"
    cache_dtype: str = "bfloat16"
    cache_dir: str | None = None
    npo_beta: float = NPO.param("beta").default
    simnpo_beta: float = SIMNPO.param("beta").default
    simnpo_delta: float = SIMNPO.param("delta").default
    simnpo_gamma: float = SIMNPO.param("gamma").default
    method_args: dict[str, Any] = field(default_factory=dict)
    save_steps: int | None = None
    max_steps: int = -1
    keep_checkpoints: bool = False
    max_nonfinite_steps: int = 0
    progress: bool = True
    shrink_perturb: tuple[float, float] | None = None

    def __post_init__(self) -> None:
        if self.retain_loss is None:
            try:
                self.retain_loss = get_method(self.method).default_retain
            except ValueError:
                self.retain_loss = "nll"  # validate() names the unknown method

    def validate(self) -> None:
        """Raise ValueError/TypeError naming the first bad field; other accepted names (``graddiff``, the
        deprecated retain loss ``gd``, layers ``"all"``) are replaced by the canonical ones, and a
        ``method_args`` entry of a parameter that has a field of its own (NPO's ``beta``) moves there."""
        self.method = resolve_method(self.method)
        self.retain_loss = resolve_retain_loss(self.retain_loss)
        self._check_choices()
        self._check_numbers()
        self._move_field_args()
        check_setup(
            self.method_setup(), self.teacher, lora=self.lora_r > 0,
            gradient_checkpointing=self.gradient_checkpointing,
        )  # fmt: skip
        self._check_storage_and_steps()
        if isinstance(self.layers, str) and self.layers.strip().lower() == "all":
            self.layers = None
        self.shrink_perturb = check_shrink_perturb(self)

    def _check_choices(self) -> None:
        """Fields that name one of a fixed set of choices, and the template."""
        if self.retain_reduction not in RETAIN_REDUCTIONS:
            choices = ", ".join(RETAIN_REDUCTIONS)
            raise ValueError(f"unknown retain_reduction {self.retain_reduction!r}; choose one of {choices}")
        if self.lr_schedule not in LR_SCHEDULES:
            choices = ", ".join(LR_SCHEDULES)
            raise ValueError(f"unknown lr_schedule {self.lr_schedule!r}; choose one of {choices}")
        self.prompt_template()  # an unknown name or a missing file fails here
        if self.teacher not in TEACHER_SOURCES:
            raise ValueError(f"unknown teacher {self.teacher!r}; choose one of {', '.join(TEACHER_SOURCES)}")
        if not isinstance(self.method_args, dict):
            raise TypeError(f"method_args must be a dict, got {type(self.method_args).__name__}")

    def _check_numbers(self) -> None:
        """The temperature, the optimisation numbers and the sizes."""
        if is_auto(self.temperature):
            self.temperature = parse_auto(self.temperature).spec
        elif isinstance(self.temperature, str):
            raise ValueError(
                f"temperature must be a number > 0, 'auto' or 'auto:R', got {self.temperature!r}"
            )
        elif _number("temperature", self.temperature) <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        for name, low, strict in (("lam", 0, False), ("lr", 0, True), ("epochs", 0, True)):
            value = _number(name, getattr(self, name))
            if value < low or (strict and value == low):
                raise ValueError(f"{name} must be {'>' if strict else '>='} {low}, got {value:g}")
        _number("weight_decay", self.weight_decay)
        if _number("warmup_epochs", self.warmup_epochs) < 0:
            raise ValueError(f"warmup_epochs must be >= 0, got {self.warmup_epochs}")
        for name in ("batch_size", "grad_accum", "max_length"):
            _positive_int(name, getattr(self, name))
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {self.max_length}")
        if self.pack_tokens is not None and (not isinstance(self.pack_tokens, int) or self.pack_tokens < 2):
            raise ValueError(f"pack_tokens must be an int >= 2, got {self.pack_tokens!r}")
        if isinstance(self.lora_r, bool) or not isinstance(self.lora_r, int) or self.lora_r < 0:
            raise ValueError(f"lora_r must be an int >= 0, got {self.lora_r!r}")
        if _number("npo_beta", self.npo_beta) <= 0 or _number("simnpo_beta", self.simnpo_beta) <= 0:
            raise ValueError("npo_beta and simnpo_beta must be > 0")
        _number("simnpo_delta", self.simnpo_delta)
        if _number("simnpo_gamma", self.simnpo_gamma) < 0:
            raise ValueError(f"simnpo_gamma must be >= 0, got {self.simnpo_gamma}")

    def _check_storage_and_steps(self) -> None:
        if self.cache_dtype not in ("bfloat16", "float16", "float32"):
            raise ValueError(f"cache_dtype must be bfloat16, float16 or float32, got {self.cache_dtype!r}")
        if self.save_steps is not None and (not isinstance(self.save_steps, int) or self.save_steps < 1):
            raise ValueError(f"save_steps must be a positive int or None, got {self.save_steps!r}")
        steps = self.max_nonfinite_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"max_nonfinite_steps must be an int >= 0, got {steps!r}")

    def _move_field_args(self) -> None:
        """``method_args`` entries of parameters that have a field of their own go to that field."""
        args = dict(self.method_args)
        for p in get_method(self.method).params:
            if p.field is not None and p.name in args:
                setattr(self, p.field, args.pop(p.name))
        self.method_args = args
        self._check_numbers()  # the moved values

    def method_setup(self) -> MethodSetup:
        """The method, retain term and parameter values this config trains with (:mod:`asu.methods`)."""
        fields = {name: getattr(self, name) for name in PARAMETER_FIELDS}
        return method_setup(self.method, self.retain_loss, fields, self.method_args)

    def prompt_template(self) -> Template:
        """The :class:`asu.templates.Template` QA rows are rendered in (``auto`` not yet resolved).

        A template file is read once per config and the same template returned after (while ``template`` and
        ``system_prompt`` stay the same): a run encodes, previews and records one template even if the file
        is edited or removed while it runs."""
        key = (self.template if isinstance(self.template, (str, os.PathLike)) else id(self.template),
               self.system_prompt)  # fmt: skip
        memo = self.__dict__.get("_template_memo")
        if memo is not None and memo[0] == key:
            return memo[1]
        if self.system_prompt is None:
            template = get_template(self.template)
        else:
            template = get_template(self.template, system_prompt=self.system_prompt)
        self.__dict__["_template_memo"] = (key, template)
        return template

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)
