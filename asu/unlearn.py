"""Unlearning a forget set from a causal LM: the Python API, :func:`unlearn`.

.. code-block:: python

    from asu.unlearn import UnlearnConfig, unlearn
    cfg = UnlearnConfig(method="asu", temperature=2.3, lam=0.1, retain_loss="nll", teacher="copy")
    result = unlearn(model, tokenizer, forget_rows, retain_rows, cfg, output_dir=None)
    result.model, result.history

:class:`UnlearnConfig` (:mod:`asu.unlearn_config`) holds the settings, whose defaults are the paper's TOFU
settings; the methods, their retain terms and parameters are the registry's (:mod:`asu.methods`). The
``asu unlearn`` command (:mod:`asu.commands.unlearn`) is a thin layer over :func:`unlearn`.

``output_dir=None`` trains in memory and writes nothing. With a directory, checkpoints go to
``DIR/checkpoints`` while training (``resume=True`` continues from the newest one); only after a run
finishes are the model (safetensors, or the adapter for LoRA), the tokenizer and ``run.json`` moved into
``DIR`` (``run.json`` last: its presence marks a finished run). The folder's guarantees (checked before any
work, locked, fingerprinted for resuming, written atomically) are :mod:`asu.run_folder`'s. A non-finite loss
or gradient norm stops the run (:class:`asu.trainer.NonFiniteWatch`, after ``max_nonfinite_steps`` skipped
steps) with the checkpoints written so far kept and no model written, and a model with non-finite weights is
never written.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import math
import os
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
    validate_rows,
)
from asu.distributed import check_launch, complete_checkpoints, engine, is_main_process
from asu.files import atomic_write_json, check_output_location
from asu.losses import UnlearnObjective
from asu.methods import MethodSetup
from asu.methods.parts import FORGET_ALIGNED, RETAIN_ALIGNED, check_part_sources, part_rows
from asu.models import ModelError, check_finite_weights
from asu.run_folder import (
    CHECKPOINTS,
    TAU_FILE,
    check_output_dir,
    claimed_output,
    data_fingerprint,
    save_or_compare_config,
    write_output,
)
from asu.smoothing import attention_modules, parse_layers
from asu.tau import TauChoice, choose_temperature, is_auto
from asu.teachers import Teacher, build_teacher, is_peft_model
from asu.undo import shrink_perturb_student
from asu.unlearn_config import LR_SCHEDULES, UnlearnConfig

__all__ = ["UnlearnConfig", "UnlearnResult", "unlearn", "check_output_dir", "LR_SCHEDULES"]

log = logging.getLogger(__name__)


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
            ``retain_rows`` may be None only for methods without a retain term (``ga``, ``ceu``).
        cfg: the run's settings (:class:`UnlearnConfig`; defaults = the paper's TOFU settings).
        output_dir: where to write checkpoints and the result; ``None`` writes nothing.
        idk_answers: refusal strings, for the methods and retain terms that train on refusals (``idk``,
            ``asu-idk``, ``dpo``, retain ``ap``).
        resume: continue from the newest checkpoint in ``output_dir/checkpoints``.
        callbacks: extra ``transformers.TrainerCallback`` objects.
        teacher_model: the model the copy teacher is made from, instead of ``model`` (continual
            unlearning anchored at the original model: :mod:`asu.continual`); ``teacher="copy"`` only. The
            automatic temperature is previewed on it too.

    Returns:
        :class:`UnlearnResult`.
    """
    cfg = _checked_config(cfg)
    setup = cfg.method_setup()
    layers = _check_inputs(model, forget_rows, retain_rows, cfg, setup, output_dir, idk_answers, resume)
    if teacher_model is not None and cfg.teacher != "copy":
        raise ValueError(f"teacher_model needs teacher='copy', got teacher={cfg.teacher!r}")
    start = time.perf_counter()
    data = _encode_data(tokenizer, forget_rows, retain_rows, idk_answers, cfg, setup)
    # Launch problems (batch vs world size, DeepSpeed config vs the run) fail here, before any training.
    check_launch(cfg, len(data.dataset), model_config=getattr(model, "config", None))
    run = _Run(model, tokenizer, cfg, setup, layers, data, _build_collator(data, cfg), callbacks, start,
               forget_rows, teacher_model)  # fmt: skip
    if output_dir is None:
        with tempfile.TemporaryDirectory(prefix="asu-unlearn-", ignore_cleanup_errors=True) as scratch:
            return _train_and_write(run, scratch, None, resume=False)
    fingerprint = data_fingerprint(forget_rows, retain_rows, idk_answers, tokenizer, cfg.prompt_template())
    trainer_dir = os.path.join(output_dir, CHECKPOINTS)
    with claimed_output(output_dir, resume):
        _save_or_compare_config(trainer_dir, cfg, resume, fingerprint=fingerprint)
        return _train_and_write(run, trainer_dir, output_dir, resume)


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
    setup: MethodSetup,
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
    if "retain" in setup.parts:
        if retain_rows is None:
            raise ValueError(f"method={cfg.method!r} needs retain rows")
        validate_rows(retain_rows, source="retain")
    check_part_sources(setup.parts, cfg.method, forget_rows, retain_rows, idk_answers)
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
    """The encoded examples of a run: forget, retain (None without a retain term) and every rewrite the
    method trains on (``parts``, by name), in one dataset."""

    forget: list[dict[str, Any]]
    retain: list[dict[str, Any]] | None
    parts: dict[str, list[dict[str, Any]]]
    dataset: UnlearnDataset
    pad_id: int

    @property
    def sets(self) -> dict[str, list[dict[str, Any]]]:
        """Every encoded set by name (what a cache teacher builds its stores from)."""
        sets = {"forget": self.forget, **self.parts}
        if self.retain is not None:
            sets["retain"] = self.retain
        return sets


