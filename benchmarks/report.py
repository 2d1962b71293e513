"""Turn results CSVs into a markdown report with plots, and refresh the README's performance section.

    python -m benchmarks.report [--results DIR] [--out DIR] [--readme PATH | --no-readme]

Rows of every ``*.csv`` in ``--results`` (default ``benchmarks/results``) are grouped by device and UTC day;
each group becomes ``<out>/<device>-<YYYY-MM-DD>.md`` (``out`` defaults to the results directory) with tables
(attention TFLOP/s and memory per provider and N, vocabulary KL/CE time and memory, end-to-end epoch,
longest context, the published targets met or not) and PNG plots next to it (TFLOP/s vs N, memory vs N,
vocabulary-loss memory vs M, end-to-end speed-up; skipped with a note when matplotlib is missing). When the
same measurement appears in several CSVs of a group, the newest row wins.

The README's performance section is the text between ``<!-- perf:start -->`` and ``<!-- perf:end -->``; it
is replaced (atomically) with a summary of the newest GPU group (or, without any, the newest group, marked as
CPU numbers). A README without both markers is left untouched.
"""

from __future__ import annotations

import argparse
import math
import os
import sys
from collections import defaultdict
from collections.abc import Iterable, Sequence
from pathlib import Path

from asu.files import atomic_write, atomic_write_text, replace_section
from benchmarks.common import COLUMNS, read_csv, slug

RESULTS = Path(__file__).resolve().parent / "results"
README = Path(__file__).resolve().parent.parent / "README.md"
START, END = "<!-- perf:start -->", "<!-- perf:end -->"
ATTN_ORDER = (
    "ours",
    "sdpa-flash",
    "sdpa-cudnn",
    "sdpa-efficient",
    "flash-attn2",
    "flash-attn3",
    "flex",
    "sdpa-math",
    "eager",
)
_VALUE_COLUMNS = ("median", "p20", "p80", "status", "note", "date", "torch", "triton", "transformers")
_KEY_COLUMNS = tuple(c for c in COLUMNS if c not in _VALUE_COLUMNS)

Row = dict[str, str]


# ------------------------------------------------------------------------------------------------- loading


def load_rows(results: Path) -> list[Row]:
    """Every row of every results CSV under ``results`` (files with another header are skipped)."""
    rows: list[Row] = []
    for path in sorted(Path(results).glob("*.csv")):
        try:
            file_rows = read_csv(path)
        except ValueError as e:
            print(f"report: skipping {path.name}: {e}", file=sys.stderr)
            continue
        for r in file_rows:
            r["_file"] = path.name
        rows.extend(file_rows)
    return rows


def group_rows(rows: Iterable[Row]) -> dict[tuple[str, str], list[Row]]:
    """Rows by (device, UTC day), the newest row kept for each distinct measurement."""
    groups: dict[tuple[str, str], dict[tuple, Row]] = defaultdict(dict)
    for r in rows:
        key = tuple(r.get(c, "") for c in _KEY_COLUMNS)
        group = groups[(r["device"], r["date"][:10])]
        if key not in group or r["date"] >= group[key]["date"]:
            group[key] = r
    return {g: list(v.values()) for g, v in sorted(groups.items(), key=lambda kv: kv[0][1])}


def is_gpu(device: str) -> bool:
    return not device.startswith("CPU")


def _num(r: Row) -> float | None:
    if r.get("status") != "ok" or r.get("median") in ("", None):
        return None
    try:
        value = float(r["median"])
    except ValueError:
        return None
    return None if math.isnan(value) else value


def _fmt(value: float | None, digits: int = 3) -> str:
    if value is None:
        return "—"
    if value == 0:
        return "0"
    if abs(value) >= 100:
        return f"{value:,.0f}"
    return f"{value:.{digits}g}"


def _cell(r: Row | None, digits: int = 3) -> str:
    if r is None:
        return "—"
    if r["status"] == "ok":
        return _fmt(_num(r), digits)
    return {"oom": "OOM", "skip": "n/a", "error": "error"}.get(r["status"], r["status"])


