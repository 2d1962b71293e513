"""Smoothing control: layer selection, exact restore, subset-only effect (proved with hooks), bad input."""

from __future__ import annotations

import copy

import pytest
import torch
import transformers
from helpers import assert_fp32_close, tiny_config

import asu.attention  # noqa: F401  (registers the "asu" attention implementation)
from asu.smoothing import (
    TEMPERATURE_ATTR,
    attention_modules,
    calls_attention_interface,
    clear_smoothing,
    parse_layers,
    scale_attribute,
    set_smoothing,
    smoothing,
)

NUM_LAYERS = 4


# Smoothing logic does not depend on the kernel backend, and tests/test_hf_attention.py runs the Triton kernel
# at temperature; the reference keeps this file fast under TRITON_INTERPRET=1.
pytestmark = pytest.mark.usefixtures("reference_backend")


def _model(impl: str = "eager", num_layers: int = NUM_LAYERS) -> torch.nn.Module:
    torch.manual_seed(99)
    cfg = tiny_config("llama", num_layers)
    model = transformers.AutoModelForCausalLM.from_config(cfg, attn_implementation=impl).eval()
    with torch.no_grad():  # sharpen attention so temperature has a visible effect
        for _, attn in attention_modules(model):
            attn.q_proj.weight.mul_(20.0)
    return model


def _ids() -> torch.Tensor:
    return torch.randint(3, 128, (2, 10), generator=torch.Generator().manual_seed(0))


def _state(model: torch.nn.Module) -> list[dict]:
    """Every attribute smoothing may touch, per attention module, as stored (absent keys stay absent)."""
    keys = ("scaling", TEMPERATURE_ATTR, "_asu_base_scaling")
    return [{k: m.__dict__[k] for k in keys if k in m.__dict__} for _, m in attention_modules(model)]


# --- parse_layers -------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "spec, expect",
    [
        (None, [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]),
        ("all", [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]),
        (" ALL ", [0, 1, 2, 3, 4, 5, 6, 7, 8, 9]),
        ("6-8", [6, 7, 8]),
        ("0,2,5-7", [0, 2, 5, 6, 7]),
        ("3, 1,1", [1, 3]),
        ([6, 7, 8], [6, 7, 8]),
        ((9, 0), [0, 9]),
        (4, [4]),
    ],
)
def test_parse_layers(spec, expect):
    assert parse_layers(spec, 10) == expect


@pytest.mark.parametrize(
    "spec, error, match",
    [
        ("10", ValueError, r"out of range.*10 layers"),
        ("8-12", ValueError, r"\[10, 11, 12\] are out of range"),
        ([-1], ValueError, "out of range"),
        ("8-6", ValueError, "reversed"),
        ("six", ValueError, "cannot parse"),
        ("1,,2", ValueError, "cannot parse"),
        ("", ValueError, "empty"),
        ([], ValueError, "empty"),
        ([1.0], TypeError, "ints"),
        (["1"], TypeError, "ints"),
        (2.5, TypeError, "layers must be"),
        (True, TypeError, "layers must be"),
    ],
)
def test_parse_layers_rejects(spec, error, match):
    with pytest.raises(error, match=match):
        parse_layers(spec, 10)


def test_parse_layers_rejects_bad_num_layers():
    with pytest.raises(ValueError, match="num_layers"):
        parse_layers("all", 0)


# --- attention_modules --------------------------------------------------------------------------------------


def test_attention_modules_ordered_and_only_attention_modules():
    model = _model()
    found = attention_modules(model)
    assert [i for i, _ in found] == list(range(NUM_LAYERS))
    assert all(m is model.model.layers[i].self_attn for i, m in found)
    # The rotary module carries attention_scaling (not the attention scale): it must not be selected.
    assert hasattr(model.model.rotary_emb, "attention_scaling")
    assert all(m is not model.model.rotary_emb for _, m in found)


def test_attention_modules_through_peft_and_ddp(tmp_path):
    peft = pytest.importorskip("peft")
    model = _model()
    originals = [m for _, m in attention_modules(model)]
    lora = peft.get_peft_model(model, peft.LoraConfig(r=4, target_modules=["q_proj", "v_proj"]))
    assert [m for _, m in attention_modules(lora)] == originals

    import torch.distributed as dist

    if dist.is_initialized():
        pytest.skip("a process group is already initialised in this process")
    store = dist.FileStore(str(tmp_path / "store"), 1)
    dist.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        ddp = torch.nn.parallel.DistributedDataParallel(lora)
        assert [m for _, m in attention_modules(ddp)] == originals
        with smoothing(ddp, 2.0, layers="1"):
            assert originals[1].scaling == pytest.approx(0.25 / 2.0)
            assert originals[0].scaling == 0.25
        assert originals[1].scaling == 0.25
    finally:
        dist.destroy_process_group()


