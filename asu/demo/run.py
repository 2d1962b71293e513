"""``asu demo``: forget authors of the embedded world with ASU, against gradient ascent + GD, and report.

Stages: build the world (:mod:`asu.demo.world`) and write its splits; train or load the tiny model and the
oracle (:mod:`asu.demo.tiny`, cached); evaluate the original model with the oracle's forget statistics as the
forget-quality reference; unlearn the forget split with ASU at its automatic τ (:mod:`asu.tau`: the
smoothed-teacher preview bisects τ, no training); the τ preview (the smoothed original model, fully
evaluated, no training); GA+GD (gradient ascent on forget, NLL on retain) with its learning rate bisected
toward ASU's forget ROUGE-L (:mod:`asu.demo.matching`); print a before/after table and forget-prompt
generations side by side; write ``results.json``, ``results.md`` and ``results.png`` under ``--out``. The
world and the ASU / GA+GD settings are the quality benchmark's (``benchmarks/quality.py``), so the demo on
world seed K reproduces that benchmark's world K for these two methods.

The claims are checked on the demo's own numbers and stored under ``claims`` in ``results.json``; each is
one the quality benchmark found on every world it ran (see the README's results section):

* ``asu_meets_preview_target``: ASU's forget ROUGE-L after training is at most the preview's target plus
  :data:`PROMISE_TOLERANCE` (the automatic τ keeps its promise);
* ``asu_forgets``: ASU's forget ROUGE-L is at most 0.6 of the original's;
* ``asu_stays_fluent``: at least 85% of ASU's forget answers are free of a repeated 3-gram;
* ``asu_keeps_retain``: ASU's retain ROUGE-L is at least 0.85 of the original's.

GA+GD at ASU's forgetting is reported (``ga_matched`` in ``results.json``) but no claim is made about it:
across the benchmark's worlds neither kept more retain ROUGE-L, nor leaked fewer facts, in every world.
"""

from __future__ import annotations

import os
import time
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import torch

from asu.charts import TradeoffPoint, tradeoff_chart
from asu.demo.experiment import BASELINES, Baseline, Experiment, MethodSettings
from asu.demo.tiny import TinyModelConfig, TrainConfig
from asu.demo.world import WorldConfig
from asu.environment import environment
from asu.evaluate import evaluate_smoothed
from asu.files import atomic_write_json, atomic_write_text
from asu.metrics.report import DEGENERATE_WARNING

# Columns of the before/after table: summary key -> header.
COLUMNS = {
    "temperature": "τ",
    "forget_rouge": "forget ROUGE-L",
    "forget_prob": "forget prob",
    "forget_truth_ratio": "forget TR",
    "forget_fact_leakage_any": "forget fact leak",
    "forget_degenerate_answers": "forget degenerate",
    "forget_quality": "forget quality",
    "retain_rouge": "retain ROUGE-L",
    "model_utility": "model utility",
    "forget_token_entropy": "token entropy",
    "forget_no_repeat": "no 3-gram repeat",
    "forget_well_formed": "well-formed",
}
#: The demo's world and ASU settings are the quality benchmark's (``benchmarks/quality.py``): its world for a
#: seed is this world, its main ASU this ASU, its GA+GD this GA+GD.
DEFAULT_TARGET = "auto:0.5"


@dataclass(frozen=True)
class DemoSettings:
    """Everything the demo's numbers depend on.

    The world has 20 authors, 5 of them to forget (65 forget rows). ASU runs at its automatic temperature
    (``temperature="auto:0.5"``: τ bisected with the smoothed-teacher preview until the teacher's forget
    ROUGE-L is half the original's, :mod:`asu.tau`) on every layer, λ 1, lr 3e-4, 10 epochs, retain NLL.
    GA+GD (5 epochs) starts at learning rates 5e-4 and 1e-3 and is bisected toward ASU's forget ROUGE-L.
    These are the quality benchmark's settings, so the demo on world seed K reproduces the benchmark's
    world K for ASU and GA+GD.
    """

    world: WorldConfig
    model: TinyModelConfig
    train: TrainConfig
    temperature: float | str = DEFAULT_TARGET
    # Smoothed layers (None = all), for ASU and the τ preview alike.
    layers: str | None = None
    lam: float = 1.0
    asu_lr: float = 3e-4
    epochs: int = 10
    ga_lrs: tuple[float, ...] = BASELINES["GA+GD"].grid
    ga_epochs: int = 5
    # At most this many extra GA+GD runs (learning-rate bisection) to match ASU's forget ROUGE-L.
    match_steps: int = 4
    preview_temperatures: tuple[float, ...] = (2.0, 3.0, 4.0)
    batch_size: int = 8
    max_new_tokens: int = 40
    n_examples: int = 4


