"""`asu eval` (TOFU) against a hand-written copy of open-unlearning's evaluation pipeline on a tiny model, the
result files in its layout, references in its layout and asu's, field checks, the template, the CLI.

The test tokenizer is word-level, so a prompt and its answer tokenise the same apart and together: the numbers
below depend on the metrics alone, not on how a template joins prompt and answer.
"""

from __future__ import annotations

import copy
import json
import math
import zlib
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from helpers import FORGET, RETAIN, BigramModel, pairwise_auc, tiny_model

from asu.evaluate import (
    TOFU_HEADLINE,
    evaluate_model,
    load_reference_stats,
    reference_from,
    summary_table,
    write_results,
)

IGNORE = -100
MAX_NEW = 8
BATCH = 2


def _qa(rows, shift=0):
    """TOFU-shaped rows from the test rows: a paraphrase and three perturbed answers of test words."""
    words = "the father was a sailor teacher baker city of rivers dragons".split()
    out = []
    for i, r in enumerate(rows):
        w = words[(i + shift) % len(words) :] + words
        out.append(
            {
                **r,
                "paraphrased_answer": r["answer"] + " .",
                "perturbed_answer": [" ".join(w[:3]), " ".join(w[2:6]), " ".join(w[4:6])],
            }
        )
    return out


@pytest.fixture(scope="module")
def sets():
    return {
        "forget": _qa(FORGET),
        "retain": _qa(RETAIN, 1),
        "ra": _qa(RETAIN[:2], 2),
        "wf": _qa(FORGET[1:4], 3),
        "holdout": _qa(RETAIN + FORGET[:2], 4),
    }


@pytest.fixture(scope="module")
def model(tok):
    return tiny_model(vocab_size=len(tok))


# ---- open-unlearning's pipeline, written out (src/data/utils.py, collators.py, evals/metrics/*.py) -------


def ou_encode(tok, question, answer, generate=False):
    """preprocess_chat_instance with a plain template (Question: ... Answer: ...), no chat template."""
    prompt = f"Question: {question}\nAnswer: "
    chat_ids = tok(prompt + answer, add_special_tokens=True)["input_ids"]
    prompt_ids = tok(prompt, add_special_tokens=True)["input_ids"]
    if chat_ids[-1] != tok.eos_token_id:
        chat_ids += [tok.eos_token_id]
    if generate:
        return {"input_ids": prompt_ids, "labels": chat_ids}
    return {"input_ids": chat_ids, "labels": [IGNORE] * len(prompt_ids) + chat_ids[len(prompt_ids) :]}


def ou_collate(tok, items, side="right"):
    def pad(seqs, value):
        seqs = [torch.tensor(s) for s in seqs]
        if side == "right":
            return torch.nn.utils.rnn.pad_sequence(seqs, batch_first=True, padding_value=value)
        flipped = [torch.flip(s, dims=[0]) for s in seqs]
        return torch.nn.utils.rnn.pad_sequence(flipped, batch_first=True, padding_value=value).flip(dims=[1])

    ids = pad([i["input_ids"] for i in items], tok.pad_token_id)
    return {
        "input_ids": ids,
        "attention_mask": ids.ne(tok.pad_token_id),
        "labels": pad([i["labels"] for i in items], IGNORE),
    }


def ou_batches(tok, pairs, side="right", generate=False):
    items = [ou_encode(tok, q, a, generate) for q, a in pairs]
    return [ou_collate(tok, items[s : s + BATCH], side) for s in range(0, len(items), BATCH)]


@torch.no_grad()
def ou_probability(model, tok, pairs):
    """evaluate_probability: [(prob, avg_loss)] per pair."""
    out = []
    for batch in ou_batches(tok, pairs):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"]
        losses = torch.nn.CrossEntropyLoss(ignore_index=IGNORE, reduction="none")(
            logits[..., :-1, :].transpose(-1, -2), labels[..., 1:]
        ).sum(-1)
        avg = losses / (labels != IGNORE).sum(-1)
        out += [(math.exp(-a), a) for a in avg.tolist()]
    return out


@torch.no_grad()
def ou_tokenwise(model, tok, pairs):
    """tokenwise_vocab_logprobs / tokenwise_logprobs: per pair (vocab log-probs (N, V), labels (N,)), the
    last labelled position (EOS) dropped."""
    out = []
    for batch in ou_batches(tok, pairs):
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        log_probs = torch.log_softmax(logits, dim=-1)[:, :-1, :]
        for i in range(len(batch["input_ids"])):
            labels = batch["labels"][i]
            idx = (labels != IGNORE).nonzero(as_tuple=True)[0][:-1]
            out.append((log_probs[i, idx[0] - 1 : idx[-1]], labels[idx]))
    return out


def ou_em_es(model, tok, pairs):
    em, es = [], []
    for lp, labels in ou_tokenwise(model, tok, pairs):
        preds = lp.argmax(-1)
        em.append(((preds == labels).sum() / len(labels)).item())
        for k in range(len(labels)):
            if torch.equal(preds[k:], labels[k:]):
                break
        es.append(1 - k / len(labels))
    return em, es


def ou_mia_scores(model, tok, pairs):
    """LOSS, zlib, min-k (k 0.4) and min-k++ (k 0.4) scores per pair."""
    loss = [a for _, a in ou_probability(model, tok, pairs)]
    zl = []
    for (_, a), (q, ans) in zip(ou_probability(model, tok, pairs), pairs, strict=True):
        enc = ou_encode(tok, q, ans)
        text = tok.decode([t for t in enc["labels"] if t != IGNORE], skip_special_tokens=True)
        zl.append(a / len(zlib.compress(text.encode("utf-8"))))
    mink, minkpp = [], []
    for lp, labels in ou_tokenwise(model, tok, pairs):
        target = lp.gather(-1, labels.unsqueeze(-1)).squeeze(-1).numpy()
        num_k = max(1, int(len(target) * 0.4))
        mink.append(-np.mean(np.sort(target)[:num_k]))
        mu = (torch.exp(lp) * lp).sum(-1)
        sigma = torch.clamp((torch.exp(lp) * torch.square(lp)).sum(-1) - torch.square(mu), min=1e-6)
        z = (target - mu.numpy()) / torch.sqrt(sigma).numpy()
        minkpp.append(-np.mean(sorted(z)[:num_k]))
    return {"mia_loss": loss, "mia_zlib": zl, "mia_min_k": mink, "mia_min_k_plus_plus": minkpp}


