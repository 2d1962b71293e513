"""General ability through lm-evaluation-harness (the ``lm-eval`` package, the optional ``lm-eval`` extra) on
the model already in memory: lm-eval's ``HFLM`` wraps the model object and its tokenizer (no second load),
``lm_eval.simple_evaluate`` runs the tasks.

The ASU paper's general-ability table (as the authors' ``real_world_eval.py`` and closer-look's read lm-eval's
results) is :data:`PAPER_TASKS`: ARC-Challenge ``acc_norm``, MMLU ``acc``, TruthfulQA MC1 ``acc`` and GSM8K
``exact_match`` with the ``flexible-extract`` filter, each task at its own default few-shot count, BOS added
(their ``add_bos_token=True``), no chat template. ``paper`` names the four.

Offline by default: the tasks' data must be local (a task of your own over local files, ``include`` naming
its folder) or already in the Hugging Face datasets cache; lm-eval runs with ``HF_HUB_OFFLINE`` /
``HF_DATASETS_OFFLINE`` set, so nothing is downloaded, and a task whose data is not there is one ValueError
naming it. ``online=True`` lets lm-eval download.

Results: every metric of every task (and group) lm-eval reports, as ``lm_eval_{task}_{metric}`` (the filter
appended unless it is ``none``: ``lm_eval_gsm8k_exact_match_flexible-extract``), standard errors left out;
lm-eval's whole results object goes to ``LM_EVAL.json``.
"""

from __future__ import annotations

import contextlib
import logging
import os
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

#: The paper's general-ability columns: lm-eval task -> the metric key of its results.
PAPER_TASKS = {
    "arc_challenge": "acc_norm,none",
    "mmlu": "acc,none",
    "truthfulqa_mc1": "acc,none",
    "gsm8k": "exact_match,flexible-extract",
}
NAMED_SETS = {"paper": tuple(PAPER_TASKS)}
_INSTALL = "pip install lm-eval (or pip install 'asu[lm-eval]')"
_OFFLINE_VARS = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def parse_tasks(specs: Sequence[str]) -> list[str]:
    """``["paper,my_task", "other"]`` -> task names (named sets expanded, duplicates dropped, order kept)."""
    names: list[str] = []
    for spec in specs:
        for name in (s.strip() for s in spec.split(",")):
            if not name:
                continue
            for task in NAMED_SETS.get(name, (name,)):
                if task not in names:
                    names.append(task)
    if not names and specs:
        raise ValueError("lm-eval: no task named")
    return names


def _lm_eval() -> Any:
    try:
        import lm_eval
    except ImportError:
        raise ValueError(f"running lm-eval tasks needs the lm-eval package: {_INSTALL}") from None
    return lm_eval


@contextlib.contextmanager
def offline(enabled: bool = True) -> Iterator[None]:
    """Hub access off (the environment variables and the imported clients' switches), restored after."""
    if not enabled:
        yield
        return
    import huggingface_hub.constants as hub

    saved_env = {k: os.environ.get(k) for k in _OFFLINE_VARS}
    switches: list[tuple[Any, str, Any]] = [(hub, "HF_HUB_OFFLINE", hub.HF_HUB_OFFLINE)]
    with contextlib.suppress(ImportError):
        import datasets.config as ds

        switches += [(ds, name, getattr(ds, name)) for name in _OFFLINE_VARS if hasattr(ds, name)]
    os.environ.update({k: "1" for k in _OFFLINE_VARS})
    for module, name, _ in switches:
        setattr(module, name, True)
    try:
        yield
    finally:
        for module, name, value in switches:
            setattr(module, name, value)
        for k, v in saved_env.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


@dataclass
class LmEvalPlan:
    """Validated ``--lm-eval`` settings and the task manager that found the tasks."""

    tasks: list[str]
    include: str | None
    limit: float | None
    batch_size: int | str
    online: bool
    manager: Any

    def record(self) -> dict[str, Any]:
        """What ``eval_config.json`` records."""
        return {
            "tasks": self.tasks,
            "include": self.include,
            "limit": self.limit,
            "batch_size": self.batch_size,
            "online": self.online,
            "add_bos_token": True,
        }


_OFFLINE_HINT = (
    " (asu runs lm-eval offline: a task's data must be local or in the datasets cache; online=True lets "
    "it download)"
)


def _manager(tasks: Sequence[str], include: str | None) -> Any:
    """lm-eval's task manager: over ``include`` alone when it holds every task (indexing lm-eval's own
    fifteen thousand task files takes a while), else over lm-eval's tasks and ``include``."""
    from lm_eval.tasks import TaskManager

    if include is not None:
        mine = TaskManager(include_path=include, include_defaults=False)
        if all(t in mine.all_tasks for t in tasks):
            return mine
    return TaskManager(include_path=include)


def _check_names(manager: Any, tasks: Sequence[str], include: str | None) -> None:
    """ValueError naming every task lm-eval does not know, with its close names."""
    import difflib

    unknown = [t for t in tasks if t not in manager.all_tasks]
    if not unknown:
        return
    hints = {t: difflib.get_close_matches(t, manager.all_tasks, n=3) for t in unknown}
    said = "; ".join(t + (f" (close: {', '.join(h)})" if h else "") for t, h in hints.items())
    mine = "" if include else "; a task of your own: include=DIR (a folder of task YAML files)"
    raise ValueError(f"lm-eval: unknown task {said}{mine}")


