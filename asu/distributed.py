"""What asu needs to run unchanged under ``accelerate launch`` (DDP, FSDP2, DeepSpeed ZeRO-3).

Everything here works before and after ``torch.distributed`` is initialised: ranks come from the process
group when there is one, else from the variables every launcher sets (``RANK``, ``WORLD_SIZE``,
``LOCAL_RANK``), else a single process (rank 0 of 1).

* rank helpers: :func:`world_size`, :func:`rank`, :func:`local_rank`, :func:`is_main_process`,
  :func:`barrier`, :func:`engine` (``single|ddp|fsdp|deepspeed`` from the launcher's environment);
* :func:`check_launch`: the checks that must fail before any training starts (a world size that does not
  divide the data into whole global batches, a DeepSpeed config whose batch fields disagree with the run, a
  LoRA rank or teacher that a ZeRO-3 config cannot hold);
* :func:`check_full_weight`: the guard the fused vocabulary losses call on every LM-head weight they read, so
  a sharded slice (an FSDP2 ``DTensor`` shard, a ZeRO-3 partition of shape ``(0,)``) raises instead of
  silently computing a softmax over part of the vocabulary;
* :func:`shard_indices` / :func:`gather_rows`: the cache teacher's split of the forget set, each rank
  computing ``1 / world`` of the teacher passes, then an all-gather so every rank holds every example's rows
  (the sampler hands each rank different examples every epoch);
* :func:`complete_checkpoints`: the checkpoints a killed run left that are safe to resume from.

Step semantics under data parallelism: a rank's micro-batch loss is the objective's mean over that
micro-batch; DDP/FSDP average gradients over ranks and the Trainer averages over accumulation steps, so an
optimizer step on ``W`` ranks with ``grad_accum = A`` optimises the mean of ``W * A`` micro-batch losses, the
same as one process with ``grad_accum = W * A`` and the same per-device batch (the data order is the
same: accelerate deals batch ``k`` of the seeded permutation to rank ``k % W``).
"""

from __future__ import annotations

import json
import os
from collections.abc import Mapping, Sequence
from typing import Any

import torch

__all__ = [
    "world_size",
    "rank",
    "local_rank",
    "is_main_process",
    "is_local_main_process",
    "barrier",
    "engine",
    "deepspeed_config",
    "check_launch",
    "check_full_weight",
    "shard_indices",
    "gather_rows",
    "complete_checkpoints",
]

_TRUE = ("1", "true", "yes")


def _dist_ready() -> bool:
    return torch.distributed.is_available() and torch.distributed.is_initialized()


def _env_int(name: str, default: int, env: Mapping[str, str] | None = None) -> int:
    env = os.environ if env is None else env
    value = env.get(name)
    if value is None or value == "":
        return default
    try:
        return int(value)
    except ValueError:
        raise ValueError(f"environment variable {name}={value!r} is not an integer") from None


def world_size() -> int:
    """Number of processes in the run (1 without a launcher)."""
    return torch.distributed.get_world_size() if _dist_ready() else _env_int("WORLD_SIZE", 1)


def rank() -> int:
    """Global rank of this process (0 without a launcher)."""
    return torch.distributed.get_rank() if _dist_ready() else _env_int("RANK", 0)


def local_rank() -> int:
    """Rank of this process on its node (0 without a launcher)."""
    return _env_int("LOCAL_RANK", 0)


def is_main_process() -> bool:
    """True on global rank 0: the one process that writes ``run.json``, checkpoints and the result."""
    return rank() == 0


def is_local_main_process() -> bool:
    """True on local rank 0: one process per node (for node-local files such as an on-disk cache)."""
    return local_rank() == 0


def barrier() -> None:
    """Wait for every rank (no-op in a single process or before the process group exists)."""
    if _dist_ready() and torch.distributed.get_world_size() > 1:
        torch.distributed.barrier()


def engine(env: Mapping[str, str] | None = None) -> str:
    """``deepspeed``, ``fsdp``, ``ddp`` or ``single``, from the variables ``accelerate launch`` sets."""
    env = os.environ if env is None else env
    if env.get("ACCELERATE_USE_DEEPSPEED", "").lower() in _TRUE:
        return "deepspeed"
    if env.get("ACCELERATE_USE_FSDP", "").lower() in _TRUE:
        return "fsdp"
    return "ddp" if _env_int("WORLD_SIZE", 1, env) > 1 else "single"


