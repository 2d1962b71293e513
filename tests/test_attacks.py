"""Attacks (asu.attacks): the meta-evaluation's scores and guards, the probes' prompts, the --attack specs,
and ``asu eval --attack`` end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import pytest
import torch
from helpers import FORGET, RETAIN, tiny_model, tiny_tokenizer

from asu.attacks import attach, parse_attacks, quant_score, relearn_score, robustness_score
from asu.attacks.context import AttackOutcome
from asu.attacks.probes import OPENER, PrefilledTemplate, paraphrased_rows
from asu.formatting import IGNORE_INDEX, encode_prompt, encode_qa
from asu.templates import get_template

pytestmark = pytest.mark.usefixtures("one_thread")  # they train tiny models

# ---- scores -----------------------------------------------------------------------------------------------


def test_relearn_score_and_its_guards():
    # The oracle gains 0.2, the unlearned model 0.5: R = 0.4; gaining less than the oracle is R = 1.
    assert relearn_score(0.1, 0.6, 0.0, 0.2) == pytest.approx(0.4)
    assert relearn_score(0.1, 0.2, 0.0, 0.5) == 1.0
    assert relearn_score(0.3, 0.3, 0.0, 0.5) == 1.0 and relearn_score(0.3, 0.2, 0.0, 0.5) == 1.0  # no gain
    assert relearn_score(0.1, 0.6, 0.2, 0.1) == 0.0  # the oracle lost: a negative ratio is clipped to 0
    assert relearn_score(None, 0.6, 0.0, 0.2) is None and relearn_score(math.nan, 0.6, 0.0, 0.2) is None


def test_quant_score_and_its_guards():
    assert quant_score(0.2, 0.8) == pytest.approx(0.25) and quant_score(0.5, 0.4) == 1.0
    assert quant_score(0.0, 0.0) == 1.0 and quant_score(0.3, 0.0) == 1.0  # nothing to recover
    assert quant_score(0.0, 0.4) == 0.0 and quant_score(0.2, None) is None


def test_robustness_is_the_harmonic_mean():
    assert robustness_score(0.4, 0.25) == pytest.approx(2 * 0.4 * 0.25 / 0.65)
    assert robustness_score(0.0, 0.9) == 0.0 and robustness_score(None, 0.9) is None


# ---- probes -----------------------------------------------------------------------------------------------

LLAMA3 = get_template("llama3")


@pytest.mark.parametrize("base", [None, LLAMA3], ids=["plain", "llama3"])
def test_the_prefilled_prompt_ends_with_the_opener_and_labels_the_answer(base):
    tok = tiny_tokenizer()
    template = PrefilledTemplate.of(base, tok)
    q, a = FORGET[1]["question"], FORGET[1]["answer"]
    prompt = template.render(tok, q)
    assert prompt.endswith(OPENER) and template.render(tok, q, a).startswith(prompt)
    assert prompt.startswith(get_template(base).render(tok, q) if base else "Question: " + q + "\nAnswer:")
    enc = encode_qa(tok, q, a, template=template)
    labels = [t for t in enc["labels"] if t != IGNORE_INDEX]
    plain = [t for t in encode_qa(tok, q, a, template=base)["labels"] if t != IGNORE_INDEX]
    assert labels == plain and len(labels) > 3  # the answer's tokens are labelled; the opener is context
    assert enc["input_ids"][: len(encode_prompt(tok, q, template))] == encode_prompt(tok, q, template)


def test_paraphrased_rows_prefer_the_question_side():
    rows = [{**r, "paraphrased_answer": r["answer"] + " indeed"} for r in FORGET]
    out, mode = paraphrased_rows(rows)
    assert mode == "answer" and out[0]["answer"].endswith("indeed")
    assert out[0]["question"] == FORGET[0]["question"]
    asked = [{**r, "paraphrased_question": "who ? " + r["question"]} for r in rows]
    out, mode = paraphrased_rows(asked)
    assert mode == "question" and out[0]["question"].startswith("who ?")
    assert out[0]["answer"] == FORGET[0]["answer"]
    with pytest.raises(ValueError, match="paraphrased_question"):
        paraphrased_rows(FORGET)


# ---- specs and results ------------------------------------------------------------------------------------


def test_specs_parse_and_refuse():
    specs = parse_attacks(["quant:nf4,relearn:4", "quant:int8", "relearn-x"][:2] + ["prefix, paraphrase"])
    assert [(s.kind, s.params, s.name) for s in specs] == [
        ("quant", {"fmt": "nf4"}, "quant_nf4"),
        ("relearn", {"steps": 4}, "relearn"),
        ("quant", {"fmt": "int8"}, "quant_int8"),
        ("prefix", {}, "prefix"),
        ("paraphrase", {}, "paraphrase"),
    ]
    assert parse_attacks(["quant", "relearn::1e-4"])[1].params == {"lr": 1e-4}
    for bad, message in [
        ("quant:int4", "formats are nf4, fp4, int8"),
        ("relearn:0", "positive integer"),
        ("relearn:4:-1", "positive number"),
        ("relearn:1:2:3", "at most two"),
        ("prefix:yes", "takes no arguments"),
        ("jailbreak", "unknown attack"),
        ("quant,quant:nf4", "asked for twice"),
    ]:
        with pytest.raises(ValueError, match=message):
            parse_attacks([bad])


def test_attach_adds_entries_and_refuses_collisions():
    result = {"logs": {"forget_Q_A_Prob": {}}, "extras": {}, "metrics": {}, "summary": {}, "notes": []}
    out = AttackOutcome("quant_nf4", {"quant_nf4_Q": {"agg_value": 0.5, "before": {}}}, ["a note"])
    out.add_values("quant_nf4", {"forget_Q_A_Prob": 0.3})
    attach(result, [out])
    assert result["summary"] == {"quant_nf4_Q": 0.5, "quant_nf4_forget_Q_A_Prob": 0.3}
    assert set(result["extras"]) == {"quant_nf4_Q", "quant_nf4_forget_Q_A_Prob"}
    assert result["notes"] == ["a note"]
    with pytest.raises(ValueError, match="collides"):
        attach(result, [AttackOutcome("x", {"forget_Q_A_Prob": {"agg_value": 1.0}})])


# ---- asu eval --attack ------------------------------------------------------------------------------------


def _tofu_rows(rows: list[dict]) -> list[dict]:
    """QA rows with the fields TOFU's metrics read (paraphrase, perturbed answers)."""
    return [{**r, "paraphrased_answer": r["answer"], "perturbed_answer": [r["answer"][::-1]]} for r in rows]


