"""Coverage matrix: the decoder-only families transformers ships, as tiny random models, through asu.

For every family of ``helpers.FAMILY_CONFIGS`` (two layers, GQA where the family has it, sliding windows,
partial rotary, fused projections, q/k norms, attention and final-logit soft-caps, logit scales, tied and
untied heads as the families have them):

* logits of ``attn_implementation="asu"`` equal eager's at tau = 1 on a padded batch (left and right
  padding), and under ``smoothing(tau)`` equal eager's with every layer's softmax scale divided by tau;
* a packed batch (restarting ``position_ids``) equals each document's own eager forward;
* greedy generation with a KV cache gives eager's tokens and step logits;
* one unlearning step of ``UnlearnObjective`` (ASU forget term, retain KL, through the fused vocabulary
  losses) gives the loss and the student gradients of the same objective computed from the eager models'
  full logits (which carry the family's own soft-cap and logit scale);
* the q, k that :mod:`asu.qk` captures reproduce the eager attention weights (Gemma-2, whose attention is
  soft-capped, is refused there).

Families that cannot work are listed in :data:`REFUSED` with the reason, and the test checks that they are
refused with it. The kernels run on the PyTorch reference path, except for the cases of
:data:`KERNEL_CASES`, which run the Triton kernels under ``TRITON_INTERPRET=1`` (Gemma-2: both soft-caps and
a window, forward and backward; Phi-3: fused qkv; GPT-NeoX: partial rotary with full multi-head attention).
Every family's model is built once and shared.
"""

from __future__ import annotations

import contextlib
import copy
import os

import pytest
import torch
import torch.nn.functional as F
import transformers
from helpers import COLLATORS, FAMILY_CONFIGS, FORGET, RETAIN, assert_fp32_close, encoded, family_config

import asu.attention  # noqa: F401  (registers the "asu" attention implementation)
from asu.data import label_positions, sequence_weights
from asu.losses import UnlearnObjective
from asu.qk import capture_qk, post_rope_qk
from asu.smoothing import attention_modules, calls_attention_interface, scale_attribute, smoothing
from asu.teachers import CopyTeacher, logit_head


def _falcon_refusal() -> str | None:
    """Falcon reaches the attention interface from transformers 5.25 on; before, it computes its attention
    itself. The matrix decides by the installed version's code, as :func:`asu.smoothing.attention_modules`."""
    from transformers.models.falcon.modeling_falcon import FalconAttention

    if calls_attention_interface(FalconAttention):
        return None
    return (
        "FalconAttention computes its attention itself (its own eager/sdpa code, alibi) instead of calling "
        "transformers' attention interface, so neither the asu attention nor smoothing can reach its softmax"
    )


#: Families transformers ships that asu cannot serve with the installed transformers, with the reason (also
#: in README's matrix).
REFUSED = {family: why for family, why in {"falcon": _falcon_refusal()}.items() if why is not None}
FAMILIES = [f for f in FAMILY_CONFIGS if f not in REFUSED]
#: Test -> families whose check runs the Triton kernels when the interpreter is on (every other case runs
#: the PyTorch reference; each interpreted kernel call costs about a second on the CPU).
KERNEL_CASES = {
    "test_logits_equal_eager_at_tau_1_and_smoothed": {"gemma2", "phi3", "gpt_neox"},
    "test_packed_batch_equals_separate_documents": {"gemma2"},
    "test_unlearning_step_equals_full_logit_objective": {"gemma2"},
}
TAU = 2.3
N = 12


@pytest.fixture(autouse=True)
def _kernel_backend(request, monkeypatch):
    callspec = getattr(request.node, "callspec", None)
    family = callspec.params.get("family") if callspec else None
    interpreting = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    if not (interpreting and family in KERNEL_CASES.get(request.node.originalname, ())):
        monkeypatch.setenv("ASU_KERNELS_BACKEND", "reference")


_BASE: dict[str, torch.nn.Module] = {}