def _table(header: Sequence[str], body: Iterable[Sequence[str]]) -> list[str]:
    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(str(c) for c in row) + " |" for row in body]
    return lines


def _providers(rows: Iterable[Row], order: Sequence[str]) -> list[str]:
    present = {r["provider"] for r in rows}
    return [p for p in order if p in present] + sorted(present - set(order))


def _int(text: str) -> int:
    try:
        return int(float(text))
    except (TypeError, ValueError):
        return 0


# ------------------------------------------------------------------------------------------------ sections


def _attention_configs(rows: list[Row]) -> dict[tuple, list[Row]]:
    by: dict[tuple, list[Row]] = defaultdict(list)
    for r in rows:
        if r["benchmark"] == "attention" and r["mode"] in ("fwd", "bwd", "fwd+bwd"):
            cfg = (
                r["mode"],
                r["dtype"],
                r["causal"],
                r["head_dim"],
                r["heads_q"],
                r["heads_kv"],
                r["temperature"],
            )
            by[cfg].append(r)
    mode_rank = {"fwd": 0, "bwd": 1, "fwd+bwd": 2}
    return dict(
        sorted(
            by.items(),
            key=lambda kv: (
                kv[0][2] != "true",
                -_int(kv[0][3]),
                kv[0][4] == kv[0][5],
                kv[0][6],
                mode_rank[kv[0][0]],
            ),
        )  # fmt: skip
    )


def _config_title(cfg: tuple) -> str:
    mode, dtype, causal, d, hq, hkv, temp = cfg
    kind = "MHA" if hq == hkv else f"GQA {hq}/{hkv}"
    mask = "causal" if causal == "true" else "non-causal"
    return f"{mode}, {dtype}, {mask}, d={d}, {kind}, temperature {temp}"


def _lookup(rows: list[Row], **match: str) -> Row | None:
    found = [r for r in rows if all(r.get(k) == v for k, v in match.items())]
    return found[-1] if found else None


def attention_section(rows: list[Row], metric: str) -> list[str]:
    """One table per configuration: N (and batch) down, providers across, ``metric`` medians in the cells."""
    out: list[str] = []
    for cfg, cfg_rows in _attention_configs(rows).items():
        providers = _providers(cfg_rows, ATTN_ORDER)
        seqs = sorted({(_int(r["seqlen"]), _int(r["batch"])) for r in cfg_rows if r["seqlen"]})
        if not seqs:
            continue
        ratios = [p for p in ("sdpa-flash", "eager") if p in providers and "ours" in providers]
        label = "memory of ours / " if metric == "GB" else "speed-up of ours vs "
        header = ["N", "B", *providers] + [label + p for p in ratios]
        body = []
        for n, b in seqs:
            cells = {
                p: _lookup(cfg_rows, provider=p, seqlen=str(n), metric=metric)
                or _status_row([r for r in cfg_rows if r["seqlen"] == str(n)], p)
                for p in providers
            }
            line = [str(n), str(b)] + [_cell(cells[p]) for p in providers]
            for p in ratios:
                ours, other = (
                    _num(cells["ours"]) if cells["ours"] else None,
                    _num(cells[p]) if cells[p] else None,
                )
                if ours is None or other is None or other == 0:
                    line.append("—")
                else:
                    # TFLOP/s and GB: ours / other; ms: other / ours (so > 1 means ours is faster).
                    ratio = other / ours if metric == "ms" else ours / other
                    line.append(f"{ratio:.2f}x")
            body.append(line)
        out += [f"**{_config_title(cfg)}** ({metric})", ""] + _table(header, body) + [""]
    return out


def _status_row(rows: list[Row], provider: str) -> Row | None:
    """A provider-level skip/error row (recorded without a seqlen-specific metric)."""
    for r in rows:
        if r["provider"] == provider and r["status"] != "ok":
            return r
    return None


