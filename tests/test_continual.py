"""Continual unlearning on a tiny model: the retain set of each step, the teacher anchor, the files of each
step, resuming without losing or redoing finished steps, and ``asu continual`` end to end."""

from __future__ import annotations

import json
import os

import pytest
import torch
from helpers import FORGET, RETAIN, tiny_model

import asu.continual as continual
import asu.unlearn as unlearn_module
from asu.commands import main
from asu.continual import step_evaluator, step_retain, steps_table, unlearn_sequence
from asu.unlearn import UnlearnConfig
from asu.warning import AsuWarning

FAST = dict(
    epochs=1,
    batch_size=2,
    grad_accum=1,
    lr=1e-3,
    warmup_epochs=0,
    max_length=64,
    progress=False,
    temperature=3.0,
)
REQUESTS = [FORGET[:2], FORGET[2:4], FORGET[4:]]


class Stop(Exception):
    pass


pytestmark = pytest.mark.usefixtures("one_thread")


def _fingerprint(model: torch.nn.Module) -> float:
    return float(sum(p.detach().double().sum() for p in model.parameters()))


@pytest.fixture
def spy(monkeypatch):
    """Records every step's forget / retain rows and the fingerprint of the model its teacher is made of."""
    seen: list[dict] = []
    real_unlearn, real_build = continual.unlearn, unlearn_module.build_teacher

    def fake_unlearn(model, tokenizer, forget, retain, cfg, **kwargs):
        seen.append({"forget": list(forget), "retain": list(retain), "student": _fingerprint(model)})
        if len(seen) == spy_state["stop_at"]:
            raise Stop(f"stopped at step {len(seen)}")
        return real_unlearn(model, tokenizer, forget, retain, cfg, **kwargs)

    def fake_build(source, model, *args, **kwargs):
        seen[-1]["teacher"] = _fingerprint(model)
        return real_build(source, model, *args, **kwargs)

    spy_state = {"stop_at": None, "seen": seen}
    monkeypatch.setattr(continual, "unlearn", fake_unlearn)
    monkeypatch.setattr(unlearn_module, "build_teacher", fake_build)
    return spy_state


def test_step_retain_is_retain_plus_the_requests_still_to_come():
    assert step_retain(REQUESTS, 1, RETAIN) == RETAIN + FORGET[2:]
    assert step_retain(REQUESTS, 2, RETAIN) == RETAIN + FORGET[4:]
    assert step_retain(REQUESTS, 3, RETAIN) == RETAIN
    assert step_retain(REQUESTS, 3, None) == []


@pytest.mark.parametrize("anchor", ["original", "previous"])
def test_each_step_starts_from_the_previous_model_with_its_anchor(tok, spy, anchor, reference_backend):
    model = tiny_model(vocab_size=len(tok))
    original = _fingerprint(model)
    result = unlearn_sequence(model, tok, REQUESTS[:2], RETAIN, UnlearnConfig(**FAST), teacher_anchor=anchor)
    first, second = spy["seen"]
    assert first["forget"] == REQUESTS[0] and first["retain"] == RETAIN + REQUESTS[1]
    assert second["forget"] == REQUESTS[1] and second["retain"] == RETAIN
    assert first["student"] == first["teacher"] == original
    assert second["student"] != original  # step 2 starts from step 1's model
    assert second["teacher"] == (original if anchor == "original" else second["student"])
    assert [s.step for s in result.steps] == [1, 2] and result.model is model
    assert [s.num_retain for s in result.steps] == [len(RETAIN) + 2, len(RETAIN)]


