"""The unlearning trainer, the Python API and the ``asu unlearn`` command on a tiny random-init Llama."""

from __future__ import annotations

import json
import os

import pytest
import torch
from helpers import FORGET, RETAIN, assert_weights_close, tiny_model
from transformers import TrainerCallback

from asu.commands import main
from asu.unlearn import UnlearnConfig, unlearn

FAST = dict(epochs=2, batch_size=2, grad_accum=1, lr=1e-3, max_length=64, progress=False)


class Interrupt(Exception):
    pass


class StopAt(TrainerCallback):
    """Raises after optimizer step ``step``, like a run killed mid-epoch."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            raise Interrupt(f"stopped at step {self.step}")


def test_unlearn_in_memory_writes_nothing(tok, tmp_path, monkeypatch, reference_backend):
    monkeypatch.chdir(tmp_path)
    model = tiny_model(vocab_size=len(tok))
    before = {k: v.clone() for k, v in model.state_dict().items()}
    result = unlearn(model, tok, FORGET, RETAIN, UnlearnConfig(teacher="cache", **FAST))
    assert list(tmp_path.iterdir()) == []
    assert result.output_dir is None and result.model is model
    assert (
        len(result.history) == result.stats["optimizer_steps"] == 6
    )  # 5 forget rows / batch 2 = 3 per epoch
    assert {"loss", "forget_loss", "retain_loss", "learning_rate", "step"} <= set(result.history[-1])
    for h in result.history:  # the logged total is exactly lam * L_ASU + L_R
        assert h["loss"] == pytest.approx(0.1 * h["forget_loss"] + h["retain_loss"], rel=1e-5)
    assert any(not torch.equal(before[k], v) for k, v in model.state_dict().items())
    teacher = result.stats["teacher"]
    assert teacher["teacher_forward_passes"] == 3 and teacher["teacher_forward_passes_saved"] == 3
    assert teacher["teacher_bytes_freed"] > 0


def test_progress_shows_the_bar_and_keeps_the_logged_values_in_the_history(tok, capsys, reference_backend):
    """With the progress bar on, the Trainer's per-step log dicts do not reach the terminal; they are the
    result's history (run.json)."""
    model = tiny_model(vocab_size=len(tok))
    result = unlearn(model, tok, FORGET, RETAIN, UnlearnConfig(teacher="cache", **{**FAST, "progress": True}))
    out = capsys.readouterr()
    assert "'loss'" not in out.out + out.err and "grad_norm" not in out.out + out.err
    assert "it/s" in out.err or "s/it" in out.err  # the bar itself is still drawn
    assert len(result.history) == 6 and all("grad_norm" in h for h in result.history)


def test_unlearn_rejects_bad_arguments_before_training(tok, tmp_path):
    model = tiny_model(vocab_size=len(tok))
    cases = [
        (UnlearnConfig(**{**FAST, "pack_tokens": 8}), FORGET, RETAIN, "pack_tokens=8"),
        (UnlearnConfig(method="gd", **FAST), FORGET, None, "needs retain rows"),
        (UnlearnConfig(method="idk", **FAST), FORGET, RETAIN, "idk_answers"),
        (UnlearnConfig(layers=[0, 2], **FAST), FORGET, RETAIN, "out of range"),
        (UnlearnConfig(temperature=-1.0, **FAST), FORGET, RETAIN, "temperature"),
        (UnlearnConfig(**FAST), [{"question": "q"}], RETAIN, "forget: row 0: row has no 'answer'"),
    ]
    for cfg, forget, retain, message in cases:
        with pytest.raises(ValueError, match=message):
            unlearn(model, tok, forget, retain, cfg, output_dir=str(tmp_path / "out"))
        assert not (tmp_path / "out").exists()


def test_unlearn_lora_base_teacher_with_checkpointing(tok, reference_backend):
    model = tiny_model(vocab_size=len(tok))
    cfg = UnlearnConfig(teacher="base", lora_r=4, gradient_checkpointing=True, **{**FAST, "epochs": 1})
    result = unlearn(model, tok, FORGET, RETAIN, cfg)
    lora_b = [p for n, p in result.model.named_parameters() if "lora_B" in n]
    assert lora_b and all(p.abs().sum() > 0 for p in lora_b)  # every adapter trained (starts at zero)
    assert all(not p.requires_grad for n, p in result.model.named_parameters() if "lora_" not in n)


@pytest.mark.parametrize("method", ["ga", "npo", "idk"])
def test_unlearn_baselines_run(tok, method, reference_backend):
    model = tiny_model(vocab_size=len(tok))
    cfg = UnlearnConfig(method=method, teacher="cache", **{**FAST, "epochs": 1})
    retain = None if method == "ga" else RETAIN
    result = unlearn(model, tok, FORGET, retain, cfg, idk_answers=["who where when", "what"])
    assert len(result.history) == 3
    assert all(torch.isfinite(torch.tensor(h["loss"])) for h in result.history)