def deepspeed_config(env: Mapping[str, str] | None = None) -> dict[str, Any] | None:
    """The DeepSpeed JSON config of this launch (``ACCELERATE_DEEPSPEED_CONFIG_FILE``), or None.

    Without a file, accelerate builds the config from its own variables; only the ZeRO stage
    (``ACCELERATE_DEEPSPEED_ZERO_STAGE``) and the ``zero3_init`` flag matter to the checks here.
    """
    env = os.environ if env is None else env
    if engine(env) != "deepspeed":
        return None
    path = env.get("ACCELERATE_DEEPSPEED_CONFIG_FILE")
    if path:
        if not os.path.isfile(path):
            raise ValueError(f"DeepSpeed config file {path} does not exist")
        try:
            with open(path) as f:
                config = json.load(f)
        except json.JSONDecodeError as e:
            raise ValueError(f"DeepSpeed config file {path} is not valid JSON: {e}") from None
        if not isinstance(config, dict):
            raise ValueError(f"DeepSpeed config file {path} must hold a JSON object")
        return config
    stage = _env_int("ACCELERATE_DEEPSPEED_ZERO_STAGE", 2, env)
    return {"zero_optimization": {"stage": stage}}


def _explicit(value: Any) -> bool:
    return value is not None and value != "auto"


def _check_deepspeed(cfg: Any, world: int, config: dict[str, Any], model_config: Any, env: Mapping) -> None:
    micro = config.get("train_micro_batch_size_per_gpu")
    accum = config.get("gradient_accumulation_steps")
    total = config.get("train_batch_size")
    if _explicit(micro) and micro != cfg.batch_size:
        raise ValueError(
            f"the DeepSpeed config sets train_micro_batch_size_per_gpu={micro} but batch_size is "
            f'{cfg.batch_size}; set it to "auto" or make them equal'
        )
    if _explicit(accum) and accum != cfg.grad_accum:
        raise ValueError(
            f"the DeepSpeed config sets gradient_accumulation_steps={accum} but grad_accum is "
            f'{cfg.grad_accum}; set it to "auto" or make them equal'
        )
    if _explicit(total) and total != cfg.batch_size * cfg.grad_accum * world:
        raise ValueError(
            f"the DeepSpeed config sets train_batch_size={total}, but batch_size {cfg.batch_size} x "
            f"grad_accum {cfg.grad_accum} x world {world} = {cfg.batch_size * cfg.grad_accum * world}"
        )
    zero = config.get("zero_optimization") or {}
    if zero.get("stage") != 3:
        return
    zero3_init = env.get("ACCELERATE_DEEPSPEED_ZERO3_INIT", "").lower() in _TRUE
    if cfg.teacher == "copy" and zero3_init:
        # Under zero.Init every parameter is a (0,)-shaped partition; a deep copy is an empty model.
        raise ValueError(
            "teacher='copy' cannot be built from a ZeRO-3 partitioned model (zero3_init_flag: true); "
            "use teacher='cache', or lora_r > 0 with teacher='base', or set zero3_init_flag: false"
        )
    if cfg.lora_r > 0:
        if model_config is None:
            return
        # Under ZeRO-3 the projection weights are partitions of shape (0,): PEFT cannot see a rank that
        # exceeds a projection's size until the first gathered forward, after the engine is built.
        head_dim = getattr(model_config, "head_dim", None) or (
            model_config.hidden_size // model_config.num_attention_heads
        )
        kv = getattr(model_config, "num_key_value_heads", None) or model_config.num_attention_heads
        smallest = min(model_config.hidden_size, kv * head_dim)
        if cfg.lora_r > smallest:
            raise ValueError(
                f"lora_r={cfg.lora_r} exceeds the smallest projection of the model ({smallest}: "
                f"k/v heads {kv} x head dim {head_dim}); a ZeRO-3 partitioned model cannot "
                "hold an adapter of that rank: choose lora_r <= " + str(smallest)
            )


def check_launch(
    cfg: Any,
    num_examples: int,
    *,
    model_config: Any = None,
    world: int | None = None,
    env: Mapping[str, str] | None = None,
) -> None:
    """Everything about the launch that must fail before training starts (ValueError naming the problem).

    Args:
        cfg: the run's :class:`asu.unlearn.UnlearnConfig`.
        num_examples: forget examples per epoch (the unlearning dataset's length).
        model_config: the model's ``PretrainedConfig`` (for the LoRA rank check), or None.
        world, env: the world size and environment (default: this process's).

    With ``W > 1`` ranks each epoch must split into whole global batches of ``batch_size * W`` examples:
    otherwise accelerate pads the last one by repeating examples on some ranks, so ranks no longer see
    disjoint data and the run is not the single-process run with the same effective batch.
    """
    env = os.environ if env is None else env
    world = _env_int("WORLD_SIZE", 1, env) if world is None else world
    if not isinstance(world, int) or world < 1:
        raise ValueError(f"world size must be a positive int, got {world!r}")
    if not isinstance(num_examples, int) or num_examples < 1:
        raise ValueError(f"num_examples must be a positive int, got {num_examples!r}")
    if world > 1 and num_examples % (cfg.batch_size * world) != 0:
        fits = [b for b in range(1, num_examples + 1) if num_examples % (b * world) == 0]
        hint = f"batch_size in {fits[:8]}" if fits else f"a forget set whose size is a multiple of {world}"
        raise ValueError(
            f"world size {world} x batch_size {cfg.batch_size} = {cfg.batch_size * world} does not divide "
            f"the {num_examples} forget examples: the last global batch would repeat examples on some ranks; "
            f"use {hint}"
        )
    ds = deepspeed_config(env)
    if ds is not None:
        _check_deepspeed(cfg, world, ds, model_config, env)


