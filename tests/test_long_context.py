"""The scaling benchmarks' machinery: isolated processes (memory cap, timeout), the CPU attention sweep,
and the long-context step, whose two pipelines must compute the same objective for the comparison to mean
anything.

The sweeps themselves are long (``benchmarks/results/`` holds their output); these tests run them at tiny
sizes or on hand-made rows.
"""

from __future__ import annotations

import dataclasses
import os
import sys
from pathlib import Path

import pytest
import torch

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:  # benchmarks/ is a source-tree package, not part of the installed distribution
    sys.path.insert(0, str(ROOT))

from benchmarks import bench_cpu_attention, long_context, scaling  # noqa: E402
from benchmarks.common import Recorder, read_csv  # noqa: E402
from benchmarks.isolated import run_isolated  # noqa: E402

ENV = {**os.environ, "PYTHONPATH": str(ROOT) + os.pathsep + os.environ.get("PYTHONPATH", "")}


def test_isolated_runs_are_capped_and_timed_out():
    spec = {"provider": "reference", "n": 4096, "repeats": 1}
    capped = run_isolated("benchmarks.cpu_attention_point", spec, timeout_s=120, rss_cap_gb=0.05, env=ENV)
    assert capped.status == "oom" and "cap" in capped.note
    late = run_isolated("benchmarks.cpu_attention_point", spec, timeout_s=0.2, rss_cap_gb=50, env=ENV)
    assert late.status == "timeout"


def test_cpu_attention_sweep_writes_rows_markdown_and_readme(tmp_path, monkeypatch):
    out = tmp_path / "cpu-attention-x"
    monkeypatch.setenv("PYTHONPATH", ENV["PYTHONPATH"])  # the children run benchmarks/ from the source tree
    threads = torch.get_num_threads()
    try:
        bench_cpu_attention.run(out, [64], ["ours", "reference"], cap_gb=8.0, timeout_s=300)
    finally:
        torch.set_num_threads(threads)
    rows = read_csv(out / "results.csv")
    for provider in ("ours", "reference"):
        for n in (64,):
            assert scaling.value(rows, provider, n, "s") > 0
            assert scaling.value(rows, provider, n, "GB") > 0.05  # a whole process: torch alone is more
    assert all(r["device"].startswith("CPU") and "1 torch threads" in r["device"] for r in rows)
    text = (out / "results.md").read_text()
    assert "| 64 |" in text and "load average" in text
    readme = tmp_path / "README.md"
    readme.write_text("a\n<!-- cpu-attention:start -->\nold\n<!-- cpu-attention:end -->\nb\n")
    section = bench_cpu_attention.readme_section(rows, out / "results.md", readme)
    assert "| 64 |" in section and " s / " in section
    assert bench_cpu_attention.refresh(out, readme) == 0
    new = readme.read_text()
    assert "old" not in new and new.startswith("a\n") and new.endswith("b\n") and section in new


def _tiny_documents(tokenizer, n: int) -> long_context.Documents:
    return long_context.documents("small-llama", tokenizer, n)


@pytest.mark.usefixtures("one_thread")
def test_both_pipelines_compute_the_same_step_loss(monkeypatch):
    """One muse-books step: ours (asu.unlearn, cache teacher, fused KL) and the authors' shape (teacher copy,
    full logits) give the same loss when the cache keeps fp32 hidden states."""
    monkeypatch.setenv("ASU_KERNELS_BACKEND", "cpu")
    import asu.attention  # noqa: F401
    from asu.demo.tiny import seeded_llama
    from benchmarks.bench_e2e import word_tokenizer

    shape = dict(long_context.SMALL_LLAMA, vocab_size=300, hidden_size=64, intermediate_size=96, head_dim=16)
    tokenizer = word_tokenizer(shape["vocab_size"])
    docs = _tiny_documents(tokenizer, 40)
    losses = {}
    for pipeline in ("ours", "ours-ckpt", "authors", "authors-eager"):
        cfg = long_context.unlearn_config(40, "cpu", long_context.checkpointed(pipeline, "cpu"))
        cfg = dataclasses.replace(cfg, cache_dtype="float32")
        attn = long_context.attention_of(pipeline)
        model = seeded_llama(3, **shape, attn_implementation=attn, use_cache=False).train()
        with torch.no_grad():  # sharper attention and logits than at init: smoothing must move the teacher
            for layer in model.model.layers:
                layer.self_attn.q_proj.weight.mul_(8.0)
            model.lm_head.weight.mul_(30.0)
        losses[pipeline] = long_context.run_step(pipeline, model, tokenizer, docs, cfg, "cpu")["loss"]
    assert losses["ours"] > 1e-3, losses
    for other in ("ours-ckpt", "authors", "authors-eager"):
        assert abs(losses[other] - losses["ours"]) <= 1e-4 * losses["ours"], losses


