"""The folder an unlearning run writes: checked, locked, fingerprinted, resumed and written atomically.

Layout of ``DIR`` (a run's ``output_dir``)::

    DIR/.asu.lock                       held while a run writes here (asu.files.output_lock)
    DIR/checkpoints/checkpoint-N/       the Trainer's checkpoints while the run trains
    DIR/checkpoints/unlearn_config.json the run's settings (a resumed run must have the same)
    DIR/checkpoints/data_fingerprint.json  SHA-256 of the forget/retain rows, refusals, tokenizer
    DIR/checkpoints/temperature_auto.json  the automatic temperature chosen before training
    DIR/model.safetensors (or the adapter), the tokenizer files   moved in when the run finishes
    DIR/run.json                        written last: its presence marks a finished run

What it guarantees (README "Guarantees"):

* :func:`check_output_dir` before any work: not a file, no finished run in it (nor another command's finished
  result, :func:`asu.files.check_finished_result`), no interrupted one unless resuming (and then a complete
  checkpoint to resume from), not locked by another run;
* :func:`claimed_output` for the run: the folder locked (a second run fails at once), checked again under the
  lock, and the temporary files, scratch folders and half-written checkpoints (no ``trainer_state.json``,
  which the Trainer writes last) of a killed run removed;
* :func:`save_or_compare_config`: a resumed run refuses settings or data (rows, tokenizer, the prompt
  template's text) that differ from the interrupted run's (only :data:`RESUMABLE_CHANGES` may change);
* :func:`write_result`: the model and tokenizer assembled in a scratch folder and moved in, ``run.json``
  last, every JSON file atomically.

Errors name the library's own arguments (``output_dir``); the ``asu`` commands map them to their flags.
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import shutil
import tempfile
from collections.abc import Iterator, Sequence
from typing import Any

import torch

from asu.data import Rows, rows_fingerprint, tokenizer_fingerprint
from asu.distributed import barrier, complete_checkpoints, engine, is_main_process
from asu.environment import library_versions
from asu.files import (
    RUN_RECORD,
    atomic_write_json,
    check_finished_result,
    check_not_in_use,
    output_lock,
    read_json,
    remove_stale_temporaries,
)
from asu.methods import RETAIN_LOSS_ALIASES
from asu.teachers import is_peft_model
from asu.templates import Template, describe_template

__all__ = [
    "RUN_FILE",
    "CHECKPOINTS",
    "CONFIG_FILE",
    "FINGERPRINT_FILE",
    "TAU_FILE",
    "RESUMABLE_CHANGES",
    "changed_fingerprints",
    "checkpoints",
    "check_output_dir",
    "claimed_output",
    "data_fingerprint",
    "save_or_compare_config",
    "write_output",
    "write_result",
]

RUN_FILE = RUN_RECORD
CHECKPOINTS = "checkpoints"
CONFIG_FILE = "unlearn_config.json"
FINGERPRINT_FILE = "data_fingerprint.json"
#: The automatic temperature chosen for a run, kept beside its checkpoints so a resumed run reuses it.
TAU_FILE = "temperature_auto.json"
#: Settings a resumed run may change: they do not change what a healthy run computes.
RESUMABLE_CHANGES = ("progress", "preset", "max_nonfinite_steps")
#: How the library's own argument is named in its errors (the commands map it to their flag).
FLAG = "output_dir"

log = logging.getLogger(__name__)


def checkpoints(directory: str) -> list[str]:
    """The ``checkpoint-N`` folders in ``directory``, oldest first (complete or not)."""
    if not os.path.isdir(directory):
        return []
    found = [d for d in os.listdir(directory) if d.startswith("checkpoint-") and d.split("-")[-1].isdigit()]
    return sorted(found, key=lambda d: int(d.split("-")[-1]))


def _started(ckpt_dir: str, name: str) -> bool:
    """Whether checkpoint ``name`` was written to the end by the main process (``trainer_state.json``, which
    the Trainer writes last); one without it is what a run killed while saving left."""
    return os.path.isfile(os.path.join(ckpt_dir, name, "trainer_state.json"))


def check_output_dir(output_dir: str, resume: bool) -> None:
    """Refuse to overwrite a finished run (or another command's finished result), or to start over an
    interrupted one without ``resume``."""
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ValueError(f"{FLAG} {output_dir} exists and is not a directory")
    if is_main_process():
        # Only the main process takes the folder's lock (claimed_output), so under a multi-process launch
        # the other ranks would find it held by their own job's main process.
        check_not_in_use(output_dir, flag=FLAG)
    if os.path.isdir(output_dir):
        check_finished_result(output_dir, "unlearn", flag=FLAG)
    ckpt_dir = os.path.join(output_dir, CHECKPOINTS)
    if resume:
        if not complete_checkpoints(ckpt_dir):
            where = ckpt_dir if os.path.isdir(output_dir) else f"{output_dir} (it does not exist)"
            raise ValueError(f"nothing to resume: {where} holds no complete checkpoint")
        return
    if os.path.exists(os.path.join(output_dir, RUN_FILE)):
        raise ValueError(
            f"{output_dir} already holds a finished run ({RUN_FILE}); choose another output directory"
        )
    if any(_started(ckpt_dir, name) for name in checkpoints(ckpt_dir)):
        raise ValueError(
            f"{output_dir} holds checkpoints of an interrupted run; resume it or choose another directory"
        )


@contextlib.contextmanager
def claimed_output(output_dir: str, resume: bool) -> Iterator[bool]:
    """Lock ``output_dir`` for the run (main process; created if missing), check it again now that no other
    run can change it, and remove what killed runs left; yields whether this run created the folder.

    When the block fails before a checkpoint exists, the folder is left as it was found (one this run
    created is removed; otherwise its ``checkpoints`` folder)."""
    created = not os.path.isdir(output_dir)
    trainer_dir = os.path.join(output_dir, CHECKPOINTS)
    if not is_main_process():
        os.makedirs(output_dir, exist_ok=True)  # every rank gets here; exist_ok tolerates the race
        yield created
        return
    with output_lock(output_dir, flag=FLAG):
        check_output_dir(output_dir, resume)
        for folder in (output_dir, trainer_dir):
            for name in remove_stale_temporaries(folder):
                log.warning(f"removed {os.path.join(folder, name)}, left by an interrupted run")
        for name in checkpoints(trainer_dir):
            if not _started(trainer_dir, name):
                shutil.rmtree(os.path.join(trainer_dir, name), ignore_errors=True)
                log.warning(f"removed {os.path.join(trainer_dir, name)}, half-written by an interrupted run")
        try:
            yield created
        except BaseException:
            if not checkpoints(trainer_dir):
                # Nothing a resume could use: leave the folder as it was found (a new one is removed).
                shutil.rmtree(output_dir if created else trainer_dir, ignore_errors=True)
            raise


def data_fingerprint(
    forget_rows: Rows,
    retain_rows: Rows | None,
    idk_answers: Sequence[str] | None,
    tokenizer: Any,
    template: Template | None = None,
) -> dict[str, str | None]:
    """SHA-256 digests of what a run's examples are made of besides its settings: the rows, the refusals, the
    tokenizer and (given the run's ``template``) the prompt template's text, so an edited template file is
    seen even though its path is the same."""
    fingerprint = {
        "forget rows": rows_fingerprint(forget_rows),
        "retain rows": None if retain_rows is None else rows_fingerprint(retain_rows),
        "IDK answers": None if idk_answers is None else rows_fingerprint(list(idk_answers)),
        "tokenizer": tokenizer_fingerprint(tokenizer),
    }
    if template is not None:
        fingerprint["prompt template"] = rows_fingerprint([describe_template(template, tokenizer)])
    return fingerprint


def changed_fingerprints(before: dict[str, Any], now: dict[str, Any]) -> list[str]:
    """The keys whose digest differs; a key ``before`` does not record (a run started by an older version)
    is not compared."""
    return [k for k in now if k in before and before[k] != now[k]]


def _compare_fingerprint(trainer_dir: str, fingerprint: dict[str, str | None]) -> None:
    path = os.path.join(trainer_dir, FINGERPRINT_FILE)
    if not os.path.exists(path):
        log.warning(f"{trainer_dir} records no data fingerprint (an older run): the data is not checked")
        return
    changed = changed_fingerprints(read_json(path), fingerprint)
    if changed:
        raise ValueError(
            f"cannot resume with different data: {', '.join(changed)} changed since the run was started; "
            "resume with the same files and tokenizer, or start a new run in another folder"
        )


def _changed_settings(before: dict[str, Any], now: dict[str, Any], defaults: dict[str, Any]) -> list[str]:
    """The settings of ``now`` that differ from the saved ``before`` (a setting the saved run predates
    counts as its behaviour then, ``defaults``), except :data:`RESUMABLE_CHANGES`."""
    # A run saved under a deprecated retain-loss name resumes under the canonical one.
    retain = before.get("retain_loss")
    before = {**before, "retain_loss": RETAIN_LOSS_ALIASES.get(retain, retain)}
    legacy = dict(defaults)
    # The kl retain term was a token mean before retain_reduction existed; for nll the reduction changes
    # nothing.
    legacy["retain_reduction"] = "token" if before["retain_loss"] == "kl" else now["retain_reduction"]
    return sorted(k for k in now if k not in RESUMABLE_CHANGES and before.get(k, legacy.get(k)) != now[k])


def save_or_compare_config(
    trainer_dir: str,
    settings: dict[str, Any],
    defaults: dict[str, Any],
    resume: bool,
    fingerprint: dict[str, str | None] | None = None,
) -> None:
    """A new run saves its ``settings`` (and ``fingerprint``, the digests of its data) beside its
    checkpoints; a resumed one must have the same settings and data. ``defaults``: the settings of a
    default run (what a setting an older run did not record meant)."""
    os.makedirs(trainer_dir, exist_ok=True)
    saved_cfg = os.path.join(trainer_dir, CONFIG_FILE)
    if resume and fingerprint is not None:
        _compare_fingerprint(trainer_dir, fingerprint)
    now = json.loads(json.dumps(settings, default=str))
    if resume and os.path.exists(saved_cfg):
        before = read_json(saved_cfg)
        changed = _changed_settings(before, now, json.loads(json.dumps(defaults, default=str)))
        if changed:
            raise ValueError(f"cannot resume with different settings: {', '.join(changed)} changed")
    elif is_main_process():
        atomic_write_json(saved_cfg, settings, indent=2, default=str)
        if fingerprint is not None:
            atomic_write_json(os.path.join(trainer_dir, FINGERPRINT_FILE), fingerprint, indent=2)


def write_output(trainer: Any, result: Any, trainer_dir: str, tokenizer: Any, cfg: Any) -> None:
    """The finished run into ``result.output_dir`` (main process), the checkpoints dropped unless kept."""
    state_dict = None
    if engine() in ("fsdp", "deepspeed"):
        # Sharded weights: every rank takes part in gathering the full state dict (main gets it).
        full = trainer.accelerator.get_state_dict(trainer.model_wrapped)
        state_dict = {k[len("student.") :]: v for k, v in (full or {}).items() if k.startswith("student.")}
    if is_main_process():
        write_result(result, tokenizer, cfg, state_dict=state_dict)
        if not cfg.keep_checkpoints:
            shutil.rmtree(trainer_dir, ignore_errors=True)
    barrier()  # no rank returns before the result is in place


def write_result(
    result: Any,
    tokenizer: Any,
    cfg: Any,
    state_dict: dict[str, torch.Tensor] | None = None,
) -> None:
    """Model + tokenizer saved to a scratch directory, moved into place, then ``run.json`` last.

    ``result``: an :class:`asu.unlearn.UnlearnResult`; ``cfg`` its :class:`asu.unlearn.UnlearnConfig`;
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
