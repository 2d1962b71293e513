"""Continual unlearning: a sequence of forget requests, each unlearned from the previous step's model.

This is the paper's continual TOFU protocol (the authors' ``scripts/continual_tofu``: forget01 cut into
tasks, unlearned one after another). For requests ``F_1 .. F_n`` and a retain set ``R``:

* step ``k`` starts from the model step ``k - 1`` left (step 1 from the original model ``θ_0``);
* its forget set is ``F_k``; its retain set is ``R`` plus every request not forgotten yet,
  ``F_{k+1} ∪ .. ∪ F_n`` (data that is still to be kept at this point, as in the authors' ``get_task_data``);
* its forget-teacher (and the reference of NPO and of the ``kl`` retain term) is made from
  ``teacher_anchor``: ``"original"``, the original model ``θ_0`` at every step (their ``fix_ref_model:
  true``, the default of their config), or ``"previous"``, the model step ``k`` starts from (their
  ``fix_ref_model: false``). Their continual scripts pass ``fix_ref_model`` without setting it, so which one
  the paper's numbers used is not recorded; both are offered and measured here.
* an evaluation callback runs after every step.

With an output directory every step is written as it finishes and never rewritten::

    DIR/.asu.lock        held while a run writes here (a second run into DIR fails at once, naming it)
    DIR/continual.json   the settings, the fingerprints of the data and one entry per finished step: written
                         before step 1 starts (no steps), rewritten atomically after each step
    DIR/step-K/          unlearn()'s output for step K: the model, the tokenizer, run.json (written last)
    DIR/step-K/eval.json the evaluation after step K

A run killed part-way resumes (``resume=True``) from whatever it left: finished steps are loaded, not redone;
a step killed while training resumes from its newest checkpoint (or starts again when it had none); a step
whose model is written but not yet evaluated is evaluated. A resumed run must have the same settings and the
same data: SHA-256 digests of every request, the retain rows, the refusals, the tokenizer and the prompt
template are recorded in ``continual.json`` and compared, and a change is refused naming the request (or
the set) that changed, since a finished step was trained on the old rows. A run that fails before anything
a resume could use exists leaves the folder as it found it (a folder it created is removed).

LoRA is refused: each step would need its adapter merged before the next one starts.
"""

from __future__ import annotations

import contextlib
import copy
import json
import logging
import os
import shutil
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

from torch import nn

from asu.data import Rows, rows_fingerprint
from asu.files import (
    CONTINUAL_RECORD,
    atomic_write_json,
    check_finished_result,
    check_not_in_use,
    in_passing,
    output_lock,
    read_json,
    remove_stale_temporaries,
)
from asu.run_folder import CHECKPOINTS, RUN_FILE, changed_fingerprints, data_fingerprint
from asu.unlearn import UnlearnConfig, unlearn

__all__ = [
    "ANCHORS",
    "check_continual_output",
    "continual_settings",
    "ContinualResult",
    "ContinualStep",
    "STEP_COLUMNS",
    "step_evaluator",
    "step_retain",
    "step_value",
    "steps_table",
    "unlearn_sequence",
    "write_report",
]

ANCHORS = ("original", "previous")
SUMMARY_FILE = CONTINUAL_RECORD
EVAL_FILE = "eval.json"
#: How the library's own argument is named in its errors (the commands map it to their flag).
FLAG = "output_dir"
#: Settings a resumed run may change (they do not change what a step computes).
RESUMABLE = ("progress", "preset", "max_nonfinite_steps")

log = logging.getLogger(__name__)

#: ``evaluate(model, step)`` -> a JSON-able dict; ``step`` counts from 1.
Evaluator = Callable[[nn.Module, int], dict[str, Any]]


def step_dir(output_dir: str, step: int) -> str:
    return os.path.join(output_dir, f"step-{step}")


def step_retain(requests: Sequence[Rows], step: int, retain_rows: Rows | None) -> list[dict[str, Any]]:
    """Step ``step``'s retain rows (``step`` from 1): ``retain_rows`` plus the requests after ``step``."""
    rows = list(retain_rows or [])
    for later in requests[step:]:
        rows += list(later)
    return rows


