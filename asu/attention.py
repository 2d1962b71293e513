"""The ``"asu"`` attention implementation for Hugging Face transformers models.

Importing this module registers, under the name ``"asu"``,

* :func:`asu_attention_forward` in ``transformers.AttentionInterface``: the attention itself, running
  :func:`asu_kernels.attention` (fused temperature flash attention; GQA without ``repeat_kv``; sliding window;
  packed documents), and
* :func:`asu_attention_mask` in ``transformers.masking_utils.AttentionMaskInterface``: the mask the model
  builds for it. Without a mask function registered under the same name, transformers hands a custom
  attention ``attention_mask=None`` even for padded batches, and padding would be attended silently.

so that ``AutoModelForCausalLM.from_pretrained(path, attn_implementation="asu")`` or
``model.set_attn_implementation("asu")`` runs the kernel with no patched model classes. Any model whose
attention calls the interface (Llama, Mistral, Mixtral, Qwen2/2-MoE/3, Gemma 1/2/3, Phi, Phi-3, GPT-NeoX,
OLMo 1/2, StableLM, Granite, Cohere, GPT-2, ...; README "Supported model families") is served.

Per attention module the computation is

    out = softmax(q k^T * scaling / tau + mask) v

with ``scaling`` the module's (passed by the model) and ``tau = module.asu_temperature`` (default 1.0), the
attribute :func:`asu.smoothing.smoothing` sets. A family that soft-caps its attention logits (Gemma-2's
``attn_logit_softcapping``, passed as ``softcap``) gets ``cap * tanh(q k^T * scaling / (tau * cap))``: the
cap after the scale and the temperature, as its eager attention caps after the (smoothed) scaling it is
given. Masks come in three forms, chosen per call:

* padded batch: ``attention_mask`` is a (B, Nk) bool key-padding mask (True = real token) from
  :func:`asu_attention_mask`, combined in the kernel with the causal (bottom-right aligned) and sliding-window
  masks. Query rows of padding that see no real key give 0.
* packed batch (documents concatenated in a row, no padding): ``attention_mask`` is None and the documents
  are found, as transformers' flash-attention path does, from ``cu_seq_lens_q``/``max_length_q`` when the
  caller passes them (``DataCollatorWithFlattening(return_flash_attn_kwargs=True)``), else from the restarts
  of ``position_ids`` (a position that is not the previous one + 1 starts a new document). The batch is
  flattened to the kernel's varlen layout, so no token attends across a document boundary.
* decoding with a KV cache (Nq < Nk): the causal mask is bottom-right aligned, so the new queries sit at the
  end of the cached keys; padding in the cache comes as the key-padding mask.

What the kernel does not do runs where eager attention runs it, at the module's temperature (the model's own
``eager_attention_forward``, else an equivalent one here), with a one-time warning:

* ``output_attentions=True``: the attention weights are materialised and returned;
* a custom 4D ``attention_mask`` (B, 1 or H, Nq, Nk) handed to the model, bool (True = attend) or additive
  float, replaces the causal, window and padding masks, as it does for eager;
* head dims above the kernel's 256. Head dims below its 16 run the kernel on q, k, v zero-padded to 16
  (zero columns change no dot product; the padded output columns are dropped).
"""

from __future__ import annotations

import math
import sys
import warnings
import weakref

import torch
from transformers import AttentionInterface
from transformers.masking_utils import AttentionMaskInterface

import asu_kernels
from asu.data import cu_seqlens, document_starts
from asu.smoothing import TEMPERATURE_ATTR, position_bias_reason
from asu.warning import AsuWarning

__all__ = ["ATTN_IMPLEMENTATION", "asu_attention_forward", "asu_attention_mask", "register"]

#: The name the attention and mask functions are registered under.
ATTN_IMPLEMENTATION = "asu"
#: Head dims the kernel runs: smaller ones are zero-padded up to the minimum, larger ones run eager.
KERNEL_MIN_HEAD_DIM, KERNEL_MAX_HEAD_DIM = 16, 256
_warned: set[str] = set()