def compile_section(rows: list[Row]) -> list[str]:
    comp = [r for r in rows if r["benchmark"] == "attention" and r["metric"] == "compile_s"]
    if not comp:
        return []
    body = [
        [
            r["provider"],
            r["mode"],
            r["seqlen"],
            r["head_dim"],
            f"{r['heads_q']}/{r['heads_kv']}",
            r["causal"],
            _cell(r),
        ]
        for r in comp
    ]
    return (
        ["Compile time of the first call (s):", ""]
        + _table(["provider", "mode", "N", "d", "heads", "causal", "s"], body)
        + [""]
    )


def vocab_section(rows: list[Row]) -> list[str]:
    out: list[str] = []
    for bench, title in (
        ("linear_kl", "Vocabulary KL(teacher ‖ student)"),
        ("linear_ce", "Vocabulary cross-entropy"),
    ):
        bench_rows = [r for r in rows if r["benchmark"] == bench and r["provider"] != "inputs"]
        if not bench_rows:
            continue
        providers = _providers(bench_rows, ("ours", "liger", "eager"))
        shapes = sorted(
            {(_int(r["vocab"]), _int(r["tokens"]), _int(r["hidden"]), r["dtype"]) for r in bench_rows}
        )
        header = ["V", "M", "d", "dtype"]
        header += [f"{p} ms" for p in providers] + [f"{p} GB" for p in providers]
        has_ratio = "ours" in providers and "eager" in providers
        if has_ratio:
            header += ["ours/eager time", "ours/eager memory"]
        body = []
        for v, m, d, dtype in shapes:
            sel = [r for r in bench_rows if r["vocab"] == str(v) and r["tokens"] == str(m)]
            ms = {p: _lookup(sel, provider=p, metric="ms") for p in providers}
            gb = {p: _lookup(sel, provider=p, metric="GB") or ms[p] for p in providers}
            line = [str(v), str(m), str(d), dtype] + [_cell(ms[p]) for p in providers]
            line += [_cell(gb[p]) for p in providers]
            if has_ratio:
                for table in (ms, gb):
                    a, b = (
                        (_num(table["ours"]) if table["ours"] else None),
                        (_num(table["eager"]) if table["eager"] else None),
                    )
                    line.append("—" if a is None or not b else f"{a / b:.2f}")
            body.append(line)
        out += [f"**{title}**, forward+backward", ""] + _table(header, body) + [""]
    return out


def attention_kl_section(rows: list[Row]) -> list[str]:
    """Attention-map KL: per mode a table of N down, each provider's ms and GB across, ours/dense ratios."""
    kl_rows = [r for r in rows if r["benchmark"] == "attention_kl"]
    if not kl_rows:
        return []
    providers = _providers(kl_rows, ("ours", "flex", "dense"))
    out: list[str] = []
    errs = [r for r in kl_rows if r["metric"] == "max_abs_err" and r["status"] == "ok"]
    if errs:
        worst = {
            p: max((_num(r) or 0.0 for r in errs if r["provider"] == p), default=None) for p in providers
        }
        cells = ", ".join(f"{p} {_fmt(v)}" for p, v in worst.items() if v is not None)
        out += [f"Largest row-KL error against the float64 dense KL: {cells}.", ""]
    for mode in ("fwd", "bwd", "fwd+bwd"):
        sel = [r for r in kl_rows if r["mode"] == mode and r["metric"] in ("ms", "GB")]
        if not sel:
            continue
        configs = sorted(
            {(_int(r["seqlen"]), _int(r["batch"]), r["dtype"], r["heads_q"], r["heads_kv"]) for r in sel}
        )
        header = (
            ["N", "B", "dtype", "Hq/Hkv"] + [f"{p} ms" for p in providers] + [f"{p} GB" for p in providers]
        )
        header += ["dense/ours time", "dense/ours memory"]
        body = []
        for n, b, dtype, hq, hkv in configs:
            here = [r for r in sel if r["seqlen"] == str(n) and r["batch"] == str(b)]
            ms = {p: _lookup(here, provider=p, metric="ms") for p in providers}
            gb = {p: _lookup(here, provider=p, metric="GB") or ms[p] for p in providers}
            line = [str(n), str(b), dtype, f"{hq}/{hkv}"] + [_cell(ms[p]) for p in providers]
            line += [_cell(gb[p]) for p in providers]
            for table in (ms, gb):
                ours = _num(table["ours"]) if table.get("ours") and table["ours"]["status"] == "ok" else None
                dense = (
                    _num(table["dense"]) if table.get("dense") and table["dense"]["status"] == "ok" else None
                )
                line.append("—" if ours is None or dense is None or not ours else f"{dense / ours:.2f}")
            body.append(line)
        out += [f"**KL(teacher attention ‖ student attention)**, {mode}", ""] + _table(header, body) + [""]
    return out


