"""The automatic temperature: the bisection on toy previews, the target syntax, the preview itself on a
tiny model, and ``temperature="auto"`` through unlearn() and ``asu unlearn`` (run.json records τ and the
curve)."""

from __future__ import annotations

import json
import math

import pytest
from helpers import FORGET, RETAIN, tiny_model

from asu.commands import main
from asu.tau import (
    DEFAULT_FRACTION,
    MAX_TEMPERATURE,
    TauTarget,
    bisect_temperature,
    choose_temperature,
    is_auto,
    parse_auto,
    preview_forget,
)
from asu.unlearn import UnlearnConfig, unlearn
from asu.warning import AsuWarning

FAST = dict(epochs=1, batch_size=2, grad_accum=1, lr=1e-3, max_length=64, progress=False)


pytestmark = pytest.mark.usefixtures("one_thread")


def test_bisection_brackets_then_converges_on_a_monotone_preview():
    score = lambda tau: 1.0 / tau  # noqa: E731  the score at τ; target 0.3 is met from τ = 10/3 on
    tau, reached, curve = bisect_temperature(score, 0.3, tolerance=0.005, ratio_tolerance=0.01, max_steps=30)
    assert reached
    # The answer meets the target and is within the tolerance of it (or the bracket closed around it).
    assert score(tau) <= 0.3 and (score(tau) >= 0.3 - 0.005 or tau / (10 / 3) < 1.01)
    taus = [t for t, _ in curve]
    assert taus[:4] == [1.0, 2.0, 4.0] + taus[3:4] and taus[3] == pytest.approx(math.sqrt(8.0))
    # Every preview is recorded with its score, in the order run.
    assert all(s == pytest.approx(1.0 / t) for t, s in curve)
    # The final bracket holds the crossing: the largest τ tried that misses the target is below the answer.
    missing = [t for t, s in curve if s > 0.3]
    assert max(missing) < tau and tau / max(missing) < 1.2


def test_bisection_edges_and_bumps():
    # Already at the target without smoothing: τ 1, one preview.
    assert bisect_temperature(lambda t: 0.1, 0.3) == (1.0, True, [(1.0, 0.1)])
    # Never reached: the largest temperature tried, reported as not reached.
    tau, reached, curve = bisect_temperature(lambda t: 0.9, 0.3, max_steps=20)
    assert not reached and tau == MAX_TEMPERATURE and curve[-1][0] == MAX_TEMPERATURE
    # Out of steps while bracketing: not reached, the last τ tried.
    tau, reached, curve = bisect_temperature(lambda t: 0.9, 0.3, max_steps=3)
    assert not reached and len(curve) == 3 and tau == 4.0
    # A bump (not monotone): the answer still meets the target and lies above a τ that misses it.
    bumpy = lambda t: 1.0 / t + (0.2 if 2.5 < t < 3.0 else 0.0)  # noqa: E731
    tau, reached, curve = bisect_temperature(bumpy, 0.3, max_steps=30, tolerance=0.001)
    assert reached and bumpy(tau) <= 0.3 and any(t < tau and s > 0.3 for t, s in curve)
    with pytest.raises(ValueError, match="not finite"):
        bisect_temperature(lambda t: float("nan"), 0.3)
    with pytest.raises(ValueError, match="max_steps"):
        bisect_temperature(lambda t: 0.5, 0.3, max_steps=1)


def test_target_syntax():
    assert is_auto("auto") and is_auto(" AUTO:0.3") and not is_auto(2.3) and not is_auto("2.3")
    assert parse_auto("auto") == TauTarget(DEFAULT_FRACTION)
    assert parse_auto("auto:0.25").fraction == 0.25 and parse_auto("auto:0.25").spec == "auto:0.25"
    for bad, why in (("auto:", "fraction"), ("auto:half", "fraction"), ("auto:1.5", r"\(0, 1\)"),
                     ("auto:0", r"\(0, 1\)"), ("auto:nan", "finite"), ("fast", "auto")):  # fmt: skip
        with pytest.raises(ValueError, match=why):
            parse_auto(bad)


def test_config_accepts_auto_and_rejects_other_strings():
    cfg = UnlearnConfig(temperature="auto", **FAST)
    cfg.validate()
    assert cfg.temperature == f"auto:{DEFAULT_FRACTION:g}"
    with pytest.raises(ValueError, match="'auto' or 'auto:R'"):
        UnlearnConfig(temperature="warm").validate()
    with pytest.raises(ValueError, match=r"\(0, 1\)"):
        UnlearnConfig(temperature="auto:2").validate()


