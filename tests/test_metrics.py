"""The metric formulas of asu.metrics against hand-written copies of open-unlearning's, and on constructed
cases with known values: the 1e-10 guards, the EOS and extraction-strength conventions, AUC with ties,
min-k% / min-k%++, zlib, privleak, ROUGE, fact leakage and MUSE's prompt and stop words."""

from __future__ import annotations

import math
import zlib

import numpy as np
import pytest
import torch
from helpers import pairwise_auc

from asu.metrics import muse, privacy, text, tofu

# ---- open-unlearning's formulas, written out as its code computes them (numpy over rows) ----------------


def ou_truth_ratio(correct_losses, wrong_losses, aggregator):
    """memorization.py::truth_ratio: rows of losses -> (agg, per-row scores)."""
    correct = np.exp(-np.asarray(correct_losses, dtype=float))
    wrong = np.exp(-np.mean(np.asarray(wrong_losses, dtype=float), axis=1))
    tr = wrong / (correct + 1e-10)
    if aggregator == "closer_to_1_better":
        agg = np.mean(np.minimum(tr, 1 / (tr + 1e-10)))
    else:
        agg = np.mean(np.maximum(0, 1 - tr))
    return agg, tr


def ou_probability_w_options(correct_probs, wrong_probs):
    correct, wrong = np.asarray(correct_probs), np.sum(np.asarray(wrong_probs), axis=1)
    probs = correct / (correct + wrong + 1e-10)
    return np.mean(probs), probs


def ou_extraction_strength(correct):
    valid_len = len(correct)
    for k in range(valid_len):
        if all(correct[k:]):
            break
    if valid_len == 0:
        return 0
    return 1 - (k / valid_len)


def ou_min_k(lp, k):
    if len(lp) == 0:
        return 0
    num_k = max(1, int(len(lp) * k))
    return -np.mean(np.sort(lp)[:num_k])


# ---- TOFU ----------------------------------------------------------------------------------------------


def test_truth_ratio_and_aggregates_match_open_unlearning():
    rng = np.random.default_rng(0)
    correct = rng.uniform(0.1, 4.0, 20)
    wrong = rng.uniform(0.1, 4.0, (20, 5))
    ratios = [tofu.truth_ratio(c, w) for c, w in zip(correct, wrong, strict=True)]
    for agg_name, agg in (("closer_to_1_better", tofu.closer_to_1_better), ("true_better", tofu.true_better)):
        want_agg, want = ou_truth_ratio(correct, wrong, agg_name)
        np.testing.assert_allclose(ratios, want, rtol=1e-12)
        assert agg(ratios) == pytest.approx(want_agg, rel=1e-12)


def test_truth_ratio_guard():
    # The true answer has probability 0: TR = wrong / 1e-10 instead of inf, and min(TR, 1/TR) stays finite.
    tr = tofu.truth_ratio(1e4, [1.0, 3.0])
    assert tr == pytest.approx(math.exp(-2.0) / 1e-10)
    assert tofu.closer_to_1_better([tr]) == pytest.approx(1 / (tr + 1e-10))
    # Equal losses: TR = p / (p + 1e-10), a hair under 1, as open-unlearning stores it.
    p = math.exp(-30.0)
    assert tofu.truth_ratio(30.0, [30.0]) == pytest.approx(p / (p + 1e-10), rel=1e-12)
    assert tofu.truth_ratio(30.0, [30.0]) < 0.99
    assert tofu.true_better([0.25, 2.0]) == pytest.approx(0.375)
    with pytest.raises(ValueError, match="perturbed"):
        tofu.truth_ratio(1.0, [])


def test_normalised_probability_matches_open_unlearning_and_its_guard():
    rng = np.random.default_rng(1)
    correct, wrong = rng.uniform(0, 1, 12), rng.uniform(0, 1, (12, 4))
    want_agg, want = ou_probability_w_options(correct, wrong)
    got = [tofu.normalised_probability(c, w) for c, w in zip(correct, wrong, strict=True)]
    np.testing.assert_allclose(got, want, rtol=1e-12)
    assert np.mean(got) == pytest.approx(want_agg)
    assert tofu.normalised_probability(0.0, [0.0, 0.0]) == 0.0  # 0 / (0 + 1e-10), not NaN
    assert tofu.probability(0.0) == 1.0 and tofu.probability(math.log(4)) == pytest.approx(0.25)


