"""Forget-teacher sources: where the smoothed teacher's (and the original model's) hidden states come from.

Every source answers one question with one interface, :meth:`Teacher.hidden_states`: for a batch (see
:mod:`asu.data`) and a (R, L) bool ``mask`` of the positions that predict a label, the teacher's final
hidden states (after the final norm) at those positions, (M, d), plus :meth:`Teacher.lm_head`, the
original LM-head weight (V, d) and bias (V,) or ``None``. The vocabulary KL is then computed by the fused
``linear_kl`` without any (M, V) logits. ``smoothed=True`` asks for the forget-teacher ``theta_tau``
(selected layers at temperature ``tau``), ``smoothed=False`` for the original model at ``tau = 1`` (retain
``kl`` and the reference model of NPO, DPO and UNDIAL).

Sources
    * ``copy`` (:class:`CopyTeacher`): a frozen deep copy of the original model, smoothing set persistently;
      the unsmoothed reference runs the same copy inside ``smoothing(copy, 1.0)``. What the paper does; costs
      a second model and a teacher forward every step.
    * ``base`` (:class:`BaseTeacher`): the PEFT student itself with its adapters disabled
      (``disable_adapter()``) plus smoothing for the duration of the call. No second copy. Only for PEFT
      students.
    * ``cache`` (:class:`CacheTeacher`): one pass over the (fixed) forget set before training with the frozen
      smoothed model stores its hidden states at the label positions, keyed by example id, in bf16 on the CPU
      or on disk, with a frozen copy of the original LM head. Afterwards no teacher model exists at all. The
      original model is the student before its first step, so the pass runs on the student itself (no copy
      is ever made) and the memory "freed" is the whole teacher copy ``copy`` would have kept.
    * ``self`` (:class:`SelfTeacher`, EXPERIMENTAL ``asu-attn`` only): no teacher model at all; the
      attention-map objective compares the student's attention rows with its own detached ones at ``tau``.

Attention-map teachers (``asu-attn``): :meth:`Teacher.attention_qk` returns the original model's post-RoPE
``(q, k)`` of the selected layers, computed at ``tau = 1`` (the temperature enters the KL as
``temperature_t``, so the teacher's own smoothing must be off); ``copy`` and ``base`` provide it, ``self``
returns ``None`` (use the student's own q, k), ``cache`` stores no q, k and refuses.

Decoder-layer teachers (RMU's ``embed`` retain term): :meth:`Teacher.layer_output` returns the original
model's output of one decoder layer at ``tau = 1``; ``copy`` and ``base`` provide it, the others refuse.

Cache layout: per (set, smoothed) store, one flat (sum_s T_s, d) tensor with the rows of example ``s`` at
``offsets[s]:offsets[s + 1]``, in the order :func:`asu.data.label_positions` yields them. A batch's teacher
rows are the concatenation of its ``example_ids``' slices, which is exactly the row-major order of the
student's masked rows. On disk it is one safetensors file per store (``hidden``, ``offsets`` and a CRC-32
per example, ``checksums``), read example by example.

The disk cache is keyed by a fingerprint (:func:`cache_fingerprint`): SHA-256 of the model's weights (per
tensor: name, shape, dtype and two float64 sums, computed where the weights are), its attention
implementation, ``tau``, the layers, the store (set and smoothed or not), the storage dtype and every
example's token ids and labels, which fix the rows, the tokenizer, the template and ``max_length``. The
fingerprint is in the file's name (``forget_smoothed-<16 hex>.safetensors``) and, whole, in its header, so
runs that differ in any of these (two runs sharing a ``--cache-dir`` at tau 2 and tau 5) never read each
other's rows. A file of the same fingerprint left by an earlier run (a resumed one) is reused after it is
verified whole (header, length, every example's checksum; single-process runs only); a file that fails the
check is rebuilt with a warning, never read. While a run reads the file, every example's bytes are checked
against their checksum and length, so a cache truncated or overwritten in place mid-run is one clear error
(:class:`CacheError`) instead of wrong rows.
"""

from __future__ import annotations

