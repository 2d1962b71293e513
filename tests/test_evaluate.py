"""TOFU-style metrics: hand-built cases with known values, the stored TOFU statistics, and `asu eval`."""

from __future__ import annotations

import copy
import json
import math
from types import SimpleNamespace

import numpy as np
import pytest
import torch

from asu.data import load_rows
from asu.demo.tiny import TinyModelConfig, build_model, train_tokenizer
from asu.demo.world import WorldConfig, generate_world, write_splits
from asu.evaluate import (
    answer_scores,
    extraction_strength,
    forget_quality,
    generate_answers,
    harmonic_mean,
    has_repeat,
    load_reference_stats,
    rouge_l_recall,
    stats_values,
    token_entropy,
    truth_ratio,
    validate_stats,
)
from asu.formatting import encode_answer, encode_prompt, encode_qa


@pytest.fixture(scope="module")
def tiny_world():
    return generate_world(WorldConfig(n_authors=10, n_cities=6, n_countries=5, n_perturbed=3, seed=0))


@pytest.fixture(scope="module")
def tokenizer(tiny_world):
    return train_tokenizer(tiny_world.texts(), vocab_size=400)


@pytest.fixture(scope="module")
def random_model(tokenizer):
    cfg = TinyModelConfig(
        hidden_size=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, intermediate_size=64
    )
    return build_model(cfg, tokenizer, seed=0).eval()


def test_rouge():
    assert (
        rouge_l_recall("The Silent Harbor was written in 1961.", "The Silent Harbor was written in 1961.")
        == 1
    )
    assert rouge_l_recall("alpha beta gamma delta", "zeta eta") == 0
    # LCS "alpha gamma" of a 4-word reference: recall 1/2, whatever the prediction's length.
    assert rouge_l_recall("alpha beta gamma delta", "alpha x y gamma z z z z") == pytest.approx(0.5)


def test_pure_metrics():
    assert truth_ratio(1.0, [1.0, 1.0]) == pytest.approx(1.0)
    assert truth_ratio(0.5, [2.0, 3.0]) == pytest.approx(math.exp(0.5 - 2.5))
    assert extraction_strength([True, True, True, True]) == 1.0
    assert extraction_strength([False, True, True, True]) == pytest.approx(0.75)
    assert extraction_strength([True, False, True, True]) == pytest.approx(0.5)
    assert extraction_strength([True, True, True, False]) == 0.0
    assert token_entropy([1, 2, 3, 4]) == pytest.approx(1.0)
    assert token_entropy([7, 7, 7, 7]) == 0.0
    assert token_entropy([1, 1, 2, 2]) == pytest.approx(math.log(2) / math.log(4))
    assert has_repeat([5, 5, 5, 5]) and not has_repeat(list(range(12)))
    assert has_repeat([1, 2, 3, 9, 1, 2, 3]) and not has_repeat([1, 2, 3] + list(range(10, 17)) + [1, 2, 3])
    assert harmonic_mean([0.5, 1.0]) == pytest.approx(2 / 3) and harmonic_mean([0.0, 1.0]) == 0.0
    assert forget_quality([0.1, 0.5, 0.9], [0.1, 0.5, 0.9])["pvalue"] == pytest.approx(1.0)
    assert forget_quality(np.linspace(0, 1, 50), np.linspace(2, 3, 50))["pvalue"] < 1e-10
    with pytest.raises(ValueError, match="finite"):
        forget_quality([float("nan")], [1.0])


def test_forget_quality_of_stored_tofu_statistics(shared_dir):
    """Llama-2-7B fine-tuned on all of TOFU vs the retain90 oracle: the legacy forget quality."""
    full = load_reference_stats(shared_dir / "data/tofu/llama2-7b_full_forget10_stats.json")
    oracle = load_reference_stats(shared_dir / "data/tofu/llama2-7b_retain90_forget10_stats.json")
    fq = forget_quality(stats_values(full), stats_values(oracle))
    assert fq["pvalue"] == pytest.approx(1.834e-21, rel=1e-3)
    assert len(stats_values(full)) == 300


class _Bigram(torch.nn.Module):
    """A model whose next-token logits depend only on the current token: ``logits = table[input_ids]``."""

    def __init__(self, table: torch.Tensor):
        super().__init__()
        self.table = torch.nn.Parameter(table)

    def forward(self, input_ids, attention_mask=None):
        return SimpleNamespace(logits=self.table[input_ids])


