"""The paper's recipes: the table, the Python API and ``asu unlearn --preset`` with explicit flags on top."""

from __future__ import annotations

import argparse

import pytest

from asu.commands import unlearn as unlearn_command
from asu.presets import PRESETS, preset_config, preset_values
from asu.unlearn import UnlearnConfig


def test_every_preset_is_a_valid_config_and_names_its_source():
    assert set(PRESETS) == {"tofu", "tofu-continual", "real-world", "muse-news", "muse-books"}
    for name, preset in PRESETS.items():
        cfg = preset_config(name)
        assert cfg.preset == name and preset.sources
        assert all(getattr(cfg, k) == v for k, v in preset.values.items())
        assert cfg.batch_size * cfg.grad_accum == 32  # the authors' effective batch everywhere


def test_preset_values_are_the_papers():
    tofu = preset_values("tofu")
    assert (tofu["temperature"], tofu["lam"], tofu["lr"], tofu["epochs"], tofu["max_length"]) == (
        2.3, 0.1, 1e-5, 5, 500,
    )  # fmt: skip
    assert tofu == {**preset_values("tofu-continual")}
    real = preset_values("real-world")
    assert (real["temperature"], real["lam"], real["lr"], real["max_length"]) == (2.7, 0.05, 5e-6, 300)
    muse = preset_values("muse-news")
    assert muse["lr_schedule"] == "constant" and muse["warmup_epochs"] == 0 and muse["weight_decay"] == 0
    assert muse["retain_reduction"] == "token" and muse["max_length"] == 2048 and muse["epochs"] == 10
    assert preset_values("muse-books") == muse
    # The defaults are the TOFU recipe.
    defaults = UnlearnConfig()
    assert all(getattr(defaults, k) == v for k, v in tofu.items())
    with pytest.raises(ValueError, match="unknown preset 'tofu2'"):
        preset_values("tofu2")
    assert preset_config("tofu", lam=0.5, temperature=3.0).lam == 0.5


def _parse(*argv):
    parser = argparse.ArgumentParser()
    unlearn_command.add_arguments(parser)
    return parser.parse_args(["--model", "m", "--forget", "f.jsonl", "--out", "o", *argv])


def test_cli_preset_then_explicit_flags():
    cfg = unlearn_command._config_from_args(_parse("--preset", "muse-news", "--lr", "3e-5", "--epochs", "2"))
    assert cfg.preset == "muse-news" and cfg.lr == 3e-5 and cfg.epochs == 2  # explicit flags win
    assert (
        cfg.temperature == 2.5 and cfg.lr_schedule == "constant" and cfg.max_length == 2048
    )  # the rest: preset
    plain = unlearn_command._config_from_args(_parse("--temperature", "2.0"))
    assert plain.preset is None and plain.temperature == 2.0 and plain.lam == UnlearnConfig().lam
    with pytest.raises(SystemExit):
        _parse("--preset", "wmdp")
