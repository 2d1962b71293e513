"""Attention-map KL benchmark: ``KL(teacher attention at tau || student attention)`` per query row.

Each provider computes, for q_s, q_t (B, Hq, N, D) and k_s, k_t (B, Hkv, N, D), causal, the (B, Hq, N) row
KLs ``KL_i = sum_j p_T,ij (s_T,ij - s_S,ij) - lse_T,i + lse_S,i`` with ``s_T = q_t k_t^T * scale / tau`` and
``s_S = q_s k_s^T * scale``; the backward gives ``dq_s, dk_s`` (the teacher is frozen). Timed: forward,
backward and forward+backward (upstream gradient random, not all ones), and the peak memory of each. FLOPs:
the forward does two ``QK^T`` products per visible block, ``4 * B * Hq * N^2 * D`` halved when causal.

Providers
    * ``dense``: the eager KL: ``repeat_kv`` copies, both (B, Hq, N, N) logit matrices materialised with the
      causal mask, ``log_softmax`` of each in fp32, ``sum p_T (log p_T - log p_S)``. Memory quadratic in N.
    * ``flex``: the two-call FlexAttention composition, compiled: (1) the teacher's attention at ``scale/tau``
      with values ``V = [K_T | K_S]`` (head dim 2D) and its LSE gives ``o = sum_j p_T,ij [k_T,j | k_S,j]``, so
      ``sum_j p_T s_T = (scale/tau) q_t . o_T`` and ``sum_j p_T s_S = scale q_s . o_S``; (2) the student's
      attention with ``return_lse`` gives ``lse_S``. Both calls are differentiable in FlexAttention (the
      gradient reaches ``k_s`` through the values of call 1 and ``q_s, k_s`` through ``lse_S`` of call 2).
      CUDA only (its CPU compile takes minutes).
    * ``ours``: :func:`asu_kernels.attention_kl`, one streaming pass, memory linear in N.

Every provider's forward is compared with the float64 reference on the first input set; the largest absolute
row-KL error is a row of metric ``max_abs_err``.

Sizes: CUDA, d = 128, causal, GQA 32/8, bf16, tau = 2.3, N = 1k..32k with B*N = 16k (``quick``: 1k and 4k);
CPU, fp32, B=1, Hq=4, Hkv=2, D=32, N = 64 (``tiny``) or 64 and 128.

The embedded-world comparison of the ``asu-attn`` objective against output-level ASU is an unlearning
experiment, not a kernel benchmark: it lives in :mod:`asu.demo.asu_attn_comparison`.
"""

from __future__ import annotations

import functools
import math
import time

import torch
import torch.nn.functional as F

from benchmarks.bench_attention import AttentionShape, repeat_kv, time_modes
from benchmarks.common import (
    Plan,
    Recorder,
    Unavailable,
    ours_backend_note,
)

MODES = ("fwd", "bwd", "fwd+bwd")
#: Run order: ours first, compiled FlexAttention last (its compile is the first a timeout cuts).
PROVIDERS = ("ours", "dense", "flex")
TEMPERATURE = 2.3


class KLShape(AttentionShape):
    """q_s, q_t (B, Hq, N, D); k_s, k_t (B, Hkv, N, D); FLOPs counted as for attention."""