def _e2e_groups(rows: list[Row]) -> dict[str, list[Row]]:
    """End-to-end rows by model (``model=`` in ``params``), in the order they were measured."""
    groups: dict[str, list[Row]] = {}
    for r in rows:
        if r["benchmark"] == "e2e":
            fields = dict(kv.split("=", 1) for kv in r["params"].split(";") if "=" in kv)
            groups.setdefault(fields.get("model", "model not recorded"), []).append(r)
    return groups


def e2e_section(rows: list[Row]) -> list[str]:
    out: list[str] = []
    for model, e2e in _e2e_groups(rows).items():
        providers = _providers(e2e, ("authors", "ours", "asu-unlearn"))
        metrics = ("s", "tokens/s", "GB", "loss_first", "loss_last")
        body = []
        for p in providers:
            cells = [
                _cell(_lookup(e2e, provider=p, metric=m) or _status_row(e2e, p), 5 if "loss" in m else 3)
                for m in metrics
            ]
            body.append([p, *cells])
        out += [f"**End to end: one ASU epoch, {model}**", ""]
        params = next((r["params"] for r in e2e if r["params"]), "")
        if params:
            out += [f"Settings: `{params}`", ""]
        out += _table(
            ["pipeline", "epoch s", "tokens/s", "peak GB", "first-step loss", "last-step loss"], body
        )
        out.append("")
        summary = e2e_summary(e2e)
        if summary:
            out += [summary, ""]
    return out


def e2e_summary(e2e: list[Row]) -> str:
    get = lambda p, m: _num(_lookup(e2e, provider=p, metric=m) or {"status": "missing"})  # noqa: E731
    s_a, s_o, m_a, m_o = get("authors", "s"), get("ours", "s"), get("authors", "GB"), get("ours", "GB")
    l_a, l_o = get("authors", "loss_first"), get("ours", "loss_first")
    parts = []
    if s_a and s_o:
        parts.append(f"speed-up {s_a / s_o:.2f}x")
    if m_a and m_o:
        parts.append(f"peak memory {m_o / m_a:.2f}x of the authors' shape")
    if l_a is not None and l_o is not None:
        parts.append(f"first-step loss difference {abs(l_a - l_o):.2e}")
    text = ("Ours vs the authors' pipeline shape: " + ", ".join(parts) + ".") if parts else ""
    s_u, m_u = get("asu-unlearn", "s"), get("asu-unlearn", "GB")
    if s_a and s_u:
        text += f" Through `asu.unlearn()` (Trainer): speed-up {s_a / s_u:.2f}x"
        text += f", peak memory {m_u / m_a:.2f}x." if m_a and m_u else "."
    return text.strip()


