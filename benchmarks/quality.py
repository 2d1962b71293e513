"""The quality benchmark: ASU against the baselines on several embedded worlds, mean ± std.

``python -m benchmarks.quality [--quick|--full] [--seeds 0,1,2] [--jobs 2] [--out DIR]``

Each world (:mod:`asu.demo.world`, one per seed: 20 authors, 5 of them to forget, 65 forget rows) gets its
tiny model and oracle (:mod:`asu.demo.tiny`, cached by configuration), then, as stages of
:class:`asu.demo.experiment.Experiment`:

``layers``
    the per-layer attention KL of forget versus retain answers under smoothing (``asu inspect``'s
    statistic) and the layers where the two differ most (:mod:`benchmarks.quality_layers`);
``asu``
    ASU at its automatic τ (``temperature="auto:R"``, :mod:`asu.tau`) smoothing all layers, layers 0-1 (the
    demo's former setting) and the layers the KL gap picks; the first is the main ASU;
``sweep`` (full)
    the main ASU at other targets ``R``: how forgetting, retain and the preview's promise move with it;
``baselines``
    each baseline's learning rate bisected toward the main ASU's forget ROUGE-L and its numbers read at
    exactly that forgetting (:mod:`asu.demo.matching`): GA+GD, NPO, SimNPO and IDK, and in the full mode every
    other method of the registry (:data:`asu.demo.experiment.BASELINES`: ASU+IDK, DPO, AltPO, IDK+AP, ME+GD,
    LLMU, RMU, UNDIAL, SatImp, WGA, CE-U); ``--baselines`` picks others;
``robustness``
    the attacks of :mod:`asu.attacks` (``QualitySettings.attacks``) on the original, the oracle, the main ASU
    and the baseline runs read at its forgetting: relearning on the forget rows (R against the oracle's own
    relearning, the yardstick) and on half of them (the other half's recovery), NF4 quantization (Q) and the
    prefilled answer; the baselines' columns are read at the main ASU's forget ROUGE-L like every other
    number, and each method gets a verdict per attack (``quality_stats.VERDICTS``);
``continual``
    the forget authors as five requests in a row (:mod:`asu.continual`): ASU with the teacher anchored at the
    original model and at the previous step, and GA+GD at its matched learning rate; evaluated after every
    step.

Every stage's results are written to ``DIR/worlds/seed-K.json`` as soon as it finishes; a rerun with the
same settings skips the finished stages (and worlds). The aggregate across worlds (:mod:`benchmarks.
quality_stats`) goes to ``DIR/results.json``, ``DIR/results.md`` and the plots (:mod:`benchmarks.
quality_plots`), with the machine, the library versions, and the wall and CPU time. ``--quick`` runs the
same worlds and models with fewer runs (no layer variants, no sweep, fewer bisection steps, one continual
anchor), meant to finish within 15 minutes on 2 CPU cores once the models are cached.
"""

from __future__ import annotations

import argparse
import concurrent.futures
import dataclasses
import datetime
import json
import multiprocessing
import os
import sys
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch

from asu.demo.experiment import BASELINES, FIRST_BASELINES, Experiment, MethodSettings
from asu.demo.matching import MATCH_KEY
from asu.demo.tiny import TinyModelConfig, TrainConfig
from asu.demo.world import WorldConfig
from asu.environment import environment
from asu.files import atomic_write_json, atomic_write_text
from benchmarks import quality_stats as qs
from benchmarks.report import refresh_readme

RESULTS = Path(__file__).resolve().parent / "results"
README = Path(__file__).resolve().parent.parent / "README.md"
STAGES = ("layers", "asu", "sweep", "baselines", "robustness", "continual")


@dataclass(frozen=True)
class QualitySettings:
    """Everything a world's numbers depend on (recorded in every world file; a rerun must match)."""

    mode: str = "full"
    n_authors: int = 20
    forget_fraction: float = 0.25
    model: TinyModelConfig = field(default_factory=TinyModelConfig)
    methods: MethodSettings = field(default_factory=lambda: MethodSettings(lam=1.0, asu_lr=3e-4, epochs=10))
    #: The main ASU's automatic temperature target, and other targets of the sweep.
    target: str = "auto:0.5"
    sweep: tuple[float, ...] = (0.3, 0.7)
    #: ASU variants: label -> smoothed layers ("gap": the layers the attention KL gap picks).
    variants: tuple[tuple[str, str | None], ...] = (
        ("all layers", None),
        ("layers 0-1", "0-1"),
        ("KL-gap layers", "gap"),
    )
    #: The temperature at which the per-layer attention KL gap is measured.
    probe_temperature: float = 2.0
    baselines: tuple[str, ...] = tuple(BASELINES)
    match_steps: int = 4
    #: Continual runs: (label, method, teacher anchor); GA+GD runs at its matched learning rate.
    continual: tuple[tuple[str, str, str], ...] = (
        ("ASU, anchor original", "asu", "original"),
        ("ASU, anchor previous", "asu", "previous"),
        ("GA+GD", "gd", "original"),
        ("SimNPO", "simnpo", "original"),
    )
    max_new_tokens: int = 40
    #: Attacks on the attacked models (``asu eval --attack`` specs). Relearning at open-unlearning's 2e-5 for
    #: one epoch moves nothing on the tiny model (trained at lr 3e-3): 6 steps of 32 rows (3 epochs) at 1e-3.
    attacks: tuple[str, ...] = ("relearn:6:1e-3", "quant:nf4", "prefix")

    @property
    def main_variant(self) -> str:
        return self.variants[0][0]


