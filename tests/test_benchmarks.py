"""The benchmark suite in CPU mode: the runner writes the CSV, the report writes markdown and plots, the
README refresh touches only its marked section, and the timing/memory/OOM helpers behave.

One tiny CPU run of ``python -m benchmarks.run`` (attention, vocabulary losses and the end-to-end epoch) is
shared by the tests of this module. ``ours`` runs the package's PyTorch path here
(``ASU_KERNELS_BACKEND=reference``): the kernels themselves are tested in their own files, and the Triton
interpreter would only make the timing loop slow.
"""

from __future__ import annotations

import csv
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is a source-tree package, not part of the installed distribution
    sys.path.insert(0, str(ROOT))

from benchmarks import report  # noqa: E402
from benchmarks.bench_attention import AttentionShape  # noqa: E402
from benchmarks.common import (  # noqa: E402
    COLUMNS,
    Recorder,
    Stats,
    Unavailable,
    is_oom,
    quantile_stats,
    read_csv,
    write_csv_atomic,
)


@pytest.fixture(scope="module")
def cpu_run(tmp_path_factory) -> tuple[Path, list[dict[str, str]]]:
    out = tmp_path_factory.mktemp("bench")
    env = {**os.environ, "ASU_KERNELS_BACKEND": "reference", "OMP_NUM_THREADS": "1"}
    env["PYTHONPATH"] = str(ROOT) + os.pathsep + env.get("PYTHONPATH", "")
    cmd = [sys.executable, "-m", "benchmarks.run", "--only", "attention,kl,e2e", "--device", "cpu"]
    cmd += ["--tiny", "--threads", "1", "--quiet", "--out", str(out)]
    proc = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-3000:]
    csvs = list(out.glob("bench-*.csv"))
    assert len(csvs) == 1, f"expected one CSV, got {csvs}"
    return out, read_csv(csvs[0])


def _ok(rows, **match):
    return [r for r in rows if r["status"] == "ok" and all(r[k] == v for k, v in match.items())]


def test_runner_writes_csv_with_every_cpu_provider(cpu_run):
    out, rows = cpu_run
    with open(next(out.glob("bench-*.csv")), newline="") as f:
        assert tuple(next(csv.reader(f))) == COLUMNS
    assert not [r for r in rows if r["status"] == "error"], [
        r["note"] for r in rows if r["status"] == "error"
    ]
    for r in rows:
        assert r["device"].startswith("CPU") and r["torch"] == torch.__version__ and r["date"].endswith("Z")
    # Attention: every provider that exists on CPU has time, throughput and memory rows for both modes.
    for provider in ("eager", "sdpa-flash", "ours"):
        for mode in ("fwd", "fwd+bwd"):
            got = {r["metric"] for r in _ok(rows, benchmark="attention", provider=provider, mode=mode)}
            assert {"ms", "TFLOP/s", "GB"} <= got, (provider, mode, got)
            ms = _ok(rows, benchmark="attention", provider=provider, mode=mode, metric="ms")[0]
            assert 0 < float(ms["p20"]) <= float(ms["median"]) <= float(ms["p80"])
    # Backends that do not exist on CPU are recorded as skipped, with the reason.
    for provider in ("sdpa-efficient", "sdpa-cudnn"):
        skipped = [r for r in rows if r["provider"] == provider]
        assert skipped and all(r["status"] == "skip" and r["note"] for r in skipped)
    for bench in ("linear_kl", "linear_ce"):
        for provider in ("eager", "ours"):
            assert {r["metric"] for r in _ok(rows, benchmark=bench, provider=provider)} == {"ms", "GB"}
        assert [r["status"] for r in rows if r["benchmark"] == bench and r["provider"] == "liger"] == ["skip"]


def test_e2e_pipelines_agree_on_the_loss(cpu_run):
    _, rows = cpu_run
    authors = {r["metric"]: float(r["median"]) for r in _ok(rows, benchmark="e2e", provider="authors")}
    assert {"s", "tokens/s", "GB", "loss_first", "loss_last"} <= set(authors)
    ours_rows = [r for r in rows if r["benchmark"] == "e2e" and r["provider"] == "ours"]
    if ours_rows and ours_rows[0]["status"] == "skip":
        pytest.skip(f"asu layer not importable: {ours_rows[0]['note']}")
    ours = {r["metric"]: float(r["median"]) for r in _ok(rows, benchmark="e2e", provider="ours")}
    # Same objective, same data, same initialisation: the first step's loss is the same number.
    assert abs(ours["loss_first"] - authors["loss_first"]) < 1e-3
    assert abs(ours["loss_last"] - authors["loss_last"]) < 1e-3
    assert ours["tokens/s"] > 0 and authors["tokens/s"] > 0
    trainer = {r["metric"]: r for r in rows if r["benchmark"] == "e2e" and r["provider"] == "asu-unlearn"}
    assert trainer and all(r["status"] in ("ok", "skip") for r in trainer.values())
    if trainer.get("s", {}).get("status") == "ok":
        assert {"s", "tokens/s", "GB"} <= set(trainer) and float(trainer["s"]["median"]) > 0


