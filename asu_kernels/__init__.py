"""Fused Triton kernels for Attention Smoothing Unlearning.

Depends on torch and triton only. Public ops:

* :func:`attention` — temperature-scaled flash attention (causal, GQA, varlen, sliding window), fwd + bwd.
* :func:`linear_kl` — ``sum_i w_i KL(teacher_i || student_i)`` over the vocabulary from hidden states and
  LM-head weights, never materialising the logits.
* :func:`linear_cross_entropy` — the same for the retain cross-entropy; :func:`linear_cross_entropy_rows` —
  every row's own cross-entropy, without gradient (the detached per-token weights of weighted objectives).
* :func:`attention_kl` — per-row ``KL(teacher attention || student attention)`` and entropies in one streaming
  pass, fwd + bwd to the student's q and k.

Layout: each op is a public module (entry point, checks, custom ops and autograd, launchers, autotune
tables, compile specs) with its Triton kernels in a private one: ``attention`` / ``_attention_kernels``,
``attention_kl`` / ``_attention_kl_kernels``, ``linear_kl`` / ``_linear_kl_kernels``. The two attention
families share ``_triton_common`` (the Triton helpers: dot precision, visibility, block ranges, documents)
and ``_inputs`` (host-side checks and launch layouts). ``_backend`` picks Triton or the PyTorch path, ``_aot``
describes the ahead-of-time compile specs, and :mod:`asu_kernels.reference` holds the plain-PyTorch
definitions every kernel is tested against (and the CPU path).
"""

from asu_kernels import reference
from asu_kernels.attention import attention
from asu_kernels.attention_kl import attention_kl
from asu_kernels.linear_kl import linear_cross_entropy, linear_cross_entropy_rows, linear_kl

__all__ = [
    "attention",
    "attention_kl",
    "linear_kl",
    "linear_cross_entropy",
    "linear_cross_entropy_rows",
    "reference",
]
__version__ = "0.1.0"