def context_section(rows: list[Row]) -> list[str]:
    ctx = [r for r in rows if r["benchmark"] == "context"]
    if not ctx:
        return []
    body = []
    for p in _providers(ctx, ("authors", "ours")):
        r = _lookup(ctx, provider=p, metric="max_tokens")
        fits = [x for x in ctx if x["provider"] == p and x["metric"] == "s" and x["status"] == "ok"]
        best = max(fits, key=lambda x: _int(x["seqlen"]), default=None)
        gb = _lookup(ctx, provider=p, metric="GB", seqlen=best["seqlen"]) if best else None
        if r is not None:
            longest, note = _cell(r, 6), r["note"]
        elif best is not None:  # the search was stopped (timeout) before it recorded its answer
            longest, note = f"{_int(best['seqlen']):,}", "search interrupted: longest N measured so far"
        else:
            longest, note = "—", ""
        body.append([p, longest, _cell(best) if best else "—", _cell(gb) if gb else "—", note])
    return (
        ["**Longest context of one ASU step** (1B Llama-3-like shape)", ""]
        + _table(["pipeline", "longest N", "step s at it", "peak GB at it", "note"], body)
        + [""]
    )


def problems_section(rows: list[Row]) -> list[str]:
    seen, lines = set(), []
    for r in rows:
        if r["status"] in ("skip", "error") and (r["benchmark"], r["provider"], r["note"]) not in seen:
            seen.add((r["benchmark"], r["provider"], r["note"]))
            lines.append(f"* {r['benchmark']} / {r['provider']}: {r['status']}: {r['note']}")
    return (["Not measured:", "", *lines, ""]) if lines else []


# ------------------------------------------------------------------------------------------------- targets


def targets(rows: list[Row]) -> list[tuple[str, str, str]]:
    """(target, measured, met / not met / not measured) for the published targets (GPU groups only)."""
    out: list[tuple[str, str, str]] = []
    for mode in ("fwd", "fwd+bwd"):
        sel = [
            r
            for r in rows
            if r["benchmark"] == "attention" and r["mode"] == mode and r["metric"] == "TFLOP/s"
            and r["causal"] == "true" and r["head_dim"] == "128" and r["dtype"] == "bfloat16"
            and _int(r["seqlen"]) >= 2048 and r["temperature"] in ("1", "1.0")
        ]  # fmt: skip
        for other, need in (("sdpa-flash", 1.0), ("eager", 5.0)):
            ratios, oom_only = [], True
            for r in sel:
                if r["provider"] != "ours" or _num(r) is None:
                    continue
                twin = _lookup(sel, provider=other, seqlen=r["seqlen"], heads_kv=r["heads_kv"])
                if twin is None:
                    continue
                if twin["status"] == "oom":
                    continue
                oom_only = False
                if _num(twin):
                    ratios.append((_num(r) / _num(twin), r["seqlen"]))
            name = f"attention {mode}, causal, d=128, N>=2k: ours >= {need:g}x {other}"
            if ratios:
                worst = min(ratios)
                verdict = "met" if worst[0] >= need else "not met"
                out.append((name, f"worst {worst[0]:.2f}x (N={worst[1]})", verdict))
            elif not oom_only:
                out.append((name, "—", "not measured"))
            elif any(r["provider"] == "ours" and _num(r) for r in sel):
                out.append((name, f"{other} out of memory at every N", "met"))
            else:
                out.append((name, "—", "not measured"))
    kl = [
        r for r in rows if r["benchmark"] == "linear_kl" and r["tokens"] == "8192" and r["vocab"] == "128256"
    ]
    mem = {
        p: _num(_lookup(kl, provider=p, metric="GB") or {"status": "x"}) for p in ("ours", "eager", "liger")
    }
    ms = {
        p: _num(_lookup(kl, provider=p, metric="ms") or {"status": "x"}) for p in ("ours", "eager", "liger")
    }
    if mem["ours"] and mem["eager"]:
        ratio = mem["ours"] / mem["eager"]
        out.append(
            ("KL M=8192 V=128256: memory <= 10% of eager", f"{100 * ratio:.1f}%", _verdict(ratio <= 0.10))
        )
    else:
        out.append(("KL M=8192 V=128256: memory <= 10% of eager", "—", "not measured"))
    for other in ("eager", "liger"):
        name = f"KL M=8192 V=128256: time <= {other}"
        if ms["ours"] and ms[other]:
            out.append(
                (name, f"{ms['ours']:.1f} ms vs {ms[other]:.1f} ms", _verdict(ms["ours"] <= ms[other]))
            )
        else:
            out.append((name, "—", "not measured"))
    e2e = next(iter(_e2e_groups(rows).values()), [])  # the first model measured (llama-1b in the suites)
    s_a, s_o = (_num(_lookup(e2e, provider=p, metric="s") or {"status": "x"}) for p in ("authors", "ours"))
    g_a, g_o = (_num(_lookup(e2e, provider=p, metric="GB") or {"status": "x"}) for p in ("authors", "ours"))
    out.append(
        ("e2e epoch >= 4x faster than the authors' shape", f"{s_a / s_o:.2f}x", _verdict(s_a / s_o >= 4))
        if s_a and s_o
        else ("e2e epoch >= 4x faster than the authors' shape", "—", "not measured")
    )
    out.append(
        ("e2e peak memory <= 0.5x the authors' shape", f"{g_o / g_a:.2f}x", _verdict(g_o / g_a <= 0.5))
        if g_a and g_o
        else ("e2e peak memory <= 0.5x the authors' shape", "—", "not measured")
    )
    ctx = _num(_lookup(rows, benchmark="context", provider="ours", metric="max_tokens") or {"status": "x"})
    if ctx is None:  # search stopped before its answer: the longest N that fit is a lower bound
        fits = [
            _int(r["seqlen"])
            for r in rows
            if r["benchmark"] == "context"
            and r["provider"] == "ours"
            and r["metric"] == "s"
            and r["status"] == "ok"
        ]
        ctx = float(max(fits)) if fits else None
    out.append(
        ("longest ASU step (1B shape) >= 128k tokens", f"{ctx:,.0f}", _verdict(ctx >= 131072))
        if ctx
        else ("longest ASU step (1B shape) >= 128k tokens", "—", "not measured")
    )
    return out


