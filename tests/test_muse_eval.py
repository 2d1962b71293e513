"""MUSE's raw-text evaluation (`asu eval --benchmark muse`) on a constructed model with known answers: a
bigram table that has memorised some documents and one KnowMem answer, and has never seen the holdout."""

from __future__ import annotations

import json

import pytest
import torch
from helpers import BigramModel

from asu.evaluate import evaluate_muse, write_results
from asu.metrics.scoring import encode_document, encode_knowmem, split_document

FORGET_DOCS = [
    {"text": "the author was born in a city of rivers and wrote books about dragons"},
    {"text": "her mother worked as baker"},
]
HOLDOUT_DOCS = [{"text": "his father did write poetry"}, {"text": "what prize won silver moon award"}]


@pytest.fixture(scope="module")
def memorised(tok):
    """Has memorised both forget documents (each word's successor, then EOS) and 'Answer: sailor', and finds
    every step of the holdout documents unlikely (BOS to their first word included)."""
    v = len(tok)
    table = torch.zeros(v, v)
    for text in [d["text"] for d in FORGET_DOCS] + ["Answer: sailor"]:
        ids = tok(text, add_special_tokens=False)["input_ids"]
        for a, b in zip(ids, ids[1:] + [tok.eos_token_id], strict=True):
            table[a, b] = 10.0
    for d in HOLDOUT_DOCS:
        ids = tok(d["text"])["input_ids"]
        for a, b in zip(ids, ids[1:], strict=False):
            table[a, b] = -10.0
    return BigramModel(table)


def test_split_and_encode_documents(tok):
    doc = FORGET_DOCS[0]["text"]
    ex = split_document(tok, doc, prefix_tokens=3, continuation_tokens=4)
    ids = tok(doc)["input_ids"]  # BOS + 14 words
    assert ex["prompt_ids"] == ids[:4] and ex["input_ids"] == ids[:8]
    assert ex["labels"] == [-100] * 4 + ids[4:8]
    with pytest.raises(ValueError, match="VerbMem needs more than its 20-token prefix"):
        split_document(tok, doc, prefix_tokens=20, continuation_tokens=4)
    # MUSE's own excerpts (prompt + gt, joined by a space), as open-unlearning's CompletionDataset does.
    e = encode_document(tok, "the author was", "born in a city", max_tokens=2048, insert_space=True)
    assert e["prompt_ids"] == tok("the author was")["input_ids"]
    assert e["input_ids"] == tok("the author was born in a city")["input_ids"]
    assert e["labels"] == [-100] * 4 + e["input_ids"][4:]
    # A whole document for MIA: every token but the first (BOS) is a label, cut at max_tokens.
    whole = encode_document(tok, "", doc, max_tokens=5)
    assert whole["input_ids"] == ids[:6] and whole["labels"] == [-100] + ids[1:6]
    k = encode_knowmem(
        tok, "who is the father ?", "the sailor", [("where was the author born ?", "in a city")]
    )
    assert tok.decode(k["prompt_ids"], skip_special_tokens=True).endswith("who is the father ? Answer:")
    assert k["input_ids"][-1] == tok.eos_token_id and k["labels"][-3:] == k["input_ids"][-3:]