def _jsonl(path: Path, rows: list[dict]) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows), encoding="utf-8")
    return str(path)


@pytest.fixture(scope="module")
def folders(tmp_path_factory):
    """A tiny model and a differently initialised one (the reference), and TOFU-style rows."""
    root = tmp_path_factory.mktemp("attacks")
    tok = tiny_tokenizer()
    for name, seed in (("model", 0), ("oracle", 1)):
        model = tiny_model(vocab_size=len(tok), seed=seed)
        model.save_pretrained(root / name)
        tok.save_pretrained(root / name)
    return {
        "root": root,
        "forget": _jsonl(root / "forget.jsonl", _tofu_rows(FORGET)),
        "retain": _jsonl(root / "retain.jsonl", _tofu_rows(RETAIN)),
    }


def _eval(folders, model: str, out: Path, *attack: str) -> list[str]:
    argv = ["eval", "--model", str(folders["root"] / model), "--data", folders["forget"]]
    argv += ["--retain", folders["retain"], "--max-new-tokens", "8", "--no-progress", "--out", str(out)]
    return argv + [a for spec in attack for a in ("--attack", spec)]


def test_asu_eval_with_attacks_end_to_end(tmp_path, folders, capsys):
    from asu.commands import main

    out = tmp_path / "eval"
    assert main(_eval(folders, "model", out, "quant:nf4", "relearn:4")) == 0
    printed = capsys.readouterr().out
    assert "| quant_nf4_Q |" in printed and "| relearn_forget_Q_A_Prob |" in printed
    extras = json.loads((out / "ASU_EVAL.json").read_text())
    summary = json.loads((out / "summary.json").read_text())
    q = extras["quant_nf4_Q"]
    assert q["protocol"]["quantized_modules"] == 14 and q["protocol"]["kept_in_full_precision"] == ["lm_head"]
    assert q["before"]["forget_Q_A_Prob"] == pytest.approx(summary["forget_Q_A_Prob"])
    want = quant_score(summary["forget_Q_A_Prob"], q["after"]["forget_Q_A_Prob"])
    assert q["agg_value"] == pytest.approx(want)
    relearn = extras["relearn_R"]
    assert relearn["agg_value"] is None and [p["step"] for p in relearn["curve"]] == [0, 1, 2, 3, 4]
    assert relearn["curve"][0]["forget_Q_A_Prob"] == pytest.approx(summary["forget_Q_A_Prob"], rel=1e-5)
    assert len(relearn["split"]["rows"]["train"]) == 2 and len(relearn["split"]["rows"]["score"]) == 3
    assert summary["relearn_forget_Q_A_Prob"] == relearn["after"]["forget_Q_A_Prob"]
    assert "relearn_R" not in summary and "robustness" not in summary
    notes = json.loads((out / "eval_config.json").read_text())["notes"]
    assert any(n.startswith("relearn_R: no reference") for n in notes)