def _tiny(config: transformers.PretrainedConfig) -> torch.nn.Module:
    torch.manual_seed(5)
    return transformers.AutoModelForCausalLM.from_config(config, attn_implementation="eager").eval()


SMALL = dict(
    hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=128
)


@pytest.mark.parametrize(
    "config",
    [
        transformers.Phi3Config(**SMALL, num_key_value_heads=2, pad_token_id=0),  # fused qkv_proj
        transformers.GPTNeoXConfig(**SMALL),  # fused query_key_value, partial rotary
        transformers.GPT2Config(n_embd=64, n_layer=2, n_head=4, vocab_size=128),  # fused c_attn, no RoPE
    ],
    ids=["phi3", "gpt_neox", "gpt2"],
)
def test_attention_modules_found_by_what_they_are(config):
    """Fused projections are found too (no q_proj): smoothing divides their scaling and changes the logits."""
    model = _tiny(config)
    found = attention_modules(model)
    assert [i for i, _ in found] == [0, 1]
    assert all(not hasattr(m, "q_proj") and scale_attribute(m) == "scaling" for _, m in found)
    ids = _ids()
    with torch.no_grad():
        plain = model(ids).logits
        with smoothing(model, 3.0, layers="1"):
            assert found[1][1].scaling == pytest.approx(found[0][1].scaling / 3.0)
            smoothed = model(ids).logits
        assert torch.equal(model(ids).logits, plain)
    assert not torch.allclose(plain, smoothed)


class _ScaleNamedAttention(torch.nn.Module):
    """A family that stores its softmax scale as ``scale`` and calls the attention interface."""

    def __init__(self, layer_idx: int) -> None:
        super().__init__()
        self.layer_idx, self.scale, self.is_causal, self.num_key_value_groups = layer_idx, 0.5, True, 1
        self.config = transformers.PretrainedConfig()
        self.config._attn_implementation = "eager"
        self.rotary = transformers.models.llama.modeling_llama.LlamaRotaryEmbedding(tiny_config("llama"))

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
        from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS
        from transformers.models.llama.modeling_llama import eager_attention_forward

        attend = ALL_ATTENTION_FUNCTIONS.get_interface(
            self.config._attn_implementation, eager_attention_forward
        )
        return attend(self, q, k, v, None, scaling=self.scale)[0]


def test_attention_modules_accepts_a_scale_attribute():
    model = torch.nn.ModuleList([_ScaleNamedAttention(0), _ScaleNamedAttention(1)])
    found = attention_modules(model)
    assert [m for _, m in found] == list(model) and scale_attribute(model[0]) == "scale"
    assert all(scale_attribute(m.rotary) is None for m in model)  # attention_scaling is not the scale
    q = torch.randn(1, 2, 5, 8)
    plain = model[1](q, q, q)
    with smoothing(model, 2.0, layers="1"):
        assert model[1].scale == 0.25 and model[0].scale == 0.5
        smoothed = model[1](q, q, q)
    assert model[1].scale == 0.5 and not torch.allclose(plain, smoothed)


def test_attention_modules_on_falcon_follow_the_installed_transformers():
    """Falcon's attention computes its softmax itself before transformers 5.25 (refused, naming the class) and
    calls the attention interface from 5.25 on (smoothed like any other family)."""
    from transformers.models.falcon.modeling_falcon import FalconAttention

    config = transformers.FalconConfig(
        hidden_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=128
    )
    model = _tiny(config)
    if not calls_attention_interface(FalconAttention):
        with pytest.raises(ValueError, match="FalconAttention computes its attention itself"):
            attention_modules(model)
        return
    modules = attention_modules(model)
    assert [i for i, _ in modules] == [0, 1] and all(isinstance(m, FalconAttention) for _, m in modules)
    ids = torch.randint(3, 128, (1, 9))
    with torch.no_grad():
        plain = model(ids).logits
        with smoothing(model, 2.0):
            smoothed = model(ids).logits
        assert torch.equal(model(ids).logits, plain) and not torch.allclose(plain, smoothed)


def test_attention_modules_rejects_models_without_attention():
    with pytest.raises(ValueError, match="no attention module"):
        attention_modules(torch.nn.Linear(2, 2))
    with pytest.raises(TypeError, match="torch.nn.Module"):
        attention_modules("model")


# --- temperature validation ---------------------------------------------------------------------------------


@pytest.mark.parametrize("tau", [0, -1.0, float("nan"), float("inf"), -float("inf")])
def test_bad_temperature_raises_and_changes_nothing(tau):
    model = _model()
    before = _state(model)
    with pytest.raises(ValueError, match="finite number > 0"):
        with smoothing(model, tau):
            pass
    with pytest.raises(ValueError, match="finite number > 0"):
        set_smoothing(model, tau)
    assert _state(model) == before


@pytest.mark.parametrize("tau", ["2.3", None, True])
def test_temperature_of_wrong_type_raises(tau):
    with pytest.raises(TypeError, match="temperature must be a number"):
        set_smoothing(_model(), tau)