def test_report_writes_markdown_and_plots(cpu_run, tmp_path):
    out, _ = cpu_run
    readme = tmp_path / "README.md"
    readme.write_text(f"# x\n\n{report.START}\nold\n{report.END}\n\ntail\n")
    assert report.main(["--results", str(out), "--out", str(tmp_path), "--readme", str(readme)]) == 0
    mds = list(tmp_path.glob("cpu-*.md"))
    assert len(mds) == 1
    text = mds[0].read_text()
    for heading in (
        "## Attention throughput",
        "## Vocabulary losses",
        "## End to end",
        "torch " + torch.__version__,
    ):
        assert heading in text
    # Providers that ran on CPU have numbers; the backends that do not exist here show as n/a.
    assert "| N | B | ours | sdpa-flash | sdpa-cudnn | sdpa-efficient | eager |" in text
    assert "| n/a | n/a |" in text
    pngs = list(tmp_path.glob("cpu-*.png"))
    assert any(p.name.endswith("attention-tflops.png") for p in pngs)
    assert all(p.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n" for p in pngs)
    body = readme.read_text()
    assert (
        "old" not in body
        and body.startswith("# x\n\n" + report.START)
        and body.endswith(report.END + "\n\ntail\n")
    )
    assert mds[0].name in body


def test_readme_refresh_replaces_only_the_marked_section(tmp_path):
    readme = tmp_path / "README.md"
    before, after = "# Title\n\nIntro.\n\n## Performance\n", "\n## Next\n\nMore text.\n"
    readme.write_text(before + report.START + "\nstale numbers\n" + report.END + after)
    assert report.refresh_readme(readme, "fresh numbers")
    text = readme.read_text()
    assert text == before + report.START + "\nfresh numbers\n\n" + report.END + after
    assert report.refresh_readme(readme, "fresh numbers") and readme.read_text() == text  # idempotent
    plain = tmp_path / "PLAIN.md"
    plain.write_text("no markers here\n")
    assert not report.refresh_readme(plain, "x")
    assert plain.read_text() == "no markers here\n"
    assert not report.refresh_readme(tmp_path / "missing.md", "x")


def _row(**kw) -> dict[str, str]:
    base = dict.fromkeys(COLUMNS, "")
    base.update(device="NVIDIA H100 80GB HBM3", torch="2.11", triton="3.6.0", transformers="5.17")
    base.update(date="2026-11-28T06:00:00Z", status="ok", dtype="bfloat16", causal="true", head_dim="128")
    base.update(heads_q="32", heads_kv="8", temperature="1")
    base.update({k: str(v) for k, v in kw.items()})
    return base


def test_targets_from_gpu_rows(tmp_path):
    rows = []
    for n, ours, flash in ((2048, 300.0, 280.0), (4096, 350.0, 360.0)):
        for provider, value in (("ours", ours), ("sdpa-flash", flash), ("eager", 40.0)):
            rows.append(
                _row(
                    benchmark="attention",
                    provider=provider,
                    mode="fwd",
                    seqlen=n,
                    metric="TFLOP/s",
                    median=value,
                )
            )
    attn = dict(benchmark="attention", mode="fwd+bwd", seqlen=16384)
    rows.append(_row(**attn, provider="eager", metric="ms", status="oom"))
    rows.append(_row(**attn, provider="ours", metric="TFLOP/s", median=250))
    kl = dict(benchmark="linear_kl", mode="fwd+bwd", tokens=8192, vocab=128256)
    for provider, gb, ms in (("ours", 5.0, 30.0), ("eager", 60.0, 40.0)):
        rows.append(_row(**kl, provider=provider, metric="GB", median=gb))
        rows.append(_row(**kl, provider=provider, metric="ms", median=ms))
    verdicts = {name: (measured, verdict) for name, measured, verdict in report.targets(rows)}
    fwd_flash = verdicts["attention fwd, causal, d=128, N>=2k: ours >= 1x sdpa-flash"]
    assert fwd_flash == ("worst 0.97x (N=4096)", "not met")
    assert verdicts["attention fwd, causal, d=128, N>=2k: ours >= 5x eager"][1] == "met"
    assert verdicts["attention fwd+bwd, causal, d=128, N>=2k: ours >= 5x eager"][1] == "met"  # eager OOM
    assert verdicts["KL M=8192 V=128256: memory <= 10% of eager"] == ("8.3%", "met")
    assert verdicts["KL M=8192 V=128256: time <= liger"][1] == "not measured"
    assert verdicts["e2e epoch >= 4x faster than the authors' shape"][1] == "not measured"
    # The markdown of a GPU group carries the targets table and names the card and versions.
    write_csv_atomic(tmp_path / "bench-h100.csv", rows)
    assert report.main(["--results", str(tmp_path), "--no-readme"]) == 0
    text = (tmp_path / "nvidia-h100-80gb-hbm3-2026-11-28.md").read_text()
    assert "## Targets" in text and "NVIDIA H100 80GB HBM3" in text and "triton 3.6.0" in text
    assert "OOM" in text


def test_quantiles_and_rates():
    xs = [float(x) for x in range(1, 11)]
    s = quantile_stats(xs)
    expected = torch.quantile(torch.tensor(xs, dtype=torch.float64), torch.tensor([0.5, 0.2, 0.8]).double())
    assert (s.median, s.p20, s.p80) == pytest.approx(expected.tolist())
    rate = Stats(2.0, 1.0, 4.0).inverse(8.0)  # 8 units of work: the slow (p80) time is the low (p20) rate
    assert (rate.median, rate.p20, rate.p80) == (4.0, 2.0, 8.0)
    with pytest.raises(ValueError, match="at least one sample"):
        quantile_stats([])


def test_attention_flop_convention():
    shape = AttentionShape(2, 8, 2, 1024, 64, False, 1.0, torch.bfloat16)
    assert shape.flops("fwd") == 4 * 2 * 8 * 1024**2 * 64
    causal = AttentionShape(2, 8, 2, 1024, 64, True, 1.0, torch.bfloat16)
    assert causal.flops("fwd") == shape.flops("fwd") / 2
    assert causal.flops("bwd") == 2.5 * causal.flops("fwd") and causal.flops("fwd+bwd") == 3.5 * causal.flops(
        "fwd"
    )


def test_recorder_turns_failures_into_rows(tmp_path):
    rec = Recorder(tmp_path / "r.csv", "cpu", verbose=False)
    base = {"benchmark": "attention", "provider": "x", "mode": "fwd"}

    def oom():
        raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB")

    def missing():
        raise Unavailable("flash-attn is not installed")

    def broken():
        raise RuntimeError("index out of range")

    assert not rec.guarded(base, oom)
    assert not rec.guarded(base, missing)
    assert not rec.guarded(base, broken)
    assert rec.guarded(base, lambda: rec.add(base, "ms", Stats(1.0, 0.5, 2.0)))
    rows = read_csv(tmp_path / "r.csv")
    assert [r["status"] for r in rows] == ["oom", "skip", "error", "ok"]
    assert "out of memory" in rows[0]["note"] and rows[1]["note"] == "flash-attn is not installed"
    assert rows[2]["note"].startswith("RuntimeError")
    assert [p.name for p in tmp_path.iterdir()] == ["r.csv"]  # no temp file left behind
    assert is_oom(MemoryError()) and not is_oom(RuntimeError("shape mismatch"))
    with pytest.raises(ValueError, match="unknown CSV columns"):
        rec.add({"benchmark": "a", "bogus": 1}, "ms", 1.0)
    with pytest.raises(ValueError, match="status must be one of"):
        rec.add(base, "ms", 1.0, status="fine")
    # Appending keeps what the CSV already holds.
    again = Recorder(tmp_path / "r.csv", "cpu", verbose=False, append=True)
    again.add(base, "ms", 3.0)
    assert len(read_csv(tmp_path / "r.csv")) == 5


def test_read_csv_rejects_foreign_files(tmp_path):
    bad = tmp_path / "other.csv"
    bad.write_text("a,b\n1,2\n")
    with pytest.raises(ValueError, match="not a results CSV"):
        read_csv(bad)


def test_runner_rejects_bad_arguments(capsys):
    from benchmarks import run

    with pytest.raises(SystemExit):
        run.parse_args(["--only", "attention,warp"])
    assert "unknown benchmark(s) warp" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        run.parse_args(["--device", "tpu"])
    with pytest.raises(SystemExit):
        run.parse_args(["--threads", "0"])
