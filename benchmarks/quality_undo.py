"""UNDO's shrink-and-perturb before ASU, against plain ASU, on the embedded worlds: its retain cost and
whether the forgetting resists the attacks better.

``python -m benchmarks.quality_undo [--seeds 0,1,2] [--jobs N] [--out DIR] [--readme [PATH]]``

Per world (the quality benchmark's quick settings: world, tiny model and oracle, ASU at its automatic τ with
λ 1, lr 3e-4, 10 epochs): plain ASU, then ASU with ``UnlearnConfig.shrink_perturb = (alpha, beta)`` for each
setting of :data:`UndoSettings.undo` (:mod:`asu.undo`: the student shrunk and perturbed after the teacher is
built, before distillation), each evaluated like every quality-benchmark model and attacked with the quality
benchmark's attacks (relearning against the oracle's own, split recovery, NF4, prefilled answer). Writes
``DIR/worlds/seed-K.json`` (a finished world is not run again), ``DIR/results.json`` and ``DIR/results.md``;
``--readme`` rewrites the README's UNDO section from them.
"""

from __future__ import annotations

import argparse
import concurrent.futures
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

from asu.demo.experiment import Experiment
from asu.demo.tiny import TrainConfig
from asu.demo.world import WorldConfig
from asu.environment import environment
from asu.files import atomic_write_json, atomic_write_text
from benchmarks import quality_stats as qs
from benchmarks.quality import README, RESULTS, TIE, QualitySettings, settings_for
from benchmarks.report import refresh_readme

PLAIN = "ASU"
README_MARKERS = ("<!-- undo:start -->", "<!-- undo:end -->")
#: What the comparison reports: the main table's knowledge and utility, then the attacks' scores.
KEYS = ("forget_rouge", "forget_fact_leakage_any", "retain_rouge", "model_utility", "forget_no_repeat")
ATTACK_KEYS = ("relearn_R", "relearn_split_recovered", "quant_nf4_Q", "robustness")
NAMES = {**qs.METRICS, **qs.ROBUSTNESS}


@dataclass(frozen=True)
class UndoSettings:
    """The quality benchmark's quick settings and the ``(alpha, beta)`` of each UNDO run."""

    quality: QualitySettings = field(default_factory=lambda: settings_for("quick"))
    undo: tuple[tuple[float, float], ...] = ((0.1, 0.1), (0.25, 0.1))

    @staticmethod
    def label(alpha: float, beta: float) -> str:
        return f"ASU + UNDO (alpha {alpha:g}, beta {beta:g})"


def run_world(seed: int, s: UndoSettings, out: Path, cache_dir: str | None, threads: int) -> dict[str, Any]:
    """One world: plain ASU and every UNDO setting, evaluated and attacked; saved to ``out/worlds``."""
    torch.set_num_threads(threads)
    path = out / "worlds" / f"seed-{seed}.json"
    record = {"seed": seed, "settings": json.loads(json.dumps(asdict(s)))}
    if path.exists():
        saved = json.loads(path.read_text())
        if saved.get("settings") != record["settings"]:
            raise ValueError(f"{path} was made with other settings; remove it or choose another --out")
        return saved
    q = s.quality
    t0, c0 = time.perf_counter(), time.process_time()
    exp = Experiment.build(
        WorldConfig(n_authors=q.n_authors, forget_fraction=q.forget_fraction, seed=seed), q.model,
        TrainConfig(seed=seed), methods=q.methods, max_new_tokens=q.max_new_tokens,
    )  # fmt: skip
    exp.keep_models = True
    exp.load_models(cache_dir)
    exp.evaluate_original()
    exp.run(PLAIN, "asu", q.methods.asu_lr, temperature=q.target)
    runs = [PLAIN]
    for alpha, beta in s.undo:
        runs.append(UndoSettings.label(alpha, beta))
        exp.run(runs[-1], "asu", q.methods.asu_lr, temperature=q.target, shrink_perturb=(alpha, beta))
    attacks = list(q.attacks)
    reference = exp.yardstick(attacks)
    original = exp.robustness("original", attacks, reference, None)
    for name in ["oracle (retain only)", *runs]:
        exp.robustness(name, attacks, reference, original)
    record |= {
        "models": exp.models,
        "runs": runs,
        "timings": exp.timings,
        "wall_s": time.perf_counter() - t0,
        "cpu_s": time.process_time() - c0,
    }
    atomic_write_json(path, record)
    print(f"[world {seed}] done in {record['wall_s'] / 60:.1f} min", flush=True)
    return record


def aggregate(worlds: list[dict[str, Any]], s: UndoSettings) -> dict[str, Any]:
    """Per model: every reported number's mean ± std across worlds; per UNDO setting: its paired
    differences from plain ASU, world by world."""
    rows = ["original", "oracle (retain only)", PLAIN, *(UndoSettings.label(a, b) for a, b in s.undo)]
    keys = (*KEYS, *ATTACK_KEYS)
    table = qs.aggregate(worlds, rows, {k: NAMES[k] for k in keys})
    paired = {f"{r} − {PLAIN}": qs.paired(worlds, r, PLAIN, keys) for r in rows[3:]}
    return {"worlds": [w["seed"] for w in worlds], "table": table, "paired": paired}


