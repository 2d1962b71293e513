"""One point of the CPU attention sweep (:mod:`benchmarks.bench_cpu_attention`), run in its own process.

    python -m benchmarks.cpu_attention_point --child '{"provider": "ours", "n": 4096, "repeats": 1}'

A module of its own so that the child imports torch and the kernels only, not the package's
transformers-based layer: its start-up, and its resident memory, stay what the attention call needs.
"""

from __future__ import annotations

import json
import math
import os
import sys
import time
from typing import Any

import torch

from benchmarks.isolated import report, rss_gb

PROVIDERS = ("ours", "ours-blocked", "reference", "sdpa")
HEADS, HEAD_DIM, TEMPERATURE, SOFTCAP = 4, 64, 2.0, 50.0
SCALE = 1.0 / (TEMPERATURE * math.sqrt(HEAD_DIM))


def _call(provider: str):
    """``fn(q, k, v) -> out`` of a provider (B, H, N, D) in, out like q."""
    import torch.nn.functional as F

    import asu_kernels
    from asu_kernels import reference

    if provider == "ours":
        return lambda q, k, v: asu_kernels.attention(q, k, v, causal=True, temperature=TEMPERATURE)
    if provider == "ours-blocked":
        return lambda q, k, v: asu_kernels.attention(
            q, k, v, causal=True, temperature=TEMPERATURE, softcap=SOFTCAP
        )
    if provider == "reference":
        return lambda q, k, v: reference.attention(q, k, v, causal=True, temperature=TEMPERATURE)[0]
    if provider == "sdpa":
        return lambda q, k, v: F.scaled_dot_product_attention(q, k, v, is_causal=True, scale=SCALE)
    raise ValueError(f"unknown provider {provider!r}; choose from {', '.join(PROVIDERS)}")


def child(spec: dict[str, Any]) -> None:
    """One (provider, N): warm-up at N = 256, then ``repeats`` timed forward + backward calls."""
    os.environ["ASU_KERNELS_BACKEND"] = "cpu"
    os.environ.pop("TRITON_INTERPRET", None)
    torch.set_num_threads(1)
    fn = _call(spec["provider"])
    gen = torch.Generator().manual_seed(0)

    def inputs(n: int) -> tuple[torch.Tensor, ...]:
        q, k, v = (torch.randn(1, HEADS, n, HEAD_DIM, generator=gen).requires_grad_() for _ in range(3))
        return q, k, v, torch.randn(1, HEADS, n, HEAD_DIM, generator=gen)

    q, k, v, do = inputs(256)
    fn(q, k, v).backward(do)
    q, k, v, do = inputs(spec["n"])
    before = rss_gb()
    times = []
    for _ in range(spec["repeats"]):
        q.grad = k.grad = v.grad = None
        t0 = time.perf_counter()
        fn(q, k, v).backward(do)
        times.append(time.perf_counter() - t0)
    report({"times": times}, before)


if __name__ == "__main__":
    if len(sys.argv) != 3 or sys.argv[1] != "--child":
        sys.exit("usage: python -m benchmarks.cpu_attention_point --child '<json spec>'")
    child(json.loads(sys.argv[2]))