@dataclass
class ContinualStep:
    """One finished step: its sizes, unlearn()'s statistics and loss history, and the evaluation after it."""

    step: int
    num_forget: int
    num_retain: int
    stats: dict[str, Any]
    history: list[dict[str, Any]]
    evaluation: dict[str, Any] | None = None
    resumed: bool = False

    def record(self) -> dict[str, Any]:
        """What ``continual.json`` keeps of the step (no loss history: that is in the step's run.json)."""
        return {
            "step": self.step,
            "num_forget": self.num_forget,
            "num_retain": self.num_retain,
            "temperature": self.stats.get("temperature"),
            "temperature_auto": self.stats.get("temperature_auto"),
            "wall_time_s": self.stats.get("wall_time_s"),
            "optimizer_steps": self.stats.get("optimizer_steps"),
            "evaluation": self.evaluation,
        }


@dataclass
class ContinualResult:
    """What :func:`unlearn_sequence` returns: the model after the last step and every step's record."""

    model: nn.Module
    steps: list[ContinualStep] = field(default_factory=list)
    output_dir: str | None = None


def _check(requests: Sequence[Rows], cfg: UnlearnConfig, teacher_anchor: str) -> None:
    if teacher_anchor not in ANCHORS:
        raise ValueError(f"unknown teacher_anchor {teacher_anchor!r}; choose one of {', '.join(ANCHORS)}")
    if not requests:
        raise ValueError("continual unlearning needs at least one forget request")
    for i, request in enumerate(requests, 1):
        if not request:
            raise ValueError(f"forget request {i} is empty")
    cfg.validate()
    if cfg.lora_r:
        raise ValueError(
            "continual unlearning runs full fine-tuning (lora_r 0): each step would need its adapter merged "
            "before the next step"
        )
    if cfg.teacher != "copy":
        raise ValueError(
            f"continual unlearning builds its teacher from the anchor model (teacher 'copy'), got "
            f"teacher={cfg.teacher!r}"
        )


def continual_settings(
    requests: Sequence[Rows],
    retain_rows: Rows | None,
    cfg: UnlearnConfig,
    teacher_anchor: str,
    tokenizer: Any,
    idk_answers: Sequence[str] | None = None,
) -> dict[str, Any]:
    """What ``continual.json`` records of a run besides its steps, and a resumed run must match: the anchor,
    the requests' and retain set's sizes, the settings, and the data's SHA-256 digests (every request, the
    retain rows, the refusals, the tokenizer, the prompt template)."""
    data = data_fingerprint([], retain_rows, idk_answers, tokenizer, cfg.prompt_template())
    data.pop("forget rows")
    return {
        "teacher_anchor": teacher_anchor,
        "requests": [len(r) for r in requests],
        "num_retain": len(retain_rows or []),
        "config": json.loads(json.dumps(cfg.to_dict(), default=str)),
        "fingerprints": {"forget requests": [rows_fingerprint(r) for r in requests], **data},
    }


def _summary(output_dir: str, settings: dict[str, Any], steps: list[ContinualStep]) -> None:
    atomic_write_json(
        os.path.join(output_dir, SUMMARY_FILE),
        {**settings, "steps": [s.record() for s in steps]},
        default=str,
    )


def check_continual_output(
    output_dir: str,
    settings: dict[str, Any],
    resume: bool,
    request_names: Sequence[str] | None = None,
) -> None:
    """Refuse an output folder a run of ``settings`` (:func:`continual_settings`) cannot write: a file;
    another command's finished result; a continual run without ``resume``; with ``resume``, a folder that
    holds none (or does not exist) or one whose settings or data differ (``request_names`` name the requests
    in the error, e.g. their files); without it, a folder holding anything else."""
    path = os.path.join(output_dir, SUMMARY_FILE)
    if os.path.exists(output_dir) and not os.path.isdir(output_dir):
        raise ValueError(f"{FLAG} {output_dir} exists and is not a directory")
    if os.path.isdir(output_dir):
        check_not_in_use(output_dir, flag=FLAG)  # a running run is named, not taken for a finished one
        check_finished_result(output_dir, "continual", flag=FLAG)
    if not os.path.isfile(path):
        if resume:
            where = (
                "does not exist"
                if not os.path.isdir(output_dir)
                else f"holds no continual run ({SUMMARY_FILE})"
            )
            raise ValueError(f"nothing to resume: {FLAG} {output_dir} {where}")
        there = (
            sorted(n for n in os.listdir(output_dir) if not in_passing(n))
            if os.path.isdir(output_dir)
            else []
        )
        if there:
            raise ValueError(
                f"{FLAG} {output_dir} is not empty ({', '.join(there[:3])}); choose another output directory"
            )
        return
    if not resume:
        raise ValueError(
            f"{output_dir} already holds a continual run ({SUMMARY_FILE}); resume it or choose another "
            "output directory"
        )
    before = read_json(path)
    _compare_run(before, settings, request_names)
    _check_finished_steps(output_dir, before)


