"""Unlearning a forget set from a causal LM: the Python API (:func:`unlearn`) and the ``asu unlearn`` command.

.. code-block:: python

    from asu.unlearn import UnlearnConfig, unlearn
    cfg = UnlearnConfig(method="asu", temperature=2.3, lam=0.1, retain_loss="nll", teacher="copy")
    result = unlearn(model, tokenizer, forget_rows, retain_rows, cfg, output_dir=None)
    result.model, result.history

The defaults are the paper's TOFU settings (Llama-2-7B-chat): ``tau = 2.3``, ``lam = 0.1``, retain ``nll``,
lr 1e-5 with one warm-up epoch then linear decay, weight decay 0.01, 5 epochs, effective batch 32
(8 x 4 accumulation), max length 500, bf16 on GPUs that support it.

``output_dir=None`` trains in memory and writes nothing. With a directory, checkpoints go to
``DIR/checkpoints`` while training (``resume=True`` continues from the newest one); only after a run
finishes are the model (safetensors, or the adapter for LoRA), the tokenizer and ``run.json`` moved into
``DIR`` (``run.json`` last: its presence marks a finished run).

What a run with a directory guarantees (README "Guarantees"):

* the directory is checked before any work: not a file, not the model's own folder (``model.name_or_path``)
  nor inside or around it, no finished run in it, no interrupted one unless ``resume=True``;
* it is locked for the run (:func:`asu.files.output_lock`): a second run into it fails at once; the stale
  temporary files and scratch folders of a killed run are removed when the lock is taken;
* ``resume=True`` refuses a run whose settings, forget/retain rows, IDK answers or tokenizer differ from the
  interrupted one's (``checkpoints/unlearn_config.json`` and ``checkpoints/data_fingerprint.json``);
* a non-finite loss or gradient norm stops the run (:class:`asu.trainer.NonFiniteWatch`, after
  ``max_nonfinite_steps`` skipped steps) with the checkpoints written so far kept and no model written, and a
  model with non-finite weights is never written.
"""

from __future__ import annotations

import contextlib
import dataclasses
import json
import logging
import math
import os
import random
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from asu.data import (
    PackingCollator,
    PaddingCollator,
    Rows,
    UnlearnDataset,
    encode_rows,
    rows_fingerprint,
    tokenizer_fingerprint,
    validate_rows,
)
from asu.distributed import barrier, check_launch, complete_checkpoints, engine, is_main_process
from asu.environment import library_versions
from asu.files import (
    atomic_write_json,
    check_not_in_use,
    check_output_location,
    output_lock,
    remove_stale_temporaries,
)
from asu.losses import (
    DEFAULTS,
    RETAIN_LOSS_ALIASES,
    RETAIN_REDUCTIONS,
    UnlearnObjective,
    resolve_method,
    resolve_retain_loss,
    teacher_outputs_needed,
    uses_teacher,
)
from asu.models import ModelError, check_finite_weights
from asu.smoothing import attention_modules, parse_layers
from asu.tau import TauChoice, choose_temperature, is_auto, parse_auto
from asu.teachers import TEACHER_SOURCES, Teacher, build_teacher, is_peft_model
from asu.templates import Template, describe_template, get_template
from asu.undo import check_shrink_perturb, shrink_perturb_student

__all__ = ["UnlearnConfig", "UnlearnResult", "unlearn", "check_output_dir", "LR_SCHEDULES"]

RUN_FILE = "run.json"
CHECKPOINTS = "checkpoints"
CONFIG_FILE = "unlearn_config.json"
FINGERPRINT_FILE = "data_fingerprint.json"
#: Settings a resumed run may change: they do not change what a healthy run computes.
RESUMABLE_CHANGES = ("progress", "preset", "max_nonfinite_steps")
#: The automatic temperature chosen for a run, kept beside its checkpoints so a resumed run reuses it.
TAU_FILE = "temperature_auto.json"
#: Methods whose forget term reads the smoothed teacher (the only ones the temperature matters to).
SMOOTHED_METHODS = ("asu", "asu-attn")

log = logging.getLogger(__name__)
#: ``linear``: warm-up then linear decay to 0 (the paper's TOFU runs); ``constant``: warm-up then constant
#: (the authors' MUSE runs).
LR_SCHEDULES = ("linear", "constant")


