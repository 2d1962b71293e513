"""The quality benchmark's arithmetic on fake runs (mean ± std, matched-forgetting interpolation, the auto-τ
promise, continual steps, the report) and the learning-rate search of matched forgetting."""

from __future__ import annotations

import json
import statistics

import pytest

from asu.demo.matching import next_matching_lr, search_lr, values_at
from benchmarks import quality_stats as qs


def _summary(forget: float, retain: float, leak: float = 0.5, **extra: float) -> dict[str, float]:
    return {"forget_rouge": forget, "retain_rouge": retain, "forget_fact_leakage_any": leak, **extra}


def _world(seed: int, asu: dict, ga: dict | None, steps: list | None = None) -> dict:
    models = {"original": _summary(0.97, 0.96, 0.95), "ASU all (auto:0.5)": asu}
    return {
        "seed": seed,
        "models": models,
        "asu": {"main": "ASU all (auto:0.5)", "variants": {"all layers": "ASU all (auto:0.5)"}},
        "matched": {"GA+GD": {"runs": [], "at_target": {"values": ga} if ga else None}},
        "tau": {"ASU all (auto:0.5)": {"target": 0.48, "temperature": 3.5, "reached": True}},
        "continual": {"ASU": steps or []},
    }


def test_mean_and_sample_std():
    got = qs.mean_std([0.5, 0.7, None, float("nan"), 0.6])
    assert got["mean"] == pytest.approx(0.6) and got["std"] == pytest.approx(
        statistics.stdev([0.5, 0.7, 0.6])
    )
    assert got["n"] == 3 and got["min"] == 0.5 and got["max"] == 0.7
    assert qs.mean_std([0.4])["std"] == 0.0 and qs.mean_std([None]) is None
    assert qs.fmt(got) == "0.600 ± 0.100" and qs.fmt(got, n_of=4) == "0.600 ± 0.100 (n=3)"
    assert qs.fmt(None) == "–"


def test_values_at_interpolates_every_metric_between_the_runs_either_side():
    runs = {
        "far": _summary(0.80, 0.95, 0.70),
        "less": _summary(0.54, 0.86, 0.40),  # forgets less than the target 0.50 (0.04 above)
        "more": _summary(0.42, 0.80, 0.20),  # forgets more (0.08 below: within the bracket of 0.1)
    }
    got = values_at(runs, 0.50)
    w = (0.50 - 0.42) / (0.54 - 0.42)
    assert got["runs"] == ["less", "more"]
    assert got["values"]["retain_rouge"] == pytest.approx(0.80 + w * 0.06)
    assert got["values"]["forget_fact_leakage_any"] == pytest.approx(0.20 + w * 0.20)
    assert got["values"]["forget_rouge"] == pytest.approx(0.50)
    # One side only: the closest run within 0.05, else nothing.
    one = values_at({k: runs[k] for k in ("far", "less")}, 0.50)
    assert one["runs"] == ["less"] and one["values"]["retain_rouge"] == 0.86
    assert values_at({"far": runs["far"]}, 0.50) is None
    # Runs beyond the bracket are not interpolated between.
    assert values_at({"far": runs["far"], "low": _summary(0.1, 0.3)}, 0.50) is None


def test_search_lr_bisects_until_matched():
    calls = []

    def run(lr):  # forgetting grows with lr: forget ROUGE-L = 1 - 500 lr
        calls.append(lr)
        return {"forget_rouge": 1 - 500 * lr}

    runs = search_lr(run, 0.5, (5e-4, 2e-3), steps=6)
    assert calls[:2] == [5e-4, 2e-3] and calls[2] == pytest.approx(1e-3)  # geometric mean of the bracket
    assert any(abs(r["forget_rouge"] - 0.5) <= 0.01 for r in runs.values())
    # Already matched by the grid: no bisection at all.
    calls.clear()
    search_lr(run, 0.75, (5e-4, 2e-3), steps=6)
    assert calls == [5e-4]
    assert next_matching_lr({1e-3: 0.8, 4e-3: 0.1}, 0.5) == pytest.approx(2e-3)