def test_every_step_is_written_and_a_killed_run_resumes_without_redoing(
    tok, tmp_path, spy, reference_backend
):
    out = tmp_path / "seq"
    cfg = UnlearnConfig(**FAST)
    evaluate = step_evaluator(tok, REQUESTS, RETAIN, max_new_tokens=6)
    spy["stop_at"] = 3  # killed when step 3 starts
    with pytest.raises(Stop):
        unlearn_sequence(
            tiny_model(vocab_size=len(tok)), tok, REQUESTS, RETAIN, cfg, str(out), evaluate=evaluate
        )
    summary = json.loads((out / "continual.json").read_text())
    assert [s["step"] for s in summary["steps"]] == [1, 2] and summary["requests"] == [2, 2, 1]
    for k in (1, 2):
        names = set(os.listdir(out / f"step-{k}"))
        assert {"run.json", "eval.json", "model.safetensors"} <= names
    ev2 = json.loads((out / "step-2" / "eval.json").read_text())
    assert set(ev2) == {"request", "forgotten", "pending"} and "retain_rouge" in ev2["request"]
    saved2 = _fingerprint(type(tiny_model(vocab_size=len(tok))).from_pretrained(out / "step-2"))

    # Without resume, a run that holds steps is never overwritten.
    with pytest.raises(ValueError, match="resume it"):
        unlearn_sequence(tiny_model(vocab_size=len(tok)), tok, REQUESTS, RETAIN, cfg, str(out))
    # Other settings cannot resume it.
    with pytest.raises(ValueError, match="teacher_anchor"):
        unlearn_sequence(tiny_model(vocab_size=len(tok)), tok, REQUESTS, RETAIN, cfg, str(out),
                         teacher_anchor="previous", resume=True)  # fmt: skip

    spy["seen"].clear()
    spy["stop_at"] = None
    result = unlearn_sequence(
        tiny_model(vocab_size=len(tok)), tok, REQUESTS, RETAIN, cfg, str(out), evaluate=evaluate, resume=True
    )
    assert [s.resumed for s in result.steps] == [True, True, False]
    assert len(spy["seen"]) == 1 and spy["seen"][0]["student"] == pytest.approx(saved2)  # only step 3 ran
    assert result.steps[1].evaluation == ev2  # read back, not recomputed
    summary = json.loads((out / "continual.json").read_text())
    assert [s["step"] for s in summary["steps"]] == [1, 2, 3]
    assert (
        "forgotten" in summary["steps"][2]["evaluation"]
        and "pending" not in summary["steps"][2]["evaluation"]
    )
    table = steps_table(result.steps)
    assert table.count("\n") == 5 and "| 3 | 1 | 3 |" in table


def test_bad_requests_and_settings(tok):
    model = tiny_model(vocab_size=len(tok))
    cases = [
        (dict(requests=[]), {}, "at least one"),
        (dict(requests=[FORGET, []]), {}, "request 2 is empty"),
        (dict(), {"teacher_anchor": "latest"}, "teacher_anchor"),
        (dict(cfg=UnlearnConfig(lora_r=4, **FAST)), {}, "LoRA|lora"),
        (dict(cfg=UnlearnConfig(teacher="cache", **FAST)), {}, "teacher 'copy'"),
        (dict(), {"resume": True}, "output_dir"),
    ]
    for args, kwargs, why in cases:
        a = {"requests": REQUESTS, "cfg": UnlearnConfig(**FAST), **args}
        with pytest.raises(ValueError, match=why):
            unlearn_sequence(model, tok, a["requests"], RETAIN, a["cfg"], **kwargs)


def test_cli_continual(tok, tmp_path, reference_backend, capsys):
    model_dir = tmp_path / "model"
    tiny_model(vocab_size=len(tok)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    paths = []
    for i, rows in enumerate([*REQUESTS[:2], RETAIN]):
        paths.append(tmp_path / f"rows{i}.jsonl")
        paths[-1].write_text("".join(json.dumps(r) + "\n" for r in rows))
    out = tmp_path / "out"
    argv = ["continual", "--model", str(model_dir), "--forget", str(paths[0]), "--forget", str(paths[1]),
            "--retain", str(paths[2]), "--teacher-anchor", "previous", "--temperature", "auto:0.5",
            "--epochs", "1", "--batch-size", "2", "--grad-accum", "1", "--max-length", "64",
            "--eval-max-new-tokens", "6", "--no-progress", "--out", str(out)]  # fmt: skip
    # A random-init model's own answers loop: the preview says its target cannot be judged, for each step.
    with pytest.warns(AsuWarning, match="NOT reached: the original model's own answers are degenerate"):
        assert main(argv) == 0
    printed = capsys.readouterr().out
    assert "step 1/2" in printed and "step 2/2" in printed and "chosen by the preview" in printed
    summary = json.loads((out / "continual.json").read_text())
    assert summary["teacher_anchor"] == "previous" and len(summary["steps"]) == 2
    assert all(s["temperature_auto"]["curve"] for s in summary["steps"])
    assert (out / "continual.md").is_file() and (out / "step-2" / "run.json").is_file()
    assert "| request degenerate |" in (out / "continual.md").read_text()
    # Finished: the same command again is refused, with --resume it has nothing left to do.
    assert main(argv) == 2
    assert main([*argv, "--resume"]) == 0
    assert "(already done)" in capsys.readouterr().out