def _check_finished_steps(output_dir: str, before: dict[str, Any]) -> None:
    """Refuse to resume when a step ``continual.json`` records as finished no longer holds its result (its
    folder removed or emptied by hand): retraining it would leave the later steps trained from another
    model."""
    for entry in before.get("steps", []):
        k = entry.get("step") if isinstance(entry, dict) else None
        if isinstance(k, int) and not os.path.isfile(os.path.join(step_dir(output_dir, k), RUN_FILE)):
            raise ValueError(
                f"cannot resume: {SUMMARY_FILE} records step {k} as finished but {step_dir(output_dir, k)} "
                f"no longer holds its result ({RUN_FILE}); retraining it would not give the recorded model "
                "the later steps start from: start a new run in another folder"
            )


def _compare_run(before: dict[str, Any], now: dict[str, Any], names: Sequence[str] | None) -> None:
    """Refuse to resume the run recorded in ``before`` with other settings or other data."""
    now = json.loads(json.dumps(now, default=str))
    if len(before.get("requests", [])) != len(now["requests"]):
        raise ValueError(
            f"cannot resume with {len(now['requests'])} forget requests: the run was started with "
            f"{len(before.get('requests', []))}"
        )
    changed = [k for k in now if k not in ("config", "fingerprints") and before.get(k) != now[k]]
    changed += [
        f"config.{k}"
        for k in now["config"]
        if k not in RESUMABLE and before.get("config", {}).get(k) != now["config"][k]
    ]
    if changed:
        raise ValueError(f"cannot resume with different settings: {', '.join(changed)} changed")
    fingerprints = before.get("fingerprints")
    if not isinstance(fingerprints, dict):
        log.warning("the continual run records no data fingerprints (an older run): the data is not checked")
        return
    names = list(names) if names is not None else [None] * len(now["requests"])
    old = fingerprints.get("forget requests", [None] * len(names))
    pairs = zip(old, now["fingerprints"]["forget requests"], names, strict=True)
    data = [
        f"forget request {i} ({name})" if name else f"forget request {i}"
        for i, (before_digest, digest, name) in enumerate(pairs, 1)
        if before_digest is not None and before_digest != digest
    ]
    data += [k for k in changed_fingerprints(fingerprints, now["fingerprints"]) if k != "forget requests"]
    if data:
        raise ValueError(
            f"cannot resume with different data: {', '.join(data)} changed since the run was started (a "
            "finished step was trained on the old rows); resume with the same files, or start a new run in "
            "another folder"
        )


def _resumable(output_dir: str, n_steps: int) -> bool:
    """Whether a step in ``output_dir`` left anything a resume continues from (a result or a checkpoint)."""
    return any(
        os.path.exists(os.path.join(step_dir(output_dir, k), RUN_FILE))
        or _has_checkpoints(step_dir(output_dir, k))
        for k in range(1, n_steps + 1)
    )


@contextlib.contextmanager
def _claimed(
    output_dir: str, settings: dict[str, Any], resume: bool, names: Sequence[str] | None
) -> Iterator[None]:
    """``output_dir`` locked for the run (a second run fails at once naming this one), cleaned of what a
    killed run left, checked again under the lock, and (a new run) given its ``continual.json`` before step 1
    starts, so a run killed at any point can be resumed. A failure before any step left something to resume
    from leaves the folder as it was found (one this run created is removed)."""
    created = not os.path.isdir(output_dir)
    if created:
        check_continual_output(output_dir, settings, resume, names)  # before the lock creates the folder
    started = False
    with output_lock(output_dir, flag=FLAG):
        try:
            for name in remove_stale_temporaries(output_dir):
                log.warning(f"removed {os.path.join(output_dir, name)}, left by an interrupted run")
            check_continual_output(output_dir, settings, resume, names)
            if not resume:
                _summary(output_dir, settings, [])
                started = True
            yield
        except BaseException:
            if (created or started) and not _resumable(output_dir, len(settings["requests"])):
                if created:
                    shutil.rmtree(output_dir, ignore_errors=True)
                else:
                    os.unlink(os.path.join(output_dir, SUMMARY_FILE))
            raise


