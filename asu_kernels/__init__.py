"""Fused Triton kernels for Attention Smoothing Unlearning.

Depends on torch and triton only. Public ops:

* :func:`attention` — temperature-scaled flash attention (causal, GQA, varlen, sliding window), fwd + bwd.
* :func:`linear_kl` — ``sum_i w_i KL(teacher_i || student_i)`` over the vocabulary from hidden states and
  LM-head weights, never materialising the logits.
* :func:`linear_cross_entropy` — the same for the retain cross-entropy.

:mod:`asu_kernels.reference` holds the plain-PyTorch definitions every kernel is tested against.
"""

from asu_kernels import reference
from asu_kernels.attention import attention
from asu_kernels.linear_kl import linear_cross_entropy, linear_kl

__all__ = ["attention", "linear_kl", "linear_cross_entropy", "reference"]
__version__ = "0.1.0"
