"""One unlearning run on the tests' tiny Llama, launched by tests/test_distributed.py.

Runs under ``torchrun``/``accelerate launch`` (any number of processes) or as a plain process. The main
process writes ``--result`` (JSON, atomically): the loss history, the run's stats, the world size and engine,
and with ``--probe`` the type and local shape of every LM-head weight the fused losses received.

    python run_unlearn.py --result R.json --config '{"batch_size": 2, ...}' [--out DIR] [--resume]
        [--kill-at-step N] [--probe] [--forget-rows N]
"""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))  # tests/: the tests' tiny model and data in helpers.py

import torch  # noqa: E402
from helpers import FORGET, RETAIN, tiny_model, tiny_tokenizer  # noqa: E402
from transformers import TrainerCallback  # noqa: E402

import asu_kernels  # noqa: E402
from asu.distributed import engine, is_main_process, world_size  # noqa: E402
from asu.files import atomic_write_json  # noqa: E402
from asu.teachers import output_head  # noqa: E402
from asu.unlearn import UnlearnConfig, unlearn  # noqa: E402


class KillAt(TrainerCallback):
    """SIGKILL this rank after optimizer step ``step`` (every rank does it: a job killed by its scheduler)."""

    def __init__(self, step: int) -> None:
        self.step = step

    def on_step_end(self, args, state, control, **kwargs):
        if state.global_step == self.step:
            os.kill(os.getpid(), signal.SIGKILL)


def allow_fsdp_on_cpu() -> None:
    """Let accelerate's FSDP path run on CPU processes (gloo), as it does on GPUs.

    accelerate 1.15 switches its state to FSDP only for accelerator device types; on CPU an FSDP launch
    stays plain MULTI_CPU (DDP). torch's fully_shard itself runs on CPU with gloo, so for the tests the state
    is switched to FSDP after accelerate built it; everything after that (accelerate's fsdp2_prepare_model
    wrapping the objective, the Trainer's FSDP state-dict and checkpoint paths) is the unmodified code.
    """
    from accelerate.state import AcceleratorState, PartialState
    from accelerate.utils import DistributedType

    original = AcceleratorState.__init__

    def patched(self, *args, **kwargs):
        original(self, *args, **kwargs)
        plugin = kwargs.get("fsdp_plugin")
        if plugin is not None and self.distributed_type == DistributedType.MULTI_CPU:
            self.distributed_type = DistributedType.FSDP
            self.fsdp_plugin = plugin
            # What accelerate itself does on GPUs: later AcceleratorState() calls copy the partial state.
            PartialState._shared_state["distributed_type"] = DistributedType.FSDP

    AcceleratorState.__init__ = patched


def probe_fused_ops(record: list) -> None:
    """Wrap the fused ops so every LM-head weight they get is recorded (type, local shape)."""
    for name in ("linear_kl", "linear_cross_entropy"):
        original = getattr(asu_kernels, name)

        def wrapped(*args, _original=original, _name=name, **kwargs):
            weights = [args[1]] + ([args[3]] if _name == "linear_kl" else [])
            for w in weights:
                record.append([_name, type(w).__name__, list(w.shape)])
            return _original(*args, **kwargs)

        setattr(asu_kernels, name, wrapped)


def main() -> int:
    p = argparse.ArgumentParser()
    p.add_argument("--result", required=True)
    p.add_argument("--config", default="{}")
    p.add_argument("--out")
    p.add_argument("--resume", action="store_true")
    p.add_argument("--kill-at-step", type=int)
    p.add_argument("--probe", action="store_true")
    p.add_argument("--forget-rows", type=int, default=8)
    a = p.parse_args()

    torch.use_deterministic_algorithms(True)
    if engine() == "fsdp" and not torch.cuda.is_available():
        allow_fsdp_on_cpu()
    tok = tiny_tokenizer()
    forget = (FORGET + RETAIN + FORGET)[: a.forget_rows]
    cfg = UnlearnConfig(**{"progress": False, "max_length": 64, "lr": 1e-3, **json.loads(a.config)})
    probe: list = []
    if a.probe:
        probe_fused_ops(probe)
    callbacks = [KillAt(a.kill_at_step)] if a.kill_at_step else []
    try:
        result = unlearn(
            tiny_model(vocab_size=len(tok)), tok, forget, RETAIN, cfg, output_dir=a.out, resume=a.resume,
            callbacks=callbacks,
        )  # fmt: skip
    except (ValueError, TypeError) as e:
        # Bad input: one clear line on stderr, exit status 2 (what `asu unlearn` does).
        print(f"run_unlearn: error: {e}", file=sys.stderr)
        return 2
    # Outside the wrapped forward the student's head is a shard under FSDP: the guard must refuse it.
    try:
        output_head(result.model)
        guard = "passed"
    except RuntimeError as e:
        guard = f"raised: {e}"
    out = {
        "world": world_size(),
        "engine": engine(),
        "history": result.history,
        "stats": result.stats,
        "probe": probe,
        "guard_outside_forward": guard,
        "param_types": sorted({type(p).__name__ for p in result.model.parameters()}),
        "head_type": type(result.model.get_output_embeddings().weight).__name__,
        "vocab": len(tok),
        "hidden": result.model.config.hidden_size,
    }
    if is_main_process():
        atomic_write_json(a.result, out, indent=None, default=str)
    return 0


if __name__ == "__main__":
    sys.exit(main())