def asu_attention_mask(
    batch_size: int,
    q_length: int,
    kv_length: int,
    q_offset: int = 0,
    kv_offset: int = 0,
    mask_function: object = None,
    attention_mask: torch.Tensor | None = None,
    **kwargs: object,
) -> torch.Tensor | None:
    """The mask transformers builds for the ``asu`` attention: a (B, kv_length) bool key-padding mask or None.

    The causal, sliding-window and packed-document structure is not materialised (the kernel applies the
    first two from ``causal``/``window``, and the attention function finds documents from ``position_ids``);
    only padding needs a tensor. ``attention_mask`` is the user's 2D mask (B, seen + q_length), True/1 = real
    token. It is sliced to the last ``kv_length`` columns, which are the keys a sliding-window cache keeps.
    None is returned when nothing is padded (the kernel then needs no mask at all).

    Raises:
        ValueError: the model adds a position bias through its mask (Falcon's ALiBi configs), which the
            kernels cannot apply (:func:`asu.smoothing.position_bias_reason`).
    """
    reason = position_bias_reason(kwargs.get("config"))
    if reason is not None:
        raise ValueError(f"the asu attention cannot run this model: its attention {reason}")
    if attention_mask is None:
        return None
    if attention_mask.dim() == 4:
        return attention_mask  # a custom mask: the attention function honours it as eager does
    if attention_mask.dim() != 2:
        raise ValueError(
            "the asu attention expects a 2D (batch, length) attention_mask or a 4D custom mask, "
            f"got shape {tuple(attention_mask.shape)}"
        )
    mask = attention_mask[:, -kv_length:].to(torch.bool)
    if mask.shape[1] == kv_length and bool(mask.all()):
        return None
    return mask


# The documents of a packed batch are the same in every layer of one forward: remember the last derivation
# (keyed on the position_ids tensor object and its version) so that only the first layer pays the host sync.
_packed_cache: dict[str, object] = {"ref": None, "version": -1, "batch": -1, "value": None}


def _documents_from_position_ids(
    position_ids: torch.Tensor, batch_size: int
) -> tuple[torch.Tensor, int] | None:
    """``(cu_seqlens int32 (docs+1,), max_seqlen)`` over the flattened B*N tokens; None if nothing is packed.

    Documents are those of :func:`asu.data.packed_documents` (a document starts at each row's first token and
    wherever ``position_ids[t] != position_ids[t-1] + 1``, as transformers' ``find_packed_sequence_indices``).
    """
    ref = _packed_cache["ref"]
    if (
        ref is not None
        and ref() is position_ids
        and _packed_cache["version"] == position_ids._version
        and _packed_cache["batch"] == batch_size
    ):
        return _packed_cache["value"]  # type: ignore[return-value]
    pos = position_ids
    if pos.dim() == 1:
        pos = pos[None]
    if pos.shape[0] != batch_size:
        pos = pos.expand(batch_size, -1)
    starts = document_starts(pos)
    value = None if int(starts.sum()) == batch_size else cu_seqlens(starts)
    _packed_cache.update(
        ref=weakref.ref(position_ids), version=position_ids._version, batch=batch_size, value=value
    )
    return value


def _flash_kwargs_documents(kwargs: dict) -> tuple[torch.Tensor, int] | None:
    """cu_seqlens/max_seqlen from the flash-attention kwargs of ``DataCollatorWithFlattening``, if present."""
    cu_q, cu_k = kwargs.get("cu_seq_lens_q"), kwargs.get("cu_seq_lens_k")
    if cu_q is None and cu_k is None:
        return None
    if cu_q is None or (cu_k is not None and cu_k is not cu_q and not torch.equal(cu_q, cu_k)):
        raise ValueError(
            "the asu attention supports packed batches with identical query and key documents "
            "(cu_seq_lens_q == cu_seq_lens_k)"
        )
    cu = cu_q.to(torch.int32)
    max_q = kwargs.get("max_length_q")
    max_len = int(max_q) if max_q is not None else int((cu[1:] - cu[:-1]).max())
    return cu, max_len


