"""The quantization attack (asu.attacks.quant): bitsandbytes' code books and rounding, checked on hand-worked
tensors, and against bitsandbytes itself where it is installed (it is not a dependency: the last tests skip
without it)."""

from __future__ import annotations

import tempfile

import pytest
import torch
from helpers import tiny_model

from asu.attacks.quant import (
    FP4_CODE,
    FP4_CUDA_THRESHOLDS,
    NF4_CODE,
    NF4_CUDA_THRESHOLDS,
    dequantize_4bit,
    fake_quantize,
    quantizable_modules,
    quantize_4bit,
    quantize_int8_rowwise,
    quantized_copy,
)

PROJECTIONS = ("q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj")


# ---- hand-worked tensors --------------------------------------------------------------------------------


def test_nf4_known_tensor():
    # One short block, absmax 2: x = 1, -0.5, 0.05, 0. NF4: 1 is code 15; -0.5 lies between -0.5251 (code 2)
    # and -0.3949 (3), nearer 2; 0.05 is past the midpoint 0.0398 of 0 (7) and 0.0796 (8); 0 is code 7.
    codes, absmax = quantize_4bit(torch.tensor([2.0, -1.0, 0.1, 0.0]), "nf4")
    assert codes.tolist() == [15, 2, 8, 7] and absmax.tolist() == [2.0]
    want = torch.tensor([2.0, 2 * -0.5250730514526367, 2 * 0.07958029955625534, 0.0])
    assert torch.equal(fake_quantize(torch.tensor([2.0, -1.0, 0.1, 0.0]), "nf4"), want)


def test_fp4_known_tensor():
    # absmax 3: x = 1, -0.5, 0.05, 1/6. FP4 magnitudes /12 by bits: 12 -> 0b011, 6 -> 0b101 (sign bit 8),
    # 0.05 is below the midpoint 0.0859 of 0.0625/12 (0b001) and 2/12, and 2/12 is 0b110.
    w = torch.tensor([3.0, -1.5, 0.15, 0.5])
    codes, absmax = quantize_4bit(w, "fp4")
    assert codes.tolist() == [0b0011, 0b1101, 0b0001, 0b0110] and absmax.tolist() == [3.0]
    assert torch.equal(fake_quantize(w, "fp4"), torch.tensor([3.0, -1.5, 3 * 0.0625 / 12, 0.5]))
    assert FP4_CODE[0b1011].item() == -1.0 and FP4_CODE[0b0001].item() == pytest.approx(0.0625 / 12)


def test_blocks_of_64_and_the_short_last_block():
    w = torch.zeros(2, 35)  # 70 values: one block of 64, one of 6
    w.view(-1)[10] = -4.0
    w.view(-1)[66] = 0.5
    codes, absmax = quantize_4bit(w, "nf4")
    assert absmax.tolist() == [4.0, 0.5] and codes.shape == (70,)
    assert codes[10].item() == 0 and codes[66].item() == 15  # -1 and +1 of their blocks
    assert torch.equal(dequantize_4bit(codes, absmax, "nf4", w.shape), w)


def test_ties_follow_each_kernel():
    # NF4: the CUDA thresholds are the float32 midpoints, and a value on one goes to the lower code in both.
    assert torch.equal(NF4_CUDA_THRESHOLDS, (NF4_CODE[:-1] + NF4_CODE[1:]) / 2)
    mid = ((NF4_CODE[7] + NF4_CODE[8]) / 2).item()
    above = torch.nextafter(torch.tensor(mid), torch.tensor(1.0)).item()
    for rounding in ("torch", "cuda"):
        assert quantize_4bit(torch.tensor([1.0, mid, above]), "nf4", rounding=rounding)[0].tolist() == [
            15,
            7,
            8,
        ]
    # FP4, midpoint of 3/12 (0b111) and 4/12 (0b100): the CUDA literal 0.29166667 lies below it.
    m = ((FP4_CODE[0b111] + FP4_CODE[0b100]) / 2).item()
    assert FP4_CUDA_THRESHOLDS[3].item() < m
    x = torch.tensor([1.0, m, -m])
    assert quantize_4bit(x, "fp4", rounding="torch")[0].tolist()[1:] == [0b0111, 0b1100]  # lower value both
    assert quantize_4bit(x, "fp4", rounding="cuda")[0].tolist()[1:] == [0b0100, 0b1100]  # |x| > t: larger


def test_int8_known_rows():
    # Row-wise absmax 1, 0 and 127: 127·w/s rounded half to even (-63.5 -> -64); an all-zero row stays 0.
    w = torch.tensor([[1.0, -0.5, 0.25, 0.0], [0.0, 0.0, 0.0, 0.0], [127.0, 1.0, -63.5, 0.3]])
    codes, scale = quantize_int8_rowwise(w)
    assert codes.tolist() == [[127, -64, 32, 0], [0, 0, 0, 0], [127, 1, -64, 0]]
    assert scale.tolist() == [1.0, 0.0, 127.0]
    deq = fake_quantize(w, "int8")
    assert torch.equal(deq[2], torch.tensor([127.0, 1.0, -64.0, 0.0])) and torch.equal(deq[1], torch.zeros(4))
    assert deq[0, 1].item() == pytest.approx(-64 / 127, abs=1e-7)