def check_full_weight(weight: torch.Tensor, rows: int | None, what: str = "LM-head weight") -> None:
    """Raise RuntimeError unless ``weight`` is a whole, local (rows, d) tensor.

    A DTensor (FSDP2 shard outside the wrapped forward) or a ZeRO-3 partition (shape ``(0,)``) would make
    the fused vocabulary losses normalise over a slice of the vocabulary without any error.
    """
    if type(weight).__name__ == "DTensor" or hasattr(weight, "_local_tensor"):
        local = tuple(weight.to_local().shape) if hasattr(weight, "to_local") else "?"
        raise RuntimeError(
            f"the {what} is a sharded DTensor (local {local} of {tuple(weight.shape)}) here: the fused "
            "vocabulary losses must run inside the wrapped module's forward, where FSDP has gathered it"
        )
    if weight.dim() != 2 or weight.numel() == 0 or (rows is not None and weight.shape[0] != rows):
        raise RuntimeError(
            f"the {what} has local shape {tuple(weight.shape)}, expected ({rows}, d): it is a "
            "shard/partition (ZeRO-3 or FSDP), not the gathered weight"
        )


def shard_indices(n: int, rank_: int | None = None, world: int | None = None) -> list[int]:
    """The examples this rank computes: ``rank, rank + W, rank + 2W, ...`` (balanced within one example)."""
    rank_ = rank() if rank_ is None else rank_
    world = world_size() if world is None else world
    if not 0 <= rank_ < world:
        raise ValueError(f"rank {rank_} is outside world size {world}")
    return list(range(rank_, n, world))


def gather_rows(rows: Sequence[torch.Tensor], indices: Sequence[int], n: int) -> list[torch.Tensor]:
    """All ranks' ``rows`` (one tensor per example, for ``indices``) -> every example's rows, in order.

    One process (or no process group): ``rows`` must already cover ``range(n)``. With a process group, an
    ``all_gather_object`` of CPU tensors: every rank then holds the whole cache (what it costs is the cache
    size in CPU memory per rank, which the single-process cache holds too).
    """
    if len(rows) != len(indices):
        raise ValueError(f"{len(rows)} row tensors for {len(indices)} indices")
    if _dist_ready() and torch.distributed.get_world_size() > 1:
        parts: list[Any] = [None] * torch.distributed.get_world_size()
        torch.distributed.all_gather_object(parts, (list(indices), [r.cpu() for r in rows]))
    else:
        parts = [(list(indices), list(rows))]
    out: list[torch.Tensor | None] = [None] * n
    for idx, tensors in parts:
        for i, t in zip(idx, tensors, strict=True):
            out[i] = t
    missing = [i for i, t in enumerate(out) if t is None]
    if missing:
        raise RuntimeError(f"no rank computed the teacher rows of examples {missing[:5]}")
    return out  # type: ignore[return-value]


def complete_checkpoints(directory: str, world: int | None = None) -> list[str]:
    """``checkpoint-N`` folders under ``directory`` that a resume can trust, oldest first.

    The Trainer writes a checkpoint piece by piece (model, optimizer, each rank's RNG state, and
    ``trainer_state.json`` last on the main process), so a killed rank can leave a folder that looks like a
    checkpoint. A complete one has ``trainer_state.json``, the weights, and one RNG state per rank.
    """
    if not os.path.isdir(directory):
        return []
    world = world_size() if world is None else world
    found = []
    for name in os.listdir(directory):
        if not (name.startswith("checkpoint-") and name.split("-")[-1].isdigit()):
            continue
        path = os.path.join(directory, name)
        files = set(os.listdir(path)) if os.path.isdir(path) else set()
        weights = any(
            f in files
            for f in ("model.safetensors", "model.safetensors.index.json", "adapter_model.safetensors")
        ) or any(f.startswith("pytorch_model_fsdp") or f.startswith("global_step") for f in files)
        rng = (
            "rng_state.pth" in files
            if world == 1
            else all(f"rng_state_{r}.pth" in files for r in range(world))
        )
        if "trainer_state.json" in files and weights and rng:
            found.append(name)
    return sorted(found, key=lambda d: int(d.split("-")[-1]))
