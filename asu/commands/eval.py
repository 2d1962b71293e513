"""``asu eval``: a model directory evaluated as open-unlearning evaluates it (TOFU, the default, or MUSE's
raw-text evaluation with ``--benchmark muse``), plus asu's additions, and the τ preview (the smoothed model,
no training). The metrics are :mod:`asu.evaluate`'s; every input (flags, data, reference, the model folder
and its weights, ``--layers`` against the model, ``--out``) is validated before anything is written, and
``--out`` is locked while the evaluation runs.
"""

from __future__ import annotations

import argparse
import json
import re
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch

from asu.charts import load_pyplot, save_figure
from asu.commands import attack_options, closer_look_options, lm_eval_options
from asu.commands.outputs import add_overwrite_argument, locked_output
from asu.data import load_rows
from asu.environment import environment
from asu.evaluate import (
    TOFU_MAX_LENGTH,
    TOFU_MAX_NEW_TOKENS,
    check_tofu_inputs,
    evaluate_model,
    evaluate_muse,
    evaluate_smoothed,
    load_reference_stats,
    markdown_table,
    reference_from,
    summary_table,
    write_results,
)
from asu.files import atomic_write_json, atomic_write_text, check_output_location
from asu.metrics.muse import VERBMEM_PREFIX_TOKENS
from asu.models import load_model, load_tokenizer
from asu.templates import check_template, get_template

TOFU_HUB = "locuslab/TOFU"
MUSE_HUB = "muse-bench/MUSE-{corpus}"
MUSE_CORPORA = ("News", "Books")
#: Summary keys of the τ preview table.
PREVIEW_KEYS = (
    "forget_Q_A_ROUGE",
    "forget_Q_A_Prob",
    "forget_fact_leakage_any",
    "forget_degenerate_answers",
    "forget_no_repeat",
    "forget_well_formed",
    "forget_token_entropy",
    "retain_Q_A_ROUGE",
)
#: Bars of the chart (metrics in [0, 1]): what unlearning should lower, then what it should keep.
CHART_FORGET = (
    "forget_Q_A_ROUGE",
    "forget_Q_A_Prob",
    "forget_fact_leakage_any",
    "extraction_strength",
    "forget_verbmem_ROUGE",
    "forget_knowmem_ROUGE",
)
CHART_KEEP = ("retain_Q_A_ROUGE", "retain_knowmem_ROUGE", "model_utility", "forget_no_repeat")
#: Shorthands of ``--general NAME=PATH``: flag -> general set name.
GENERAL_SHORTHANDS = {"--real-authors": "ra", "--world-facts": "wf"}
#: MUSE's own sets beside --data and --holdout: (flag, what it holds).
MUSE_SETS = (
    ("--verbmem", "MUSE VerbMem rows: documents or MUSE's prompt/gt excerpts (default --data)"),
    ("--knowmem-forget", "MUSE KnowMem questions about the forget documents (QA rows)"),
    ("--knowmem-retain", "MUSE KnowMem questions about the retain documents (QA rows)"),
    ("--knowmem-forget-icl", "few-shot examples for --knowmem-forget (QA rows)"),
    ("--knowmem-retain-icl", "few-shot examples for --knowmem-retain (QA rows)"),
)


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="Hugging Face model directory (with its tokenizer)")
    parser.add_argument("--benchmark", choices=("tofu", "muse", "real-world"), default="tofu")
    parser.add_argument("--out", required=True, help="output directory")
    add_overwrite_argument(parser)
    _add_set_arguments(parser.add_argument_group("evaluation sets"))
    muse = parser.add_argument_group("MUSE sets (--benchmark muse)")
    for flag, text in MUSE_SETS:
        muse.add_argument(flag, help=text)
    _add_setting_arguments(parser.add_argument_group("evaluation settings"))
    preview = parser.add_argument_group("τ preview: the smoothed model, no training (TOFU only)")
    preview.add_argument("--temperature", help="comma-separated attention temperatures, e.g. 2,2.3,3,5")
    preview.add_argument("--layers", help="layers to smooth, e.g. 6-8 or 0,2,5 (default all)")
    attack_options.add_arguments(parser.add_argument_group("attacks: does the knowledge come back? (TOFU)"))
    closer_look_options.add_arguments(
        parser.add_argument_group("closer-look's metrics: the ASU paper's MU / FE")
    )
    lm_eval_options.add_arguments(parser.add_argument_group("general ability: lm-evaluation-harness"))


