"""The quantization attack: a model's linear weights rounded as bitsandbytes rounds them, in plain torch.

"Catastrophic failure of LLM unlearning via quantization" (ICLR 2025) loaded unlearned models with
bitsandbytes in 4 bits and got much of the forgotten knowledge back: unlearning moves the weights so little
that many land in the same quantization bucket as the original's. This module computes what bitsandbytes would
store and returns the **de-quantised** weights (a model with ordinary float weights that computes what the
quantized one computes with its weights), so the attack runs on a CPU and without bitsandbytes.

Formats (bitsandbytes 0.50: ``bitsandbytes/functional.py``, the PyTorch kernels of
``bitsandbytes/backends/default/ops.py``, the CUDA kernels of ``csrc/kernels.cu``)

``nf4`` / ``fp4`` (``Linear4bit``, transformers' ``BitsAndBytesConfig(load_in_4bit=True)``)
    The weight is flattened row-major (shape ``(out, in)``) into blocks of ``blocksize = 64`` consecutive
    values (the last block may be shorter); per block ``absmax = max |w|`` (float32) and each value is scaled
    to ``x = w / absmax`` (float32) and mapped to the nearest of 16 code values. De-quantised:
    ``code[q] * absmax``, cast to the weight's dtype. Double quantization of the absmax
    (``bnb_4bit_use_double_quant``) is off, transformers' default.

    * NF4 (:data:`NF4_CODE`): bitsandbytes' table (quantiles of N(0, 1), QLoRA), sorted, code = index.
    * FP4 (:data:`FP4_CODE`): 1 sign bit, 2 exponent bits, 1 mantissa bit; code ``s·8 + m`` is
      ``(-1)^s · FP4_MAGNITUDES[m] / 12`` with the magnitudes ``0, 0.0625, 8, 12, 4, 6, 2, 3`` in bit order.
      transformers' default ``bnb_4bit_quant_type`` is ``fp4``; the meta-evaluation uses NF4.

    bitsandbytes has two implementations of the rounding, and they disagree on values at a boundary (with
    bfloat16 and float16 weights, whose few mantissa bits put values exactly on midpoints, not a rare event).
    ``rounding="torch"`` (the default) is its PyTorch kernel, which its CPU backend runs and which the tests
    check against bitsandbytes itself: the code book sorted, the midpoints of neighbours computed in float32,
    ``bucketize`` (a value on a midpoint goes to the lower value: for a negative FP4 value, the larger
    magnitude); the last, shorter block is divided by its absmax instead of multiplied by the reciprocal.
    ``rounding="cuda"`` is its CUDA kernel: decision trees with strict ``>`` against literal thresholds
    (NF4's equal the float32 midpoints; FP4's, compared with ``|x|`` before the sign is set, lie up to 3e-7
    below them, so a value in that sliver goes to the larger magnitude), every block multiplied by the
    reciprocal.

``int8`` (``Linear8bitLt``, ``BitsAndBytesConfig(load_in_8bit=True)``, LLM.int8())
    The weight is cast to float16 and quantized row by row (``int8_vectorwise_quant``): per output row ``s =
    max |w|`` (float32), ``q = round(w · 127 / s)`` (round half to even); de-quantised ``q · s · (1/127)``
    (``int8_vectorwise_dequant``'s order), cast to the weight's dtype. Only the weights are quantized here. At
    inference LLM.int8() also quantizes each input row to int8 and keeps the input columns holding a value of
    magnitude >= 6 (``llm_int8_threshold``, transformers' default) in float16 against the de-quantised weight
    columns; that activation rounding is not simulated (bitsandbytes' own CPU training path, ``MatMul8bitFp``,
    computes exactly the de-quantised weights times full-precision inputs, as here).

Which modules (transformers' bitsandbytes integration, ``replace_with_bnb_linear``)
    Every module whose type is exactly ``torch.nn.Linear`` (or transformers' ``Conv1D``, GPT-2's, whose weight
    is stored transposed: it is quantized in the ``(out, in)`` layout bitsandbytes stores), except those
    transformers keeps in full precision (``get_keys_to_not_convert``): the output embeddings (``lm_head``),
    the module of the model's last parameter, modules holding a tied weight, the model's
    ``_keep_in_fp32_modules``, and any ``skip`` names given (a name matches a module equal to it, inside it,
    or ending with it).
"""