def _verdict(ok: bool) -> str:
    return "met" if ok else "not met"


# ---------------------------------------------------------------------------------------------------- plots


def _plots(rows: list[Row], stem: Path) -> tuple[list[Path], str]:
    """Write the PNGs for one group; returns (files written, note when plotting was not possible)."""
    try:
        import matplotlib

        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except ImportError:
        return [], "matplotlib is not installed: no plots"
    written: list[Path] = []

    def save(fig, suffix: str) -> None:
        path = stem.with_name(f"{stem.name}-{suffix}.png")
        try:
            atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, bbox_inches="tight"))
        finally:
            plt.close(fig)
        written.append(path)

    for metric, suffix, ylabel in (
        ("TFLOP/s", "attention-tflops", "TFLOP/s"),
        ("GB", "attention-memory", "peak GB"),
    ):
        configs = [
            (c, rs) for c, rs in _attention_configs(rows).items() if any(r["metric"] == metric for r in rs)
        ]
        if not configs:
            continue
        ncols = min(3, len(configs))
        nrows = math.ceil(len(configs) / ncols)
        fig, axes = plt.subplots(nrows, ncols, figsize=(5.2 * ncols, 3.6 * nrows), squeeze=False)
        for ax, (cfg, cfg_rows) in zip(axes.flat, configs, strict=False):
            for p in _providers(cfg_rows, ATTN_ORDER):
                pts = sorted(
                    (_int(r["seqlen"]), _num(r))
                    for r in cfg_rows
                    if r["provider"] == p and r["metric"] == metric and _num(r) is not None
                )
                if pts:
                    ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=p)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("N (B*N fixed)")
            ax.set_ylabel(ylabel)
            ax.set_title(_config_title(cfg), fontsize=8)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        for ax in list(axes.flat)[len(configs) :]:
            ax.axis("off")
        save(fig, suffix)

    vocab = [
        r for r in rows if r["benchmark"] in ("linear_kl", "linear_ce") and r["metric"] == "GB" and _num(r)
    ]
    if vocab:
        keys = sorted({(r["benchmark"], r["vocab"]) for r in vocab})
        fig, axes = plt.subplots(1, len(keys), figsize=(5 * len(keys), 3.6), squeeze=False)
        for ax, (bench, v) in zip(axes.flat, keys, strict=True):
            sel = [r for r in vocab if r["benchmark"] == bench and r["vocab"] == v]
            for p in _providers(sel, ("ours", "liger", "eager")):
                pts = sorted((_int(r["tokens"]), _num(r)) for r in sel if r["provider"] == p)
                ax.plot([x for x, _ in pts], [y for _, y in pts], marker="o", label=p)
            ax.set_xscale("log", base=2)
            ax.set_xlabel("M (tokens)")
            ax.set_ylabel("peak GB")
            ax.set_title(f"{bench}, V={v}", fontsize=9)
            ax.grid(alpha=0.3)
            ax.legend(fontsize=7)
        save(fig, "vocab-memory")

    for model, e2e in _e2e_groups(rows).items():
        get = lambda p, m, e2e=e2e: _num(_lookup(e2e, provider=p, metric=m) or {"status": "x"})  # noqa: E731
        if not (get("authors", "s") and get("ours", "s")):
            continue
        fig, axes = plt.subplots(1, 2, figsize=(8, 3.2))
        names = [p for p in ("authors", "ours", "asu-unlearn") if get(p, "s")]
        labels = {"authors": "authors' shape", "ours": "ours", "asu-unlearn": "asu.unlearn()"}
        colors = {"authors": "#999999", "ours": "#2a7ab9", "asu-unlearn": "#7ab92a"}
        for ax, metric, label in ((axes[0], "s", "epoch seconds"), (axes[1], "GB", "peak GB")):
            vals = [get(p, metric) or 0.0 for p in names]
            ax.bar([labels[p] for p in names], vals, color=[colors[p] for p in names])
            ax.set_ylabel(label)
        speed = get("authors", "s") / get("ours", "s")
        fig.suptitle(f"One ASU epoch, {model}: {speed:.2f}x speed-up", fontsize=10)
        save(fig, f"e2e-{slug(model)}")
    return written, ""