def _encode_data(
    tokenizer: Any,
    forget_rows: Rows,
    retain_rows: Rows | None,
    idk_answers: Sequence[str] | None,
    cfg: UnlearnConfig,
    setup: MethodSetup,
) -> _Data:
    template = cfg.prompt_template()

    def encode(rows: Rows, source: str) -> list[dict[str, Any]]:
        return encode_rows(tokenizer, rows, cfg.max_length, source=source, template=template)

    forget = encode(forget_rows, "forget")
    retain = encode(retain_rows, "retain") if "retain" in setup.parts else None
    parts = {
        p: encode(part_rows(p, forget_rows, retain_rows, idk_answers, cfg.seed), p)
        for p in setup.parts
        if p in FORGET_ALIGNED + RETAIN_ALIGNED
    }
    dataset = UnlearnDataset(
        forget, retain, seed=cfg.seed,
        extras={p: v for p, v in parts.items() if p in FORGET_ALIGNED},
        retain_extras={p: v for p, v in parts.items() if p in RETAIN_ALIGNED},
    )  # fmt: skip
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    return _Data(forget, retain, parts, dataset, pad_id)


def _build_collator(data: _Data, cfg: UnlearnConfig) -> PackingCollator | PaddingCollator:
    if not cfg.pack:
        return PaddingCollator(pad_token_id=data.pad_id)
    budget = cfg.pack_tokens or cfg.max_length
    longest = max(len(ex["input_ids"]) for part in data.sets.values() for ex in part)
    if longest > budget:
        # Fail now rather than at the first batch that holds the long example.
        raise ValueError(f"pack_tokens={budget} is shorter than the longest example ({longest} tokens)")
    return PackingCollator(max_tokens=budget, pad_token_id=data.pad_id)


@dataclass
class _Run:
    """What the training steps of one run need (the checked inputs of :func:`unlearn`)."""

    model: nn.Module
    tokenizer: Any
    cfg: UnlearnConfig
    setup: MethodSetup
    layers: list[int] | None
    data: _Data
    collator: PackingCollator | PaddingCollator
    callbacks: Sequence[Any] | None
    start: float
    forget_rows: Rows
    teacher_model: nn.Module | None


def _train_and_write(run: _Run, trainer_dir: str, output_dir: str | None, resume: bool) -> UnlearnResult:
    """Train and (with ``output_dir``) write the result: the body of :func:`unlearn`.

    The steps: plan the optimizer steps, place the models, choose the temperature, build the student and the
    teacher, let the method prepare the student, build the objective and the trainer, train, check the
    weights, write."""
    from asu.trainer import NonFiniteTrainingError

    cfg, data = run.cfg, run.data
    plan = _plan(cfg, len(data.dataset))
    args = _training_arguments(cfg, plan, trainer_dir, checkpoints=output_dir is not None)
    run.model.to(args.device)
    if run.teacher_model is not None:
        run.teacher_model.to(args.device)
    tau_choice = _resolve_temperature(run, trainer_dir if output_dir is not None else None, resume)
    run_cfg = cfg if tau_choice is None else dataclasses.replace(cfg, temperature=tau_choice.temperature)
    if is_auto(run_cfg.temperature):
        # A method that never smooths: the teacher (NPO's reference, the KL retain term) runs at tau 1.
        run_cfg = dataclasses.replace(cfg, temperature=1.0)
    student, teacher = _student_and_teacher(run.model, run_cfg, run.layers, data, run.teacher_model)
    if run.setup.method.prepare is not None:
        run.setup.method.prepare(student, run.setup.params)
    shrink_perturb_student(student, run_cfg)  # after prepare: only the weights the method trains
    objective = _build_objective(student, teacher, run_cfg)
    trainer = _build_trainer(objective, args, data, run.collator, run.tokenizer, run.callbacks, cfg)
    _train(trainer, trainer_dir if output_dir is not None else None, resume)
    stats = _stats(trainer, cfg, run.setup, data, plan, teacher, time.perf_counter() - run.start, args.device)
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
        write_output(trainer, result, trainer_dir, run.tokenizer, cfg)
    return result


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


