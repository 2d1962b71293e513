"""asu under data parallelism: two CPU processes (gloo) against one, on the tests' tiny Llama.

The runs are subprocesses of ``tests/dist_scripts/run_unlearn.py``: a single process with ``grad_accum = 2``,
DDP under ``torchrun --standalone --nproc_per_node 2`` and FSDP2 under ``accelerate launch`` with the shipped
``examples/accelerate/fsdp2.yaml``, each with per-device batch 2, so the effective batch is 4 everywhere
(see :mod:`asu.distributed` for why these runs optimise the same objective step for step).
"""

from __future__ import annotations

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from helpers import FORGET, RETAIN, assert_weights_close, tiny_config, tiny_model
from safetensors.torch import load_file

from asu.distributed import (
    check_full_weight,
    check_launch,
    complete_checkpoints,
    engine,
    gather_rows,
    shard_indices,
)
from asu.unlearn import UnlearnConfig

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "tests" / "dist_scripts" / "run_unlearn.py"
BIN = Path(sys.executable).parent
TIMEOUT = 400
# 8 forget rows, batch 2 per device, 2 epochs: 4 optimizer steps of 4 examples in every configuration.
BASE = {"batch_size": 2, "epochs": 2, "teacher": "copy", "save_steps": 1}
SINGLE = {**BASE, "grad_accum": 2}
PARALLEL = {**BASE, "grad_accum": 1}


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def _launch(
    kind: str, result: Path, config: dict, *extra: str, accelerate_config: Path | None = None
) -> subprocess.CompletedProcess:
    env = {
        **os.environ,
        "ASU_KERNELS_BACKEND": "reference",  # the fused ops' plain path: the Trainer runs many steps
        "OMP_NUM_THREADS": "1",
        "TOKENIZERS_PARALLELISM": "false",
        "CUDA_VISIBLE_DEVICES": "",
    }
    for name in list(env):
        if name.startswith(("ACCELERATE_", "FSDP_")) or name in ("RANK", "WORLD_SIZE", "LOCAL_RANK"):
            del env[name]
    args = [str(SCRIPT), "--result", str(result), "--config", json.dumps(config), "--probe", *extra]
    if kind == "single":
        cmd = [sys.executable, *args]
    elif kind == "ddp":
        cmd = [str(BIN / "torchrun"), "--standalone", "--nproc_per_node", "2", *args]
    elif kind in ("fsdp", "deepspeed"):
        default = ROOT / "examples" / "accelerate" / "fsdp2.yaml"
        cmd = [
            str(BIN / "accelerate"), "launch",
            "--config_file", str(accelerate_config or default),
            "--num_processes", "2",
            "--mixed_precision", "no",
            "--main_process_port", str(_free_port()),
            *args,
        ]  # fmt: skip
    else:
        raise ValueError(kind)
    return subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=TIMEOUT)


def _run(kind: str, tmp: Path, config: dict, *extra: str, **kwargs) -> dict:
    result = tmp / f"{kind}.json"
    proc = _launch(kind, result, config, *extra, **kwargs)
    assert proc.returncode == 0, proc.stderr[-4000:]
    return json.loads(result.read_text())


def _curve(run: dict, key: str = "loss") -> list[float]:
    return [h[key] for h in run["history"]]


def _assert_same_run(run: dict, reference: dict, tol: float = 1e-4) -> None:
    assert [h["step"] for h in run["history"]] == [h["step"] for h in reference["history"]] == [1, 2, 3, 4]
    for key in ("loss", "forget_loss", "retain_loss"):
        assert _curve(run, key) == pytest.approx(_curve(reference, key), abs=tol, rel=0), key
    assert run["stats"]["effective_batch_size"] == reference["stats"]["effective_batch_size"] == 4


def _assert_whole_heads(run: dict) -> None:
    # Every LM-head weight the fused KL / cross-entropy received was the whole local (V, d) tensor.
    assert run["probe"], "the fused ops were never called"
    for name, kind, shape in run["probe"]:
        assert kind != "DTensor" and shape == [run["vocab"], run["hidden"]], (name, kind, shape)


def _assert_written_once(out: Path) -> None:
    assert (out / "run.json").is_file() and (out / "model.safetensors").is_file()
    assert not (out / "checkpoints").exists()
    assert not [p.name for p in out.iterdir() if p.name.startswith(".")], "temporary files left behind"
    record = json.loads((out / "run.json").read_text())
    assert len(record["losses"]) == 4


def _assert_same_weights(out: Path, reference: dict) -> None:
    # The whole model the run wrote, however its training sharded it, against the one-process run's.
    assert_weights_close(load_file(str(out / "model.safetensors")), reference["weights"])


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> dict:
    tmp = tmp_path_factory.mktemp("single")
    run = _run("single", tmp, SINGLE, "--out", str(tmp / "out"))
    run["weights"] = load_file(str(tmp / "out" / "model.safetensors"))
    assert run["world"] == 1 and run["engine"] == "single"
    return run