from __future__ import annotations

import copy
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from asu.attacks.context import AttackContext, AttackOutcome, tracked
from asu.attacks.scores import PRIMARY_METRIC, SCORED_METRICS, quant_score

__all__ = [
    "BLOCKSIZE",
    "FORMATS",
    "FP4_CODE",
    "FP4_MAGNITUDES",
    "NF4_CODE",
    "QuantReport",
    "dequantize_4bit",
    "dequantize_int8_rowwise",
    "fake_quantize",
    "quantizable_modules",
    "quantize_4bit",
    "quantize_int8_rowwise",
    "quantized_copy",
    "ROUNDINGS",
    "attack",
]

FORMATS = ("nf4", "fp4", "int8")
#: bitsandbytes' block size for 4-bit weights (``Linear4bit``'s default, and transformers').
BLOCKSIZE = 64

#: NF4's 16 values, index = code (bitsandbytes ``get_4bit_type("nf4")``; sorted ascending).
NF4_CODE = torch.tensor(
    [
        -1.0,
        -0.6961928009986877,
        -0.5250730514526367,
        -0.39491748809814453,
        -0.28444138169288635,
        -0.18477343022823334,
        -0.09105003625154495,
        0.0,
        0.07958029955625534,
        0.16093020141124725,
        0.24611230194568634,
        0.33791524171829224,
        0.44070982933044434,
        0.5626170039176941,
        0.7229568362236023,
        1.0,
    ],
    dtype=torch.float32,
)
#: FP4 (e2m1, bitsandbytes' bias) magnitudes by the 3 low bits of the code, before the division by 12.
FP4_MAGNITUDES = (0.0, 0.0625, 8.0, 12.0, 4.0, 6.0, 2.0, 3.0)
#: FP4's 16 values, index = code: bit 3 is the sign (bitsandbytes ``get_4bit_type("fp4")``: float32 / 12).
FP4_CODE = torch.tensor([s * m for s in (1.0, -1.0) for m in FP4_MAGNITUDES], dtype=torch.float32) / 12.0
#: The CUDA kernels' decision thresholds (``dQuantizeNF4``, ``dQuantizeFP4`` in csrc/kernels.cu), ascending:
#: the code of ``x`` is the number of thresholds ``t`` with ``x > t`` (FP4: of ``|x|``, then the sign bit).
NF4_CUDA_THRESHOLDS = torch.tensor(
    [
        -0.8480964004993439,
        -0.6106329262256622,
        -0.4599952697753906,
        -0.33967943489551544,
        -0.23460740596055984,
        -0.13791173323988914,
        -0.045525018125772476,
        0.03979014977812767,
        0.1202552504837513,
        0.2035212516784668,
        0.2920137718319893,
        0.3893125355243683,
        0.5016634166240692,
        0.6427869200706482,
        0.8614784181118011,
    ],
    dtype=torch.float32,
)
FP4_CUDA_THRESHOLDS = torch.tensor(
    [0.00260417, 0.0859375, 0.20833333, 0.29166667, 0.4166667, 0.583333, 0.8333333], dtype=torch.float32
)
#: FP4's 3-bit patterns by increasing magnitude (0, 0.0625, 2, 3, 4, 6, 8, 12).
FP4_BITS_BY_MAGNITUDE = (0b000, 0b001, 0b110, 0b111, 0b100, 0b101, 0b010, 0b011)
#: How values are scaled and rounded: bitsandbytes' PyTorch kernels (its CPU path) or its CUDA kernels.
ROUNDINGS = ("torch", "cuda")

_INT8_RECIPROCAL = 7.874015718698502e-3  # 1/127 as bitsandbytes writes it (int8_vectorwise_dequant)


def _code_table(fmt: str) -> torch.Tensor:
    return NF4_CODE if fmt == "nf4" else FP4_CODE