@torch.no_grad()
def ou_rouge(model, tok, pairs):
    """eval_text_similarity: left-padded greedy generation, ground truth = labels text minus input text."""
    from rouge_score import rouge_scorer

    scorer = rouge_scorer.RougeScorer(["rouge1", "rougeL"], use_stemmer=True)
    out = []
    for batch in ou_batches(tok, pairs, side="left", generate=True):
        dec = lambda x: tok.batch_decode(x, skip_special_tokens=True, clean_up_tokenization_spaces=True)
        inputs = dec(batch["input_ids"])
        truths = [
            f.replace(i, "").strip()
            for f, i in zip(dec([l[l != IGNORE] for l in batch["labels"]]), inputs, strict=True)
        ]
        ids, mask = batch["input_ids"], batch["attention_mask"]
        gen = model.generate(
            ids, attention_mask=mask, max_new_tokens=MAX_NEW, do_sample=False, pad_token_id=tok.eos_token_id
        )
        texts = dec(gen[:, batch["input_ids"].shape[-1] :])
        for t, g in zip(truths, texts, strict=True):
            g = g.split(tok.decode([tok.eos_token_id]))[0].strip()
            s = scorer.score(t, g)
            out.append({"rougeL_recall": s["rougeL"].recall, "rougeL_f1": s["rougeL"].fmeasure,
                        "rouge1_recall": s["rouge1"].recall, "ground_truth": t, "generation": g})  # fmt: skip
    return out


def ou_truth_ratio(correct_losses, wrong_losses, forget):
    correct = np.exp(-np.asarray(correct_losses))
    wrong = np.exp(-np.asarray([np.mean(w) for w in wrong_losses]))
    tr = wrong / (correct + 1e-10)
    agg = np.mean(np.minimum(tr, 1 / (tr + 1e-10))) if forget else np.mean(np.maximum(0, 1 - tr))
    return agg, tr


def _pairs(rows, key="answer"):
    return [(r["question"], r[key]) for r in rows]


def _pert_losses(model, tok, rows):
    out = []
    for r in rows:
        out.append(
            [a for _, a in ou_probability(model, tok, [(r["question"], p) for p in r["perturbed_answer"]])]
        )
    return out


def _vals(entry, key):
    return [entry["value_by_index"][str(i)][key] for i in range(len(entry["value_by_index"]))]


# ---- parity --------------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def result(model, tok, sets):
    return evaluate_model(
        model, tok, sets["forget"], sets["retain"], {"ra": sets["ra"], "wf": sets["wf"]},
        batch_size=BATCH, max_new_tokens=MAX_NEW, holdout_rows=sets["holdout"],
    )  # fmt: skip


def test_same_tokens_as_open_unlearning(tok, sets):
    from asu.metrics.scoring import encode_pair, encode_question

    for r in sets["forget"] + sets["retain"]:
        for a in [r["answer"], r["paraphrased_answer"], *r["perturbed_answer"]]:
            assert encode_pair(tok, r["question"], a) == ou_encode(tok, r["question"], a)
        assert (
            encode_question(tok, r["question"])
            == ou_encode(tok, r["question"], "x", generate=True)["input_ids"]
        )


def test_probabilities_truth_ratios_and_memorisation_match_open_unlearning(result, model, tok, sets):
    logs = result["logs"]
    for split in ("forget", "retain", "ra", "wf"):
        rows = sets[split]
        ref = ou_probability(model, tok, _pairs(rows))
        np.testing.assert_allclose(_vals(logs[f"{split}_Q_A_Prob"], "prob"), [p for p, _ in ref], rtol=1e-5)
        np.testing.assert_allclose(
            _vals(logs[f"{split}_Q_A_Prob"], "avg_loss"), [a for _, a in ref], rtol=1e-5
        )
        wrong = _pert_losses(model, tok, rows)
        np.testing.assert_allclose(_vals(logs[f"{split}_Q_A_PERT_Prob"], "avg_loss"), wrong, rtol=1e-5)
        assert logs[f"{split}_Q_A_PERT_Prob"]["agg_value"] == pytest.approx(
            np.mean([np.mean(np.exp(-np.asarray(w))) for w in wrong]), rel=1e-5
        )
        if split in ("forget", "retain"):
            correct = [a for _, a in ou_probability(model, tok, _pairs(rows, "paraphrased_answer"))]
            np.testing.assert_allclose(_vals(logs[f"{split}_Q_A_PARA_Prob"], "avg_loss"), correct, rtol=1e-5)
        else:
            correct = [a for _, a in ref]  # real authors / world facts: the answer is the true side
            probs = np.exp(-np.asarray(correct))
            norm = probs / (probs + np.asarray([np.exp(-np.asarray(w)).sum() for w in wrong]) + 1e-10)
            np.testing.assert_allclose(_vals(logs[f"{split}_Q_A_Prob_normalised"], "prob"), norm, rtol=1e-5)
        agg, tr = ou_truth_ratio(correct, wrong, forget=split == "forget")
        name = "forget_truth_ratio" if split == "forget" else f"{split}_Truth_Ratio"
        np.testing.assert_allclose(_vals(logs[name], "score"), tr, rtol=1e-5)
        assert logs[name]["agg_value"] == pytest.approx(agg, rel=1e-5)
    em, es = ou_em_es(model, tok, _pairs(sets["forget"]))
    np.testing.assert_allclose(_vals(logs["exact_memorization"], "score"), em, rtol=1e-6)
    np.testing.assert_allclose(_vals(logs["extraction_strength"], "score"), es, rtol=1e-6)
    # A random model gets the last answer token wrong: open-unlearning's 1/n, not 0.
    assert any(0 < v < 1 for v in es)