def _bigram_loss(table: torch.Tensor, ids: list[int], n_prompt: int) -> float:
    logp = torch.log_softmax(table.double(), -1)
    return float(-np.mean([logp[ids[t - 1], ids[t]].item() for t in range(n_prompt, len(ids))]))


def test_answer_scores_known_values_and_truth_ratio(tokenizer, tiny_world):
    """Hand-built bigram model that prefers the paraphrase: losses match the table, truth ratio < 1."""
    row = tiny_world.split("retain")[0]
    v = len(tokenizer)
    g = torch.Generator().manual_seed(0)
    table = torch.randn(v, v, generator=g) * 0.1
    prompt = encode_prompt(tokenizer, row["question"])
    para = prompt + encode_answer(tokenizer, row["paraphrased_answer"])
    for a, b in zip(para[len(prompt) - 1 : -1], para[len(prompt) :], strict=True):
        table[a, b] += 6.0  # every paraphrase transition is likely
    model = _Bigram(table)
    answers = [row["paraphrased_answer"], *row["perturbed_answer"]]
    scores = answer_scores(model, tokenizer, [row["question"]] * len(answers), answers, batch_size=2)
    for s, a in zip(scores, answers, strict=True):
        ids = prompt + encode_answer(tokenizer, a)
        assert s["n_tokens"] == len(ids) - len(prompt)
        assert s["avg_loss"] == pytest.approx(_bigram_loss(table, ids, len(prompt)), rel=1e-5)
    tr = truth_ratio(scores[0]["avg_loss"], [s["avg_loss"] for s in scores[1:]])
    assert tr < 0.5


def test_answer_scores_match_hf_loss(random_model, tokenizer, tiny_world):
    rows = tiny_world.split("forget")[:5]
    scores = answer_scores(
        random_model, tokenizer, [r["question"] for r in rows], [r["answer"] for r in rows], 3
    )
    for r, s in zip(rows, scores, strict=True):
        enc = encode_qa(tokenizer, r["question"], r["answer"])
        with torch.no_grad():
            ref = random_model(
                input_ids=torch.tensor([enc["input_ids"]]), labels=torch.tensor([enc["labels"]])
            ).loss.item()
        assert s["avg_loss"] == pytest.approx(ref, rel=1e-4)