def test_documents_have_exactly_n_tokens():
    from benchmarks.bench_e2e import word_tokenizer

    docs = _tiny_documents(word_tokenizer(500), 33)
    assert len(docs.forget_ids) == len(docs.retain_ids) == 33 and docs.forget_ids != docs.retain_ids


def test_long_context_markdown_and_readme_from_rows(tmp_path):
    out = tmp_path / "long-context-small-llama-cpu-2026-01-01"
    out.mkdir()
    rec = Recorder(out / "results.csv", "cpu", verbose=False)
    columns = long_context._columns("small-llama", "cpu")
    columns["params"] += ";cap_gb=16"
    for provider, n, seconds, gb in (
        ("ours", 2048, 10.0, 1.0),
        ("ours", 4096, 30.0, 1.5),
        ("authors", 2048, 12.0, 9.0),
    ):
        base = {**columns, "benchmark": "long_context", "provider": provider, "mode": "step", "seqlen": n}
        rec.add(base, "s", seconds)
        rec.add(base, "GB", gb)
    base = {**columns, "benchmark": "long_context", "provider": "authors", "mode": "step", "seqlen": 4096}
    rec.status_row(base, "oom", "killed at 16.1 GB resident, above the 16 GB cap", metric="s")
    rows = read_csv(out / "results.csv")
    md = long_context.write_markdown(out, rows, "load average 1.00", 16.0).read_text()
    assert "| 4,096 | 30.0 | over cap |" in md
    section = long_context.readme_section(long_context.newest_runs(tmp_path), tmp_path / "README.md")
    assert "ours 4,096 tokens, authors 2,048 tokens" in section and "within 16 GB resident" in section
    assert "authors stopped at N = 4,096 (oom" in section
    assert "10.00 s / 1.00 GB" in section


@pytest.mark.usefixtures("one_thread")
def test_search_step_runs_both_pipelines(monkeypatch):
    """The GPU search's step (forget document = the drawn ids, retain = them reversed), here on the CPU."""
    monkeypatch.setenv("ASU_KERNELS_BACKEND", "cpu")
    import asu.attention  # noqa: F401
    from asu.demo.tiny import seeded_llama
    from benchmarks.bench_e2e import word_tokenizer

    shape = dict(long_context.SMALL_LLAMA, vocab_size=200, hidden_size=32, intermediate_size=48, head_dim=16)
    ids = torch.randint(0, 200, (1, 24), generator=torch.Generator().manual_seed(0))
    for pipeline in ("ours", "authors"):
        model = seeded_llama(
            0, **shape, attn_implementation=long_context.attention_of(pipeline), use_cache=False
        )
        before = model.model.layers[0].mlp.up_proj.weight.detach().clone()
        long_context.search_step(pipeline, model, word_tokenizer(200), "cpu")(ids)
        assert not torch.equal(before, model.model.layers[0].mlp.up_proj.weight), pipeline  # one step taken


def test_a_rerun_replaces_only_the_points_it_measures_again():
    """--append with a provider at one N keeps that provider's other lengths (a rerun once dropped them)."""
    rows = [
        {"provider": p, "seqlen": str(n), "metric": "s", "median": "1.0"}
        for p in ("ours", "authors")
        for n in (2048, 4096)
    ]
    kept = scaling.keep_other_points(rows, ["authors"], [4096])
    assert [(r["provider"], r["seqlen"]) for r in kept] == [
        ("ours", "2048"),
        ("ours", "4096"),
        ("authors", "2048"),
    ]
    every_length = scaling.keep_other_points(rows, ["authors"], None)
    assert {r["provider"] for r in every_length} == {"ours"}


def test_points_added_under_another_cap_are_described_as_such():
    rows = [{"provider": "ours", "seqlen": "2048", "params": "model=m;cap_gb=16;threads=1"}]
    assert scaling.cap_phrase(rows) == " within 16 GB resident"
    rows.append({"provider": "authors", "seqlen": "4096", "params": "model=m;cap_gb=12;threads=1"})
    assert scaling.cap_phrase(rows) == " within each point's memory cap (12 to 16 GB resident)"
    assert (
        long_context._caps_text(rows, 16.0)
        == " 12 GB resident for authors at 4,096; 16 GB resident for ours at 2,048."
    )