@dataclass
class UnlearnConfig:
    """Everything that defines an unlearning run (see the module docstring for the defaults' origin).

    Attributes:
        method: ``asu|asu-attn|ga|gd|npo|simnpo|idk`` (``asu-attn``: EXPERIMENTAL attention-map distillation,
            see :mod:`asu.losses`; ``graddiff`` is another name of ``gd``, GradDiff).
        temperature: attention temperature ``tau > 0`` of the forget-teacher (ASU), or ``"auto"`` /
            ``"auto:R"``: chosen before training by bisecting the smoothed-teacher preview until the teacher's
            forget ROUGE-L is ``R`` times the original model's (:mod:`asu.tau`; default ``R`` 0.5). The
            chosen value and the preview curve are in ``result.stats["temperature_auto"]`` and ``run.json``.
        lam: weight ``lambda >= 0`` of the ASU term in ``lambda * L_ASU + L_R``.
        retain_loss: ``nll`` or ``kl`` (KL to the original model at ``tau = 1``); ``gd``, the former name of
            ``nll``, is accepted with a ``DeprecationWarning``.
        retain_reduction: ``sequence`` (per-sequence mean, then the mean over sequences, as the ASU term) or
            ``token`` (token mean over the batch) for the ``kl`` retain term; ``nll`` is always a token mean.
        teacher: ``copy`` (frozen copy), ``base`` (PEFT student with adapters off), ``cache``, or ``self``
            (``asu-attn`` only: self-smoothing, the student's own detached attention at ``tau``; no teacher
            model). ``asu-attn`` takes ``copy``, ``base`` or ``self``, never ``cache``.
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
        seed: seeds model-independent randomness, the forget/retain pairing and the data order.
        bf16: bf16 mixed precision; ``None`` = on where a CUDA GPU supports it.
        gradient_checkpointing: recompute activations in backward.
        lora_r: LoRA rank (0 = full fine-tuning); ``lora_alpha`` defaults to ``2 r``; ``lora_target`` is
            PEFT's ``target_modules`` (``"all-linear"`` = every projection, not the LM head).
        cache_dtype, cache_dir: storage of the ``cache`` teacher (bf16 in CPU memory by default).
        npo_beta, simnpo_beta, simnpo_delta, simnpo_gamma: baseline hyper-parameters.
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
    retain_loss: str = "nll"
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
    npo_beta: float = DEFAULTS["npo_beta"]
    simnpo_beta: float = DEFAULTS["simnpo_beta"]
    simnpo_delta: float = DEFAULTS["simnpo_delta"]
    simnpo_gamma: float = DEFAULTS["simnpo_gamma"]
    save_steps: int | None = None
    max_steps: int = -1
    keep_checkpoints: bool = False
    max_nonfinite_steps: int = 0
    progress: bool = True
    shrink_perturb: tuple[float, float] | None = None

    def validate(self) -> None:
        """Raise ValueError/TypeError naming the first bad field; other accepted names (``graddiff``, the
        deprecated retain loss ``gd``, layers ``"all"``) are replaced by the canonical ones."""

        def number(name: str, value: Any) -> float:
            if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
                raise TypeError(f"{name} must be a finite number, got {value!r}")
            return float(value)

        self.method = resolve_method(self.method)
        self.retain_loss = resolve_retain_loss(self.retain_loss)
        if self.retain_reduction not in RETAIN_REDUCTIONS:
            choices = ", ".join(RETAIN_REDUCTIONS)
            raise ValueError(f"unknown retain_reduction {self.retain_reduction!r}; choose one of {choices}")
        if self.lr_schedule not in LR_SCHEDULES:
            choices = ", ".join(LR_SCHEDULES)
            raise ValueError(f"unknown lr_schedule {self.lr_schedule!r}; choose one of {choices}")
        self.prompt_template()  # an unknown name or a missing file fails here
        if self.teacher not in TEACHER_SOURCES:
            raise ValueError(f"unknown teacher {self.teacher!r}; choose one of {', '.join(TEACHER_SOURCES)}")
        if is_auto(self.temperature):
            self.temperature = parse_auto(self.temperature).spec
        elif isinstance(self.temperature, str):
            raise ValueError(
                f"temperature must be a number > 0, 'auto' or 'auto:R', got {self.temperature!r}"
            )
        elif number("temperature", self.temperature) <= 0:
            raise ValueError(f"temperature must be > 0, got {self.temperature}")
        if number("lam", self.lam) < 0:
            raise ValueError(f"lam must be >= 0, got {self.lam}")
        if number("lr", self.lr) <= 0:
            raise ValueError(f"lr must be > 0, got {self.lr}")
        if number("epochs", self.epochs) <= 0:
            raise ValueError(f"epochs must be > 0, got {self.epochs}")
        number("weight_decay", self.weight_decay)
        if number("warmup_epochs", self.warmup_epochs) < 0:
            raise ValueError(f"warmup_epochs must be >= 0, got {self.warmup_epochs}")
        for name in ("batch_size", "grad_accum", "max_length"):
            value = getattr(self, name)
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"{name} must be a positive int, got {value!r}")
        if self.max_length < 2:
            raise ValueError(f"max_length must be >= 2, got {self.max_length}")
        if self.pack_tokens is not None and (not isinstance(self.pack_tokens, int) or self.pack_tokens < 2):
            raise ValueError(f"pack_tokens must be an int >= 2, got {self.pack_tokens!r}")
        if isinstance(self.lora_r, bool) or not isinstance(self.lora_r, int) or self.lora_r < 0:
            raise ValueError(f"lora_r must be an int >= 0, got {self.lora_r!r}")
        if self.method == "asu-attn" and self.teacher == "cache":
            raise ValueError(
                "method='asu-attn' cannot use teacher='cache' (the cache holds hidden states, not attention "
                "q, k); use teacher 'copy', 'base' or 'self'"
            )
        if self.method == "asu-attn" and self.gradient_checkpointing:
            # The q/k capture hooks run in the forward only; checkpoint recomputation would see another graph.
            raise ValueError("method='asu-attn' does not support gradient_checkpointing (yet); turn it off")
        if self.teacher == "self" and teacher_outputs_needed(self.method, self.retain_loss):
            raise ValueError(
                f"teacher='self' (self-smoothing) is for method='asu-attn' only; method={self.method!r} with "
                f"retain_loss={self.retain_loss!r} needs teacher 'copy', 'base' or 'cache'"
            )
        if self.teacher == "base" and self.lora_r == 0:
            raise ValueError(
                "teacher='base' needs a LoRA student (lora_r > 0); use teacher='copy' or 'cache'"
            )
        if self.cache_dtype not in ("bfloat16", "float16", "float32"):
            raise ValueError(f"cache_dtype must be bfloat16, float16 or float32, got {self.cache_dtype!r}")
        if self.save_steps is not None and (not isinstance(self.save_steps, int) or self.save_steps < 1):
            raise ValueError(f"save_steps must be a positive int or None, got {self.save_steps!r}")
        steps = self.max_nonfinite_steps
        if isinstance(steps, bool) or not isinstance(steps, int) or steps < 0:
            raise ValueError(f"max_nonfinite_steps must be an int >= 0, got {steps!r}")
        if number("npo_beta", self.npo_beta) <= 0 or number("simnpo_beta", self.simnpo_beta) <= 0:
            raise ValueError("npo_beta and simnpo_beta must be > 0")
        if isinstance(self.layers, str) and self.layers.strip().lower() == "all":
            self.layers = None
        self.shrink_perturb = check_shrink_perturb(self)

    def prompt_template(self) -> Template:
        """The :class:`asu.templates.Template` QA rows are rendered in (``auto`` not yet resolved)."""
        if self.system_prompt is None:
            return get_template(self.template)
        return get_template(self.template, system_prompt=self.system_prompt)

    def to_dict(self) -> dict[str, Any]:
        return dataclasses.asdict(self)


@dataclass
class UnlearnResult:
    """What :func:`unlearn` returns.

    Attributes:
        model: the unlearned student (a PEFT model when LoRA was used).
        history: one dict per logged optimizer step: ``step``, ``epoch``, ``loss``, ``forget_loss``,
            ``retain_loss`` (when there is one), ``learning_rate``, ``grad_norm``.
        stats: teacher numbers (forward passes, bytes), steps, effective batch size, wall time.
        output_dir: where the result was written, or None.
    """

    model: nn.Module
    history: list[dict[str, Any]]
    stats: dict[str, Any]
    output_dir: str | None = None


def _idk_examples(tokenizer: Any, forget_rows: Sequence[dict], answers: Sequence[str], cfg: UnlearnConfig):
    rng = random.Random(cfg.seed)
    rows = [{"question": r["question"], "answer": rng.choice(list(answers))} for r in forget_rows]
    return encode_rows(tokenizer, rows, cfg.max_length, source="idk", template=cfg.prompt_template())


def _checkpoints(directory: str) -> list[str]:
    if not os.path.isdir(directory):
        return []
    found = [d for d in os.listdir(directory) if d.startswith("checkpoint-") and d.split("-")[-1].isdigit()]
    return sorted(found, key=lambda d: int(d.split("-")[-1]))


def check_output_dir(output_dir: str, resume: bool) -> None:
    """Refuse to overwrite a finished run, or to start over an interrupted one without ``resume``."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ValueError(f"--out {output_dir} exists and is not a directory")
    if is_main_process():
        # Only the main process takes the folder's lock (_claimed_output), so under a multi-process
        # launch the other ranks would find it held by their own job's main process.
        check_not_in_use(output_dir)
    ckpt_dir = os.path.join(output_dir, CHECKPOINTS)
    if resume:
        if not complete_checkpoints(ckpt_dir):
            raise ValueError(f"nothing to resume: {ckpt_dir} holds no complete checkpoint")
        return
    if os.path.exists(os.path.join(output_dir, RUN_FILE)):
        raise ValueError(
            f"{output_dir} already holds a finished run ({RUN_FILE}); choose another output directory"
        )
    if _checkpoints(ckpt_dir):
        raise ValueError(
            f"{output_dir} holds checkpoints of an interrupted run; resume it or choose another directory"
        )


