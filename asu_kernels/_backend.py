"""Which implementation runs a call: the Triton kernel or the PyTorch reference.

* CUDA tensors run the Triton kernels.
* CPU tensors run the Triton kernels only under the Triton interpreter (``TRITON_INTERPRET=1``, how the
  CPU test-suite exercises the real kernels); otherwise they take the PyTorch path, which is the
  package's CPU implementation.
* ``ASU_KERNELS_BACKEND=reference`` or ``=triton`` forces one side (``triton`` on CPU needs the
  interpreter and fails loudly without it).
"""

from __future__ import annotations

import os

import torch


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def use_triton(t: torch.Tensor) -> bool:
    forced = os.environ.get("ASU_KERNELS_BACKEND", "").strip().lower()
    if forced not in ("", "auto", "reference", "triton"):
        raise ValueError(f"ASU_KERNELS_BACKEND must be 'auto', 'reference' or 'triton', got {forced!r}")
    if forced == "reference":
        return False
    if t.is_cuda:
        return True
    if forced == "triton":
        if not interpreting():
            raise RuntimeError("ASU_KERNELS_BACKEND=triton on CPU tensors needs TRITON_INTERPRET=1")
        return True
    return interpreting() and t.device.type == "cpu"
