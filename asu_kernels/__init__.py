"""Fused Triton kernels for Attention Smoothing Unlearning.

Depends on torch and triton only. Public ops:

* :func:`attention` — temperature-scaled flash attention (causal, GQA, varlen, sliding window), fwd + bwd.
* :func:`linear_kl` — ``sum_i w_i KL(teacher_i || student_i)`` over the vocabulary from hidden states and
  LM-head weights, never materialising the logits.
* :func:`linear_cross_entropy` — the same for the retain cross-entropy.
* :func:`attention_kl` — per-row ``KL(teacher attention || student attention)`` and entropies in one streaming
  pass, fwd + bwd to the student's q and k.

:mod:`asu_kernels.reference` holds the plain-PyTorch definitions every kernel is tested against.
"""

from asu_kernels import reference
from asu_kernels.attention import attention
from asu_kernels.attention_kl import attention_kl
from asu_kernels.linear_kl import linear_cross_entropy, linear_kl

__all__ = ["attention", "attention_kl", "linear_kl", "linear_cross_entropy", "reference"]
__version__ = "0.1.0"