# --------------------------------------------------------------------------------------------------- output


def _versions(rows: list[Row]) -> str:
    combos = sorted({(r["torch"], r["triton"], r["transformers"]) for r in rows})
    return "; ".join(f"torch {t}, triton {tr}, transformers {tf}" for t, tr, tf in combos)


def render_group(device: str, day: str, rows: list[Row], out_dir: Path) -> Path:
    """Write ``<out_dir>/<device>-<day>.md`` (and its PNGs) for one group; returns the markdown path."""
    stem = Path(out_dir) / f"{slug(device)}-{day}"
    pngs, plot_note = _plots(rows, stem)
    files = sorted({r["_file"] for r in rows if r.get("_file")})
    lines = [
        f"# Benchmarks on {device}, {day}",
        "",
        f"Card: **{device}**. Versions: {_versions(rows)}. Source CSV: {', '.join(f'`{f}`' for f in files)}.",
        "Medians of repeated timed runs (20th/80th percentiles in the CSV); peak memory in GB (1e9 bytes).",
        "`OOM` = out of memory, `n/a` = provider not available here (see the list at the end).",
        "",
    ]
    if is_gpu(device):
        lines += ["## Targets", ""] + _table(["target", "measured", "verdict"], targets(rows)) + [""]
    else:
        lines += [
            "CPU run: kernel timings here exercise the code paths (PyTorch reference path, or the Triton",
            "interpreter) and say nothing about GPU performance; the end-to-end epoch compares whole",
            "pipelines on the same CPU and is meaningful as a ratio.",
            "",
        ]
    sections = (
        ("## Attention throughput", attention_section(rows, "TFLOP/s") + compile_section(rows)),
        ("## Attention time", attention_section(rows, "ms")),
        ("## Attention peak memory", attention_section(rows, "GB")),
        ("## Vocabulary losses", vocab_section(rows)),
        ("## Attention-map KL", attention_kl_section(rows)),
        ("## End to end", e2e_section(rows)),
        ("## Longest context", context_section(rows)),
    )
    for title, body in sections:
        if body:
            lines += [title, "", *body]
    if pngs or plot_note:
        lines += ["## Plots", ""]
        lines += [f"![{p.stem}]({p.name})" for p in pngs] + ([plot_note] if plot_note else []) + [""]
    lines += problems_section(rows)
    path = stem.with_suffix(".md")
    atomic_write_text(path, "\n".join(lines).rstrip() + "\n")
    return path