def test_muse_metrics_on_a_memorising_model(memorised, tok):
    knowmem = [
        {"question": "who is the father ?", "answer": "sailor"},
        {"question": "who ?", "answer": "teacher"},
    ]
    res = evaluate_muse(
        memorised,
        tok,
        FORGET_DOCS,
        knowmem_forget_rows=knowmem,
        knowmem_retain_rows=knowmem[:1],
        knowmem_forget_examples=[{"question": "where ?", "answer": "in a city"}],
        holdout_documents=HOLDOUT_DOCS,
        verbmem_prefix_tokens=2,
        batch_size=2,
    )
    logs = res["logs"]
    # VerbMem: both continuations reproduced word for word.
    assert logs["forget_verbmem_ROUGE"]["agg_value"] == pytest.approx(1.0)
    assert res["generations"]["verbmem"][1] == "worked as baker"  # after the 2-token prefix
    assert logs["extraction_strength"]["agg_value"] == 1.0 and logs["exact_memorization"]["agg_value"] == 1.0
    # KnowMem: "sailor" is known (F1 1), "teacher" is not (the model answers "sailor": F1 0).
    assert [v["rougeL_f1"] for v in logs["forget_knowmem_ROUGE"]["value_by_index"].values()] == [1.0, 0.0]
    assert (
        logs["forget_knowmem_ROUGE"]["agg_value"] == 0.5 and logs["retain_knowmem_ROUGE"]["agg_value"] == 1.0
    )
    # Every forget document is far likelier than every holdout one: AUC 1 for every attack, privleak -100.
    for name in ("mia_loss", "mia_zlib", "mia_min_k", "mia_min_k_plus_plus"):
        assert logs[name]["auc"] == 1.0, name
    assert logs["privleak"]["agg_value"] == pytest.approx(-100.0, abs=1e-6)
    assert set(res["headline"]) >= {
        "forget_verbmem_ROUGE",
        "forget_knowmem_ROUGE",
        "retain_knowmem_ROUGE",
        "privleak",
    }


def test_muse_reference_and_files(memorised, tok, tmp_path):
    res = evaluate_muse(memorised, tok, FORGET_DOCS, holdout_documents=HOLDOUT_DOCS, verbmem_prefix_tokens=2)
    write_results(res, tmp_path)
    logs = json.loads((tmp_path / "MUSE_EVAL.json").read_text())
    assert {"forget_verbmem_ROUGE", "mia_min_k", "privleak", "extraction_strength"} <= set(logs)
    assert json.loads((tmp_path / "MUSE_SUMMARY.json").read_text())["forget_verbmem_ROUGE"] == 1.0
    # Against a reference that recognises the forget set just as well: privleak 0.
    again = evaluate_muse(
        memorised,
        tok,
        FORGET_DOCS,
        holdout_documents=HOLDOUT_DOCS,
        reference_stats=logs,
        verbmem_prefix_tokens=2,
    )
    assert again["logs"]["privleak"]["agg_value"] == pytest.approx(0.0, abs=1e-6)
    with pytest.raises(ValueError, match="nothing to evaluate"):
        evaluate_muse(memorised, tok)
    with pytest.raises(ValueError, match="'text' .* or 'prompt' and 'gt'"):
        evaluate_muse(memorised, tok, verbmem_rows=[{"question": "q", "answer": "a"}])


def test_asu_eval_muse_command(memorised, tok, tmp_path, capsys):
    """The command on a saved (random) model: it runs and writes MUSE's files."""
    from helpers import tiny_model

    from asu.commands import main

    model_dir = tmp_path / "model"
    tiny_model(vocab_size=len(tok)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    docs, hold, qa = tmp_path / "docs.jsonl", tmp_path / "hold.jsonl", tmp_path / "qa.jsonl"
    docs.write_text("".join(json.dumps(d) + "\n" for d in FORGET_DOCS))
    hold.write_text("".join(json.dumps(d) + "\n" for d in HOLDOUT_DOCS))
    qa.write_text(json.dumps({"question": "who is the father ?", "answer": "the sailor"}) + "\n")
    argv = [
        "eval",
        "--benchmark",
        "muse",
        "--model",
        str(model_dir),
        "--data",
        str(docs),
        "--holdout",
        str(hold),
    ]
    argv += [
        "--knowmem-forget",
        str(qa),
        "--verbmem-prefix-tokens",
        "2",
        "--out",
        str(tmp_path / "out"),
        "--no-progress",
    ]
    assert main(argv) == 0
    assert "| forget_verbmem_ROUGE |" in capsys.readouterr().out
    summary = json.loads((tmp_path / "out" / "MUSE_SUMMARY.json").read_text())
    assert {"forget_verbmem_ROUGE", "forget_knowmem_ROUGE", "privleak"} <= set(summary)
    assert main([*argv[:-3], "--max-new-tokens", "5", "--out", str(tmp_path / "o2")]) == 2
    assert "MUSE uses its own lengths" in capsys.readouterr().err