import contextlib
import copy as copy_module
import hashlib
import json
import logging
import math
import os
import struct
import zlib
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from asu.data import PaddingCollator, iter_batches, label_positions
from asu.distributed import (
    barrier,
    check_full_weight,
    gather_rows,
    is_local_main_process,
    shard_indices,
    world_size,
)
from asu.files import atomic_write
from asu.qk import capture_qk
from asu.smoothing import LayerSpec, set_smoothing, smoothing

__all__ = [
    "TEACHER_SOURCES",
    "Teacher",
    "CopyTeacher",
    "BaseTeacher",
    "CacheTeacher",
    "CacheError",
    "SelfTeacher",
    "cache_fingerprint",
    "is_peft_model",
    "decoder_hidden",
    "decoder_layers",
    "decoder_layer_output",
    "output_head",
    "LogitHead",
    "logit_head",
    "build_teacher",
]

TEACHER_SOURCES = ("copy", "base", "cache", "self")
#: Written into every cache file's header; a file of another format is rebuilt.
CACHE_FORMAT = "asu-teacher-cache-2"

log = logging.getLogger(__name__)


def is_peft_model(model: nn.Module) -> bool:
    """True for a PEFT-wrapped model (one with ``disable_adapter()`` and a ``peft_config``)."""
    return hasattr(model, "peft_config") and callable(getattr(model, "disable_adapter", None))


def output_head(model: nn.Module) -> tuple[torch.Tensor, torch.Tensor | None]:
    """The LM head's weight (V, d) and bias (V,) or None, read where it is called (inside a forward)."""
    head = model.get_output_embeddings()
    if head is None or getattr(head, "weight", None) is None:
        raise TypeError(f"{type(model).__name__} has no output embedding (LM head) with a weight")
    # Under FSDP/ZeRO-3 the weight is whole only inside the wrapped forward; a shard must not reach the loss.
    check_full_weight(head.weight, getattr(getattr(model, "config", None), "vocab_size", None))
    return head.weight, getattr(head, "bias", None)


@dataclass(frozen=True)
class LogitHead:
    """How a model turns its final hidden states ``h`` into logits: ``softcap(scale * (h W^T + b))``, with
    ``softcap(x) = c tanh(x / c)`` when ``softcap`` is set. The fused losses get the scale folded into the
    hidden states and bias (:meth:`hidden`, :meth:`bias`) and the cap as their ``softcap`` keyword."""

    scale: float = 1.0
    softcap: float | None = None

    def hidden(self, h: torch.Tensor) -> torch.Tensor:
        """``scale * h`` (``h`` itself at scale 1): ``(scale h) W^T = scale (h W^T)``."""
        return h if self.scale == 1.0 else h * self.scale

    def bias(self, b: torch.Tensor | None) -> torch.Tensor | None:
        return b if b is None or self.scale == 1.0 else b * self.scale


# Config fields of the families whose logits are not lm_head(h) (the fused losses must reproduce them):
# field -> how it enters the logits.
_LOGIT_FIELDS = {
    "final_logit_softcapping": "softcap",  # Gemma-2/3: logits = c tanh(lm_head(h) / c)
    "logit_scale": "multiply",  # Cohere: logits = lm_head(h) * logit_scale
    "logits_scaling": "divide",  # Granite: logits = lm_head(h) / logits_scaling
}


def logit_head(model: nn.Module) -> LogitHead:
    """The model's own logit transform (:class:`LogitHead`), read from its (text) config.

    Gemma-2/3's ``final_logit_softcapping``, Cohere's ``logit_scale`` and Granite's ``logits_scaling`` are
    honoured, so the fused vocabulary losses compute the model's own distribution; any other model gets
    ``logits = lm_head(h)``. ValueError for a setting that is not a finite positive number.
    """
    config = getattr(model, "config", None)
    get_text = getattr(config, "get_text_config", None)
    if callable(get_text):
        config = get_text()
    scale, softcap = 1.0, None
    for field, role in _LOGIT_FIELDS.items():
        value = getattr(config, field, None)
        if value is None:
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"the model config sets {field}={value!r}; expected a finite number or None")
        if value <= 0:
            raise ValueError(f"the model config sets {field}={value}; expected a number > 0 (or None)")
        if role == "softcap":
            softcap = float(value)
        elif role == "multiply":
            scale *= float(value)
        else:
            scale /= float(value)
    return LogitHead(scale, softcap)