def test_generations_and_rouge_match_open_unlearning(result, model, tok, sets):
    for split in ("forget", "retain", "ra", "wf"):
        ref = ou_rouge(model, tok, _pairs(sets[split]))
        got = result["logs"][f"{split}_Q_A_ROUGE"]
        for i, want in enumerate(ref):
            row = got["value_by_index"][str(i)]
            assert row["generation"] == want["generation"] and row["ground_truth"] == want["ground_truth"]
            for key in ("rougeL_recall", "rougeL_f1", "rouge1_recall"):
                assert row[key] == pytest.approx(want[key])
        assert got["agg_value"] == pytest.approx(np.mean([r["rougeL_recall"] for r in ref]))
    row0 = result["logs"]["forget_Q_A_ROUGE"]["value_by_index"]["0"]
    assert set(row0) == {"rouge1_recall", "rougeL_f1", "rougeL_recall", "input", "ground_truth", "generation"}
    assert row0["ground_truth"] == "the author wrote her first novel about dragons."


def test_mia_privleak_and_model_utility_match_open_unlearning(result, model, tok, sets):
    from scipy.stats import hmean

    logs = result["logs"]
    forget = ou_mia_scores(model, tok, _pairs(sets["forget"]))
    holdout = ou_mia_scores(model, tok, _pairs(sets["holdout"]))
    for name in forget:
        np.testing.assert_allclose(_vals(logs[name]["forget"], "score"), forget[name], rtol=1e-4, atol=1e-6)
        np.testing.assert_allclose(_vals(logs[name]["holdout"], "score"), holdout[name], rtol=1e-4, atol=1e-6)
        # The AUC is the reference's (sklearn's roc_auc_score: pairs counted, a tie half) of our own scores.
        ours_f, ours_h = _vals(logs[name]["forget"], "score"), _vals(logs[name]["holdout"], "score")
        assert logs[name]["auc"] == logs[name]["agg_value"] == pytest.approx(pairwise_auc(ours_f, ours_h))
        # On the reference's scores, only a pair of scores within the tolerance above of each other can order
        # differently (float noise on a near tie): each such pair moves the AUC by at most 1 / (n_f n_h).
        f, h = forget[name], holdout[name]
        near = sum(abs(a - b) <= 1e-4 * max(abs(a), abs(b)) + 2e-6 for a in f for b in h)
        assert abs(pairwise_auc(f, h) - logs[name]["auc"]) <= near / (len(f) * len(h)) + 1e-12
    ref = 0.5  # no reference: open-unlearning's ref_value
    assert logs["privleak"]["agg_value"] == pytest.approx(
        ((1 - logs["mia_min_k"]["auc"]) - ref) / (ref + 1e-10) * 100
    )
    parts = [logs[p]["agg_value"] for p in (
        "retain_Q_A_Prob", "retain_Q_A_ROUGE", "retain_Truth_Ratio", "ra_Q_A_Prob_normalised", "ra_Q_A_ROUGE",
        "ra_Truth_Ratio", "wf_Q_A_Prob_normalised", "wf_Q_A_ROUGE", "wf_Truth_Ratio")]  # fmt: skip
    expected = 0.0 if min(parts) == 0 else hmean(parts)
    assert logs["model_utility"]["agg_value"] == pytest.approx(expected)
    assert logs["forget_quality"] == {"agg_value": None}  # no reference: open-unlearning leaves it empty
    assert not any("model_utility" in n for n in result["notes"])  # all 9 parts


def test_batched_left_padded_generation_matches_one_by_one(model, tok, sets):
    from asu.metrics.scoring import encode_question, greedy_generate

    prompts = [encode_question(tok, r["question"]) for r in sets["holdout"]]
    assert len({len(p) for p in prompts}) > 1  # the batch really is padded
    batched = greedy_generate(model, tok, prompts, batch_size=len(prompts), max_new_tokens=MAX_NEW)
    single = [greedy_generate(model, tok, [p], batch_size=1, max_new_tokens=MAX_NEW)[0] for p in prompts]
    assert batched == single and all(len(g) <= MAX_NEW for g in batched)


# ---- constructed cases -----------------------------------------------------------------------------------


def _chain(tok, table, text, end=True):
    """Make ``text``'s words follow each other (then EOS) under the bigram table."""
    ids = tok(text, add_special_tokens=False)["input_ids"]
    for a, b in zip(ids, ids[1:] + ([tok.eos_token_id] if end else []), strict=False):
        table[a, b] = 10.0