def test_aggregate_paired_and_promise_on_fake_worlds():
    steps = [
        {"step": 1, "temperature": 3.0, "tau_target": 0.5,
         "evaluation": {"request": _summary(0.52, 0.9), "pending": _summary(0.9, 0.9)}},
        {"step": 2, "temperature": 4.0, "tau_target": 0.45,
         "evaluation": {"request": _summary(0.60, 0.85), "forgotten": _summary(0.55, 0.85)}},
    ]  # fmt: skip
    worlds = [
        _world(0, _summary(0.50, 0.86, 0.50), _summary(0.50, 0.82, 0.20), steps),
        _world(1, _summary(0.55, 0.84, 0.60), _summary(0.55, 0.86, 0.30), steps),
        _world(2, _summary(0.52, 0.88, 0.55), None),
    ]
    table = qs.aggregate(worlds)
    assert list(table) == ["original", "oracle (retain only)", "ASU: all layers", "GA+GD @ matched"]
    assert table["ASU: all layers"]["retain_rouge"]["mean"] == pytest.approx(0.86)
    assert table["GA+GD @ matched"]["worlds"] == 2 and table["oracle (retain only)"]["worlds"] == 0
    diff = qs.paired(worlds, "ASU: all layers", "GA+GD @ matched")
    assert (
        diff["retain_rouge"]["values"] == pytest.approx([0.04, -0.02]) and diff["retain_rouge"]["higher"] == 1
    )
    assert diff["forget_fact_leakage_any"]["diff"]["mean"] == pytest.approx(0.30)
    assert qs.holds_everywhere(diff, "forget_fact_leakage_any", +1, 0.2)
    assert not qs.holds_everywhere(diff, "retain_rouge", +1)

    promise = qs.tau_promise(worlds, tolerance=0.05)
    # 3 single runs (after - 0.48: 0.02, 0.07, 0.04), 2 steps in each of the 2 worlds with a continual run
    # (after - target: 0.02, 0.15).
    assert promise["n"] == 3 + 2 * 2 and promise["met"] == 2 + 2 and promise["close"] == 2 + 2
    assert promise["error"]["mean"] == pytest.approx((0.02 + 0.07 + 0.04 + 2 * (0.02 + 0.15)) / 7)

    per_step = qs.continual_steps(worlds, "ASU")
    assert [r["step"] for r in per_step] == [1, 2]
    # at step 1 everything forgotten so far is the request (the same rule as asu.continual's own table)
    assert per_step[0]["forgotten.forget_rouge"] == per_step[0]["request.forget_rouge"]
    assert per_step[1]["forgotten.forget_rouge"]["n"] == 2
    assert per_step[0]["pending.forget_rouge"]["mean"] == pytest.approx(0.9)
    text = qs.main_table(table, 3) + qs.paired_table({"ASU − GA+GD": diff}) + qs.continual_table(per_step)
    assert "0.860 ± 0.020" in text and "(n=2)" in text and "(1/2 > 0)" in text
    assert "degenerate answers" in text and "request degenerate" in text
    json.dumps(table)  # everything is JSON-able


def test_the_methods_figure_is_the_tradeoff_with_each_worlds_runs():
    from benchmarks.quality_plots import runs_behind, tradeoff_points

    worlds = [
        _world(0, _summary(0.50, 0.86, forget_degenerate_answers=0.0), _summary(0.50, 0.82)),
        _world(1, _summary(0.54, 0.84, forget_degenerate_answers=0.5), _summary(0.55, 0.86)),
    ]
    worlds[0]["models"]["GA+GD lr=0.001"] = _summary(0.3, 0.7)
    worlds[0]["matched"]["GA+GD"]["runs"] = ["GA+GD lr=0.001"]
    table = qs.aggregate(worlds)
    points = {p.group: p for p in tradeoff_points(table, "ASU: all layers")}
    assert list(points) == ["original", "ASU: all layers", "GA+GD @ matched"]  # no oracle in these worlds
    asu = points["ASU: all layers"]
    assert asu.kind == "main" and asu.forget == pytest.approx(0.52) and asu.retain == pytest.approx(0.85)
    assert asu.forget_err == pytest.approx(statistics.stdev([0.50, 0.54])) and asu.degenerate == 0.25
    assert points["original"].kind == "original" and points["GA+GD @ matched"].degenerate is None
    behind = runs_behind(worlds, table)
    assert behind["ASU: all layers"] == [(0.50, 0.86), (0.54, 0.84)] and behind["GA+GD @ matched"] == [
        (0.3, 0.7)
    ]


def test_quality_settings_and_world_file_refuses_other_settings(tmp_path):
    from benchmarks.quality import WorldRun, settings_for

    full, quick = settings_for("full"), settings_for("quick")
    assert full.variants[0] == quick.variants[0] and len(quick.continual) == 1 and quick.sweep == ()
    with pytest.raises(ValueError, match="quick or full"):
        settings_for("slow")
    run = WorldRun(0, quick, tmp_path, None, progress=False)
    assert run.record["done"] == [] and len(run.exp.forget) == 5 * 13
    run.record["done"] = ["layers"]
    run.path.parent.mkdir(parents=True)
    run.path.write_text(json.dumps(run.record))
    assert WorldRun(0, quick, tmp_path, None, progress=False).record["done"] == ["layers"]  # resumed
    with pytest.raises(ValueError, match="other settings"):
        WorldRun(0, full, tmp_path, None, progress=False)