def shapes(suite: str, device: str, tiny: bool = False) -> list[KLShape]:
    """The grid of a suite (see the module docstring)."""
    if suite not in ("quick", "full"):
        raise ValueError(f"suite must be 'quick' or 'full', got {suite!r}")
    if not device.startswith("cuda"):
        ns = (64,) if tiny else (64, 128)
        return [KLShape(1, 4, 2, n, 32, True, TEMPERATURE, torch.float32) for n in ns]
    ns = (1024, 4096) if suite == "quick" else (1024, 2048, 4096, 8192, 16384, 32768)
    total = 16 * 1024
    return [KLShape(max(1, total // n), 32, 8, n, 128, True, TEMPERATURE, torch.bfloat16) for n in ns]


# ---- providers -------------------------------------------------------------------------------------------


class Provider:
    """``__call__(q_s, k_s, q_t, k_t)`` -> row KL (B, Hq, N), differentiable in q_s and k_s."""

    name = "provider"

    def __init__(self, shape: KLShape, device: str):
        self.shape = shape
        self.device = device
        self.scale = 1.0 / math.sqrt(shape.head_dim)
        self.note = ""

    def prepare(self, *tensors: torch.Tensor) -> tuple[torch.Tensor, ...]:
        return tensors

    def __call__(self, q_s, k_s, q_t, k_t) -> torch.Tensor:
        raise NotImplementedError


class Dense(Provider):
    name = "dense"

    def __call__(self, q_s, k_s, q_t, k_t):
        groups = self.shape.heads_q // self.shape.heads_kv
        k_s, k_t = repeat_kv(k_s, groups), repeat_kv(k_t, groups)
        n = q_s.shape[-2]
        work = torch.promote_types(q_s.dtype, torch.float32)  # fp32 softmaxes (float64 for the reference)
        s_s = torch.matmul(q_s, k_s.transpose(2, 3)).to(work) * self.scale
        with torch.no_grad():
            s_t = torch.matmul(q_t, k_t.transpose(2, 3)).to(work) * (self.scale / self.shape.temperature)
        if self.shape.causal:
            hidden = torch.ones(n, n, dtype=torch.bool, device=q_s.device).triu(1)
            s_s = s_s.masked_fill(hidden, float("-inf"))
            s_t = s_t.masked_fill(hidden, float("-inf"))
        log_s, log_t = F.log_softmax(s_s, -1), F.log_softmax(s_t, -1)
        # Masked entries: p_T = 0 and both logs -inf; kl_div with log targets gives 0 * (nan) there, so mask.
        terms = torch.where(log_t > float("-inf"), log_t.exp() * (log_t - log_s), torch.zeros_like(log_s))
        return terms.sum(-1)


class FlexComposition(Provider):
    name = "flex"

    def __init__(self, shape: KLShape, device: str, compile: bool = True):
        super().__init__(shape, device)
        if compile and not device.startswith("cuda"):
            raise Unavailable(
                "compiled FlexAttention is benchmarked on CUDA only (its CPU compile takes minutes)"
            )
        try:
            from torch.nn.attention.flex_attention import create_block_mask, flex_attention
        except ImportError as e:
            raise Unavailable(f"FlexAttention not in torch {torch.__version__}: {e}") from None
        if compile:
            torch._dynamo.reset()  # a fresh state per shape: no recompile limit, first call = compile time
            self._flex = torch.compile(flex_attention, dynamic=False)
        else:
            self._flex = flex_attention
        self.block_mask = None
        if shape.causal:
            self.block_mask = create_block_mask(
                lambda b, h, q_idx, kv_idx: q_idx >= kv_idx, None, None, shape.seqlen, shape.seqlen,
                device=device,
            )  # fmt: skip
        self.gqa = shape.heads_q != shape.heads_kv

    def _with_lse(self, *args, **kwargs):
        """FlexAttention's output and natural-log LSE: ``return_aux=AuxRequest(lse=True)`` where torch has it
        (its ``return_lse`` is deprecated there), ``return_lse=True`` before."""
        try:
            from torch.nn.attention.flex_attention import AuxRequest
        except ImportError:
            return self._flex(*args, return_lse=True, **kwargs)
        out, aux = self._flex(*args, return_aux=AuxRequest(lse=True), **kwargs)
        return out, aux.lse

    def __call__(self, q_s, k_s, q_t, k_t):
        d = q_s.shape[-1]
        scale_t = self.scale / self.shape.temperature
        values = torch.cat([k_t.detach(), k_s], dim=-1)  # (B, Hkv, N, 2D)
        out_t, lse_t = self._with_lse(
            q_t.detach(), k_t.detach(), values, block_mask=self.block_mask, scale=scale_t, enable_gqa=self.gqa
        )
        _, lse_s = self._with_lse(
            q_s, k_s, k_s, block_mask=self.block_mask, scale=self.scale, enable_gqa=self.gqa
        )
        o_t, o_s = out_t[..., :d].float(), out_t[..., d:].float()
        cross_t = scale_t * (q_t.detach().float() * o_t).sum(-1)  # sum_j p_T s_T
        cross_s = self.scale * (q_s.float() * o_s).sum(-1)  # sum_j p_T s_S
        return cross_t - cross_s - lse_t.detach().float() + lse_s.float()


class Ours(Provider):
    name = "ours"

    def __init__(self, shape: KLShape, device: str):
        super().__init__(shape, device)
        from asu_kernels import attention_kl

        self._fn = attention_kl

    def __call__(self, q_s, k_s, q_t, k_t):
        return self._fn(q_s, k_s, q_t, k_t, temperature_t=self.shape.temperature, causal=self.shape.causal)


def make_provider(name: str, shape: KLShape, device: str) -> Provider:
    if name == "dense":
        return Dense(shape, device)
    if name == "flex":
        return FlexComposition(shape, device)
    if name == "ours":
        return Ours(shape, device)
    raise ValueError(f"unknown attention_kl provider {name!r}; known: {', '.join(PROVIDERS)}")


def reference_kl(shape: KLShape, q_s, k_s, q_t, k_t) -> torch.Tensor:
    """The row KLs in float64 (the dense formula), for the accuracy rows."""
    exact = KLShape(**{**shape.__dict__, "dtype": torch.float64})
    with torch.no_grad():
        return Dense(exact, str(q_s.device))(*(t.double() for t in (q_s, k_s, q_t, k_t)))


def _input_sets(shape: KLShape, device: str, count: int, seed: int) -> list[tuple[torch.Tensor, ...]]:
    """``count`` sets of (q_s, k_s, q_t, k_t); the teacher is the student plus a perturbation (as in ASU)."""
    gen = torch.Generator(device=device).manual_seed(seed)
    b, hq, hkv, n, d = shape.batch, shape.heads_q, shape.heads_kv, shape.seqlen, shape.head_dim
    sets = []
    for _ in range(count):
        q_s = torch.randn(b, hq, n, d, generator=gen, device=device)
        k_s = torch.randn(b, hkv, n, d, generator=gen, device=device)
        q_t = q_s + 0.3 * torch.randn(b, hq, n, d, generator=gen, device=device)
        k_t = k_s + 0.3 * torch.randn(b, hkv, n, d, generator=gen, device=device)
        sets.append(tuple(t.to(shape.dtype) for t in (q_s, k_s, q_t, k_t)))
    return sets


def bench_shape(rec: Recorder, shape: KLShape, plan: Plan, *, seed: int) -> None:
    """Measure every provider x mode of one shape: ms, TFLOP/s, GB, plus the forward's max abs error."""
    device = rec.device
    raw_sets = _input_sets(shape, device, 2, seed)
    want = None
    make = lambda name: make_provider(name, shape, device)
    for name, base, prov in rec.providers("attention_kl", shape.columns(), plan.providers, plan.modes, make):
        note = ours_backend_note(raw_sets[0][0]) if name == "ours" else prov.note

        def accuracy(prov=prov, base=base, note=note, name=name) -> None:
            nonlocal want
            if want is None:
                want = reference_kl(shape, *raw_sets[0])
            t0 = time.perf_counter()
            with torch.no_grad():
                got = prov(*raw_sets[0])
            if device.startswith("cuda"):
                torch.cuda.synchronize()
            if name == "flex":
                rec.add({**base, "mode": "fwd"}, "compile_s", time.perf_counter() - t0, note="first call")
            err = (got.double() - want).abs().max().item()
            rec.add({**base, "mode": "fwd"}, "max_abs_err", err, note=f"vs float64 dense; {note}".strip("; "))

        rec.guarded({**base, "mode": "fwd"}, accuracy, metric="max_abs_err")
        inputs = functools.partial(_student_leaves, raw_sets)
        time_modes(rec, base, prov, inputs, plan.modes, shape, rep_ms=plan.rep_ms, note=note)


def _student_leaves(raw_sets: list[tuple[torch.Tensor, ...]], mode: str) -> list[tuple[torch.Tensor, ...]]:
    """The input sets with the student's q, k as fresh leaves that need gradients (not in ``fwd``); the
    teacher's q, k are frozen."""
    grad = mode != "fwd"
    return [
        (q_s.detach().requires_grad_(grad), k_s.detach().requires_grad_(grad), q_t, k_t)
        for q_s, k_s, q_t, k_t in raw_sets
    ]


def run(rec: Recorder, suite: str, *, tiny: bool = False, providers: tuple[str, ...] | None = None) -> None:
    """Run the attention-KL benchmark of ``suite`` on ``rec.device``."""
    plan = Plan(providers or PROVIDERS, MODES, Plan.repetition_ms(rec.device, tiny))
    for i, shape in enumerate(shapes(suite, rec.device, tiny)):
        # Dense at N >= 16k needs >= 2 * B*Hq*N^2*4 bytes (64 GB at 32k): it is tried, and its OOM recorded.
        bench_shape(rec, shape, plan, seed=i)
