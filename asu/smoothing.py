"""Attention smoothing control: run chosen self-attention layers of a model at temperature ``tau``.

ASU's forget-teacher is the original model with every selected self-attention softmax computed as

    softmax(q k^T * scale / tau + mask),    scale = module.scaling (1/sqrt(head_dim) for Llama-like models)

and everything else (projections, RoPE, MLP, norms, the output softmax) unchanged. Where the family
soft-caps its attention logits (Gemma-2) the cap applies to ``q k^T * scale / tau``, as the family's eager
attention applies it to whatever scaling it is given. This module sets ``tau`` on the selected layers,
whatever attention implementation the model runs:

* ``attn_implementation="asu"``: the module attribute :data:`TEMPERATURE_ATTR` is set; the ``asu``
  attention function (:mod:`asu.attention`) reads it and passes it to the kernel as ``temperature`` (the
  logit scale stays exact).
* any other implementation (eager, sdpa, flex, flash, ...): the module's softmax scale (``scaling``, or
  ``scale`` in families that name it so) is divided by ``tau``. Transformers attention functions receive
  ``scaling=self.scaling`` from the module, so this is the same softmax.

Attention modules are found by what they are (:func:`attention_modules`): modules whose forward calls
transformers' attention interface and which carry a numeric softmax scale. Projection names do not matter
(separate ``q_proj``/``k_proj``, Phi-3's fused ``qkv_proj``, GPT-NeoX's ``query_key_value``, GPT-2's
``c_attn`` are all found); the rotary embedding's ``attention_scaling`` is not an attention scale (its
module calls no attention). A model with no such module (Falcon before transformers 5.25 computes its
attention itself) gets one error naming its attention class and why, and so does a model whose attention
adds a position bias through its mask (Falcon's ALiBi configs: :func:`position_bias_reason`).

The original values are restored exactly on exit (also after an exception), and nested use replaces the
temperature of a layer for the inner block (temperatures do not compound) and then restores the outer one.

The implementation is read from each module's config when smoothing starts; switching the implementation
(``model.set_attn_implementation``) while smoothing is active is not supported.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import math
import re
from collections.abc import Iterator, Sequence
from dataclasses import dataclass

import torch

__all__ = [
    "TEMPERATURE_ATTR",
    "attention_modules",
    "clear_smoothing",
    "calls_attention_interface",
    "parse_layers",
    "position_bias_reason",
    "scale_attribute",
    "set_smoothing",
    "smoothing",
]

#: Module attribute holding the temperature the ``asu`` attention function uses (absent = 1.0).
TEMPERATURE_ATTR = "asu_temperature"
# Where the unsmoothed scale is kept while a non-asu module is smoothed, so that nested or repeated
# smoothing divides the original value, never an already divided one.
_BASE_SCALING_ATTR = "_asu_base_scaling"

LayerSpec = str | int | Sequence[int] | None

_RANGE = re.compile(r"^\s*(-?\d+)\s*-\s*(-?\d+)\s*$")


def parse_layers(layers: LayerSpec, num_layers: int) -> list[int]:
    """Turn a layer selection into a sorted list of distinct layer indices in ``[0, num_layers)``.

    Accepted forms: ``None`` or ``"all"`` (every layer), an int, a list/tuple of ints, or a string of
    comma-separated items that are indices or inclusive ranges: ``"6-8"`` -> [6, 7, 8],
    ``"0,2,5-7"`` -> [0, 2, 5, 6, 7].

    Raises:
        TypeError: a selection of the wrong type (e.g. a float or a list of strings).
        ValueError: an empty selection, a malformed string, a reversed range or an index out of range.
    """
    if isinstance(num_layers, bool) or not isinstance(num_layers, int) or num_layers < 1:
        raise ValueError(f"num_layers must be a positive int, got {num_layers!r}")
    if layers is None:
        return list(range(num_layers))
    if isinstance(layers, bool):
        raise TypeError(
            f"layers must be 'all', an int, a list of ints or a string like '6-8', got {layers!r}"
        )
    if isinstance(layers, int):
        chosen = [layers]
    elif isinstance(layers, str):
        text = layers.strip().lower()
        if text == "all":
            return list(range(num_layers))
        if not text:
            raise ValueError("layers is an empty string; use 'all', '6-8' or '0,2,5-7'")
        chosen = []
        for item in text.split(","):
            match = _RANGE.match(item)
            if match:
                lo, hi = int(match.group(1)), int(match.group(2))
                if lo > hi:
                    raise ValueError(f"layer range {item.strip()!r} is reversed (start > end)")
                chosen.extend(range(lo, hi + 1))
            elif re.fullmatch(r"\s*-?\d+\s*", item):
                chosen.append(int(item))
            else:
                raise ValueError(
                    f"cannot parse layer item {item.strip()!r} in {layers!r}; use 'all', '6-8' or '0,2,5-7'"
                )
    elif isinstance(layers, Sequence):
        chosen = []
        for item in layers:
            if isinstance(item, bool) or not isinstance(item, int):
                raise TypeError(f"layer indices must be ints, got {item!r} in {layers!r}")
            chosen.append(int(item))
        if not chosen:
            raise ValueError("layers is an empty list; pass None or 'all' to smooth every layer")
    else:
        raise TypeError(
            "layers must be 'all', an int, a list of ints or a string like '6-8', "
            f"got {type(layers).__name__}"
        )
    bad = sorted({i for i in chosen if i < 0 or i >= num_layers})
    if bad:
        raise ValueError(
            f"layer indices {bad} are out of range for a model with {num_layers} layers (0..{num_layers - 1})"
        )
    return sorted(set(chosen))


def _layer_index(name: str, module: torch.nn.Module) -> int:
    idx = getattr(module, "layer_idx", None)
    if isinstance(idx, int) and not isinstance(idx, bool):
        return idx
    # No layer_idx attribute: take the last integer component of the qualified name ("...layers.7.self_attn").
    numbers = [int(part) for part in name.split(".") if part.isdigit()]
    if not numbers:
        raise ValueError(
            f"cannot tell the layer index of attention module {name!r}: no layer_idx and no number"
        )
    return numbers[-1]


# The global through which transformers modules reach the attention implementation of their config.
_INTERFACE_NAME = "ALL_ATTENTION_FUNCTIONS"
# Attribute names of the softmax scale a module hands the interface as ``scaling=``, in order of preference:
# nearly every family stores it as ``scaling`` (Granite: its attention multiplier), a few as ``scale``.
_SCALE_ATTRS = ("scaling", "scale")


@functools.cache
def _interface_scale_names(cls: type) -> tuple[str, ...] | None:
    """For a module class whose forward (its own or an inherited one) calls transformers' attention
    interface: the candidate scale attributes that forward reads (possibly none); None for other classes."""
    for klass in cls.__mro__:
        forward = klass.__dict__.get("forward")
        if forward is None:
            continue
        code = getattr(inspect.unwrap(forward), "__code__", None)
        if code is not None and _INTERFACE_NAME in code.co_names:
            return tuple(a for a in _SCALE_ATTRS if a in code.co_names)
    return None


def calls_attention_interface(cls: type) -> bool:
    """Whether the forward of module class ``cls`` (its own or an inherited one) calls transformers' attention
    interface, where ``attn_implementation`` and the temperature act. Falcon's attention does from
    transformers 5.25 on and computed its attention itself before."""
    return _interface_scale_names(cls) is not None


def position_bias_reason(config: object) -> str | None:
    """Why a model whose attention adds a position bias through its attention mask can be neither smoothed nor
    run by the ``asu`` attention, or None for every other model.

    Falcon's ALiBi configs (``alibi=True``) add ``alibi / sqrt(head_dim)`` to the attention mask. The ``asu``
    kernels take no additive bias (the bias would be dropped), and dividing the module's softmax scale by
    ``tau`` would smooth ``q k^T`` but not the bias, which is not attention at temperature ``tau``.
    """
    if getattr(config, "alibi", False) is True:
        return (
            "adds an ALiBi position bias to its attention mask (config.alibi=True): the asu kernels take no "
            "additive bias and a temperature would not reach it; RoPE configs (alibi=False) are supported"
        )
    return None


def _is_number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def scale_attribute(module: torch.nn.Module) -> str | None:
    """The name of the attribute holding ``module``'s softmax scale (``"scaling"`` or ``"scale"``) when the
    module is an attention module (:func:`attention_modules`), else None."""
    names = _interface_scale_names(type(module))
    if names is None:
        return None
    return next((n for n in names if _is_number(getattr(module, n, None))), None)


def _unsmoothable_reason(module: torch.nn.Module) -> str | None:
    """Why a module that looks like attention is not smoothable, or None if it does not look like one."""
    names = _interface_scale_names(type(module))
    if names is not None:
        return (
            "calls transformers' attention interface but carries no numeric softmax scale "
            f"({' / '.join(_SCALE_ATTRS)}) to divide by the temperature"
        )
    if "attention" in type(module).__name__.lower():
        return (
            "computes its attention itself instead of calling transformers' attention interface (where the "
            "asu attention and the temperature act)"
        )
    return None


def attention_modules(model: torch.nn.Module) -> list[tuple[int, torch.nn.Module]]:
    """The model's attention modules, as ``(layer_index, module)`` pairs ordered by layer index.

    An attention module is one whose forward calls transformers' attention interface
    (``ALL_ATTENTION_FUNCTIONS``, where ``attn_implementation`` is dispatched) and which carries the softmax
    scale it hands that interface as a number (``scaling``, or ``scale``; see :func:`scale_attribute`).
    What its projections are called does not matter. The rotary embedding, whose ``attention_scaling`` is
    no attention scale, calls no attention and is never selected. PEFT wrappers (``PeftModel``, LoRA layers
    replacing projections), DDP (``.module``), FSDP1 (``_fsdp_wrapped_module``) and FSDP2 (modules sharded
    in place, as subclasses) keep the attention modules in the module tree, so they are found through them.
    The index is ``module.layer_idx`` when present, else the last number in the module's qualified name.

    Raises:
        TypeError: ``model`` is not a torch module.
        ValueError: no attention module was found; the message names the model's attention class (a class
            whose name says attention) and why it is not smoothable.
    """
    if not isinstance(model, torch.nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    found: list[tuple[int, int, torch.nn.Module]] = []
    seen: set[int] = set()
    rejected: dict[str, str] = {}
    for order, (name, module) in enumerate(model.named_modules()):
        if id(module) in seen:
            continue
        seen.add(id(module))
        if scale_attribute(module) is not None:
            found.append((_layer_index(name, module), order, module))
        elif (reason := _unsmoothable_reason(module)) is not None:
            rejected.setdefault(type(module).__name__, reason)
    if not found:
        if rejected:
            cls, reason = next(iter(rejected.items()))
            raise ValueError(
                f"{type(model).__name__} has no smoothable attention module: {cls} {reason}; smoothing "
                "supports models whose attention layers call transformers' attention interface with a "
                "softmax scale (Llama, Mistral, Qwen, Gemma, Phi, GPT-NeoX, GPT-2, ...)"
            )
        raise ValueError(
            f"no attention module found in {type(model).__name__}: no submodule calls transformers' "
            "attention interface with a softmax scale (scaling)"
        )
    biased = next((m for _, _, m in found if position_bias_reason(getattr(m, "config", None))), None)
    if biased is not None:
        raise ValueError(
            f"{type(model).__name__} cannot be smoothed: {type(biased).__name__} "
            f"{position_bias_reason(biased.config)}"
        )
    found.sort(key=lambda t: (t[0], t[1]))
    return [(idx, module) for idx, _, module in found]


def _check_temperature(temperature: float) -> float:
    if isinstance(temperature, bool) or not isinstance(temperature, (int, float)):
        if not (isinstance(temperature, torch.Tensor) and temperature.numel() == 1):
            raise TypeError(f"temperature must be a number, got {type(temperature).__name__}")
    value = float(temperature)
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature!r}")
    return value


def _implementation(module: torch.nn.Module, model: torch.nn.Module) -> str | None:
    for owner in (module, model):
        config = getattr(owner, "config", None)
        if config is not None:
            return getattr(config, "_attn_implementation", None)
    return None


def _select(model: torch.nn.Module, layers: LayerSpec) -> list[torch.nn.Module]:
    modules = attention_modules(model)
    num_layers = max(idx for idx, _ in modules) + 1
    chosen = set(parse_layers(layers, num_layers))
    return [module for idx, module in modules if idx in chosen]


_MISSING = object()


@dataclass
class _Snapshot:
    """Everything smoothing may change on one module, to put back exactly."""

    module: torch.nn.Module
    temperature: object
    scale_attr: str
    scale: object
    base_scale: object

    @classmethod
    def take(cls, module: torch.nn.Module) -> _Snapshot:
        scale_attr = scale_attribute(module) or "scaling"
        return cls(
            module,
            module.__dict__.get(TEMPERATURE_ATTR, _MISSING),
            scale_attr,
            getattr(module, scale_attr, _MISSING),
            module.__dict__.get(_BASE_SCALING_ATTR, _MISSING),
        )

    def restore(self) -> None:
        for attr, value in (
            (TEMPERATURE_ATTR, self.temperature),
            (self.scale_attr, self.scale),
            (_BASE_SCALING_ATTR, self.base_scale),
        ):
            if value is _MISSING:
                if attr in self.module.__dict__:
                    delattr(self.module, attr)
            else:
                setattr(self.module, attr, value)


def _apply(module: torch.nn.Module, model: torch.nn.Module, temperature: float) -> None:
    if _implementation(module, model) == "asu":
        setattr(module, TEMPERATURE_ATTR, temperature)
        return
    attr = scale_attribute(module)
    if attr is None:
        raise TypeError(
            f"{type(module).__name__} has no numeric softmax scale ('scaling'), so its softmax temperature "
            f"cannot be set under attn_implementation={_implementation(module, model)!r}; load the model "
            "with attn_implementation='asu'"
        )
    base = module.__dict__.get(_BASE_SCALING_ATTR, getattr(module, attr))
    setattr(module, _BASE_SCALING_ATTR, base)
    setattr(module, attr, base / temperature)


def _smooth(model: torch.nn.Module, temperature: float, layers: LayerSpec) -> list[_Snapshot]:
    """Set ``temperature`` on the selected layers, all or nothing; returns what to restore them with."""
    tau = _check_temperature(temperature)
    modules = _select(model, layers)
    snapshots = [_Snapshot.take(m) for m in modules]
    try:
        for module in modules:
            _apply(module, model, tau)
    except BaseException:
        # A failure on one module leaves none of them changed.
        _restore(snapshots)
        raise
    return snapshots


def _restore(snapshots: list[_Snapshot]) -> None:
    for snap in reversed(snapshots):
        snap.restore()


def set_smoothing(model: torch.nn.Module, temperature: float, layers: LayerSpec = None) -> None:
    """Persistently run the selected layers' attention at ``temperature``, until :func:`clear_smoothing`.

    Setting again replaces the temperature of the selected layers (it does not compound). Layers not selected
    keep whatever they had.

    Args:
        model: a transformers model (or a PEFT/DDP/FSDP wrapper of one).
        temperature: ``tau > 0``, finite; logits become ``q k^T * scale / tau``.
        layers: ``None``/``"all"``, an index, a list of indices, or a string like ``"6-8"`` / ``"0,2,5-7"``.
    """
    _smooth(model, temperature, layers)


def clear_smoothing(model: torch.nn.Module) -> None:
    """Return every attention module of ``model`` to temperature 1 with its original softmax scale."""
    for _, module in attention_modules(model):
        base = module.__dict__.get(_BASE_SCALING_ATTR, _MISSING)
        if base is not _MISSING:
            setattr(module, scale_attribute(module) or "scaling", base)
            delattr(module, _BASE_SCALING_ATTR)
        if TEMPERATURE_ATTR in module.__dict__:
            delattr(module, TEMPERATURE_ATTR)


@contextlib.contextmanager
def smoothing(
    model: torch.nn.Module, temperature: float, layers: LayerSpec = None
) -> Iterator[torch.nn.Module]:
    """Context manager: inside the block the selected layers' attention runs at ``temperature``.

    ``with smoothing(teacher, 2.3, layers="6-8"): out = teacher(**batch)``. On exit (normal or by exception)
    each touched module gets back exactly the attribute values it had on entry, so nesting works and
    smoothing set persistently before the block survives it. Yields the model.
    """
    snapshots = _smooth(model, temperature, layers)
    try:
        yield model
    finally:
        _restore(snapshots)