def _load_step_model(like: nn.Module, directory: str) -> nn.Module:
    """The model a finished step wrote, loaded as ``like`` was (dtype, attention, device); a damaged or
    non-finite one is named (:func:`asu.models.load_model`)."""
    from asu.models import load_model

    attn = getattr(like.config, "_attn_implementation", None)
    param = next(like.parameters())
    model = load_model(directory, dtype=param.dtype, attn_implementation=attn, device=param.device)
    return model.eval()


def unlearn_sequence(
    model: nn.Module,
    tokenizer: Any,
    requests: Sequence[Rows],
    retain_rows: Rows | None,
    cfg: UnlearnConfig | None = None,
    output_dir: str | None = None,
    *,
    teacher_anchor: str = "original",
    evaluate: Evaluator | None = None,
    idk_answers: Sequence[str] | None = None,
    resume: bool = False,
    on_step: Callable[[ContinualStep], None] | None = None,
    request_names: Sequence[str] | None = None,
) -> ContinualResult:
    """Unlearn ``requests`` one after another from ``model`` (see the module docstring).

    Args:
        model: the original model; it is trained in place by step 1 (``teacher_anchor="original"`` keeps a
            frozen copy of it for the teacher of every step).
        tokenizer: its tokenizer.
        requests: the forget requests in order, each a list of rows.
        retain_rows: the retain set (the requests not yet forgotten are added to it at each step).
        cfg: the settings of every step (:class:`asu.unlearn.UnlearnConfig`; ``temperature="auto"`` chooses
            τ at each step, previewed on that step's teacher).
        output_dir: where to write every step (None: in memory only).
        teacher_anchor: ``"original"`` or ``"previous"``.
        evaluate: called after every step with the model and the step number; its dict is stored.
        idk_answers: refusal strings for ``method="idk"``.
        resume: continue a run in ``output_dir``.
        on_step: called with each step's record as soon as it is finished (e.g. to print progress).
        request_names: how errors name the requests (e.g. their files; default "forget request K").

    Returns:
        :class:`ContinualResult`.
    """
    cfg = copy.deepcopy(cfg) if cfg is not None else UnlearnConfig()
    _check(requests, cfg, teacher_anchor)
    steps = _Steps(requests, retain_rows, cfg, teacher_anchor, evaluate, idk_answers, on_step)
    if output_dir is None:
        if resume:
            raise ValueError("resume=True needs an output_dir")
        return _run_steps(model, tokenizer, steps, None, None)
    settings = continual_settings(requests, retain_rows, cfg, teacher_anchor, tokenizer, idk_answers)
    with _claimed(output_dir, settings, resume, request_names):
        return _run_steps(model, tokenizer, steps, output_dir, settings)


@dataclass
class _Steps:
    """What every step of :func:`unlearn_sequence` reads (its checked arguments)."""

    requests: Sequence[Rows]
    retain_rows: Rows | None
    cfg: UnlearnConfig
    teacher_anchor: str
    evaluate: Evaluator | None
    idk_answers: Sequence[str] | None
    on_step: Callable[[ContinualStep], None] | None