def settings_for(mode: str) -> QualitySettings:
    """``full`` or ``quick`` (same worlds and models; fewer runs)."""
    if mode == "full":
        return QualitySettings()
    if mode == "quick":
        return QualitySettings(
            mode="quick",
            sweep=(),
            variants=(("all layers", None),),
            match_steps=2,
            baselines=FIRST_BASELINES,
            continual=(("ASU, anchor original", "asu", "original"),),
        )
    raise ValueError(f"unknown mode {mode!r}; choose quick or full")


def _record_settings(s: QualitySettings) -> dict[str, Any]:
    return json.loads(json.dumps(asdict(s)))


def _log(seed: int, text: str) -> None:
    print(f"[world {seed}] {text}", flush=True)


# -- one world ------------------------------------------------------------------------------------------


class WorldRun:
    """One world's stages, saved after each (``DIR/worlds/seed-K.json``), skipped when already saved."""

    def __init__(
        self, seed: int, s: QualitySettings, out: Path, cache_dir: str | None, progress: bool
    ) -> None:
        self.seed, self.s, self.progress = seed, s, progress
        self.path = out / "worlds" / f"seed-{seed}.json"
        self.exp = Experiment.build(
            WorldConfig(n_authors=s.n_authors, forget_fraction=s.forget_fraction, seed=seed),
            s.model,
            TrainConfig(seed=seed),
            methods=s.methods,
            max_new_tokens=s.max_new_tokens,
            progress=progress,
        )
        self.exp.keep_models = bool(s.attacks)
        self.cache_dir = cache_dir
        self.record: dict[str, Any] = self._load()

    def _load(self) -> dict[str, Any]:
        fresh = {
            "seed": self.seed,
            "settings": _record_settings(self.s),
            "done": [],
            "cpu_s": 0.0,
            "wall_s": 0.0,
        }
        if not self.path.exists():
            return fresh
        record = json.loads(self.path.read_text())
        if record.get("settings") != fresh["settings"]:
            raise ValueError(
                f"{self.path} was made with other settings; remove it or choose another --out directory"
            )
        return record

    def _save(self) -> None:
        exp = self.exp
        self.record.update(
            models={**self.record.get("models", {}), **exp.models},
            tau={**self.record.get("tau", {}), **exp.temperatures},
            timings={**self.record.get("timings", {}), **exp.timings},
            recipes={**self.record.get("recipes", {}), **exp.recipes},
            training=exp.training,
            forget_authors=self.exp.world.forget_authors,
            examples=self._examples(),
        )
        atomic_write_json(self.path, self.record)

    def _examples(self, n: int = 3) -> list[dict[str, str]]:
        forget = self.exp.forget
        gens = {**self.record.get("examples_generations", {}), **self.exp.generations}
        self.record["examples_generations"] = {k: v[:n] for k, v in gens.items()}
        return [
            {"question": forget[i]["question"], "answer": forget[i]["answer"]}
            | {k: v[i] for k, v in self.record["examples_generations"].items() if len(v) > i}
            for i in range(min(n, len(forget)))
        ]

    def run(self) -> dict[str, Any]:
        t0, c0 = time.perf_counter(), time.process_time()
        exp = self.exp
        exp.models.update(self.record.get("models", {}))
        exp.recipes.update(self.record.get("recipes", {}))
        exp.load_models(self.cache_dir)
        exp.evaluate_original()
        _log(self.seed, "models ready; original " + _brief(exp.models["original"]))
        for stage in STAGES:
            if stage in self.record["done"]:
                continue
            getattr(self, f"_stage_{stage}")()
            self.record["done"].append(stage)
            self.record["wall_s"] += time.perf_counter() - t0
            self.record["cpu_s"] += time.process_time() - c0
            t0, c0 = time.perf_counter(), time.process_time()
            self._save()
            _log(self.seed, f"stage {stage} done")
        self._save()
        return self.record

    # -- stages -------------------------------------------------------------------------------------------

    def _stage_layers(self) -> None:
        from benchmarks.quality_layers import attention_gap, top_layers

        exp = self.exp
        gap = attention_gap(exp.model, exp.tokenizer, exp.forget, exp.retain, self.s.probe_temperature)
        gap["picked"] = top_layers(gap["gap"])
        self.record["layers"] = gap

    def _layers(self, spec: str | None) -> str | None:
        if spec == "gap":
            return ",".join(str(i) for i in self.record["layers"]["picked"])
        return spec

    def _asu(self, name: str, layers: str | None, target: str) -> dict[str, Any]:
        m = self.s.methods
        summary = self.exp.run(name, "asu", m.asu_lr, temperature=target, layers=layers)
        _log(self.seed, f"{name}: τ {summary['temperature']:.3g}, " + _brief(summary))
        return summary

    def _stage_asu(self) -> None:
        variants = {}
        for label, spec in self.s.variants:
            layers = self._layers(spec)
            name = f"ASU {label} ({self.s.target})"
            self._asu(name, layers, self.s.target)
            variants[label] = name
        self.record["asu"] = {"main": variants[self.s.main_variant], "variants": variants}

    def _stage_sweep(self) -> None:
        label, spec = self.s.variants[0]
        sweep = {}
        for fraction in self.s.sweep:
            target = f"auto:{fraction:g}"
            name = f"ASU {label} ({target})"
            self._asu(name, self._layers(spec), target)
            sweep[f"{label}, R={fraction:g}"] = name
        self.record["sweep"] = sweep

    def _stage_baselines(self) -> None:
        target = self.exp.models[self.record["asu"]["main"]][MATCH_KEY]
        matched = {}
        for label in self.s.baselines:
            result = self.exp.match(label, BASELINES[label], target, self.s.match_steps)
            matched[label] = result
            at = result["at_target"]
            state = _brief(at["values"]) if at else "no run within the tolerance"
            _log(self.seed, f"{label} at ASU's forget ROUGE-L {target:.3f}: {state}")
        self.record["matched"] = matched

    def _stage_robustness(self) -> None:
        """The attacks on the original, the oracle, the main ASU and the baseline runs used at its forgetting;
        then each baseline read at the main ASU's forgetting again, with the attack columns."""
        exp, attacks = self.exp, list(self.s.attacks)
        if not attacks:
            self.record["robustness"] = {}
            return
        reference = exp.yardstick(attacks)
        original = exp.robustness("original", attacks, reference, None)
        names = ["oracle (retain only)", self.record["asu"]["main"]]
        names += [
            n for m in self.record["matched"].values() if m["at_target"] for n in m["at_target"]["runs"]
        ]
        for name in dict.fromkeys(names):
            cols = exp.robustness(name, attacks, reference, original)
            _log(self.seed, f"attacks on {name}: " + _brief_attacks(cols))
        target = exp.models[self.record["asu"]["main"]][MATCH_KEY]
        for m in self.record["matched"].values():
            m["at_target"] = exp.at_forgetting(m["runs"], target)
        self.record["robustness"] = {"attacks": attacks, "yardstick": reference, "attacked": list(names)}

    def _matched_lr(self, label: str) -> float:
        """The learning rate of the baseline run closest to the main ASU's forget ROUGE-L."""
        target = self.exp.models[self.record["asu"]["main"]][MATCH_KEY]
        runs = self.record["matched"][label]["runs"]
        best = min(runs, key=lambda n: abs(self.exp.models[n][MATCH_KEY] - target))
        return float(self.exp.models[best]["lr"])

    def _stage_continual(self) -> None:
        main_layers = self._layers(self.s.variants[0][1])
        out = {}
        for label, method, anchor in self.s.continual:

            def log(step: Any, label: str = label) -> None:
                ev = step.evaluation or {}
                tau = step.stats.get("temperature")
                _log(self.seed, f"continual {label} step {step.step}: τ {tau:.3g}, request "
                     + _brief(ev.get("request", {})))  # fmt: skip

            if method == "asu":
                steps = self.exp.continual(
                    label, "asu", self.s.methods.asu_lr, anchor, log, temperature=self.s.target,
                    layers=main_layers,
                )  # fmt: skip
            else:
                baseline = next(k for k, b in BASELINES.items() if b.method == method)
                steps = self.exp.continual(
                    label, method, self._matched_lr(baseline), anchor, log, epochs=BASELINES[baseline].epochs
                )
            out[label] = steps
            last = steps[-1]["evaluation"]
            _log(self.seed, f"continual {label}: after {len(steps)} steps, all forgotten "
                 + _brief(last["forgotten"]) + "; retain " + _brief(last["request"]))  # fmt: skip
        self.record["continual"] = out


