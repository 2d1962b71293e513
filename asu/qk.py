"""Post-RoPE queries and keys of attention layers, captured from a model's own forward.

A forward *pre*-hook (``with_kwargs=True``) on each selected attention module receives the layer's
input hidden states and its ``position_embeddings`` (cos, sin); it recomputes the post-RoPE queries and
keys with the module's own ``q_proj`` / ``k_proj`` (and ``q_norm`` / ``k_norm`` when the architecture has
them) and the ``apply_rotary_pos_emb`` of the module's modelling file. Nothing in the model is patched,
the model's own attention runs unchanged (any implementation), and the cost is one extra q/k projection
per selected layer.

Used by the attention statistics (:mod:`asu.inspection`), the attention-map teachers (:mod:`asu.teachers`)
and the experimental ``asu-attn`` objective (:mod:`asu.losses`).
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Iterator
from typing import Any

import torch

from asu.smoothing import attention_modules, parse_layers

__all__ = ["capture_qk", "post_rope_qk", "hidden_and_rope"]


def _rotary_fn(module: torch.nn.Module) -> Any:
    """The ``apply_rotary_pos_emb`` of the module's own modelling file (each architecture ships its own)."""
    fn = getattr(sys.modules.get(type(module).__module__), "apply_rotary_pos_emb", None)
    if fn is None:
        raise ValueError(
            f"{type(module).__name__} ({type(module).__module__}) has no apply_rotary_pos_emb in its "
            "modelling file; q/k capture supports rotary attention modules of the Llama family "
            "(q_proj/k_proj + RoPE)"
        )
    return fn


def post_rope_qk(module: torch.nn.Module, hidden: torch.Tensor, position_embeddings: Any) -> tuple:
    """Post-RoPE ``q`` (B, Hq, N, D) and ``k`` (B, Hkv, N, D) of an attention module, from its input.

    Mirrors the Llama-family attention forward: ``proj(h).view(B, N, -1, D)``, the optional per-head
    ``q_norm`` / ``k_norm`` (Qwen3, Gemma3), transpose, then ``apply_rotary_pos_emb(q, k, cos, sin)``.
    """
    head_dim = getattr(module, "head_dim", None)
    if not isinstance(head_dim, int):
        raise ValueError(f"{type(module).__name__} has no integer head_dim attribute")
    shape = (*hidden.shape[:-1], -1, head_dim)
    q = module.q_proj(hidden).view(shape)
    k = module.k_proj(hidden).view(shape)
    if isinstance(getattr(module, "q_norm", None), torch.nn.Module):
        q = module.q_norm(q)
    if isinstance(getattr(module, "k_norm", None), torch.nn.Module):
        k = module.k_norm(k)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    if position_embeddings is None:
        raise ValueError(
            f"{type(module).__name__} was called without position_embeddings; q/k capture needs the "
            "(cos, sin) pair that Llama-family decoder layers pass to their attention"
        )
    cos, sin = position_embeddings
    return _rotary_fn(module)(q, k, cos, sin)


def hidden_and_rope(args: tuple, kwargs: dict) -> tuple[torch.Tensor, Any]:
    hidden = kwargs.get("hidden_states", args[0] if args else None)
    if not isinstance(hidden, torch.Tensor):
        raise ValueError("the attention module was called without hidden_states")
    return hidden, kwargs.get("position_embeddings")


@contextlib.contextmanager
def capture_qk(model: torch.nn.Module, layers: Any = "all") -> Iterator[dict[int, tuple]]:
    """Context manager: each forward of ``model`` inside the block stores the selected layers' post-RoPE
    ``(q, k)`` — (B, Hq, N, D) and (B, Hkv, N, D) — in the yielded dict, keyed by layer index.

    The tensors carry the autograd graph when grad is enabled, so a layer-local objective (e.g.
    ``attention_kl`` of a student's q, k against a frozen teacher's) can backpropagate into ``q_proj`` /
    ``k_proj`` and everything below. A later forward overwrites the entries. Hooks are removed on exit.
    """
    by_index = dict(attention_modules(model))
    chosen = parse_layers(layers, max(by_index) + 1)
    missing = [i for i in chosen if i not in by_index]
    if missing:
        raise ValueError(f"layers {missing} have no attention module in this model")
    captured: dict[int, tuple] = {}

    def make_hook(layer: int):
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            captured[layer] = post_rope_qk(module, *hidden_and_rope(args, kwargs))

        return hook

    handles = [by_index[i].register_forward_pre_hook(make_hook(i), with_kwargs=True) for i in chosen]
    try:
        yield captured
    finally:
        for h in handles:
            h.remove()
