"""The unlearning trainer: a ``transformers.Trainer`` whose model is the :class:`asu.losses.UnlearnObjective`.

Handing the objective module (student inside) to the Trainer is what lets accelerate, DeepSpeed ZeRO and
FSDP wrap it as users know them: the loss, including the fused LM-head vocabulary ops, runs inside the
wrapped module's forward, where sharded weights are gathered. What differs from a stock Trainer:

* ``compute_loss`` calls the objective and keeps every loss term; ``log`` adds their means over the
  logging window (``forget_loss``, ``retain_loss``) next to Trainer's ``loss``.
* the terminal shows the progress bar only: the dict the Trainer prints for every logged step goes to the
  run's ``history`` (``run.json``) instead (:class:`ProgressBarOnly`, and no ``PrinterCallback``).
* ``_save`` writes the *student* (``save_pretrained``: safetensors, or only the adapter for a PEFT
  student) and the tokenizer, never the frozen teacher; ``_load_from_checkpoint`` reads it back into the
  student, so ``resume_from_checkpoint`` continues an interrupted run exactly (optimizer, scheduler, RNG
  and data order are restored by the Trainer).
"""

from __future__ import annotations

import logging
import math
import os
from typing import Any

import torch
from torch import nn
from transformers import Trainer, TrainerCallback
from transformers.trainer_callback import PrinterCallback, ProgressCallback

from asu.distributed import engine
from asu.losses import UnlearnObjective
from asu.models import ModelError, check_finite_weights
from asu.teachers import is_peft_model

__all__ = [
    "NonFiniteTrainingError",
    "NonFiniteWatch",
    "ProgressBarOnly",
    "UnlearnTrainer",
    "enable_activation_checkpointing",
    "student_of",
    "load_student_weights",
]

log = logging.getLogger(__name__)

_TERMS = ("forget_loss", "retain_loss")


def student_of(model: nn.Module) -> nn.Module:
    """The student inside a (possibly wrapped) objective."""
    inner = getattr(model, "module", model)  # DDP / DeepSpeed engine
    if not isinstance(inner, UnlearnObjective):
        raise TypeError(f"expected an UnlearnObjective, got {type(inner).__name__}")
    return inner.student


def _load_file(path: str) -> dict[str, torch.Tensor]:
    """safetensors' ``load_file``, a truncated or corrupt file named in a ValueError (not SafetensorError)."""
    from safetensors.torch import load_file

    try:
        return load_file(path)
    except Exception as e:  # SafetensorError is no OSError/ValueError
        if type(e).__name__ != "SafetensorError":
            raise
        raise ValueError(
            f"{path}: unreadable checkpoint weights ({str(e).strip()}); the checkpoint is damaged: remove "
            "its folder and resume from an older one, or start a new run"
        ) from None


def load_student_weights(student: nn.Module, directory: str) -> None:
    """Load what :meth:`UnlearnTrainer._save` wrote in ``directory`` back into ``student``."""

    if is_peft_model(student):
        from peft import set_peft_model_state_dict

        path = os.path.join(directory, "adapter_model.safetensors")
        if not os.path.isfile(path):
            raise ValueError(f"{directory}: no adapter_model.safetensors to resume from")
        set_peft_model_state_dict(student, _load_file(path))
        return
    single = os.path.join(directory, "model.safetensors")
    if os.path.isfile(single):
        state = _load_file(single)
    elif os.path.isfile(os.path.join(directory, "model.safetensors.index.json")):
        import json

        with open(os.path.join(directory, "model.safetensors.index.json")) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        state = {}
        for name in files:
            state.update(_load_file(os.path.join(directory, name)))
    else:
        raise ValueError(f"{directory}: no model.safetensors to resume from")
    if any(type(p).__name__ == "DTensor" for p in student.parameters()):
        # FSDP2-sharded student (resume under FSDP): every rank reads the full tensors and keeps its shard.
        from torch.distributed.checkpoint.state_dict import StateDictOptions, set_model_state_dict

        options = StateDictOptions(full_state_dict=True, strict=False)
        missing, unexpected = set_model_state_dict(student, state, options=options)
    else:
        missing, unexpected = student.load_state_dict(state, strict=False)
    # save_pretrained drops tied weights (lm_head tied to the embeddings); anything else missing is an error.
    tied = set()
    for group in getattr(student, "all_tied_weights_keys", {}) or {}:
        tied.add(group)
    missing = [k for k in missing if k not in tied and not k.endswith("lm_head.weight")]
    if missing or unexpected:
        raise ValueError(
            f"{directory}: checkpoint does not match the model (missing {missing[:3]}, "
            f"unexpected {unexpected[:3]})"
        )