#: The model of ``--quick``: every size of the default model halved, but still 2 key/value heads.
QUICK_MODEL = TinyModelConfig(
    vocab_size=512, hidden_size=64, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=16, intermediate_size=128
)


def default_settings(seed: int = 0, quick: bool = False) -> DemoSettings:
    """The demo's world, model and hyper-parameters (``quick``: a tiny world and model, for tests)."""
    if quick:
        return DemoSettings(
            world=WorldConfig(
                n_authors=8, n_cities=6, n_countries=5, n_perturbed=3, forget_fraction=0.25, seed=seed
            ),
            model=QUICK_MODEL,
            train=TrainConfig(lr=5e-3, batch_size=8, max_epochs=12, eval_every=6, warmup_steps=10, seed=seed),
            ga_lrs=(3e-4,),
            match_steps=0,
            preview_temperatures=(3.0,),
            epochs=2,
            ga_epochs=2,
            max_new_tokens=24,
            n_examples=2,
        )
    return DemoSettings(
        world=WorldConfig(n_authors=20, forget_fraction=0.25, seed=seed),
        model=TinyModelConfig(),
        train=TrainConfig(seed=seed),
    )


#: How far above the preview's target ASU's forget ROUGE-L may land for the target to count as met.
PROMISE_TOLERANCE = 0.05


def check_claims(
    models: dict[str, dict[str, Any]], asu_name: str, tau: dict[str, Any] | None
) -> dict[str, dict[str, Any]]:
    """The demo's claims, each with the numbers it was decided on (see the module docstring); ``tau`` is
    the automatic temperature's record (None when τ was given)."""
    orig, asu = models["original"], models[asu_name]
    claims: dict[str, dict[str, Any]] = {}
    if tau is not None:
        claims["asu_meets_preview_target"] = {
            "holds": asu["forget_rouge"] <= tau["target"] + PROMISE_TOLERANCE,
            "asu_forget_rouge": asu["forget_rouge"],
            "preview_target": tau["target"],
            "tolerance": PROMISE_TOLERANCE,
        }
    claims["asu_forgets"] = {
        "holds": asu["forget_rouge"] <= 0.6 * orig["forget_rouge"],
        "asu_forget_rouge": asu["forget_rouge"],
        "original_forget_rouge": orig["forget_rouge"],
    }
    claims["asu_stays_fluent"] = {
        "holds": asu["forget_no_repeat"] >= 0.85,
        "asu_no_repeat": asu["forget_no_repeat"],
    }
    claims["asu_keeps_retain"] = {
        "holds": asu["retain_rouge"] >= 0.85 * orig["retain_rouge"],
        "asu_retain_rouge": asu["retain_rouge"],
        "original_retain_rouge": orig["retain_rouge"],
    }
    return claims


def _cell(key: str, v: Any) -> str:
    if v is None:
        return "–"
    if key == "forget_quality":
        return f"{v:.2e}"
    if key == "temperature":
        return f"{v:.3g}"
    return f"{v:.3f}"


def _table(models: dict[str, dict[str, float]]) -> str:
    head = "| model | " + " | ".join(COLUMNS.values()) + " |\n|---|" + "---|" * len(COLUMNS) + "\n"
    lines = [f"| {name} | " + " | ".join(_cell(k, summary.get(k)) for k in COLUMNS) + " |"
             for name, summary in models.items()]  # fmt: skip
    return head + "\n".join(lines) + "\n"


def _examples(rows: list[dict], generations: dict[str, list[str]], n: int) -> list[dict[str, str]]:
    out = []
    for i, r in enumerate(rows[:n]):
        out.append(
            {"question": r["question"], "answer": r["answer"]} | {k: g[i] for k, g in generations.items()}
        )
    return out


def _examples_md(examples: list[dict[str, str]]) -> str:
    text = ""
    for e in examples:
        text += f"**Q:** {e['question']}\n\n"
        for k, v in e.items():
            if k != "question":
                text += f"* {k}: {v!r}\n"
        text += "\n"
    return text


ORACLE = "oracle (retain only)"