def unlearn(
    model: nn.Module,
    tokenizer: Any,
    forget_rows: Rows,
    retain_rows: Rows | None,
    cfg: UnlearnConfig | None = None,
    output_dir: str | None = None,
    *,
    idk_answers: Sequence[str] | None = None,
    resume: bool = False,
    callbacks: Sequence[Any] | None = None,
    teacher_model: nn.Module | None = None,
) -> UnlearnResult:
    """Unlearn ``forget_rows`` from ``model`` (trained in place), keeping ``retain_rows``.

    Args:
        model: a transformers causal LM (not yet PEFT-wrapped; ``cfg.lora_r > 0`` wraps it).
        tokenizer: its tokenizer (a pad token is not required).
        forget_rows, retain_rows: TOFU-format rows (``question``/``answer``) or raw-text rows (``text``).
            ``retain_rows`` may be None only for ``method="ga"``.
        cfg: the run's settings (:class:`UnlearnConfig`; defaults = the paper's TOFU settings).
        output_dir: where to write checkpoints and the result; ``None`` writes nothing.
        idk_answers: refusal strings for ``method="idk"``.
        resume: continue from the newest checkpoint in ``output_dir/checkpoints``.
        callbacks: extra ``transformers.TrainerCallback`` objects.
        teacher_model: the model the copy teacher is made from, instead of ``model`` (continual
            unlearning anchored at the original model: :mod:`asu.continual`); ``teacher="copy"`` only. The
            automatic temperature is previewed on it too.

    Returns:
        :class:`UnlearnResult`.
    """
    cfg = _checked_config(cfg)
    layers = _check_inputs(model, forget_rows, retain_rows, cfg, output_dir, idk_answers, resume)
    if teacher_model is not None and cfg.teacher != "copy":
        raise ValueError(f"teacher_model needs teacher='copy', got teacher={cfg.teacher!r}")
    start = time.perf_counter()
    data = _encode_data(tokenizer, forget_rows, retain_rows, idk_answers, cfg)
    # Launch problems (batch vs world size, DeepSpeed config vs the run) fail here, before any training.
    check_launch(cfg, len(data.dataset), model_config=getattr(model, "config", None))
    collator = _build_collator(data, cfg)
    if output_dir is None:
        scratch = tempfile.mkdtemp(prefix="asu-unlearn-")
        try:
            return _run(
                model, tokenizer, cfg, layers, data, collator, callbacks, scratch, None, False, start,
                forget_rows=forget_rows, teacher_model=teacher_model,
            )  # fmt: skip
        finally:
            shutil.rmtree(scratch, ignore_errors=True)
    fingerprint = _data_fingerprint(forget_rows, retain_rows, idk_answers, tokenizer)
    trainer_dir = os.path.join(output_dir, CHECKPOINTS)
    with _claimed_output(output_dir, resume) as created_out:
        try:
            _save_or_compare_config(trainer_dir, cfg, resume, fingerprint=fingerprint)
            return _run(
                model,
                tokenizer,
                cfg,
                layers,
                data,
                collator,
                callbacks,
                trainer_dir,
                output_dir,
                resume,
                start,
                forget_rows=forget_rows,
                teacher_model=teacher_model,
            )
        except BaseException:
            if not _checkpoints(trainer_dir) and is_main_process():
                # Nothing a resume could use: leave the folder as it was found (a new one is removed).
                shutil.rmtree(output_dir if created_out else trainer_dir, ignore_errors=True)
            raise


