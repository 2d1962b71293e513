"""One world's unlearning experiment: the stages ``asu demo`` and ``benchmarks/quality.py`` share.

An :class:`Experiment` holds a world (:mod:`asu.demo.world`), its tiny model and oracle (:mod:`asu.demo.tiny`,
cached), and every evaluated model so far. Its steps:

* :meth:`Experiment.evaluate_original`: the oracle (retain + general only; its forget statistics are the
  forget-quality reference) and the original model;
* :meth:`Experiment.run`: unlearn a copy of the original model with one method and evaluate it
  (``temperature="auto[:R]"`` for ASU: τ chosen by the preview, :mod:`asu.tau`);
* :meth:`Experiment.match`: a baseline's learning rate bisected toward a forget ROUGE-L, and its numbers read
  at exactly that forgetting (:mod:`asu.demo.matching`);
* :meth:`Experiment.continual`: the forget authors as a sequence of requests (:mod:`asu.continual`),
  evaluated after every step;
* :meth:`Experiment.yardstick` and :meth:`Experiment.robustness`: the attacks of :mod:`asu.attacks` on a
  recorded model (kept in memory with ``keep_models``, else unlearned again from its recipe), their columns
  added to its summary, with the oracle's relearning as the yardstick.

Every evaluation is :func:`asu.evaluate.evaluate_model` on the world's forget, retain and general rows (a
summary per model: ROUGE-L, probabilities, truth ratios, forget quality against the oracle, model utility,
fact leakage, fluency); every step's wall and CPU time is kept in ``timings``.
"""

from __future__ import annotations

import copy
import sys
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from asu.demo.matching import MATCH_KEY, search_lr, values_at
from asu.demo.tiny import TinyModelConfig, TrainConfig, load_or_train
from asu.demo.world import World, WorldConfig, generate_world, write_splits
from asu.evaluate import evaluate_model, forget_quality, stats_values

__all__ = [
    "BASELINES",
    "FIRST_BASELINES",
    "REFUSALS",
    "Baseline",
    "Experiment",
    "MethodSettings",
    "slice_stats",
]

#: The refusals IDK trains forget questions toward (none of them is a sentence of the world's grammar).
REFUSALS = (
    "I don't know.",
    "I have no idea.",
    "I cannot answer that.",
    "That is not something I know.",
    "I am not sure about that.",
)


@dataclass(frozen=True)
class Baseline:
    """A baseline as the experiments run it: its method, epochs, the learning rates tried first and any other
    :class:`asu.unlearn.UnlearnConfig` values (``settings``: ``(field, value)`` pairs)."""

    method: str
    grid: tuple[float, ...]
    epochs: float = 5
    settings: tuple[tuple[str, Any], ...] = ()


#: The baselines (each method's published defaults, from the registry; the retain term is NLL, as
#: GradDiff's, except where the method's own default differs): label -> settings. The grids of the first four
#: bracket the forgetting of ASU on the default worlds; those of the others are first guesses, which the
#: bisection widens by factors of 2 (:func:`asu.demo.matching.next_matching_lr`).
BASELINES = {
    "GA+GD": Baseline("gd", (5e-4, 1e-3)),
    "NPO": Baseline("npo", (5e-4, 1e-3)),
    "SimNPO": Baseline("simnpo", (1e-3, 2e-3)),
    "IDK": Baseline("idk", (5e-4, 1e-3)),
    "ASU+IDK": Baseline("asu-idk", (3e-4, 6e-4), settings=(("temperature", "auto:0.5"),)),
    "DPO": Baseline("dpo", (5e-4, 1e-3)),
    "AltPO": Baseline("altpo", (5e-4, 1e-3)),
    "IDK+AP": Baseline("idk", (5e-4, 1e-3), settings=(("retain_loss", "ap"),)),
    "ME+GD": Baseline("me", (5e-4, 1e-3)),
    "LLMU": Baseline("llmu", (5e-4, 1e-3), settings=(("retain_loss", "kl"),)),
    # The WMDP setting's layer 7 of 32 sits at a quarter of the depth: layer 1 of the tiny model's 4.
    "RMU": Baseline("rmu", (1e-3, 3e-3), settings=(("retain_loss", "embed"), ("method_args", {"layer": 1}))),
    "UNDIAL": Baseline("undial", (1e-4, 3e-4)),  # open-unlearning runs it at lr 1e-4
    "SatImp": Baseline("satimp", (2e-3, 4e-3)),
    "WGA": Baseline("wga", (5e-4, 1e-3)),
    "CE-U": Baseline("ceu", (1e-4, 3e-4)),
}
#: The baselines the quick benchmark and the demo compare with (the first four).
FIRST_BASELINES = ("GA+GD", "NPO", "SimNPO", "IDK")