@pytest.mark.parametrize(
    "correct",
    [
        [True, True, True, True],
        [False, True, True, True],
        [True, False, True, True],
        [True, True, True, False],  # even the last token wrong
        [False],
        [True],
        [],
    ],
)
def test_extraction_strength_conventions(correct):
    assert tofu.extraction_strength(correct) == pytest.approx(ou_extraction_strength(correct))


def test_extraction_strength_values_and_the_paper_definition():
    es, paper = tofu.extraction_strength, tofu.extraction_strength_paper
    assert es([True] * 4) == paper([True] * 4) == 1.0
    assert es([False, True, True, True]) == paper([False, True, True, True]) == pytest.approx(0.75)
    # Last token wrong: open-unlearning's loop stops at k = n - 1 (1/n), the paper's k = n gives 0.
    assert es([True, True, True, False]) == pytest.approx(0.25) and paper([True, True, True, False]) == 0.0
    assert es([False]) == 1.0 and paper([False]) == 0.0
    assert es([]) == paper([]) == 0.0


def test_exact_memorization():
    assert tofu.exact_memorization([True, False, True, True]) == 0.75
    assert tofu.exact_memorization([]) is None  # open-unlearning leaves such a row out of the mean


def test_forget_quality_and_harmonic_mean():
    from scipy.stats import hmean, ks_2samp

    a, b = np.linspace(0.1, 2, 40), np.linspace(0.3, 3, 50)
    assert tofu.forget_quality(a, b)["pvalue"] == pytest.approx(ks_2samp(a, b).pvalue)
    assert tofu.forget_quality([0.1, 0.5, 0.9], [0.1, 0.5, 0.9])["pvalue"] == pytest.approx(1.0)
    with pytest.raises(ValueError, match="finite"):
        tofu.forget_quality([float("nan")], [1.0])
    v = [0.4, 0.9, 0.55, 0.3]
    assert tofu.harmonic_mean(v) == pytest.approx(hmean(v))
    assert tofu.harmonic_mean([0.0, 1.0]) == 0.0
    with pytest.raises(ValueError):
        tofu.harmonic_mean([])


# ---- privacy --------------------------------------------------------------------------------------------


def test_roc_auc_against_pair_counting_with_ties():
    forget = [0.1, 0.4, 0.4, 0.7, 1.0]
    holdout = [0.4, 0.5, 0.7, 0.7, 2.0, 0.05]
    want = pairwise_auc(forget, holdout)
    assert privacy.mia_auc(forget, holdout) == pytest.approx(want)
    assert want == pytest.approx(17 / 30)  # 15 wins and 4 ties over 5 x 6 pairs: (15 + 4 / 2) / 30
    assert privacy.mia_auc([1.0, 2.0], [3.0, 4.0]) == 1.0  # holdout all above: the forget set is recognised
    assert privacy.mia_auc([3.0, 4.0], [1.0, 2.0]) == 0.0
    assert privacy.mia_auc([1.0, 1.0], [1.0]) == 0.5
    rng = np.random.default_rng(3)
    f, h = rng.integers(0, 5, 30).astype(float), rng.integers(0, 5, 25).astype(float)  # many ties
    assert privacy.mia_auc(f, h) == pytest.approx(pairwise_auc(f, h))
    with pytest.raises(ValueError, match="both classes"):
        privacy.mia_auc([1.0], [])


def test_min_k_and_zlib_scores():
    lp = np.log(np.array([0.9, 0.05, 0.5, 0.01, 0.3, 0.2, 0.7, 0.6, 0.02, 0.4]))
    for k in (0.05, 0.2, 0.4, 1.0):
        assert privacy.min_k_score(lp, k) == pytest.approx(ou_min_k(lp, k))
    # k = 0.4 of 10 tokens: the 4 least likely, 0.01, 0.02, 0.05, 0.2.
    assert privacy.min_k_score(lp) == pytest.approx(-np.mean(np.log([0.01, 0.02, 0.05, 0.2])))
    assert privacy.min_k_score(lp[:2]) == pytest.approx(-math.log(0.05))  # at least one token
    assert privacy.min_k_score([]) == 0.0
    text_ = "The Silent Harbor was written in 1961."
    assert privacy.zlib_score(2.0, text_) == pytest.approx(2.0 / len(zlib.compress(text_.encode("utf-8"))))


