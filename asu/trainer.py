"""The unlearning trainer: a ``transformers.Trainer`` whose model is the :class:`asu.losses.UnlearnObjective`.

Handing the objective module (student inside) to the Trainer is what lets accelerate, DeepSpeed ZeRO and
FSDP wrap it as users know them: the loss, including the fused LM-head vocabulary ops, runs inside the
wrapped module's forward, where sharded weights are gathered. What differs from a stock Trainer:

* ``compute_loss`` calls the objective and keeps every loss term; ``log`` adds their means over the
  logging window (``forget_loss``, ``retain_loss``) next to Trainer's ``loss``.
* ``_save`` writes the *student* (``save_pretrained``: safetensors, or only the adapter for a PEFT
  student) and the tokenizer, never the frozen teacher; ``_load_from_checkpoint`` reads it back into the
  student, so ``resume_from_checkpoint`` continues an interrupted run exactly (optimizer, scheduler, RNG
  and data order are restored by the Trainer).
"""

from __future__ import annotations

import os
from typing import Any

import torch
from torch import nn
from transformers import Trainer

from asu.losses import UnlearnObjective
from asu.teachers import is_peft_model

__all__ = ["UnlearnTrainer", "student_of", "load_student_weights"]

_TERMS = ("forget_loss", "retain_loss")


def student_of(model: nn.Module) -> nn.Module:
    """The student inside a (possibly wrapped) objective."""
    inner = getattr(model, "module", model)  # DDP / DeepSpeed engine
    if not isinstance(inner, UnlearnObjective):
        raise TypeError(f"expected an UnlearnObjective, got {type(inner).__name__}")
    return inner.student


def load_student_weights(student: nn.Module, directory: str) -> None:
    """Load what :meth:`UnlearnTrainer._save` wrote in ``directory`` back into ``student``."""
    from safetensors.torch import load_file

    if is_peft_model(student):
        from peft import set_peft_model_state_dict

        path = os.path.join(directory, "adapter_model.safetensors")
        if not os.path.isfile(path):
            raise ValueError(f"{directory}: no adapter_model.safetensors to resume from")
        set_peft_model_state_dict(student, load_file(path))
        return
    single = os.path.join(directory, "model.safetensors")
    if os.path.isfile(single):
        state = load_file(single)
    elif os.path.isfile(os.path.join(directory, "model.safetensors.index.json")):
        import json

        with open(os.path.join(directory, "model.safetensors.index.json")) as f:
            files = sorted(set(json.load(f)["weight_map"].values()))
        state = {}
        for name in files:
            state.update(load_file(os.path.join(directory, name)))
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


class UnlearnTrainer(Trainer):
    """``transformers.Trainer`` over an :class:`UnlearnObjective`; see the module docstring."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self._term_sums: dict[str, float] = {}
        self._term_counts: dict[str, int] = {}

    def compute_loss(
        self,
        model: nn.Module,
        inputs: dict[str, Any],
        return_outputs: bool = False,
        num_items_in_batch: torch.Tensor | int | None = None,
    ) -> torch.Tensor | tuple[torch.Tensor, Any]:
        outputs = model(**inputs)
        for key in _TERMS:
            if key in outputs:
                self._term_sums[key] = self._term_sums.get(key, 0.0) + float(outputs[key].detach().float())
                self._term_counts[key] = self._term_counts.get(key, 0) + 1
        loss = outputs["loss"]
        return (loss, outputs) if return_outputs else loss

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