def test_truth_ratio_guard_and_eos_on_a_constructed_model(tok):
    """The paraphrase is impossible (probability exp(-1e4) = 0): TR = wrong / 1e-10, finite; the answer is
    reproduced exactly, so extraction strength is 1 and the generation stops at EOS."""
    v = len(tok)
    table = torch.zeros(v, v)
    row = {
        "question": "who is the father ?",
        "answer": "the father was a sailor .",
        "paraphrased_answer": "baker",
        "perturbed_answer": ["teacher", "city"],
    }
    _chain(tok, table, "Answer: the father was a sailor .")
    baker = tok.convert_tokens_to_ids("baker")
    table[:, baker] = -1e4
    res = evaluate_model(BigramModel(table), tok, [row], max_new_tokens=20, batch_size=1)
    logs = res["logs"]
    assert res["generations"]["forget"] == ["the father was a sailor."]
    assert logs["forget_Q_A_ROUGE"]["agg_value"] == 1.0
    assert logs["extraction_strength"]["agg_value"] == 1.0 and logs["exact_memorization"]["agg_value"] == 1.0
    wrong = np.mean(_vals(logs["forget_Q_A_PERT_Prob"], "avg_loss")[0])
    tr = logs["forget_truth_ratio"]["value_by_index"]["0"]["score"]
    assert math.isfinite(tr) and tr == pytest.approx(math.exp(-wrong) / 1e-10, rel=1e-5)
    assert logs["forget_truth_ratio"]["agg_value"] == pytest.approx(1 / (tr + 1e-10))
    assert logs["forget_Q_A_Prob"]["agg_value"] > 0.99  # EOS included: the chain ends in EOS
    assert res["extras"]["forget_no_repeat"]["agg_value"] == 1.0


def _bare(rows, drop=("paraphrased_answer", "perturbed_answer")):
    return [{k: v for k, v in r.items() if k not in drop} for r in rows]


def test_plain_rows_leave_out_what_they_cannot_compute_in_one_note(model, tok, sets):
    """Rows without paraphrases or perturbed answers: the metrics that need them are left out, each named
    with its set and fields in one note; everything else is computed."""
    no_pert = _bare(sets["ra"], ("perturbed_answer",))
    res = evaluate_model(
        model, tok, _bare(sets["forget"]), _bare(sets["retain"]), {"ra": no_pert}, max_new_tokens=2
    )
    left_out = ["forget_truth_ratio", "retain_Truth_Ratio", "ra_Truth_Ratio", "ra_Q_A_Prob_normalised"]
    assert not set(left_out) & set(res["logs"])
    assert {"forget_Q_A_Prob", "forget_Q_A_ROUGE", "retain_Q_A_ROUGE", "ra_Q_A_Prob", "model_utility"} <= set(
        res["summary"]
    )
    [note] = [n for n in res["notes"] if n.startswith("left out")]
    assert "forget_truth_ratio (forget rows: 'paraphrased_answer', 'perturbed_answer')" in note
    assert "retain_Truth_Ratio (retain rows: 'paraphrased_answer', 'perturbed_answer')" in note
    assert "ra_Truth_Ratio (ra rows: 'perturbed_answer')" in note
    assert "ra_Q_A_Prob_normalised (ra rows: 'perturbed_answer')" in note
    assert "forget_quality: not computed (it needs forget_truth_ratio)" in res["notes"]
    assert any("model_utility: harmonic mean of 3 parts" in n for n in res["notes"])
    # With the paraphrase present, only the field still missing is named.
    res = evaluate_model(model, tok, _bare(sets["forget"], ("perturbed_answer",)), max_new_tokens=2)
    assert "forget_truth_ratio (forget rows: 'perturbed_answer')" in res["notes"][0]


def test_fields_on_some_rows_or_required_are_one_error_naming_all(model, tok, sets):
    partial = copy.deepcopy(sets["forget"])
    del partial[2]["paraphrased_answer"], partial[4]["paraphrased_answer"]
    partial[3]["perturbed_answer"] = []
    with pytest.raises(ValueError) as e:
        evaluate_model(model, tok, partial, max_new_tokens=2)
    message = str(e.value)
    assert (
        "forget rows: rows 2, 4 (of 5) have no usable 'paraphrased_answer' (needed by forget_truth_ratio"
        in message
    )
    assert "forget rows: row 3 has no usable 'perturbed_answer'" in message and "\n" not in message
    no_pert = copy.deepcopy(sets["ra"])
    del no_pert[1]["perturbed_answer"]
    with pytest.raises(ValueError) as e:  # one problem per field, naming every metric that needs it
        evaluate_model(model, tok, sets["forget"], general_rows={"ra": no_pert}, max_new_tokens=2)
    assert str(e.value) == (
        "ra rows: row 1 has no usable 'perturbed_answer' (needed by ra_Truth_Ratio, ra_Q_A_Prob_normalised; "
        "add it to every row or skip the metric)"
    )
    # ... unless skipped deliberately
    res = evaluate_model(model, tok, partial, skip=["forget_truth_ratio"], max_new_tokens=2)
    assert "forget_truth_ratio" not in res["logs"] and not any(n.startswith("left out") for n in res["notes"])

    bare, no_pert = _bare(sets["forget"]), {"ra": _bare(sets["ra"], ("perturbed_answer",))}
    with pytest.raises(ValueError) as e:
        evaluate_model(model, tok, bare, _bare(sets["retain"]), no_pert, require=["all"], max_new_tokens=2)
    for metric, keys in (
        ("forget_truth_ratio", "'paraphrased_answer', 'perturbed_answer'"),
        ("retain_Truth_Ratio", "'paraphrased_answer', 'perturbed_answer'"),
        ("ra_Truth_Ratio", "'perturbed_answer'"),
        ("ra_Q_A_Prob_normalised", "'perturbed_answer'"),
    ):
        assert f"no row has {keys} (needed by {metric}, which was required)" in str(e.value)
    with pytest.raises(ValueError, match=r"\['retain_Truth_Ratio'\] required, but their sets are not given"):
        evaluate_model(model, tok, sets["forget"], require=["retain_Truth_Ratio"], max_new_tokens=2)
    with pytest.raises(ValueError, match="both skipped and required"):
        evaluate_model(model, tok, bare, skip="forget_truth_ratio", require="forget_truth_ratio")
    with pytest.raises(ValueError, match="cannot skip") as e:
        evaluate_model(model, tok, sets["forget"], skip=["forget_Q_A_ROUGE"], require=["ROUGE"])
    assert "cannot require ['ROUGE']" in str(e.value)
    with pytest.raises(ValueError, match="'answer'"):
        evaluate_model(model, tok, [{"question": "who ?"}], max_new_tokens=2)
    # Everything present: "all" is satisfied.
    res = evaluate_model(model, tok, sets["forget"], sets["retain"], require=["all"], max_new_tokens=2)
    assert {"forget_truth_ratio", "retain_Truth_Ratio"} <= set(res["logs"]) and not res["warnings"]


