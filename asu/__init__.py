"""asu: Attention Smoothing Unlearning for Hugging Face causal language models.

Importing ``asu`` registers the ``"asu"`` attention implementation with transformers, so
``AutoModelForCausalLM.from_pretrained(path, attn_implementation="asu")`` runs the fused kernel, and
exposes :func:`smoothing`, the forget-teacher's temperature control::

    import asu
    with asu.smoothing(teacher, temperature=2.3, layers=None):
        teacher_out = teacher(**batch)
"""

from asu.attention import ATTN_IMPLEMENTATION, register
from asu.smoothing import attention_modules, clear_smoothing, parse_layers, set_smoothing, smoothing

__all__ = [
    "ATTN_IMPLEMENTATION",
    "attention_modules",
    "clear_smoothing",
    "parse_layers",
    "register",
    "set_smoothing",
    "smoothing",
]
__version__ = "0.1.0"