def test_ddp_with_sharded_cache_teacher_matches_one_process(reference, tmp_path):
    # The cache teacher (fp32, so it equals the copy teacher) is built half per rank, then all-gathered.
    config = {**PARALLEL, "teacher": "cache", "cache_dtype": "float32"}
    run = _run("ddp", tmp_path, config, "--out", str(tmp_path / "out"))
    assert run["world"] == 2 and run["engine"] == "ddp"
    _assert_same_run(run, reference)
    _assert_whole_heads(run)
    # 8 forget examples, teacher batch 2: 4 passes in one process, 2 per rank here.
    assert run["stats"]["teacher"]["teacher_forward_passes"] == 2
    _assert_written_once(tmp_path / "out")
    _assert_same_weights(tmp_path / "out", reference)


def test_fsdp2_matches_one_process_and_sees_the_gathered_head(reference, tmp_path):
    run = _run("fsdp", tmp_path, PARALLEL, "--out", str(tmp_path / "out"))
    assert run["world"] == 2 and run["engine"] == "fsdp"
    _assert_same_run(run, reference)
    # Inside the objective's forward the head was whole; outside it the student's head is a DTensor shard,
    # which the guard refuses (the same guard runs on every call inside the losses).
    _assert_whole_heads(run)
    assert run["head_type"] == "DTensor"
    assert run["guard_outside_forward"].startswith("raised: the LM-head weight is a sharded DTensor")
    _assert_written_once(tmp_path / "out")
    _assert_same_weights(tmp_path / "out", reference)  # gathered from the shards


def test_zero3_matches_one_process_and_sees_the_gathered_head(reference, tmp_path):
    # DeepSpeed is optional (not installed by the Makefile); it runs on CPU with gloo where it is installed.
    pytest.importorskip("deepspeed")
    ds = json.loads((ROOT / "examples" / "accelerate" / "zero3.json").read_text())
    ds["zero_optimization"]["stage3_param_persistence_threshold"] = 0  # partition even the tiny tensors
    (tmp_path / "zero3.json").write_text(json.dumps(ds))
    yaml = (ROOT / "examples" / "accelerate" / "zero3.yaml").read_text()
    (tmp_path / "zero3.yaml").write_text(
        yaml.replace("examples/accelerate/zero3.json", str(tmp_path / "zero3.json"))
    )
    run = _run(
        "deepspeed",
        tmp_path,
        PARALLEL,
        "--out",
        str(tmp_path / "out"),
        accelerate_config=tmp_path / "zero3.yaml",
    )
    assert run["world"] == 2 and run["engine"] == "deepspeed"
    _assert_same_run(run, reference)
    _assert_whole_heads(run)
    # Outside the engine's forward the head is a (0,) partition, which the guard refuses.
    assert run["guard_outside_forward"].startswith("raised: the LM-head weight has local shape (0,)")
    _assert_written_once(tmp_path / "out")
    _assert_same_weights(tmp_path / "out", reference)  # consolidated from the partitions


def test_killed_ranks_resume_to_the_same_loss(reference, tmp_path):
    out = tmp_path / "out"
    killed = _launch("ddp", tmp_path / "killed.json", PARALLEL, "--out", str(out), "--kill-at-step", "3")
    assert killed.returncode != 0  # both ranks SIGKILLed after step 3, before its checkpoint
    assert not (out / "run.json").exists() and not (out / "model.safetensors").exists()
    assert complete_checkpoints(str(out / "checkpoints"), world=2) == ["checkpoint-2"]
    # A rank that died while writing checkpoint-3 leaves a folder that must not be resumed from.
    partial = out / "checkpoints" / "checkpoint-3"
    partial.mkdir()
    (partial / "model.safetensors").write_bytes(
        (out / "checkpoints" / "checkpoint-2" / "model.safetensors").read_bytes()
    )
    assert complete_checkpoints(str(out / "checkpoints"), world=2) == ["checkpoint-2"]

    run = _run("ddp", tmp_path, PARALLEL, "--out", str(out), "--resume")
    _assert_same_run(run, reference, tol=1e-5)
    _assert_written_once(out)


# ---- checks that need no second process ----------------------------------------------------------------


def test_world_size_that_does_not_divide_the_data_fails_before_training(tok, monkeypatch, tmp_path):
    from asu.unlearn import unlearn

    monkeypatch.setenv("WORLD_SIZE", "2")  # what torchrun sets before the process group exists
    cfg = UnlearnConfig(batch_size=2, epochs=1, max_length=64, progress=False)
    with pytest.raises(ValueError, match=r"world size 2 x batch_size 2 = 4 does not divide the 5 forget"):
        unlearn(tiny_model(vocab_size=len(tok)), tok, FORGET, RETAIN, cfg, output_dir=str(tmp_path / "o"))
    assert not (tmp_path / "o").exists()  # nothing written, nothing trained


def _ds_env(tmp_path: Path, config: dict, zero3_init: bool = False) -> dict:
    path = tmp_path / f"ds{len(list(tmp_path.glob('ds*.json')))}.json"  # a new file per config
    path.write_text(json.dumps(config))
    return {
        "ACCELERATE_USE_DEEPSPEED": "true",
        "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(path),
        "ACCELERATE_DEEPSPEED_ZERO3_INIT": "true" if zero3_init else "false",
        "WORLD_SIZE": "2",
    }