def asu_attention_forward(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float | None = None,
    dropout: float = 0.0,
    sliding_window: int | None = None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """transformers attention-interface function running :func:`asu_kernels.attention`.

    Args:
        module: the attention module (reads ``asu_temperature``, default 1.0, and ``is_causal``).
        query: (B, Hq, Nq, D); key, value: (B, Hkv, Nk, D) with ``Hq % Hkv == 0`` (not repeated), Nq <= Nk.
        attention_mask: None or the (B, Nk') bool key-padding mask of :func:`asu_attention_mask`.
        scaling: logit scale (the module's ``scaling``), default ``1/sqrt(D)``.
        dropout: must be 0: attention dropout is not implemented (raises ValueError otherwise).
        sliding_window: keys visible including the diagonal (transformers' convention), or None.
        kwargs: ``position_ids`` (B or 1, Nq), ``cu_seq_lens_q``/``max_length_q`` for packed batches,
            ``is_causal``, ``softcap`` (attention logit soft-cap, None = none), ``output_attentions``
            (the weights are returned, computed eagerly); attention sinks raise ValueError.

    Returns:
        ``(out, None)`` with out (B, Nq, Hq, D) in the query's dtype, or ``(out, weights)`` (B, Hq, Nq, Nk)
        from the eager path (see the module docstring).
    """
    _check_supported(dropout, kwargs)
    # Under autocast, RoPE promotes q and k to fp32 while v comes out of an autocast matmul in the low
    # precision: run the kernel in the autocast dtype, as sdpa does.
    if torch.is_autocast_enabled(query.device.type):
        dtype = torch.get_autocast_dtype(query.device.type)
        query, key, value = query.to(dtype), key.to(dtype), value.to(dtype)
    is_causal = kwargs.get("is_causal")
    options = dict(
        causal=bool(getattr(module, "is_causal", True) if is_causal is None else is_causal),
        scale=None if scaling is None else float(scaling),
        temperature=float(getattr(module, TEMPERATURE_ATTR, 1.0)),
        window=int(sliding_window) if sliding_window is not None else None,
        softcap=None if kwargs.get("softcap") is None else float(kwargs["softcap"]),
    )
    eager_reason = _eager_reason(query, attention_mask, kwargs)
    if eager_reason is not None:
        _warn_once(eager_reason)
        documents = None if attention_mask is not None else _documents(query, key, None, kwargs)
        return _eager_attention(module, query, key, value, attention_mask, documents, sliding_window, options)
    query, key, value, head_dim = _pad_head_dim(query, key, value)
    if head_dim != query.shape[-1] and options["scale"] is None:
        options["scale"] = 1.0 / math.sqrt(head_dim)  # the scale of the real head dim, not the padded one
    documents = _documents(query, key, attention_mask, kwargs)
    if documents is not None:
        out = _packed_attention(query, key, value, attention_mask, documents, **options)
    else:
        out = _padded_attention(query, key, value, attention_mask, **options)
    return out[..., :head_dim], None


def _eager_reason(query: torch.Tensor, attention_mask: torch.Tensor | None, kwargs: dict) -> str | None:
    """Why this call runs eagerly (see the module docstring), or None for the kernel."""
    if kwargs.get("output_attentions"):
        return "output_attentions=True: the attention weights are computed eagerly"
    if attention_mask is not None and attention_mask.dim() == 4:
        return "a custom 4D attention_mask: attention runs eagerly with that mask"
    if query.shape[-1] > KERNEL_MAX_HEAD_DIM:
        return f"head dim {query.shape[-1]} > {KERNEL_MAX_HEAD_DIM}: attention runs eagerly"
    return None


def _warn_once(reason: str) -> None:
    kind = reason.split(":")[0]
    if kind not in _warned:
        _warned.add(kind)
        warnings.warn(f"asu attention: {reason} (at the module's temperature)", AsuWarning, stacklevel=3)


def _pad_head_dim(
    query: torch.Tensor, key: torch.Tensor, value: torch.Tensor
) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, int]:
    """q, k, v zero-padded along the head dim up to :data:`KERNEL_MIN_HEAD_DIM`, and the real head dim."""
    head_dim = query.shape[-1]
    if head_dim >= KERNEL_MIN_HEAD_DIM:
        return query, key, value, head_dim
    pad = (0, KERNEL_MIN_HEAD_DIM - head_dim)
    pads = (torch.nn.functional.pad(t, pad) for t in (query, key, value))
    return (*pads, head_dim)


