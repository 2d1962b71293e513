"""The experimental ``asu-attn`` objective against an independent computation (tiny random Llama, CPU, fp32).

The reference side never touches asu's attention or q/k capture: each example runs alone (no padding, no
packing) through an eager-attention copy with ``output_attentions=True``; the teacher's smoothed map is
``softmax(log P / tau)`` of the original model's materialised map ``P`` (the row's log-sum-exp cancels, so
this is ``softmax(s / tau)`` of its logits; masked entries stay 0); the row KL comes from ``F.kl_div``; the
reduction (mean over heads, per-sequence mean over answer-predicting rows, mean over sequences, sum over
layers) is a loop.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import COLLATORS, FORGET, RETAIN, assert_fp32_close, encoded, perturbed, tiny_model

from asu.data import packed_documents
from asu.losses import UnlearnObjective
from asu.teachers import build_teacher
from asu.unlearn import UnlearnConfig, unlearn


def eager_maps(model: torch.nn.Module, ids: list[int]) -> tuple[torch.Tensor, ...]:
    """Each layer's attention probabilities (H, N, N) of one example run alone with eager attention.

    Switches ``model`` to eager attention in place (the callers pass copies of their own).
    """
    model.set_attn_implementation("eager")
    return tuple(a[0] for a in model(input_ids=torch.tensor([ids]), output_attentions=True).attentions)


def row_kl(p_t: torch.Tensor, p_s: torch.Tensor) -> torch.Tensor:
    """KL(p_t || p_s) per row over the last axis; keys invisible to both (p = 0) contribute nothing."""
    # kl_div would form 0 * log 0 = NaN; the clamp keeps log's gradient at p = 0 finite (it is masked anyway).
    log_s = torch.where(p_s > 0, p_s.clamp_min(1e-30).log(), torch.zeros_like(p_s))
    return F.kl_div(log_s, p_t, reduction="none").sum(-1)


def plain_attention_loss(student, original, examples, tau: float, layers=None) -> torch.Tensor:
    """``sum_l (1/S) sum_s (1/T_s) sum_{t in answer rows} mean_h KL(softmax(s_T,t / tau) || softmax(s_S,t))``.

    ``original=None`` is self-smoothing (the teacher map is the student's own, detached).
    """
    per_seq = []
    for ex in examples:
        labels = torch.tensor(ex["labels"])
        pos = torch.nonzero(labels[1:] != -100).flatten()  # row t predicts labels[t + 1]
        maps_s = eager_maps(student, ex["input_ids"])
        with torch.no_grad():
            maps_o = maps_s if original is None else eager_maps(original, ex["input_ids"])
        total = 0.0
        for layer, (p_s, p_o) in enumerate(zip(maps_s, maps_o, strict=True)):
            if layers is not None and layer not in layers:
                continue
            p_o = p_o.detach()
            p_t = torch.softmax(torch.where(p_o > 0, p_o.log(), float("-inf")) / tau, -1)
            total = total + row_kl(p_t[:, pos], p_s[:, pos]).mean(0).mean()
        per_seq.append(total)
    return torch.stack(per_seq).mean()


def objective_for(student, original, source: str, tau: float, layers=None, lam: float = 1.0):
    teacher = build_teacher(source, original, tau, layers)
    return UnlearnObjective(student, method="asu-attn", lam=lam, teacher=teacher)


# auto: the Triton kernel (the interpreter under TRITON_INTERPRET=1) on CPU; reference: the PyTorch path.
CASES = [(s, layout, "reference") for s in ("copy", "self") for layout in ("padded", "packed")]
CASES += [("copy", "padded", "auto"), ("copy", "packed", "auto")]


@pytest.mark.parametrize("source, layout, backend", CASES)
def test_loss_and_grad_match_plain(tok, layout, source, backend, monkeypatch):
    if backend == "reference":
        monkeypatch.setenv("ASU_KERNELS_BACKEND", "reference")
    original = tiny_model("llama", vocab_size=len(tok))
    student = perturbed(original)
    forget = encoded(tok, FORGET)
    tau = 2.3
    objective = objective_for(student, original, source, tau)
    batch = COLLATORS[layout].collate(forget)
    if layout == "packed":
        assert batch["input_ids"].shape[0] < len(FORGET)  # documents really share rows
    got = objective.forget_term(batch, None)
    (grad_got,) = torch.autograd.grad(got, student.model.layers[0].self_attn.q_proj.weight)

    reference_student = copy.deepcopy(student)
    reference_original = None if source == "self" else copy.deepcopy(original)
    want = plain_attention_loss(reference_student, reference_original, forget, tau)
    (grad_want,) = torch.autograd.grad(want, reference_student.model.layers[0].self_attn.q_proj.weight)
    assert want.item() > 1e-3  # the comparison is not between two zeros
    assert_fp32_close(got, want)
    assert_fp32_close(grad_got, grad_want, gradient=True)


def test_selected_layers_and_lam(tok, reference_backend):
    original = tiny_model("llama", vocab_size=len(tok))
    student = perturbed(original)
    forget = encoded(tok, FORGET)
    objective = objective_for(student, original, "copy", 3.0, layers=[1], lam=0.5)
    batch = COLLATORS["padded"].collate(forget)
    out = objective(forget=batch, retain=COLLATORS["padded"].collate(encoded(tok, RETAIN)))
    want = plain_attention_loss(copy.deepcopy(student), copy.deepcopy(original), forget, 3.0, layers=[1])
    assert_fp32_close(out["forget_loss"], want)
    torch.testing.assert_close(out["loss"], 0.5 * out["forget_loss"] + out["retain_loss"])


@pytest.mark.parametrize("source", ["copy", "self"])
def test_zero_at_tau_one_with_teacher_equal_student(tok, source, monkeypatch):
    if source == "self":
        monkeypatch.setenv("ASU_KERNELS_BACKEND", "reference")  # the kernel runs in the copy case
    original = tiny_model("llama", vocab_size=len(tok))
    student = copy.deepcopy(original)
    objective = objective_for(student, original, source, 1.0)
    for layout in ("padded", "packed"):
        loss = objective.forget_term(COLLATORS[layout].collate(encoded(tok, FORGET)), None)
        assert abs(loss.item()) < 1e-6, (layout, loss.item())


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_base_teacher_equals_copy_teacher(tok, layout, reference_backend):
    """A LoRA student's adapters-off base gives the same teacher q, k as a frozen copy of the original."""
    from peft import LoraConfig, get_peft_model

    original = tiny_model("llama", vocab_size=len(tok))
    lora = LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"])
    student = get_peft_model(copy.deepcopy(original), lora)
    g = torch.Generator().manual_seed(0)
    with torch.no_grad():
        for name, p in student.named_parameters():
            if "lora_B" in name:  # zero at init: make the student differ from its base
                p.copy_(0.1 * torch.randn(p.shape, generator=g))
    batch = COLLATORS[layout].collate(encoded(tok, FORGET))
    via_base = UnlearnObjective(student, method="asu-attn", teacher=build_teacher("base", student, 2.3))
    via_copy = UnlearnObjective(student, method="asu-attn", teacher=build_teacher("copy", original, 2.3))
    got, want = via_base.forget_term(batch, None), via_copy.forget_term(batch, None)
    assert want.item() > 1e-3
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def test_loss_decreases(tok, reference_backend):
    original = tiny_model("llama", vocab_size=len(tok))
    student = copy.deepcopy(original).train()
    objective = objective_for(student, original, "copy", 2.3)
    batch = COLLATORS["packed"].collate(encoded(tok, FORGET))
    opt = torch.optim.AdamW([p for p in objective.parameters() if p.requires_grad], lr=1e-3)
    losses = []
    for _ in range(6):
        loss = objective.forget_term(batch, None)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[0] > 1e-3
    assert losses[-1] < 0.5 * losses[0], losses


def test_packed_documents():
    pos = torch.tensor([[0, 1, 2, 0, 1, 0], [0, 1, 2, 3, 0, 1]])
    cu, longest = packed_documents(pos)
    assert cu.tolist() == [0, 3, 5, 6, 10, 12] and longest == 4
    with pytest.raises(ValueError, match="position_ids"):
        packed_documents(pos[0])


def test_bad_combinations(tok):
    original = tiny_model("llama", vocab_size=len(tok))
    forget = encoded(tok, FORGET)
    cache = build_teacher("cache", original, 2.3, sets={"forget": forget}, needs=[("forget", True)])
    with pytest.raises(ValueError, match="cache"):
        UnlearnObjective(copy.deepcopy(original), method="asu-attn", teacher=cache)
    with pytest.raises(ValueError, match="needs a teacher"):
        UnlearnObjective(copy.deepcopy(original), method="asu-attn", teacher=None)
    selfish = build_teacher("self", original, 2.3)
    for method, retain in (("asu", "nll"), ("npo", "nll"), ("asu-attn", "kl")):
        with pytest.raises(ValueError, match="self"):
            UnlearnObjective(copy.deepcopy(original), method=method, retain_loss=retain, teacher=selfish)
    with pytest.raises(ValueError, match="cache"):
        UnlearnConfig(method="asu-attn", teacher="cache").validate()
    with pytest.raises(ValueError, match="self"):
        UnlearnConfig(method="asu", teacher="self").validate()
    with pytest.raises(ValueError, match="self"):
        UnlearnConfig(method="asu-attn", teacher="self", retain_loss="kl").validate()
    with pytest.raises(ValueError, match="gradient_checkpointing"):
        UnlearnConfig(method="asu-attn", gradient_checkpointing=True).validate()


@pytest.mark.parametrize("teacher", ["self", "copy"])
def test_unlearn_runs_asu_attn(tok, teacher, reference_backend):
    model = tiny_model("llama", vocab_size=len(tok))
    before = copy.deepcopy(model)
    cfg = UnlearnConfig(
        method="asu-attn", teacher=teacher, temperature=2.3, lam=1.0, lr=1e-3, epochs=1, batch_size=4,
        grad_accum=1, max_length=64, warmup_epochs=0, progress=False,
    )  # fmt: skip
    result = unlearn(model, tok, FORGET, RETAIN, cfg)
    assert result.history and all(torch.isfinite(torch.tensor(h["loss"])) for h in result.history)
    assert result.history[0]["forget_loss"] > 0
    assert result.stats["teacher"]["source"] == teacher
    changed = any(
        not torch.equal(a, b) for a, b in zip(before.parameters(), result.model.parameters(), strict=True)
    )
    assert changed