def tradeoff_points(results: dict[str, Any]) -> list[TradeoffPoint]:
    """Every model of a demo's ``results.json`` as a point of the trade-off chart: the original, the oracle,
    ASU, the smoothed previews as one τ curve, the GA+GD runs as one learning-rate curve."""
    ga_runs = set((results.get("ga_matched") or {}).get("runs", []))
    asu_name = results.get("asu_name")
    points = []
    for name, s in results["models"].items():
        if s.get("forget_rouge") is None or s.get("retain_rouge") is None:
            continue
        kind = {"original": "original", ORACLE: "oracle"}.get(name, "run")
        group, note = name, ""
        if name.startswith("smoothed "):
            group, note = "smoothed original, no training (τ preview)", f"τ={s['temperature']:.3g}"
        elif name in ga_runs:
            group, note = "GA+GD, learning rates", f"{s['lr']:.1e}".replace("e-0", "e-")
        elif name == asu_name:
            kind, note = "main", f"τ={s['temperature']:.3g}"
        points.append(
            TradeoffPoint(group, s["forget_rouge"], s["retain_rouge"], kind, note,
                          degenerate=s.get("forget_degenerate_answers"))
        )  # fmt: skip
    return points


def _chart(results: dict[str, Any], path: Path) -> bool:
    """``results.png``: forget ROUGE-L against retain ROUGE-L of every model (:func:`tradeoff_chart`)."""
    return tradeoff_chart(tradeoff_points(results), path, "asu demo: forgetting vs what is kept")


def degenerate_lines(models: dict[str, dict[str, Any]]) -> list[str]:
    """A warning per model whose forget answers are degenerate from
    :data:`asu.metrics.report.DEGENERATE_WARNING` on (their ROUGE and fact leakage score no answer)."""
    return [
        f"warning: {name}: {s['forget_degenerate_answers']:.0%} of its forget answers are degenerate (empty, "
        "without letters or looping); its forget ROUGE-L and fact leakage score no answer, not forgetting"
        for name, s in models.items()
        if (s.get("forget_degenerate_answers") or 0.0) >= DEGENERATE_WARNING
    ]


def run_demo(
    settings: DemoSettings,
    out_dir: str | os.PathLike[str],
    cache_dir: str | os.PathLike[str] | None = None,
    method: str = "asu",
    progress: bool = True,
) -> dict[str, Any]:
    """Run every stage of the demo and write its outputs; returns what ``results.json`` holds."""
    s, out = settings, Path(out_dir)
    t_start, c_start = time.perf_counter(), time.process_time()
    methods = MethodSettings(lam=s.lam, asu_lr=s.asu_lr, epochs=s.epochs, batch_size=s.batch_size)
    exp = Experiment.build(
        s.world, s.model, s.train, methods=methods, max_new_tokens=s.max_new_tokens, data_dir=out / "data",
        progress=progress,
    )  # fmt: skip
    _print_world(exp)
    _models(exp, cache_dir)
    exp.evaluate_original()
    asu_name = _asu(exp, s, method)
    preview = _preview(exp, s, exp.models[asu_name]["temperature"])
    ga = exp.match("GA+GD", Baseline("gd", s.ga_lrs, s.ga_epochs), exp.models[asu_name]["forget_rouge"],
                   s.match_steps)  # fmt: skip
    timings = {k: v["wall_s"] for k, v in exp.timings.items()}
    timings["total"] = time.perf_counter() - t_start
    cpu = {k: v["cpu_s"] for k, v in exp.timings.items()} | {"total": time.process_time() - c_start}
    claims = check_claims(exp.models, asu_name, exp.temperatures.get(asu_name))
    examples = _examples(exp.forget, exp.generations, s.n_examples)
    _print_outcome(exp.models, claims, examples, out, timings["total"])
    results = {
        "settings": _settings_record(s),
        "method": method,
        "asu_name": asu_name,
        "training": exp.training,
        "models": exp.models,
        "claims": claims,
        "examples": examples,
        "temperature_auto": exp.temperatures.get(asu_name),
        "tau_preview": [{"temperature": p["temperature"], "summary": p["summary"]} for p in preview],
        "ga_matched": ga,
        "histories": exp.histories,
        "timings_s": timings,
        "cpu_s": cpu,
        "torch_threads": torch.get_num_threads(),
        "environment": environment(),
    }
    _write_results(results, examples, out)
    return results


# -- the stages of run_demo(), in order -------------------------------------------------------------------


def _print_world(exp: Experiment) -> None:
    world = exp.world
    n = {split: len(world.split(split)) for split in ("forget", "retain", "general")}
    print(
        f"world: {len(world.authors)} authors ({len(world.forget_authors)} to forget: "
        f"{', '.join(world.forget_authors)}), {n['forget']} forget / {n['retain']} retain / "
        f"{n['general']} general rows"
    )


