"""The "asu" attention implementation inside tiny random-init Llama, Mistral and Qwen2 models.

At tau = 1 its logits must equal transformers' own "eager" and "sdpa" attention (fp32) for unpadded, right-
and left-padded, and packed batches, and greedy generation with a KV cache must match eager's; at tau = 2.3
the asu model under smoothing must equal the eager model with ``scaling / tau`` and a hand computation of one
layer. Under TRITON_INTERPRET=1 these run the Triton kernel; without it, the PyTorch reference.
"""

from __future__ import annotations

import copy
import math
import os

import pytest
import torch
import transformers
from helpers import assert_fp32_close, tiny_config

import asu.attention as asu_attention
import asu_kernels
from asu.smoothing import attention_modules, smoothing
from asu.trainer import enable_activation_checkpointing
from asu.warning import AsuWarning

N = 12
FAMILIES = ["llama", "mistral", "qwen2"]


def _config(family: str) -> transformers.PretrainedConfig:
    # Mistral: a window of 4 keys with 12-token rows, so most queries lose keys to the window.
    window = {"sliding_window": 4} if family == "mistral" else {}
    return tiny_config(family, max_position_embeddings=64, **window)


# Under TRITON_INTERPRET=1 every kernel call costs about a second, so each test runs the Triton kernel for the
# families named here (together: window and no window, dense and varlen, decoding, temperature, backward) and
# the PyTorch reference for the others. Without the interpreter every case runs the reference.
KERNEL_CASES: dict[str, set[str]] = {
    "test_unpadded_logits_equal_eager_and_sdpa": {"mistral"},
    "test_padded_logits_equal_eager_and_sdpa": {"mistral"},
    "test_packed_rows_equal_separate_documents": {"llama"},
    "test_packed_with_flash_kwargs_from_flattening_collator": set(),
    "test_greedy_generation_with_kv_cache_equals_eager": {"mistral"},
    "test_smoothed_asu_equals_eager_with_divided_scaling": {"qwen2"},
    "test_smoothed_layer_equals_hand_computation": {"llama"},
    "test_training_gradients_equal_eager": {"llama"},
    "test_set_attn_implementation_and_from_pretrained": set(),
    "test_dropout_in_training_raises": set(),
    "test_output_attentions_returns_eager_weights": set(),
    "test_static_cache_generation_equals_eager": set(),
    "test_qwen3_padded_equals_eager": set(),
    "test_packed_training_with_gradient_checkpointing_equals_eager": set(),
    "test_fp32_model_under_bf16_autocast_equals_sdpa": set(),
}


@pytest.fixture(autouse=True)
def _interpreter_budget(request, monkeypatch):
    kernel_families = KERNEL_CASES.get(request.node.originalname)
    if kernel_families is None:
        return
    callspec = getattr(request.node, "callspec", None)
    family = callspec.params.get("family", "llama") if callspec else "llama"
    if family not in kernel_families:
        monkeypatch.setenv("ASU_KERNELS_BACKEND", "reference")


_MODELS: dict[str, torch.nn.Module] = {}


def _models(family: str, *impls: str) -> list[torch.nn.Module]:
    """Copies of one random-init model (seeded per family), one per attention implementation, in eval mode."""
    if family not in _MODELS:
        torch.manual_seed(1234 + FAMILIES.index(family))
        model = transformers.AutoModelForCausalLM.from_config(_config(family), attn_implementation="eager")
        # Random-init weights are small (std 0.02): scale up the attention projections so the attention
        # pattern is far from uniform and a wrong mask or scale shows in the logits.
        with torch.no_grad():
            for _, attn in attention_modules(model):
                attn.q_proj.weight.mul_(20.0)
                attn.k_proj.weight.mul_(20.0)
        _MODELS[family] = model.eval()
    out = []
    for impl in impls:
        model = copy.deepcopy(_MODELS[family])
        model.set_attn_implementation(impl)
        out.append(model.eval())
    return out


def _ids(batch: int = 2, n: int = N, seed: int = 0) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 128, (batch, n), generator=g)