def _run_steps(
    model: nn.Module, tokenizer: Any, run: _Steps, output_dir: str | None, settings: dict[str, Any] | None
) -> ContinualResult:
    """The steps of :func:`unlearn_sequence`, in order, each written to ``output_dir`` (when given) with
    ``continual.json`` (``settings`` and the finished steps) rewritten after it."""
    requests, retain_rows, cfg = run.requests, run.retain_rows, run.cfg
    original = copy.deepcopy(model).eval().requires_grad_(False) if run.teacher_anchor == "original" else None
    result = ContinualResult(model=model, output_dir=output_dir)
    current = model
    for k, forget in enumerate(requests, 1):
        retain = step_retain(requests, k, retain_rows)
        here = step_dir(output_dir, k) if output_dir is not None else None
        if here is not None and os.path.exists(os.path.join(here, RUN_FILE)):
            current, stats, history = _load_step(current, here)
            resumed = True
        else:
            current, stats, history = _train_step(
                current, tokenizer, forget, retain, cfg, here, original, run.idk_answers
            )
            resumed = False
        step = ContinualStep(k, len(forget), len(retain), stats, history, resumed=resumed)
        step.evaluation = _evaluation(current, k, here, run.evaluate)
        result.steps.append(step)
        result.model = current
        if output_dir is not None:
            _summary(output_dir, settings, result.steps)
        if run.on_step is not None:
            run.on_step(step)
    return result


def _load_step(like: nn.Module, here: str) -> tuple[nn.Module, dict[str, Any], list[dict[str, Any]]]:
    """A finished step's model, statistics and loss history, from its directory."""
    run = read_json(os.path.join(here, RUN_FILE))
    stats = dict(run.get("stats", {}), temperature=run.get("temperature"))
    if "temperature_auto" in run:
        stats["temperature_auto"] = run["temperature_auto"]
    return _load_step_model(like, here), stats, list(run.get("losses", []))


def _train_step(
    current: nn.Module,
    tokenizer: Any,
    forget: Rows,
    retain: Rows,
    cfg: UnlearnConfig,
    here: str | None,
    original: nn.Module | None,
    idk_answers: Sequence[str] | None,
) -> tuple[nn.Module, dict[str, Any], list[dict[str, Any]]]:
    """Unlearn one request from ``current`` (continuing the step's own checkpoints when it has some)."""
    resume_step = here is not None and _has_checkpoints(here)
    result = unlearn(
        current, tokenizer, forget, retain, cfg, output_dir=here, idk_answers=idk_answers,
        resume=resume_step, teacher_model=original,
    )  # fmt: skip
    return result.model.eval(), dict(result.stats), list(result.history)


def _evaluation(model: nn.Module, k: int, here: str | None, evaluate: Evaluator | None) -> dict | None:
    """The evaluation after step ``k``: read back when the step already wrote it, else run and written."""
    if evaluate is None:
        return None
    path = os.path.join(here, EVAL_FILE) if here is not None else None
    if path is not None and os.path.exists(path):
        return read_json(path)
    evaluation = evaluate(model, k)
    if path is not None:
        atomic_write_json(path, evaluation, default=str)
    return evaluation


def _has_checkpoints(here: str) -> bool:
    from asu.distributed import complete_checkpoints

    return bool(complete_checkpoints(os.path.join(here, CHECKPOINTS)))


# -- evaluation after each step and the report ----------------------------------------------------------


def _skip(rows: Rows, name: str) -> set[str]:
    """The truth ratio of a set whose rows lack the paraphrased / perturbed answers it needs."""
    tr = "forget_truth_ratio" if name == "forget" else f"{name}_Truth_Ratio"
    need = ("paraphrased_answer", "perturbed_answer")
    return {tr} if any(not r.get(k) for r in rows for k in need) else set()


def _concat(parts: Sequence[Rows]) -> list[dict[str, Any]]:
    return [r for part in parts for r in part]