def _check_data(manager: Any, tasks: Sequence[str], online: bool) -> None:
    """Load each task's data (offline unless ``online``); ValueError naming the first that fails."""
    for task in tasks:
        try:
            with offline(not online):
                manager.load([task])
        except Exception as e:  # noqa: BLE001 - lm-eval and datasets raise many kinds; one line names the task
            hint = "" if online else _OFFLINE_HINT
            raise ValueError(
                f"lm-eval: task {task}: its data cannot be loaded: {_first_line(e)}{hint}"
            ) from None


def prepare(
    specs: Sequence[str], include: str | None = None, limit: float | None = None,
    batch_size: int | str = 8, online: bool = False,
) -> LmEvalPlan:  # fmt: skip
    """Every task found and its data loaded (from local files or the cache unless ``online``), before any
    model is loaded: ValueError naming an unknown task (with lm-eval's close names) or one whose data
    cannot be had."""
    _lm_eval()
    tasks = parse_tasks(specs)
    if include is not None and not os.path.isdir(include):
        raise ValueError(f"lm-eval include={include}: not a directory of task YAML files")
    if limit is not None and not limit > 0:
        raise ValueError(f"lm-eval limit must be > 0, got {limit}")
    logging.getLogger("lm_eval").setLevel(logging.WARNING)
    manager = _manager(tasks, include)
    _check_names(manager, tasks, include)
    _check_data(manager, tasks, online)
    return LmEvalPlan(tasks, include, limit, batch_size, online, manager)


def run(plan: LmEvalPlan, model: Any, tokenizer: Any) -> dict[str, Any]:
    """lm-eval's results object for ``model`` (in memory, wrapped by ``HFLM`` with ``tokenizer``)."""
    lm_eval = _lm_eval()
    from lm_eval.models.huggingface import HFLM

    lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=plan.batch_size, add_bos_token=True)
    with offline(not plan.online):
        out = lm_eval.simple_evaluate(
            model=lm, tasks=plan.tasks, task_manager=plan.manager, limit=plan.limit, log_samples=False,
            bootstrap_iters=0,
        )  # fmt: skip
    if out is None:
        raise RuntimeError("lm-eval returned no results (not the main process)")
    return out


#: Numbers lm-eval reports beside a task's metrics that are not scores.
_NOT_METRICS = ("sample_len", "sample_count", "samples")


def summary(results: dict[str, Any]) -> dict[str, float]:
    """``lm_eval_{task}_{metric}`` for every numeric metric of every task and group (no standard errors)."""
    out: dict[str, float] = {}
    for section in ("results", "groups"):
        for task, metrics in (results.get(section) or {}).items():
            for key, value in metrics.items():
                metric, _, filt = key.partition(",")
                numeric = isinstance(value, (int, float)) and not isinstance(value, bool)
                if not numeric or "_stderr" in key or metric in _NOT_METRICS:
                    continue
                name = f"lm_eval_{task}_{metric}" + ("" if filt in ("", "none") else f"_{filt}")
                out[name] = float(value)
    return out


#: The paper's column name of each of :data:`PAPER_TASKS`.
PAPER_COLUMNS = {"arc_challenge": "ARC-c", "mmlu": "MMLU", "truthfulqa_mc1": "TruthfulQA", "gsm8k": "GSM8K"}
#: The summary key of each paper column's number -> its description.
PAPER_TASKS_KEYS = {
    "lm_eval_arc_challenge_acc_norm": "ARC-Challenge acc_norm (the paper's ARC-c)",
    "lm_eval_mmlu_acc": "MMLU acc (the paper's MMLU)",
    "lm_eval_truthfulqa_mc1_acc": "TruthfulQA MC1 acc (the paper's TruthfulQA)",
    "lm_eval_gsm8k_exact_match_flexible-extract": "GSM8K flexible exact match (the paper's GSM8K)",
}


def paper_columns(results: dict[str, Any]) -> dict[str, float]:
    """The paper's four numbers where their tasks ran: ``{"ARC-c", "MMLU", "TruthfulQA", "GSM8K"}``."""
    names = PAPER_COLUMNS
    merged = {**(results.get("results") or {}), **(results.get("groups") or {})}
    return {names[t]: float(merged[t][key]) for t, key in PAPER_TASKS.items() if key in merged.get(t, {})}


#: Top-level sections of lm-eval's results object that ``LM_EVAL.json`` keeps (the rest: samples, task
#: configs with functions).
_KEPT = (
    "results",
    "groups",
    "group_subtasks",
    "versions",
    "n-shot",
    "higher_is_better",
    "n-samples",
    "config",
)


def attach(result: dict[str, Any], results: dict[str, Any], plan: LmEvalPlan) -> None:
    """Add lm-eval's numbers to an evaluation result: ``summary`` and ``added`` (``lm_eval_*`` keys),
    ``files["LM_EVAL.json"]`` (the paper's columns and lm-eval's results) and ``settings``."""
    import json

    numbers = summary(results)
    result["summary"].update(numbers)
    result.setdefault("added", []).extend(numbers)
    said = {k: "lm-eval " + PAPER_TASKS_KEYS.get(k, "(lm-eval's own metric)") for k in numbers}
    result.setdefault("descriptions", {}).update(said)
    kept = {k: results[k] for k in _KEPT if k in results}
    result.setdefault("files", {})["LM_EVAL.json"] = {
        "paper": paper_columns(results),
        **json.loads(json.dumps(kept, default=str)),
    }
    result.setdefault("settings", {})["lm_eval"] = plan.record()