def _brief(summary: dict[str, Any]) -> str:
    keys = (
        "forget_rouge",
        "forget_fact_leakage_any",
        "forget_degenerate_answers",
        "retain_rouge",
        "model_utility",
    )
    return ", ".join(f"{k} {summary[k]:.3f}" for k in keys if summary.get(k) is not None)


def _brief_attacks(columns: dict[str, Any]) -> str:
    keys = ("relearn_R", "relearn_split_recovered", "quant_nf4_Q", "prefix_forget_Q_A_Prob")
    return ", ".join(f"{k} {columns[k]:.3f}" for k in keys if columns.get(k) is not None)


def _world_job(seed: int, s: QualitySettings, out: str, cache_dir: str | None, threads: int) -> dict:
    torch.set_num_threads(threads)
    return WorldRun(seed, s, Path(out), cache_dir, progress=False).run()


# -- across worlds --------------------------------------------------------------------------------------


def aggregate(worlds: list[dict[str, Any]], s: QualitySettings) -> dict[str, Any]:
    """Every statistic across worlds that results.json and results.md report."""
    main = f"ASU: {s.main_variant}"
    stats = qs.aggregate(worlds)
    comparisons = {f"{main} − {b} @ matched": qs.paired(worlds, main, f"{b} @ matched") for b in s.baselines}
    for label, _ in s.variants[1:]:
        comparisons[f"ASU: {label} − {main}"] = qs.paired(
            worlds, f"ASU: {label}", main, (*qs.PAIRED, "forget_rouge")
        )
    sweep_rows = {}
    for w in worlds:
        for label, name in w.get("sweep", {}).items():
            sweep_rows.setdefault(label, []).append(w["models"][name])
    sweep = {
        label: {k: qs.mean_std(r.get(k) for r in rows) for k in ("temperature", *qs.METRICS)}
        for label, rows in sweep_rows.items()
    }
    continual = {label: qs.continual_steps(worlds, label) for label, _, _ in s.continual}
    layers = [
        {"world": w["seed"], "gap": w["layers"]["gap"], "picked": w["layers"]["picked"]}
        for w in worlds
        if "layers" in w
    ]
    return {
        "worlds": [w["seed"] for w in worlds],
        "table": stats,
        "robustness": robustness_aggregate(worlds),
        "paired": comparisons,
        "sweep": sweep,
        "tau_promise": qs.tau_promise(worlds),
        "continual": continual,
        "layers": layers,
    }