def _add_set_arguments(group: argparse._ArgumentGroup) -> None:
    """Where the rows come from: the hub split, or files for the forget, retain, general and holdout sets."""
    group.add_argument(
        "--split",
        help="fill every set not given from the benchmark's hub dataset: TOFU's forget split (forget01, "
        "forget05, forget10) or MUSE's corpus (News, Books)",
    )
    group.add_argument("--data", help="forget rows (TOFU: QA rows; MUSE: documents, 'text' rows)")
    group.add_argument("--retain", help="retain rows (TOFU), for retain metrics and model utility")
    group.add_argument(
        "--general",
        action="append",
        default=[],
        metavar="NAME=PATH",
        help="a general-knowledge set counted in model utility, named as open-unlearning names it (ra: real "
        "authors, wf: world facts); repeatable; a bare PATH is wf",
    )
    for flag, name in GENERAL_SHORTHANDS.items():
        group.add_argument(flag, help=f"the same as --general {name}=PATH")
    group.add_argument(
        "--holdout",
        help="rows the model never saw (TOFU: QA rows such as holdout10; MUSE: documents), for membership "
        "inference (mia_*) and privleak",
    )
    group.add_argument(
        "--reference",
        help="the reference (retain-only) model's evaluation, for forget_quality and privleak: its "
        "TOFU_EVAL.json / MUSE_EVAL.json (asu's or open-unlearning's) or the directory holding it",
    )


def _add_setting_arguments(group: argparse._ArgumentGroup) -> None:
    """How the rows are prompted, cut and generated, which metrics to leave out, and where it runs."""
    group.add_argument(
        "--template",
        help="prompt template of the QA rows (default: the one the model's run.json records, else the "
        "tokenizer's default)",
    )
    group.add_argument(
        "--skip",
        action="append",
        default=[],
        metavar="METRIC",
        help="leave out a metric that needs fields beyond question/answer (forget_truth_ratio, "
        "retain_Truth_Ratio, ra_Truth_Ratio, wf_Q_A_Prob_normalised, ...), even where the rows have them; "
        "repeatable. Without it such a metric is computed where every row has its fields and left out, "
        "with a note, where no row has them",
    )
    group.add_argument(
        "--require",
        action="append",
        default=[],
        metavar="METRIC[,METRIC]",
        help="metrics that must be computed (or 'all': every metric the given sets can have): a field they "
        "need that the rows lack is an error, all of them named in one message; repeatable",
    )
    group.add_argument("--batch-size", type=int, help="default 32 (TOFU) / 8 (MUSE), open-unlearning's")
    group.add_argument(
        "--max-new-tokens",
        type=int,
        help=f"TOFU's answer length (default {TOFU_MAX_NEW_TOKENS}, open-unlearning's); MUSE uses its own",
    )
    group.add_argument(
        "--max-length",
        type=int,
        help=f"tokens per TOFU question + answer, cut as training cuts them (default {TOFU_MAX_LENGTH}, "
        "open-unlearning's)",
    )
    group.add_argument("--verbmem-prefix-tokens", type=int, default=VERBMEM_PREFIX_TOKENS)
    group.add_argument("--world", help="world.json of an asu world, for the well-formed-sentence check")
    group.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    group.add_argument("--no-progress", action="store_true")


# ------------------------------------------------------------------------------------------------ inputs