def test_readme_section_states_only_what_holds_in_every_world(tmp_path):
    from benchmarks.quality import README_MARKERS, aggregate, readme_section, settings_for
    from benchmarks.report import refresh_readme

    s = settings_for("quick")
    worlds = [
        _world(0, _summary(0.50, 0.86, 0.50), _summary(0.50, 0.82, 0.20)),
        _world(1, _summary(0.55, 0.84, 0.60), _summary(0.55, 0.86, 0.30)),
    ]
    for w in worlds:  # the benchmark's own row names
        w["asu"] = {"main": "ASU all (auto:0.5)", "variants": {"all layers": "ASU all (auto:0.5)"}}
    results = {
        "environment": {"machine": "test machine", "torch": "t", "transformers": "x", "date": "2026-01-01"},
        "timing": {"wall_s": 600.0},
        "aggregate": aggregate(worlds, s),
    }
    readme = tmp_path / "README.md"
    readme.write_text(f"intro\n{README_MARKERS[0]}\nold numbers\n{README_MARKERS[1]}\nrest\n")
    section = readme_section(results, s, tmp_path / "q" / "results.md", readme)
    # Fact leakage is higher in both worlds (+0.30, +0.30): stated; retain (+0.04, -0.02) differs: not stated.
    assert "ASU: all layers − GA+GD @ matched: fact leak (any) higher in every world (+0.300" in section
    assert "retain ROUGE-L higher" not in section and "retain ROUGE-L lower" not in section
    assert "(q/results.md)" in section and "test machine" in section
    assert refresh_readme(readme, section, README_MARKERS)
    text = readme.read_text()
    assert "old numbers" not in text and text.startswith("intro\n") and text.endswith("rest\n")


def test_a_tie_is_not_a_sign():
    from benchmarks.quality import _consistent_differences

    def comparison(values):
        return {"diff": qs.mean_std(values), "values": values, "higher": sum(v > 0 for v in values)}

    agg = {"paired": {"A − B": {"retain_rouge": comparison([0.0001, 0.05, 0.02]),
                                "model_utility": comparison([-0.01, -0.02, -0.03])}}}  # fmt: skip
    assert _consistent_differences(agg) == ["* A − B: model utility lower in every world (-0.020 ± 0.010)"]


def _attacked(prob: float, r: float, recovered: float, q: float, prefix_gain: float) -> dict[str, float]:
    """The columns asu.attacks.columns gives an attacked model (the ones the tables and verdicts read)."""
    return {
        "before_forget_Q_A_Prob": prob,
        "relearn_R": r,
        "relearn_split_recovered": recovered,
        "quant_nf4_Q": q,
        "prefix_forget_Q_A_Prob": prob + prefix_gain,
        "robustness": 2 * r * q / (r + q),
    }


def test_robustness_tables_and_verdicts(tmp_path):
    from benchmarks.quality import ROBUSTNESS_MARKERS, aggregate, robustness_readme_section, settings_for
    from benchmarks.report import refresh_readme

    s = settings_for("quick")
    worlds = []
    for seed, (r, rec) in enumerate([(0.2, 0.7), (0.9, 0.6)]):
        w = _world(seed, {**_summary(0.5, 0.86), **_attacked(0.6, r, rec, 0.95, 0.0)},
                   {**_summary(0.5, 0.8), **_attacked(0.5, 0.3, 0.1, 0.7, 0.2)})  # fmt: skip
        w["models"]["original"].update(_attacked(0.96, 1.0, 0.0, 1.0, 0.0))
        worlds.append(w)
    agg = aggregate(worlds, s)
    rob = agg["robustness"]
    assert list(rob["prob"]) == ["original", "ASU: all layers", "GA+GD @ matched"]
    assert rob["prob"]["ASU: all layers"]["relearn_R"]["mean"] == pytest.approx(0.55)
    asu, ga = rob["verdicts"]["ASU: all layers"], rob["verdicts"]["GA+GD @ matched"]
    assert "original" not in rob["verdicts"]  # nothing was forgotten: no verdict
    assert asu["relearning (R)"]["verdict"] == "mixed" and ga["relearning (R)"]["verdict"] == "fails"
    assert asu["relearning half, the other half (recovered)"]["verdict"] == "fails"
    assert ga["relearning half, the other half (recovered)"]["verdict"] == "survives"
    assert (
        asu["NF4 quantization (Q)"]["verdict"] == "survives"
        and ga["NF4 quantization (Q)"]["verdict"] == "fails"
    )
    assert asu["prefilled answer (Prob gain)"]["verdict"] == "survives"
    assert ga["prefilled answer (Prob gain)"]["verdict"] == "fails"
    results = {
        "environment": {"machine": "test machine", "torch": "t", "transformers": "x", "date": "2026-01-01"},
        "timing": {"wall_s": 600.0},
        "aggregate": agg,
    }
    readme = tmp_path / "README.md"
    readme.write_text(f"a\n{ROBUSTNESS_MARKERS[0]}\nold\n{ROBUSTNESS_MARKERS[1]}\nb\n")
    section = robustness_readme_section(results, s, tmp_path / "results.md", readme)
    assert (
        "* ASU: all layers: survives NF4 quantization (Q), prefilled answer (Prob gain); fails relearning "
        in section
    )
    assert (
        "| ASU: all layers | mixed (0.55 ± 0.49) | fails (0.65 ± 0.07) | survives (0.95 ± 0.00) |" in section
    )
    assert refresh_readme(readme, section, ROBUSTNESS_MARKERS) and "old" not in readme.read_text()
    json.dumps(agg)