def test_min_k_plus_plus_standardisation_of_a_known_distribution():
    """Next-token distribution p = (1/2, 1/4, 1/4): mu = Σ p log p, sigma^2 = Σ p (log p)^2 - mu^2."""
    from asu.metrics.scoring import _row_scores

    p = torch.tensor([0.5, 0.25, 0.25])
    logits = torch.log(p).repeat(3, 1)  # positions 0..2 all predict with p
    labels = torch.tensor([-100, 0, 1])  # tokens 1 and 2 are labels: 0 then 1
    s = _row_scores(logits, labels)
    mu = float((p * p.log()).sum())
    sigma = math.sqrt(float((p * p.log().square()).sum()) - mu**2)
    np.testing.assert_allclose(s.standardised, [(math.log(0.5) - mu) / sigma, (math.log(0.25) - mu) / sigma])
    np.testing.assert_allclose(s.logprobs, np.log([0.5, 0.25]), rtol=1e-6)
    assert s.avg_loss == pytest.approx(-(math.log(0.5) + math.log(0.25)) / 2)
    assert s.correct.tolist() == [True, False] and s.label_ids == [0, 1]
    # A one-hot distribution has variance 0: floored at 1e-6, as open-unlearning's clamp.
    one_hot = _row_scores(torch.tensor([[50.0, 0.0, 0.0]] * 2), torch.tensor([-100, 0]))
    assert np.isfinite(one_hot.standardised).all()


def test_privleak():
    assert privacy.privleak(0.5, 0.5) == pytest.approx(0.0)
    assert privacy.privleak(1.0) == pytest.approx(-100.0, abs=1e-6)  # forget set fully recognised
    assert privacy.privleak(0.3, 0.4) == pytest.approx((0.7 - 0.6) / (0.6 + 1e-10) * 100)
    with pytest.raises(ValueError, match="auc"):
        privacy.privleak(1.5)


# ---- text and MUSE -------------------------------------------------------------------------------------


def test_rouge_scores():
    s = text.rouge_scores("alpha beta gamma delta", "alpha x y gamma")
    # LCS "alpha gamma": recall 2/4, precision 2/4.
    assert s["rougeL_recall"] == pytest.approx(0.5) and s["rougeL_f1"] == pytest.approx(0.5)
    assert s["rouge1_recall"] == pytest.approx(0.5)
    assert text.rouge_l_recall("The Silent Harbor.", "the silent harbor") == 1.0
    # The stemmer: "writes" and "writing" both stem to "write".
    assert text.rouge_scores("she writes", "she writing")["rougeL_f1"] == 1.0
    assert text.rouge_scores("she writes", "she writing", use_stemmer=False)["rougeL_f1"] == 0.5


def test_fact_leakage():
    gens = [
        "Shorheimsound is 2 January 1979.",  # the forget answer of the issue: both facts still stated
        "She was born in Shorheimsound.",
        "I do not know.",
        "A bakery in the city.",  # "baker" is not stated by "bakery"
    ]
    facts = [["Shorheimsound", "2 January 1979"], ["Shorheimsound", "2 January 1979"], ["x1"], ["baker"]]
    leak = text.fact_leakage(gens, facts)
    assert leak == {"any": [1.0, 1.0, 0.0, 0.0], "all": [1.0, 0.0, 0.0, 0.0]}
    assert text.states_fact('wrote "The Silent Harbor" in 1961', "the silent harbor")
    assert not text.states_fact("January 1979", "2 January 1979")
    with pytest.raises(ValueError, match="non-empty list"):
        text.fact_leakage(["a"], [[]])
    with pytest.raises(ValueError, match="letters or digits"):
        text.states_fact("a", "...")