def _torch_codes(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """bitsandbytes' PyTorch rule: the code book sorted (``argsort``), ``x`` bucketed between the midpoints of
    neighbouring values (``bucketize``, right=False: a value on a midpoint goes to the lower value), mapped
    back to the code. FP4's +0 and -0 are neighbours; which a tiny value gets does not change its value."""
    table = _code_table(fmt).to(x.device)
    order = torch.argsort(table)
    bounds = (table[order[:-1]] + table[order[1:]]) / 2
    return order[torch.bucketize(x, bounds)]


def _cuda_codes(x: torch.Tensor, fmt: str) -> torch.Tensor:
    """bitsandbytes' CUDA rule: the decision trees' literal thresholds with strict ``>``; FP4 rounds the
    magnitude ``|x|`` and sets the sign bit for ``x < 0``."""
    if fmt == "nf4":
        return torch.bucketize(x, NF4_CUDA_THRESHOLDS.to(x.device))
    rank = torch.bucketize(x.abs(), FP4_CUDA_THRESHOLDS.to(x.device))
    bits = torch.tensor(FP4_BITS_BY_MAGNITUDE, dtype=torch.long, device=x.device)[rank]
    return bits + 8 * (x < 0).long()


def _block_absmax(flat: torch.Tensor, blocksize: int) -> torch.Tensor:
    """``max |x|`` of each run of ``blocksize`` consecutive values of ``flat`` (the last may be shorter)."""
    full = flat.numel() - flat.numel() % blocksize
    absmax = flat[:full].reshape(-1, blocksize).abs().amax(dim=1)
    if full < flat.numel():
        absmax = torch.cat([absmax, flat[full:].abs().amax().reshape(1)])
    return absmax


def _scaled(flat: torch.Tensor, absmax: torch.Tensor, blocksize: int, rounding: str) -> torch.Tensor:
    """``x = w / absmax`` of each block: multiplied by the float32 reciprocal (the PyTorch kernels divide the
    shorter last block instead), clamped to [-1, 1] by the PyTorch kernels."""
    if rounding == "cuda":
        return flat * torch.repeat_interleave(1.0 / absmax, blocksize)[: flat.numel()]
    full = flat.numel() - flat.numel() % blocksize
    safe = absmax.clamp(min=1e-38)
    x = (flat[:full].reshape(-1, blocksize) * (1.0 / safe[: full // blocksize]).view(-1, 1)).reshape(-1)
    if full < flat.numel():
        x = torch.cat([x, flat[full:] / safe[-1]])
    return torch.clamp(x, -1.0, 1.0)


def quantize_4bit(
    weight: torch.Tensor, fmt: str = "nf4", blocksize: int = BLOCKSIZE, rounding: str = "torch"
) -> tuple[torch.Tensor, torch.Tensor]:
    """bitsandbytes' 4-bit block-wise absmax quantization of ``weight`` (any shape, flattened row-major).

    ``rounding``: ``torch`` (bitsandbytes' PyTorch kernels, which its CPU backend runs) or ``cuda`` (its CUDA
    kernels); they differ only for values on (or within 3e-7 of) a decision boundary.
    Returns ``(codes, absmax)`` on the weight's device: ``codes`` uint8 of shape ``(weight.numel(),)``, one
    code (0..15) per value in flat order (bitsandbytes packs two per byte, the first in the high nibble);
    ``absmax`` float32 of shape ``(ceil(numel / blocksize),)``.
    """
    if fmt not in ("nf4", "fp4"):
        raise ValueError(f"4-bit format must be nf4 or fp4, got {fmt!r}")
    if rounding not in ROUNDINGS:
        raise ValueError(f"rounding must be one of {', '.join(ROUNDINGS)}, got {rounding!r}")
    if blocksize < 1:
        raise ValueError(f"blocksize must be >= 1, got {blocksize}")
    flat = weight.detach().reshape(-1).float()
    if flat.numel() == 0:
        raise ValueError("cannot quantize an empty tensor")
    absmax = _block_absmax(flat, blocksize)
    x = _scaled(flat, absmax, blocksize, rounding)
    codes = _torch_codes(x, fmt) if rounding == "torch" else _cuda_codes(x, fmt)
    return codes.to(torch.uint8), absmax


def dequantize_4bit(
    codes: torch.Tensor,
    absmax: torch.Tensor,
    fmt: str,
    shape: Sequence[int],
    dtype: torch.dtype = torch.float32,
    blocksize: int = BLOCKSIZE,
) -> torch.Tensor:
    """``code_value[codes] * absmax`` of each block (float32), reshaped to ``shape`` and cast to ``dtype``."""
    values = _code_table(fmt).to(codes.device)[codes.long()]
    scale = torch.repeat_interleave(absmax.float(), blocksize)[: values.numel()]
    return (values * scale).reshape(tuple(shape)).to(dtype)


def quantize_int8_rowwise(weight: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """LLM.int8()'s weight quantization of a 2-D ``(out, in)`` weight: cast to float16, per row absmax
    ``s`` (float32, shape ``(out,)``) and ``round(w · 127 / s)`` as int8 (a row of zeros gets codes 0)."""
    if weight.dim() != 2:
        raise ValueError(f"row-wise int8 quantization needs a 2-D weight, got shape {tuple(weight.shape)}")
    w16 = weight.detach().to(torch.float16)
    row_absmax = w16.abs().amax(dim=1).float()
    scaled = w16.float() * (127.0 / row_absmax.unsqueeze(-1))
    codes = torch.where(row_absmax.unsqueeze(-1) > 0, torch.round(scaled), torch.zeros_like(scaled))
    return codes.to(torch.int8), row_absmax


def dequantize_int8_rowwise(
    codes: torch.Tensor, row_absmax: torch.Tensor, dtype: torch.dtype = torch.float32
) -> torch.Tensor:
    """``codes · s · (1/127)`` per row (float32, bitsandbytes' order of operations), cast to ``dtype``."""
    return (codes.float() * row_absmax.float().view(-1, 1) * _INT8_RECIPROCAL).to(dtype)


def fake_quantize(
    weight: torch.Tensor, fmt: str, blocksize: int = BLOCKSIZE, rounding: str = "torch"
) -> torch.Tensor:
    """``weight`` quantized in ``fmt`` (``nf4``, ``fp4``, ``int8``) and de-quantised: same shape, dtype and
    device (``rounding``: see :func:`quantize_4bit`; int8 rounds the same way in both)."""
    if fmt == "int8":
        out = dequantize_int8_rowwise(*quantize_int8_rowwise(weight), dtype=weight.dtype)
    elif fmt in ("nf4", "fp4"):
        codes, absmax = quantize_4bit(weight, fmt, blocksize, rounding)
        out = dequantize_4bit(codes, absmax, fmt, weight.shape, weight.dtype, blocksize)
    else:
        raise ValueError(f"unknown quantization format {fmt!r}; choose one of {', '.join(FORMATS)}")
    return out.to(weight.device)


# ------------------------------------------------------------------------------------------- which modules


def _conv1d_type() -> type | None:
    try:
        from transformers.pytorch_utils import Conv1D
    except ImportError:  # pragma: no cover - every supported transformers has it
        return None
    return Conv1D


def _matches(name: str, keys: Sequence[str]) -> bool:
    return any(name == k or name.startswith(k + ".") or name.endswith(k) for k in keys)


def _kept_in_full_precision(model: nn.Module) -> set[str]:
    """What transformers' ``get_keys_to_not_convert`` keeps: the output embeddings, the last parameter's
    module, modules holding a tied weight, plus ``_keep_in_fp32_modules``."""
    keep: set[str] = set()
    get_out = getattr(model, "get_output_embeddings", None)
    out_emb = get_out() if callable(get_out) else None
    keep |= {n for n, m in model.named_modules() if out_emb is not None and m is out_emb}
    named = list(model.named_parameters())
    if named:
        keep.add(named[-1][0].rsplit(".", 1)[0] if "." in named[-1][0] else named[-1][0])
    owners: dict[int, list[str]] = {}
    for name, p in model.named_parameters(remove_duplicate=False):
        owners.setdefault(id(p), []).append(name.rsplit(".", 1)[0])
    keep |= {m for names in owners.values() if len(names) > 1 for m in names}
    keep |= set(getattr(model, "_keep_in_fp32_modules", None) or [])
    return keep


def quantizable_modules(model: nn.Module, skip: Sequence[str] = ()) -> tuple[list[str], list[str]]:
    """``(quantized, kept)``: the names of the linear modules bitsandbytes would replace in ``model``, and of
    the linear modules it would keep in full precision (see the module docstring)."""
    conv1d = _conv1d_type()
    keys = sorted(_kept_in_full_precision(model)) + list(skip)
    quantized, kept = [], []
    for name, module in model.named_modules():
        if type(module) is nn.Linear or (conv1d is not None and type(module) is conv1d):
            (kept if _matches(name, keys) else quantized).append(name)
    return quantized, kept


@dataclass
class QuantReport:
    """What a quantization did: the format, the modules quantized and kept, and the weights' relative error
    ``||w_q − w|| / ||w||`` over all quantized weights together."""

    fmt: str
    blocksize: int | None
    quantized: list[str] = field(default_factory=list)
    kept: list[str] = field(default_factory=list)
    relative_error: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return {
            "format": self.fmt,
            "blocksize": self.blocksize,
            "quantized_modules": len(self.quantized),
            "kept_in_full_precision": self.kept,
            "relative_weight_error": self.relative_error,
        }


@torch.no_grad()
def quantized_copy(
    model: nn.Module, fmt: str, skip: Sequence[str] = (), blocksize: int = BLOCKSIZE, rounding: str = "torch"
) -> tuple[nn.Module, QuantReport]:
    """A deep copy of ``model`` whose quantizable linear weights (:func:`quantizable_modules`) are replaced by
    their ``fmt`` quantization, de-quantised; biases and every other parameter unchanged. ``model`` is not
    touched. Returns the copy and a :class:`QuantReport`."""
    if fmt not in FORMATS:
        raise ValueError(f"unknown quantization format {fmt!r}; choose one of {', '.join(FORMATS)}")
    quantized, kept = quantizable_modules(model, skip)
    if not quantized:
        raise ValueError(f"the model has no linear module to quantize ({len(kept)} kept in full precision)")
    out = copy.deepcopy(model)
    modules = dict(out.named_modules())
    conv1d = _conv1d_type()
    err = ref = 0.0
    for name in quantized:
        weight = modules[name].weight
        transposed = conv1d is not None and type(modules[name]) is conv1d  # Conv1D stores (in, out)
        w = weight.data.t() if transposed else weight.data
        q = fake_quantize(w, fmt, blocksize, rounding)
        err += float((q.float() - w.float()).pow(2).sum())
        ref += float(w.float().pow(2).sum())
        weight.data.copy_(q.t() if transposed else q)
    report = QuantReport(
        fmt, None if fmt == "int8" else blocksize, quantized, kept, (err / max(ref, 1e-30)) ** 0.5
    )
    return out, report


# ------------------------------------------------------------------------------------------------ attack


def attack(ctx: AttackContext, fmt: str = "nf4", rounding: str = "torch") -> AttackOutcome:
    """``quant:FMT``: evaluate the model quantized in ``fmt`` (de-quantised copy, :func:`quantized_copy`) on
    the forget and retain rows; ``Q`` of every scored metric against the model's own values.

    Entries: ``quant_FMT_Q`` (Q of :data:`~asu.attacks.scores.PRIMARY_METRIC`, with the protocol, the values
    before and after and Q of each scored metric) and ``quant_FMT_<metric>`` for each value after."""
    model, report = quantized_copy(ctx.model, fmt, rounding=rounding)
    try:
        after = tracked(ctx.evaluate(model, ctx.forget, ctx.retain))
    finally:
        del model
    before = tracked(ctx.before)
    scores = {m: quant_score(before.get(m), after.get(m)) for m in SCORED_METRICS}
    name = f"quant_{fmt}"
    protocol = report.to_dict() | {"rounding": rounding, "source": "bitsandbytes 0.50 (block-wise absmax)"}
    out = AttackOutcome(name)
    out.entries[f"{name}_Q"] = {
        "agg_value": scores[PRIMARY_METRIC],
        "attack": f"quant:{fmt}",
        "metric": PRIMARY_METRIC,
        "formula": "min(m_before / m_after, 1)",
        "protocol": protocol,
        "before": before,
        "after": after,
        "Q": scores,
    }
    out.add_values(name, after)
    return out
