"""Host-side input checks and tensor-layout helpers shared by the attention ops
(:func:`asu_kernels.attention`, :func:`asu_kernels.attention_kl`).

Checks raise a ``TypeError`` / ``ValueError`` naming the problem and never silently fix the caller's input.
Layout helpers describe a call to the kernels: batch count and lengths (:class:`Layout`), the
(batch, head, row, dim) strides of dense ``(B, H, N, D)`` and packed ``(total, H, D)`` tensors, the uint8
key-padding bytes, the head-dim block and the dot precision.
"""

from __future__ import annotations

import math
import numbers
from typing import NamedTuple

import torch
import triton

from asu_kernels._backend import interpreting
from asu_kernels._triton_common import LOG2E

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


# Checks --------------------------------------------------------------------------------------------------


def check_tensors(named: dict[str, object]) -> None:
    """Each value a tensor of a supported float dtype; all of one dtype and on one device."""
    for name, t in named.items():
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; supported: float16, bfloat16, float32, float64")
    names = ", ".join(named)
    tensors = list(named.values())
    if len({t.dtype for t in tensors}) != 1:
        got = ", ".join(str(t.dtype) for t in tensors)
        raise TypeError(f"{names} must share one dtype, got {got}")
    if len({t.device for t in tensors}) != 1:
        got = ", ".join(str(t.device) for t in tensors)
        raise ValueError(f"{names} must be on one device, got {got}")


def check_positive(name: str, value: float | None) -> None:
    """A finite real number > 0 (None passes: the default applies); a bool or a non-number is a TypeError."""
    if value is None:
        return
    if isinstance(value, bool) or not isinstance(value, numbers.Real):
        raise TypeError(f"{name} must be a number, got {type(value).__name__}")
    if not math.isfinite(value) or value <= 0:
        raise ValueError(f"{name} must be a finite number > 0, got {value}")


def check_window(window: int | None) -> None:
    """None, or an int >= 1 (a bool is a mistake, not a window of 1)."""
    if window is not None and (isinstance(window, bool) or int(window) != window or window < 1):
        raise ValueError(f"window must be a positive int (keys visible including the diagonal), got {window}")


def check_dims(named: dict[str, torch.Tensor], varlen: bool) -> None:
    """(B, H, N, D) tensors, or (total, H, D) ones with cu_seqlens."""
    want = 3 if varlen else 4
    layout = "(total, H, D) with cu_seqlens" if varlen else "(B, H, N, D)"
    for name, t in named.items():
        if t.dim() != want:
            raise ValueError(f"{name} must be {want}-D {layout}, got shape {tuple(t.shape)}")


def check_same_shape(name_a: str, a: torch.Tensor, name_b: str, b: torch.Tensor) -> None:
    if a.shape != b.shape:
        raise ValueError(
            f"{name_a} and {name_b} must have the same shape, got {tuple(a.shape)} and {tuple(b.shape)}"
        )


def check_head_dims(d: int, keys: dict[str, torch.Tensor]) -> None:
    """Every key-side tensor has the queries' head dim ``d``."""
    if any(t.shape[-1] != d for t in keys.values()):
        got = ", ".join(f"{name} {t.shape[-1]}" for name, t in keys.items())
        raise ValueError(f"head dims differ: q {d}, {got}")


def check_head_dim_range(d: int, min_dim: int) -> None:
    if d < min_dim or d > 256:
        raise ValueError(f"head dim {d} is not supported ({min_dim} <= D <= 256)")


def check_head_groups(hq: int, hkv: int, what: str) -> None:
    """GQA / MQA: query head ``h`` reads key head ``h // (hq // hkv)``, so ``hkv`` must divide ``hq``."""
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"the number of query heads ({hq}) must be a multiple of {what} ({hkv})")


def check_dense_lengths(q_name: str, q: torch.Tensor, k_name: str, k: torch.Tensor) -> None:
    """Same batch size, and at least as many keys as queries (the masks are bottom-right aligned)."""
    if q.shape[0] != k.shape[0]:
        raise ValueError(f"batch sizes differ: {q_name} {q.shape[0]}, {k_name} {k.shape[0]}")
    if k.shape[2] < q.shape[2]:
        raise ValueError(f"{k_name} has fewer positions ({k.shape[2]}) than {q_name} ({q.shape[2]})")


def check_key_padding_mask(
    mask: object, k: torch.Tensor, device: torch.device, q_name: str, *, integer_ok: bool
) -> None:
    """(B, Nk) with True (nonzero, when ``integer_ok``) = real key, on the queries' device."""
    if not isinstance(mask, torch.Tensor):
        raise TypeError(f"key_padding_mask must be a torch.Tensor, got {type(mask).__name__}")
    if mask.dtype.is_floating_point or mask.dtype.is_complex or (mask.dtype != torch.bool and not integer_ok):
        raise TypeError(f"key_padding_mask must be bool (True = real key), got dtype {mask.dtype}")
    if mask.shape != (k.shape[0], k.shape[2]):
        raise ValueError(
            f"key_padding_mask must be (B, Nk) = {(k.shape[0], k.shape[2])}, got {tuple(mask.shape)}"
        )
    if mask.device != device:
        raise ValueError(f"key_padding_mask is on {mask.device} but {q_name} is on {device}")