def _run(
    model: nn.Module,
    tokenizer: Any,
    cfg: UnlearnConfig,
    layers: list[int] | None,
    data: _Data,
    collator: PackingCollator | PaddingCollator,
    callbacks: Sequence[Any] | None,
    trainer_dir: str,
    output_dir: str | None,
    resume: bool,
    start: float,
    *,
    forget_rows: Rows,
    teacher_model: nn.Module | None,
) -> UnlearnResult:
    """Train and (with ``output_dir``) write the result; the body of :func:`unlearn`."""
    from asu.trainer import NonFiniteTrainingError

    plan = _plan(cfg, len(data.dataset))
    args = _training_arguments(cfg, plan, trainer_dir, checkpoints=output_dir is not None)
    model.to(args.device)
    if teacher_model is not None:
        teacher_model.to(args.device)
    tau_choice = _resolve_temperature(
        teacher_model if teacher_model is not None else model, tokenizer, forget_rows, cfg, layers,
        trainer_dir if output_dir is not None else None, resume,
    )  # fmt: skip
    run_cfg = cfg if tau_choice is None else dataclasses.replace(cfg, temperature=tau_choice.temperature)
    if is_auto(run_cfg.temperature):
        # A method that never smooths: the teacher (NPO's reference, the KL retain term) runs at tau 1.
        run_cfg = dataclasses.replace(cfg, temperature=1.0)
    student, teacher = _student_and_teacher(model, run_cfg, layers, data, teacher_model)
    shrink_perturb_student(student, run_cfg)
    objective = _build_objective(student, teacher, run_cfg)
    trainer = _build_trainer(objective, args, data, collator, tokenizer, callbacks, cfg)
    _train(trainer, trainer_dir if output_dir is not None else None, resume)
    wall = time.perf_counter() - start
    stats = _stats(trainer, cfg, data, plan, teacher, wall, args.device)
    stats["temperature"] = run_cfg.temperature
    if tau_choice is not None:
        stats["temperature_auto"] = tau_choice.to_dict()
    result = UnlearnResult(model=student, history=_history(trainer), stats=stats, output_dir=output_dir)
    if engine() in ("single", "ddp"):
        try:
            check_finite_weights(student, "the unlearned model")
        except ModelError as e:
            raise NonFiniteTrainingError(f"{e}; no model was written", trainer.state.global_step) from None
    if output_dir is not None:
        _write_output(trainer, result, trainer_dir, tokenizer, cfg)
    return result


