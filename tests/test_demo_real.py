"""``asu demo --real`` without the real model: its claims checked on constructed evaluations, and its flow
(split, τ preview, unlearning, before/after, demo-real.json) on the tiny test model standing in for
SmolLM2 (the real run is ``make demo-real``)."""

from __future__ import annotations

import json

import pytest
from helpers import tiny_model

import asu.demo.real as real
from asu.demo.real_facts import PARTS, UNRELATED_KIND


def _evaluation(fact: dict[str, float], empty: float = 0.0, n: int = 4) -> dict:
    out = {p: {"fact": fact[p], "empty": empty, "degenerate": empty, "unanswered": empty, "answers": [{}] * n}
           for p in PARTS}  # fmt: skip
    out["ppl"] = 10.0
    return out


def test_claims_are_read_off_the_numbers():
    before = _evaluation({"forget": 1.0, "neighbours": 1.0, "retain": 1.0, "unrelated": 1.0})
    good = _evaluation({"forget": 0.25, "neighbours": 0.75, "retain": 1.0, "unrelated": 0.75})
    assert [c["holds"] for c in real.claims(before, good)] == [True, True, True]
    collapsed = _evaluation({"forget": 0.0, "neighbours": 0.0, "retain": 1.0, "unrelated": 0.5}, empty=0.5)
    assert [c["holds"] for c in real.claims(before, collapsed)] == [True, False, False]
    unchanged = real.claims(before, before)
    assert not unchanged[0]["holds"] and "100% -> 100%" in unchanged[0]["numbers"]


def _rows(kind: str, n: int) -> list[dict]:
    return [{"kind": kind, "question": f"who is the author {i} ?", "answer": "the author wrote books .",
             "facts": ["books"], "stated": True} for i in range(n)]  # fmt: skip


@pytest.mark.usefixtures("one_thread")
def test_the_demo_flow_on_a_stand_in_model(tok, tmp_path, monkeypatch, capsys):
    import asu.gguf_models
    import asu.models

    rows = _rows("capital", 4) + _rows("author", 2) + _rows("language", 2) + _rows(UNRELATED_KIND, 2)
    monkeypatch.setattr(real, "stated_facts", lambda *a, **k: {"kept": rows, "dropped": []})
    monkeypatch.setattr(asu.gguf_models, "resolve_model", lambda model, cache=None: "stand-in")
    monkeypatch.setattr(asu.models, "load_tokenizer", lambda path: tok)
    monkeypatch.setattr(asu.models, "load_model", lambda path: tiny_model(vocab_size=len(tok)))
    monkeypatch.setattr("asu.demo.real_facts.GENERAL_TEXT", ["the author wrote books ."])
    record = real.run_real_demo(
        str(tmp_path), progress=False, epochs=1, lr=1e-3, preview_tokens=4, match=None
    )
    saved = json.loads((tmp_path / "demo-real.json").read_text())
    assert saved["claims"] == record["claims"] and len(saved["claims"]) == 3
    assert len(saved["split"]["forget"]) == 3 and saved["tau"]["eos"] == "keep"
    out = capsys.readouterr().out
    assert "before:" in out and "after:" in out and out.count("claim ") == 3
    assert saved["stopped_at_epoch"] is None  # no match: every epoch runs
    # Stopping at matched forgetting: the stand-in never states the fact, so the first epoch is enough.
    record = real.run_real_demo(str(tmp_path / "matched"), progress=False, epochs=3, lr=1e-3,
                                preview_tokens=4, layers="auto", match=0.0)  # fmt: skip
    assert record["stopped_at_epoch"] == 1
    assert "reached after epoch 1, training stopped" in capsys.readouterr().out


def test_an_announced_answer_that_never_comes_is_unanswered():
    from asu.demo.real_facts import unanswered

    assert unanswered({"empty": False, "answer": "The answer to this question is: "})
    assert unanswered({"empty": True, "answer": ""})
    assert not unanswered({"empty": False, "answer": "The capital of France is Paris."})
    assert not unanswered({"empty": False, "answer": "Note: it is Paris."})