def test_launch_checks(tmp_path):
    model_config = tiny_config("llama")
    cfg = UnlearnConfig(batch_size=2, grad_accum=2)
    check_launch(cfg, 8, world=2, env={})
    check_launch(cfg, 5, world=1, env={})  # one process: a partial last batch is fine
    with pytest.raises(ValueError, match=r"batch_size in \[1, 3\]"):
        check_launch(cfg, 9, world=3, env={})

    zero3 = json.loads((ROOT / "examples" / "accelerate" / "zero3.json").read_text())
    env = _ds_env(tmp_path, zero3)
    assert engine(env) == "deepspeed"
    check_launch(cfg, 8, model_config=model_config, env=env)  # the shipped config: all "auto"
    offload = json.loads((ROOT / "examples" / "accelerate" / "zero3_offload.json").read_text())
    check_launch(cfg, 8, model_config=model_config, env=_ds_env(tmp_path, offload))
    with pytest.raises(ValueError, match="train_micro_batch_size_per_gpu=4 but batch_size is 2"):
        check_launch(cfg, 8, env=_ds_env(tmp_path, {**zero3, "train_micro_batch_size_per_gpu": 4}))
    with pytest.raises(
        ValueError, match=("train_batch_size=16, but batch_size 2 x grad_accum 2 x world 2 = 8")
    ):
        check_launch(cfg, 8, env=_ds_env(tmp_path, {**zero3, "train_batch_size": 16}))

    # LoRA rank larger than the k/v projections (2 heads x 16 = 32) of a ZeRO-3 partitioned model.
    lora = UnlearnConfig(batch_size=2, grad_accum=2, lora_r=48, teacher="base")
    with pytest.raises(ValueError, match=r"lora_r=48 exceeds the smallest projection of the model \(32"):
        check_launch(lora, 8, model_config=model_config, env=env)
    check_launch(
        UnlearnConfig(batch_size=2, lora_r=32, teacher="base"), 8, model_config=model_config, env=env
    )
    with pytest.raises(ValueError, match="teacher='copy' cannot be built from a ZeRO-3 partitioned model"):
        check_launch(cfg, 8, model_config=model_config, env=_ds_env(tmp_path, zero3, zero3_init=True))
    with pytest.raises(ValueError, match="does not exist"):
        check_launch(cfg, 8, env={**env, "ACCELERATE_DEEPSPEED_CONFIG_FILE": str(tmp_path / "missing.json")})


def test_full_weight_guard():
    check_full_weight(torch.randn(50, 8), 50)
    with pytest.raises(RuntimeError, match=r"local shape \(25, 8\), expected \(50, d\)"):
        check_full_weight(torch.randn(50, 8)[:25], 50)  # a row shard
    with pytest.raises(RuntimeError, match="shard/partition"):
        check_full_weight(torch.empty(0), 50)  # a ZeRO-3 partition outside its gather


def test_cache_sharding_helpers():
    assert shard_indices(5, 0, 2) == [0, 2, 4] and shard_indices(5, 1, 2) == [1, 3]
    with pytest.raises(ValueError, match="outside world size"):
        shard_indices(5, 2, 2)
    rows = [torch.full((i + 1, 3), float(i)) for i in range(3)]
    assert all(torch.equal(a, b) for a, b in zip(gather_rows(rows, [0, 1, 2], 3), rows, strict=True))
    with pytest.raises(RuntimeError, match=r"examples \[2\]"):
        gather_rows(rows[:2], [0, 1], 3)


def test_complete_checkpoints(tmp_path):
    def make(name: str, files: list[str]) -> None:
        (tmp_path / name).mkdir()
        for f in files:
            (tmp_path / name / f).write_text("x")

    make("checkpoint-2", ["model.safetensors", "trainer_state.json", "rng_state_0.pth", "rng_state_1.pth"])
    make("checkpoint-10", ["model.safetensors", "trainer_state.json", "rng_state_0.pth"])  # rank 1 died
    make("checkpoint-12", ["model.safetensors", "rng_state_0.pth", "rng_state_1.pth"])  # no trainer state
    assert complete_checkpoints(str(tmp_path), world=2) == ["checkpoint-2"]
    make("checkpoint-1", ["adapter_model.safetensors", "trainer_state.json", "rng_state.pth"])
    assert complete_checkpoints(str(tmp_path), world=1) == ["checkpoint-1"]


def test_fsdp2_lora_base_teacher_matches_one_process(tmp_path):
    # The base teacher is the FSDP-sharded PEFT student with its adapters off: no second model anywhere.
    lora = {"teacher": "base", "lora_r": 4}
    (tmp_path / "a").mkdir()
    one = _run("single", tmp_path / "a", {**SINGLE, **lora})
    run = _run("fsdp", tmp_path, {**PARALLEL, **lora}, "--out", str(tmp_path / "out"))
    _assert_same_run(run, one)
    _assert_whole_heads(run)
    assert (tmp_path / "out" / "adapter_model.safetensors").is_file() and (
        tmp_path / "out" / "run.json"
    ).is_file()