def test_a_model_that_answers_nothing_is_called_out(tok, sets):
    """EOS is every token's argmax: every answer stops at once. The summary says so (a warning line, the
    degenerate shares 1), the fluency metrics give it nothing, and open-unlearning's ROUGE stays its own:
    0."""
    v = len(tok)
    table = torch.zeros(v, v)
    table[:, tok.eos_token_id] = 10.0
    res = evaluate_model(
        BigramModel(table), tok, sets["forget"], sets["retain"], max_new_tokens=MAX_NEW, batch_size=BATCH,
        well_formed=lambda text: True,
    )  # fmt: skip
    assert res["generations"]["forget"] == [""] * len(sets["forget"])
    s = res["summary"]
    for split in ("forget", "retain"):
        for k in ("immediate_stop", "empty_answers", "degenerate_answers"):
            assert s[f"{split}_{k}"] == 1.0
    assert (
        s["forget_no_repeat"] == 0.0 and s["forget_token_entropy"] == 0.0 and s["forget_well_formed"] == 0.0
    )
    assert s["forget_Q_A_ROUGE"] == 0.0 == s["retain_Q_A_ROUGE"]
    n = len(sets["forget"])
    table_md = summary_table(res)
    assert f"**Warning:** forget: {n} of {n} answers (100%) are degenerate ({n} empty, {n} stop at once)" in (
        table_md
    )
    assert table_md.index("**Warning:**") < table_md.index("| metric |")
    assert (
        "| forget_degenerate_answers | 1.000 |" in table_md
        and "| forget_immediate_stop | 1.000 |" in table_md
    )
    assert len(res["warnings"]) == 2  # forget and retain


def test_template_is_passed_to_the_encoding(model, tok, sets, monkeypatch):
    import asu.metrics.scoring as scoring

    seen = []
    real_qa, real_prompt = scoring.encode_qa, scoring.encode_prompt

    def fake_qa(tokenizer, question, answer, max_length=None, **kw):
        seen.append(kw.get("template", "<unset>"))
        return real_qa(tokenizer, question, answer, max_length)

    def fake_prompt(tokenizer, question, **kw):
        seen.append(kw.get("template", "<unset>"))
        return real_prompt(tokenizer, question)

    monkeypatch.setattr(scoring, "encode_qa", fake_qa)
    monkeypatch.setattr(scoring, "encode_prompt", fake_prompt)
    evaluate_model(model, tok, sets["forget"][:2], template="tofu-llama2", max_new_tokens=2)
    assert seen and set(seen) == {"tofu-llama2"}
    seen.clear()
    evaluate_model(model, tok, sets["forget"][:2], max_new_tokens=2)
    assert set(seen) == {"<unset>"}  # no template given: the keyword is not passed at all


# ---- files and references --------------------------------------------------------------------------------


def test_files_in_open_unlearning_layout(result, tmp_path):
    write_results(result, tmp_path)
    logs = json.loads((tmp_path / "TOFU_EVAL.json").read_text())
    expected = {
        f"{s}_{m}"
        for s in ("forget", "retain")
        for m in ("Q_A_Prob", "Q_A_PARA_Prob", "Q_A_PERT_Prob", "Q_A_ROUGE")
    }
    expected |= {
        f"{s}_{m}"
        for s in ("ra", "wf")
        for m in ("Q_A_Prob", "Q_A_PERT_Prob", "Q_A_Prob_normalised", "Q_A_ROUGE", "Truth_Ratio")
    }
    headline = set(TOFU_HEADLINE) - {"forget_Q_A_Prob", "forget_Q_A_ROUGE"}
    expected |= headline | {"retain_Truth_Ratio"}
    assert set(logs) == expected and list(logs) == sorted(logs)
    assert set(logs["forget_Q_A_Prob"]["value_by_index"]["0"]) == {"prob", "avg_loss"}
    assert isinstance(logs["forget_Q_A_PERT_Prob"]["value_by_index"]["0"]["prob"], list)
    assert set(logs["forget_truth_ratio"]["value_by_index"]["0"]) == {"score"}
    assert set(logs["wf_Q_A_Prob_normalised"]["value_by_index"]["0"]) == {"prob"}
    assert set(logs["mia_min_k"]) == {"forget", "holdout", "auc", "agg_value"}
    assert set(logs["model_utility"]) == {"agg_value"} and set(logs["privleak"]) == {"agg_value"}
    summary = json.loads((tmp_path / "TOFU_SUMMARY.json").read_text())
    assert set(summary) == set(TOFU_HEADLINE) - {"forget_quality"}  # None: left out, as open-unlearning does
    assert (tmp_path / "TOFU_EVAL.json").read_text().startswith('{\n    "exact_memorization"')  # indent 4
    extras = json.loads((tmp_path / "ASU_EVAL.json").read_text())
    assert {"extraction_strength_paper", "forget_token_entropy", "forget_no_repeat"} <= set(extras)
    flat = json.loads((tmp_path / "summary.json").read_text())
    assert "forget_rouge" not in flat and flat["forget_Q_A_ROUGE"] == result["summary"]["forget_rouge"]
    assert "| forget_Q_A_ROUGE |" in (tmp_path / "summary.md").read_text()