def test_preview_matches_unsmoothed_generation_at_tau_1_and_changes_with_tau(tok):
    model = tiny_model(vocab_size=len(tok))
    rows = [dict(r, facts=[r["answer"].split()[1]]) for r in FORGET]
    at_1 = preview_forget(model, tok, rows, 1.0, max_new_tokens=12)
    again = preview_forget(model, tok, rows, 1.0, max_new_tokens=12)
    assert at_1 == again and len(at_1["generations"]) == len(rows)
    assert 0.0 <= at_1["forget_rouge"] <= 1.0 and 0.0 <= at_1["forget_fact_leakage_any"] <= 1.0
    hot = preview_forget(model, tok, rows, 50.0, max_new_tokens=12)
    assert hot["generations"] != at_1["generations"]
    assert not model.training
    with pytest.raises(ValueError, match="question/answer"):
        preview_forget(model, tok, [{"text": "a document"}], 2.0)


def test_choose_temperature_records_the_curve_and_samples_rows(tok, monkeypatch):
    import asu.tau as tau_module

    # A preview whose forget ROUGE-L is 0.8 / τ: the target 0.4 (half of 0.8) is met at τ = 2.
    calls = []

    def fake(model, tokenizer, rows, temperature, **kwargs):
        calls.append((temperature, len(rows)))
        n = len(rows)
        return {
            "temperature": temperature, "forget_rouge": 0.8 / temperature, "generations": [""] * n,
            "rouge": [0.8 / temperature] * n, "reasons": [None] * n, "degenerate": 0.0, "empty": 0.0,
            "immediate_stop": 0.0,
        }  # fmt: skip

    monkeypatch.setattr(tau_module, "preview_forget", fake)
    model = tiny_model(vocab_size=len(tok))
    choice = choose_temperature(model, tok, FORGET * 3, "auto:0.5", max_rows=4)
    assert choice.temperature == 2.0 and choice.reached and choice.original == 0.8
    assert choice.target == pytest.approx(0.4) and choice.rows == 4
    assert [c["temperature"] for c in choice.curve] == [1.0, 2.0]  # τ = 1 is previewed once
    assert all(n == 4 for _, n in calls)
    assert json.loads(json.dumps(choice.to_dict()))["curve"][1]["forget_rouge"] == 0.4


def test_unlearn_with_auto_temperature_records_choice(tok, tmp_path, reference_backend):
    model = tiny_model(vocab_size=len(tok))
    out = tmp_path / "run"
    # The random tiny model's own answers loop: the preview says so (and the run goes on at τ 1).
    with pytest.warns(AsuWarning, match="original model's own answers are degenerate"):
        result = unlearn(model, tok, FORGET, RETAIN, UnlearnConfig(temperature="auto:0.5", **FAST), str(out))
    auto = result.stats["temperature_auto"]
    assert result.stats["temperature"] == auto["temperature"] > 0
    run = json.loads((out / "run.json").read_text())
    assert run["config"]["temperature"] == "auto:0.5" and run["temperature"] == auto["temperature"]
    assert run["temperature_auto"]["curve"][0]["temperature"] == 1.0
    assert run["temperature_auto"]["fraction"] == 0.5
    # A method that never smooths does not preview.
    gd = unlearn(
        tiny_model(vocab_size=len(tok)),
        tok,
        FORGET,
        RETAIN,
        UnlearnConfig(method="gd", temperature="auto", **FAST),
    )
    assert "temperature_auto" not in gd.stats


def test_cli_auto_temperature(tok, tmp_path, reference_backend, capsys):
    model_dir = tmp_path / "model"
    tiny_model(vocab_size=len(tok)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    paths = {}
    for name, rows in (("forget", FORGET), ("retain", RETAIN)):
        paths[name] = tmp_path / f"{name}.jsonl"
        paths[name].write_text("".join(json.dumps(r) + "\n" for r in rows))
    argv = ["unlearn", "--model", str(model_dir), "--forget", str(paths["forget"]), "--retain",
            str(paths["retain"]), "--epochs", "1", "--batch-size", "2", "--grad-accum", "1", "--max-length",
            "64", "--no-progress"]  # fmt: skip
    with pytest.warns(AsuWarning, match="NOT reached"):
        assert main([*argv, "--temperature", "auto:0.4", "--out", str(tmp_path / "out")]) == 0
    run = json.loads((tmp_path / "out" / "run.json").read_text())
    assert run["temperature_auto"]["fraction"] == 0.4 and run["temperature_auto"]["curve"]
    assert "chosen by the preview" in capsys.readouterr().out
    assert main([*argv, "--temperature", "auto:x", "--out", str(tmp_path / "bad")]) == 2
    assert "after 'auto:'" in capsys.readouterr().err and not (tmp_path / "bad").exists()
    with pytest.raises(SystemExit):
        main([*argv, "--temperature", "warm", "--out", str(tmp_path / "bad")])
    assert "'auto' or 'auto:R'" in capsys.readouterr().err
