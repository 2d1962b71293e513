"""Run the benchmark suite and write one results CSV.

    python -m benchmarks.run --suite quick|full [--only attention,kl,e2e,context,attention_kl]
                             [--device cuda|cpu]
                             [--out DIR] [--tiny] [--threads N]

Suites (sizes per benchmark are documented in each ``bench_*.py``):

* ``quick``: attention (d=128, causal, GQA 32/8, N = 1k/4k/16k, fwd and fwd+bwd, eager / SDPA / ours) and the
  vocabulary KL/CE at the target sizes: a few minutes on an H100.
* ``full``: the whole attention grid, every KL/CE size, the end-to-end epoch, the longest-context search and
  the attention-map KL (N = 1k..32k against the dense KL and the FlexAttention composition).
* ``--only attention_kl`` with ``--suite quick``: the attention-map KL at N = 1k and 4k (gpu_check.sh runs it
  as an optional stage).

On CPU every benchmark runs at small sizes (``--tiny``: the smallest, for the test-suite). The CSV
(``bench-<device>-<UTC time>.csv`` in ``--out``) is rewritten atomically after every measurement.
"""

from __future__ import annotations

import argparse
import datetime as _dt
import sys
import time
from pathlib import Path

import torch

from benchmarks.common import Recorder, slug

BENCHMARKS = ("attention", "kl", "e2e", "context", "attention_kl")
SUITES = {"quick": ("attention", "kl"), "full": BENCHMARKS}
DEFAULT_OUT = Path(__file__).resolve().parent / "results"


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    p = argparse.ArgumentParser(prog="python -m benchmarks.run", description=__doc__.splitlines()[0])
    p.add_argument("--suite", choices=sorted(SUITES), default="quick")
    p.add_argument("--only", default="", help=f"comma-separated subset of {','.join(BENCHMARKS)}")
    p.add_argument("--device", default=None, help="cuda, cuda:N or cpu (default: cuda when available)")
    p.add_argument("--out", type=Path, default=DEFAULT_OUT, help="directory for the results CSV")
    p.add_argument("--csv", type=Path, default=None, help="exact CSV path; rows are appended if it exists")
    p.add_argument("--tiny", action="store_true", help="smallest sizes (CPU test-suite)")
    p.add_argument(
        "--providers", default="", help="comma-separated attention providers to run (default: suite's)"
    )
    p.add_argument("--context-max", type=int, default=None, help="upper bound of the longest-context search")
    p.add_argument(
        "--context-budget", type=float, default=None, help="seconds for the longest-context search"
    )
    p.add_argument(
        "--e2e-examples", type=int, default=None, help="forget (= retain) examples in the e2e epoch"
    )
    p.add_argument(
        "--threads", type=int, default=None, help="CPU threads for torch (default: torch's choice)"
    )
    p.add_argument(
        "--e2e-model",
        default=None,
        help="llama-1b | llama-8b-lora | tiny | tiny-lora (default: llama-1b on CUDA, both 1b and 8b-lora in "
        "the full suite; tiny on CPU)",
    )
    p.add_argument("--fail-on-error", action="store_true", help="exit 1 when any measurement errored")
    p.add_argument("--quiet", action="store_true")
    args = p.parse_args(argv)
    only = [b.strip() for b in args.only.split(",") if b.strip()]
    unknown = sorted(set(only) - set(BENCHMARKS))
    if unknown:
        p.error(f"--only: unknown benchmark(s) {', '.join(unknown)}; choose from {', '.join(BENCHMARKS)}")
    args.benchmarks = tuple(b for b in BENCHMARKS if b in only) if only else SUITES[args.suite]
    if args.device is None:
        args.device = "cuda" if torch.cuda.is_available() else "cpu"
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        p.error("--device cuda requested but torch.cuda.is_available() is False")
    if not (args.device == "cpu" or args.device.startswith("cuda")):
        p.error(f"--device must be cuda, cuda:N or cpu, got {args.device!r}")
    if args.threads is not None and args.threads < 1:
        p.error("--threads must be >= 1")
    if args.e2e_examples is not None and args.e2e_examples < 2:
        p.error("--e2e-examples must be >= 2")
    return args


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.device.startswith("cuda"):
        torch.cuda.set_device(torch.device(args.device))
    if args.threads is not None:
        torch.set_num_threads(args.threads)
    stamp = _dt.datetime.now(_dt.timezone.utc).strftime("%Y%m%d-%H%M%S")
    path = args.csv or Path(args.out) / f"bench-{slug(args_device_name(args.device))}-{stamp}.csv"
    rec = Recorder(path, args.device, append=args.csv is not None)
    rec.verbose = not args.quiet
    env = rec.env
    print(
        f"# {env['device']} | torch {env['torch']} | triton {env['triton']}"
        f" | transformers {env['transformers']} | suite {args.suite} | {', '.join(args.benchmarks)}",
        flush=True,
    )
    for bench in args.benchmarks:
        t0 = time.perf_counter()
        if bench == "attention":
            from benchmarks import bench_attention

            providers = tuple(p for p in args.providers.split(",") if p) or None
            bench_attention.run(rec, args.suite, tiny=args.tiny, providers=providers)
        elif bench == "kl":
            from benchmarks import bench_linear_kl

            bench_linear_kl.run(rec, args.suite, tiny=args.tiny)
        elif bench == "e2e":
            from benchmarks import bench_e2e

            bench_e2e.run(rec, args.suite, tiny=args.tiny, examples=args.e2e_examples, model=args.e2e_model)
        elif bench == "context":
            from benchmarks import bench_context

            bench_context.run(
                rec, args.suite, tiny=args.tiny, max_tokens=args.context_max, budget_s=args.context_budget
            )
        elif bench == "attention_kl":
            from benchmarks import bench_attention_kl

            bench_attention_kl.run(rec, args.suite, tiny=args.tiny)
        print(f"# {bench}: {time.perf_counter() - t0:.1f} s", flush=True)
    counts = rec.summary()
    print(f"# wrote {rec.path} ({len(rec.rows)} rows: {counts})", flush=True)
    return 1 if args.fail_on_error and counts["error"] else 0


def args_device_name(device: str) -> str:
    from benchmarks.common import device_name

    return device_name(device) if device.startswith("cuda") else "cpu"


if __name__ == "__main__":
    sys.exit(main())