def test_bad_formats_are_refused():
    with pytest.raises(ValueError, match="choose one of nf4, fp4, int8"):
        fake_quantize(torch.ones(3), "int4")
    with pytest.raises(ValueError, match="rounding"):
        quantize_4bit(torch.ones(3), "nf4", rounding="gpu")
    with pytest.raises(ValueError, match="2-D"):
        quantize_int8_rowwise(torch.ones(3))


# ---- which modules, and the copy --------------------------------------------------------------------------


@pytest.mark.parametrize("tied", [False, True])
def test_every_projection_is_quantized_and_the_lm_head_kept(tied):
    model = tiny_model()
    if tied:
        model.lm_head.weight = model.model.embed_tokens.weight
    quantized, kept = quantizable_modules(model)
    assert sorted(quantized) == sorted(f"model.layers.{i}.{kind}.{p}" for i in range(2) for kind, p in (
        [("self_attn", p) for p in PROJECTIONS[:4]] + [("mlp", p) for p in PROJECTIONS[4:]]))  # fmt: skip
    assert kept == ["lm_head"]
    # Skip names as transformers matches them: a module's own name, a prefix up to a dot, or a suffix.
    assert quantizable_modules(model, skip=["down_proj"])[0] == [n for n in quantized if "down_proj" not in n]
    assert quantizable_modules(model, skip=["model.layers.1"])[0] == [n for n in quantized if ".1." not in n]


def test_transformers_keeps_the_same_modules():
    get_keys = pytest.importorskip("transformers.quantizers.base").get_keys_to_not_convert
    model = tiny_model()
    theirs = set(get_keys(model))
    _, kept = quantizable_modules(model)
    assert set(kept) <= theirs and {n for n in theirs if n in dict(model.named_modules())} >= set(kept)


def test_quantized_copy_leaves_the_model_alone():
    model = tiny_model()
    before = {k: v.clone() for k, v in model.state_dict().items()}
    copy, report = quantized_copy(model, "nf4")
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    q = copy.model.layers[0].self_attn.q_proj.weight
    assert torch.equal(q, fake_quantize(model.model.layers[0].self_attn.q_proj.weight, "nf4"))
    assert not torch.equal(q, model.model.layers[0].self_attn.q_proj.weight)
    for name in ("lm_head.weight", "model.embed_tokens.weight", "model.norm.weight"):
        assert torch.equal(copy.state_dict()[name], before[name]), name
    assert len(report.quantized) == 14 and report.kept == ["lm_head"] and 0 < report.relative_error < 0.2


# ---- bitsandbytes itself (skipped where it is not installed) ---------------------------------------------


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("shape", [(5, 70), (64, 128), (3, 7), (256, 256)])
def test_equal_to_bitsandbytes(shape, dtype):
    F = pytest.importorskip("bitsandbytes.functional")
    w = (torch.randn(*shape, generator=torch.Generator().manual_seed(shape[0])) * 0.05).to(dtype)
    for fmt in ("nf4", "fp4"):
        packed, state = F.quantize_4bit(w, blocksize=64, quant_type=fmt)
        theirs = torch.stack([packed.view(-1) >> 4, packed.view(-1) & 15], 1).reshape(-1)[: w.numel()]
        codes, absmax = quantize_4bit(w, fmt)
        assert torch.equal(theirs, codes) and torch.equal(state.absmax, absmax), fmt
        assert torch.equal(F.dequantize_4bit(packed, state), fake_quantize(w, fmt)), fmt
    cb, scb, _ = F.int8_vectorwise_quant(w.to(torch.float16))
    assert torch.equal((cb, scb)[0], quantize_int8_rowwise(w)[0]) and torch.equal(
        scb, quantize_int8_rowwise(w)[1]
    )
    assert torch.equal(F.int8_vectorwise_dequant(cb, scb).to(dtype), fake_quantize(w, "int8"))


@pytest.mark.parametrize("fmt", ["nf4", "fp4", "int8"])
def test_equal_to_transformers_bitsandbytes_loading(fmt):
    bnb = pytest.importorskip("bitsandbytes")
    import transformers

    model = tiny_model()
    config = dict(load_in_8bit=True) if fmt == "int8" else dict(
        load_in_4bit=True, bnb_4bit_quant_type=fmt, bnb_4bit_compute_dtype=torch.float32)  # fmt: skip
    with tempfile.TemporaryDirectory() as d:
        model.save_pretrained(d)
        loaded = transformers.AutoModelForCausalLM.from_pretrained(
            d,
            quantization_config=transformers.BitsAndBytesConfig(**config),
            device_map="cpu",
            dtype=torch.float32,
        )
    ours, report = quantized_copy(model, fmt)
    modules = dict(ours.named_modules())
    seen = []
    for name, module in loaded.named_modules():
        if isinstance(module, bnb.nn.Linear4bit):
            w = bnb.functional.dequantize_4bit(module.weight.data, module.weight.quant_state)
        elif isinstance(module, bnb.nn.Linear8bitLt):
            w = bnb.functional.int8_vectorwise_dequant(module.weight.data, module.weight.SCB)
        else:
            continue
        seen.append(name)
        assert torch.equal(w.float(), modules[name].weight.float()), name
    assert sorted(seen) == sorted(report.quantized)