@contextlib.contextmanager
def _claimed_output(output_dir: str, resume: bool) -> Any:
    """Lock ``output_dir`` for the run (main process; created if missing), check it again now that no other
    run can change it, and remove what killed runs left; yields whether this run created the folder."""
    created = not os.path.isdir(output_dir)
    if not is_main_process():
        os.makedirs(output_dir, exist_ok=True)  # every rank gets here; exist_ok tolerates the race
        yield created
        return
    with output_lock(output_dir):
        check_output_dir(output_dir, resume)
        for folder in (output_dir, os.path.join(output_dir, CHECKPOINTS)):
            for name in remove_stale_temporaries(folder):
                log.warning(f"removed {os.path.join(folder, name)}, left by an interrupted run")
        yield created


# -- the steps of unlearn(), in order ---------------------------------------------------------------------


def _checked_config(cfg: UnlearnConfig | None) -> UnlearnConfig:
    cfg = UnlearnConfig() if cfg is None else cfg
    if not isinstance(cfg, UnlearnConfig):
        raise TypeError(f"cfg must be an UnlearnConfig, got {type(cfg).__name__}")
    cfg.validate()
    return cfg


def _check_inputs(
    model: nn.Module,
    forget_rows: Rows,
    retain_rows: Rows | None,
    cfg: UnlearnConfig,
    output_dir: str | None,
    idk_answers: Sequence[str] | None,
    resume: bool,
) -> list[int] | None:
    """Everything that can be checked before any work; returns the smoothed layers (None = all)."""
    if not isinstance(model, nn.Module) or not hasattr(model, "get_decoder"):
        raise TypeError(f"model must be a transformers causal LM, got {type(model).__name__}")
    if is_peft_model(model):
        raise ValueError("pass the plain model; unlearn() adds LoRA itself when cfg.lora_r > 0")
    num_layers = len(attention_modules(model))
    layers = None if cfg.layers is None else parse_layers(cfg.layers, num_layers)
    validate_rows(forget_rows, source="forget")
    if cfg.method != "ga":
        if retain_rows is None:
            raise ValueError(f"method={cfg.method!r} needs retain rows")
        validate_rows(retain_rows, source="retain")
    if cfg.method == "idk" and not idk_answers:
        raise ValueError("method='idk' needs idk_answers (refusal strings, e.g. from --idk-file)")
    if output_dir is not None:
        source = getattr(model, "name_or_path", None)
        if isinstance(source, str) and source and os.path.isdir(source):
            check_output_location(output_dir, {"model's": source}, flag="output_dir")
        check_output_dir(output_dir, resume)
    elif resume:
        raise ValueError("resume=True needs an output_dir")
    return layers


@dataclass
class _Data:
    """The encoded examples of a run (``retain`` None for ``ga``, ``idk`` only for ``idk``)."""

    forget: list[dict[str, Any]]
    retain: list[dict[str, Any]] | None
    idk: list[dict[str, Any]] | None
    dataset: UnlearnDataset
    pad_id: int


def _encode_data(
    tokenizer: Any,
    forget_rows: Rows,
    retain_rows: Rows | None,
    idk_answers: Sequence[str] | None,
    cfg: UnlearnConfig,
) -> _Data:
    template = cfg.prompt_template()
    forget = encode_rows(tokenizer, forget_rows, cfg.max_length, source="forget", template=template)
    retain = None
    if cfg.method != "ga":
        retain = encode_rows(tokenizer, retain_rows, cfg.max_length, source="retain", template=template)
    idk = _idk_examples(tokenizer, forget_rows, idk_answers, cfg) if cfg.method == "idk" else None
    dataset = UnlearnDataset(forget, retain, seed=cfg.seed, idk=idk)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    return _Data(forget, retain, idk, dataset, pad_id)


def _build_collator(data: _Data, cfg: UnlearnConfig) -> PackingCollator | PaddingCollator:
    if not cfg.pack:
        return PaddingCollator(pad_token_id=data.pad_id)
    budget = cfg.pack_tokens or cfg.max_length
    parts = (data.forget, data.retain or [], data.idk or [])
    longest = max(len(ex["input_ids"]) for part in parts for ex in part)
    if longest > budget:
        # Fail now rather than at the first batch that holds the long example.
        raise ValueError(f"pack_tokens={budget} is shorter than the longest example ({longest} tokens)")
    return PackingCollator(max_tokens=budget, pad_token_id=data.pad_id)


@dataclass
class _Plan:
    """Steps per epoch under the launch's world size, and the precision."""

    world: int
    micro_per_epoch: int
    steps_per_epoch: int
    cuda: bool
    bf16: bool