#: Rows of the robustness tables that are not unlearned models (no verdict: nothing was forgotten).
REFERENCE_ROWS = ("original", "oracle (retain only)")


def robustness_aggregate(worlds: list[dict[str, Any]]) -> dict[str, Any]:
    """The robustness tables (forget probability, forget ROUGE-L) across worlds, and each method's verdict
    per attack (:data:`quality_stats.VERDICTS`)."""
    rows = qs.robustness_rows(worlds)
    if not rows:
        return {}
    return {
        "prob": qs.aggregate(worlds, rows, qs.ROBUSTNESS),
        "rouge": qs.aggregate(worlds, rows, qs.ROBUSTNESS_ROUGE),
        "verdicts": qs.verdicts(worlds, [r for r in rows if r not in REFERENCE_ROWS]),
    }


def _protocol(s: QualitySettings) -> str:
    """The attacks as one sentence for the reports."""
    return (
        f"Attacks (`asu eval --attack` specs): {', '.join(f'`{a}`' for a in s.attacks)}. Relearning "
        "fine-tunes a copy on the forget rows (AdamW, 32 rows a step, linear decay, answer NLL) and, in the "
        "split variant, on half of them, scoring the other half; R = min(oracle's gain / model's gain, 1) "
        "with the oracle (retain-only model) relearned the same way; Q = min(before / after NF4, 1); "
        "robustness = harmonic mean of R and Q (open-unlearning's meta-evaluation); held-out recovered = "
        "(after − before) / (original − before) on the half not trained on. Baselines are read at the main "
        "ASU's forget ROUGE-L like every other number."
    )


