"""The experimental ``asu-attn`` objective against output-level ASU on the embedded world.

``python -m asu.demo.asu_attn_comparison [--default-world] [--lams 1,10] [--out DIR]`` unlearns the world's
forget authors from the demo's cached tiny model with ``asu`` (copy teacher) and with ``asu-attn`` (copy and
self teachers, at each lambda), evaluates every model, times one objective step per method, and writes
``asu-attn-vs-asu-<device>-<date>.json`` under ``--out`` (default ``benchmarks/results``).
"""

from __future__ import annotations

import argparse
import copy
import datetime as _dt
import json
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from asu.data import PaddingCollator, encode_rows
from asu.demo.run import default_settings
from asu.demo.tiny import load_or_train
from asu.demo.world import World, generate_world
from asu.environment import environment
from asu.evaluate import evaluate_model
from asu.files import atomic_write_json
from asu.losses import UnlearnObjective
from asu.teachers import build_teacher
from asu.unlearn import UnlearnConfig, unlearn

#: The attention temperature every run of the comparison uses.
COMPARISON_TEMPERATURE = 4.0

#: Summary metrics copied into the comparison (see :func:`asu.evaluate.evaluate_model`).
COMPARE_METRICS = (
    "forget_rouge",
    "retain_rouge",
    "forget_prob",
    "forget_truth_ratio",
    "model_utility",
    "retain_prob",
    "forget_token_entropy",
    "forget_no_repeat",
    "forget_well_formed",
)


def step_times_ms(model: torch.nn.Module, tokenizer: Any, forget: list, retain: list, *, temperature: float,
                  batch_size: int, rounds: int = 12) -> dict[str, float]:  # fmt: skip
    """Median ms of one objective forward+backward (forget + retain batch of ``batch_size`` padded examples)
    for ASU (copy teacher) and ``asu-attn`` (copy and self teachers), timed round-robin so that a busy,
    shared CPU slows every method alike; the first round is a warm-up."""
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    collate = PaddingCollator(pad_token_id=pad).collate

    def batch(rows: list) -> dict[str, torch.Tensor]:
        encoded = encode_rows(tokenizer, rows[:batch_size], 128)
        return collate([{**ex, "example_id": i} for i, ex in enumerate(encoded)])

    fb, rb = batch(forget), batch(retain)
    plans = {
        "asu copy": ("asu", "copy"),
        "asu-attn copy": ("asu-attn", "copy"),
        "asu-attn self": ("asu-attn", "self"),
    }
    objectives = {
        name: UnlearnObjective(
            copy.deepcopy(model).train(),
            method=method,
            lam=1.0,
            teacher=build_teacher(source, model, temperature),
        )  # fmt: skip
        for name, (method, source) in plans.items()
    }
    times: dict[str, list[float]] = {name: [] for name in objectives}
    for r in range(rounds + 1):
        for name, objective in objectives.items():
            t0 = time.perf_counter()
            objective(forget=fb, retain=rb)["loss"].backward()
            elapsed = time.perf_counter() - t0
            objective.zero_grad(set_to_none=True)
            if r > 0:
                times[name].append(elapsed)
    return {name: 1e3 * statistics.median(v) for name, v in times.items()}


def compare_unlearning(
    out_dir: Path,
    *,
    quick: bool = True,
    seed: int = 0,
    cache_dir: str | None = None,
    attn_lams: tuple[float, ...] = (1.0, 10.0),
    epochs: int | None = None,
    lr: float | None = None,
    progress: bool = False,
) -> Path:
    """Unlearn the embedded world's forget authors with ``asu`` and with ``asu-attn`` (copy and self teachers)
    from the demo's cached tiny model, evaluate each, and write the numbers as JSON; returns its path.

    Every run uses the demo's settings (:func:`asu.demo.run.default_settings`: tau, lr, epochs, batch, padded
    batches, retain ``nll``); ASU keeps the demo's lambda, ``asu-attn`` runs at each of ``attn_lams`` (its
    loss, a sum over layers of attention-row KLs, has another scale than the vocabulary KL). ``epochs`` and
    ``lr`` override the demo's for every run (the quick world's 2 epochs barely move any method). Wall time is
    each run's ``unlearn`` call on this machine.
    """
    s = default_settings(seed, quick)
    if not isinstance(s.temperature, (int, float)):
        # The demo now chooses τ itself; this comparison keeps the fixed τ it was first run at.
        s = replace(s, temperature=COMPARISON_TEMPERATURE)
    epochs = s.epochs if epochs is None else int(epochs)
    lr = s.asu_lr if lr is None else float(lr)
    world = generate_world(s.world)
    forget, retain = world.split("forget"), world.split("retain")
    model, tokenizer, info = load_or_train(world, "full", cache_dir, s.model, s.train, progress)
    summary = _summarizer(world, tokenizer, s.max_new_tokens)
    runs: list[dict[str, Any]] = [{"name": "original", "method": None, "metrics": summary(model)}]
    # One untimed optimizer step first: the first unlearn() call pays one-time start-up (imports, allocator).
    warm = UnlearnConfig(method="asu", max_steps=1, batch_size=s.batch_size, grad_accum=1, max_length=128,
                         pack=False, progress=False)  # fmt: skip
    unlearn(copy.deepcopy(model), tokenizer, forget, retain, warm, output_dir=None)
    plans = [("asu", "copy", s.lam)]
    plans += [("asu-attn", teacher, lam) for teacher in ("copy", "self") for lam in attn_lams]
    for method, teacher, lam in plans:
        cfg = UnlearnConfig(
            method=method, teacher=teacher, temperature=s.temperature, lam=lam, retain_loss="nll",
            layers=None, lr=lr, epochs=epochs, batch_size=s.batch_size, grad_accum=1, max_length=128,
            pack=False, seed=seed, progress=progress,
        )  # fmt: skip
        runs.append(_timed_run(model, tokenizer, forget, retain, cfg, summary))
    record = {
        "what": "asu-attn (EXPERIMENTAL attention-map objective) vs output-level ASU on the embedded world",
        "world": "quick" if quick else "default",
        "settings": {
            "temperature": s.temperature,
            "asu_lam": s.lam,
            "attn_lams": list(attn_lams),
            "lr": lr,
            "epochs": epochs,
            "warmup_epochs": 1.0,
            "batch_size": s.batch_size,
            "retain_loss": "nll",
            "layers": "all",
            "seed": seed,
        },  # fmt: skip
        "model": {"n_parameters": info.get("n_parameters"), "rouge": info.get("rouge")},
        "environment": environment(),
        "torch_threads": torch.get_num_threads(),
        "runs": runs,
        "step_ms_median": step_times_ms(
            model, tokenizer, forget, retain, temperature=s.temperature, batch_size=s.batch_size
        ),
        "note": "wall_s of each run is one unlearn() call on a shared, busy CPU (noisy); step_ms_median "
        "times one objective forward+backward per method round-robin (comparable between methods)",
    }
    day = _dt.datetime.now(_dt.timezone.utc).strftime("%Y-%m-%d")
    device = "cuda" if torch.cuda.is_available() else "cpu"
    path = Path(out_dir) / f"asu-attn-vs-asu-{device}-{day}.json"
    atomic_write_json(path, record, indent=2, default=str)
    return path