def _plan(cfg: UnlearnConfig, num_examples: int) -> _Plan:
    cuda = torch.cuda.is_available()
    bf16 = cfg.bf16 if cfg.bf16 is not None else bool(cuda and torch.cuda.is_bf16_supported())
    world = int(os.environ.get("WORLD_SIZE", "1"))
    micro_per_epoch = math.ceil(num_examples / (cfg.batch_size * world))
    steps_per_epoch = max(1, math.ceil(micro_per_epoch / cfg.grad_accum))
    return _Plan(world, micro_per_epoch, steps_per_epoch, cuda, bf16)


def _training_arguments(cfg: UnlearnConfig, plan: _Plan, trainer_dir: str, *, checkpoints: bool) -> Any:
    """``transformers.TrainingArguments``: AdamW, linear warm-up then decay, one log per optimizer step."""
    from transformers import TrainingArguments

    return TrainingArguments(
        output_dir=trainer_dir,
        per_device_train_batch_size=cfg.batch_size,
        gradient_accumulation_steps=cfg.grad_accum,
        learning_rate=cfg.lr,
        num_train_epochs=cfg.epochs,
        max_steps=cfg.max_steps,
        weight_decay=cfg.weight_decay,
        warmup_steps=int(round(cfg.warmup_epochs * plan.steps_per_epoch)),
        lr_scheduler_type=_scheduler(cfg),
        bf16=plan.bf16,
        logging_steps=1,
        save_strategy="no" if not checkpoints else ("epoch" if cfg.save_steps is None else "steps"),
        save_steps=cfg.save_steps or 500,
        save_total_limit=1,
        report_to=[],
        seed=cfg.seed,
        data_seed=cfg.seed,
        remove_unused_columns=False,
        dataloader_num_workers=0,
        disable_tqdm=not cfg.progress,
        use_cpu=not plan.cuda,
    )


def _scheduler(cfg: UnlearnConfig) -> str:
    """transformers' name of the schedule: linear decay, or constant after an optional warm-up."""
    if cfg.lr_schedule == "linear":
        return "linear"
    return "constant_with_warmup" if cfg.warmup_epochs > 0 else "constant"


def _resolve_temperature(
    source: nn.Module,
    tokenizer: Any,
    forget_rows: Rows,
    cfg: UnlearnConfig,
    layers: list[int] | None,
    trainer_dir: str | None,
    resume: bool,
) -> TauChoice | None:
    """The automatic temperature (None when ``cfg.temperature`` is a number or the method never smooths).

    Previewed on ``source`` (the model the teacher is made from) before any training; a run that writes
    checkpoints keeps the choice beside them, and a resumed run reuses it instead of previewing again.
    """
    if not is_auto(cfg.temperature) or cfg.method not in SMOOTHED_METHODS:
        return None
    saved = os.path.join(trainer_dir, TAU_FILE) if trainer_dir is not None else None
    if resume and saved is not None and os.path.exists(saved):
        with open(saved) as f:
            record = json.load(f)
        return TauChoice(**record)
    choice = choose_temperature(
        source, tokenizer, forget_rows, cfg.temperature, layers=layers, template=cfg.prompt_template(),
        batch_size=max(cfg.batch_size, 8), seed=cfg.seed,
    )  # fmt: skip
    if saved is not None and is_main_process():
        atomic_write_json(saved, choice.to_dict())
    return choice


def _student_and_teacher(
    model: nn.Module,
    cfg: UnlearnConfig,
    layers: list[int] | None,
    data: _Data,
    teacher_model: nn.Module | None = None,
) -> tuple[nn.Module, Teacher | None]:
    """The student (``model``, wrapped with LoRA when ``cfg.lora_r > 0``) and the teacher the objective
    reads (None when it reads none).

    The copy teacher is copied (from ``teacher_model`` when given, else from ``model``) before LoRA is
    injected (``get_peft_model`` edits the model in place); the base teacher is the PEFT student itself; the
    cache teacher runs the student once with adapters off.
    """
    wants_teacher = uses_teacher(cfg.method, cfg.retain_loss)
    teacher = None
    if wants_teacher and cfg.teacher == "copy":
        source = teacher_model if teacher_model is not None else model
        teacher = build_teacher("copy", source, cfg.temperature, layers)
    elif wants_teacher and cfg.teacher == "self":
        teacher = build_teacher(cfg.teacher, model, cfg.temperature, layers)
    student = _wrap_student(model, cfg)
    if wants_teacher and cfg.teacher == "base":
        teacher = build_teacher("base", student, cfg.temperature, layers)
    needs = teacher_outputs_needed(cfg.method, cfg.retain_loss)
    if needs and cfg.teacher == "cache":
        sets = {"forget": data.forget}
        if data.retain is not None:
            sets["retain"] = data.retain
        teacher = build_teacher(
            "cache",
            student,
            cfg.temperature,
            layers,
            sets=sets,
            needs=needs,
            dtype=getattr(torch, cfg.cache_dtype),
            directory=cfg.cache_dir,
            batch_size=cfg.batch_size,
            pad_token_id=data.pad_id,
        )
    return student, teacher


