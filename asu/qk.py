"""Post-RoPE queries and keys of attention layers, captured from a model's own forward.

What a layer's attention sees is exactly what its module hands transformers' attention interface: the
``query`` and ``key`` after the projections (separate or fused: Phi-3's ``qkv_proj``, GPT-NeoX's
``query_key_value``, GPT-2's ``c_attn``), the q/k norms (Qwen3, Gemma-3, OLMo-2), clipping (OLMo) and the
rotary embedding, full or partial (Phi, GPT-NeoX, StableLM). So the capture is taken there, for every family
:func:`asu.smoothing.attention_modules` finds, with no per-family code:

* while a selected module's forward runs (and only then), its ``config`` attribute is a view of the
  model's config whose ``_attn_implementation`` names the capture function registered here
  (:data:`CAPTURE_IMPLEMENTATION`);
* the module's forward therefore calls that function with its ``(query, key, value, ...)``; it records
  ``(query, key)`` and calls the implementation the model really runs (``asu``, ``sdpa``, ``eager``, ...)
  with the same arguments, so the model's output is unchanged;
* the module's own config attribute is put back when its forward returns or raises.

Nothing global is patched and the shared config object is never modified (the mask the model builds still
follows the real implementation). :func:`capture_qk` records during a normal forward (no extra cost, and
the tensors carry the autograd graph); :func:`post_rope_qk` recomputes one layer's q, k from its input
hidden states (one extra q/k/v projection), stopping before the attention itself.

The captured q, k feed attention-*map* computations (the attention statistics of :mod:`asu.inspection`,
the experimental ``asu-attn`` objective of :mod:`asu.losses`) that compute ``softmax(q k^T * scale / tau)``
without a logit soft-cap or attention sinks; a layer that uses either (Gemma-2's
``attn_logit_softcapping``) is refused with a clear error rather than giving maps the model does not have.
"""

from __future__ import annotations

import contextlib
import sys
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import torch
from transformers import AttentionInterface
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from asu.smoothing import attention_modules, parse_layers

__all__ = ["CAPTURE_IMPLEMENTATION", "capture_qk", "post_rope_qk", "hidden_and_rope"]

#: The name the capturing attention function is registered under in transformers' ``AttentionInterface``.
#: It only works on modules inside :func:`capture_qk` / :func:`post_rope_qk`; do not load a model with it.
CAPTURE_IMPLEMENTATION = "asu_qk_capture"
_STATE_ATTR = "_asu_qk_capture"


class _Stop(Exception):
    """Raised by the capture function once q, k are recorded, when the attention itself is not wanted."""


class _ConfigView:
    """A module's config seen unchanged, except that ``_attn_implementation`` names the capture function."""

    _attn_implementation = CAPTURE_IMPLEMENTATION

    def __init__(self, config: Any) -> None:
        object.__setattr__(self, "_asu_config", config)

    def __getattr__(self, name: str) -> Any:
        return getattr(object.__getattribute__(self, "_asu_config"), name)

    def __setattr__(self, name: str, value: Any) -> None:
        setattr(object.__getattribute__(self, "_asu_config"), name, value)


def _real_config(config: Any) -> Any:
    while isinstance(config, _ConfigView):
        config = object.__getattribute__(config, "_asu_config")
    return config


@dataclass
class _State:
    """What the capture function does for one module: where the q, k go, and whether attention follows."""

    implementation: str | None
    record: Callable[[torch.Tensor, torch.Tensor], None]
    stop: bool


def _module_eager(module: torch.nn.Module) -> Callable:
    """The ``eager_attention_forward`` of the module's modelling file, the module's own fallback."""
    for klass in type(module).__mro__:
        fn = getattr(sys.modules.get(klass.__module__), "eager_attention_forward", None)
        if fn is not None:
            return fn
    raise ValueError(
        f"{type(module).__name__} ({type(module).__module__}) has no eager_attention_forward in its "
        "modelling file, so its eager attention cannot be called after the q/k capture"
    )


def _capturing_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: Any,
) -> Any:
    """transformers attention-interface function: record ``(query, key)``, then run the real attention."""
    state = module.__dict__.get(_STATE_ATTR)
    if state is None:
        raise RuntimeError(
            f"the attention implementation {CAPTURE_IMPLEMENTATION!r} only runs inside asu.qk's capture; "
            "load models with a real implementation ('asu', 'sdpa', 'eager', ...)"
        )
    if kwargs.get("softcap") is not None:
        raise ValueError(
            f"{type(module).__name__} soft-caps its attention logits (softcap={kwargs['softcap']}); the "
            "attention-map computations that use captured q, k (asu inspect, method 'asu-attn') do not, so "
            "they are not available for this model"
        )
    if kwargs.get("s_aux") is not None or kwargs.get("sinks") is not None:
        raise ValueError(
            f"{type(module).__name__} uses attention sinks; the attention-map computations that use captured "
            "q, k (asu inspect, method 'asu-attn') do not, so they are not available for this model"
        )
    state.record(query, key)
    if state.stop:
        raise _Stop
    real = ALL_ATTENTION_FUNCTIONS.get_interface(state.implementation, _module_eager(module))
    return real(module, query, key, value, attention_mask, **kwargs)


AttentionInterface.register(CAPTURE_IMPLEMENTATION, _capturing_attention)


