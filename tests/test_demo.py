"""The tiny model's cache and training, and ``asu demo`` end to end (quick) and on its claims (slow)."""

from __future__ import annotations

import json

import pytest
import torch

from asu.demo.tiny import MARKER, TinyModelConfig, TrainConfig, load_or_train
from asu.demo.world import WorldConfig, generate_world

MICRO_WORLD = WorldConfig(n_authors=4, n_cities=5, n_countries=4, n_perturbed=3, seed=0)
MICRO_MODEL = TinyModelConfig(
    vocab_size=300, hidden_size=32, n_layers=1, n_heads=2, n_kv_heads=1, head_dim=16, intermediate_size=64
)
MICRO_TRAIN = TrainConfig(lr=5e-3, batch_size=16, max_epochs=1, eval_every=1, warmup_steps=2)


@pytest.fixture(autouse=True)
def one_thread():
    """One intra-op thread: on a shared, busy 2-core runner two threads per process thrash (~10x slower)."""
    before = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(before)


def _weights(model) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def test_cache_is_deterministic_reused_and_rebuilt_when_corrupt(tmp_path):
    world = generate_world(MICRO_WORLD)
    m1, _, info1 = load_or_train(world, "full", tmp_path / "a", MICRO_MODEL, MICRO_TRAIN, progress=False)
    assert not info1["cached"] and info1["epochs"] == 1
    w1 = _weights(m1)
    # Second call: loaded, same weights.
    m3, tok3, info3 = load_or_train(world, "full", tmp_path / "a", MICRO_MODEL, MICRO_TRAIN, progress=False)
    assert info3["cached"] and all(torch.equal(w1[k], v) for k, v in _weights(m3).items())
    assert tok3.eos_token == "</s>" and tok3.pad_token == "<pad>"

    entry = tmp_path / "a" / info1["path"].split("/")[-1]
    # Killed mid-save: no completion marker -> rebuilt, never loaded.
    (entry / MARKER).unlink()
    (entry / "model.safetensors").write_bytes(b"garbage")
    _, _, info4 = load_or_train(world, "full", tmp_path / "a", MICRO_MODEL, MICRO_TRAIN, progress=False)
    assert not info4["cached"] and (entry / MARKER).is_file()
    # Marker present but weights truncated -> rebuilt too, bit-identical (seeded init and data order).
    data = (entry / "model.safetensors").read_bytes()
    (entry / "model.safetensors").write_bytes(data[: len(data) // 2])
    m5, _, info5 = load_or_train(world, "full", tmp_path / "a", MICRO_MODEL, MICRO_TRAIN, progress=False)
    assert not info5["cached"] and all(torch.equal(w1[k], v) for k, v in _weights(m5).items())
    # Another configuration is another entry; the oracle never sees forget rows.
    _, _, info6 = load_or_train(world, "oracle", tmp_path / "a", MICRO_MODEL, MICRO_TRAIN, progress=False)
    assert info6["path"] != info1["path"] and set(info6["rouge"]) == {"retain"}
    assert not [p for p in (tmp_path / "a").iterdir() if p.name.startswith(".")]  # no temp dirs left


@pytest.mark.slow
def test_quick_demo_end_to_end(tmp_path):
    pytest.importorskip("asu.unlearn")
    from asu.commands import main

    argv = ["demo", "--quick", "--cache-dir", str(tmp_path / "cache"), "--out", str(tmp_path / "out")]
    assert main([*argv, "--no-progress"]) == 0
    res = json.loads((tmp_path / "out" / "results.json").read_text())
    assert {"original", "oracle (retain only)"} <= set(res["models"])
    assert any(k.startswith("ASU") for k in res["models"]) and any(
        k.startswith("GA+GD") for k in res["models"]
    )
    for key in ("asu_halves_forget", "asu_keeps_retain", "preview_predicts_asu", "ga_collapses_asu_does_not"):
        assert key in res["claims"]
    assert (tmp_path / "out" / "results.md").is_file() and (
        tmp_path / "out" / "results.png"
    ).stat().st_size > 0
    for split in ("forget", "retain", "general"):
        assert (tmp_path / "out" / "data" / f"{split}.jsonl").is_file()
    assert not res["training"]["full"]["cached"]
    # Second run: both models come from the cache.
    assert main([*argv, "--no-progress"]) == 0
    res2 = json.loads((tmp_path / "out" / "results.json").read_text())
    assert res2["training"]["full"]["cached"] and res2["training"]["oracle"]["cached"]
    assert res2["models"]["original"] == res["models"]["original"]


@pytest.mark.slow
def test_demo_claims(tmp_path):
    """What the demo must show, on its own numbers with the default settings (about 5 min on 2 cores).

    The settings were tuned on this world (seed 0) and the measured margins are thin
    (``asu.demo.run.DemoSettings``): forget ROUGE-L 0.459 against the 0.490 bound, retain 0.909 against 0.903,
    0.056 more retain than GA+GD at matched forgetting against 0.05. On world seeds 1 and 2 the same settings
    do not meet these claims (``benchmarks/results/demo-cpu-other-seeds.md``).
    """
    pytest.importorskip("asu.unlearn")
    from asu.demo.run import default_settings, run_demo

    res = run_demo(default_settings(), tmp_path / "out", cache_dir=None, progress=False)
    train = res["training"]
    assert train["full"]["rouge"]["forget"] >= 0.9 and train["full"]["rouge"]["retain"] >= 0.9
    assert train["oracle"]["rouge"]["retain"] >= 0.9
    claims = res["claims"]
    failed = {k: v for k, v in claims.items() if v["holds"] is not True}
    assert not failed, json.dumps(failed, indent=1)


def test_matching_lr_bisects_between_the_runs_that_bracket_the_target():
    from asu.demo.run import _next_matching_lr

    # 1e-3 forgets too little (0.8 > 0.5), 4e-3 too much: try their geometric mean.
    assert _next_matching_lr({1e-3: 0.8, 4e-3: 0.1}, 0.5) == pytest.approx(2e-3)
    # Every run forgets too little: double the largest lr; too much: halve the smallest.
    assert _next_matching_lr({1e-3: 0.8, 2e-3: 0.7}, 0.5) == pytest.approx(4e-3)
    assert _next_matching_lr({1e-3: 0.2, 2e-3: 0.1}, 0.5) == pytest.approx(5e-4)
    # The bracket has closed (within 5%), or non-monotone results leave no bracket: stop.
    assert _next_matching_lr({1e-3: 0.8, 1.04e-3: 0.1}, 0.5) is None
    assert _next_matching_lr({2e-3: 0.8, 1e-3: 0.1}, 0.5) is None
    assert _next_matching_lr({}, 0.5) is None


def test_demo_flags_reach_the_settings():
    import argparse

    from asu.commands.demo import _settings_from_args, add_arguments

    parser = argparse.ArgumentParser()
    add_arguments(parser)
    default = _settings_from_args(parser.parse_args([]))
    assert default.layers == "0-1" and default.temperature in default.preview_temperatures
    s = _settings_from_args(
        parser.parse_args(["--layers", "all", "--temperature", "2.5", "--ga-lrs", "1e-3"])
    )
    assert s.layers is None and s.ga_lrs == (1e-3,) and 2.5 in s.preview_temperatures
    assert _settings_from_args(parser.parse_args(["--layers", " 1-2 "])).layers == "1-2"
    with pytest.raises(ValueError, match="ga-lrs"):
        _settings_from_args(parser.parse_args(["--ga-lrs", "fast"]))
    with pytest.raises(ValueError, match="temperature"):
        _settings_from_args(parser.parse_args(["--temperature", "0"]))
    with pytest.raises(ValueError):
        _settings_from_args(parser.parse_args(["--layers", "7-9"]))  # the tiny model has 4 layers


def test_ga_retain_at_matched_forgetting():
    from asu.demo.run import ga_retain_at

    runs = {
        "far": {"forget_rouge": 0.80, "retain_rouge": 0.95},
        "less": {"forget_rouge": 0.48, "retain_rouge": 0.86},  # forgets a little less than the target
        "more": {"forget_rouge": 0.42, "retain_rouge": 0.84},  # a little more
    }
    got = ga_retain_at(runs, list(runs), 0.46)
    # Interpolated between the matched runs either side: 0.84 + (0.46 - 0.42) / 0.06 * 0.02.
    assert got["ga_runs"] == ["less", "more"] and got["ga_retain_rouge"] == pytest.approx(0.84 + 0.02 * 2 / 3)
    one_side = ga_retain_at({k: runs[k] for k in ("far", "more")}, ["far", "more"], 0.46)
    assert one_side["ga_runs"] == ["more"] and one_side["ga_retain_rouge"] == 0.84
    assert ga_retain_at({"far": runs["far"]}, ["far"], 0.46) is None