def _wrap_student(model: nn.Module, cfg: UnlearnConfig) -> nn.Module:
    """LoRA adapters (when ``cfg.lora_r > 0``) and gradient checkpointing (when asked)."""
    student = model
    if cfg.lora_r > 0:
        from peft import LoraConfig, get_peft_model

        lora = LoraConfig(
            r=cfg.lora_r,
            lora_alpha=cfg.lora_alpha or 2 * cfg.lora_r,
            lora_dropout=cfg.lora_dropout,
            target_modules=cfg.lora_target,
            task_type="CAUSAL_LM",
        )
        student = get_peft_model(model, lora)
    if cfg.gradient_checkpointing:
        student.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})
        if is_peft_model(student):
            # Without it, checkpointed blocks whose inputs need no grad leave LoRA weights untrained.
            student.enable_input_require_grads()
    return student


#: The :class:`UnlearnObjective` options, each taken from the :class:`UnlearnConfig` field of the same name.
_OBJECTIVE_OPTIONS = (
    "method",
    "retain_loss",
    "lam",
    "npo_beta",
    "simnpo_beta",
    "simnpo_delta",
    "simnpo_gamma",
    "retain_reduction",
)


def _build_objective(student: nn.Module, teacher: Teacher | None, cfg: UnlearnConfig) -> UnlearnObjective:
    return UnlearnObjective(
        student, teacher=teacher, **{name: getattr(cfg, name) for name in _OBJECTIVE_OPTIONS}
    )


def _data_fingerprint(
    forget_rows: Rows,
    retain_rows: Rows | None,
    idk_answers: Sequence[str] | None,
    tokenizer: Any,
) -> dict[str, str | None]:
    """SHA-256 digests of what a run's examples are made of besides its settings."""
    return {
        "forget rows": rows_fingerprint(forget_rows),
        "retain rows": None if retain_rows is None else rows_fingerprint(retain_rows),
        "IDK answers": None if idk_answers is None else rows_fingerprint(list(idk_answers)),
        "tokenizer": tokenizer_fingerprint(tokenizer),
    }


def _compare_fingerprint(trainer_dir: str, fingerprint: dict[str, str | None]) -> None:
    path = os.path.join(trainer_dir, FINGERPRINT_FILE)
    if not os.path.exists(path):
        log.warning(f"{trainer_dir} records no data fingerprint (an older run): the data is not checked")
        return
    with open(path, encoding="utf-8") as f:
        before = json.load(f)
    changed = [k for k in fingerprint if before.get(k) != fingerprint[k]]
    if changed:
        raise ValueError(
            f"cannot resume with different data: {', '.join(changed)} changed since the run was started; "
            "resume with the same files and tokenizer, or start a new run in another folder"
        )


def _save_or_compare_config(
    trainer_dir: str, cfg: UnlearnConfig, resume: bool, fingerprint: dict[str, str | None] | None = None
) -> None:
    """A new run saves its settings (and ``fingerprint``, the digests of its data) beside its checkpoints; a
    resumed one must have the same settings and data."""
    os.makedirs(trainer_dir, exist_ok=True)
    saved_cfg = os.path.join(trainer_dir, CONFIG_FILE)
    if resume and fingerprint is not None:
        _compare_fingerprint(trainer_dir, fingerprint)
    if resume and os.path.exists(saved_cfg):
        with open(saved_cfg) as f:
            before = json.load(f)
        # A run saved under a deprecated retain-loss name resumes under the canonical one.
        retain = before.get("retain_loss")
        before["retain_loss"] = RETAIN_LOSS_ALIASES.get(retain, retain)
        now = json.loads(json.dumps(cfg.to_dict(), default=str))
        # Settings that did not exist when the run was saved behaved then as these values do now (the kl
        # retain term was a token mean; for nll the reduction changes nothing).
        legacy = json.loads(json.dumps(UnlearnConfig().to_dict(), default=str))
        legacy["retain_reduction"] = "token" if before["retain_loss"] == "kl" else now["retain_reduction"]
        changed = sorted(
            k for k in now if k not in RESUMABLE_CHANGES and before.get(k, legacy.get(k)) != now[k]
        )
        if changed:
            raise ValueError(f"cannot resume with different settings: {', '.join(changed)} changed")
    elif is_main_process():
        atomic_write_json(saved_cfg, cfg.to_dict(), indent=2, default=str)
        if fingerprint is not None:
            atomic_write_json(os.path.join(trainer_dir, FINGERPRINT_FILE), fingerprint, indent=2)


def _build_trainer(
    objective: UnlearnObjective,
    args: Any,
    data: _Data,
    collator: PackingCollator | PaddingCollator,
    tokenizer: Any,
    callbacks: Sequence[Any] | None,
    cfg: UnlearnConfig,
) -> Any:
    from asu.trainer import UnlearnTrainer

    trainer = UnlearnTrainer(
        model=objective,
        args=args,
        train_dataset=data.dataset,
        data_collator=collator,
        processing_class=tokenizer,
        callbacks=list(callbacks or []),
        max_nonfinite_steps=cfg.max_nonfinite_steps,
    )
    if not cfg.progress:
        from transformers.trainer_callback import PrinterCallback

        trainer.remove_callback(PrinterCallback)  # quiet means quiet: no per-step dicts on stdout
    return trainer