def _base(family: str) -> torch.nn.Module:
    """The family's random model (eager), built once. Random init gives attention logits of ~0.1 and a nearly
    uniform attention: the attention weights are multiplied by 3 and the softmax scale by 5 (logits of a few
    units, where Gemma-2's cap of 2 bends them and temperature visibly flattens them), the LM head by 4
    (logits of a few units, where a final soft-cap of 3 bends them)."""
    if family not in _BASE:
        torch.manual_seed(100 + list(FAMILY_CONFIGS).index(family))
        model = transformers.AutoModelForCausalLM.from_config(
            family_config(family), attn_implementation="eager"
        )
        with torch.no_grad():
            for _, attn in attention_modules(model):
                for p in attn.parameters():
                    if p.dim() == 2:
                        p.mul_(3.0)
                name = scale_attribute(attn)
                setattr(attn, name, getattr(attn, name) * 5.0)
            model.get_output_embeddings().weight.mul_(4.0)
        _BASE[family] = model.float().eval()
    return _BASE[family]


def _models(family: str, *impls: str) -> list[torch.nn.Module]:
    out = []
    for impl in impls:
        model = copy.deepcopy(_base(family))
        model.set_attn_implementation(impl)
        out.append(model.eval())
    return out


@contextlib.contextmanager
def _divided_scale(model: torch.nn.Module, tau: float):
    """Eager attention at temperature tau, set by hand: every layer's softmax scale divided by tau."""
    modules = [m for _, m in attention_modules(model)]
    names = [scale_attribute(m) for m in modules]
    originals = [getattr(m, n) for m, n in zip(modules, names, strict=True)]
    for m, n, value in zip(modules, names, originals, strict=True):
        setattr(m, n, value / tau)
    try:
        yield model
    finally:
        for m, n, value in zip(modules, names, originals, strict=True):
            setattr(m, n, value)


def _logits(model: torch.nn.Module, ids: torch.Tensor, **kwargs) -> torch.Tensor:
    with torch.no_grad():
        return model(input_ids=ids, use_cache=False, **kwargs).logits


def _padded_batch() -> tuple[torch.Tensor, torch.Tensor]:
    ids = torch.randint(3, 128, (3, N), generator=torch.Generator().manual_seed(0))
    mask = torch.ones_like(ids)
    mask[1, N - 5 :] = 0  # right padding
    mask[2, :3] = 0  # left padding
    return ids, mask


# --- logits ----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_logits_equal_eager_at_tau_1_and_smoothed(family):
    eager, ours = _models(family, "eager", "asu")
    ids, mask = _padded_batch()
    real = mask.bool()
    plain = _logits(ours, ids, attention_mask=mask)
    assert_fp32_close(plain[real], _logits(eager, ids, attention_mask=mask)[real], "tau = 1")
    with smoothing(ours, TAU), _divided_scale(eager, TAU):
        got = _logits(ours, ids, attention_mask=mask)
        want = _logits(eager, ids, attention_mask=mask)
    assert_fp32_close(got[real], want[real], f"tau = {TAU}")
    assert (got - plain)[real].abs().max() > 1e-3  # smoothing is not a no-op on these models


@pytest.mark.parametrize("family", FAMILIES)
def test_packed_batch_equals_separate_documents(family):
    eager, ours = _models(family, "eager", "asu")
    ids = torch.randint(3, 128, (2, N), generator=torch.Generator().manual_seed(3))
    docs = [[5, 7], [3, 6, 3]]
    position_ids = torch.stack([torch.cat([torch.arange(n) for n in row]) for row in docs])
    got = _logits(ours, ids, position_ids=position_ids)
    for row, lengths in enumerate(docs):
        start = 0
        for n in lengths:
            alone = _logits(eager, ids[row : row + 1, start : start + n])[0]
            assert_fp32_close(got[row, start : start + n], alone, f"row {row} document at {start}")
            start += n


def test_gemma2_soft_caps_are_exercised():
    """The Gemma-2 configuration really bends its logits: without the caps the model's outputs differ."""
    (eager,) = _models("gemma2", "eager")
    uncapped = copy.deepcopy(eager)
    uncapped.config.attn_logit_softcapping = None
    for _, module in attention_modules(uncapped):
        module.attn_logit_softcapping = None
    ids, mask = _padded_batch()
    capped = _logits(eager, ids, attention_mask=mask)
    assert (capped - _logits(uncapped, ids, attention_mask=mask)).abs().max() > 0.05  # the attention cap
    uncapped.config.final_logit_softcapping = None
    assert capped.abs().max() < 1.5 < _logits(uncapped, ids, attention_mask=mask).abs().max()  # the final cap