def _eager_function(module: torch.nn.Module):
    """The model family's own ``eager_attention_forward`` (its module defines it), else :func:`_eager`."""
    family = sys.modules.get(type(module).__module__)
    return getattr(family, "eager_attention_forward", None) or _eager


def _eager(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    scaling: float,
    dropout: float = 0.0,
    softcap: float | None = None,
    **kwargs: object,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention as transformers' families write it: ``softmax(q k^T * scaling (soft-capped) + mask)``
    in float32, GQA by repeating k and v; returns ``(out (B, Nq, Hq, D), weights (B, Hq, Nq, Nk))``."""
    groups = query.shape[1] // key.shape[1]
    key, value = key.repeat_interleave(groups, dim=1), value.repeat_interleave(groups, dim=1)
    scores = torch.matmul(query, key.transpose(2, 3)) * scaling
    if softcap is not None:
        scores = torch.tanh(scores / softcap) * softcap
    if attention_mask is not None:
        scores = scores + attention_mask
    weights = torch.softmax(scores, dim=-1, dtype=torch.float32).to(query.dtype)
    weights = torch.nn.functional.dropout(weights, p=dropout, training=module.training)
    return torch.matmul(weights, value).transpose(1, 2).contiguous(), weights


def _eager_mask(
    query: torch.Tensor,
    key: torch.Tensor,
    attention_mask: torch.Tensor | None,
    documents: tuple[torch.Tensor, int] | None,
    causal: bool,
    window: int | None,
) -> torch.Tensor:
    """The additive (B, 1, Nq, Nk) mask eager attention adds to its scores: 0 where a query sees a key
    (causal bottom-right aligned, window, key padding, same packed document), the dtype's minimum elsewhere.
    A custom 4D mask is used as given: bool (True = attend) becomes additive, a float one is kept."""
    batch, n_q, n_k = query.shape[0], query.shape[2], key.shape[2]
    low = torch.finfo(query.dtype).min
    if attention_mask is not None and attention_mask.dim() == 4:
        mask = attention_mask[..., :n_k]
        if mask.dtype == torch.bool:
            return torch.zeros(mask.shape, dtype=query.dtype, device=query.device).masked_fill(~mask, low)
        return mask.to(query.dtype)
    i = torch.arange(n_q, device=query.device)[:, None] + (n_k - n_q)
    j = torch.arange(n_k, device=query.device)[None, :]
    allowed = torch.ones(n_q, n_k, dtype=torch.bool, device=query.device)
    if causal:
        allowed &= j <= i
    if window:
        allowed &= j > i - window
    allowed = allowed.expand(batch, 1, n_q, n_k)
    if attention_mask is not None:
        keys = attention_mask.to(torch.bool)
        keys = (
            keys[:, -n_k:]
            if keys.shape[1] >= n_k
            else torch.nn.functional.pad(keys, (0, n_k - keys.shape[1]))
        )
        allowed = allowed & keys[:, None, None, :]
    if documents is not None:
        starts = torch.zeros(batch * n_q, dtype=torch.long, device=query.device)
        starts[documents[0][1:-1].long()] = 1
        doc = starts.cumsum(0).view(batch, n_q)
        allowed = allowed & (doc[:, None, :, None] == doc[:, None, None, :])
    return torch.zeros(allowed.shape, dtype=query.dtype, device=query.device).masked_fill(~allowed, low)


def _eager_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    documents: tuple[torch.Tensor, int] | None,
    sliding_window: int | None,
    options: dict,
) -> tuple[torch.Tensor, torch.Tensor]:
    """Eager attention at the module's temperature (``scaling / tau``): ``(out (B, Nq, Hq, D), weights)``."""
    scale = options["scale"] if options["scale"] is not None else 1.0 / math.sqrt(query.shape[-1])
    mask = _eager_mask(query, key, attention_mask, documents, options["causal"], options["window"])
    eager = _eager_function(module)
    extra = {"softcap": options["softcap"]} if options["softcap"] is not None else {}
    if sliding_window is not None:
        extra["sliding_window"] = sliding_window
    return eager(
        module, query, key, value, mask, scaling=scale / options["temperature"], dropout=0.0, **extra
    )


def _check_supported(dropout: float, kwargs: dict) -> None:
    """ValueError for what neither the kernel nor its eager path does: dropout, sinks."""
    if dropout:
        raise ValueError(
            f"the asu attention does not implement attention dropout (got dropout={dropout} in training "
            "mode); set config.attention_dropout = 0.0"
        )
    if kwargs.get("s_aux") is not None or kwargs.get("sinks") is not None:
        raise ValueError("the asu attention does not support attention sinks")


def _documents(
    query: torch.Tensor, key: torch.Tensor, attention_mask: torch.Tensor | None, kwargs: dict
) -> tuple[torch.Tensor, int] | None:
    """The packed documents of the call, from the flash-attention kwargs or, for an unpadded prefill (no
    mask, no cache), from ``position_ids``; None when the batch is not packed."""
    documents = _flash_kwargs_documents(kwargs)
    n_q, n_k = query.shape[2], key.shape[2]
    if documents is None and attention_mask is None and n_q == n_k and n_q > 1:
        position_ids = kwargs.get("position_ids")
        if isinstance(position_ids, torch.Tensor) and position_ids.shape[-1] == n_q:
            documents = _documents_from_position_ids(position_ids, query.shape[0])
    return documents


def _packed_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    documents: tuple[torch.Tensor, int],
    **options: object,
) -> torch.Tensor:
    """Per-document attention of a packed batch, (B, Nq, Hq, D)."""
    batch, heads, n_q, head_dim = query.shape
    n_k = key.shape[2]
    if attention_mask is not None:
        raise ValueError(
            "a packed batch (cu_seq_lens_q or restarting position_ids) must not also carry padding "
            "in attention_mask"
        )
    if n_q != n_k:
        raise ValueError(f"a packed batch cannot be used with a KV cache (query {n_q} != key {n_k} tokens)")
    cu, max_seqlen = documents
    # (B, H, N, D) -> (B*N, H, D): the kernel's varlen layout; a transposed view of q_proj's output.
    q = query.transpose(1, 2).reshape(batch * n_q, heads, head_dim)
    k = key.transpose(1, 2).reshape(batch * n_k, key.shape[1], head_dim)
    v = value.transpose(1, 2).reshape(batch * n_k, value.shape[1], head_dim)
    out = asu_kernels.attention(q, k, v, cu_seqlens=cu.to(query.device), max_seqlen=max_seqlen, **options)
    return out.view(batch, n_q, heads, head_dim)