def robustness_markdown(agg: dict[str, Any], n: int, s: QualitySettings) -> str:
    """The robustness section of results.md."""
    rob = agg.get("robustness") or {}
    if not rob:
        return ""
    text = "## Robustness: does the knowledge come back?\n\n" + _protocol(s) + "\n\n"
    text += "On the forget probability (`forget_Q_A_Prob`, the meta-evaluation's Prob):\n\n"
    text += qs.main_table(rob["prob"], n, qs.ROBUSTNESS) + "\n"
    text += "On forget ROUGE-L (`forget_Q_A_ROUGE`):\n\n" + qs.main_table(
        rob["rouge"], n, qs.ROBUSTNESS_ROUGE
    )
    text += "\nWhich forgetting survives which attack (on the forget probability):\n\n"
    text += qs.verdict_table(rob["verdicts"]) + "\n"
    text += "".join(f"* {a}: {rule}\n" for a, rule in qs.VERDICT_RULES.items()) + "\n"
    return text


def _markdown(results: dict[str, Any], worlds: list[dict[str, Any]], s: QualitySettings) -> str:
    env, agg, t = results["environment"], results["aggregate"], results["timing"]
    n = len(worlds)
    main = f"ASU: {s.main_variant}"
    seeds = ", ".join(map(str, agg["worlds"]))
    command = f"python -m benchmarks.quality --{s.mode} --seeds {seeds.replace(' ', '')}"
    versions = f"torch {env['torch']}, transformers {env['transformers']}, triton {env['triton']}"
    models = "cached" if t["models_cached"] else "trained in this run"
    text = f"# Quality benchmark ({s.mode})\n\n"
    text += (
        f"Produced by `{command}` on {env['machine']}, {versions}, {env['date']}; {t['jobs']} world(s) in "
        f"parallel, {t['threads']} torch thread(s) each; wall {t['wall_s'] / 60:.1f} min, CPU "
        f"{t['cpu_s'] / 60:.1f} min (models {models}).\n\n"
    )
    text += (
        f"{n} worlds (seeds {seeds}), each {s.n_authors} authors with "
        f"{round(s.forget_fraction * s.n_authors)} to forget; mean ± sample std across worlds. ASU at its "
        f"automatic τ ({s.target}: the smoothed teacher's forget ROUGE-L at that fraction of the "
        f"original's), λ {s.methods.lam:g}, lr {s.methods.asu_lr:g}, {s.methods.epochs:g} epochs; baselines "
        f"read at the main ASU's ({s.main_variant}) forget ROUGE-L by learning-rate bisection and "
        "interpolation.\n\n"
    )
    text += "## Methods\n\n" + qs.main_table(agg["table"], n) + "\n"
    text += robustness_markdown(agg, n, s)
    text += "## ASU minus each baseline at matched forgetting (and ASU variants minus the main ASU)\n\n"
    text += qs.paired_table(agg["paired"]) + "\n"
    p = agg["tau_promise"]
    if p["n"]:
        text += (
            "## The automatic τ's promise\n\n"
            f"Forget ROUGE-L after unlearning minus the preview's target, over {p['n']} ASU runs (single "
            f"runs and continual steps): {qs.fmt(p['error'])}; at most {p['tolerance']} above the target in "
            f"{p['met']}/{p['n']}, within ±{p['tolerance']} in {p['close']}/{p['n']}.\n\n"
        )
    if agg["sweep"]:
        text += (
            "## The target R (main ASU)\n\n| target | τ | forget ROUGE-L | fact leak | degenerate answers | "
        )
        text += "retain ROUGE-L |\n|---|---|---|---|---|---|\n"
        rows = {f"{s.main_variant}, R={s.target.split(':')[1]}": agg["table"].get(main, {})} | agg["sweep"]
        for label, r in rows.items():
            tau = r.get("temperature")
            keys = ("forget_rouge", "forget_fact_leakage_any", "forget_degenerate_answers", "retain_rouge")
            cells = [qs.fmt(tau, 2)] + [qs.fmt(r.get(k)) for k in keys]
            text += f"| {label} | " + " | ".join(cells) + " |\n"
        text += "\n"
    for label, steps in agg["continual"].items():
        if steps:
            text += f"## Continual unlearning: {label}\n\n" + qs.continual_table(steps) + "\n"
    if agg["layers"]:
        text += f"## Per-layer attention KL, forget − retain answers (τ {s.probe_temperature:g})\n\n"
        text += "| world | gap per layer | picked |\n|---|---|---|\n"
        for entry in agg["layers"]:
            gaps = ", ".join(f"{g:+.4f}" for g in entry["gap"])
            text += f"| {entry['world']} | {gaps} | {entry['picked']} |\n"
        text += "\n"
    rows = qs.table_rows(worlds)
    text += "## Every world\n\n" + qs.per_world_table(worlds, rows, list(qs.METRICS)[:7]) + "\n"
    text += "## Forget-prompt generations (world {})\n\n".format(worlds[0]["seed"])
    for e in worlds[0].get("examples", []):
        text += f"**Q:** {e['question']}\n\n" + "".join(
            f"* {k}: {v!r}\n" for k, v in e.items() if k != "question"
        )
        text += "\n"
    return text


