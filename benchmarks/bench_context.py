"""Longest context: the longest sequence for which one ASU training step fits on the GPU.

One step on one sequence of N tokens at a Llama-3.2-1B-like shape (bf16, random init, gradient
checkpointing on for both pipelines, KL counted at every position): the teacher's forward at tau = 2.3, the
student's forward, the KL(teacher || student) over the 128256-token vocabulary, and the student's backward.
The optimiser step is not part of it (its state does not depend on N).

* ``authors``: a frozen teacher copy, eager attention, full logits in fp32, ``F.kl_div``.
* ``ours``: the asu layer's attention; the teacher is the same model under smoothing (no copy) producing last
  hidden states only; ``asu_kernels.linear_kl`` against a frozen copy of the LM head.

N doubles from 1024 until a step runs out of memory (or reaches ``max_tokens``), then bisects between the last
fit and the first failure down to 1024 tokens. Each fitting trial adds rows (step time ``s``, peak ``GB``) at
its N; the result is a row of metric ``max_tokens``. CUDA only: on CPU one ``skip`` row says so.
"""

from __future__ import annotations

import copy
import time
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F

from asu.demo.tiny import seeded_llama
from asu.smoothing import set_smoothing, smoothing
from asu.trainer import enable_activation_checkpointing
from benchmarks.bench_e2e import LLAMA_1B
from benchmarks.common import Recorder, is_oom, peak_memory_gb, release_memory

TEMPERATURE = 2.3
RESOLUTION = 1024


def _model(device: str, attn: str) -> torch.nn.Module:
    shape = dict(LLAMA_1B, max_position_embeddings=max(LLAMA_1B["max_position_embeddings"], 1 << 20))
    model = seeded_llama(
        0, device=device, dtype=torch.bfloat16, **shape, attn_implementation=attn, use_cache=False
    )
    enable_activation_checkpointing(model)
    model.train()
    return model


def authors_step(model: torch.nn.Module, teacher: torch.nn.Module, ids: torch.Tensor) -> None:
    with torch.no_grad():
        log_p = F.log_softmax(teacher(input_ids=ids).logits.float()[0], -1)
    log_q = F.log_softmax(model(input_ids=ids).logits.float()[0], -1)
    F.kl_div(log_q, log_p, reduction="batchmean", log_target=True).backward()


def ours_step(model: torch.nn.Module, frozen_head: torch.Tensor, ids: torch.Tensor) -> None:
    import asu_kernels

    with torch.no_grad(), smoothing(model, TEMPERATURE):
        h_t = model.model(input_ids=ids).last_hidden_state[0]
    h_s = model.model(input_ids=ids).last_hidden_state[0]
    asu_kernels.linear_kl(h_s, model.lm_head.weight, h_t, frozen_head).backward()


def _trial(step: Callable[[torch.Tensor], None], model: torch.nn.Module, n: int, device: str):
    """Run one step at N = n. Returns (seconds, peak GB) or None on out-of-memory."""
    ids = torch.randint(3, LLAMA_1B["vocab_size"], (1, n), device=device)
    result: dict[str, float] = {}

    def timed() -> None:
        t0 = time.perf_counter()
        step(ids)
        torch.cuda.synchronize()
        result["s"] = time.perf_counter() - t0

    oom = False
    try:
        mem, _ = peak_memory_gb(timed, device)
    except Exception as e:  # noqa: BLE001 - only OOM is an answer; anything else is re-raised
        if not is_oom(e):
            raise
        oom = True
    # Outside the except block, so the traceback (and the activations its frames hold) is already gone.
    model.zero_grad(set_to_none=True)
    release_memory(device)
    return None if oom else (result["s"], mem)


def longest(
    rec: Recorder,
    base: dict[str, Any],
    step: Callable[[torch.Tensor], None],
    model: torch.nn.Module,
    *,
    max_tokens: int,
    deadline: float,
) -> tuple[int, int | None]:
    """Doubling then bisecting search, no new trial after ``deadline`` (a ``time.perf_counter`` value);
    returns (longest N that fit, first N that did not or None)."""
    device = rec.device
    fit, fail = 0, None
    n = RESOLUTION
    while n <= max_tokens:
        out = _trial(step, model, n, device)
        if out is None:
            fail = n
            break
        fit = n
        rec.add({**base, "seqlen": n}, "s", out[0], note="one step")
        rec.add({**base, "seqlen": n}, "GB", out[1], note="peak allocated during the step")
        if time.perf_counter() > deadline:
            break
        n *= 2
    while fail is not None and fail - fit > RESOLUTION and time.perf_counter() < deadline:
        mid = (fit + fail) // 2 // RESOLUTION * RESOLUTION
        out = _trial(step, model, mid, device)
        if out is None:
            fail = mid
        else:
            fit = mid
            rec.add({**base, "seqlen": mid}, "s", out[0], note="one step")
            rec.add({**base, "seqlen": mid}, "GB", out[1], note="peak allocated during the step")
    return fit, fail


def run(
    rec: Recorder,
    suite: str,
    *,
    tiny: bool = False,
    max_tokens: int | None = None,
    budget_s: float | None = None,
) -> None:
    """Search the longest ASU step for both pipelines; quick caps N at 128k, full at 512k.

    ``budget_s`` (default 150 s quick, 900 s full) bounds the whole search: no trial starts after it, and
    the longest fit so far is recorded.
    """
    device = rec.device
    columns = {
        "dtype": torch.bfloat16,
        "batch": 1,
        "heads_q": LLAMA_1B["num_attention_heads"],
        "heads_kv": LLAMA_1B["num_key_value_heads"],
        "head_dim": LLAMA_1B["head_dim"],
        "causal": True,
        "temperature": TEMPERATURE,
        "hidden": LLAMA_1B["hidden_size"],
        "vocab": LLAMA_1B["vocab_size"],
        "params": "model=llama-1b-shape;gradient_checkpointing=true",
    }
    cap = max_tokens or (131072 if suite == "quick" else 524288)
    if budget_s is None:
        budget_s = 150.0 if suite == "quick" else 900.0
    deadline = time.perf_counter() + budget_s
    for provider in ("authors", "ours"):
        base = {"benchmark": "context", "provider": provider, "mode": "step", **columns}
        if not device.startswith("cuda"):
            rec.status_row(base, "skip", "the longest-context search needs a CUDA GPU", metric="max_tokens")
            continue

        def body(provider=provider, base=base) -> None:
            if provider == "ours":
                model = _model(device, "asu")
                frozen_head = model.lm_head.weight.detach().clone()
                step = lambda ids: ours_step(model, frozen_head, ids)  # noqa: E731
            else:
                model = _model(device, "eager")
                teacher = copy.deepcopy(model).eval().requires_grad_(False)
                set_smoothing(teacher, TEMPERATURE)  # eager attention: every module's scaling divided by tau
                step = lambda ids: authors_step(model, teacher, ids)  # noqa: E731
            fit, fail = longest(rec, base, step, model, max_tokens=cap, deadline=deadline)
            if fail is None:
                note = (
                    f"fits up to the search cap {cap}" if fit >= cap else "search stopped by its time budget"
                )
            else:
                note = f"first out-of-memory at {fail} tokens"
            rec.add(base, "max_tokens", float(fit), note=note)

        rec.guarded(base, body, metric="max_tokens")