@pytest.fixture
def kernel_calls(monkeypatch):
    """Counts the calls reaching asu_kernels.attention through the asu attention function."""
    calls = []
    real = asu_kernels.attention

    def counting(*args, **kwargs):
        calls.append(kwargs)
        return real(*args, **kwargs)

    monkeypatch.setattr(asu_attention.asu_kernels, "attention", counting)
    return calls


def _logits(model: torch.nn.Module, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False, **kwargs).logits


@pytest.mark.parametrize("family", FAMILIES)
def test_unpadded_logits_equal_eager_and_sdpa(family, kernel_calls):
    eager, sdpa, ours = _models(family, "eager", "sdpa", "asu")
    ids = _ids()
    got = _logits(ours, ids)
    assert_fp32_close(got, _logits(eager, ids))
    assert_fp32_close(got, _logits(sdpa, ids))
    assert len(kernel_calls) == 2  # one per layer: the kernel really ran
    expect_window = 4 if family == "mistral" else None
    assert all(c["window"] == expect_window and c["temperature"] == 1.0 for c in kernel_calls)


@pytest.mark.parametrize("family", FAMILIES)
@pytest.mark.parametrize("side", ["right", "left"])
def test_padded_logits_equal_eager_and_sdpa(family, side, kernel_calls):
    eager, sdpa, ours = _models(family, "eager", "sdpa", "asu")
    ids = _ids(batch=3)
    mask = torch.ones_like(ids)
    # Row 0 unpadded, row 1 padded by 5, row 2 by 2 (on the chosen side).
    for row, pad in ((1, 5), (2, 2)):
        if side == "right":
            mask[row, N - pad :] = 0
        else:
            mask[row, :pad] = 0
    real = mask.bool()
    got = _logits(ours, ids, attention_mask=mask)
    for ref in (eager, sdpa):
        assert_fp32_close(got[real], _logits(ref, ids, attention_mask=mask)[real])
    assert all(c["key_padding_mask"] is not None for c in kernel_calls)
    assert torch.isfinite(got).all()
    if side == "left":
        # Left padding precedes real tokens under the causal mask: without the mask, they would change.
        unmasked = _logits(ours, ids)
        assert not torch.allclose(unmasked[1][real[1]], got[1][real[1]], atol=1e-3)


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_rows_equal_separate_documents(family, kernel_calls):
    """Two rows of packed documents (position_ids restart) equal each document's own forward."""
    eager, ours = _models(family, "eager", "asu")
    ids = _ids(batch=2, seed=3)
    lengths = [[5, 7], [3, 6, 3]]
    position_ids = torch.cat([torch.arange(n) for n in lengths[0]])[None]
    position_ids = torch.cat([position_ids, torch.cat([torch.arange(n) for n in lengths[1]])[None]])
    got = _logits(ours, ids, position_ids=position_ids)
    for row, docs in enumerate(lengths):
        start = 0
        for n in docs:
            alone = _logits(eager, ids[row : row + 1, start : start + n])
            assert_fp32_close(got[row, start : start + n], alone[0])
            start += n
    assert all(c["cu_seqlens"] is not None for c in kernel_calls)
    assert kernel_calls[0]["cu_seqlens"].tolist() == [0, 5, 12, 15, 21, 24]


@pytest.mark.parametrize("family", ["llama", "mistral"])
def test_packed_with_flash_kwargs_from_flattening_collator(family):
    """DataCollatorWithFlattening(return_flash_attn_kwargs=True) passes cu_seq_lens_q/max_length_q."""
    eager, ours = _models(family, "eager", "asu")
    features = [{"input_ids": _ids(1, n, seed=n)[0].tolist()} for n in (4, 7, 5)]
    collator = transformers.DataCollatorWithFlattening(return_flash_attn_kwargs=True, return_tensors="pt")
    batch = collator(features)
    assert batch["cu_seq_lens_q"].tolist() == [0, 4, 11, 16]
    kwargs = {
        k: batch[k]
        for k in ("position_ids", "cu_seq_lens_q", "cu_seq_lens_k", "max_length_q", "max_length_k")
    }
    got = _logits(ours, batch["input_ids"], **kwargs)
    # The kwargs alone (no position restarts visible) must also separate the documents.
    got_kwargs_only = _logits(
        ours, batch["input_ids"], **{k: v for k, v in kwargs.items() if k != "position_ids"}
    )
    start = 0
    for feature in features:
        n = len(feature["input_ids"])
        alone = _logits(eager, torch.tensor([feature["input_ids"]]))[0]
        assert_fp32_close(got[0, start : start + n], alone)
        if start == 0:
            assert_fp32_close(got_kwargs_only[0, :n], alone)
        start += n