def test_relearn_r_against_the_reference_and_robustness(tmp_path, folders, capsys):
    from asu.commands import main

    ref, out = tmp_path / "ref", tmp_path / "eval"
    assert main(_eval(folders, "oracle", ref, "relearn:2:1e-2")) == 0
    assert main([*_eval(folders, "model", out, "relearn:2:1e-2", "quant:nf4"), "--reference", str(ref)]) == 0
    capsys.readouterr()
    extras, summary = (json.loads((out / f).read_text()) for f in ("ASU_EVAL.json", "summary.json"))
    theirs = json.loads((ref / "ASU_EVAL.json").read_text())["relearn_R"]
    ours = extras["relearn_R"]
    want = relearn_score(ours["before"]["forget_Q_A_Prob"], ours["after"]["forget_Q_A_Prob"],
                         theirs["before"]["forget_Q_A_Prob"], theirs["after"]["forget_Q_A_Prob"])  # fmt: skip
    assert ours["agg_value"] == pytest.approx(want) and summary["relearn_R"] == pytest.approx(want)
    assert summary["robustness"] == pytest.approx(robustness_score(want, summary["quant_nf4_Q"]))
    # Another protocol than the reference's is refused before anything is written.
    bad = tmp_path / "bad"
    assert main([*_eval(folders, "model", bad, "relearn:3:1e-2"), "--reference", str(ref)]) == 2
    assert "another protocol" in capsys.readouterr().err and not bad.exists()


def test_attacks_leave_the_model_untouched(folders):
    from asu.attacks import AttackContext, run_attacks
    from asu.attacks.context import evaluator

    tok = tiny_tokenizer()
    model = tiny_model(vocab_size=len(tok))
    state = {k: v.clone() for k, v in model.state_dict().items()}
    evaluate = evaluator(tok, batch_size=8, max_new_tokens=4)
    rows = [{**r, "paraphrased_answer": r["answer"]} for r in FORGET]
    ctx = AttackContext(model, tok, rows, RETAIN, evaluate, evaluate(model, rows, RETAIN))
    outcomes = run_attacks(parse_attacks(["quant:fp4,relearn:1:1e-2,prefix,paraphrase"]), ctx)
    assert [o.name for o in outcomes] == ["quant_fp4", "relearn", "prefix", "paraphrase"]
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())
    assert outcomes[3].entries["paraphrase_forget_Q_A_ROUGE"]["mode"] == "answer"


def test_robustness_columns_for_a_benchmark():
    from asu.attacks.columns import robustness_columns, yardstick
    from asu.attacks.context import evaluator

    tok = tiny_tokenizer()
    original, oracle, model = (tiny_model(vocab_size=len(tok), seed=s) for s in (0, 1, 2))
    evaluate = evaluator(tok, batch_size=8, max_new_tokens=4)
    specs = ["relearn:1:1e-2", "quant:nf4"]
    ref = yardstick(oracle, tok, FORGET, RETAIN, evaluate, specs)
    first = robustness_columns(original, tok, FORGET, RETAIN, evaluate, specs, reference=ref)
    cols = robustness_columns(model, tok, FORGET, RETAIN, evaluate, specs, reference=ref, original=first)
    theirs = ref["relearn_R"]
    assert cols["relearn_R_rouge"] == relearn_score(
        cols["before_forget_Q_A_ROUGE"], cols["relearn_forget_Q_A_ROUGE"],
        theirs["before"]["forget_Q_A_ROUGE"], theirs["after"]["forget_Q_A_ROUGE"],
    )  # fmt: skip
    assert cols["robustness"] == pytest.approx(robustness_score(cols["relearn_R"], cols["quant_nf4_Q"]))
    before, after = cols["split_before_forget_Q_A_Prob"], cols["relearn_split_forget_Q_A_Prob"]
    top = first["split_before_forget_Q_A_Prob"]
    if top > before:
        assert cols["relearn_split_recovered"] == pytest.approx((after - before) / (top - before))
    else:  # the original knows the held-out half no better: no share to speak of
        assert "relearn_split_recovered" not in cols
    with pytest.raises(ValueError, match="give a relearn attack"):
        yardstick(oracle, tok, FORGET, RETAIN, evaluate, ["quant:nf4"])
