"""CPU attention: the CPU production path against the previous CPU path (the reference) and plain SDPA.

    python -m benchmarks.bench_cpu_attention [--lengths 1024,2048,...] [--cap-gb 14] [--out DIR]
    python -m benchmarks.bench_cpu_attention --readme [--results DIR]    # README block from committed results

One call, forward + backward with a random upstream gradient: B 1, 4 heads, head dim 64, causal, temperature
2 (``scale = 1 / (2 sqrt(64))``), fp32, one torch thread. Every (provider, N) runs in its own process
(:mod:`benchmarks.isolated`), so its peak resident set size (the whole process: interpreter, torch, inputs
and the call) is its own; time is the median of the timed runs after one warm-up call at N = 256.

Providers:

* ``ours``: ``asu_kernels.attention`` on the CPU path (``ASU_KERNELS_BACKEND=cpu``); at this shape PyTorch's
  fused CPU flash attention serves it (square causal, no soft-cap).
* ``ours-blocked``: the same call with ``softcap=50`` (Gemma-2's value), which the fused kernel cannot
  express: the blocked online softmax of :mod:`asu_kernels._cpu_attention`, forward and backward. The cap
  bends large logits only, so it measures that implementation's cost on the same work.
* ``reference``: ``asu_kernels.reference.attention``, what a CPU call ran before the CPU path existed
  (materialises the N x N scores).
* ``sdpa``: ``torch.nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True, scale=...)``.

Each provider stops at its first N over the memory cap (``--cap-gb``, the child is killed there) or past
the timeout. Results: ``<out>/results.csv`` (:data:`benchmarks.common.COLUMNS`), ``results.md`` (the machine,
the versions, the load of the machine at the start) and ``results.png`` (time and memory against N).
"""

from __future__ import annotations

import argparse
import datetime
import os
import sys
from pathlib import Path

import torch

from benchmarks import scaling
from benchmarks.common import Recorder, read_csv
from benchmarks.cpu_attention_point import HEAD_DIM, HEADS, PROVIDERS, TEMPERATURE
from benchmarks.report import refresh_readme

RESULTS = Path(__file__).resolve().parent / "results"
README = Path(__file__).resolve().parent.parent / "README.md"
PREFIX = "cpu-attention"
MARKERS = ("<!-- cpu-attention:start -->", "<!-- cpu-attention:end -->")
LENGTHS = (1024, 2048, 4096, 8192, 16384, 32768)


def run(
    out: Path,
    lengths: list[int],
    provider_names: list[str],
    cap_gb: float,
    timeout_s: float,
    *,
    append: bool = False,
) -> Path:
    """The sweep into ``out`` (CSV, markdown, plot); returns the markdown path. ``append`` keeps the rows
    already in ``out`` except those of the (provider, N) points measured again."""
    torch.set_num_threads(1)  # the device column names the thread count the children use
    out.mkdir(parents=True, exist_ok=True)
    load = scaling.load_state()
    rec = Recorder(out / "results.csv", "cpu", append=append)
    rec.rows = scaling.keep_other_points(rec.rows, provider_names, lengths)
    columns = dict(
        dtype=torch.float32, batch=1, heads_q=HEADS, heads_kv=HEADS, head_dim=HEAD_DIM, causal=True,
        temperature=TEMPERATURE, params=f"threads=1;cap_gb={cap_gb:g}",
    )  # fmt: skip
    sweep = scaling.Sweep(
        module="benchmarks.cpu_attention_point", benchmark="cpu_attention", mode="fwd+bwd", columns=columns,
        providers=provider_names, lengths=lengths, cap_gb=cap_gb, timeout_s=timeout_s,
        spec=lambda p, n: {"provider": p, "n": n, "repeats": 3 if n <= 4096 else 1},
    )  # fmt: skip
    scaling.run_sweep(rec, sweep)
    return write_markdown(out, read_csv(out / "results.csv"), load, cap_gb)