def _parse_floats(text: str, what: str) -> list[float]:
    try:
        values = [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{what}: expected comma-separated numbers, got {text!r}") from None
    if not values or any(not (v > 0 and v != float("inf")) for v in values):
        raise ValueError(f"{what}: expected positive numbers, got {text!r}")
    return values


def _metric_names(values: list[str]) -> list[str]:
    """``--require a,b --require c`` -> ``[a, b, c]``."""
    return [m.strip() for value in values for m in value.split(",") if m.strip()]


def _general_sources(args: argparse.Namespace) -> dict[str, str]:
    """``--general NAME=PATH`` (bare PATH: wf), ``--real-authors``, ``--world-facts``: name -> source."""
    out: dict[str, str] = {}
    pairs = [g.split("=", 1) if re.match(r"^\w+=", g) else ["wf", g] for g in args.general]
    for flag, name in GENERAL_SHORTHANDS.items():
        source = getattr(args, flag.removeprefix("--").replace("-", "_"))
        pairs += [[name, source]] if source else []
    for name, source in pairs:
        if name in out:
            raise ValueError(f"general set {name!r} given twice ({out[name]}, {source})")
        if not source:
            raise ValueError(f"--general {name}=: no path")
        out[name] = source
    return out


def _tofu_sources(args: argparse.Namespace) -> dict[str, Any]:
    """Where each TOFU set comes from: the flags, else (with ``--split forgetNN``) the hub dataset."""
    generals = _general_sources(args)
    src = {"forget": args.data, "retain": args.retain, "holdout": args.holdout}
    if args.split:
        m = re.fullmatch(r"forget(\d\d)", args.split)
        if not m:
            raise ValueError(f"--split {args.split!r}: TOFU's forget splits are forget01, forget05, forget10")
        hub = {
            "forget": f"{TOFU_HUB}:{args.split}_perturbed",
            "retain": f"{TOFU_HUB}:retain_perturbed",
            "holdout": f"{TOFU_HUB}:holdout{m.group(1)}",
        }
        src = {k: v or hub[k] for k, v in src.items()}
        generals = {
            "ra": f"{TOFU_HUB}:real_authors_perturbed",
            "wf": f"{TOFU_HUB}:world_facts_perturbed",
        } | generals
    if not src["forget"]:
        raise ValueError("give the forget rows (--data) or a TOFU split (--split forget10)")
    return src | {"general": generals}


def _muse_sources(args: argparse.Namespace) -> dict[str, Any]:
    """Where each MUSE set comes from: the flags, else (with ``--split News|Books``) the hub dataset."""
    if args.retain or args.general or args.real_authors or args.world_facts:
        raise ValueError("--retain / --general are TOFU sets; MUSE's retain side is --knowmem-retain")
    src = {
        "forget": args.data,
        "holdout": args.holdout,
        "verbmem": args.verbmem,
        "knowmem_forget": args.knowmem_forget,
        "knowmem_retain": args.knowmem_retain,
        "knowmem_forget_icl": args.knowmem_forget_icl,
        "knowmem_retain_icl": args.knowmem_retain_icl,
    }
    if args.split:
        if args.split not in MUSE_CORPORA:
            raise ValueError(f"--split {args.split!r}: MUSE's corpora are {', '.join(MUSE_CORPORA)}")
        hub = MUSE_HUB.format(corpus=args.split)
        defaults = {
            "forget": f"{hub}:privleak:forget",
            "holdout": f"{hub}:privleak:holdout",
            "verbmem": f"{hub}:verbmem:forget",
            "knowmem_forget": f"{hub}:knowmem:forget_qa",
            "knowmem_retain": f"{hub}:knowmem:retain_qa",
            "knowmem_forget_icl": f"{hub}:knowmem:forget_qa_icl",
            "knowmem_retain_icl": f"{hub}:knowmem:retain_qa_icl",
        }
        src = {k: v or defaults[k] for k, v in src.items()}
    if not (src["forget"] or src["verbmem"] or src["knowmem_forget"] or src["knowmem_retain"]):
        raise ValueError(
            "give forget documents (--data), VerbMem or KnowMem rows, or a MUSE corpus (--split)"
        )
    return src


def _load(sources: dict[str, Any]) -> dict[str, Any]:
    """Every source's rows (``load_rows``), the general sets as a name -> rows mapping."""
    rows: dict[str, Any] = {k: (load_rows(v) if v else None) for k, v in sources.items() if k != "general"}
    if "general" in sources:
        rows["general"] = {name: load_rows(path) for name, path in sources["general"].items()} or None
    return rows


def _template(args: argparse.Namespace, model_dir: Path) -> str | None:
    """``--template``, else the template recorded in the model's ``run.json``, else None (the default)."""
    if args.template:
        return args.template
    run_file = model_dir / "run.json"
    if run_file.is_file():
        try:
            config = json.loads(run_file.read_bytes().decode("utf-8")).get("config") or {}
        except (UnicodeDecodeError, json.JSONDecodeError, AttributeError):
            raise ValueError(f"{run_file}: not a valid run record") from None
        if isinstance(config.get("template"), str):
            return config["template"]
    return None


def _world_checker(args: argparse.Namespace) -> Callable[[str], bool] | None:
    from asu.demo.world import WorldConfig, generate_world

    path = Path(args.world) if args.world else (Path(args.data).parent / "world.json" if args.data else None)
    if path is None or not path.is_file():
        return None
    try:
        meta = json.loads(path.read_bytes().decode("utf-8"))
        return generate_world(WorldConfig(**meta["config"])).is_well_formed
    except (UnicodeDecodeError, json.JSONDecodeError, KeyError, TypeError, ValueError) as e:
        raise ValueError(f"{path}: not a world.json of an asu world ({e})") from None


def _load_model(model_dir: str, device: str, template: str | None, rows: Any) -> tuple[Any, Any]:
    """The model (on ``device``, weights checked finite) and its tokenizer (:mod:`asu.models`); the TOFU
    template renders the first row with the tokenizer before the weights are read."""
    tokenizer = load_tokenizer(model_dir)
    if rows is not None:
        check_template(template, tokenizer, rows)
    return load_model(model_dir, device=device), tokenizer


def _check_layers(args: argparse.Namespace, model: Any) -> None:
    """``--layers`` against the model, before any evaluation runs."""
    if args.layers:
        from asu.smoothing import attention_modules, parse_layers

        parse_layers(args.layers, len(attention_modules(model)))


def _check_settings(args: argparse.Namespace) -> None:
    for flag in ("batch_size", "max_new_tokens", "verbmem_prefix_tokens", "max_length"):
        v = getattr(args, flag)
        if v is not None and v < 1:
            raise ValueError(f"--{flag.replace('_', '-')} must be >= 1, got {v}")
    if args.max_length is not None and args.max_length < 2:
        raise ValueError(f"--max-length must be >= 2, got {args.max_length}")
    muse_refuses = (args.max_new_tokens, args.temperature, args.skip, args.require, args.max_length)
    if args.benchmark == "muse" and any(muse_refuses):
        raise ValueError(
            "--max-new-tokens, --max-length, --temperature, --skip and --require apply to TOFU; MUSE uses "
            "its own lengths and metrics"
        )
    check_output_location(args.out, {"--model": args.model})


# ------------------------------------------------------------------------------------------------- runs


def _run_tofu(args: argparse.Namespace, rows: dict[str, Any], model: Any, tokenizer: Any, ctx: dict) -> dict:
    kwargs = dict(
        batch_size=args.batch_size or 32,
        max_new_tokens=args.max_new_tokens or TOFU_MAX_NEW_TOKENS,
        max_length=args.max_length or TOFU_MAX_LENGTH,
        well_formed=ctx["checker"],
        progress=not args.no_progress,
        holdout_rows=rows["holdout"],
        template=ctx["template"],
        skip=args.skip,
        require=_metric_names(args.require),
    )
    result = evaluate_model(
        model, tokenizer, rows["forget"], rows["retain"], rows["general"], ctx["reference"], **kwargs
    )
    attack_options.run(ctx["attacks"], result, model, tokenizer, rows, kwargs)
    if ctx["temperatures"]:
        kwargs.pop("holdout_rows")
        preview = evaluate_smoothed(
            model, tokenizer, rows["forget"], ctx["temperatures"], rows["retain"], rows["general"],
            layers=args.layers, **kwargs,
        )  # fmt: skip
        result["tau_preview"] = preview
    return result


def _run_muse(args: argparse.Namespace, rows: dict[str, Any], model: Any, tokenizer: Any, ctx: dict) -> dict:
    return evaluate_muse(
        model,
        tokenizer,
        rows["forget"],
        verbmem_rows=rows["verbmem"],
        knowmem_forget_rows=rows["knowmem_forget"],
        knowmem_retain_rows=rows["knowmem_retain"],
        knowmem_forget_examples=rows["knowmem_forget_icl"] or (),
        knowmem_retain_examples=rows["knowmem_retain_icl"] or (),
        holdout_documents=rows["holdout"],
        reference_stats=ctx["reference"],
        batch_size=args.batch_size or 8,
        verbmem_prefix_tokens=args.verbmem_prefix_tokens,
        progress=not args.no_progress,
    )


def _prepare(args: argparse.Namespace) -> tuple[dict[str, Any], dict[str, Any], dict[str, Any]]:
    """Sources, rows and the run context (template, reference, temperatures, checker), all validated."""
    _check_settings(args)
    sources = {
        "tofu": _tofu_sources, "muse": _muse_sources, "real-world": closer_look_options.real_world_sources
    }[args.benchmark](args)  # fmt: skip
    rows = _load(sources)
    if args.benchmark == "tofu":  # the rows' fields, before the model is loaded
        check_tofu_inputs(
            rows["forget"], rows["retain"], rows["general"], rows["holdout"], skip=args.skip,
            require=_metric_names(args.require),
        )  # fmt: skip
    reference = load_reference_stats(args.reference) if args.reference else None
    if reference is not None and args.benchmark == "tofu":
        reference_from(reference, args.reference, n_forget=len(rows["forget"]))
    template = _template(args, Path(args.model))
    get_template(template)  # a missing, non-UTF-8 or unparsable template file fails now
    ctx = {
        "template": template,
        "reference": reference,
        "temperatures": _parse_floats(args.temperature, "--temperature") if args.temperature else [],
        "checker": _world_checker(args) if args.benchmark == "tofu" else None,
        "attacks": attack_options.prepare(args, rows),
    }
    ctx["closer_look"] = closer_look_options.prepare(args, rows, ctx["template"])
    ctx["lm_eval"] = lm_eval_options.prepare(args)
    return sources, rows, ctx


def run(args: argparse.Namespace) -> int:
    """``asu eval``: validate, load, evaluate into the locked ``--out``; failures are exceptions for the
    command's error boundary."""
    sources, rows, ctx = _prepare(args)
    qa = rows["forget"] if args.benchmark == "tofu" else None
    model, tokenizer = _load_model(args.model, args.device, ctx["template"], qa)
    _check_layers(args, model)
    runner = {"tofu": _run_tofu, "muse": _run_muse, "real-world": closer_look_options.base_result}
    with locked_output(args.out, "eval", args.overwrite) as output:
        result = runner[args.benchmark](args, rows, model, tokenizer, ctx)
        closer_look_options.run(ctx["closer_look"], result, model, tokenizer)
        lm_eval_options.run(ctx["lm_eval"], result, model, tokenizer)
        with output.writing():
            _write(args, result, sources, ctx)
    print(summary_table(result, _title(args, ctx)))
    if "tau_preview" in result:
        print("τ preview (smoothed model, no training):\n" + _preview_table(result))
    print(f"results written to {args.out}")
    return 0


# ------------------------------------------------------------------------------------------------ output


def _title(args: argparse.Namespace, ctx: dict) -> str:
    return f"{args.benchmark.upper()} evaluation of {args.model} (template {ctx['template'] or 'default'})"


def _preview_table(result: dict[str, Any]) -> str:
    cols = {"τ=1": result["summary"]} | {
        f"τ={p['temperature']:g}": p["summary"] for p in result["tau_preview"]
    }
    return markdown_table(cols, [k for k in PREVIEW_KEYS if k in result["summary"]])


def _write(args: argparse.Namespace, result: dict[str, Any], sources: dict[str, Any], ctx: dict) -> None:
    out = Path(args.out)
    write_results(result, out, _title(args, ctx))
    settings = {
        "benchmark": args.benchmark,
        "model": args.model,
        "template": ctx["template"] or "default",
        "sources": sources,
        "reference": args.reference,
        "batch_size": args.batch_size,
        "max_new_tokens": args.max_new_tokens,
        "max_length": args.max_length,
        "skip": args.skip,
        "require": args.require,
        "notes": result["notes"],
        "warnings": result.get("warnings", []),
        "environment": environment(args.device),
        **result.get("settings", {}),
    }
    atomic_write_json(out / "eval_config.json", settings, indent=2, default=str)
    if "tau_preview" in result:
        atomic_write_json(out / "tau_preview.json", result["tau_preview"])
        atomic_write_text(out / "tau_preview.md", _preview_table(result))
    _chart(result["summary"], out / "summary.png", _title(args, ctx))


def _chart(summary: dict[str, float], path: Path, title: str) -> bool:
    """``summary.png``: red bars for what unlearning should lower, blue for what it should keep."""
    keys = [k for k in CHART_FORGET + CHART_KEEP if k in summary]
    if not keys:
        return False
    plt = load_pyplot()
    if plt is None:
        return False
    fig, ax = plt.subplots(figsize=(max(5.0, 0.6 * len(keys) + 1.5), 3.6))
    colors = ["tab:red" if k in CHART_FORGET else "tab:blue" for k in keys]
    ax.bar(range(len(keys)), [summary[k] for k in keys], color=colors)
    ax.set_xticks(range(len(keys)))
    ax.set_xticklabels(keys, rotation=35, ha="right", fontsize=7)
    ax.set_ylim(0, 1.05)
    ax.set_title(title, fontsize=8)
    save_figure(fig, path, dpi=110)
    return True