def test_interrupted_run_resumes_to_the_same_loss(tok, tmp_path, reference_backend):
    # One epoch of 5 steps (batch 1), checkpoints every 2 steps, killed after step 3: mid-epoch.
    cfg = UnlearnConfig(teacher="copy", save_steps=2, **{**FAST, "batch_size": 1, "epochs": 1})
    full = unlearn(tiny_model(vocab_size=len(tok)), tok, FORGET, RETAIN, cfg, output_dir=str(tmp_path / "a"))
    assert len(full.history) == 5

    out = tmp_path / "b"
    with pytest.raises(Interrupt):
        unlearn(
            tiny_model(vocab_size=len(tok)),
            tok,
            FORGET,
            RETAIN,
            cfg,
            output_dir=str(out),
            callbacks=[StopAt(3)],
        )
    assert not (out / "run.json").exists() and not (out / "model.safetensors").exists()
    assert (out / "checkpoints" / "checkpoint-2").is_dir()
    with pytest.raises(ValueError, match="interrupted run"):
        unlearn(tiny_model(vocab_size=len(tok)), tok, FORGET, RETAIN, cfg, output_dir=str(out))

    resumed = unlearn(
        tiny_model(vocab_size=len(tok)), tok, FORGET, RETAIN, cfg, output_dir=str(out), resume=True
    )
    assert [h["step"] for h in resumed.history] == list(range(1, 6))
    assert resumed.history[-1]["loss"] == pytest.approx(full.history[-1]["loss"], abs=1e-5)
    assert_weights_close(resumed.model.state_dict(), full.model.state_dict())
    assert (out / "run.json").exists() and not (out / "checkpoints").exists()