def _resolve_temperature(run: _Run, trainer_dir: str | None, resume: bool) -> TauChoice | None:
    """The automatic temperature (None when ``cfg.temperature`` is a number or the method never smooths).

    Previewed on the model the teacher is made from, before any training; a run that writes checkpoints
    (``trainer_dir``) keeps the choice beside them, and a resumed run reuses it instead of previewing again.
    """
    cfg = run.cfg
    if not is_auto(cfg.temperature) or not run.setup.method.smoothed:
        return None
    saved = os.path.join(trainer_dir, TAU_FILE) if trainer_dir is not None else None
    if resume and saved is not None and os.path.exists(saved):
        with open(saved) as f:
            record = json.load(f)
        return TauChoice(**record)
    source = run.teacher_model if run.teacher_model is not None else run.model
    choice = choose_temperature(
        source, run.tokenizer, run.forget_rows, cfg.temperature, layers=run.layers,
        template=cfg.prompt_template(), batch_size=max(cfg.batch_size, 8), seed=cfg.seed,
        eos=run.setup.params.get("eos", "keep"),
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
    setup = cfg.method_setup()
    wants_teacher = setup.uses_teacher
    teacher = None
    if wants_teacher and cfg.teacher == "copy":
        source = teacher_model if teacher_model is not None else model
        teacher = build_teacher("copy", source, cfg.temperature, layers)
    elif wants_teacher and cfg.teacher == "self":
        teacher = build_teacher(cfg.teacher, model, cfg.temperature, layers)
    student = _wrap_student(model, cfg)
    if wants_teacher and cfg.teacher == "base":
        teacher = build_teacher("base", student, cfg.temperature, layers)
    needs = setup.teacher_reads
    if needs and cfg.teacher == "cache":
        teacher = build_teacher(
            "cache", student, cfg.temperature, layers, sets=data.sets, needs=needs,
            dtype=getattr(torch, cfg.cache_dtype), directory=cfg.cache_dir, batch_size=cfg.batch_size,
            pad_token_id=data.pad_id,
        )  # fmt: skip
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
        from asu.trainer import enable_activation_checkpointing

        enable_activation_checkpointing(student)
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
    "method_args",
    "seed",
)


def _build_objective(student: nn.Module, teacher: Teacher | None, cfg: UnlearnConfig) -> UnlearnObjective:
    return UnlearnObjective(
        student, teacher=teacher, **{name: getattr(cfg, name) for name in _OBJECTIVE_OPTIONS}
    )


def _save_or_compare_config(
    trainer_dir: str, cfg: UnlearnConfig, resume: bool, fingerprint: dict[str, str | None] | None = None
) -> None:
    """A new run saves its settings (and ``fingerprint``, the digests of its data) beside its checkpoints; a
    resumed one must have the same settings and data (:func:`asu.run_folder.save_or_compare_config`)."""
    save_or_compare_config(trainer_dir, cfg.to_dict(), UnlearnConfig().to_dict(), resume, fingerprint)


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
        hint = "lower the learning rate, or let max_nonfinite_steps skip such steps"
        raise NonFiniteTrainingError(f"{e}; no model was written{where}; {hint}", e.step) from None


def _history(trainer: Any) -> list[dict[str, Any]]:
    """One entry per logged optimizer step (see :class:`UnlearnResult`)."""
    keys = ("step", "epoch", "loss", "forget_loss", "retain_loss", "learning_rate", "grad_norm")
    logged = [entry for entry in trainer.state.log_history if "loss" in entry]
    return [{k: entry[k] for k in keys if k in entry} for entry in logged]


def _stats(
    trainer: Any,
    cfg: UnlearnConfig,
    setup: MethodSetup,
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
            would_run = plan.micro_per_epoch * math.ceil(cfg.epochs) * len(setup.teacher_reads)
            saved = would_run - teacher.stats["teacher_forward_passes"]
            stats["teacher"]["teacher_forward_passes_saved"] = saved
    return stats
