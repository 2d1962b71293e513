"""Which implementation runs a call: the one dispatch rule of every asu op.

Families (:func:`backend`)
--------------------------
* ``triton``: CUDA tensors, and CPU tensors under the Triton interpreter (``TRITON_INTERPRET=1``, how the CPU
  test-suite exercises the real kernels).
* ``cpu``: CPU tensors otherwise: the PyTorch CPU production path. Attention and the attention-map KL run
  :mod:`asu_kernels._cpu_attention` (exact, O(N) memory, never an N x N matrix); the vocabulary losses run
  their chunked PyTorch loop (:mod:`asu_kernels.linear_kl`).
* ``reference``: :mod:`asu_kernels.reference`, the float64 specification the other two are tested against.
  The attention ops run it for float64 inputs on every device (the vocabulary losses run float64 on their
  chunked PyTorch loop, which is exact in float64).

``ASU_KERNELS_BACKEND=auto|triton|cpu|reference`` forces a family: ``triton`` on CPU tensors needs the
interpreter (and fails loudly without it); ``cpu`` sends CPU tensors to the PyTorch CPU path even under the
interpreter (CUDA tensors keep the Triton kernels); ``reference`` sends every attention call to the
reference and the vocabulary losses to their PyTorch loop.

Inside the CPU attention path (:func:`cpu_fused_mode`)
------------------------------------------------------
PyTorch's fused CPU flash-attention kernel (the one ``torch.nn.functional.scaled_dot_product_attention``
runs on CPU tensors, called through its aten op because that also returns the log-sum-exp, and its backward
takes it) serves a dense call, or each document of a packed call, when it expresses the call exactly in
O(N) memory:

* no soft-cap and no sliding window;
* causal with ``Nq == Nk`` and no key padding (its causal flag is top-left aligned, ours bottom-right: the
  two agree only on square calls, which every packed document is);
* causal with ``Nq == 1`` (a decoding step sees every key) or non-causal, with an optional key padding mask
  passed as a broadcast ``(B, 1, 1, Nk)`` additive mask.

Its backward serves the call when, in addition, no gradient flows into the returned LSE (the fused backward
has no LSE-gradient input). Everything else runs the blocked online-softmax implementation in PyTorch: causal
with ``1 < Nq < Nk`` (bottom-right alignment), causal with key padding, soft-caps, windows, an LSE gradient,
and the attention-map KL. Rows that see no key give 0, an LSE of ``-inf`` and zero gradients on both.
"""

from __future__ import annotations

import os

import torch

FAMILIES = ("triton", "cpu", "reference")


def interpreting() -> bool:
    """True when Triton runs kernels in its CPU interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


def forced() -> str:
    """``ASU_KERNELS_BACKEND`` (``auto`` when unset); ValueError naming the choices otherwise."""
    value = os.environ.get("ASU_KERNELS_BACKEND", "").strip().lower() or "auto"
    if value not in ("auto", *FAMILIES):
        raise ValueError(f"ASU_KERNELS_BACKEND must be 'auto', 'triton', 'cpu' or 'reference', got {value!r}")
    return value


def backend(t: torch.Tensor) -> str:
    """The family (``triton``, ``cpu`` or ``reference``) that runs an op on tensors like ``t``, by device
    and ``ASU_KERNELS_BACKEND`` (dtype rules, such as float64 taking the reference, are the ops' own)."""
    choice = forced()
    if choice == "reference":
        return "reference"
    if t.is_cuda:
        return "triton"
    if choice == "triton":
        if not interpreting():
            raise RuntimeError("ASU_KERNELS_BACKEND=triton on CPU tensors needs TRITON_INTERPRET=1")
        return "triton"
    if choice == "auto" and interpreting() and t.device.type == "cpu":
        return "triton"
    return "cpu"


def use_triton(t: torch.Tensor) -> bool:
    """Whether the Triton kernels run for tensors like ``t`` (:func:`backend` is ``triton``)."""
    return backend(t) == "triton"


def cpu_fused_mode(
    n_q: int, n_k: int, *, causal: bool, window: int | None, softcap: float | None, key_padding: bool
) -> bool | None:
    """The CPU path's choice for one dense call (or one packed document) of ``n_q`` queries and ``n_k`` keys:
    the fused kernel's ``is_causal`` flag when it expresses the call (see the module docstring), None when the
    blocked implementation runs it."""
    if window is not None or softcap is not None:
        return None
    if not causal or n_q == 1:
        return False  # every key of the row visible, key padding as an additive mask
    if n_q == n_k and not key_padding:
        return True
    return None
