"""Attention benchmark: forward, backward and forward+backward time, TFLOP/s and peak memory per provider.

FLOPs, the convention of FlashAttention's benchmarks (see also the "Benchmarks" section of
``docs/ARCHITECTURE.md``): the forward's two matmuls ``q k^T`` and ``p v`` cost ``2 * B * Hq * N^2 * D`` each,
so ``4 * B * Hq * N^2 * D``, halved when causal (half the blocks are masked); the backward's five matmuls
(``s`` recomputed, ``dv``, ``dp``, ``dq``, ``dk``) make it 2.5x the forward; forward+backward 3.5x. Softmax
and other elementwise work is not counted.

Logits are ``q.k * scale / temperature`` for every provider (SDPA, FlexAttention and flash-attn get
``scale / temperature`` as their scale).

Providers
    * ``eager``: what transformers' eager path runs: ``repeat_kv`` copies, ``matmul``, additive float mask,
      ``softmax`` in fp32 cast back, ``matmul``.
    * ``sdpa-flash`` / ``sdpa-efficient`` / ``sdpa-cudnn`` / ``sdpa-math``: ``F.scaled_dot_product_attention``
      pinned to one backend with ``torch.nn.attention.sdpa_kernel``; GQA through ``enable_gqa=True`` where the
      backend takes it, else through ``repeat_kv`` (as transformers' SDPA path does), said in the note.
    * ``flex``: ``torch.compile(flex_attention)`` with a causal ``BlockMask`` and ``scale=``; the compile
      time of the first forward and first forward+backward is a row of its own (metric ``compile_s``).
      CUDA only.
    * ``flash-attn2`` / ``flash-attn3``: ``flash_attn_func`` when importable, on (B, N, H, D) inputs.
    * ``ours``: ``asu_kernels.attention``.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.nn.functional as F

from benchmarks.common import (
    Plan,
    Recorder,
    Rotating,
    Unavailable,
    is_oom,
    ours_backend_note,
    peak_memory_gb,
    time_call,
)

MODES = ("fwd", "bwd", "fwd+bwd")
#: Provider names in the order tables list them.
PROVIDERS = (
    "eager",
    "sdpa-math",
    "sdpa-efficient",
    "sdpa-flash",
    "sdpa-cudnn",
    "flex",
    "flash-attn2",
    "flash-attn3",
    "ours",
)
QUICK_PROVIDERS = ("eager", "sdpa-efficient", "sdpa-flash", "sdpa-cudnn", "ours")


@dataclass(frozen=True)
class AttentionShape:
    """One benchmarked configuration: q (B, Hq, N, D), k/v (B, Hkv, N, D)."""

    batch: int
    heads_q: int
    heads_kv: int
    seqlen: int
    head_dim: int
    causal: bool
    temperature: float
    dtype: torch.dtype

    def flops(self, mode: str) -> float:
        """Matmul FLOPs of one call in ``mode`` (the convention FlashAttention's benchmarks use)."""
        fwd = 4.0 * self.batch * self.heads_q * self.seqlen**2 * self.head_dim
        if self.causal:
            fwd /= 2
        return fwd * {"fwd": 1.0, "bwd": 2.5, "fwd+bwd": 3.5}[mode]

    def columns(self) -> dict[str, Any]:
        return {
            "dtype": self.dtype,
            "batch": self.batch,
            "heads_q": self.heads_q,
            "heads_kv": self.heads_kv,
            "seqlen": self.seqlen,
            "head_dim": self.head_dim,
            "causal": self.causal,
            "temperature": self.temperature,
        }


def shapes(suite: str, device: str, tiny: bool = False) -> list[AttentionShape]:
    """The grid of a suite.

    * ``quick`` (CUDA): d=128, causal, GQA 32/8, N = 1k, 4k, 16k with B*N = 16k, bf16, temperature 1.
    * ``full`` (CUDA): d in (64, 128) x causal in (True, False) x N = 512..32k (B*N = 16k) x MHA 32/32 and
      GQA 32/8, temperature 1 (and 2.3 at d=128 causal), bf16.
    * CPU: fp32, B=1, Hq=4, Hkv in (4, 2), D=32, N in (64, 128) (``tiny``: N=64 only).
    """
    if suite not in ("quick", "full"):
        raise ValueError(f"suite must be 'quick' or 'full', got {suite!r}")
    if not device.startswith("cuda"):
        ns = (64,) if tiny else (64, 128)
        kv_heads = (2,) if suite == "quick" or tiny else (4, 2)
        causals = (True,) if suite == "quick" or tiny else (True, False)
        temps = (1.0,) if suite == "quick" or tiny else (1.0, 2.3)
        return [
            AttentionShape(1, 4, hkv, n, 32, c, t, torch.float32)
            for c in causals
            for hkv in kv_heads
            for t in temps
            for n in ns
        ]
    total = 16 * 1024
    if suite == "quick":
        return [
            AttentionShape(total // n, 32, 8, n, 128, True, 1.0, torch.bfloat16) for n in (1024, 4096, 16384)
        ]
    out = []
    for d in (128, 64):
        for causal in (True, False):
            for hkv in (8, 32):
                # Temperature changes no provider's work: 2.3 (the ASU teacher) only at d=128, causal.
                for temp in (1.0, 2.3) if (d == 128 and causal) else (1.0,):
                    for n in (512, 1024, 2048, 4096, 8192, 16384, 32768):
                        out.append(
                            AttentionShape(max(1, total // n), 32, hkv, n, d, causal, temp, torch.bfloat16)
                        )
    return out


def repeat_kv(x: torch.Tensor, n_rep: int) -> torch.Tensor:
    """transformers' ``repeat_kv``: (B, Hkv, N, D) -> (B, Hkv * n_rep, N, D) by expand + reshape (a copy)."""
    if n_rep == 1:
        return x
    b, h, n, d = x.shape
    return x[:, :, None].expand(b, h, n_rep, n, d).reshape(b, h * n_rep, n, d)


def _scale(shape: AttentionShape) -> float:
    return 1.0 / math.sqrt(shape.head_dim) / shape.temperature


class Provider:
    """An attention implementation: ``prepare`` lays out inputs, ``__call__`` computes the output."""

    name = "provider"

    def __init__(self, shape: AttentionShape, device: str):
        self.shape = shape
        self.device = device
        self.note = ""

    def prepare(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return q, k, v

    def __call__(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        raise NotImplementedError


class Eager(Provider):
    name = "eager"

    def __init__(self, shape: AttentionShape, device: str):
        super().__init__(shape, device)
        self.mask = None
        if shape.causal:
            # transformers builds one additive float mask per forward (min value above the diagonal).
            n = shape.seqlen
            allowed = torch.ones(n, n, dtype=torch.bool, device=device).tril()
            neg = torch.finfo(shape.dtype).min
            self.mask = torch.zeros(n, n, dtype=shape.dtype, device=device).masked_fill(~allowed, neg)[
                None, None
            ]

    def __call__(self, q, k, v):
        groups = self.shape.heads_q // self.shape.heads_kv
        k, v = repeat_kv(k, groups), repeat_kv(v, groups)
        w = torch.matmul(q, k.transpose(2, 3)) * _scale(self.shape)
        if self.mask is not None:
            w = w + self.mask
        w = F.softmax(w, dim=-1, dtype=torch.float32).to(q.dtype)
        return torch.matmul(w, v)


class Sdpa(Provider):
    BACKENDS = {
        "sdpa-flash": "FLASH_ATTENTION",
        "sdpa-efficient": "EFFICIENT_ATTENTION",
        "sdpa-cudnn": "CUDNN_ATTENTION",
        "sdpa-math": "MATH",
    }

    def __init__(self, name: str, shape: AttentionShape, device: str):
        super().__init__(shape, device)
        from torch.nn.attention import SDPBackend, sdpa_kernel

        self.name = name
        backend = getattr(SDPBackend, self.BACKENDS[name], None)
        if backend is None:
            raise Unavailable(f"SDPBackend.{self.BACKENDS[name]} does not exist in torch {torch.__version__}")
        self._ctx = lambda: sdpa_kernel([backend])
        self.gqa_native = shape.heads_q != shape.heads_kv
        if shape.heads_q != shape.heads_kv:
            # Probe once on a small input whether this backend takes enable_gqa; otherwise copy K/V per group.
            small = [
                torch.randn(1, h, 128, shape.head_dim, device=device, dtype=shape.dtype)
                for h in (shape.heads_q, shape.heads_kv, shape.heads_kv)
            ]
            try:
                with self._ctx():
                    F.scaled_dot_product_attention(*small, is_causal=shape.causal, enable_gqa=True)
            except (RuntimeError, TypeError):
                self.gqa_native = False
                self.note = "GQA via repeat_kv"
        try:
            probe = [
                torch.randn(1, shape.heads_q, 128, shape.head_dim, device=device, dtype=shape.dtype)
                for _ in range(3)
            ]
            with self._ctx():
                F.scaled_dot_product_attention(*probe, is_causal=shape.causal)
        except RuntimeError as e:
            raise Unavailable(f"{name}: backend not available for this device/dtype/shape ({e})") from None

    def __call__(self, q, k, v):
        extra = {}
        if self.gqa_native:
            extra["enable_gqa"] = True
        else:
            groups = self.shape.heads_q // self.shape.heads_kv
            k, v = repeat_kv(k, groups), repeat_kv(v, groups)
        with self._ctx():
            return F.scaled_dot_product_attention(
                q, k, v, is_causal=self.shape.causal, scale=_scale(self.shape), **extra
            )


class Flex(Provider):
    name = "flex"

    def __init__(self, shape: AttentionShape, device: str):
        super().__init__(shape, device)
        if not device.startswith("cuda"):
            raise Unavailable(
                "compiled FlexAttention is benchmarked on CUDA only (its CPU compile takes minutes)"
            )
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        except ImportError as e:
            raise Unavailable(f"FlexAttention not in torch {torch.__version__}: {e}") from None
        # A fresh dynamo state per shape: the first call's time is then this shape's compile time, and the
        # recompile limit is never reached (past it dynamo would silently fall back to unfused eager flex).
        torch._dynamo.reset()
        self._flex = torch.compile(flex_attention, dynamic=False)
        self.block_mask = None
        if shape.causal:
            self.block_mask = create_block_mask(
                lambda b, h, q_idx, kv_idx: q_idx >= kv_idx,
                None,
                None,
                shape.seqlen,
                shape.seqlen,
                device=device,
            )

    def __call__(self, q, k, v):
        return self._flex(
            q,
            k,
            v,
            block_mask=self.block_mask,
            scale=_scale(self.shape),
            enable_gqa=self.shape.heads_q != self.shape.heads_kv,
        )


class FlashAttn(Provider):
    def __init__(self, name: str, shape: AttentionShape, device: str):
        super().__init__(shape, device)
        self.name = name
        if not device.startswith("cuda"):
            raise Unavailable(f"{name} needs CUDA")
        try:
            if name == "flash-attn3":
                from flash_attn_interface import flash_attn_func
            else:
                from flash_attn import flash_attn_func
        except ImportError as e:
            raise Unavailable(f"{name} is not installed ({e})") from None
        self._fn = flash_attn_func

    def prepare(self, q, k, v):
        # flash-attn takes (B, N, H, D); the layout change is done once, outside the timing.
        return tuple(t.transpose(1, 2).contiguous() for t in (q, k, v))

    def __call__(self, q, k, v):
        out = self._fn(q, k, v, softmax_scale=_scale(self.shape), causal=self.shape.causal)
        return out[0] if isinstance(out, tuple) else out


class Ours(Provider):
    name = "ours"

    def __init__(self, shape: AttentionShape, device: str):
        super().__init__(shape, device)
        import asu_kernels

        self._attention = asu_kernels.attention

    def __call__(self, q, k, v):
        return self._attention(q, k, v, causal=self.shape.causal, temperature=self.shape.temperature)


def make_provider(name: str, shape: AttentionShape, device: str) -> Provider:
    """Build provider ``name`` for ``shape``; raises :class:`Unavailable` when it cannot run here."""
    if name == "eager":
        return Eager(shape, device)
    if name.startswith("sdpa-"):
        return Sdpa(name, shape, device)
    if name == "flex":
        return Flex(shape, device)
    if name.startswith("flash-attn"):
        return FlashAttn(name, shape, device)
    if name == "ours":
        return Ours(shape, device)
    raise ValueError(f"unknown attention provider {name!r}; known: {', '.join(PROVIDERS)}")


def _input_sets(shape: AttentionShape, device: str, count: int, seed: int) -> list[tuple[torch.Tensor, ...]]:
    gen = torch.Generator(device=device).manual_seed(seed)
    sets = []
    for _ in range(count):
        q = torch.randn(
            shape.batch, shape.heads_q, shape.seqlen, shape.head_dim, generator=gen, device=device
        )
        k = torch.randn(
            shape.batch, shape.heads_kv, shape.seqlen, shape.head_dim, generator=gen, device=device
        )
        v = torch.randn(
            shape.batch, shape.heads_kv, shape.seqlen, shape.head_dim, generator=gen, device=device
        )
        sets.append(tuple(t.to(shape.dtype) for t in (q, k, v)))
    return sets


def _n_sets(shape: AttentionShape, device: str) -> int:
    """Rotate over 3 input sets unless they would take more than 2 GB (then 2)."""
    if not device.startswith("cuda"):
        return 2
    per_set = (shape.heads_q + 2 * shape.heads_kv) * shape.batch * shape.seqlen * shape.head_dim * 2
    return 3 if 3 * per_set < 2e9 else 2


def bench_shape(rec: Recorder, shape: AttentionShape, plan: Plan, *, seed: int = 0) -> None:
    """Measure every provider x mode of one shape and record ms, TFLOP/s and GB rows."""
    device = rec.device
    raw_sets = _input_sets(shape, device, _n_sets(shape, device), seed)
    make = lambda name: make_provider(name, shape, device)
    for name, base, prov in rec.providers("attention", shape.columns(), plan.providers, plan.modes, make):
        note = prov.note or (ours_backend_note(raw_sets[0][0]) if name == "ours" else "")
        if name == "flex":
            # Compile time apart, before any timing: the first forward (inference) and forward+backward.
            for mode in ("fwd", "fwd+bwd"):
                row = {**base, "mode": mode}
                rec.guarded(
                    row,
                    lambda row=row, mode=mode, prov=prov: _record_compile(rec, row, prov, raw_sets[0], mode),
                )

        def inputs(mode: str, prov=prov) -> list[tuple[torch.Tensor, ...]]:
            return [
                tuple(t.detach().requires_grad_(mode != "fwd") for t in prov.prepare(*s)) for s in raw_sets
            ]

        time_modes(rec, base, prov, inputs, plan.modes, shape, rep_ms=plan.rep_ms, note=note)


def time_modes(
    rec: Recorder,
    base: dict[str, Any],
    prov: Callable[..., torch.Tensor],
    inputs: Callable[[str], list[tuple[torch.Tensor, ...]]],
    modes: tuple[str, ...],
    shape: AttentionShape,
    *,
    rep_ms: float,
    note: str,
) -> None:
    """For each mode, the ``ms``, ``TFLOP/s`` and ``GB`` rows of ``prov``, rotating over ``inputs(mode)``
    (the input sets, the leaves that need gradients in that mode marked); a failure is a status row."""
    for mode in modes:
        row = {**base, "mode": mode}
        rec.guarded(
            row,
            lambda mode=mode, row=row: _time_mode(rec, row, prov, inputs(mode), mode, shape, rep_ms, note),
        )


def _time_mode(
    rec: Recorder,
    row: dict[str, Any],
    prov: Callable[..., torch.Tensor],
    sets: list[tuple[torch.Tensor, ...]],
    mode: str,
    shape: AttentionShape,
    rep_ms: float,
    note: str,
) -> None:
    """The three rows of one mode (see :func:`time_modes`)."""
    fn, grads = _timed_callable(prov, sets, mode)
    fn()  # first call outside the timing: autotuning, compilation, lazy init
    stats = time_call(fn, rec.device, rep_ms=rep_ms, grad_to_none=grads)
    rec.add(row, "ms", stats, note=note)
    rec.add(row, "TFLOP/s", stats.inverse(shape.flops(mode) / 1e9), note=note)
    del fn
    mem, what = peak_memory_gb(_timed_callable(prov, sets[:1], mode)[0], rec.device)
    rec.add(row, "GB", mem, note=f"{what}; {note}".strip("; "))


def _record_compile(rec: Recorder, row: dict[str, Any], prov: Provider, raw: tuple, mode: str) -> None:
    """Time the first call (compilation included) of a compiled provider; a row of metric ``compile_s``."""
    inputs = tuple(t.detach().requires_grad_(mode != "fwd") for t in prov.prepare(*raw))
    t0 = time.perf_counter()
    out = prov(*inputs)
    if mode == "fwd+bwd":
        out.backward(torch.randn_like(out))
    if rec.device.startswith("cuda"):
        torch.cuda.synchronize()
    rec.add(row, "compile_s", time.perf_counter() - t0, note="first call, compile included")


def _timed_callable(
    prov: Provider, sets: list[tuple[torch.Tensor, ...]], mode: str
) -> tuple[Callable[[], Any], list[torch.Tensor]]:
    """The zero-argument callable timed for ``mode`` (rotating over ``sets``) and the leaves to reset."""
    leaves = [t for s in sets for t in s if t.requires_grad]
    if mode == "fwd":
        return Rotating(prov, sets), leaves
    if mode == "fwd+bwd":
        douts = {}

        def fwd_bwd(*inputs):
            out = prov(*inputs)
            key = id(inputs[0])
            if key not in douts:
                douts[key] = torch.randn_like(out)
            out.backward(douts[key])

        return Rotating(fwd_bwd, sets), leaves
    # bwd: forward once per set outside the timing, then time backward through the retained graph. A
    # materialising provider may hold only one retained graph: rotate over fewer rather than report OOM.
    graphs = []
    for s in sets:
        try:
            out = prov(*s)
        except Exception as e:  # noqa: BLE001 - only out-of-memory after the first graph is tolerated
            if not graphs or not is_oom(e):
                raise
            break
        graphs.append((out, torch.randn_like(out)))
    return Rotating(lambda out, dout: out.backward(dout, retain_graph=True), graphs), leaves


def run(rec: Recorder, suite: str, *, tiny: bool = False, providers: tuple[str, ...] | None = None) -> None:
    """Run the attention benchmark of ``suite`` on ``rec.device``."""
    if providers is None:
        providers = QUICK_PROVIDERS if suite == "quick" else PROVIDERS
    modes = ("fwd", "fwd+bwd") if suite == "quick" else MODES
    plan = Plan(providers, modes, Plan.repetition_ms(rec.device, tiny))
    for i, shape in enumerate(shapes(suite, rec.device, tiny)):
        bench_shape(rec, shape, plan, seed=i)