def test_fluency():
    assert text.token_entropy([1, 2, 3, 4]) == pytest.approx(1.0)
    assert text.token_entropy([7, 7, 7, 7]) == 0.0
    assert text.token_entropy([1, 1, 2, 2]) == pytest.approx(math.log(2) / math.log(4))
    assert text.has_repeat([5, 5, 5, 5]) and not text.has_repeat(list(range(12)))
    assert text.has_repeat([1, 2, 3, 9, 1, 2, 3])
    assert not text.has_repeat([1, 2, 3] + list(range(10, 17)) + [1, 2, 3])


def test_repeated_ngram_share():
    assert text.repeated_ngram_share([1, 2]) == 0.0  # fewer tokens than n
    assert text.repeated_ngram_share(list(range(20))) == 0.0
    assert text.repeated_ngram_share([1, 2, 3, 4] * 2) == pytest.approx(1 - 4 / 6)  # said twice: 1/3
    assert text.repeated_ngram_share([1, 2, 3, 4] * 3) == pytest.approx(0.6)  # 4 distinct of 10
    assert text.repeated_ngram_share([7] * 6) == pytest.approx(0.75)
    assert text.repeated_ngram_share([1, 2, 1, 2], n=2) == pytest.approx(1 / 3)


@pytest.mark.parametrize(
    "ids, generation, reason",
    [
        ([], "", "stops at once"),  # the first generated token was the stop token
        ([5, 6], "  \n", "empty"),  # only special tokens / whitespace were generated
        ([5, 6, 7], "... ?!", "no letter or digit"),
        ([9, 9, 9], "la la la", "one token repeated"),
        ([1, 2, 3, 4] * 3, "he was born he was born he was born", "repeated 3-grams"),
        ([1, 2, 3, 1, 2, 3], "born in born in", None),  # said twice: 3-gram share 0.25
        ([1, 2, 3, 4, 5, 6] * 2, "a sentence said twice", None),
        ([4], "1979", None),  # digits are an answer
        ([4], "Ðóđ", None),  # letters of any script
        ([9, 9], "la la", None),  # too short to call a loop
        ([3, 4, 5], "I do not know.", None),  # a refusal is an answer
    ],
)
def test_degenerate_reason(ids, generation, reason):
    assert text.degenerate_reason(ids, generation) == reason
    assert reason is None or reason in text.DEGENERATE_REASONS


def test_an_answer_that_only_announces_one_is_empty_when_the_model_ended_it():
    said = "The answer to this question is:"
    assert text.degenerate_reason([5, 6, 7], said, stopped=True) == text.ANNOUNCES_ONLY
    assert text.ANNOUNCES_ONLY in text.EMPTY_REASONS and text.ANNOUNCES_ONLY in text.DEGENERATE_REASONS
    # Cut at the token limit, the same text may go on to the answer; and a colon inside an answer is fine.
    assert text.degenerate_reason([5, 6, 7], said, stopped=False) is None
    assert text.degenerate_reason([5, 6, 7], "Ratio: 3:1", stopped=True) is None


def test_degenerate_entries_nest_and_carry_the_reason():
    from asu.metrics.layout import degenerate_entries

    gens = [
        {"ids": [], "generation": ""},
        {"ids": [3], "generation": " "},
        {"ids": [7] * 4, "generation": "no no no no"},
        {"ids": [1, 2, 3], "generation": "an answer"},
    ]
    e = degenerate_entries("forget", gens)
    assert [
        e[f"forget_{k}"]["agg_value"] for k in ("immediate_stop", "empty_answers", "degenerate_answers")
    ] == [
        0.25,
        0.5,
        0.75,
    ]
    reasons = [v["reason"] for v in e["forget_degenerate_answers"]["value_by_index"].values()]
    assert reasons == ["stops at once", "empty", "one token repeated", None]
    # An opener the model ended its turn after is empty; the same text cut at the token cap is not judged.
    announced = {"ids": [4, 5], "generation": "The answer is:"}
    e = degenerate_entries("forget", [{**announced, "stopped": True}, {**announced, "stopped": False}])
    assert [v["reason"] for v in e["forget_degenerate_answers"]["value_by_index"].values()] == [
        "announces an answer and stops",
        None,
    ]
    assert e["forget_empty_answers"]["agg_value"] == 0.5