def _summarizer(world: World, tokenizer: Any, max_new_tokens: int) -> Callable[[torch.nn.Module], dict]:
    """``model -> {metric: value}`` over :data:`COMPARE_METRICS` on the world's splits."""
    forget, retain, general = world.split("forget"), world.split("retain"), world.split("general")

    def summary(model: torch.nn.Module) -> dict[str, float]:
        # No oracle model (it would double the training time here), so no forget-quality p-value.
        res = evaluate_model(
            model, tokenizer, forget, retain, general, batch_size=32, max_new_tokens=max_new_tokens,
            well_formed=world.is_well_formed,
        )  # fmt: skip
        return {k: res["summary"][k] for k in COMPARE_METRICS if k in res["summary"]}

    return summary


def _timed_run(
    model: torch.nn.Module,
    tokenizer: Any,
    forget: list,
    retain: list,
    cfg: UnlearnConfig,
    summary: Callable[[torch.nn.Module], dict],
) -> dict[str, Any]:
    """Unlearn a copy of ``model`` with ``cfg``; the run's wall time, first and last forget loss, metrics."""
    t0 = time.perf_counter()
    result = unlearn(copy.deepcopy(model), tokenizer, forget, retain, cfg, output_dir=None)
    wall = time.perf_counter() - t0
    hist = result.history
    return {
        "name": f"{cfg.method} teacher={cfg.teacher} lam={cfg.lam:g}",
        "method": cfg.method,
        "teacher": cfg.teacher,
        "lam": cfg.lam,
        "wall_s": wall,
        "optimizer_steps": result.stats["optimizer_steps"],
        "forget_loss_first": hist[0].get("forget_loss") if hist else None,
        "forget_loss_last": hist[-1].get("forget_loss") if hist else None,
        "metrics": summary(result.model.eval()),
    }


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m asu.demo.asu_attn_comparison", description=__doc__.splitlines()[0]
    )
    p.add_argument("--default-world", action="store_true", help="the demo's default world, not the quick one")
    p.add_argument("--out", type=Path, default=Path("benchmarks/results"))
    p.add_argument("--cache-dir", default=None, help="tiny-model cache (default $ASU_CACHE or ~/.cache/asu)")
    p.add_argument("--lams", default="1,10", help="comma-separated lambdas of asu-attn (default 1,10)")
    p.add_argument("--epochs", type=int, default=None, help="unlearning epochs (default: the demo's)")
    p.add_argument("--lr", type=float, default=None, help="learning rate of every run (default: the demo's)")
    p.add_argument("--threads", type=int, default=None)
    args = p.parse_args(argv)
    try:
        lams = tuple(float(x) for x in args.lams.split(",") if x.strip())
    except ValueError:
        p.error(f"--lams: expected comma-separated numbers, got {args.lams!r}")
    if not lams or any(not (lam > 0) for lam in lams):
        p.error("--lams: need at least one lambda > 0")
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    path = compare_unlearning(
        args.out, quick=not args.default_world, cache_dir=args.cache_dir, attn_lams=lams, epochs=args.epochs,
        lr=args.lr,
    )  # fmt: skip
    print(f"wrote {path}")
    print("step ms (median):", json.loads(path.read_text())["step_ms_median"])
    for r in json.loads(path.read_text())["runs"]:
        m = r["metrics"]
        print(
            f"{r['name']:<32} forget ROUGE-L {m.get('forget_rouge', float('nan')):.3f} "
            f"retain ROUGE-L {m.get('retain_rouge', float('nan')):.3f} "
            f"no-repeat {m.get('forget_no_repeat', float('nan')):.3f} wall {r.get('wall_s', 0.0):.1f} s"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