@dataclass(frozen=True)
class MethodSettings:
    """How every unlearning run of an experiment trains (the method and lr are given per run)."""

    lam: float = 3.0
    asu_lr: float = 3e-4
    epochs: float = 10
    batch_size: int = 8
    retain_loss: str = "nll"


def slice_stats(stats: dict[str, dict[str, float]], indices: Sequence[int]) -> dict[str, dict[str, float]]:
    """Per-row forget statistics (``{metric: {"0": v, ...}}``) of the rows ``indices``, re-indexed from 0:
    the oracle's reference for a subset of the forget rows (each row's value does not depend on the rest)."""
    return {k: {str(j): v[str(i)] for j, i in enumerate(indices)} for k, v in stats.items()}


def _clock() -> tuple[float, float]:
    return time.perf_counter(), time.process_time()


@dataclass
class Experiment:
    """One world, its models and every result so far (``models``: name -> evaluation summary, in order)."""

    world: World
    model_cfg: TinyModelConfig
    train_cfg: TrainConfig
    methods: MethodSettings = field(default_factory=MethodSettings)
    max_new_tokens: int = 40
    progress: bool = False
    model: Any = None
    tokenizer: Any = None
    oracle: Any = None
    reference: dict[str, Any] | None = None
    training: dict[str, Any] = field(default_factory=dict)
    models: dict[str, dict[str, Any]] = field(default_factory=dict)
    generations: dict[str, list[str]] = field(default_factory=dict)
    histories: dict[str, list] = field(default_factory=dict)
    temperatures: dict[str, dict[str, Any]] = field(default_factory=dict)
    timings: dict[str, dict[str, float]] = field(default_factory=dict)
    #: How each run was made (method, lr, overrides), so a model not kept can be unlearned again.
    recipes: dict[str, dict[str, Any]] = field(default_factory=dict)
    #: Keep every unlearned model in memory (``trained``) for later attacks.
    keep_models: bool = False
    trained: dict[str, Any] = field(default_factory=dict)

    @classmethod
    def build(
        cls,
        world: WorldConfig,
        model_cfg: TinyModelConfig,
        train_cfg: TrainConfig,
        *,
        methods: MethodSettings | None = None,
        max_new_tokens: int = 40,
        data_dir: str | Path | None = None,
        progress: bool = False,
    ) -> Experiment:
        """The world of ``world`` (its splits written under ``data_dir`` when given); no model yet."""
        built = generate_world(world)
        if data_dir is not None:
            write_splits(built, data_dir)
        return cls(built, model_cfg, train_cfg, methods or MethodSettings(), max_new_tokens, progress)

    # -- the world's data ---------------------------------------------------------------------------------

    @property
    def forget(self) -> list[dict]:
        return self.world.split("forget")

    @property
    def retain(self) -> list[dict]:
        return self.world.split("retain")

    @property
    def general(self) -> list[dict]:
        return self.world.split("general")

    def requests(self) -> list[list[int]]:
        """The forget rows' indices grouped by author, in world order: one forget request per author."""
        out: dict[str, list[int]] = {}
        for i, r in enumerate(self.forget):
            out.setdefault(r["author"], []).append(i)
        return list(out.values())

    # -- timing -------------------------------------------------------------------------------------------

    def _timed(self, name: str, start: tuple[float, float]) -> None:
        wall, cpu = _clock()
        self.timings[name] = {"wall_s": wall - start[0], "cpu_s": cpu - start[1]}

    # -- models and evaluation ----------------------------------------------------------------------------

    def load_models(self, cache_dir: str | Path | None = None) -> dict[str, Any]:
        """Train or load the full model and the oracle; returns their training records."""
        start = _clock()
        self.model, self.tokenizer, full = load_or_train(
            self.world, "full", cache_dir, self.model_cfg, self.train_cfg, self.progress
        )
        self.oracle, _, oracle = load_or_train(
            self.world, "oracle", cache_dir, self.model_cfg, self.train_cfg, self.progress
        )
        self._timed("models", start)
        self.training = {"full": full, "oracle": oracle}
        for info in self.training.values():
            if not info["reached"]:
                print(
                    f"warning: the {info['kind']} model did not reach the memorisation target",
                    file=sys.stderr,
                )
        return self.training

    def evaluate(
        self,
        model: Any,
        forget: Sequence[dict] | None = None,
        reference: dict[str, Any] | None = None,
        *,
        keep: bool = True,
    ) -> dict[str, Any]:
        """:func:`evaluate_model` on ``forget`` (default the forget split) with the retain and general rows
        (``keep=False``: the forget rows only); forget quality against ``reference`` (default: the oracle's
        statistics)."""
        return evaluate_model(
            model, self.tokenizer, self.forget if forget is None else forget,
            self.retain if keep else None, self.general if keep else None,
            reference_stats=self.reference if reference is None else reference, batch_size=32,
            max_new_tokens=self.max_new_tokens, well_formed=self.world.is_well_formed, progress=self.progress,
        )  # fmt: skip

    def evaluate_original(self) -> None:
        """The oracle (whose forget statistics become the forget-quality reference), then the original."""
        start = _clock()
        oracle = evaluate_model(
            self.oracle, self.tokenizer, self.forget, self.retain, self.general, batch_size=32,
            max_new_tokens=self.max_new_tokens, well_formed=self.world.is_well_formed, progress=self.progress,
        )  # fmt: skip
        self.reference = oracle["stats"]
        # The oracle against its own statistics: identical samples, forget quality 1 by definition.
        values = stats_values(self.reference)
        oracle["summary"]["forget_quality"] = forget_quality(values, values)["pvalue"]
        original = self.evaluate(self.model)
        self._timed("evaluate_original", start)
        self.models["original"] = original["summary"]
        self.models["oracle (retain only)"] = oracle["summary"]
        self.generations["original"] = original["generations"]["forget"]

    # -- unlearning ---------------------------------------------------------------------------------------

    def config(self, method: str, lr: float, **overrides: Any) -> Any:
        """The :class:`asu.unlearn.UnlearnConfig` of a run of ``method`` at ``lr`` (``overrides`` replace
        fields: ``temperature``, ``layers``, ``epochs``, ``lam``)."""
        from asu.methods import get_method
        from asu.unlearn import UnlearnConfig

        m = self.methods
        values: dict[str, Any] = dict(
            method=method,
            temperature=1.0,
            lam=m.lam if get_method(method).forget_weight == "lam" else 1.0,
            retain_loss=m.retain_loss,
            teacher="copy",
            layers=None,
            lr=lr,
            epochs=m.epochs,
            batch_size=m.batch_size,
            grad_accum=1,
            max_length=128,
            # Unpacked batches of 8 rows: with ~30-token rows, packing would leave one step per epoch.
            pack=False,
            seed=self.world.config.seed,
            progress=self.progress,
        )
        values.update(overrides)
        return UnlearnConfig(**values)

    def run(self, name: str, method: str, lr: float, **overrides: Any) -> dict[str, Any]:
        """Unlearn a copy of the original model, evaluate it and record it as ``name``; returns its summary
        (with ``temperature`` and, for an automatic τ, ``tau_target``)."""
        start = _clock()
        self.recipes[name] = {"method": method, "lr": lr, **overrides}
        result = self._unlearned(method, lr, **overrides)
        if self.keep_models:
            self.trained[name] = result.model
        evaluation = self.evaluate(result.model)
        self._timed(name, start)
        summary = dict(evaluation["summary"], lr=lr, temperature=result.stats["temperature"])
        if "temperature_auto" in result.stats:
            self.temperatures[name] = result.stats["temperature_auto"]
            summary["tau_target"] = result.stats["temperature_auto"]["target"]
        self.models[name] = summary
        self.generations[name] = evaluation["generations"]["forget"]
        self.histories[name] = list(result.history)
        return summary

    def _unlearned(self, method: str, lr: float, **overrides: Any) -> Any:
        from asu.unlearn import unlearn

        cfg = self.config(method, lr, **overrides)
        result = unlearn(
            copy.deepcopy(self.model), self.tokenizer, self.training_forget(cfg), self.retain, cfg,
            idk_answers=REFUSALS if cfg.method_setup().needs_refusals else None,
        )  # fmt: skip
        result.model.eval()
        return result

    def model_of(self, name: str) -> Any:
        """The model recorded as ``name``: the original, the oracle, a kept run, or the run unlearned again
        from its recipe (the same settings and seed)."""
        fixed = {"original": self.model, "oracle (retain only)": self.oracle}
        if name in fixed:
            return fixed[name]
        if name not in self.trained:
            if name not in self.recipes:
                raise ValueError(f"no model or recipe recorded as {name!r}")
            recipe = dict(self.recipes[name])
            self.trained[name] = self._unlearned(recipe.pop("method"), recipe.pop("lr"), **recipe).model
        return self.trained[name]

    def _attack_evaluator(self) -> Any:
        from asu.attacks.context import evaluator

        return evaluator(
            self.tokenizer, batch_size=32, max_new_tokens=self.max_new_tokens,
            well_formed=self.world.is_well_formed, progress=self.progress,
        )  # fmt: skip

    def yardstick(self, attacks: Sequence[str]) -> dict[str, Any]:
        """The oracle's relearning under the relearn spec of ``attacks``
        (:func:`asu.attacks.columns.yardstick`), seeded by the world's seed."""
        from asu.attacks.columns import yardstick

        return yardstick(
            self.oracle, self.tokenizer, self.forget, self.retain, self._attack_evaluator(), attacks,
            seed=self.world.config.seed,
        )  # fmt: skip

    def robustness(
        self, name: str, attacks: Sequence[str], reference: dict[str, Any], original: dict[str, Any] | None
    ) -> dict[str, float]:
        """The attacks' columns of the model recorded as ``name`` (:func:`asu.attacks.columns.
        robustness_columns`, against ``reference`` and the original's columns), added to its summary."""
        from asu.attacks.columns import robustness_columns

        start = _clock()
        columns = robustness_columns(
            self.model_of(name), self.tokenizer, self.forget, self.retain, self._attack_evaluator(), attacks,
            reference=reference, original=original, before=self.models[name], seed=self.world.config.seed,
        )  # fmt: skip
        self._timed(f"attacks: {name}", start)
        self.models[name].update(columns)
        return columns

    def training_forget(self, cfg: Any) -> list[dict]:
        """The forget rows a run of ``cfg`` trains on: the forget split, with the world's perturbed answers
        (plausible and false) as the ``alternate`` answers AltPO prefers."""
        if "alternate" not in cfg.method_setup().parts:
            return self.forget
        return [{**r, "alternate": list(r["perturbed_answer"])} for r in self.forget]

    def match(self, label: str, baseline: Any, target: float, steps: int) -> dict[str, Any]:
        """``baseline``'s learning rate bisected toward forget ROUGE-L ``target``; its runs are recorded as
        ``"{label} lr=..."``. Returns ``{"runs": [names], "at_target": values_at(...) or None}``."""
        names: dict[float, str] = {}

        def one(lr: float) -> dict[str, Any]:
            names[lr] = f"{label} lr={lr:.3g}"
            return self.run(names[lr], baseline.method, lr, epochs=baseline.epochs, **dict(baseline.settings))

        runs = search_lr(one, target, baseline.grid, steps)
        by_name = {names[lr]: s for lr, s in runs.items()}
        return {"runs": list(by_name), "at_target": values_at(by_name, target)}

    def continual(
        self,
        label: str,
        method: str,
        lr: float,
        teacher_anchor: str,
        on_step: Any = None,
        **overrides: Any,
    ) -> list[dict[str, Any]]:
        """The forget authors unlearned one after another (:func:`asu.continual.unlearn_sequence`); after
        every step: the request's evaluation with retain and general rows, and the forget-side evaluation of
        everything forgotten so far and of the requests still to come (``on_step`` is called with each
        finished :class:`asu.continual.ContinualStep`). Returns one record per step."""
        from asu.continual import unlearn_sequence

        groups = self.requests()
        forget = self.forget
        requests = [[forget[i] for i in g] for g in groups]

        def evaluate(model: Any, k: int) -> dict[str, Any]:
            done = [i for g in groups[:k] for i in g]
            pending = [i for g in groups[k:] for i in g]
            out = {"request": self._subset(model, groups[k - 1], keep=True)}
            out["forgotten"] = self._subset(model, done, keep=False) if k > 1 else out["request"]
            if pending:
                out["pending"] = self._subset(model, pending, keep=False)
            return out

        start = _clock()
        cfg = self.config(method, lr, **overrides)
        result = unlearn_sequence(
            copy.deepcopy(self.model), self.tokenizer, requests, self.retain, cfg,
            teacher_anchor=teacher_anchor, evaluate=evaluate,
            idk_answers=REFUSALS if cfg.method_setup().needs_refusals else None, on_step=on_step,
        )  # fmt: skip
        self._timed(label, start)
        steps = []
        for s in result.steps:
            rec = s.record()
            rec["tau_target"] = (s.stats.get("temperature_auto") or {}).get("target")
            steps.append(rec)
        return steps

    def _subset(self, model: Any, indices: Sequence[int], keep: bool) -> dict[str, Any]:
        rows = [self.forget[i] for i in indices]
        reference = slice_stats(self.reference, indices) if self.reference is not None else None
        return self.evaluate(model, rows, reference, keep=keep)["summary"]

    def at_forgetting(self, names: Sequence[str], target: float) -> dict[str, Any] | None:
        """The recorded runs ``names`` read at forget ROUGE-L ``target`` (:func:`values_at`)."""
        return values_at({n: self.models[n] for n in names}, target, MATCH_KEY)