def _write_jsonl(path, rows):
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture
def files(tok, tmp_path):
    model_dir = tmp_path / "model"
    tiny_model(vocab_size=len(tok)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    return {
        "model": str(model_dir),
        "forget": _write_jsonl(tmp_path / "forget.jsonl", FORGET),
        "retain": _write_jsonl(tmp_path / "retain.jsonl", RETAIN),
        "tmp": tmp_path,
    }


def _argv(files, out, *extra):
    return [
        "unlearn",
        "--model", files["model"],
        "--forget", files["forget"],
        "--retain", files["retain"],
        "--out", str(out),
        "--epochs", "1",
        "--batch-size", "2",
        "--grad-accum", "1",
        "--max-length", "64",
        "--lr", "1e-3",
        "--no-progress",
        *extra,
    ]  # fmt: skip


def test_cli_end_to_end(files, capsys, reference_backend):
    out = files["tmp"] / "out"
    assert main(_argv(files, out, "--teacher", "cache", "--layers", "1")) == 0
    names = set(os.listdir(out))
    assert {"model.safetensors", "config.json", "run.json", "tokenizer.json"} <= names
    assert "checkpoints" not in names and not any(n.startswith(".") for n in names)
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["layers"] == "1" and run["config"]["method"] == "asu"
    assert run["effective_batch_size"] == 2 and run["seed"] == 0 and run["wall_time_s"] > 0
    assert len(run["losses"]) == 3 and "torch" in run["versions"]
    printed = capsys.readouterr().out
    assert (
        "done, 3 steps" in printed and "3 teacher forward passes (0 saved)" in printed
    )  # 1 epoch: no saving yet
    # A finished run is never overwritten.
    assert main(_argv(files, out)) == 2


def test_cli_preset_template_and_data_sources(files, reference_backend):
    """--preset values under explicit flags, a Jinja template file, a CSV retain set with other column names;
    run.json records the template (with its source) and the settings."""
    tmp = files["tmp"]
    template = tmp / "qa.jinja"
    template.write_text(
        "{% for m in messages %}{% if m.role == 'user' %}{{ bos_token }} Question: {{ m.content }}\n"
        "{% else %}Answer: {{ m.content }}{% endif %}{% endfor %}"
        "{% if add_generation_prompt %}Answer:{% endif %}"
    )
    retain_csv = tmp / "retain.csv"
    retain_csv.write_text("prompt,reply\n" + "".join(f"{r['question']},{r['answer']}\n" for r in RETAIN))
    out = tmp / "out"
    argv = _argv(files, out, "--preset", "tofu", "--template", str(template), "--retain", str(retain_csv))
    argv += ["--question-key", "prompt", "--answer-key", "reply", "--retain-loss", "kl"]
    assert main(argv) == 2  # the forget file has no 'prompt' column: named, nothing written
    assert not out.exists()
    forget_csv = tmp / "forget.csv"
    forget_csv.write_text("prompt,reply\n" + "".join(f"{r['question']},{r['answer']}\n" for r in FORGET))
    assert main(argv + ["--forget", str(forget_csv)]) == 0
    run = json.loads((out / "run.json").read_text())
    config = run["config"]
    assert config["preset"] == "tofu" and config["temperature"] == 2.3 and config["weight_decay"] == 0.01
    assert config["epochs"] == 1 and config["lr"] == 1e-3  # explicit flags over the preset
    assert config["retain_loss"] == "kl" and config["retain_reduction"] == "sequence"
    assert config["template"] == str(template) and config["system_prompt"] is None
    assert run["template"]["name"] == "file" and run["template"]["source"] == template.read_text()
    assert len(run["template"]["sha256"]) == 64


def test_config_checks_template_and_new_fields():
    for fields, message in [
        ({"template": "llama9"}, "unknown template"),
        ({"template": "missing/file.jinja"}, "does not exist"),
        ({"retain_reduction": "batch"}, "unknown retain_reduction"),
        ({"lr_schedule": "cosine"}, "unknown lr_schedule"),
    ]:
        with pytest.raises(ValueError, match=message):
            UnlearnConfig(**fields).validate()
    cfg = UnlearnConfig(template="llama3", system_prompt="be brief")
    cfg.validate()
    assert cfg.prompt_template().system_prompt == "be brief"
    assert UnlearnConfig(template="llama3").prompt_template().system_prompt == "You are a helpful assistant."


def test_unlearn_constant_schedule_and_template_record(tok, tmp_path, reference_backend):
    cfg = UnlearnConfig(lr_schedule="constant", warmup_epochs=0, template="plain", **FAST)
    result = unlearn(
        tiny_model(vocab_size=len(tok)), tok, FORGET, RETAIN, cfg, output_dir=str(tmp_path / "o")
    )
    assert {h["learning_rate"] for h in result.history} == {1e-3}
    run = json.loads((tmp_path / "o" / "run.json").read_text())
    assert run["template"] == {"name": "plain", "system_prompt": None, "variables": {}}


def test_resume_of_a_run_saved_before_the_new_settings(tok, tmp_path, reference_backend):
    """A config saved without retain_reduction/template/... resumes as the defaults, except a kl run, whose
    retain term was the token mean then."""
    from asu.unlearn import _save_or_compare_config

    old = {
        k: v for k, v in UnlearnConfig(**FAST).to_dict().items() if k not in ("retain_reduction", "template")
    }
    (tmp_path / "unlearn_config.json").write_text(json.dumps(old))
    _save_or_compare_config(str(tmp_path), UnlearnConfig(**FAST), resume=True)
    (tmp_path / "unlearn_config.json").write_text(json.dumps({**old, "retain_loss": "kl"}))
    with pytest.raises(ValueError, match="retain_reduction changed"):
        _save_or_compare_config(str(tmp_path), UnlearnConfig(retain_loss="kl", **FAST), resume=True)
    kept = UnlearnConfig(retain_loss="kl", retain_reduction="token", **FAST)
    _save_or_compare_config(str(tmp_path), kept, resume=True)


def test_cli_lora_writes_adapter(files, reference_backend):
    out = files["tmp"] / "lora"
    assert main(_argv(files, out, "--teacher", "base", "--lora-r", "2", "--no-pack")) == 0
    assert (out / "adapter_model.safetensors").exists() and not (out / "model.safetensors").exists()


BAD = {
    "missing forget file": (["--forget", "{tmp}/nope.jsonl"], "no such file"),
    "empty forget file": (["--forget", "{tmp}/empty.jsonl"], "empty"),
    "malformed JSON line": (["--forget", "{tmp}/bad.jsonl"], "line 2: malformed JSON"),
    "row without answer": (["--forget", "{tmp}/noanswer.jsonl"], "line 1: row has no 'answer'"),
    "tau <= 0": (["--temperature", "0"], "temperature must be > 0"),
    "lambda < 0": (["--lam", "-0.1"], "lam must be >= 0"),
    "unknown method": (["--method", "forgetall"], "unknown method"),
    "model path missing": (["--model", "{tmp}/no-model"], "does not exist"),
    "base teacher without PEFT": (["--teacher", "base"], "needs a LoRA student"),
    "resume with nothing": (["--resume"], "nothing to resume"),
    "idk without file": (["--method", "idk"], "--idk-file"),
    "bad layers": (["--layers", "5-9"], "out of range"),
    "unknown template": (["--template", "llama9"], "unknown template 'llama9'"),
    "template file missing": (["--template", "{tmp}/nope.jinja"], "nope.jinja does not exist"),
    "question column missing": (["--question-key", "q"], "forget.jsonl: line 1: no column 'q'"),
}


@pytest.mark.parametrize("case", list(BAD))
def test_cli_bad_input(files, capsys, case):
    tmp = files["tmp"]
    (tmp / "empty.jsonl").write_text("\n")
    (tmp / "bad.jsonl").write_text(json.dumps(FORGET[0]) + "\n{question: oops\n")
    (tmp / "noanswer.jsonl").write_text(json.dumps({"question": "who?"}) + "\n")
    flags, message = BAD[case]
    out = tmp / "out"
    argv = _argv(files, out) + [f.format(tmp=tmp) for f in flags]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert err.startswith("asu unlearn: error:") and message in err and len(err.splitlines()) == 1, err
    assert not out.exists()  # nothing that could be mistaken for a result