class NonFiniteTrainingError(ValueError):
    """Training met a non-finite loss, gradient norm or weight; the message names the optimizer step."""

    def __init__(self, message: str, step: int) -> None:
        super().__init__(message)
        self.step = step


def _any_rank(flag: bool, device: Any) -> bool:
    """``flag`` or'ed over the ranks of a distributed run (every rank must take the same decision)."""
    if not (torch.distributed.is_available() and torch.distributed.is_initialized()):
        return flag
    if torch.distributed.get_world_size() == 1:
        return flag
    t = torch.tensor([1.0 if flag else 0.0], device=device)
    torch.distributed.all_reduce(t, op=torch.distributed.ReduceOp.MAX)
    return bool(t.item() > 0)


def _format_terms(terms: dict[str, float]) -> str:
    return ", ".join(f"{k} {v:.6g}" for k, v in terms.items())


class NonFiniteWatch(TrainerCallback):
    """Skips or stops an optimizer step whose loss or gradient norm is not finite (see the module docstring).

    :class:`UnlearnTrainer` feeds it every micro-batch's loss terms (:meth:`observe_loss`) and every step's
    gradient norm (:meth:`observe_grad_norm`); the decision is taken in ``on_pre_optimizer_step``, before the
    weights change. ``skipped`` lists the optimizer steps (1-based) that were skipped.
    """

    def __init__(self, max_skipped: int = 0) -> None:
        if isinstance(max_skipped, bool) or not isinstance(max_skipped, int) or max_skipped < 0:
            raise ValueError(f"max_skipped must be an int >= 0, got {max_skipped!r}")
        self.max_skipped = max_skipped
        self.skipped: list[int] = []
        self._bad_loss: dict[str, float] | None = None
        self._grad_norm: float | None = None

    def observe_loss(self, terms: dict[str, float]) -> None:
        """The loss terms of one micro-batch (``loss``, ``forget_loss``, ...), as Python floats."""
        if self._bad_loss is None and not all(math.isfinite(v) for v in terms.values()):
            self._bad_loss = dict(terms)

    def observe_grad_norm(self, norm: Any) -> None:
        """The step's gradient norm before clipping, as the Trainer computed it (None: not computed)."""
        self._grad_norm = None if norm is None else float(norm)

    def _problem(self, model: nn.Module | None, device: Any) -> str | None:
        problem = None
        if self._bad_loss is not None:
            problem = f"the loss is not finite ({_format_terms(self._bad_loss)})"
        elif self._grad_norm is not None and not math.isfinite(self._grad_norm):
            problem = f"the gradient norm is {self._grad_norm}"
        elif self._grad_norm is None and model is not None and engine() != "deepspeed":
            grads = [p.grad for p in model.parameters() if p.grad is not None]
            if grads and not all(bool(torch.isfinite(g).all()) for g in grads):
                problem = "a gradient is not finite"
        if _any_rank(problem is not None, device) and problem is None:
            problem = "another rank's loss or gradient is not finite"
        return problem

    def on_pre_optimizer_step(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any):
        problem = self._problem(model, args.device)
        self._bad_loss, self._grad_norm = None, None
        if problem is None:
            return control
        step = state.global_step + 1
        if len(self.skipped) < self.max_skipped and engine() != "deepspeed" and model is not None:
            for p in model.parameters():
                p.grad = None  # the optimizer leaves parameters without a gradient as they are
            self.skipped.append(step)
            log.warning(
                f"optimizer step {step} skipped: {problem} ({len(self.skipped)} of at most "
                f"{self.max_skipped} skipped steps)"
            )
            return control
        skipped = f" after {len(self.skipped)} skipped step(s)" if self.skipped else ""
        raise NonFiniteTrainingError(f"training stopped at optimizer step {step}{skipped}: {problem}", step)

    def on_step_end(self, args: Any, state: Any, control: Any, model: Any = None, **kwargs: Any):
        # DefaultFlowCallback (which runs first) has decided whether this step saves a checkpoint.
        if control.should_save and model is not None and engine() in ("single", "ddp"):
            try:
                check_finite_weights(model, "the model being trained")
            except ModelError as e:
                step = state.global_step
                raise NonFiniteTrainingError(
                    f"training stopped after optimizer step {step}: {e}", step
                ) from None
        return control