def write_markdown(out: Path, rows: list[dict[str, str]], load: str | None, cap_gb: float) -> Path:
    """``results.md`` and ``results.png`` of a sweep's rows (``load``: the machine's load at the start)."""
    plot_note = scaling.plot(
        rows, PROVIDERS, out / "results.png", "Attention fwd+bwd on CPU, B1 H4 D64", cap_gb
    )
    lines = [
        "# CPU attention: forward + backward of one call",
        "",
        scaling.machine_line(rows, load),
        "Produced by `python -m benchmarks.bench_cpu_attention`. B 1, 4 heads, D 64, causal, temperature 2, "
        f"fp32, one torch thread; each point in its own process, killed above {cap_gb:g} GB resident.",
        "",
        "Seconds (median):",
        "",
        *scaling.table(rows, PROVIDERS, "s"),
        "",
        "Peak RSS of the whole process, GB:",
        "",
        *scaling.table(rows, PROVIDERS, "GB"),
        "",
        "Ours against the others (how many times faster / smaller):",
        "",
        *scaling.ratio_table(rows, "ours", ("reference", "sdpa")),
        "",
    ]
    return scaling.write_results_md(out, lines, plot_note, "bench_cpu_attention")


def readme_section(rows: list[dict[str, str]], md: Path, readme: Path) -> str:
    """The README block: seconds / peak RSS per N of the CPU path, the reference, SDPA, the blocked path."""
    first = rows[0]
    link = os.path.relpath(md, readme.parent)
    intro = (
        "Attention on the CPU (`asu_kernels.attention`, forward + backward of one call, B 1, 4 heads, D 64, "
        "causal, τ 2, fp32, one torch thread; `python -m benchmarks.bench_cpu_attention` on "
        f"{first['device']}, {first['date'][:10]}, torch {first['torch']}; [full results]({link})). "
        "`ours` is the CPU path, `reference` what CPU calls ran before it, `sdpa` plain "
        "`scaled_dot_product_attention`, `ours-blocked` the CPU path's blocked online softmax (a "
        "soft-capped call). Cells: seconds / peak RSS of the whole process, interpreter and libraries "
        "included (in brackets the call's own increase over the resident size before it)."
    )
    return "\n".join(
        [intro, "", *scaling.time_memory_table(rows, ("ours", "reference", "sdpa", "ours-blocked"))]
    )


def refresh(results: Path | None, readme: Path) -> int:
    csv_path = results / "results.csv" if results else scaling.newest_results(RESULTS, PREFIX)
    if csv_path is None or not csv_path.is_file():
        print(f"bench_cpu_attention: no {PREFIX}-*/results.csv under {RESULTS}", file=sys.stderr)
        return 1
    section = readme_section(read_csv(csv_path), csv_path.with_name("results.md"), readme)
    if not refresh_readme(readme, section, MARKERS):
        print(f"{readme}: no {' / '.join(MARKERS)} markers; left untouched", file=sys.stderr)
        return 1
    print(f"bench_cpu_attention: refreshed {readme}")
    return 0


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(
        prog="python -m benchmarks.bench_cpu_attention", description=__doc__.splitlines()[0]
    )
    p.add_argument("--lengths", default=",".join(map(str, LENGTHS)), help="comma-separated N")
    p.add_argument("--providers", default=",".join(PROVIDERS), help="comma-separated providers")
    p.add_argument("--cap-gb", type=float, default=14.0, help="kill a point above this resident size")
    p.add_argument("--timeout", type=float, default=1200.0, help="seconds per point")
    p.add_argument("--out", type=Path, default=None, help=f"default benchmarks/results/{PREFIX}-<date>")
    p.add_argument(
        "--append",
        action="store_true",
        help="keep the rows already in --out but those of the (provider, N) points run again",
    )
    p.add_argument(
        "--render", action="store_true", help="rewrite --out's markdown and plot from its CSV; no run"
    )
    p.add_argument("--readme", action="store_true", help="rewrite the README block from the results; no run")
    p.add_argument("--results", type=Path, default=None, help="with --readme: the results folder to read")
    args = p.parse_args(argv)
    if args.readme:
        return refresh(args.results, README)
    if args.render:
        if args.out is None or not (args.out / "results.csv").is_file():
            p.error("--render needs --out DIR holding a results.csv")
        rows = read_csv(args.out / "results.csv")
        write_markdown(args.out, rows, None, scaling.cap_of(rows) or args.cap_gb)
        return 0
    lengths = [int(x) for x in args.lengths.split(",") if x]
    names = [x for x in args.providers.split(",") if x]
    for name in names:
        if name not in PROVIDERS:
            p.error(f"unknown provider {name!r}; choose from {', '.join(PROVIDERS)}")
    out = args.out or RESULTS / f"{PREFIX}-{datetime.date.today().isoformat()}"
    run(out, lengths, names, args.cap_gb, args.timeout, append=args.append)
    return 0


if __name__ == "__main__":
    sys.exit(main())