def decoder_hidden(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Final hidden states (after the final norm) of the model's decoder for a batch, (R, L, d).

    Runs the decoder only (``model.get_decoder()``), never the LM head, so no logits are produced. Padded
    batches pass their ``attention_mask``; packed ones pass none and rely on ``position_ids`` restarts.
    """
    decoder = model.get_decoder()
    out = decoder(
        input_ids=batch["input_ids"],
        attention_mask=batch.get("attention_mask"),
        position_ids=batch.get("position_ids"),
        use_cache=False,
    )
    return out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]


def decoder_layers(model: nn.Module) -> nn.ModuleList:
    """The decoder's layer stack (``layers``, or ``h`` for GPT-2), for hooks on a layer's output."""
    decoder = model.get_decoder()
    for name in ("layers", "h"):
        stack = getattr(decoder, name, None)
        if isinstance(stack, nn.ModuleList):
            return stack
    raise TypeError(f"{type(decoder).__name__} has no decoder layer list ('layers' or 'h')")


def decoder_layer_output(model: nn.Module, batch: dict[str, torch.Tensor], layer: int) -> torch.Tensor:
    """The output hidden states of decoder layer ``layer`` for a batch, (R, L, d), with its autograd graph
    when gradients are on (a forward hook on the layer; the decoder runs in full, never the LM head)."""
    stack = decoder_layers(model)
    if not 0 <= layer < len(stack):
        raise ValueError(f"layer {layer} is out of range: the model has {len(stack)} decoder layers")
    captured: list[torch.Tensor] = []

    def keep(module: nn.Module, args: Any, output: Any) -> None:
        captured.append(output[0] if isinstance(output, tuple) else output)

    handle = stack[layer].register_forward_hook(keep)
    try:
        decoder_hidden(model, batch)
    finally:
        handle.remove()
    return captured[0]


@contextlib.contextmanager
def _eval_mode(model: nn.Module) -> Iterator[None]:
    """Evaluation mode (no dropout) for the block, restoring each module's own flag after."""
    modes = [(m, m.training) for m in model.modules()]
    model.eval()
    try:
        yield
    finally:
        for m, mode in modes:
            m.training = mode


class Teacher(nn.Module):
    """Common interface of the teacher sources; see the module docstring."""

    kind = "abstract"

    def __init__(self, temperature: float, layers: LayerSpec = None) -> None:
        super().__init__()
        self.temperature = float(temperature)
        self.layers = layers
        #: Numbers worth reporting (forward passes, bytes), filled by the sources.
        self.stats: dict[str, Any] = {"source": self.kind}

    def hidden_states(
        self, batch: dict[str, torch.Tensor], mask: torch.Tensor, *, smoothed: bool, part: str
    ) -> torch.Tensor:
        """Teacher hidden states at ``mask`` (R, L) of ``batch``: (M, d), no gradient.

        ``part`` names the set the batch comes from (``"forget"``, ``"retain"``), used by the cache.
        """
        raise NotImplementedError

    def lm_head(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        """The original LM-head weight (V, d) and bias (V,) or None."""
        raise NotImplementedError

    def attention_qk(self, batch: dict[str, torch.Tensor], layers: Sequence[int]) -> dict[int, tuple] | None:
        """The original model's post-RoPE ``(q, k)`` per layer index, (B, Hq, N, D) / (B, Hkv, N, D), no
        gradient, computed with smoothing off (``tau = 1``); ``None`` means self-smoothing (the student's own
        detached q, k). Used by the experimental ``asu-attn`` objective."""
        raise ValueError(
            f"the {self.kind!r} teacher provides no attention q, k; method='asu-attn' needs teacher "
            "'copy', 'base' or 'self'"
        )

    def layer_output(self, batch: dict[str, torch.Tensor], layer: int) -> torch.Tensor:
        """The original model's (tau = 1) output of decoder layer ``layer``, (R, L, d), no gradient (RMU's
        retain term)."""
        raise ValueError(
            f"the {self.kind!r} teacher provides no decoder-layer outputs; RMU's embed retain term needs "
            "teacher 'copy' or 'base'"
        )

    def train(self, mode: bool = True) -> Teacher:
        # The teacher is frozen: it stays in evaluation mode whatever its parent is switched to.
        return super().train(False)


class CopyTeacher(Teacher):
    """A frozen deep copy of the original model with the smoothing set persistently on the copy."""

    kind = "copy"

    def __init__(self, model: nn.Module, temperature: float, layers: LayerSpec = None) -> None:
        super().__init__(temperature, layers)
        if is_peft_model(model):
            raise ValueError("build the copy teacher from the original model before wrapping it with PEFT")
        self.model = copy_module.deepcopy(model)
        self.model.requires_grad_(False)
        self.model.eval()
        set_smoothing(self.model, self.temperature, layers)
        self.stats["teacher_bytes"] = _module_bytes(self.model)

    @torch.no_grad()
    def hidden_states(
        self, batch: dict[str, torch.Tensor], mask: torch.Tensor, *, smoothed: bool, part: str
    ) -> torch.Tensor:
        ctx = contextlib.nullcontext() if smoothed else smoothing(self.model, 1.0, self.layers)
        with ctx:
            return decoder_hidden(self.model, batch)[mask]

    def lm_head(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return output_head(self.model)

    @torch.no_grad()
    def attention_qk(self, batch: dict[str, torch.Tensor], layers: Sequence[int]) -> dict[int, tuple]:
        # The copy is smoothed persistently; q, k must be the original model's (tau enters the KL instead).
        with smoothing(self.model, 1.0, self.layers), capture_qk(self.model, list(layers)) as qk:
            decoder_hidden(self.model, batch)
        return dict(qk)

    @torch.no_grad()
    def layer_output(self, batch: dict[str, torch.Tensor], layer: int) -> torch.Tensor:
        with smoothing(self.model, 1.0, self.layers):
            return decoder_layer_output(self.model, batch, layer)


class BaseTeacher(Teacher):
    """The PEFT student with adapters disabled (plus smoothing while it runs): the original model, no copy.

    The student is not registered as a submodule (it is the objective's), so it is neither saved nor
    counted twice.
    """

    kind = "base"

    def __init__(self, student: nn.Module, temperature: float, layers: LayerSpec = None) -> None:
        super().__init__(temperature, layers)
        if not is_peft_model(student):
            raise ValueError(
                "teacher='base' needs a PEFT (LoRA) student: the teacher is the student with its adapters "
                f"disabled, and {type(student).__name__} has none; use LoRA or teacher='copy'/'cache'"
            )
        self._student = [student]  # a list hides it from nn.Module registration

    @torch.no_grad()
    def hidden_states(
        self, batch: dict[str, torch.Tensor], mask: torch.Tensor, *, smoothed: bool, part: str
    ) -> torch.Tensor:
        student = self._student[0]
        ctx = smoothing(student, self.temperature, self.layers) if smoothed else contextlib.nullcontext()
        with _eval_mode(student), student.disable_adapter(), ctx:
            return decoder_hidden(student, batch)[mask]

    def lm_head(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        # With adapters disabled the head is the frozen base head (LoRA on lm_head keeps base weights).
        head = self._student[0].get_output_embeddings()
        base = getattr(head, "base_layer", head)
        bias = getattr(base, "bias", None)
        check_full_weight(base.weight, getattr(self._student[0].config, "vocab_size", None))
        return base.weight.detach(), None if bias is None else bias.detach()

    @torch.no_grad()
    def attention_qk(self, batch: dict[str, torch.Tensor], layers: Sequence[int]) -> dict[int, tuple]:
        student = self._student[0]
        with _eval_mode(student), student.disable_adapter(), capture_qk(student, list(layers)) as qk:
            decoder_hidden(student, batch)
        return dict(qk)

    @torch.no_grad()
    def layer_output(self, batch: dict[str, torch.Tensor], layer: int) -> torch.Tensor:
        student = self._student[0]
        with _eval_mode(student), student.disable_adapter():
            return decoder_layer_output(student, batch, layer)


class SelfTeacher(Teacher):
    """Self-smoothing for the experimental ``asu-attn`` objective: no teacher model, no teacher forward.

    The target of each selected layer's attention row is the student's own row at temperature ``tau``
    (its q, k detached). It has no hidden states, so it cannot serve ASU, NPO or retain ``kl``.
    """

    kind = "self"

    def hidden_states(
        self, batch: dict[str, torch.Tensor], mask: torch.Tensor, *, smoothed: bool, part: str
    ) -> torch.Tensor:
        raise ValueError(
            "teacher='self' holds no model (self-smoothing for method='asu-attn'); objectives that read "
            "teacher hidden states (asu, npo, retain_loss='kl') need teacher 'copy', 'base' or 'cache'"
        )

    def lm_head(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        raise ValueError("teacher='self' holds no LM head; use teacher 'copy', 'base' or 'cache'")

    def attention_qk(self, batch: dict[str, torch.Tensor], layers: Sequence[int]) -> None:
        return None


class CacheError(ValueError):
    """A teacher cache file that cannot be trusted (changed, truncated or corrupt while a run reads it)."""


def _tensor_bytes(t: torch.Tensor) -> bytes:
    return t.detach().contiguous().view(torch.uint8).numpy().tobytes()


class _Store:
    """Hidden-state rows of every example of one set: flat (N, d) tensor + offsets (S + 1,), in CPU memory."""

    path: str | None = None

    def __init__(self, rows: list[torch.Tensor]) -> None:
        lengths = torch.tensor([0] + [r.shape[0] for r in rows], dtype=torch.long)
        self.offsets = torch.cumsum(lengths, 0)
        self._flat = torch.cat(rows) if rows else torch.zeros(0, 0)
        self.nbytes = self._flat.numel() * self._flat.element_size()

    def gather(self, example_ids: Sequence[int]) -> torch.Tensor:
        return torch.cat([self._flat[self.offsets[i] : self.offsets[i + 1]] for i in example_ids])


def _write_store_file(path: str, rows: list[torch.Tensor], fingerprint: str) -> None:
    """The rows as one safetensors file (``hidden``, ``offsets``, ``checksums``), the fingerprint in its
    header, written atomically."""
    from safetensors.torch import save_file

    lengths = torch.tensor([0] + [r.shape[0] for r in rows], dtype=torch.long)
    offsets = torch.cumsum(lengths, 0)
    flat = torch.cat(rows).contiguous()
    checksums = torch.tensor([zlib.crc32(_tensor_bytes(r)) for r in rows], dtype=torch.long)
    tensors = {"hidden": flat, "offsets": offsets, "checksums": checksums}
    metadata = {"format": CACHE_FORMAT, "fingerprint": fingerprint}
    atomic_write(path, lambda tmp: save_file(tensors, tmp, metadata=metadata))


class _DiskStore:
    """A cache file opened for reading: its header checked against the fingerprint and the file's length,
    then every example read with ``os.pread`` from one descriptor (a file replaced by another run after it
    was opened is not seen) and checked against its length and CRC-32.

    ``verify=True`` reads every example once when opening (a file left by an earlier run).
    """

    def __init__(self, path: str, fingerprint: str, n_examples: int, verify: bool) -> None:
        self.path = path
        self._fd = os.open(path, os.O_RDONLY)
        try:
            self._read_header(fingerprint, n_examples)
            if verify:
                for i in range(n_examples):
                    self._example(i)
        except BaseException:
            os.close(self._fd)
            raise

    def _read_header(self, fingerprint: str, n_examples: int) -> None:
        size = os.fstat(self._fd).st_size
        head = os.pread(self._fd, 8, 0)
        if len(head) < 8:
            raise CacheError(f"{self.path}: shorter than a safetensors header")
        (n,) = struct.unpack("<Q", head)
        if n > min(size - 8, 1 << 28):
            raise CacheError(f"{self.path}: the header length {n} does not fit the file ({size} bytes)")
        try:
            header = json.loads(os.pread(self._fd, n, 8))
        except (UnicodeDecodeError, json.JSONDecodeError):
            raise CacheError(f"{self.path}: unreadable header") from None
        meta = header.get("__metadata__") or {}
        if meta.get("format") != CACHE_FORMAT or meta.get("fingerprint") != fingerprint:
            raise CacheError(f"{self.path}: built for other inputs (its fingerprint differs)")
        try:
            hidden, offsets, sums = header["hidden"], header["offsets"], header["checksums"]
            end = max(t["data_offsets"][1] for t in (hidden, offsets, sums))
            self._dtype = {"BF16": torch.bfloat16, "F16": torch.float16, "F32": torch.float32}[
                hidden["dtype"]
            ]
            rows, self._width = hidden["shape"]
        except (KeyError, TypeError, ValueError):
            raise CacheError(f"{self.path}: not a teacher cache file") from None
        if size != 8 + n + end:
            raise CacheError(f"{self.path}: {size} bytes, the header describes {8 + n + end} (truncated?)")
        base = 8 + n
        self._hidden_at = base + hidden["data_offsets"][0]
        self._row_bytes = self._width * torch.tensor([], dtype=self._dtype).element_size()
        self.offsets = self._read_longs(base, offsets, n_examples + 1, "offsets")
        self.checksums = self._read_longs(base, sums, n_examples, "checksums")
        if int(self.offsets[-1]) != rows or bool((self.offsets[1:] < self.offsets[:-1]).any()):
            raise CacheError(f"{self.path}: offsets do not match the {rows} rows it holds")
        self.nbytes = rows * self._row_bytes

    def _read_longs(self, base: int, entry: dict, count: int, name: str) -> torch.Tensor:
        if entry.get("dtype") != "I64" or entry.get("shape") != [count]:
            raise CacheError(
                f"{self.path}: '{name}' is not {count} int64 values (built for another data set)"
            )
        start, stop = entry["data_offsets"]
        data = os.pread(self._fd, stop - start, base + start)
        if len(data) != stop - start:
            raise CacheError(f"{self.path}: truncated")
        return torch.frombuffer(bytearray(data), dtype=torch.int64).clone()

    def _example(self, i: int) -> torch.Tensor:
        first, last = int(self.offsets[i]), int(self.offsets[i + 1])
        length = (last - first) * self._row_bytes
        data = os.pread(self._fd, length, self._hidden_at + first * self._row_bytes)
        if len(data) != length:
            raise CacheError(f"{self.path}: example {i} is cut short (the file was truncated)")
        if zlib.crc32(data) != int(self.checksums[i]):
            raise CacheError(f"{self.path}: example {i} does not match its checksum (the file changed)")
        if length == 0:
            return torch.zeros(0, self._width, dtype=self._dtype)
        return torch.frombuffer(bytearray(data), dtype=self._dtype).view(last - first, self._width)

    def gather(self, example_ids: Sequence[int]) -> torch.Tensor:
        try:
            return torch.cat([self._example(int(i)) for i in example_ids])
        except CacheError as e:
            raise CacheError(
                f"{e}; the teacher cache must not change while a run reads it: resume the run (--resume) to "
                "rebuild it"
            ) from None

    def __del__(self) -> None:
        fd = getattr(self, "_fd", None)
        if fd is not None:
            with contextlib.suppress(OSError):
                os.close(fd)


def _weights_digest(model: nn.Module) -> str:
    """SHA-256 over every parameter and buffer (adapters excluded): name, shape, dtype, and the float64 sums
    of its values and of their absolute values, reduced where the weights are (no copy leaves the device)."""
    digest = hashlib.sha256()
    tensors = [*model.named_parameters(), *model.named_buffers()]
    sums = []
    for name, t in tensors:
        if t is None or "lora_" in name:
            continue
        digest.update(f"{name}:{tuple(t.shape)}:{t.dtype};".encode())
        if t.is_floating_point() and t.numel():
            data = t.detach()
            sums.append(torch.stack([data.sum(dtype=torch.float64), data.abs().sum(dtype=torch.float64)]))
    if sums:
        digest.update(torch.cat(sums).cpu().numpy().tobytes())
    return digest.hexdigest()


def cache_fingerprint(
    model: nn.Module,
    temperature: float,
    layers: LayerSpec,
    part: str,
    smoothed: bool,
    examples: Sequence[dict[str, Any]],
    dtype: torch.dtype,
    weights: str | None = None,
) -> str:
    """The key of one cache store (see the module docstring); ``weights``: the model's weight digest when
    already computed."""
    digest = hashlib.sha256()
    config = getattr(model, "config", None)
    fields = {
        "format": CACHE_FORMAT,
        "weights": weights or _weights_digest(model),
        "attention": getattr(config, "_attn_implementation", None),
        "temperature": float(temperature),
        "layers": None if layers is None else str(layers),
        "store": [part, bool(smoothed)],
        "dtype": str(dtype),
    }
    digest.update(json.dumps(fields, sort_keys=True).encode())
    for ex in examples:
        digest.update(json.dumps([list(ex["input_ids"]), list(ex["labels"])]).encode())
    return digest.hexdigest()


def _open_store(
    rows: list[torch.Tensor] | None, directory: str | None, name: str, fingerprint: str, n: int
) -> _Store | _DiskStore:
    """The store of ``rows``: in memory, or written to ``directory`` (one process per node writes, the
    others wait) and opened for reading."""
    if directory is None:
        return _Store(rows)
    path = os.path.join(directory, f"{name}-{fingerprint[:16]}.safetensors")
    if is_local_main_process():
        os.makedirs(directory, exist_ok=True)
        _write_store_file(path, rows, fingerprint)
    barrier()  # all ranks build the same stores in the same order, so the barriers match
    return _DiskStore(path, fingerprint, n, verify=False)


def _reuse_store(directory: str | None, name: str, fingerprint: str, n: int) -> _DiskStore | None:
    """A verified store of an earlier run with the same fingerprint, or None (nothing there, or a file that
    fails the checks: it is rebuilt, with a warning). Single-process runs only: ranks must agree."""
    if directory is None or world_size() > 1:
        return None
    path = os.path.join(directory, f"{name}-{fingerprint[:16]}.safetensors")
    if not os.path.exists(path):
        return None
    try:
        return _DiskStore(path, fingerprint, n, verify=True)
    except (CacheError, OSError) as e:
        log.warning(f"teacher cache: {e}; rebuilding it")
        return None


class CacheTeacher(Teacher):
    """Teacher hidden states computed once before training and read back by example id.

    Args:
        model: the original model (the student before training, PEFT or not; adapters are disabled for
            the pass when present).
        sets: ``{part: encoded examples}`` for every set the objective asks about (e.g. ``"forget"``).
        needs: the ``(part, smoothed)`` stores to build, e.g. ``[("forget", True), ("retain", False)]``.
        dtype: storage dtype (bf16 by default: half the memory of fp32, rounding well under the KL's
            sensitivity; fp32 for exact tests).
        directory: store on disk there (safetensors, read by slice) instead of in CPU memory.
        batch_size: examples per teacher forward while building.
    """

    kind = "cache"

    def __init__(
        self,
        model: nn.Module,
        temperature: float,
        layers: LayerSpec,
        sets: dict[str, Sequence[dict[str, Any]]],
        needs: Sequence[tuple[str, bool]],
        dtype: torch.dtype = torch.bfloat16,
        directory: str | None = None,
        batch_size: int = 8,
        pad_token_id: int = 0,
    ) -> None:
        super().__init__(temperature, layers)
        weight, bias = output_head(model)
        # A frozen copy of the original head: the student's own head changes during training.
        self.register_buffer("head_weight", weight.detach().clone(), persistent=False)
        self.register_buffer("head_bias", None if bias is None else bias.detach().clone(), persistent=False)
        self.dtype = dtype
        self.stores: dict[tuple[str, bool], _Store | _DiskStore] = {}
        device = weight.device
        collate = PaddingCollator(pad_token_id=pad_token_id)
        passes = 0
        reused = []
        weights = _weights_digest(model) if directory is not None else None
        peft_ctx = model.disable_adapter() if is_peft_model(model) else contextlib.nullcontext()
        with torch.no_grad(), _eval_mode(model), peft_ctx:
            for part, smoothed in needs:
                if part not in sets:
                    raise ValueError(f"the cache needs the {part!r} set, which was not given")
                examples = sets[part]
                name = f"{part}_{'smoothed' if smoothed else 'reference'}"
                key = ""
                if directory is not None:
                    key = cache_fingerprint(
                        model, temperature, layers, part, smoothed, examples, dtype, weights
                    )
                    store = _reuse_store(directory, name, key, len(examples))
                    if store is not None:
                        self.stores[(part, smoothed)] = store
                        reused.append(store.path)
                        continue
                rows: list[torch.Tensor] = []
                ctx = (
                    smoothing(model, self.temperature, layers) if smoothed else smoothing(model, 1.0, layers)
                )
                # Under data parallelism each rank runs the teacher on every W-th example only, then the
                # rows are all-gathered: every rank needs every example (the sampler reshuffles each epoch).
                mine = shard_indices(len(examples))
                with ctx:
                    for chunk in iter_batches(mine, batch_size):
                        batch = collate.collate([{**examples[i], "example_id": i} for i in chunk])
                        batch = {k: v.to(device) for k, v in batch.items()}
                        hidden = decoder_hidden(model, batch)
                        passes += 1
                        mask, _, seq = label_positions(batch)
                        flat = hidden[mask].to("cpu", dtype)
                        counts = torch.bincount(seq, minlength=len(chunk)).tolist()
                        rows.extend(torch.split(flat, counts))
                rows = gather_rows(rows, mine, len(examples))
                self.stores[(part, smoothed)] = _open_store(rows, directory, name, key, len(examples))
        self.stats.update(
            {
                "teacher_forward_passes": passes,
                "cache_bytes": sum(s.nbytes for s in self.stores.values()),
                "cache_location": directory or "cpu",
                "cache_files_reused": reused,
                "head_bytes": self.head_weight.numel() * self.head_weight.element_size(),
                # What a copy teacher would have held on the device for the whole run.
                "teacher_bytes_freed": _module_bytes(model, trainable_only=False, exclude_adapters=True),
            }
        )

    @torch.no_grad()
    def hidden_states(
        self, batch: dict[str, torch.Tensor], mask: torch.Tensor, *, smoothed: bool, part: str
    ) -> torch.Tensor:
        key = (part, smoothed)
        if key not in self.stores:
            raise KeyError(f"the teacher cache holds {sorted(self.stores)}, not {key}")
        rows = self.stores[key].gather(batch["example_ids"].tolist())
        expected = int(mask.sum())
        if rows.shape[0] != expected:
            raise RuntimeError(
                f"the cache has {rows.shape[0]} rows for this batch, the batch {expected} label positions: "
                "the data changed (max_length, tokenizer) since the cache was built"
            )
        return rows.to(self.head_weight.device, self.head_weight.dtype, non_blocking=True)

    def lm_head(self) -> tuple[torch.Tensor, torch.Tensor | None]:
        return self.head_weight, self.head_bias


def _module_bytes(model: nn.Module, trainable_only: bool = False, exclude_adapters: bool = False) -> int:
    total = 0
    for name, p in model.named_parameters():
        if trainable_only and not p.requires_grad:
            continue
        if exclude_adapters and "lora_" in name:
            continue
        total += p.numel() * p.element_size()
    return total


def build_teacher(
    source: str,
    model: nn.Module,
    temperature: float,
    layers: LayerSpec = None,
    **cache_kwargs: Any,
) -> Teacher:
    """The teacher for ``source`` in ``copy|base|cache|self`` (``cache_kwargs`` go to :class:`CacheTeacher`).

    ``model`` is the original model for ``copy`` (before any PEFT wrapping), the PEFT student for ``base``,
    and either for ``cache``; ``self`` (experimental ``asu-attn`` only) ignores it.
    """
    if source == "copy":
        return CopyTeacher(model, temperature, layers)
    if source == "base":
        return BaseTeacher(model, temperature, layers)
    if source == "cache":
        return CacheTeacher(model, temperature, layers, **cache_kwargs)
    if source == "self":
        return SelfTeacher(temperature, layers)
    raise ValueError(f"unknown teacher source {source!r}; choose one of {', '.join(TEACHER_SOURCES)}")