@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated")
@pytest.mark.parametrize("family", FAMILIES)
def test_greedy_generation_with_kv_cache_equals_eager(family):
    eager, ours = _models(family, "eager", "asu")
    ids = _ids(batch=2, n=8, seed=5)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding, as for generation
    # 8 + 4 tokens: more than Mistral's window of 4, so its sliding cache drops keys while decoding.
    kwargs = dict(attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0)
    expect = eager.generate(ids, **kwargs)
    got = ours.generate(ids, **kwargs)
    assert got.shape == (2, 12)
    torch.testing.assert_close(got, expect, atol=0, rtol=0)
    # Decode steps really ran with one query against the cache: compare the logits of a cached step too.
    with torch.no_grad():
        out_e = eager(ids, attention_mask=mask, use_cache=True)
        out_o = ours(ids, attention_mask=mask, use_cache=True)
        nxt = out_e.logits[:, -1:].argmax(-1)
        mask2 = torch.cat([mask, torch.ones_like(nxt)], 1)
        step_e = eager(nxt, attention_mask=mask2, past_key_values=out_e.past_key_values).logits
        step_o = ours(nxt, attention_mask=mask2, past_key_values=out_o.past_key_values).logits
    assert_fp32_close(step_o, step_e)


@pytest.mark.parametrize("family", FAMILIES)
def test_smoothed_asu_equals_eager_with_divided_scaling(family, kernel_calls):
    eager, ours = _models(family, "eager", "asu")
    ids = _ids(seed=7)
    mask = torch.ones_like(ids)
    mask[0, :4] = 0
    real = mask.bool()
    with smoothing(ours, 2.3), smoothing(eager, 2.3):
        assert all(m.scaling == pytest.approx(0.25 / 2.3) for _, m in attention_modules(eager))
        got = _logits(ours, ids, attention_mask=mask)
        expect = _logits(eager, ids, attention_mask=mask)
    assert_fp32_close(got[real], expect[real])
    # asu keeps the exact logit scale and passes the temperature to the kernel.
    assert all(c["temperature"] == 2.3 and c["scale"] == 0.25 for c in kernel_calls)
    assert not torch.allclose(got[real], _logits(ours, ids, attention_mask=mask)[real], atol=1e-3)


def _rotate_half(x: torch.Tensor) -> torch.Tensor:
    half = x.shape[-1] // 2
    return torch.cat([-x[..., half:], x[..., :half]], dim=-1)