def _padded_attention(
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **options: object,
) -> torch.Tensor:
    """Attention of a padded batch (key-padding mask) or an unpadded one (None), (B, Nq, Hq, D)."""
    n_k = key.shape[2]
    if attention_mask is not None:
        if attention_mask.dim() != 2 or attention_mask.dtype != torch.bool:
            raise ValueError(
                "the asu attention expects a (batch, keys) bool key-padding mask or a 4D custom mask, got "
                f"{tuple(attention_mask.shape)} {attention_mask.dtype}"
            )
        if attention_mask.shape[1] < n_k:
            # A static cache is longer than what was written so far: the slots past the mask are empty, and
            # the queries are the last written positions (as flash-attention's unpadding treats it).
            key, value = key[:, :, : attention_mask.shape[1]], value[:, :, : attention_mask.shape[1]]
        elif attention_mask.shape[1] > n_k:
            attention_mask = attention_mask[:, -n_k:]
    out = asu_kernels.attention(query, key, value, key_padding_mask=attention_mask, **options)
    return out.transpose(1, 2)


def register() -> None:
    """Register the ``"asu"`` attention and mask functions with transformers (idempotent)."""
    AttentionInterface.register(ATTN_IMPLEMENTATION, asu_attention_forward)
    AttentionMaskInterface.register(ATTN_IMPLEMENTATION, asu_attention_mask)


register()