class ProgressBarOnly(ProgressCallback):
    """transformers' training progress bar without the dict it writes under the bar at every log
    (``{'loss': '-0.5619', 'grad_norm': ...}``, one line per optimizer step with ``logging_steps=1``): the
    logged values are the run's ``history``, kept in ``run.json``."""

    def on_log(self, args: Any, state: Any, control: Any, logs: Any = None, **kwargs: Any) -> None:
        return None


def enable_activation_checkpointing(model: nn.Module) -> None:
    """Recompute activations in the backward (non-reentrant ``torch.utils.checkpoint``), through
    transformers' ``activation_checkpointing_enable`` where it exists (5.25 on) and its deprecated
    predecessor ``gradient_checkpointing_enable`` before. A PEFT model forwards either to its base model."""
    kwargs = {"use_reentrant": False}
    if callable(getattr(model, "activation_checkpointing_enable", None)):
        model.activation_checkpointing_enable(activation_checkpointing_kwargs=kwargs)
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs=kwargs)


class UnlearnTrainer(Trainer):
    """``transformers.Trainer`` over an :class:`UnlearnObjective`; see the module docstring.

    ``max_nonfinite_steps``: optimizer steps with a non-finite loss or gradient norm that may be skipped
    before the run stops (:class:`NonFiniteWatch`).
    """

    def __init__(self, *args: Any, max_nonfinite_steps: int = 0, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        # Logged values belong in run.json, not between the progress bars on the terminal.
        self.remove_callback(PrinterCallback)
        if self.pop_callback(ProgressCallback) is not None:
            self.add_callback(ProgressBarOnly)
        self._term_sums: dict[str, float] = {}
        self._term_counts: dict[str, int] = {}
        self.nonfinite_watch = NonFiniteWatch(max_nonfinite_steps)
        self.add_callback(self.nonfinite_watch)

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        outputs = model(**inputs)
        terms = {"loss": float(outputs["loss"].detach().float())}
        for key in _TERMS:
            if key in outputs:
                terms[key] = value = float(outputs[key].detach().float())
                self._term_sums[key] = self._term_sums.get(key, 0.0) + value
                self._term_counts[key] = self._term_counts.get(key, 0) + 1
        self.nonfinite_watch.observe_loss(terms)
        loss = outputs["loss"]
        return (loss, outputs) if return_outputs else loss

    def _get_grad_norm(self, model: nn.Module, grad_norm: Any = None) -> Any:
        # The Trainer's own gradient norm (pre-clip, reduced over ranks), handed to the watch; transformers
        # versions without this hook leave the watch to check the gradients itself.
        grad_norm = super()._get_grad_norm(model, grad_norm=grad_norm)
        self.nonfinite_watch.observe_grad_norm(grad_norm)
        return grad_norm

    def log(self, logs: dict[str, float], start_time: float | None = None) -> None:
        if "loss" in logs:
            keys = sorted(self._term_sums)
            means = [self._term_sums[k] / max(self._term_counts[k], 1) for k in keys]
            if keys and self.args.world_size > 1:
                # Each rank saw only its own micro-batches; like Trainer's ``loss``, log the mean over ranks
                # (every rank logs the same step, so this collective is reached by all of them).
                local = torch.tensor(means, dtype=torch.float64, device=self.args.device)
                means = self.accelerator.reduce(local, reduction="mean").tolist()
            logs.update(zip(keys, means, strict=True))
            self._term_sums.clear()
            self._term_counts.clear()
        super().log(logs, start_time)

    def _save(self, output_dir: str | None = None, state_dict: dict | None = None) -> None:
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not self.args.should_save:
            return
        os.makedirs(output_dir, exist_ok=True)
        student = student_of(self.accelerator.unwrap_model(self.model, keep_torch_compile=False))
        if state_dict is not None:
            # A gathered (FSDP/ZeRO-3) state dict of the objective: keep the student's entries.
            prefix = "student."
            state_dict = {k[len(prefix) :]: v for k, v in state_dict.items() if k.startswith(prefix)}
        student.save_pretrained(output_dir, state_dict=state_dict, safe_serialization=True)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, "training_args.bin"))

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model: nn.Module | None = None) -> None:
        model = self.model if model is None else model
        load_student_weights(student_of(model), resume_from_checkpoint)