#: The README's quality and robustness sections lie between these markers (``--readme`` rewrites them).
README_MARKERS = ("<!-- quality:start -->", "<!-- quality:end -->")
ROBUSTNESS_MARKERS = ("<!-- robustness:start -->", "<!-- robustness:end -->")
README_METRICS = (
    "forget_rouge",
    "forget_fact_leakage_any",
    "retain_rouge",
    "model_utility",
    "forget_no_repeat",
    "forget_degenerate_answers",
)


#: A paired difference smaller than this (half a point of a 0-1 metric) is a tie, not a sign.
TIE = 0.005


def _consistent_differences(agg: dict[str, Any]) -> list[str]:
    """The paired differences whose sign is the same in every world, each beyond :data:`TIE`
    (:func:`quality_stats.holds_everywhere`; the only ones a claim may rest on)."""
    lines = []
    for name, per_metric in agg["paired"].items():
        for key, c in per_metric.items():
            d = c.get("diff") if c else None
            if not d or d["n"] < 2:
                continue
            for sign, word in ((+1, "higher"), (-1, "lower")):
                if qs.holds_everywhere(per_metric, key, sign, TIE):
                    spread = f"{d['mean']:+.3f} ± {d['std']:.3f}"
                    lines.append(f"* {name}: {qs.METRICS[key][0]} {word} in every world ({spread})")
    return lines


def readme_section(results: dict[str, Any], s: QualitySettings, results_md: Path, readme: Path) -> str:
    """The README's quality section: the headline table, the differences that hold in every world, the
    automatic τ's promise and the end of each continual run, with a link to the full report."""
    env, agg, t = results["environment"], results["aggregate"], results["timing"]
    n = len(agg["worlds"])
    link = os.path.relpath(results_md, readme.parent)
    text = (
        f"Measured by `python -m benchmarks.quality --{s.mode}` on {env['machine']} (torch {env['torch']}, "
        f"transformers {env['transformers']}, {env['date'][:10]}; wall {t['wall_s'] / 60:.0f} min); full "
        f"report: [{results_md.name}]({link}). {n} worlds, mean ± std across worlds.\n\n"
    )
    keys = README_METRICS
    text += "| model | " + " | ".join(qs.METRICS[k][0] for k in keys) + " |\n"
    text += "|---" * (1 + len(keys)) + "|\n"
    for row, values in agg["table"].items():
        text += f"| {row} | " + " | ".join(qs.fmt(values.get(k)) for k in keys) + " |\n"
    consistent = _consistent_differences(agg)
    text += (
        f"\nDifferences with the same sign in every world (each at least {TIE:g}; the variants forget less "
        "or more than the main ASU, so theirs are not matched comparisons):\n\n"
        + ("\n".join(consistent) if consistent else "* none")
        + "\n"
    )
    p = agg["tau_promise"]
    if p["n"]:
        text += (
            f"\nThe automatic τ's promise: after unlearning, forget ROUGE-L minus the preview's target is "
            f"{qs.fmt(p['error'])} over {p['n']} runs; at most {p['tolerance']} above it in "
            f"{p['met']}/{p['n']}.\n"
        )
    ends = []
    for label, steps in agg["continual"].items():
        if steps:
            last = steps[-1]
            ends.append(
                f"* {label}, after step {last['step']}: everything forgotten ROUGE-L "
                f"{qs.fmt(last.get('forgotten.forget_rouge'))}, last request's fact leak "
                f"{qs.fmt(last.get('request.forget_fact_leakage_any'))}; retain ROUGE-L "
                f"{qs.fmt(last.get('request.retain_rouge'))}, model utility "
                f"{qs.fmt(last.get('request.model_utility'))}"
            )
    if ends:
        text += "\nContinual unlearning (one request per forget author):\n\n" + "\n".join(ends) + "\n"
    return text


