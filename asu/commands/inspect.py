"""``asu inspect``: per-layer/head attention entropy and KL under smoothing, on forget versus retain data
(the numbers are :func:`asu.inspection.inspect_model`'s).

Outputs in ``--out``: ``inspect.json`` (every number), ``summary.txt`` (which layers smoothing changes
most) and heatmaps (layers x heads) ``kl_<set>_tau<tau>.png``, ``entropy_<set>_tau<tau>.png`` and
``entropy_<set>_tau1.png``.

Every input (flags, data, the model folder and its weights, ``--layers`` against the model, ``--out``) is
validated before anything is written; ``--out`` is locked while the command runs.
"""

from __future__ import annotations

import argparse
import os
import time
from pathlib import Path
from typing import Any

import torch

from asu.commands.outputs import add_overwrite_argument, locked_output
from asu.commands.unlearn import add_data_arguments
from asu.files import atomic_write, atomic_write_json, atomic_write_text, check_output_location
from asu.inspection import ROW_CHOICES, inspect_model, parse_temperatures, summarize
from asu.models import load_model, load_tokenizer


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="Hugging Face model directory or hub id")
    parser.add_argument(
        "--data",
        required=True,
        help="forget set: a .json/.jsonl/.csv/.parquet file, a datasets save_to_disk folder or a hub dataset "
        "NAME:CONFIG[:SPLIT]; QA rows (question/answer) or 'text' rows",
    )
    parser.add_argument("--retain", default=None, help="optional retain set to compare against")
    add_data_arguments(parser)
    parser.add_argument(
        "--temperature", default="2,2.3,3", help="comma-separated temperatures > 0 (default 2,2.3,3)"
    )
    parser.add_argument("--layers", default="all", help="'all', '6-8' or '0,2,5-7' (default all)")
    parser.add_argument("--max-length", type=int, default=512, help="tokens per prompt (default 512)")
    parser.add_argument("--max-examples", type=int, default=None, help="use at most this many rows per set")
    parser.add_argument(
        "--rows",
        choices=ROW_CHOICES,
        default="answer",
        help="query rows averaged: those predicting answer tokens (default) or every row",
    )
    parser.add_argument("--out", required=True, help="output directory")
    add_overwrite_argument(parser)
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument(
        "--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto", help="model dtype"
    )


def _heatmap(path: Path, values: list[list[float]], layers: list[int], title: str, label: str) -> None:
    from matplotlib.figure import Figure  # no pyplot: no global backend state, renders with Agg

    data = torch.tensor(values, dtype=torch.float64).numpy()
    n_layers, n_heads = data.shape
    fig = Figure(figsize=(max(4.0, 0.35 * n_heads + 2.5), max(3.0, 0.3 * n_layers + 1.8)))
    ax = fig.add_subplot()
    im = ax.imshow(data, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_yticks(range(n_layers), [str(i) for i in layers])
    if n_heads <= 32:
        ax.set_xticks(range(n_heads))
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label=label)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))


def write_outputs(report: dict[str, Any], out_dir: str | os.PathLike) -> list[Path]:
    """``inspect.json``, ``summary.txt`` and the heatmaps into ``out_dir``; returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    path = out / "inspect.json"
    atomic_write_json(path, report, indent=1)
    written.append(path)
    path = out / "summary.txt"
    atomic_write_text(path, summarize(report))
    written.append(path)
    layers = report["layers"]
    for name, s in report["sets"].items():
        path = out / f"entropy_{name}_tau1.png"
        _heatmap(path, s["entropy_tau1"], layers, f"{name}: attention entropy at tau=1", "nats")
        written.append(path)
        for tau in report["temperatures"]:
            path = out / f"entropy_{name}_tau{tau}.png"
            _heatmap(path, s["entropy"][tau], layers, f"{name}: attention entropy at tau={tau}", "nats")
            written.append(path)
            path = out / f"kl_{name}_tau{tau}.png"
            _heatmap(path, s["kl"][tau], layers, f"{name}: KL(smoothed tau={tau} || original)", "nats")
            written.append(path)
    return written


def _template(args: argparse.Namespace) -> Any:
    from asu.templates import get_template

    kept = {} if args.system_prompt is None else {"system_prompt": args.system_prompt}
    return get_template(args.template, **kept)


def _encode_set(tokenizer: Any, rows: list[dict[str, Any]], path: str, args: argparse.Namespace) -> list:
    from asu.data import encode_rows

    if args.max_examples is not None:
        rows = rows[: args.max_examples]
    return encode_rows(tokenizer, rows, args.max_length, source=path, template=_template(args))


def run(args: argparse.Namespace) -> int:
    """``asu inspect``: validate, load, measure, write into the locked ``--out``; failures are exceptions
    for the command's error boundary."""
    from asu.data import load_rows
    from asu.smoothing import attention_modules, parse_layers
    from asu.templates import check_template, describe_template

    temperatures = parse_temperatures(args.temperature)
    if args.max_length < 2:
        raise ValueError(f"--max-length must be >= 2, got {args.max_length}")
    if args.max_examples is not None and args.max_examples < 1:
        raise ValueError(f"--max-examples must be >= 1, got {args.max_examples}")
    try:
        import matplotlib  # noqa: F401
    except ModuleNotFoundError:
        raise ValueError("asu inspect writes heatmaps with matplotlib: pip install matplotlib") from None
    check_output_location(args.out, {"--model": args.model})
    template = _template(args)
    keys = {"question_key": args.question_key, "answer_key": args.answer_key}
    sources = {"forget": args.data} | ({"retain": args.retain} if args.retain else {})
    rows = {name: load_rows(path, **keys) for name, path in sources.items()}
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {
        "auto": torch.bfloat16 if device.type == "cuda" else torch.float32,
        "float32": torch.float32,
        "bfloat16": torch.bfloat16,
        "float16": torch.float16,
    }[args.dtype]
    start = time.perf_counter()
    tokenizer = load_tokenizer(args.model)
    check_template(template, tokenizer, [row for name in sources for row in rows[name]])
    model = load_model(args.model, dtype=dtype, device=device)
    parse_layers(args.layers, len(attention_modules(model)))
    examples = {name: _encode_set(tokenizer, rows[name], sources[name], args) for name in sources}
    with locked_output(args.out, "inspect", args.overwrite) as output:
        report = inspect_model(model, examples, temperatures=temperatures, layers=args.layers, rows=args.rows)
        report["model"] = str(args.model)
        report["data"] = {
            "forget": str(args.data),
            "retain": None if args.retain is None else str(args.retain),
        }
        report["max_length"] = args.max_length
        report["template"] = describe_template(template, tokenizer)
        report["seconds"] = round(time.perf_counter() - start, 3)
        with output.writing():
            paths = write_outputs(report, args.out)
    print(summarize(report), end="")
    print(f"wrote {len(paths)} files to {args.out}")
    return 0