def check_packed(
    q_name: str,
    q: torch.Tensor,
    keys: dict[str, torch.Tensor],
    cu_seqlens: object,
    max_seqlen: int | None,
    key_padding_mask: object,
) -> None:
    """The packed (varlen) layout: one total length, valid ``cu_seqlens`` offsets, no key padding mask.

    The offsets' values are read on the host; under ``torch.compile`` that would break the graph, so
    traced calls skip the value checks (eager calls run them).
    """
    for name, k in keys.items():
        if k.shape[0] != q.shape[0]:
            raise ValueError(
                f"varlen {q_name} and {name} must have the same total length, "
                f"got {q.shape[0]} and {k.shape[0]}"
            )
    if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype not in (torch.int32, torch.int64):
        raise TypeError("cu_seqlens must be an int32 (or int64) tensor of shape (B+1,)")
    if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
        raise ValueError(f"cu_seqlens must have shape (B+1,) with B >= 1, got {tuple(cu_seqlens.shape)}")
    if cu_seqlens.device != q.device:
        raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but {q_name} is on {q.device}")
    if key_padding_mask is not None:
        raise ValueError("key_padding_mask is for the dense layout; packed batches carry cu_seqlens instead")
    if torch.compiler.is_compiling():
        return
    offsets = cu_seqlens.detach().cpu()
    if offsets[0].item() != 0 or offsets[-1].item() != q.shape[0]:
        raise ValueError(
            f"cu_seqlens must start at 0 and end at total={q.shape[0]}, "
            f"got {offsets[0].item()}..{offsets[-1].item()}"
        )
    lengths = offsets[1:] - offsets[:-1]
    if (lengths < 0).any():
        raise ValueError("cu_seqlens must be non-decreasing")
    if max_seqlen is not None and int(lengths.max()) > max_seqlen:
        raise ValueError(
            f"max_seqlen={max_seqlen} is smaller than the longest document ({int(lengths.max())})"
        )


# Layout ------------------------------------------------------------------------------------------------


class Layout(NamedTuple):
    """How the kernels address a call: batch count, lengths, longest sequence per side, packed or not.

    Dense: ``n_q``/``n_k`` are the lengths (equal to ``max_q``/``max_k``). Packed: the lengths come from
    ``cu_seqlens`` inside the kernels (``n_q = n_k = 0`` here) and ``max_q = max_k`` is the longest document.
    """

    batch: int
    n_q: int
    n_k: int
    max_q: int
    max_k: int
    varlen: bool


def longest_document(cu_seqlens: torch.Tensor) -> int:
    """The largest ``cu_seqlens[b+1] - cu_seqlens[b]`` (0 without documents); a host read of the offsets."""
    lengths = cu_seqlens[1:] - cu_seqlens[:-1]
    return int(lengths.max().item()) if lengths.numel() else 0


def layout(q: torch.Tensor, k: torch.Tensor, cu_seqlens: torch.Tensor | None, max_seqlen: int) -> Layout:
    """The :class:`Layout` of ``q`` (B, Hq, Nq, D) / ``k`` (B, Hkv, Nk, D), or of packed (total, H, D)
    tensors with ``cu_seqlens`` (``max_seqlen < 0``: derived from the offsets)."""
    if cu_seqlens is None:
        return Layout(q.shape[0], q.shape[2], k.shape[2], q.shape[2], k.shape[2], False)
    if max_seqlen < 0:
        max_seqlen = longest_document(cu_seqlens)
    return Layout(cu_seqlens.numel() - 1, 0, 0, max_seqlen, max_seqlen, True)


def strides4(t: torch.Tensor, varlen: bool) -> tuple[int, int, int, int]:
    """(batch, head, row, dim) strides; packed tensors (total, H, D) have no batch axis (stride 0)."""
    if varlen:
        return (0, t.stride(1), t.stride(0), t.stride(2))
    return tuple(t.stride())  # type: ignore[return-value]


def row_strides(t: torch.Tensor, varlen: bool) -> tuple[int, int, int]:
    """(batch, head, row) strides of a per-row tensor: (B, H, N) dense or (total, H) packed."""
    if varlen:
        return (0, t.stride(1), t.stride(0))
    return tuple(t.stride())  # type: ignore[return-value]


def key_padding_bytes(mask: torch.Tensor) -> torch.Tensor:
    """The (B, Nk) key-padding mask as uint8 (1 = real key) for the kernels; a bool mask is viewed, not
    copied."""
    return mask.view(torch.uint8) if mask.dtype == torch.bool else (mask != 0).view(torch.uint8)


def cu_seqlens_int32(cu_seqlens: torch.Tensor) -> torch.Tensor:
    return cu_seqlens if cu_seqlens.dtype == torch.int32 else cu_seqlens.to(torch.int32)


def head_dim_block(d: int) -> int:
    """The kernels' ``BLOCK_D``: the head dim rounded up to a power of two, at least 16 (``tl.dot``'s)."""
    return max(16, triton.next_power_of_2(d))


def dot_precision(dtype: torch.dtype) -> str:
    """The kernels' ``DOT_PRECISION`` for inputs of ``dtype`` (see :func:`asu_kernels._triton_common.mma`)."""
    if dtype == torch.float32:
        return "ieee"  # tf32 would be less exact than the PyTorch fp32 reference the kernels match
    if dtype == torch.bfloat16 and interpreting():
        return "fp32_operands"  # the Triton 3.6 interpreter's bf16 dot is wrong; see mma
    return "tf32"


def base2_scale(sm_scale: float) -> float:
    """The kernels' ``qk_scale``: the logit scale times ``log2(e)``, so that ``exp2`` computes ``exp``."""
    return sm_scale * LOG2E.value