def _models(exp: Experiment, cache_dir: str | os.PathLike[str] | None) -> None:
    """Train or load the full model and the oracle, and say which."""
    for info in exp.load_models(cache_dir).values():
        rouge = ", ".join(f"{k} {v:.3f}" for k, v in info["rouge"].items())
        state = "loaded from cache" if info["cached"] else f"trained in {info['seconds']:.0f} s"
        print(
            f"{info['kind']} model: {info['n_parameters'] / 1e6:.2f}M parameters, {state} "
            f"({info['epochs']} epochs, ROUGE-L {rouge})"
        )


def _layers_label(s: DemoSettings) -> str:
    return f" layers {s.layers}" if s.layers else ""


def _asu(exp: Experiment, s: DemoSettings, method: str) -> str:
    """Unlearn with ``method`` (ASU by default) at the demo's settings; returns the run's name."""
    spec = s.temperature if isinstance(s.temperature, str) else f"{s.temperature:g}"
    name = f"{method.upper()} τ={spec}{_layers_label(s)} λ={s.lam:g} lr={s.asu_lr:g}"
    exp.run(name, method, s.asu_lr, temperature=s.temperature, layers=s.layers)
    choice = exp.temperatures.get(name)
    if choice is not None:
        curve = ", ".join(f"{p['temperature']:.3g}: {p['forget_rouge']:.3f}" for p in choice["curve"])
        target = f"{choice['target']:.3f} = {choice['fraction']:g} x {choice['original']:.3f}"
        print(
            f"automatic τ: {choice['temperature']:.3g} (teacher forget ROUGE-L target {target}; previews "
            f"τ: ROUGE-L {curve})"
        )
    return name


def _preview(exp: Experiment, s: DemoSettings, tau: float) -> list[dict[str, Any]]:
    """The τ preview: the smoothed original model, fully evaluated (no training), at the preview
    temperatures and at ASU's τ."""
    t0, c0 = time.perf_counter(), time.process_time()
    temperatures = sorted({*s.preview_temperatures, float(tau)})
    preview = evaluate_smoothed(
        exp.model, exp.tokenizer, exp.forget, temperatures, retain_rows=exp.retain, general_rows=exp.general,
        layers=s.layers, batch_size=32, max_new_tokens=s.max_new_tokens, well_formed=exp.world.is_well_formed,
        progress=exp.progress,
    )  # fmt: skip
    exp.timings["tau_preview"] = {"wall_s": time.perf_counter() - t0, "cpu_s": time.process_time() - c0}
    for p in preview:
        p["summary"]["temperature"] = p["temperature"]
        exp.models[f"smoothed τ={p['temperature']:.3g}{_layers_label(s)} (no training)"] = p["summary"]
    return preview


def _print_outcome(
    models: dict[str, dict[str, Any]], claims: dict, examples: list[dict[str, str]], out: Path, total: float
) -> None:
    print("\n" + _table(models))
    for line in degenerate_lines(models):
        print(line)
    print("forget-prompt generations:\n")
    print(_examples_md(examples))
    for name, c in claims.items():
        state = "holds" if c["holds"] else ("n/a" if c["holds"] is None else "does NOT hold")
        print(f"claim {name}: {state}")
    print(f"\ntotal {total:.0f} s; results in {out}")


def _settings_record(s: DemoSettings) -> dict[str, Any]:
    nested = {"world": asdict(s.world), "model": asdict(s.model), "train": asdict(s.train)}
    return nested | {k: v for k, v in asdict(s).items() if k not in nested}


def _write_results(results: dict[str, Any], examples: list[dict[str, str]], out: Path) -> None:
    """``results.json``, ``results.md`` (where the numbers came from, the table, the generations) and the
    chart ``results.png``."""
    atomic_write_json(out / "results.json", results)
    env = results["environment"]
    produced_by = (
        f"Produced by `asu demo` on {env['machine']}, "
        f"torch {env['torch']}, transformers {env['transformers']}, triton {env['triton']}, {env['date']}; "
        f"total {results['timings_s'].get('total', float('nan')):.0f} s wall, "
        f"{results['cpu_s'].get('total', float('nan')):.0f} s CPU.\n\n"
    )
    markdown = "# asu demo\n\n" + produced_by + _table(results["models"])
    markdown += "".join(f"\n{line}\n" for line in degenerate_lines(results["models"]))
    atomic_write_text(
        out / "results.md", markdown + "\n## Forget-prompt generations\n\n" + _examples_md(examples)
    )
    _chart(results, out / "results.png")
