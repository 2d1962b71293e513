"""The real-model benchmark's pipeline on the tiny test model (the real model is the benchmark's own run):
facts kept only when stated, splits by kind, every method run on a split, the report and the README block
generated from the split files."""

from __future__ import annotations

import json
from types import SimpleNamespace

import pytest
from helpers import tiny_model

from asu.demo.real_facts import TRAINED_KINDS, UNRELATED_KIND, make_splits
from benchmarks import real_model as rm

pytestmark = pytest.mark.usefixtures("one_thread")


def _rows(kind: str, n: int) -> list[dict]:
    return [{"kind": kind, "question": f"who is the author {i} ?", "answer": "the author wrote books .",
             "facts": ["books"], "stated": True} for i in range(n)]  # fmt: skip


def test_splits_forget_one_kind_and_keep_the_others():
    rows = _rows("capital", 5) + _rows("author", 2) + _rows("language", 4) + _rows(UNRELATED_KIND, 3)
    splits = make_splits(rows, n_forget=3, n_retain=2)
    assert [s["kind"] for s in splits] == ["capital", "language"]  # author has too few facts
    for s in splits:
        assert len(s["forget"]) == 3 and all(r["kind"] == s["kind"] for r in s["neighbours"])
        assert not {id(r) for r in s["forget"]} & {id(r) for r in s["neighbours"]}
        assert all(r["kind"] not in (s["kind"], UNRELATED_KIND) for r in s["retain"])
        assert len(s["unrelated"]) == 3
    assert set(TRAINED_KINDS) == {"capital", "author", "language"}


def test_a_split_runs_every_method_and_reports(tok, tmp_path, monkeypatch):
    split = {"kind": "author", "forget": _rows("author", 2), "neighbours": _rows("author", 1),
             "retain": _rows("language", 2), "unrelated": _rows(UNRELATED_KIND, 1)}  # fmt: skip
    args = SimpleNamespace(lam=1.0, lr=1e-3, epochs=2, batch_size=2, seed=0, preview_tokens=4, match=0.0,
                           preview_steps=2, methods=list(rm.METHODS), model="tiny", readme=None,
                           relearn_steps=2, relearn_lr=1e-3)  # fmt: skip
    monkeypatch.setattr("asu.demo.real_facts.GENERAL_TEXT", ["the author wrote books about rivers ."])
    with pytest.warns(Warning):
        result = rm.run_split(tiny_model(vocab_size=len(tok)), tok, None, split, args)
    assert set(result["runs"]) == set(rm.METHODS) and set(result["tau_choices"]) == {"asu", "asu-renorm"}
    for name, run in result["runs"].items():
        assert "skipped" in run or (run["steps"] >= 1 and run["eval"]["ppl"] > 0), name
        if "skipped" not in run:  # the tiny model never states "books": matched (0 ≤ 0) after the first epoch
            assert run["reached_epoch"] == 1 and run["trajectory"] == [{"epoch": 1.0, "forget_fact": 0.0}]
            assert set(run["attacks"]) >= {"nf4", "relearn", "relearn_half", "relearn_half_before"}
    assert result["original_attacks"]["nf4"] == 0.0
    env = {"machine": "test", "date": "today", "torch": "x", "transformers": "y", "torch_threads": 1}
    result.update(environment=env, settings={"n_forget": 2, "lr": 1e-3, "epochs": 2, "batch_size": 2,
                                             "lam": 1.0, "match": 0.0, "relearn_steps": 2,
                                             "relearn_lr": 1e-3})  # fmt: skip
    (tmp_path / "split-0.json").write_text(json.dumps(result))
    (tmp_path / "facts.json").write_text(
        json.dumps({"model_folder": "m", "facts": {}, "splits": [], "seconds": 1})
    )
    readme = tmp_path / "README.md"
    readme.write_text(f"x\n{rm.README_MARKERS[0]}\nold\n{rm.README_MARKERS[1]}\n")
    assert rm.report_stage(SimpleNamespace(readme=str(readme)), tmp_path) == 0
    text = readme.read_text()
    assert "old" not in text and "| asu |" in text and "| ga+gd |" in text and "| original |" in text
    agg = json.loads((tmp_path / "results.json").read_text())["aggregate"]
    assert agg["original"]["forget.fact"][2] == 1 and "seconds_per_step" in agg["asu"]
    assert agg["asu"]["reached"] == [1, 0.0, 1] and agg["asu"]["epochs"][0] == 1.0
    assert "attack.relearn_half" in agg["asu"] and "attack.nf4" in agg["original"]
    assert "| epochs to match |" in text and "relearn half → other half" in text


def test_the_ranking_names_a_baseline_that_beats_every_asu_variant():
    def row(forget, unanswered, neighbours, retain=1.0, unrelated=1.0):
        cells = {"forget.fact": forget, "forget.unanswered": unanswered, "neighbours.fact": neighbours,
                 "retain.fact": retain, "unrelated.fact": unrelated}  # fmt: skip
        return {k: [v, 0.0, 3] for k, v in cells.items()}

    agg = {"original": row(1.0, 0.0, 1.0), "asu": row(0.0, 0.5, 0.5), "npo": row(0.25, 0.0, 0.75)}
    scores = rm.net_scores(agg)
    # asu: forgot 1 - 0 - 0.5 (unanswered is not forgotten) = 0.5, harm 0.5; npo: 0.75 - 0.25
    assert scores == {"asu": 0.0, "npo": 0.5} and rm.best_asu(agg) == "asu"
    assert "the baselines `npo` did better than every ASU variant" in rm._ranking_line(agg, "asu")
    agg["npo"] = row(1.0, 0.0, 1.0)
    assert "no baseline did better" in rm._ranking_line(agg, "asu")
    assert rm._split_names([{"kind": "capital", "seed": 0}, {"kind": "capital", "seed": 1}]).endswith(
        "capital/0, capital/1"
    )


def test_wins_over_the_default_are_counted_split_by_split():
    def split(asu_forget, npo_forget):
        def ev(forget):
            answers = [{"empty": False, "answer": "x"}]
            return {"forget": {"fact": forget, "answers": answers}, "neighbours": {"fact": 1.0},
                    "retain": {"fact": 1.0}, "unrelated": {"fact": 1.0}}  # fmt: skip

        return {
            "original": ev(1.0),
            "runs": {"asu": {"eval": ev(asu_forget)}, "npo": {"eval": ev(npo_forget)}},
        }

    splits = [split(0.0, 0.5), split(0.5, 0.0), split(0.5, 0.0), split(0.25, 0.25)]
    assert rm.wins_over_default(splits) == {"npo": [2, 1, 1]}