def test_bad_layers_raise_before_anything_changes():
    model = _model()
    before = _state(model)
    with pytest.raises(ValueError, match="out of range"):
        with smoothing(model, 2.0, layers="2-4"):
            pass
    assert _state(model) == before


# --- restore ------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("impl", ["eager", "sdpa", "asu"])
def test_restored_exactly_on_exit_exception_and_nesting(impl):
    model = _model(impl)
    before = _state(model)
    ids = _ids()
    with torch.no_grad():
        plain = model(ids, use_cache=False).logits
        with smoothing(model, 2.3, layers="1-2"):
            outer = _state(model)
            with smoothing(model, 4.0):  # inner replaces (does not compound), then the outer value comes back
                for _, m in attention_modules(model):
                    if impl == "asu":
                        assert m.asu_temperature == 4.0 and m.scaling == 0.25
                    else:
                        assert m.scaling == 0.25 / 4.0
            assert _state(model) == outer
        assert _state(model) == before
        with pytest.raises(RuntimeError, match="boom"):
            with smoothing(model, 2.3, layers=[0, 3]):
                raise RuntimeError("boom")
        assert _state(model) == before
        torch.testing.assert_close(model(ids, use_cache=False).logits, plain, atol=0, rtol=0)


@pytest.mark.parametrize("impl", ["eager", "asu"])
def test_persistent_form(impl):
    model = _model(impl)
    before = _state(model)
    ids = _ids()
    with torch.no_grad():
        with smoothing(model, 2.3, layers="0,3"):
            expect = model(ids, use_cache=False).logits
        set_smoothing(model, 5.0, layers="0,3")
        set_smoothing(model, 2.3, layers="0,3")  # setting again replaces
        torch.testing.assert_close(model(ids, use_cache=False).logits, expect, atol=0, rtol=0)
        with smoothing(model, 1.0):  # a block inside persistent smoothing gives it back on exit
            pass
        torch.testing.assert_close(model(ids, use_cache=False).logits, expect, atol=0, rtol=0)
        clear_smoothing(model)
    assert _state(model) == before


def test_smoothing_is_equivalent_across_implementations():
    ids = _ids()
    outs = []
    for impl in ("eager", "sdpa", "asu"):
        model = _model(impl)
        with smoothing(model, 2.3, layers="1-2"), torch.no_grad():
            outs.append(model(ids, use_cache=False).logits)
    assert_fp32_close(outs[1], outs[0])
    assert_fp32_close(outs[2], outs[0])


# --- only the selected layers change (hooks) ----------------------------------------------------------------


@pytest.mark.parametrize("impl", ["eager", "asu"])
def test_subset_changes_only_selected_layers(impl):
    """Smoothing layers 1-2 of 4: re-running each layer's attention on the inputs it received while smoothed
    gives the same output at tau = 1 for layers 0 and 3 (so they were not smoothed) and a different one for
    layers 1 and 2; a second smoothed run reproduces the captured outputs (so the difference is tau alone)."""
    model = _model(impl)
    ids = _ids()
    captured: dict[int, tuple] = {}
    handles = []
    for idx, module in attention_modules(model):

        def hook(mod, args, kwargs, output, idx=idx):
            captured[idx] = (args, dict(kwargs), output[0].detach().clone())

        handles.append(module.register_forward_hook(hook, with_kwargs=True))
    try:
        with smoothing(model, 2.3, layers="1-2"), torch.no_grad():
            model(ids, use_cache=False)
    finally:
        for h in handles:
            h.remove()
    assert sorted(captured) == [0, 1, 2, 3]
    with torch.no_grad():
        for idx, module in attention_modules(model):
            args, kwargs, smoothed = captured[idx]
            plain = module(*args, **kwargs)[0]
            if idx in (1, 2):
                assert (plain - smoothed).abs().max() > 1e-3, f"layer {idx} was not smoothed"
                with smoothing(model, 2.3, layers=[idx]):
                    torch.testing.assert_close(module(*args, **kwargs)[0], smoothed, atol=1e-6, rtol=1e-6)
            else:
                torch.testing.assert_close(plain, smoothed, atol=0, rtol=0, msg=f"layer {idx} changed")


def test_smoothing_needs_numeric_scaling():
    model = _model("eager", num_layers=1)
    module = attention_modules(model)[0][1]
    del module.scaling
    with pytest.raises(
        ValueError, match="LlamaAttention calls transformers' attention interface but carries no"
    ):
        set_smoothing(model, 2.0)
    assert TEMPERATURE_ATTR not in module.__dict__


def test_context_yields_model_and_copies_are_independent():
    model = _model()
    twin = copy.deepcopy(model)
    with smoothing(model, 2.0) as inside:
        assert inside is model
        assert all(m.scaling == 0.25 for _, m in attention_modules(twin))
