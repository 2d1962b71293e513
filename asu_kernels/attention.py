"""Temperature-scaled flash attention: the public entry point.

``o = softmax(q k^T * scale / temperature + mask) v`` without ever forming the (N x N) matrix on the
Triton path. Semantics (masks, GQA, varlen layout, LSE) are defined in :mod:`asu_kernels.reference`.
"""

from __future__ import annotations

import math

import torch

from asu_kernels import reference
from asu_kernels._backend import use_triton

SUPPORTED_DTYPES = (torch.float16, torch.bfloat16, torch.float32, torch.float64)


def _check_inputs(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    *,
    scale: float | None,
    temperature: float,
    window: int | None,
    cu_seqlens: torch.Tensor | None,
    max_seqlen: int | None,
    key_padding_mask: torch.Tensor | None,
) -> None:
    """Raise a TypeError/ValueError naming the problem; never silently fix the caller's input."""
    for name, t in (("q", q), ("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor):
            raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
        if t.dtype not in SUPPORTED_DTYPES:
            raise TypeError(f"{name} has dtype {t.dtype}; supported: float16, bfloat16, float32, float64")
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(f"q, k, v must share one dtype, got {q.dtype}, {k.dtype}, {v.dtype}")
    if not (q.device == k.device == v.device):
        raise ValueError(f"q, k, v must be on one device, got {q.device}, {k.device}, {v.device}")
    varlen = cu_seqlens is not None
    want = 3 if varlen else 4
    layout = "(total, H, D) with cu_seqlens" if varlen else "(B, H, N, D)"
    for name, t in (("q", q), ("k", k), ("v", v)):
        if t.dim() != want:
            raise ValueError(f"{name} must be {want}-D {layout}, got shape {tuple(t.shape)}")
    d = q.shape[-1]
    if k.shape[-1] != d or v.shape[-1] != d:
        raise ValueError(f"head dims differ: q {d}, k {k.shape[-1]}, v {v.shape[-1]}")
    if k.shape != v.shape:
        raise ValueError(f"k and v must have the same shape, got {tuple(k.shape)} and {tuple(v.shape)}")
    head_axis = 1 if varlen else 1
    hq, hkv = q.shape[head_axis], k.shape[head_axis]
    if hkv == 0 or hq % hkv != 0:
        raise ValueError(f"the number of query heads ({hq}) must be a multiple of key/value heads ({hkv})")
    if d < 16 or d > 256:
        raise ValueError(f"head dim {d} is not supported (16 <= D <= 256)")
    if varlen:
        if q.shape[0] != k.shape[0]:
            raise ValueError(
                f"varlen q and k must have the same total length, got {q.shape[0]} and {k.shape[0]}"
            )
        if not isinstance(cu_seqlens, torch.Tensor) or cu_seqlens.dtype not in (torch.int32, torch.int64):
            raise TypeError("cu_seqlens must be an int32 (or int64) tensor of shape (B+1,)")
        if cu_seqlens.dim() != 1 or cu_seqlens.numel() < 2:
            raise ValueError(f"cu_seqlens must have shape (B+1,) with B >= 1, got {tuple(cu_seqlens.shape)}")
        if cu_seqlens.device != q.device:
            raise ValueError(f"cu_seqlens is on {cu_seqlens.device} but q is on {q.device}")
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
        if key_padding_mask is not None:
            raise ValueError(
                "key_padding_mask is for the dense layout; packed batches carry cu_seqlens instead"
            )
    else:
        if q.shape[0] != k.shape[0]:
            raise ValueError(f"batch sizes differ: q {q.shape[0]}, k {k.shape[0]}")
        if k.shape[2] < q.shape[2]:
            raise ValueError(f"k has fewer positions ({k.shape[2]}) than q ({q.shape[2]})")
        if key_padding_mask is not None:
            if key_padding_mask.shape != (k.shape[0], k.shape[2]):
                raise ValueError(
                    f"key_padding_mask must be (B, Nk) = {(k.shape[0], k.shape[2])}, "
                    f"got {tuple(key_padding_mask.shape)}"
                )
            if key_padding_mask.device != q.device:
                raise ValueError(f"key_padding_mask is on {key_padding_mask.device} but q is on {q.device}")
    t = float(temperature)
    if not math.isfinite(t) or t <= 0:
        raise ValueError(f"temperature must be a finite number > 0, got {temperature}")
    if scale is not None and (not math.isfinite(float(scale)) or float(scale) <= 0):
        raise ValueError(f"scale must be a finite number > 0, got {scale}")
    if window is not None and (int(window) != window or window < 1):
        raise ValueError(f"window must be a positive int (keys visible including the diagonal), got {window}")


def attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    causal: bool = True,
    scale: float | None = None,
    temperature: float = 1.0,
    window: int | None = None,
    cu_seqlens: torch.Tensor | None = None,
    max_seqlen: int | None = None,
    return_lse: bool = False,
    key_padding_mask: torch.Tensor | None = None,
) -> torch.Tensor | tuple[torch.Tensor, torch.Tensor]:
    """Temperature-scaled attention ``softmax(q k^T * scale / temperature) v``.

    Args:
        q: (B, Hq, N, D), or (total, Hq, D) with ``cu_seqlens``. Any strides.
        k, v: (B, Hkv, Nk, D), or (total, Hkv, D). ``Hq % Hkv == 0``.
        causal: bottom-right aligned causal mask.
        scale: logit scale, default ``1/sqrt(D)``.
        temperature: > 0; ASU's forget-teacher uses ``temperature > 1``.
        window: sliding window (keys visible including the diagonal), or None.
        cu_seqlens: (B+1,) int32 document offsets for packed batches; ``max_seqlen`` its longest document.
        return_lse: also return the natural-log LSE (fp32, shaped like q without D).
        key_padding_mask: (B, Nk) bool, True = real key (dense layout only).

    Returns:
        ``out`` shaped like q (and ``lse`` when ``return_lse``).
    """
    _check_inputs(
        q,
        k,
        v,
        scale=scale,
        temperature=temperature,
        window=window,
        cu_seqlens=cu_seqlens,
        max_seqlen=max_seqlen,
        key_padding_mask=key_padding_mask,
    )
    if use_triton(q):
        raise NotImplementedError("the Triton attention kernel is not wired in yet")
    if cu_seqlens is not None:
        out, lse = reference.attention_varlen(
            q, k, v, cu_seqlens, causal=causal, scale=scale, temperature=temperature, window=window
        )
    else:
        out, lse = reference.attention(
            q,
            k,
            v,
            causal=causal,
            scale=scale,
            temperature=temperature,
            window=window,
            key_padding_mask=key_padding_mask,
        )
    return (out, lse) if return_lse else out