def test_reference_in_open_unlearning_layout(model, tok, sets, tmp_path):
    """A retain model's TOFU_EVAL.json as open-unlearning writes it: forget quality is the KS test against its
    forget_truth_ratio scores, privleak compares with its mia_min_k AUC."""
    from scipy.stats import ks_2samp

    n = len(sets["forget"])
    ref_tr = [0.2, 0.9, 1.5, 0.6, 0.7][:n]
    probs = {str(i): {"prob": 0.1, "avg_loss": 2.3} for i in range(n)}
    scores = {str(i): {"score": v} for i, v in enumerate(ref_tr)}
    retain_logs = {
        "forget_Q_A_Prob": {"agg_value": 0.1, "value_by_index": probs},
        "forget_truth_ratio": {"agg_value": 0.6, "value_by_index": scores},
        "mia_min_k": {"agg_value": 0.42, "auc": 0.42, "forget": {"agg_value": 3.0, "value_by_index": {}},
                      "holdout": {"agg_value": 3.1, "value_by_index": {}}},
        "forget_quality": {"agg_value": None},
    }  # fmt: skip
    path = tmp_path / "TOFU_EVAL.json"
    path.write_text(json.dumps(retain_logs, indent=4))
    for source in (path, tmp_path):  # the file, or its directory
        ref = load_reference_stats(source)
        res = evaluate_model(
            model, tok, sets["forget"], reference_stats=ref, holdout_rows=sets["holdout"], max_new_tokens=2
        )
        ours = _vals(res["logs"]["forget_truth_ratio"], "score")
        assert res["logs"]["forget_quality"]["agg_value"] == pytest.approx(ks_2samp(ours, ref_tr).pvalue)
        auc = res["logs"]["mia_min_k"]["auc"]
        assert res["logs"]["privleak"]["agg_value"] == pytest.approx(
            ((1 - auc) - 0.58) / (0.58 + 1e-10) * 100
        )
    with pytest.raises(ValueError, match="3 reference truth ratios but 5 forget rows"):
        reference_from(
            {
                "forget_truth_ratio": {
                    "value_by_index": {"0": {"score": 1}, "1": {"score": 1}, "2": {"score": 1}}
                }
            },
            n_forget=5,
        )
    with pytest.raises(ValueError, match="not a finite number"):
        reference_from({"forget_truth_ratio": {"value_by_index": {"0": {"score": None}}}})
    with pytest.raises(ValueError, match="open-unlearning's layout"):
        reference_from({"something": 1})


def test_own_results_as_reference_and_legacy_stats(result, model, tok, sets, tmp_path):
    write_results(result, tmp_path)
    ref = load_reference_stats(tmp_path / "TOFU_EVAL.json")
    again = evaluate_model(
        model, tok, sets["forget"], sets["retain"], {"ra": sets["ra"], "wf": sets["wf"]}, reference_stats=ref,
        batch_size=BATCH, max_new_tokens=MAX_NEW, holdout_rows=sets["holdout"],
    )  # fmt: skip
    assert again["logs"]["forget_quality"]["agg_value"] == pytest.approx(1.0)
    assert again["logs"]["privleak"]["agg_value"] == pytest.approx(0.0, abs=1e-6)
    legacy = evaluate_model(model, tok, sets["forget"], reference_stats=result["stats"], max_new_tokens=2)
    assert legacy["logs"]["forget_quality"]["agg_value"] == pytest.approx(1.0)
    assert set(result["stats"]) == {"truth_ratio", "avg_gt_loss", "rougeL_recall"}


def test_forget_quality_of_stored_tofu_statistics(shared_dir):
    """Llama-2-7B fine-tuned on all of TOFU vs the retain90 oracle: TOFU's published forget quality."""
    from asu.evaluate import forget_quality, stats_values

    full = load_reference_stats(shared_dir / "data/tofu/llama2-7b_full_forget10_stats.json")
    oracle = load_reference_stats(shared_dir / "data/tofu/llama2-7b_retain90_forget10_stats.json")
    fq = forget_quality(stats_values(full), stats_values(oracle))
    assert fq["pvalue"] == pytest.approx(1.834e-21, rel=1e-3)
    assert len(stats_values(full)) == 300


# ---- the command and the τ preview ------------------------------------------------------------------------


@pytest.fixture(scope="module")
def world_model(tmp_path_factory):
    from asu.demo.tiny import TinyModelConfig, build_model, train_tokenizer
    from asu.demo.world import WorldConfig, generate_world, write_splits

    world = generate_world(WorldConfig(n_authors=10, n_cities=6, n_countries=5, n_perturbed=3, seed=0))
    tokenizer = train_tokenizer(world.texts(), vocab_size=400)
    cfg = TinyModelConfig(
        hidden_size=32, n_layers=2, n_heads=4, n_kv_heads=2, head_dim=8, intermediate_size=64
    )
    model = build_model(cfg, tokenizer, seed=0).eval()
    root = tmp_path_factory.mktemp("world")
    model.save_pretrained(root / "model")
    tokenizer.save_pretrained(root / "model")
    return SimpleNamespace(
        world=world,
        model=model,
        tokenizer=tokenizer,
        dir=root / "model",
        data=write_splits(world, root / "data"),
    )