def readme_summary(device: str, day: str, rows: list[Row], md_path: Path, readme: Path) -> str:
    """The README performance section for one group: headline attention, KL, e2e, context and targets."""
    try:
        link = os.path.relpath(md_path, readme.parent)
    except ValueError:
        link = str(md_path)
    lines = [
        "",
        f"Measured on **{device}** ({day}; {_versions(rows)}); full report: [{md_path.name}]({link}).",
        "",
    ]
    if not is_gpu(device):
        lines += [
            "No GPU measurements yet; the numbers below come from a CPU run and only show the code runs.",
            "",
        ]
    head = [
        r
        for r in rows
        if r["benchmark"] == "attention" and r["causal"] == "true" and r["head_dim"] == "128"
        and r["heads_q"] == "32" and r["heads_kv"] == "8" and r["temperature"] in ("1", "1.0")
        and r["mode"] in ("fwd", "fwd+bwd")
    ]  # fmt: skip
    if not head:  # CPU grid: take whatever attention rows exist
        head = [r for r in rows if r["benchmark"] == "attention" and r["mode"] in ("fwd", "fwd+bwd")]
    lines += attention_section(head, "TFLOP/s")
    lines += vocab_section([r for r in rows if r["benchmark"] == "linear_kl"])
    for model, e2e in _e2e_groups(rows).items():
        summary = e2e_summary(e2e)
        if summary:
            lines += [f"End to end (one ASU epoch, {model}): {summary}", ""]
    ctx = context_section(rows)
    if ctx:
        lines += ctx
    if is_gpu(device):
        lines += ["Targets:", ""] + _table(["target", "measured", "verdict"], targets(rows)) + [""]
    return "\n".join(lines)


def refresh_readme(readme: Path, section: str, markers: tuple[str, str] = (START, END)) -> bool:
    """Replace the text between ``markers`` (by default the perf markers) of ``readme``; False (untouched)
    without both markers (:func:`asu.files.replace_section`)."""
    return replace_section(readme, section, markers)


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m benchmarks.report", description=__doc__.splitlines()[0])
    p.add_argument("--results", type=Path, default=RESULTS, help="directory holding the results CSVs")
    p.add_argument(
        "--out", type=Path, default=None, help="where the markdown and PNGs go (default: --results)"
    )
    p.add_argument("--readme", type=Path, default=README, help="README whose perf section is refreshed")
    p.add_argument("--no-readme", action="store_true", help="do not touch any README")
    args = p.parse_args(argv)
    if not args.results.is_dir():
        p.error(f"--results {args.results} is not a directory")
    rows = load_rows(args.results)
    if not rows:
        print(f"report: no results CSV in {args.results}", file=sys.stderr)
        return 1
    out_dir = args.out or args.results
    written = []
    for (device, day), group in group_rows(rows).items():
        path = render_group(device, day, group, out_dir)
        written.append((device, day, group, path))
        print(f"report: wrote {path}")
    if not args.no_readme:
        gpu = [w for w in written if is_gpu(w[0])]
        device, day, group, path = (gpu or written)[-1]
        if refresh_readme(args.readme, readme_summary(device, day, group, path, args.readme)):
            print(f"report: refreshed the performance section of {args.readme}")
        else:
            print(f"report: {args.readme} has no {START} ... {END} markers; left untouched")
    return 0


if __name__ == "__main__":
    sys.exit(main())