# --- generation ------------------------------------------------------------------------------------------


@pytest.mark.filterwarnings("ignore:`past_key_values` is deprecated")
@pytest.mark.parametrize("family", FAMILIES)
def test_generation_with_kv_cache_equals_eager(family):
    eager, ours = _models(family, "eager", "asu")
    ids = torch.randint(3, 128, (2, 8), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding, as for generation
    kwargs = dict(
        attention_mask=mask, max_new_tokens=4, do_sample=False, pad_token_id=0, eos_token_id=None,
        return_dict_in_generate=True, output_logits=True,
    )  # fmt: skip
    want = eager.generate(ids, **kwargs)
    got = ours.generate(ids, **kwargs)
    assert got.sequences.shape == (2, 12)
    torch.testing.assert_close(got.sequences, want.sequences, atol=0, rtol=0)
    for step, (a, b) in enumerate(zip(got.logits, want.logits, strict=True)):
        assert_fp32_close(a, b, f"decode step {step}")


# --- one unlearning step ---------------------------------------------------------------------------------


def _batch(tok, rows: list[dict]) -> dict[str, torch.Tensor]:
    return COLLATORS["padded"].collate(encoded(tok, rows))


def _model_inputs(batch: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: batch[k] for k in ("input_ids", "attention_mask", "position_ids")}


def _row_kl(teacher_logits: torch.Tensor, student_logits: torch.Tensor) -> torch.Tensor:
    """Per-row KL(softmax(teacher) || softmax(student)) of (M, V) logits."""
    return F.kl_div(
        student_logits.log_softmax(-1), teacher_logits.log_softmax(-1), log_target=True, reduction="none"
    ).sum(-1)


@pytest.mark.parametrize("family", FAMILIES)
def test_unlearning_step_equals_full_logit_objective(family, tok):
    """ASU + retain KL through the fused losses equals the same objective on the models' own logits."""
    (original,) = _models(family, "asu")
    student = copy.deepcopy(original)
    with torch.no_grad():
        g = torch.Generator().manual_seed(7)
        for p in student.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    # The independent computation: eager copies, the teacher at tau by hand, full (R, L, V) logits.
    student_eager = copy.deepcopy(student)
    student_eager.set_attn_implementation("eager")
    original_eager = copy.deepcopy(original)
    original_eager.set_attn_implementation("eager")

    objective = UnlearnObjective(
        student, method="asu", retain_loss="kl", lam=0.7, teacher=CopyTeacher(original, TAU)
    )
    forget, retain = _batch(tok, FORGET[:2]), _batch(tok, RETAIN[:1])  # padding on the forget side
    out = objective(forget=forget, retain=retain)
    out["loss"].backward()

    mask, _, seq = label_positions(forget)
    w = sequence_weights(seq, int(forget["example_ids"].numel()))
    with torch.no_grad(), _divided_scale(original_eager, TAU):
        teacher = original_eager(**_model_inputs(forget)).logits[mask]
    asu_term = (w * _row_kl(teacher, student_eager(**_model_inputs(forget)).logits[mask])).sum()
    r_mask, _, _ = label_positions(retain)
    with torch.no_grad():
        reference = original_eager(**_model_inputs(retain)).logits[r_mask]
    retain_term = _row_kl(reference, student_eager(**_model_inputs(retain)).logits[r_mask]).mean()
    want = 0.7 * asu_term + retain_term
    want.backward()

    assert_fp32_close(out["forget_loss"], asu_term.detach(), "ASU term")
    assert_fp32_close(out["loss"], want.detach(), "loss")
    params = dict(student_eager.named_parameters())
    for name, p in student.named_parameters():
        if p.grad is None:
            assert params[name].grad is None or not params[name].grad.any(), name
            continue
        assert_fp32_close(p.grad, params[name].grad, f"grad {name}", gradient=True)


@pytest.mark.parametrize(
    ("family", "scale", "softcap"),
    [
        ("gemma2", 1.0, 1.5),
        ("gemma3", 1.0, 1.5),
        ("cohere", 0.5, None),
        ("granite", 0.25, None),
        ("llama", 1.0, None),
    ],
)
def test_logit_head_reads_the_family_settings(family, scale, softcap):
    head = logit_head(_base(family))
    assert head.scale == pytest.approx(scale) and head.softcap == softcap


# --- q, k capture ------------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", FAMILIES)
def test_qk_capture_reproduces_eager_attention(family):
    """softmax(q k^T * scale) of the captured q, k is the eager attention map, on the keys eager shows; the
    recomputation from a layer's input (post_rope_qk, what ``asu inspect`` uses) captures the same q, k."""
    (eager,) = _models(family, "eager")
    ids = torch.randint(3, 128, (1, 9), generator=torch.Generator().manual_seed(9))
    layers = dict(attention_modules(eager))
    if family == "gemma2":
        with pytest.raises(ValueError, match="soft-caps its attention logits"), capture_qk(eager) as qk:
            eager(input_ids=ids)
        return
    recomputed = {}

    def pre_hook(module, args, kwargs):
        recomputed[module.layer_idx] = post_rope_qk(module, args[0] if args else kwargs["hidden_states"],
                                                    kwargs.get("position_embeddings"))  # fmt: skip

    handles = [m.register_forward_pre_hook(pre_hook, with_kwargs=True) for m in layers.values()]
    try:
        with torch.no_grad(), capture_qk(eager) as qk:
            out = eager(input_ids=ids, output_attentions=True)
    finally:
        for h in handles:
            h.remove()
    assert sorted(qk) == sorted(layers) and all("config" in m.__dict__ for m in layers.values())
    for idx, module in layers.items():
        q, k = qk[idx]
        torch.testing.assert_close(recomputed[idx][0], q, rtol=0, atol=1e-6)
        torch.testing.assert_close(recomputed[idx][1], k, rtol=0, atol=1e-6)
        weights = out.attentions[idx]
        k = k.repeat_interleave(q.shape[1] // k.shape[1], dim=1)
        scores = (q @ k.transpose(-1, -2)) * getattr(module, scale_attribute(module))
        scores = scores.masked_fill(weights == 0, float("-inf"))
        torch.testing.assert_close(torch.softmax(scores, -1), weights, rtol=1e-4, atol=1e-6)


# --- refused families ------------------------------------------------------------------------------------


@pytest.mark.parametrize("family", ["falcon"])
def test_family_refused_or_matrixed_as_the_installed_transformers_decides(family):
    """A family transformers routes through the attention interface runs the whole matrix; one that computes
    its attention itself is refused with the reason, naming its attention class."""
    model = transformers.AutoModelForCausalLM.from_config(family_config(family))
    if family not in REFUSED:
        assert family in FAMILIES and attention_modules(model)
        return
    with pytest.raises(ValueError, match=f"{type(model).__name__} has no smoothable attention module"):
        attention_modules(model)
    assert "attention interface" in REFUSED[family]


@pytest.mark.skipif("falcon" in REFUSED, reason="Falcon computes its attention itself in this transformers")
def test_alibi_falcon_is_refused_by_the_asu_attention_and_by_smoothing():
    """Falcon's ALiBi configs add their position bias to the attention mask: the kernels take no bias and a
    temperature would not reach it, so both paths refuse them with the reason (RoPE Falcon is supported)."""
    model = transformers.AutoModelForCausalLM.from_config(family_config("falcon", alibi=True)).eval()
    with pytest.raises(ValueError, match="ALiBi position bias"):
        attention_modules(model)
    model.set_attn_implementation("asu")
    ids = torch.randint(3, 128, (2, N))
    for mask in (None, torch.ones_like(ids)):
        with pytest.raises(ValueError, match="the asu attention cannot run this model: .*ALiBi"):
            model(ids, attention_mask=mask)