def test_batched_left_padded_generation_matches_one_by_one(random_model, tokenizer, tiny_world):
    qs = [r["question"] for r in tiny_world.rows[:: len(tiny_world.rows) // 5]]
    batched = generate_answers(random_model, tokenizer, qs, batch_size=len(qs), max_new_tokens=8)
    single = [generate_answers(random_model, tokenizer, [q], batch_size=1, max_new_tokens=8)[0] for q in qs]
    assert [b["ids"] for b in batched] == [s["ids"] for s in single]
    assert len({len(encode_prompt(tokenizer, q)) for q in qs}) > 1  # the batch really was padded


def test_bad_inputs(tmp_path):
    with pytest.raises(ValueError, match="no such file"):
        load_rows(tmp_path / "missing.jsonl")
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(ValueError, match="empty"):
        load_rows(tmp_path / "empty.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"question": "q", "answer": "a"}\n{"question": \n')
    with pytest.raises(ValueError, match="line 2: malformed"):
        load_rows(tmp_path / "bad.jsonl")
    with pytest.raises(ValueError, match="truth_ratio"):
        validate_stats({"avg_gt_loss": {"0": 1.0}})
    with pytest.raises(ValueError, match="not a finite number"):
        validate_stats({"truth_ratio": {"0": "x"}})
    with pytest.raises(ValueError, match="2 reference truth ratios but 3"):
        validate_stats({"truth_ratio": {"0": 1.0, "1": 2.0}}, n_items=3)


def test_asu_eval_end_to_end(tmp_path, random_model, tokenizer, tiny_world, capsys):
    from asu.commands import main

    model_dir = tmp_path / "model"
    random_model.save_pretrained(model_dir)
    tokenizer.save_pretrained(model_dir)
    data = write_splits(tiny_world, tmp_path / "data")
    out = tmp_path / "eval"
    common = ["--model", str(model_dir), "--data", str(data["forget"]), "--retain", str(data["retain"])]
    common += ["--general", str(data["general"]), "--max-new-tokens", "6", "--no-progress"]
    assert main(["eval", *common, "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    for key in ("forget_rouge", "forget_prob", "forget_truth_ratio", "forget_extraction_strength",
                "forget_exact_memorization", "forget_token_entropy", "forget_well_formed", "forget_no_repeat",
                "retain_rouge", "general_prob", "model_utility"):  # fmt: skip
        assert key in summary and math.isfinite(summary[key]), key
    stats = json.loads((out / "stats.json").read_text())
    n_forget = len(tiny_world.split("forget"))
    assert set(stats) == {"truth_ratio", "avg_gt_loss", "rougeL_recall"}
    assert all(len(v) == n_forget for v in stats.values())
    rouge = json.loads((out / "forget_rouge.json").read_text())
    assert len(rouge["value_by_index"]) == n_forget and "generation" in rouge["value_by_index"]["0"]

    # The model against its own statistics: identical truth ratios, forget quality 1.
    out2 = tmp_path / "eval2"
    ref = ["--reference", str(out / "stats.json")]
    assert main(["eval", *common, *ref, "--temperature", "1,5", "--layers", "0-1", "--out", str(out2)]) == 0
    assert json.loads((out2 / "forget_quality.json").read_text())["agg_value"] == pytest.approx(1.0)
    preview = json.loads((out2 / "tau_preview.json").read_text())
    assert [p["temperature"] for p in preview] == [1.0, 5.0]
    assert preview[0]["summary"]["forget_prob"] == pytest.approx(summary["forget_prob"], rel=1e-5)

    # Bad input: one-line errors and a non-zero exit.
    assert (
        main(["eval", "--model", str(tmp_path / "nope"), "--data", str(data["forget"]), "--out", str(out)])
        == 1
    )
    assert "model directory not found" in capsys.readouterr().err
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "Who?"}\n')
    assert main(["eval", "--model", str(model_dir), "--data", str(bad), "--out", str(out)]) == 1
    assert "'answer'" in capsys.readouterr().err
    wrong = tmp_path / "wrong_stats.json"
    wrong.write_text(json.dumps({"truth_ratio": {"0": 1.0}}))
    assert main(["eval", *common, "--reference", str(wrong), "--out", str(out)]) == 1
    assert "reference truth ratios" in capsys.readouterr().err


def test_missing_fields_skip_metric_with_warning(random_model, tokenizer, tiny_world):
    from asu.evaluate import evaluate_model

    rows = [{"question": r["question"], "answer": r["answer"]} for r in tiny_world.split("forget")[:3]]
    with pytest.warns(UserWarning, match="perturbed_answer"):
        res = evaluate_model(random_model, tokenizer, rows, max_new_tokens=4)
    assert "forget_truth_ratio" not in res["summary"] and "forget_rouge" in res["summary"]


def test_tau_preview(random_model, tokenizer, tiny_world):
    """τ = 1 reproduces the plain evaluation; a higher τ changes the model's answer probabilities."""
    pytest.importorskip("asu.smoothing")
    from asu.evaluate import evaluate_model, evaluate_smoothed

    rows = tiny_world.split("forget")[:3]
    model = copy.deepcopy(random_model)
    with torch.no_grad():  # sharpen the random model's attention so that smoothing has a visible effect
        for name, p in model.named_parameters():
            if "q_proj" in name or "k_proj" in name:
                p.mul_(30.0)
    plain = evaluate_model(model, tokenizer, rows, max_new_tokens=4)["summary"]
    preview = evaluate_smoothed(model, tokenizer, rows, [1.0, 5.0], max_new_tokens=4)
    assert [p["temperature"] for p in preview] == [1.0, 5.0]
    assert preview[0]["summary"]["forget_prob"] == pytest.approx(plain["forget_prob"], rel=1e-5)
    assert preview[1]["summary"]["forget_prob"] != pytest.approx(plain["forget_prob"], rel=1e-3)
    # Smoothing is undone on exit.
    assert evaluate_model(model, tokenizer, rows, max_new_tokens=4)["summary"] == plain
    with pytest.raises(ValueError, match="temperature"):
        evaluate_smoothed(model, tokenizer, rows, [0.0])