def test_the_prefix_caveat_only_when_the_opener_hurts_the_original():
    from benchmarks.quality import _prefix_caveat

    hurt = {"before_forget_Q_A_Prob": qs.mean_std([0.96]), "prefix_forget_Q_A_Prob": qs.mean_std([0.41])}
    assert "0.960 ± 0.000 → 0.410 ± 0.000" in _prefix_caveat(hurt) and "foreign" in _prefix_caveat(hurt)
    fine = {"before_forget_Q_A_Prob": qs.mean_std([0.96]), "prefix_forget_Q_A_Prob": qs.mean_std([0.93])}
    assert _prefix_caveat(fine) == "" and _prefix_caveat({}) == ""


def test_undo_differences_and_readme(tmp_path):
    from benchmarks.quality_undo import PLAIN, UndoSettings, aggregate, readme_section

    s = UndoSettings(undo=((0.25, 0.1),))
    undo = UndoSettings.label(0.25, 0.1)
    worlds = []
    for seed, (mu, q) in enumerate([(0.70, 1.0), (0.72, 1.0)]):
        models = {
            PLAIN: {**_summary(0.5, 0.86), "model_utility": 0.78, "relearn_R": 0.2, "quant_nf4_Q": 1.0},
            undo: {
                **_summary(0.55, 0.85),
                "model_utility": mu,
                "relearn_R": 0.25 + seed * 0.1,
                "quant_nf4_Q": q,
            },
        }
        worlds.append({"seed": seed, "models": models})
    agg = aggregate(worlds, s)
    results = {"aggregate": agg, "environment": {"machine": "m", "date": "2026-01-01"}}
    text = readme_section(results, s, tmp_path / "r.md", tmp_path / "README.md")
    assert f"* {undo} − ASU: model utility lower in every world (-0.070 ± 0.014, n=2)" in text
    assert f"* {undo} − ASU: relearn R higher in every world (+0.100 ± 0.071, n=2)" in text
    assert f"* {undo} − ASU: NF4 Q no difference (within 0.005 in every world)" in text
    assert "| original |" not in text and f"| {undo} |" in text


def test_plots_only_redraws_the_plots_and_nothing_else(tmp_path):
    pytest.importorskip("matplotlib")
    from benchmarks.quality import aggregate, main, settings_for

    worlds = [_world(k, _summary(0.5, 0.86), _summary(0.5, 0.82)) for k in (0, 1)]
    (tmp_path / "worlds").mkdir()
    for w in worlds:
        (tmp_path / "worlds" / f"seed-{w['seed']}.json").write_text(json.dumps(w))
    results = json.dumps({"aggregate": aggregate(worlds, settings_for("quick"))})
    (tmp_path / "results.json").write_text(results)
    assert main(["--quick", "--plots-only", "--seeds", "0,1", "--out", str(tmp_path)]) == 0
    assert (tmp_path / "methods.png").read_bytes()[:4] == b"\x89PNG"
    assert (tmp_path / "results.json").read_text() == results and not (tmp_path / "results.md").exists()
    assert main(["--quick", "--plots-only", "--seeds", "0,2", "--out", str(tmp_path)]) == 2  # no seed-2.json