def step_evaluator(
    tokenizer: Any,
    requests: Sequence[Rows],
    retain_rows: Rows | None,
    *,
    template: Any = None,
    batch_size: int = 32,
    max_new_tokens: int | None = None,
    well_formed: Callable[[str], bool] | None = None,
) -> Evaluator:
    """An evaluator for :func:`unlearn_sequence`: after step ``k``, :func:`asu.evaluate.evaluate_model`'s
    summary on

    * ``request``: the request just forgotten, with ``retain_rows`` (retain metrics, model utility);
    * ``forgotten``: every request forgotten so far (from step 2 on; the forget metrics only);
    * ``pending``: the requests not forgotten yet (still to be kept; forget-side metrics of those rows).

    Truth ratios are left out for sets whose rows carry no paraphrased / perturbed answers.
    """
    from asu.evaluate import TOFU_MAX_NEW_TOKENS, evaluate_model

    tokens = max_new_tokens or TOFU_MAX_NEW_TOKENS

    def run(model: nn.Module, rows: Rows, retain: Rows | None) -> dict[str, Any]:
        skip = _skip(rows, "forget") | (_skip(retain, "retain") if retain else set())
        res = evaluate_model(
            model, tokenizer, rows, retain, batch_size=batch_size, max_new_tokens=tokens,
            well_formed=well_formed, template=template, skip=skip,
        )  # fmt: skip
        return res["summary"]

    def evaluate(model: nn.Module, k: int) -> dict[str, Any]:
        out = {"request": run(model, requests[k - 1], retain_rows)}
        if k > 1:
            out["forgotten"] = run(model, _concat(requests[:k]), None)
        if k < len(requests):
            out["pending"] = run(model, _concat(requests[k:]), None)
        return out

    return evaluate


#: Columns of the per-step table: (evaluation part, summary key, header).
STEP_COLUMNS = (
    ("request", "forget_rouge", "request forget ROUGE-L"),
    ("forgotten", "forget_rouge", "forgotten so far ROUGE-L"),
    ("request", "forget_fact_leakage_any", "request fact leak"),
    ("request", "forget_degenerate_answers", "request degenerate"),
    ("pending", "forget_rouge", "pending ROUGE-L"),
    ("request", "retain_rouge", "retain ROUGE-L"),
    ("request", "model_utility", "model utility"),
)


def step_value(evaluation: dict[str, Any] | None, part: str, key: str) -> float | None:
    """Summary value ``key`` of evaluation part ``part`` of one step (``None`` where it was not measured),
    ``evaluation`` as :func:`step_evaluator` writes it. At step 1 the request is everything forgotten so far,
    so ``"forgotten"`` reads the request's value there."""
    ev = evaluation or {}
    if part == "forgotten" and "forgotten" not in ev:
        part = "request"
    return (ev.get(part) or {}).get(key)


def steps_table(steps: Sequence[ContinualStep]) -> str:
    """A markdown table, one row per step: τ and the evaluation's forget and utility numbers."""
    head = "| step | forget rows | retain rows | τ | " + " | ".join(h for _, _, h in STEP_COLUMNS) + " |\n"
    head += "|---" * (4 + len(STEP_COLUMNS)) + "|\n"
    lines = []
    for s in steps:
        tau = s.stats.get("temperature")
        cells = [step_value(s.evaluation, part, key) for part, key, _ in STEP_COLUMNS]
        lines.append(
            f"| {s.step} | {s.num_forget} | {s.num_retain} | "
            + (f"{tau:.3g}" if isinstance(tau, (int, float)) else "–")
            + " | "
            + " | ".join("–" if c is None else f"{c:.3f}" for c in cells)
            + " |"
        )
    return head + "\n".join(lines) + "\n"


def write_report(
    output_dir: str, steps: Sequence[ContinualStep], title: str = "continual unlearning"
) -> None:
    """``continual.md`` (the table) and ``continual.png`` (forget and utility across steps, when matplotlib
    is installed and a step was evaluated) in ``output_dir``."""
    from asu.charts import load_pyplot, save_figure
    from asu.files import atomic_write_text

    atomic_write_text(os.path.join(output_dir, "continual.md"), f"# {title}\n\n" + steps_table(steps))
    plt = load_pyplot(quiet=True)
    if plt is None:
        return
    xs = [s.step for s in steps]
    series = {
        label: [step_value(s.evaluation, part, key) for s in steps] for part, key, label in STEP_COLUMNS
    }
    series = {label: ys for label, ys in series.items() if any(y is not None for y in ys)}
    if not series:  # nothing evaluated (--no-eval): no chart, rather than empty axes
        return
    fig, ax = plt.subplots(figsize=(6.0, 3.6))
    for label, ys in series.items():
        ax.plot(xs, [float("nan") if y is None else y for y in ys], marker="o", label=label)
    ax.set_xlabel("step (forget request)")
    ax.set_xticks(xs)
    ax.set_ylim(0, 1.05)
    ax.set_title(title)
    ax.legend(fontsize=7)
    save_figure(fig, os.path.join(output_dir, "continual.png"), dpi=120)
