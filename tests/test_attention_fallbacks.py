"""The "asu" attention where the kernel alone cannot serve a call, against transformers' own attention.

``output_attentions=True`` and a custom 4D mask run eager attention at the module's temperature (with a
one-time warning), head dims below the kernel's 16 run the kernel on zero-padded q, k, v, and head dims above
its 256 run eagerly. Each must give what eager (or sdpa, for a bool 4D mask) gives, smoothed or not.
"""

from __future__ import annotations

import copy
import os
import warnings

import pytest
import torch
import transformers
from helpers import assert_fp32_close, tiny_config

import asu.attention as asu_attention
import asu_kernels
from asu.smoothing import attention_modules, smoothing


def _pair(head_dim: int = 16, seed: int = 0, impl: str = "eager") -> tuple[torch.nn.Module, torch.nn.Module]:
    """(``impl`` model, asu model): one tiny random-init Llama with sharp attention, in eval mode."""
    torch.manual_seed(seed)
    config = tiny_config(head_dim=head_dim, max_position_embeddings=64)
    reference = transformers.AutoModelForCausalLM.from_config(config, attn_implementation=impl).eval()
    with torch.no_grad():
        for _, attn in attention_modules(reference):
            attn.q_proj.weight.mul_(20.0)
            attn.k_proj.weight.mul_(20.0)
    ours = copy.deepcopy(reference)
    ours.set_attn_implementation("asu")
    return reference, ours


def _ids(batch: int = 2, n: int = 9, seed: int = 0) -> torch.Tensor:
    return torch.randint(3, 128, (batch, n), generator=torch.Generator().manual_seed(seed))


@pytest.fixture
def kernel_calls(monkeypatch):
    calls = []
    real = asu_kernels.attention

    def counting(*args, **kwargs):
        calls.append(args[0].shape)
        return real(*args, **kwargs)

    monkeypatch.setattr(asu_attention.asu_kernels, "attention", counting)
    return calls


def test_output_attentions_are_eager_weights_at_tau_with_one_warning(monkeypatch, kernel_calls):
    monkeypatch.setattr(asu_attention, "_warned", set())
    eager, ours = _pair()
    ids, mask = _ids(), torch.ones(2, 9, dtype=torch.long)
    mask[0, :3] = 0
    real = mask.bool()
    with smoothing(ours, 2.3), smoothing(eager, 2.3):
        with pytest.warns(UserWarning, match="output_attentions=True") as caught:
            got = ours(input_ids=ids, attention_mask=mask, output_attentions=True, use_cache=False)
        want = eager(input_ids=ids, attention_mask=mask, output_attentions=True, use_cache=False)
    assert sum("output_attentions" in str(w.message) for w in caught) == 1  # once, not once per layer
    assert kernel_calls == []
    assert_fp32_close(got.logits[real], want.logits[real])
    for a, b in zip(got.attentions, want.attentions, strict=True):
        assert_fp32_close(a[1], b[1])
        assert_fp32_close(a[0, :, 3:], b[0, :, 3:])  # rows of real queries (padding rows differ in eager)
        assert torch.all(a[0, :, 3:, :3] == 0)
    # Packed rows (documents from position_ids) are masked per document, as eager masks them.
    position_ids = torch.cat([torch.arange(4), torch.arange(5)])[None]
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        got = ours(input_ids=ids[:1], position_ids=position_ids, output_attentions=True, use_cache=False)
    want = eager(input_ids=ids[:1], position_ids=position_ids, output_attentions=True, use_cache=False)
    assert_fp32_close(got.logits, want.logits)
    assert torch.all(got.attentions[0][0, :, 4:, :4] == 0)


@pytest.mark.parametrize("kind", ["bool", "additive"])
def test_custom_4d_mask_is_honoured_at_tau(kind):
    """A bool 4D mask means what sdpa takes it to mean (True = attend); an additive one what eager adds."""
    reference, ours = _pair(impl="sdpa" if kind == "bool" else "eager", seed=1)
    ids = _ids(seed=1)
    allowed = torch.tril(torch.ones(9, 9, dtype=torch.bool)).repeat(2, 1, 1, 1)
    allowed[0, :, 4:, 1:3] = False  # row 0 hides two keys from its later queries: not a causal mask
    mask = allowed if kind == "bool" else torch.zeros(2, 1, 9, 9).masked_fill(~allowed, -1e30)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        with smoothing(ours, 3.0), smoothing(reference, 3.0):
            got = ours(input_ids=ids, attention_mask=mask, use_cache=False).logits
            want = reference(input_ids=ids, attention_mask=mask, use_cache=False).logits
            causal = ours(input_ids=ids, use_cache=False).logits
    assert_fp32_close(got, want)
    assert (got[0, 4:] - causal[0, 4:]).abs().max() > 1e-3  # the hidden keys changed the answer


@pytest.mark.parametrize("head_dim", [4, 8])
def test_small_head_dims_run_the_kernel_zero_padded(head_dim, kernel_calls, monkeypatch):
    monkeypatch.setenv("ASU_KERNELS_BACKEND", "reference")
    eager, ours = _pair(head_dim=head_dim, seed=2)
    ids, mask = _ids(seed=2), torch.ones(2, 9, dtype=torch.long)
    mask[1, :2] = 0
    real = mask.bool()
    with smoothing(ours, 2.3), smoothing(eager, 2.3):
        got = ours(input_ids=ids, attention_mask=mask, use_cache=False).logits
        want = eager(input_ids=ids, attention_mask=mask, use_cache=False).logits
    assert_fp32_close(got[real], want[real])
    assert kernel_calls and all(shape[-1] == 16 for shape in kernel_calls)
    # Training: the same gradients as eager (the padded columns carry none back). The last padding position
    # would predict the first real token: its output differs (eager averages masked keys), so no label there.
    labels = ids.masked_fill(~real, -100)
    labels[1, 2] = -100
    for model in (eager, ours):
        model.train()
        model(input_ids=ids, attention_mask=mask, labels=labels).loss.backward()
    for (name, p), q in zip(ours.named_parameters(), eager.parameters(), strict=True):
        assert_fp32_close(p.grad, q.grad, name, gradient=True)


def test_small_head_dim_through_the_triton_kernel(kernel_calls):
    if os.environ.get("TRITON_INTERPRET", "0") in ("", "0") and not torch.cuda.is_available():
        pytest.skip("the Triton kernel on CPU needs TRITON_INTERPRET=1")
    eager, ours = _pair(head_dim=8, seed=3)
    ids = _ids(batch=1, n=6, seed=3)
    with torch.no_grad():
        assert_fp32_close(
            ours(input_ids=ids, use_cache=False).logits, eager(input_ids=ids, use_cache=False).logits
        )
    assert len(kernel_calls) == 2  # one per layer


def test_head_dim_above_the_kernel_runs_eagerly(kernel_calls, monkeypatch):
    monkeypatch.setattr(asu_attention, "_warned", set())
    eager, ours = _pair(head_dim=272, seed=4)
    ids = _ids(seed=4)
    with smoothing(ours, 2.0), smoothing(eager, 2.0), pytest.warns(UserWarning, match="head dim 272"):
        got = ours(input_ids=ids, use_cache=False).logits
    with smoothing(eager, 2.0):
        want = eager(input_ids=ids, use_cache=False).logits
    assert_fp32_close(got, want)
    assert kernel_calls == []