def test_asu_eval_end_to_end(tmp_path, world_model, capsys):
    from asu.commands import main

    d = world_model.data
    common = ["--model", str(world_model.dir), "--data", str(d["forget"]), "--retain", str(d["retain"])]
    common += ["--general", f"wf={d['general']}", "--real-authors", str(d["general"])]
    common += ["--holdout", str(d["general"]), "--max-new-tokens", "6", "--no-progress"]
    out = tmp_path / "eval"
    assert main(["eval", *common, "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| forget_Q_A_ROUGE |" in printed and "forget_fact_leakage_any" in printed
    summary = json.loads((out / "TOFU_SUMMARY.json").read_text())
    assert {
        "forget_truth_ratio",
        "forget_Q_A_ROUGE",
        "model_utility",
        "privleak",
        "extraction_strength",
    } <= set(summary)
    extras = json.loads((out / "ASU_EVAL.json").read_text())
    n_forget = len(world_model.world.split("forget"))
    assert len(extras["forget_fact_leakage_all"]["value_by_index"]) == n_forget
    assert {"forget_well_formed", "retain_fact_leakage_any", "ra_fact_leakage_any"} <= set(extras)
    for name in (
        "TOFU_EVAL.json",
        "summary.json",
        "summary.md",
        "generations.json",
        "eval_config.json",
        "summary.png",
    ):
        assert (out / name).is_file(), name
    assert json.loads((out / "eval_config.json").read_text())["template"] == "default"

    # The model against its own evaluation: identical truth ratios and MIA AUC.
    out2 = tmp_path / "eval2"
    ref = ["--reference", str(out)]
    assert main(["eval", *common, *ref, "--temperature", "1,5", "--layers", "0-1", "--out", str(out2)]) == 0
    summary2 = json.loads((out2 / "TOFU_SUMMARY.json").read_text())
    assert summary2["forget_quality"] == pytest.approx(1.0) and summary2["privleak"] == pytest.approx(
        0.0, abs=1e-6
    )
    preview = json.loads((out2 / "tau_preview.json").read_text())
    assert [p["temperature"] for p in preview] == [1.0, 5.0]
    assert preview[0]["summary"]["forget_Q_A_Prob"] == pytest.approx(summary["forget_Q_A_Prob"], rel=1e-5)


def _plain_jsonl(src, dst):
    rows = [json.loads(line) for line in src.read_text().splitlines() if line.strip()]
    dst.write_text(
        "".join(json.dumps({"question": r["question"], "answer": r["answer"]}) + "\n" for r in rows)
    )
    return str(dst)


def test_asu_eval_on_plain_rows_runs_to_the_end_in_one_go(tmp_path, world_model, capsys):
    """question/answer rows only, as most users have them: one run, a table, the metrics the rows cannot
    feed named with their fields in one note; asked for explicitly, one error naming all of them."""
    from asu.commands import main

    d = world_model.data
    forget = _plain_jsonl(d["forget"], tmp_path / "forget.jsonl")
    retain = _plain_jsonl(d["retain"], tmp_path / "retain.jsonl")
    argv = ["eval", "--model", str(world_model.dir), "--data", forget, "--retain", retain]
    argv += ["--max-new-tokens", "4", "--no-progress"]
    assert main([*argv, "--out", str(tmp_path / "eval")]) == 0
    printed = capsys.readouterr().out
    for row in ("| forget_Q_A_ROUGE |", "| forget_Q_A_Prob |", "| model_utility |", "| retain_Q_A_ROUGE |",
                "| forget_degenerate_answers |", "| extraction_strength |"):  # fmt: skip
        assert row in printed, row
    assert (
        "left out, their sets lack the fields that would enable them: forget_truth_ratio (forget rows: "
        "'paraphrased_answer', 'perturbed_answer'); retain_Truth_Ratio (retain rows: 'paraphrased_answer', "
        "'perturbed_answer')" in printed
    )
    config = json.loads((tmp_path / "eval" / "eval_config.json").read_text())
    assert any(n.startswith("left out") for n in config["notes"])
    out = str(tmp_path / "strict")
    assert main([*argv, "--require", "all", "--out", out]) == 2
    err = capsys.readouterr().err
    assert err.count("\n") == 1 and err.count("which was required") == 2, err
    assert (
        "forget rows: no row has 'paraphrased_answer', 'perturbed_answer' (needed by forget_truth_ratio"
        in err
    )
    assert main([*argv, "--require", "forget_truth_ratio,retain_Truth_Ratio", "--out", out]) == 2
    assert capsys.readouterr().err.count("which was required") == 2
    assert not (tmp_path / "strict").exists()


def _silent_model(world_model, path):
    """A Phi model (its LM head has a bias) whose every next token is EOS, saved with the world's
    tokenizer."""
    from transformers import PhiConfig, PhiForCausalLM

    tok = world_model.tokenizer
    config = PhiConfig(
        vocab_size=len(tok), hidden_size=32, intermediate_size=64, num_hidden_layers=1, num_attention_heads=4,
        max_position_embeddings=512, pad_token_id=tok.pad_token_id, bos_token_id=tok.bos_token_id,
        eos_token_id=tok.eos_token_id,
    )  # fmt: skip
    model = PhiForCausalLM(config)
    with torch.no_grad():
        model.lm_head.weight.zero_()
        model.lm_head.bias.zero_()
        model.lm_head.bias[tok.eos_token_id] = 10.0
    model.save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def test_asu_eval_says_when_the_model_answers_nothing(tmp_path, world_model, capsys):
    from asu.commands import main

    d = world_model.data
    model = _silent_model(world_model, tmp_path / "silent")
    out = tmp_path / "eval"
    argv = ["eval", "--model", model, "--data", str(d["forget"]), "--retain", str(d["retain"])]
    assert main([*argv, "--max-new-tokens", "4", "--no-progress", "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    n = len(world_model.world.split("forget"))
    assert f"**Warning:** forget: {n} of {n} answers (100%) are degenerate ({n} empty, {n} stop at once)" in (
        printed
    )
    assert "| forget_degenerate_answers | 1.000 |" in printed and "| forget_no_repeat | 0.000 |" in printed
    extras = json.loads((out / "ASU_EVAL.json").read_text())
    assert extras["forget_degenerate_answers"]["agg_value"] == 1.0
    assert extras["forget_degenerate_answers"]["value_by_index"]["0"] == {
        "score": 1.0,
        "reason": "stops at once",
    }
    assert (
        extras["forget_no_repeat"]["agg_value"] == 0.0 and extras["forget_token_entropy"]["agg_value"] == 0.0
    )
    assert extras["forget_well_formed"]["agg_value"] == 0.0  # the world's grammar checker: data/world.json
    assert "**Warning:** forget:" in (out / "summary.md").read_text()
    assert json.loads((out / "eval_config.json").read_text())["warnings"][0].startswith("forget: ")
    # open-unlearning's files keep its own metrics and nothing else
    assert json.loads((out / "TOFU_EVAL.json").read_text())["forget_Q_A_ROUGE"]["agg_value"] == 0.0
    assert not any("degenerate" in k for k in json.loads((out / "TOFU_EVAL.json").read_text()))


def test_asu_eval_bad_input(tmp_path, world_model, capsys):
    from asu.commands import main

    d, model_dir = world_model.data, str(world_model.dir)
    out = str(tmp_path / "out")

    def fails(argv, message):
        assert main(["eval", *argv, "--out", out, "--no-progress"]) == 2
        err = capsys.readouterr().err
        assert message in err, err
        assert not (tmp_path / "out").exists()  # nothing written

    fails(["--model", str(tmp_path / "nope"), "--data", str(d["forget"])], "does not exist")
    bad = tmp_path / "bad.jsonl"
    bad.write_text('{"question": "Who?"}\n')
    fails(["--model", model_dir, "--data", str(bad)], "'answer'")
    bare = tmp_path / "bare.jsonl"
    bare.write_text('{"question": "Who?", "answer": "Me."}\n')
    fails(["--model", model_dir, "--data", str(bare), "--require", "forget_truth_ratio"],
          "no row has 'paraphrased_answer', 'perturbed_answer' (needed by forget_truth_ratio, which was "
          "required)")  # fmt: skip
    wrong = tmp_path / "wrong_stats.json"
    wrong.write_text(json.dumps({"truth_ratio": {"0": 1.0}}))
    fails(
        ["--model", model_dir, "--data", str(d["forget"]), "--reference", str(wrong)],
        "reference truth ratios",
    )
    fails(["--model", model_dir, "--data", str(d["forget"]), "--temperature", "0"], "--temperature")
    fails(["--model", model_dir, "--data", str(d["forget"]), "--general", f"wf={d['general']}",
           "--world-facts", str(d["general"])], "given twice")  # fmt: skip
    fails(["--model", model_dir, "--split", "forget11x"], "TOFU's forget splits")
    fails(
        [
            "--model",
            model_dir,
            "--benchmark",
            "muse",
            "--data",
            str(d["forget"]),
            "--retain",
            str(d["retain"]),
        ],
        "TOFU sets",
    )


def test_template_recorded_in_run_json_is_the_default(tmp_path):
    from asu.commands.eval import _template

    args = SimpleNamespace(template=None)
    assert _template(args, tmp_path) is None
    (tmp_path / "run.json").write_text(json.dumps({"config": {"template": "tofu-llama2"}}))
    assert _template(args, tmp_path) == "tofu-llama2"
    assert _template(SimpleNamespace(template="plain"), tmp_path) == "plain"


def test_split_names_the_hub_datasets():
    from asu.commands.eval import _muse_sources, _tofu_sources

    flags = dict(general=[], real_authors=None, world_facts=None, data=None, retain=None, holdout=None)
    src = _tofu_sources(SimpleNamespace(**flags, split="forget05"))
    assert src["forget"] == "locuslab/TOFU:forget05_perturbed" and src["holdout"] == "locuslab/TOFU:holdout05"
    assert src["general"] == {
        "ra": "locuslab/TOFU:real_authors_perturbed",
        "wf": "locuslab/TOFU:world_facts_perturbed",
    }
    mine = _tofu_sources(
        SimpleNamespace(**{**flags, "data": "f.jsonl", "general": ["ra=ra.jsonl"]}, split="forget10")
    )
    assert mine["forget"] == "f.jsonl" and mine["general"]["ra"] == "ra.jsonl"
    muse = dict(
        verbmem=None,
        knowmem_forget=None,
        knowmem_retain=None,
        knowmem_forget_icl=None,
        knowmem_retain_icl=None,
    )
    m = _muse_sources(SimpleNamespace(**flags, **muse, split="News"))
    assert m["verbmem"] == "muse-bench/MUSE-News:verbmem:forget" and m["knowmem_retain_icl"].endswith(
        "retain_qa_icl"
    )


def test_tau_preview(model, tok, sets):
    """τ = 1 reproduces the plain evaluation; a higher τ changes the probabilities; smoothing is undone."""
    from asu.evaluate import evaluate_smoothed

    rows = sets["forget"][:3]
    sharp = copy.deepcopy(model)
    with torch.no_grad():  # sharpen the attention so that smoothing has a visible effect
        for name, p in sharp.named_parameters():
            if "q_proj" in name or "k_proj" in name:
                p.mul_(10.0)
    plain = evaluate_model(sharp, tok, rows, max_new_tokens=4)["summary"]
    preview = evaluate_smoothed(sharp, tok, rows, [1.0, 5.0], max_new_tokens=4)
    assert [p["temperature"] for p in preview] == [1.0, 5.0]
    assert preview[0]["summary"]["forget_prob"] == pytest.approx(plain["forget_prob"], rel=1e-5)
    assert preview[1]["summary"]["forget_prob"] != pytest.approx(plain["forget_prob"], rel=1e-3)
    assert evaluate_model(sharp, tok, rows, max_new_tokens=4)["summary"] == plain
    with pytest.raises(ValueError, match="temperature"):
        evaluate_smoothed(sharp, tok, rows, [0.0])


def test_import_needs_no_optional_library():
    import subprocess
    import sys

    optional = ("rouge_score", "datasets", "sentence_transformers", "lm_eval")
    code = "import sys, asu, asu.evaluate, asu.closer_look, asu.lm_eval_bridge, asu.commands.eval; "
    code += f"print([m for m in {optional!r} if m in sys.modules])"
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