def test_generations_record_whether_the_model_stopped_and_keep_it_out_of_the_reference_layout():
    from asu.metrics.layout import rouge_entry

    gens = [{"rougeL_recall": 1.0, "generation": "x", "ids": [1], "stopped": True}]
    assert rouge_entry(gens, "rougeL_recall")["value_by_index"]["0"] == {
        "rougeL_recall": 1.0,
        "generation": "x",
    }


def test_an_empty_answer_is_not_fluent():
    from asu.metrics.layout import fluency_entries

    gens = [
        {"ids": [], "generation": ""},
        {"ids": [4], "generation": "\n"},
        {"ids": [1, 2], "generation": "ok"},
        {"ids": [1, 2], "generation": "The answer is:", "stopped": True},  # ended after an opener
    ]
    f = fluency_entries("forget", gens, well_formed=lambda g: True)
    scores = {k: [v["score"] for v in e["value_by_index"].values()] for k, e in f.items()}
    assert scores == {
        "forget_token_entropy": [0.0, 0.0, 1.0, 1.0],
        "forget_no_repeat": [0.0, 0.0, 1.0, 0.0],
        "forget_well_formed": [0.0, 0.0, 1.0, 0.0],
    }


def test_warning_when_a_set_is_mostly_degenerate():
    from asu.metrics.layout import degenerate_entries
    from asu.metrics.report import DEGENERATE_WARNING, degenerate_warnings

    silent = degenerate_entries("forget", [{"ids": [], "generation": ""}] * 4)
    [line] = degenerate_warnings(silent)
    assert line.startswith("forget: 4 of 4 answers (100%) are degenerate (4 empty, 4 stop at once)")
    assert "not forgetting" in line
    one = [{"ids": [], "generation": ""}] + [{"ids": [1, 2], "generation": "fine"}] * 3
    assert DEGENERATE_WARNING == 0.25 and len(degenerate_warnings(degenerate_entries("retain", one))) == 1
    assert degenerate_warnings(degenerate_entries("retain", one + one[1:])) == []  # 1 of 7


def test_muse_prompt_and_stopwords():
    assert muse.knowmem_prompt("Who?", [("Q1", "A1"), ("Q2", "A2")]) == (
        "Question: Q1\nAnswer: A1\n\nQuestion: Q2\nAnswer: A2\n\nQuestion: Who?\nAnswer: "
    )
    assert muse.knowmem_prompt("Who?") == "Question: Who?\nAnswer: "
    assert muse.cut_at_stopwords(" Paris.\n\nQuestion: next", muse.KNOWMEM_STOPWORDS) == "Paris."
    assert muse.cut_at_stopwords("Paris\nQuestion: x", muse.KNOWMEM_STOPWORDS) == "Paris"
    assert muse.cut_at_stopwords(" Paris ", ()) == "Paris"


def test_world_rows_carry_the_facts_their_answers_state():
    from asu.demo.world import WorldConfig, generate_world

    world = generate_world(WorldConfig(n_authors=12, seed=5))
    rows = world.rows
    assert all(isinstance(r["facts"], list) and r["facts"] for r in rows)
    for key in ("answer", "paraphrased_answer"):
        leak = text.fact_leakage([r[key] for r in rows], [r["facts"] for r in rows])
        assert leak["all"] == [1.0] * len(rows), key
    # A perturbed answer replaces every fact, so it states almost none of the true ones (a wrong father's job
    # can be the true mother's).
    perturbed = [(p, r["facts"]) for r in rows for p in r["perturbed_answer"]]
    leak = text.fact_leakage([p for p, _ in perturbed], [f for _, f in perturbed])
    assert np.mean(leak["all"]) < 0.01 and np.mean(leak["any"]) < 0.1
    two = next(r for r in rows if r["kind"] == "origins")
    author = next(a for a in world.authors if a["name"] == two["author"])
    assert two["facts"] == [author["birthplace"], author["birthdate"]]