def _differences(agg: dict[str, Any]) -> list[str]:
    """Each UNDO − ASU difference: higher or lower (beyond :data:`TIE`) in every world, no difference (within
    it in every world), or mixed."""
    lines = []
    for name, per_metric in agg["paired"].items():
        for key, c in per_metric.items():
            d = c.get("diff")
            if not d:
                continue
            if qs.holds_everywhere(per_metric, key, +1, TIE):
                sign = "higher in every world"
            elif qs.holds_everywhere(per_metric, key, -1, TIE):
                sign = "lower in every world"
            elif all(abs(v) <= TIE for v in c["values"]):
                sign = f"no difference (within {TIE:g} in every world)"
            else:
                sign = "mixed across worlds"
            lines.append(f"* {name}: {NAMES[key][0]} {sign} ({d['mean']:+.3f} ± {d['std']:.3f}, n={d['n']})")
    return lines


def markdown(results: dict[str, Any], s: UndoSettings) -> str:
    env, agg = results["environment"], results["aggregate"]
    n = len(agg["worlds"])
    keys = (*KEYS, *ATTACK_KEYS)
    text = "# UNDO's shrink-and-perturb before ASU, against plain ASU\n\n"
    text += (
        f"Produced by `python -m benchmarks.quality_undo --seeds {','.join(map(str, agg['worlds']))}` on "
        f"{env['machine']}, torch {env['torch']}, transformers {env['transformers']}, {env['date']}; wall "
        f"{results['timing']['wall_s'] / 60:.1f} min. {n} worlds (the quality benchmark's quick settings), "
        "mean ± std across worlds.\n\n"
    )
    text += "| model | " + " | ".join(NAMES[k][0] for k in keys) + " |\n" + "|---" * (1 + len(keys)) + "|\n"
    for row, values in agg["table"].items():
        text += f"| {row} | " + " | ".join(qs.fmt(values.get(k), n_of=n) for k in keys) + " |\n"
    text += "\n" + qs.paired_table(agg["paired"], keys, NAMES) + "\n" + "\n".join(_differences(agg)) + "\n"
    return text


def readme_section(results: dict[str, Any], s: UndoSettings, results_md: Path, readme: Path) -> str:
    agg, env = results["aggregate"], results["environment"]
    link = os.path.relpath(results_md, readme.parent)
    keys = ("retain_rouge", "model_utility", "forget_rouge", *ATTACK_KEYS)
    text = (
        f"Measured by `python -m benchmarks.quality_undo` on {env['machine']} ({env['date'][:10]}); full "
        f"report: [{results_md.name}]({link}). {len(agg['worlds'])} worlds, mean ± std.\n\n"
    )
    text += "| model | " + " | ".join(NAMES[k][0] for k in keys) + " |\n" + "|---" * (1 + len(keys)) + "|\n"
    for row, values in agg["table"].items():
        if row.startswith(PLAIN):
            text += f"| {row} | " + " | ".join(qs.fmt(values.get(k)) for k in keys) + " |\n"
    text += (
        "\nEvery run has the same τ target, learning rate and epochs; the UNDO runs are not matched to plain "
        "ASU's forgetting (their forget ROUGE-L line below says how far apart they land).\n\n"
    )
    return text + "\n".join(_differences(agg)) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.quality_undo", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--jobs", type=int, help="worlds in parallel processes (default one per world)")
    parser.add_argument("--threads", type=int, default=1, help="torch threads per world (default 1)")
    parser.add_argument("--out", help="output directory (default benchmarks/results/undo-DEVICE-DATE)")
    parser.add_argument("--cache-dir", help="model cache (default $ASU_CACHE or ~/.cache/asu)")
    parser.add_argument("--readme", nargs="?", const=str(README), help="rewrite this README's UNDO section")
    args = parser.parse_args(argv)
    seeds = [int(x) for x in args.seeds.split(",") if x.strip()]
    s = UndoSettings()
    device = "cuda" if torch.cuda.is_available() else "cpu"
    date = datetime.datetime.now(datetime.timezone.utc).strftime("%Y-%m-%d")
    out = Path(args.out) if args.out else RESULTS / f"undo-{device}-{date}"
    t0 = time.perf_counter()
    ctx = multiprocessing.get_context("spawn")
    with concurrent.futures.ProcessPoolExecutor(max_workers=args.jobs or len(seeds), mp_context=ctx) as pool:
        futures = [pool.submit(run_world, k, s, out, args.cache_dir, args.threads) for k in seeds]
        worlds = [f.result() for f in futures]
    # Worlds run in parallel, and a world saved by an earlier run is not run again: the wall time is the
    # longest world's, or this run's when longer.
    wall = max(time.perf_counter() - t0, *(w["wall_s"] for w in worlds))
    results = {
        "settings": json.loads(json.dumps(asdict(s))),
        "environment": environment(),
        "timing": {
            "wall_s": wall,
            "world_wall_s": {str(w["seed"]): w["wall_s"] for w in worlds},
        },
        "aggregate": aggregate(worlds, s),
    }
    atomic_write_json(out / "results.json", results)
    atomic_write_text(out / "results.md", markdown(results, s))
    if args.readme:
        readme = Path(args.readme)
        if not refresh_readme(readme, readme_section(results, s, out / "results.md", readme), README_MARKERS):
            print(f"{readme}: no {' / '.join(README_MARKERS)} markers; left untouched", file=sys.stderr)
    print(f"UNDO comparison: {len(worlds)} worlds, results in {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