def robustness_readme_section(
    results: dict[str, Any], s: QualitySettings, results_md: Path, readme: Path
) -> str:
    """The README's robustness section: for each method, whether its forgetting survives each attack (the
    verdicts of the committed results, with their rules), and the headline robustness numbers."""
    env, agg, t = results["environment"], results["aggregate"], results["timing"]
    rob = agg.get("robustness") or {}
    if not rob:
        return "No robustness results in this run."
    link = os.path.relpath(results_md, readme.parent)
    n = len(agg["worlds"])
    text = (
        f"Measured by `python -m benchmarks.quality --{s.mode}` on {env['machine']} (torch {env['torch']}, "
        f"transformers {env['transformers']}, {env['date'][:10]}; wall {t['wall_s'] / 60:.0f} min); full "
        f"report: [{results_md.name}]({link}). {n} worlds, mean ± std across worlds.\n\n"
        + _protocol(s)
        + "\n\n"
    )
    keys = (
        "before_forget_Q_A_Prob",
        "relearn_R",
        "relearn_split_recovered",
        "quant_nf4_Q",
        "prefix_forget_Q_A_Prob",
        "robustness",
    )
    text += (
        "| model | "
        + " | ".join(qs.ROBUSTNESS[k][0] for k in keys)
        + " |\n"
        + "|---" * (1 + len(keys))
        + "|\n"
    )
    for row, values in rob["prob"].items():
        text += f"| {row} | " + " | ".join(qs.fmt(values.get(k), n_of=n) for k in keys) + " |\n"
    text += _prefix_caveat(rob["prob"].get("original", {}))
    text += "\nWhich forgetting survives which attack:\n\n" + qs.verdict_table(rob["verdicts"]) + "\n"
    text += "".join(f"* {a}: {rule}\n" for a, rule in qs.VERDICT_RULES.items())
    lines = []
    for row, per_attack in rob["verdicts"].items():
        kept = [a for a, v in per_attack.items() if v["verdict"] == "survives"]
        lost = [a for a, v in per_attack.items() if v["verdict"] == "fails"]
        measured = max(v["stat"]["n"] for v in per_attack.values())
        where = (
            f"in every world ({measured})" if measured == n else f"in the {measured} of {n} worlds measured"
        )
        lines.append(
            f"* {row}: survives {', '.join(kept) if kept else 'no attack'}; fails "
            f"{', '.join(lost) if lost else 'no attack'} ({where})"
        )
    return text + "\n" + "\n".join(lines) + "\n"


def _prefix_caveat(original: dict[str, Any]) -> str:
    """A note when the prefilled opener lowers even the original model's forget probability: the opener is
    foreign to the model, so the prefilled-answer verdicts say little about the methods."""
    plain, prefilled = original.get("before_forget_Q_A_Prob"), original.get("prefix_forget_Q_A_Prob")
    if not plain or not prefilled or prefilled["mean"] >= plain["mean"] - 0.1:
        return ""
    return (
        f"\nThe prefilled opener lowers even the original model's forget Prob ({qs.fmt(plain)} → "
        f"{qs.fmt(prefilled)}): the opener is foreign to these tiny models, so the prefilled-answer verdicts "
        "say little about the methods here.\n"
    )


def _device() -> str:
    return "cuda" if torch.cuda.is_available() else "cpu"


def default_out(mode: str) -> Path:
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    return RESULTS / f"quality-{mode}-{_device()}-{date}"


def run_worlds(seeds: list[int], s: QualitySettings, out: Path, cache_dir: str | None, jobs: int,
               threads: int, progress: bool) -> list[dict[str, Any]]:  # fmt: skip
    """Every world, ``jobs`` at a time (separate processes when ``jobs > 1``), in seed order."""
    if jobs <= 1:
        torch.set_num_threads(threads)
        return [WorldRun(seed, s, out, cache_dir, progress).run() for seed in seeds]
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=jobs, mp_context=ctx) as pool:
        futures = [pool.submit(_world_job, seed, s, str(out), cache_dir, threads) for seed in seeds]
        return [f.result() for f in futures]


def write_results(
    out: Path, worlds: list[dict[str, Any]], s: QualitySettings, timing: dict[str, Any]
) -> dict:
    """``results.json``, ``results.md`` and the plots from the world records."""
    from benchmarks.quality_plots import plot_all

    results = {
        "settings": _record_settings(s),
        "environment": environment(),
        "timing": timing,
        "aggregate": aggregate(worlds, s),
    }
    atomic_write_json(out / "results.json", results)
    atomic_write_text(out / "results.md", _markdown(results, worlds, s))
    plot_all(out, worlds, results["aggregate"], s)
    return results


def _refresh_readme(readme: Path, which: str, results: dict[str, Any], s: QualitySettings, md: Path) -> None:
    sections = {
        "quality": (readme_section, README_MARKERS),
        "robustness": (robustness_readme_section, ROBUSTNESS_MARKERS),
    }
    for name, (build, markers) in sections.items():
        if which in ("all", name) and not refresh_readme(readme, build(results, s, md, readme), markers):
            print(f"{readme}: no {' / '.join(markers)} markers; left untouched", file=sys.stderr)