def _train(trainer: Any, trainer_dir: str | None, resume: bool) -> None:
    """``trainer.train()``, from the newest complete checkpoint when resuming. ``trainer_dir``: where the
    run's checkpoints are (None: an in-memory run). A run stopped on a non-finite number says which
    checkpoint is kept."""
    from asu.trainer import NonFiniteTrainingError

    resume_from = None
    if resume:
        # The newest checkpoint every rank finished writing (a killed rank may leave a partial one).
        resume_from = os.path.join(trainer_dir, complete_checkpoints(trainer_dir)[-1])
    try:
        trainer.train(resume_from_checkpoint=resume_from)
    except NonFiniteTrainingError as e:
        kept = complete_checkpoints(trainer_dir) if trainer_dir is not None else []
        where = f"; the last good checkpoint, {os.path.join(trainer_dir, kept[-1])}, is kept" if kept else ""
        hint = "lower the learning rate, or let max_nonfinite_steps (--max-nonfinite-steps) skip such steps"
        raise NonFiniteTrainingError(f"{e}; no model was written{where}; {hint}", e.step) from None


def _history(trainer: Any) -> list[dict[str, Any]]:
    """One entry per logged optimizer step (see :class:`UnlearnResult`)."""
    keys = ("step", "epoch", "loss", "forget_loss", "retain_loss", "learning_rate", "grad_norm")
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    return [{k: entry[k] for k in keys if k in entry} for entry in logged]


def _stats(
    trainer: Any,
    cfg: UnlearnConfig,
    data: _Data,
    plan: _Plan,
    teacher: Teacher | None,
    wall: float,
    device: Any,
) -> dict[str, Any]:
    stats: dict[str, Any] = {
        "optimizer_steps": trainer.state.global_step,
        "skipped_nonfinite_steps": list(trainer.nonfinite_watch.skipped),
        "micro_batches_per_epoch": plan.micro_per_epoch,
        "effective_batch_size": cfg.batch_size * cfg.grad_accum * plan.world,
        "wall_time_s": wall,
        "num_forget": len(data.forget),
        "num_retain": 0 if data.retain is None else len(data.retain),
        "bf16": plan.bf16,
        "device": str(device),
    }
    if teacher is not None:
        stats["teacher"] = dict(teacher.stats)
        if cfg.teacher == "cache":
            # A copy/base teacher runs one forward per needed output per micro-batch, every epoch.
            needs = teacher_outputs_needed(cfg.method, cfg.retain_loss)
            would_run = plan.micro_per_epoch * math.ceil(cfg.epochs) * len(needs)
            saved = would_run - teacher.stats["teacher_forward_passes"]
            stats["teacher"]["teacher_forward_passes_saved"] = saved
    return stats


def _write_output(
    trainer: Any, result: UnlearnResult, trainer_dir: str, tokenizer: Any, cfg: UnlearnConfig
) -> None:
    """The finished run into ``result.output_dir`` (main process), the checkpoints dropped unless kept."""
    state_dict = None
    if engine() in ("fsdp", "deepspeed"):
        # Sharded weights: every rank takes part in gathering the full state dict (main gets it).
        full = trainer.accelerator.get_state_dict(trainer.model_wrapped)
        state_dict = {k[len("student.") :]: v for k, v in (full or {}).items() if k.startswith("student.")}
    if is_main_process():
        _write_result(result, tokenizer, cfg, state_dict=state_dict)
        if not cfg.keep_checkpoints:
            shutil.rmtree(trainer_dir, ignore_errors=True)
    barrier()  # no rank returns before the result is in place


def _write_result(
    result: UnlearnResult,
    tokenizer: Any,
    cfg: UnlearnConfig,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> None:
    """Model + tokenizer saved to a scratch directory, moved into place, then ``run.json`` last.

    ``state_dict``: the student's gathered weights when they are sharded (FSDP, ZeRO-3); main process only.
    """
    output_dir, student, stats = result.output_dir, result.model, result.stats
    tmp = tempfile.mkdtemp(dir=output_dir, prefix=".result-")
    try:
        student.save_pretrained(tmp, safe_serialization=True, state_dict=state_dict)
        tokenizer.save_pretrained(tmp)
        for name in os.listdir(tmp):
            os.replace(os.path.join(tmp, name), os.path.join(output_dir, name))
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    record = {
        "config": cfg.to_dict(),
        "seed": cfg.seed,
        "versions": library_versions(),
        "effective_batch_size": stats["effective_batch_size"],
        "wall_time_s": stats["wall_time_s"],
        "losses": result.history,
        "stats": stats,
        "lora": is_peft_model(student),
        "template": describe_template(cfg.prompt_template(), tokenizer),
        "temperature": stats.get("temperature", cfg.temperature),
    }
    if "temperature_auto" in stats:
        record["temperature_auto"] = stats["temperature_auto"]
    atomic_write_json(os.path.join(output_dir, RUN_FILE), record, indent=2, default=str)