def test_smoothed_layer_equals_hand_computation():
    """Layer 0 of the asu Llama at tau = 2.3 against attention written out by hand (RoPE included)."""
    (ours,) = _models("llama", "asu")
    cfg = ours.config
    ids = _ids(batch=2, seed=11)
    attn = ours.model.layers[0].self_attn
    seen = {}

    def hook(module, args, kwargs, output):
        seen["x"] = kwargs["hidden_states"] if "hidden_states" in kwargs else args[0]
        seen["out"] = output[0]

    handle = attn.register_forward_hook(hook, with_kwargs=True)
    try:
        with smoothing(ours, 2.3, layers=[0]), torch.no_grad():
            ours(input_ids=ids, use_cache=False)
    finally:
        handle.remove()
    x = seen["x"].double()
    b, n, _ = x.shape
    hq, hkv, d = cfg.num_attention_heads, cfg.num_key_value_heads, cfg.hidden_size // cfg.num_attention_heads
    w = {name: getattr(attn, name).weight.double() for name in ("q_proj", "k_proj", "v_proj", "o_proj")}
    q = (x @ w["q_proj"].T).view(b, n, hq, d).transpose(1, 2)
    k = (x @ w["k_proj"].T).view(b, n, hkv, d).transpose(1, 2)
    v = (x @ w["v_proj"].T).view(b, n, hkv, d).transpose(1, 2)
    theta = cfg.rope_parameters["rope_theta"]
    inv_freq = 1.0 / theta ** (torch.arange(0, d, 2, dtype=torch.float64) / d)
    angles = torch.arange(n, dtype=torch.float64)[:, None] * inv_freq[None]
    cos, sin = torch.cat([angles, angles], -1).cos(), torch.cat([angles, angles], -1).sin()
    q, k = q * cos + _rotate_half(q) * sin, k * cos + _rotate_half(k) * sin
    out = torch.zeros(b, hq, n, d, dtype=torch.float64)
    for h in range(hq):
        kh, vh = k[:, h // (hq // hkv)], v[:, h // (hq // hkv)]
        for i in range(n):
            logits = (q[:, h, i : i + 1] @ kh[:, : i + 1].transpose(-1, -2))[:, 0] / math.sqrt(d) / 2.3
            p = torch.softmax(logits, dim=-1)
            out[:, h, i] = (p[:, :, None] * vh[:, : i + 1]).sum(1)
    expect = out.transpose(1, 2).reshape(b, n, hq * d) @ w["o_proj"].T
    assert_fp32_close(seen["out"].double(), expect)


def test_set_attn_implementation_and_from_pretrained(tmp_path):
    (eager,) = _models("qwen2", "eager")
    eager.save_pretrained(tmp_path)
    loaded = transformers.AutoModelForCausalLM.from_pretrained(tmp_path, attn_implementation="asu").eval()
    assert loaded.config._attn_implementation == "asu"
    ids = _ids(seed=13)
    assert_fp32_close(_logits(loaded, ids), _logits(eager, ids))
    switched = copy.deepcopy(eager)
    switched.set_attn_implementation("asu")
    assert switched.config._attn_implementation == "asu"
    assert all(m.config._attn_implementation == "asu" for _, m in attention_modules(switched))


def test_register_is_idempotent():
    asu_attention.register()
    asu_attention.register()
    assert transformers.AttentionInterface._global_mapping["asu"] is asu_attention.asu_attention_forward
    masks = transformers.masking_utils.AttentionMaskInterface._global_mapping
    assert masks["asu"] is asu_attention.asu_attention_mask


def _assert_training_step_equals_eager(eager: torch.nn.Module, ours: torch.nn.Module, **inputs) -> None:
    """One training-mode forward and backward of each model on ``inputs``: the same loss, and the same
    gradient for every parameter."""
    losses = []
    for model in (eager, ours):
        model.train()
        loss = model(**inputs).loss
        loss.backward()
        losses.append(loss)
        model.eval()
    assert_fp32_close(losses[1], losses[0])
    for (name, pe), po in zip(eager.named_parameters(), ours.parameters(), strict=True):
        assert_fp32_close(po.grad, pe.grad, name, gradient=True)


def test_training_gradients_equal_eager():
    """Backward through the asu attention: same loss and parameter gradients as eager (padded batch)."""
    eager, ours = _models("llama", "eager", "asu")
    ids = _ids(seed=17)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0
    # Only logits of real positions enter the loss (the last padding position predicts the first real token).
    labels = ids.masked_fill(mask == 0, -100)
    labels[1, 3] = -100
    _assert_training_step_equals_eager(eager, ours, input_ids=ids, attention_mask=mask, labels=labels)


def test_dropout_in_training_raises():
    (ours,) = _models("llama", "asu")
    for _, module in attention_modules(ours):
        module.attention_dropout = 0.1
    ours.train()
    with pytest.raises(ValueError, match="attention dropout"):
        ours(input_ids=_ids())
    ours.eval()  # dropout is only applied in training: eval mode runs
    ours(input_ids=_ids(), use_cache=False)


def test_output_attentions_returns_eager_weights(monkeypatch):
    """output_attentions=True runs eager attention at the module's temperature (masks, packing, head dims and
    the warning's wording: tests/test_attention_fallbacks.py)."""
    eager, ours = _models("llama", "eager", "asu")
    monkeypatch.setattr(asu_attention, "_warned", set())  # the fallback warns once per process
    with smoothing(ours, 2.3), smoothing(eager, 2.3), pytest.warns(AsuWarning, match="output_attentions"):
        got = ours(input_ids=_ids(), output_attentions=True, use_cache=False)
        want = eager(input_ids=_ids(), output_attentions=True, use_cache=False)
    assert_fp32_close(got.logits, want.logits)
    for a, b in zip(got.attentions, want.attentions, strict=True):
        assert_fp32_close(a, b)


def test_mask_function_forms():
    mask = torch.tensor([[0, 1, 1, 1], [1, 1, 1, 1]])
    got = asu_attention.asu_attention_mask(2, 4, 4, attention_mask=mask.bool())
    assert got.dtype == torch.bool and got.tolist() == mask.bool().tolist()
    assert (
        asu_attention.asu_attention_mask(2, 4, 4, attention_mask=torch.ones(2, 4, dtype=torch.bool)) is None
    )
    assert asu_attention.asu_attention_mask(2, 4, 4, attention_mask=None) is None
    # A sliding-window cache keeps the last kv_length keys: the mask is sliced from the right.
    assert asu_attention.asu_attention_mask(2, 1, 2, attention_mask=mask.bool()) is None
    custom = torch.ones(2, 1, 4, 4, dtype=torch.bool)  # a custom 4D mask is handed on as it is
    assert asu_attention.asu_attention_mask(2, 4, 4, attention_mask=custom) is custom
    with pytest.raises(ValueError, match="2D"):
        asu_attention.asu_attention_mask(2, 4, 4, attention_mask=torch.ones(2, 4, 4, dtype=torch.bool))


@pytest.mark.parametrize("backend", ["reference", "triton"])
def test_padded_packed_on_each_backend(backend, monkeypatch):
    """The same checks forced through each kernel backend (triton needs the interpreter or a GPU)."""
    if backend == "triton" and not (os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")):
        pytest.skip("the Triton kernel on CPU needs TRITON_INTERPRET=1")
    monkeypatch.setenv("ASU_KERNELS_BACKEND", backend)
    eager, ours = _models("mistral", "eager", "asu")
    ids = _ids(seed=19)
    mask = torch.ones_like(ids)
    mask[0, :5] = 0
    real = mask.bool()
    with smoothing(ours, 2.3), smoothing(eager, 2.3):
        got = _logits(ours, ids, attention_mask=mask)
        expect = _logits(eager, ids, attention_mask=mask)
    assert_fp32_close(got[real], expect[real])
    position_ids = torch.cat([torch.arange(5), torch.arange(7)])[None]
    packed = _logits(ours, ids[:1], position_ids=position_ids)
    assert_fp32_close(packed[0, 5:], _logits(eager, ids[:1, 5:])[0])


def test_static_cache_generation_equals_eager():
    """A static cache hands in keys for every slot (most still empty): only the written ones may be used."""
    eager, ours = _models("llama", "eager", "asu")
    ids = _ids(batch=2, n=6, seed=23)
    mask = torch.ones_like(ids)
    mask[0, :2] = 0
    kwargs = dict(attention_mask=mask, max_new_tokens=3, do_sample=False, pad_token_id=0)
    expect = eager.generate(ids, cache_implementation="static", **kwargs)
    got = ours.generate(ids, cache_implementation="static", **kwargs)
    torch.testing.assert_close(got, expect, atol=0, rtol=0)


def test_qwen3_padded_equals_eager():
    """Any model on the attention interface is served: Qwen3 (q/k norms, explicit head_dim)."""
    torch.manual_seed(29)
    cfg = tiny_config("qwen3", head_dim=16)
    eager = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation="eager").eval()
    ours = copy.deepcopy(eager)
    ours.set_attn_implementation("asu")
    ids = _ids(seed=31)
    mask = torch.ones_like(ids)
    mask[1, :4] = 0
    real = mask.bool()
    with smoothing(ours, 2.3), smoothing(eager, 2.3):
        assert_fp32_close(
            _logits(ours, ids, attention_mask=mask)[real], _logits(eager, ids, attention_mask=mask)[real]
        )


def test_packed_training_with_gradient_checkpointing_equals_eager():
    """Training on a packed row with gradient checkpointing: same loss and gradients as eager (which masks
    documents from position_ids when no cache is used)."""
    eager, ours = _models("llama", "eager", "asu")
    ids = _ids(batch=1, seed=37)
    position_ids = torch.cat([torch.arange(4), torch.arange(8)])[None]
    labels = ids.clone()
    labels[0, 4] = -100  # the first token of document 2 is not predicted from document 1
    for model in (eager, ours):
        enable_activation_checkpointing(model)
    _assert_training_step_equals_eager(
        eager, ours, input_ids=ids, position_ids=position_ids, labels=labels, use_cache=False
    )


class _FakeAttention(torch.nn.Module):
    is_causal = True


def _qkv(b: int = 1, n: int = 6) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    g = torch.Generator().manual_seed(41)
    return tuple(torch.randn(b, h, n, 16, generator=g) for h in (4, 2, 2))


def test_attention_function_rejects_inconsistent_inputs():
    module = _FakeAttention()
    q, k, v = _qkv()
    cu = torch.tensor([0, 2, 6], dtype=torch.int32)
    padding = torch.tensor([[False, True, True, True, True, True]])
    with pytest.raises(ValueError, match="must not also carry padding"):
        asu_attention.asu_attention_forward(module, q, k, v, padding, cu_seq_lens_q=cu, cu_seq_lens_k=cu)
    with pytest.raises(ValueError, match="cu_seq_lens_q == cu_seq_lens_k"):
        asu_attention.asu_attention_forward(
            module, q, k, v, None, cu_seq_lens_q=cu, cu_seq_lens_k=torch.tensor([0, 3, 6], dtype=torch.int32)
        )
    with pytest.raises(ValueError, match="bool key-padding mask"):
        asu_attention.asu_attention_forward(module, q, k, v, torch.zeros(1, 6, 6))
    with pytest.raises(ValueError, match="sinks"):
        asu_attention.asu_attention_forward(module, q, k, v, None, s_aux=torch.zeros(4))


def test_attention_function_soft_caps_after_scale_and_temperature():
    """Gemma-2 passes softcap=attn_logit_softcapping: cap * tanh(q.k * scaling / (tau * cap)), as eager
    Gemma-2 with its scaling divided by tau (tests/test_model_families.py checks whole Gemma-2 models)."""
    module = _FakeAttention()
    module.asu_temperature = 2.0
    q, k, v = _qkv()
    out, _ = asu_attention.asu_attention_forward(module, q, k, v, None, scaling=0.8, softcap=1.5)
    want = asu_kernels.reference.attention(q, k, v, scale=0.8, temperature=2.0, softcap=1.5)[0]
    assert_fp32_close(out, want.transpose(1, 2))
    plain, _ = asu_attention.asu_attention_forward(module, q, k, v, None, scaling=0.8)
    assert (plain - out).abs().max() > 1e-3


def test_attention_function_decode_and_non_causal():
    """One query against six cached keys sees them all; is_causal=False lifts the causal mask."""
    module = _FakeAttention()
    q, k, v = _qkv()
    out, weights = asu_attention.asu_attention_forward(module, q[:, :, -1:], k, v, None, scaling=0.25)
    assert weights is None and out.shape == (1, 1, 4, 16)
    full = asu_kernels.reference.attention(q, k, v, causal=False, scale=0.25)[0]
    assert_fp32_close(out[:, 0], full[:, :, -1])
    out, _ = asu_attention.asu_attention_forward(module, q, k, v, None, scaling=0.25, is_causal=False)
    assert_fp32_close(out, full.transpose(1, 2))


def test_fp32_model_under_bf16_autocast_equals_sdpa():
    # RoPE leaves q/k in fp32 while v comes out of the autocast projection in bf16: the attention must
    # run in the autocast dtype instead of rejecting the mixed inputs.
    sdpa, ours = _models("llama", "sdpa", "asu")
    ids = _ids()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got, want = _logits(ours, ids), _logits(sdpa, ids)
    assert torch.isfinite(got).all()
    torch.testing.assert_close(got.float(), want.float(), atol=0.1, rtol=0.05)