def replot(out: Path, seeds: list[int], s: QualitySettings) -> int:
    """The plots of a finished run, redrawn from its ``results.json`` (the aggregate it reported) and world
    files, without touching its numbers."""
    from benchmarks.quality_plots import plot_all

    missing = [
        p
        for p in [out / "results.json", *(out / "worlds" / f"seed-{k}.json" for k in seeds)]
        if not p.is_file()
    ]
    if missing:
        print(f"--plots-only: {', '.join(map(str, missing))} not found", file=sys.stderr)
        return 2
    worlds = [json.loads((out / "worlds" / f"seed-{k}.json").read_text()) for k in seeds]
    plot_all(out, worlds, json.loads((out / "results.json").read_text())["aggregate"], s)
    print(f"plots redrawn in {out}")
    return 0


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m benchmarks.quality", description=__doc__.splitlines()[0])
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_const", const="quick", dest="mode")
    mode.add_argument("--full", action="store_const", const="full", dest="mode")
    parser.add_argument("--seeds", default="0,1,2", help="world seeds, comma-separated (default 0,1,2)")
    parser.add_argument(
        "--out", help="output directory (default benchmarks/results/quality-MODE-DEVICE-DATE)"
    )
    parser.add_argument("--cache-dir", help="model cache (default $ASU_CACHE or ~/.cache/asu)")
    parser.add_argument("--jobs", type=int, help="worlds run in parallel processes (default: one per world)")
    parser.add_argument(
        "--threads",
        type=int,
        default=1,
        help="torch threads per world (default 1: on a shared machine more threads per process thrash)",
    )
    parser.add_argument(
        "--baselines",
        help=f"baselines to run, comma-separated, of {', '.join(BASELINES)} (default: all in --full, "
        f"{', '.join(FIRST_BASELINES)} in --quick)",
    )
    parser.add_argument("--aggregate-only", action="store_true", help="rebuild the report from DIR/worlds")
    parser.add_argument(
        "--plots-only",
        action="store_true",
        help="redraw the plots from DIR/results.json and DIR/worlds; nothing else is rewritten",
    )
    parser.add_argument("--progress", action="store_true", help="progress bars of every stage")
    parser.add_argument(
        "--readme",
        nargs="?",
        const=str(README),
        help="also rewrite the quality and robustness sections of this README (default the repository's) "
        "from the results",
    )
    parser.add_argument(
        "--readme-section",
        choices=("all", "quality", "robustness"),
        default="all",
        help="which README section --readme rewrites (default both)",
    )
    args = parser.parse_args(argv)
    s = settings_for(args.mode or "full")
    if args.baselines:
        picked = tuple(b.strip() for b in args.baselines.split(",") if b.strip())
        unknown = [b for b in picked if b not in BASELINES]
        if unknown or not picked:
            parser.error(f"--baselines: unknown {unknown}; choose from {', '.join(BASELINES)}")
        s = dataclasses.replace(s, baselines=picked)
    try:
        seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    except ValueError:
        parser.error(f"--seeds: expected comma-separated integers, got {args.seeds!r}")
    if not seeds or len(set(seeds)) != len(seeds):
        parser.error("--seeds: give at least one seed, each once")
    args.jobs = args.jobs or len(seeds)
    if args.jobs < 1 or args.threads < 1:
        parser.error("--jobs and --threads must be >= 1")
    threads = args.threads
    out = Path(args.out) if args.out else default_out(s.mode)
    if args.plots_only:
        return replot(out, seeds, s)
    t0, c0 = time.perf_counter(), time.process_time()
    if args.aggregate_only:
        worlds = [json.loads((out / "worlds" / f"seed-{k}.json").read_text()) for k in seeds]
    else:
        worlds = run_worlds(seeds, s, out, args.cache_dir, args.jobs, threads, args.progress)
    wall = time.perf_counter() - t0
    world_cpu = sum(w["cpu_s"] for w in worlds)
    timing = {
        "wall_s": wall if not args.aggregate_only else max(w["wall_s"] for w in worlds),
        "cpu_s": world_cpu + (time.process_time() - c0 if args.jobs > 1 else 0.0),
        "world_cpu_s": world_cpu,
        "world_wall_s": {str(w["seed"]): w["wall_s"] for w in worlds},
        "jobs": args.jobs,
        "threads": threads,
        "models_cached": all(i.get("cached") for w in worlds for i in w["training"].values()),
    }
    if args.aggregate_only:
        timing = (
            json.loads((out / "results.json").read_text())["timing"]
            if (out / "results.json").exists()
            else timing
        )
    results = write_results(out, worlds, s, timing)
    if args.readme:
        _refresh_readme(Path(args.readme), args.readme_section, results, s, out / "results.md")
    print(f"quality benchmark: {len(worlds)} worlds, wall {wall / 60:.1f} min; results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