def _route(module: torch.nn.Module, state_for: Callable[[str | None], _State]) -> tuple[Any, Any]:
    """Route ``module``'s attention through the capture function; returns what :func:`_unroute` restores."""
    if "config" not in module.__dict__:
        raise ValueError(
            f"{type(module).__name__} keeps no config attribute, so its attention implementation cannot be "
            "routed through the q/k capture"
        )
    config = module.__dict__["config"]
    previous = module.__dict__.get(_STATE_ATTR)
    module.__dict__[_STATE_ATTR] = state_for(getattr(_real_config(config), "_attn_implementation", None))
    module.__dict__["config"] = _ConfigView(config)
    return config, previous


def _unroute(module: torch.nn.Module, saved: tuple[Any, Any]) -> None:
    config, previous = saved
    module.__dict__["config"] = config
    if previous is None:
        module.__dict__.pop(_STATE_ATTR, None)
    else:
        module.__dict__[_STATE_ATTR] = previous


@contextlib.contextmanager
def _capturing(module: torch.nn.Module, state_for: Callable[[str | None], _State]) -> Iterator[None]:
    """For the block: ``module`` runs its attention through the capture function with the given state."""
    saved = _route(module, state_for)
    try:
        yield
    finally:
        _unroute(module, saved)


def post_rope_qk(module: torch.nn.Module, hidden: torch.Tensor, position_embeddings: Any) -> tuple:
    """Post-RoPE ``q`` (B, Hq, N, D) and ``k`` (B, Hkv, N, D) of an attention module, from its input.

    Runs the module's own ``forward`` (not its hooks) on ``hidden`` (B, N, d) with the rotary
    ``position_embeddings`` (cos, sin) — None for families without RoPE (GPT-2) — and no mask or cache, and
    stops when it calls the attention: the q, k are exactly those the module's attention would see.
    """
    captured: list[tuple[torch.Tensor, torch.Tensor]] = []
    kwargs: dict[str, Any] = {"hidden_states": hidden, "attention_mask": None}
    if position_embeddings is not None:
        kwargs["position_embeddings"] = position_embeddings
    with _capturing(module, lambda impl: _State(impl, lambda q, k: captured.append((q, k)), stop=True)):
        try:
            module.forward(**kwargs)
        except _Stop:
            pass
        except TypeError as exc:
            if position_embeddings is None and "position_embeddings" in str(exc):
                raise ValueError(
                    f"{type(module).__name__} was called without position_embeddings; q/k capture needs "
                    "the (cos, sin) pair its decoder layer passes to the attention"
                ) from exc
            raise
    if not captured:
        raise ValueError(f"{type(module).__name__}'s forward returned without calling its attention")
    return captured[-1]


def hidden_and_rope(args: tuple, kwargs: dict) -> tuple[torch.Tensor, Any]:
    """The ``hidden_states`` and ``position_embeddings`` an attention module was called with (pre-hook
    ``args``/``kwargs``)."""
    hidden = kwargs.get("hidden_states", args[0] if args else None)
    if not isinstance(hidden, torch.Tensor):
        raise ValueError("the attention module was called without hidden_states")
    return hidden, kwargs.get("position_embeddings")


@contextlib.contextmanager
def capture_qk(model: torch.nn.Module, layers: Any = "all") -> Iterator[dict[int, tuple]]:
    """Context manager: each forward of ``model`` inside the block stores the selected layers' post-RoPE
    ``(q, k)`` — (B, Hq, N, D) and (B, Hkv, N, D), as the layer hands them to its attention — in the yielded
    dict, keyed by layer index.

    The tensors carry the autograd graph when grad is enabled, so a layer-local objective (e.g.
    ``attention_kl`` of a student's q, k against a frozen teacher's) can backpropagate into the projections
    and everything below. A later forward overwrites the entries. The model's outputs are unchanged, and
    every module is back to its own config on exit.
    """
    by_index = dict(attention_modules(model))
    chosen = parse_layers(layers, max(by_index) + 1)
    missing = [i for i in chosen if i not in by_index]
    if missing:
        raise ValueError(f"layers {missing} have no attention module in this model")
    captured: dict[int, tuple] = {}

    def state_for(layer: int) -> Callable[[str | None], _State]:
        def record(q: torch.Tensor, k: torch.Tensor) -> None:
            captured[layer] = (q, k)

        return lambda impl: _State(impl, record, stop=False)

    routed: dict[int, list[tuple[Any, Any]]] = {}  # per module, a stack (a module may be re-entered)

    def hooks(layer: int) -> tuple[Callable, Callable]:
        make_state = state_for(layer)

        def before(module: torch.nn.Module, args: tuple) -> None:
            routed.setdefault(id(module), []).append(_route(module, make_state))

        def after(module: torch.nn.Module, args: tuple, output: Any) -> None:
            stack = routed.get(id(module))
            if stack:
                _unroute(module, stack.pop())

        return before, after

    handles = []
    try:
        for layer in chosen:
            before, after = hooks(layer)
            module = by_index[layer]
            handles.append(module.register_forward_pre_hook(before))
            handles.append(module.register_forward_hook(after, always_call=True))
        yield captured
    finally:
        for h in handles:
            h.remove()
        for layer in chosen:  # a forward interrupted between the hooks leaves nothing behind
            module = by_index[layer]
            for saved in reversed(routed.pop(id(module), [])):
                _unroute(module, saved)
