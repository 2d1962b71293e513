"""``asu eval``: TOFU-style evaluation of a model directory on forget / retain / general rows, and the τ
preview (the smoothed model, no training). The metrics are :mod:`asu.evaluate`'s.
"""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Callable
from pathlib import Path

import torch

from asu.data import load_rows
from asu.evaluate import (
    check_rows,
    evaluate_model,
    evaluate_smoothed,
    load_reference_stats,
    markdown_table,
    validate_stats,
    write_results,
)
from asu.files import atomic_write_json, atomic_write_text


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="Hugging Face model directory (with its tokenizer)")
    parser.add_argument("--data", required=True, help="forget rows, JSON Lines or JSON (TOFU format)")
    parser.add_argument("--retain", help="retain rows (for retain metrics and model utility)")
    parser.add_argument("--general", help="general-knowledge rows (world facts), counted in model utility")
    parser.add_argument("--reference", help="stats.json of a reference (oracle) model, for forget quality")
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--batch-size", type=int, default=32)
    parser.add_argument("--max-new-tokens", type=int, default=48)
    parser.add_argument(
        "--temperature",
        help="comma-separated attention temperatures for the τ preview, e.g. 2,2.3,3,5 "
        "(the smoothed model, no training)",
    )
    parser.add_argument("--layers", help="layers to smooth in the τ preview, e.g. 6-8 or 0,2,5 (default all)")
    parser.add_argument("--world", help="world.json of an asu world, for the well-formed-sentence check")
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--no-progress", action="store_true")


def _world_checker(path: Path) -> Callable[[str], bool]:
    from asu.demo.world import WorldConfig, generate_world

    meta = json.loads(path.read_text(encoding="utf-8"))
    return generate_world(WorldConfig(**meta["config"])).is_well_formed


def _parse_floats(text: str, what: str) -> list[float]:
    try:
        return [float(x) for x in text.split(",") if x.strip()]
    except ValueError:
        raise ValueError(f"{what}: expected comma-separated numbers, got {text!r}") from None


def run(args: argparse.Namespace) -> int:
    try:
        forget = load_rows(args.data)
        check_rows(forget, args.data)
        retain = load_rows(args.retain) if args.retain else None
        general = load_rows(args.general) if args.general else None
        reference = load_reference_stats(args.reference) if args.reference else None
        if reference is not None:
            validate_stats(reference, args.reference, n_items=len(forget))
        temps = _parse_floats(args.temperature, "--temperature") if args.temperature else []
        world_path = Path(args.world) if args.world else Path(args.data).parent / "world.json"
        checker = _world_checker(world_path) if world_path.is_file() else None
        model_dir = Path(args.model)
        if not model_dir.is_dir():
            raise FileNotFoundError(f"model directory not found: {model_dir}")
        from transformers import AutoModelForCausalLM, AutoTokenizer

        try:
            tokenizer = AutoTokenizer.from_pretrained(model_dir)
            model = AutoModelForCausalLM.from_pretrained(model_dir).to(args.device)
        except (OSError, ValueError) as e:
            raise ValueError(f"cannot load a model from {model_dir}: {str(e).splitlines()[0]}") from None
    except (FileNotFoundError, ValueError) as e:
        print(f"asu eval: error: {e}", file=sys.stderr)
        return 1

    result = evaluate_model(
        model,
        tokenizer,
        forget,
        retain,
        general,
        reference_stats=reference,
        batch_size=args.batch_size,
        max_new_tokens=args.max_new_tokens,
        well_formed=checker,
        progress=not args.no_progress,
    )
    write_results(result, args.out)
    print(markdown_table({"value": result["summary"]}))
    if temps:
        preview = evaluate_smoothed(
            model,
            tokenizer,
            forget,
            temps,
            retain_rows=retain,
            general_rows=general,
            layers=args.layers,
            batch_size=args.batch_size,
            max_new_tokens=args.max_new_tokens,
            well_formed=checker,
            progress=not args.no_progress,
        )
        atomic_write_json(Path(args.out) / "tau_preview.json", preview)
        cols = {"τ=1": result["summary"]} | {f"τ={p['temperature']:g}": p["summary"] for p in preview}
        keys = [
            k
            for k in (
                "forget_rouge",
                "forget_prob",
                "forget_no_repeat",
                "forget_well_formed",
                "forget_token_entropy",
                "retain_rouge",
            )
            if k in result["summary"]
        ]
        table = markdown_table(cols, keys)
        atomic_write_text(Path(args.out) / "tau_preview.md", table)
        print("\nτ preview (smoothed model, no training):\n" + table)
    print(f"results written to {args.out}")
    return 0
