"""``asu eval --lm-eval``: lm-evaluation-harness on the model already in memory, run end to end on a local
multiple-choice task (a YAML task over a JSON Lines file written here; the hub is unreachable) and checked
against lm-eval's own run of the same saved model (its ``hf`` model loading the folder)."""

from __future__ import annotations

import json

import pytest
from helpers import tiny_model, tiny_tokenizer

from asu import lm_eval_bridge
from asu.commands import main

pytest.importorskip("lm_eval")

DOCS = [
    ("who wrote the first novel ?", ["the author", "the baker", "her mother"], 0),
    ("where was the sailor born ?", ["a city of rivers", "under silver moon"], 0),
    ("what did the teacher write ?", ["books about dragons", "poetry", "a prize"], 1),
    ("who won the award ?", ["the author", "his father"], 1),
    ("what is the novel called ?", ["silver moon", "rivers", "dragons"], 0),
]
TASK = """task: asu_tiny_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {rows}
test_split: test
output_type: multiple_choice
doc_to_text: "Question: {{{{question}}}} Answer:"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
    aggregation: mean
    higher_is_better: true
  - metric: acc_norm
    aggregation: mean
    higher_is_better: true
"""


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm_eval_task")
    rows = root / "rows.jsonl"
    rows.write_text("".join(json.dumps({"question": q, "choices": c, "label": y}) + "\n" for q, c, y in DOCS))
    (root / "asu_tiny_mc.yaml").write_text(TASK.format(rows=rows))
    return root


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    path = tmp_path_factory.mktemp("lm_eval_model") / "tiny"
    tiny_model(vocab_size=len(tiny_tokenizer())).save_pretrained(path)
    tiny_tokenizer().save_pretrained(path)
    return path


def test_task_names_and_the_papers_set():
    assert lm_eval_bridge.parse_tasks(["paper,mine", "gsm8k"]) == [
        "arc_challenge",
        "mmlu",
        "truthfulqa_mc1",
        "gsm8k",
        "mine",
    ]
    with pytest.raises(ValueError, match="no task named"):
        lm_eval_bridge.parse_tasks([" , "])
    out = {
        "results": {
            "gsm8k": {"exact_match,flexible-extract": 0.25, "exact_match_stderr,flexible-extract": 0.1}
        }
    }
    out["results"]["mmlu"] = {"acc,none": 0.5, "alias": "mmlu", "sample_len": 10}
    assert lm_eval_bridge.summary(out) == {
        "lm_eval_gsm8k_exact_match_flexible-extract": 0.25,
        "lm_eval_mmlu_acc": 0.5,
    }
    assert lm_eval_bridge.paper_columns(out) == {"GSM8K": 0.25, "MMLU": 0.5}


def test_asu_eval_lm_eval_on_a_local_task(tmp_path, task_dir, model_dir, capsys):
    from lm_eval import simple_evaluate

    forget = tmp_path / "forget.json"
    forget.write_text(
        json.dumps({"question": "who wrote the first novel ?", "answer": "the author ."}) + "\n"
    )
    out = tmp_path / "eval"
    argv = ["eval", "--model", str(model_dir), "--data", str(forget), "--device", "cpu", "--no-progress"]
    argv += ["--lm-eval", "asu_tiny_mc", "--lm-eval-include", str(task_dir), "--out", str(out)]
    assert main(argv) == 0
    assert "| lm_eval_asu_tiny_mc_acc |" in capsys.readouterr().out
    summary = json.loads((out / "summary.json").read_text())
    written = json.loads((out / "LM_EVAL.json").read_text())
    assert written["results"]["asu_tiny_mc"]["acc,none"] == summary["lm_eval_asu_tiny_mc_acc"]
    assert "forget_Q_A_ROUGE" in summary  # beside open-unlearning's metrics
    recorded = json.loads((out / "eval_config.json").read_text())["lm_eval"]
    assert recorded["tasks"] == ["asu_tiny_mc"] and recorded["add_bos_token"] is True
    # lm-eval's own run, loading the saved folder itself: the same numbers
    manager = lm_eval_bridge.prepare(["asu_tiny_mc"], str(task_dir)).manager
    theirs = simple_evaluate(
        model="hf", model_args=f"pretrained={model_dir},add_bos_token=True,device=cpu", tasks=["asu_tiny_mc"],
        task_manager=manager, batch_size=8, bootstrap_iters=0,
    )  # fmt: skip
    for metric in ("acc", "acc_norm"):
        got = summary[f"lm_eval_asu_tiny_mc_{metric}"]
        assert got == pytest.approx(theirs["results"]["asu_tiny_mc"][f"{metric},none"])


def test_lm_eval_errors_name_the_task(tmp_path, task_dir):
    manager = lm_eval_bridge.prepare(["asu_tiny_mc"], str(task_dir)).manager
    with pytest.raises(ValueError, match=r"unknown task asu_tiny_mcq \(close: asu_tiny_mc\)"):
        lm_eval_bridge._check_names(manager, ["asu_tiny_mcq"], str(task_dir))
    broken = tmp_path / "broken"
    broken.mkdir()
    (broken / "t.yaml").write_text(
        TASK.replace("asu_tiny_mc", "asu_no_rows").format(rows=tmp_path / "none.jsonl")
    )
    with pytest.raises(ValueError, match="task asu_no_rows: its data cannot be loaded"):
        lm_eval_bridge.prepare(["asu_no_rows"], str(broken))
    with pytest.raises(ValueError, match="lm-eval limit must be > 0"):
        lm_eval_bridge.prepare(["asu_tiny_mc"], str(task_dir), limit=0)
