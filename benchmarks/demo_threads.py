"""The demo's training on a CPU with torch's default thread count against one thread, quiet and loaded.

``asu demo`` trains a ~1M-parameter Llama from scratch (:func:`asu.demo.tiny.train_memorise`). Its operations
are too small to split across threads, and with torch's default of one thread per core every operation waits
for all of them; when other work keeps the cores busy, a thread that is not scheduled stalls the rest. This
script measures it: for each condition it runs, in a fresh process, ``--epochs`` epochs of the demo's own
training function on the default world and model (seed 0; no memorisation check, so only training is timed)
and reports the seconds per optimizer step.

Conditions: ``quiet`` (nothing started by this script; other users of the machine are not controlled, so the
load average before each run is recorded) and ``loaded`` (one busy-looping Python process per core, started
by this script for the duration of the run), each with ``threads`` = torch's default (what ``asu demo`` used
before it set one thread) and 1 (what it sets now on a CPU).

    PYTHONPATH=. python -m benchmarks.demo_threads [--epochs 1] [--repeats 2] [--out benchmarks/results]

Writes ``demo-threads-<machine>-<date>.md`` and ``.json`` under ``--out`` with the machine and versions.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parents[1]
BURN = "import time\nend = time.time() + {seconds}\nwhile time.time() < end:\n    pass\n"


def _child(threads: int, epochs: int) -> dict[str, Any]:
    """One timed run in this process: the demo's training for ``epochs`` epochs on ``threads`` threads."""
    import torch

    if threads > 0:
        torch.set_num_threads(threads)
    from asu.demo.tiny import TinyModelConfig, TrainConfig, build_model, train_memorise, train_tokenizer
    from asu.demo.world import WorldConfig, generate_world

    world = generate_world(WorldConfig(n_authors=20, seed=0))
    model_cfg = TinyModelConfig()
    tokenizer = train_tokenizer(world.texts(), model_cfg.vocab_size)
    model = build_model(model_cfg, tokenizer, seed=0)
    rows = world.split("forget") + world.split("retain") + world.split("general")
    info = train_memorise(model, tokenizer, rows, {}, TrainConfig(max_epochs=epochs), progress=False)
    return {
        "threads": torch.get_num_threads(),
        "steps": info["steps"],
        "seconds": info["seconds"],
        "ms_per_step": 1000 * info["seconds"] / info["steps"],
    }


def _run(threads: int, epochs: int, loaded: bool) -> dict[str, Any]:
    cores = os.cpu_count() or 1
    burners = []
    load_before = os.getloadavg()[0]
    if loaded:
        code = BURN.format(seconds=3600)
        burners = [subprocess.Popen([sys.executable, "-c", code]) for _ in range(cores)]
        time.sleep(1.0)
    env = {k: v for k, v in os.environ.items() if k != "OMP_NUM_THREADS"}
    cmd = [sys.executable, "-m", "benchmarks.demo_threads", "--child", str(threads), "--epochs", str(epochs)]
    try:
        done = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, check=True)
    finally:
        for p in burners:
            p.kill()
            p.wait()
    result = json.loads(done.stdout.strip().splitlines()[-1])
    return result | {"load": "loaded" if loaded else "quiet", "load_average_before": round(load_before, 2)}


def _table(rows: list[dict[str, Any]]) -> str:
    lines = [
        "| condition | torch threads | runs | s/step (median) | s/step (each run) | load average before |",
        "|---|---|---|---|---|---|",
    ]
    groups: dict[tuple[str, int], list[dict[str, Any]]] = {}
    for r in rows:
        groups.setdefault((r["load"], r["threads"]), []).append(r)
    for (load, threads), runs in groups.items():
        each = ", ".join(f"{r['ms_per_step'] / 1000:.3f}" for r in runs)
        loads = ", ".join(f"{r['load_average_before']:.1f}" for r in runs)
        median = statistics.median(r["ms_per_step"] for r in runs) / 1000
        lines.append(f"| {load} | {threads} | {len(runs)} | {median:.3f} | {each} | {loads} |")
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--child", type=int, help=argparse.SUPPRESS)
    p.add_argument("--epochs", type=int, default=1, help="training epochs per run (default 1)")
    p.add_argument("--repeats", type=int, default=2, help="runs per condition (default 2)")
    p.add_argument("--out", default=str(ROOT / "benchmarks" / "results"))
    args = p.parse_args(argv)
    if args.child is not None:
        print(json.dumps(_child(args.child, args.epochs)))
        return 0
    import torch

    from asu.environment import environment
    from asu.files import atomic_write_json, atomic_write_text

    default = torch.get_num_threads()
    rows = []
    for _ in range(args.repeats):
        for loaded in (False, True):
            for threads in (default, 1):
                rows.append(_run(threads, args.epochs, loaded))
                print(json.dumps(rows[-1]), flush=True)
    env = environment("cpu")
    table = _table(rows)
    date = env["date"][:10]
    name = f"demo-threads-{os.cpu_count()}-cores-{date}"
    versions = f"torch {env['torch']}, transformers {env['transformers']}, python {env['python']}"
    command = (
        f"PYTHONPATH=. python -m benchmarks.demo_threads --epochs {args.epochs} --repeats {args.repeats}"
    )
    text = (
        f"# The demo's training: torch threads, quiet and loaded\n\n"
        f"{env['machine']}; {versions}; {env['date']}. `{command}`: each run is {rows[0]['steps']} "
        "optimizer steps of `asu.demo.tiny.train_memorise` on the default world and model, in a fresh "
        "process; `loaded` runs one busy-looping process per core beside it. torch's default here is "
        f"{default} threads (what `asu demo` used before); `asu demo` now sets 1 on a CPU.\n\n{table}\n"
    )
    out = Path(args.out)
    atomic_write_text(out / f"{name}.md", text)
    atomic_write_json(out / f"{name}.json", {"environment": env, "epochs": args.epochs, "runs": rows})
    print(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
