"""The unlearning objectives against plain, independent implementations (tiny random-init models, fp32).

The reference side never touches asu code paths: each example runs alone (no padding, no packing) through
an eager-attention copy whose ``scaling`` is divided by ``tau`` by hand, full logits come from the model's
own LM head, KL from ``F.kl_div``, and the paper's reduction (per-sequence mean, then mean) is a loop.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import (
    COLLATORS,
    FORGET,
    RETAIN,
    assert_fp32_close,
    encoded,
    full_logits,
    hand_smoothed,
    perturbed,
    plain_kl,
    plain_nll,
    tiny_model,
)

from asu.losses import UnlearnObjective, resolve_retain_loss, teacher_outputs_needed
from asu.teachers import build_teacher
from asu.warning import AsuDeprecationWarning

# ---- the independent reference ---------------------------------------------------------------------------


def plain_asu(student, teacher, examples) -> torch.Tensor:
    """(1/S) sum_s (1/T_s) sum_t KL(p_T || p_S) over label-predicting positions, one example at a time."""
    per_seq = []
    for ex in examples:
        labels = torch.tensor(ex["labels"])
        pos = torch.nonzero(labels[1:] != -100).flatten()  # position t predicts labels[t + 1]
        log_s = F.log_softmax(full_logits(student, ex["input_ids"])[pos], -1)
        with torch.no_grad():
            log_t = F.log_softmax(full_logits(teacher, ex["input_ids"])[pos], -1)
        per_seq.append(F.kl_div(log_s, log_t, reduction="none", log_target=True).sum(-1).mean())
    return torch.stack(per_seq).mean()


# ---- tests -----------------------------------------------------------------------------------------------


CASES = [(a, l, s) for a in ["llama"] for l in ["padded", "packed"] for s in ["copy", "cache"]]
# Mistral (sliding window) and Qwen2 (q/k/v biases): each layout and each source once, on the reference path.
CASES += [("mistral", "packed", "copy"), ("mistral", "padded", "cache")]
CASES += [("qwen2", "padded", "copy"), ("qwen2", "packed", "cache")]


@pytest.mark.parametrize("arch, layout, source", CASES)
def test_asu_loss_matches_plain(tok, arch, layout, source, monkeypatch):
    if arch != "llama":
        monkeypatch.setenv("ASU_KERNELS_BACKEND", "reference")  # the interpreter run is the llama case
    original = tiny_model(arch, vocab_size=len(tok))
    student = perturbed(original)
    forget = encoded(tok, FORGET)
    tau = 2.3
    kwargs = {}
    if source == "cache":
        kwargs = dict(
            sets={"forget": forget}, needs=teacher_outputs_needed("asu", "nll"), dtype=torch.float32
        )
    teacher = build_teacher(source, original, tau, None, **kwargs)
    objective = UnlearnObjective(student, method="asu", lam=1.0, teacher=teacher)
    batch = COLLATORS[layout].collate(forget)
    if layout == "packed":
        assert batch["input_ids"].shape[0] < len(forget)  # packing really packed
    got = objective.forget_term(batch, None)
    want = plain_asu(student, hand_smoothed(original, tau), forget)
    assert want.item() > 1e-3
    assert_fp32_close(got, want)
    # The gradient reaches the student (through hidden states and LM head).
    got.backward()
    assert student.lm_head.weight.grad is not None and student.lm_head.weight.grad.abs().sum() > 0


def test_asu_loss_with_asu_attention(tok):
    """The real configuration: student and teacher on the "asu" attention (default kernel path)."""
    original = tiny_model("llama", vocab_size=len(tok), attn="asu")
    student = perturbed(original)
    forget = encoded(tok, FORGET[:3])
    teacher = build_teacher("copy", original, 2.3)
    got = UnlearnObjective(student, teacher=teacher).forget_term(COLLATORS["packed"].collate(forget), None)
    eager_student = copy.deepcopy(student)
    eager_student.set_attn_implementation("eager")
    want = plain_asu(eager_student, hand_smoothed(original, 2.3), forget)
    assert_fp32_close(got, want)


def test_asu_loss_selected_layers(tok, reference_backend):
    original = tiny_model("llama", vocab_size=len(tok))
    student = perturbed(original)
    forget = encoded(tok, FORGET)
    teacher = build_teacher("copy", original, 3.0, [1])
    objective = UnlearnObjective(student, method="asu", teacher=teacher)
    got = objective.forget_term(COLLATORS["packed"].collate(forget), None)
    want = plain_asu(student, hand_smoothed(original, 3.0, layers=[1]), forget)
    assert_fp32_close(got, want)


@pytest.mark.parametrize("layout", ["padded", "packed"])
def test_asu_loss_base_teacher_peft(tok, layout, reference_backend):
    peft = pytest.importorskip("peft")
    original = tiny_model("llama", vocab_size=len(tok))
    student = peft.get_peft_model(
        copy.deepcopy(original), peft.LoraConfig(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"])
    )
    with torch.no_grad():  # non-zero adapters, so student and base differ
        for name, p in student.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.2)
    forget = encoded(tok, FORGET)
    teacher = build_teacher("base", student, 2.3)
    objective = UnlearnObjective(student, method="asu", teacher=teacher)
    got = objective.forget_term(COLLATORS[layout].collate(forget), None)
    want = plain_asu(student, hand_smoothed(original, 2.3), forget)
    assert_fp32_close(got, want)
    # The student is back to tau = 1 with adapters on after the teacher call.
    assert all(
        m.scaling == original.model.layers[0].self_attn.scaling
        for m in [student.model.model.layers[0].self_attn]
    )


def test_base_teacher_needs_peft(tok):
    with pytest.raises(ValueError, match="PEFT"):
        build_teacher("base", tiny_model(vocab_size=len(tok)), 2.3)


def test_teacher_equals_student_at_tau_one_gives_zero(tok):
    original = tiny_model("llama", vocab_size=len(tok))
    forget = encoded(tok, FORGET)
    for source in ("copy", "cache"):
        kwargs = (
            dict(sets={"forget": forget}, needs=[("forget", True)], dtype=torch.float32)
            if source == "cache"
            else {}
        )
        teacher = build_teacher(source, original, 1.0, None, **kwargs)
        objective = UnlearnObjective(original, method="asu", teacher=teacher)
        loss = objective.forget_term(COLLATORS["packed"].collate(forget), None)
        assert abs(loss.item()) < 1e-6


def test_asu_loss_decreases(tok, reference_backend):
    original = tiny_model("llama", vocab_size=len(tok))
    student = copy.deepcopy(original).train()
    forget = encoded(tok, FORGET)
    retain = encoded(tok, RETAIN)
    teacher = build_teacher("copy", original, 2.3)
    objective = UnlearnObjective(student, method="asu", lam=1.0, teacher=teacher)
    fb, rb = COLLATORS["packed"].collate(forget), COLLATORS["packed"].collate(retain)
    opt = torch.optim.AdamW([p for p in objective.parameters() if p.requires_grad], lr=2e-4)
    losses = []
    for _ in range(8):
        out = objective(forget=fb, retain=rb)
        opt.zero_grad()
        (out["loss"] - out["retain_loss"]).backward()  # the ASU term alone, on a fixed batch
        opt.step()
        losses.append(out["forget_loss"].item())
    assert losses[0] > 1e-4
    assert losses[-1] < 0.5 * losses[0], losses
    assert all(b <= a * 1.01 for a, b in zip(losses, losses[1:], strict=False)), losses


@pytest.mark.parametrize(
    "method, retain_loss",
    [(m, "nll") for m in ["ga", "gd", "npo", "simnpo", "idk"]] + [("gd", "kl"), ("npo", "kl")],
)
def test_baselines_match_plain(tok, method, retain_loss, reference_backend):
    original = tiny_model("llama", vocab_size=len(tok))
    student = perturbed(original)
    forget, retain = encoded(tok, FORGET), encoded(tok, RETAIN)
    idk = encoded(tok, [{"question": r["question"], "answer": "who where when"} for r in FORGET])
    teacher = build_teacher("copy", original, 2.3) if teacher_outputs_needed(method, retain_loss) else None
    objective = UnlearnObjective(student, method=method, retain_loss=retain_loss, teacher=teacher)
    col = COLLATORS["packed"]
    out = objective(forget=col.collate(forget), retain=col.collate(retain), idk=col.collate(idk))

    if method in ("ga", "gd"):
        forget_want = -plain_nll(student, forget)
    elif method == "idk":
        forget_want = plain_nll(student, idk)
    elif method == "npo":
        nll, _ = plain_nll(student, forget, "seq")
        ref_nll, _ = plain_nll(original, forget, "seq")
        forget_want = -(2 / 0.1) * F.logsigmoid(-0.1 * (ref_nll - nll)).mean()
    else:
        nll, lengths = plain_nll(student, forget, "seq")
        forget_want = -(2 / 4.5) * F.logsigmoid(4.5 * (nll / lengths - 0.0)).mean()
    assert_fp32_close(out["forget_loss"], forget_want)

    if method == "ga":
        assert "retain_loss" not in out
        torch.testing.assert_close(out["loss"], forget_want)
        return
    retain_want = plain_nll(student, retain) if retain_loss == "nll" else plain_kl(student, original, retain)
    assert_fp32_close(out["retain_loss"], retain_want)
    weight = 0.125 if method == "simnpo" else 1.0
    assert_fp32_close(out["loss"], weight * forget_want + retain_want)


def test_cache_teacher_retain_kl_and_disk(tok, tmp_path, reference_backend):
    original = tiny_model("llama", vocab_size=len(tok))
    student = perturbed(original)
    forget, retain = encoded(tok, FORGET), encoded(tok, RETAIN)
    teacher = build_teacher(
        "cache",
        original,
        2.3,
        None,
        sets={"forget": forget, "retain": retain},
        needs=teacher_outputs_needed("asu", "kl"),
        dtype=torch.float32,
        directory=str(tmp_path),
    )
    names = sorted(p.name for p in tmp_path.iterdir())  # <store>-<fingerprint>.safetensors
    assert [n.split("-")[0] for n in names] == ["forget_smoothed", "retain_reference"]
    assert teacher.stats["teacher_forward_passes"] == 2
    assert teacher.stats["teacher_bytes_freed"] > teacher.stats["cache_bytes"]
    objective = UnlearnObjective(student, method="asu", retain_loss="kl", lam=0.1, teacher=teacher)
    col = COLLATORS["padded"]
    out = objective(forget=col.collate(forget[::-1]), retain=col.collate(retain))
    asu_want = plain_asu(student, hand_smoothed(original, 2.3), forget[::-1])
    kl_want = plain_kl(student, original, retain)
    assert_fp32_close(out["loss"], 0.1 * asu_want + kl_want)


@pytest.mark.parametrize("layout", ["padded", "packed"])
@pytest.mark.parametrize("reduction", ["sequence", "token"])
def test_retain_kl_reduction(tok, layout, reduction, reference_backend):
    """The kl retain term against a per-example loop: the per-sequence mean then the mean over sequences
    (the ASU term's reduction, the default), or the token mean; retain rows of different lengths tell them
    apart."""
    original = tiny_model("llama", vocab_size=len(tok))
    student = perturbed(original)
    retain = encoded(tok, RETAIN)
    assert len({sum(x != -100 for x in ex["labels"]) for ex in retain}) > 1
    teacher = build_teacher("copy", original, 2.3)
    objective = UnlearnObjective(
        student, method="gd", retain_loss="kl", teacher=teacher, retain_reduction=reduction
    )
    got = objective.retain_term(COLLATORS[layout].collate(retain))
    want = plain_kl(student, original, retain, reduce=reduction)
    other = plain_kl(student, original, retain, reduce="token" if reduction == "sequence" else "sequence")
    assert_fp32_close(got, want)
    assert abs(want.item() - other.item()) > 1e-3 * want.item()  # the two reductions really differ here
    got.backward()
    assert student.lm_head.weight.grad.abs().sum() > 0
    with pytest.raises(ValueError, match="retain reduction"):
        UnlearnObjective(student, method="gd", retain_loss="kl", teacher=teacher, retain_reduction="batch")


def test_cache_bf16_close(tok, reference_backend):
    original = tiny_model("llama", vocab_size=len(tok))
    student = perturbed(original)
    forget = encoded(tok, FORGET)
    teacher = build_teacher("cache", original, 2.3, None, sets={"forget": forget}, needs=[("forget", True)])
    got = UnlearnObjective(student, teacher=teacher).forget_term(COLLATORS["packed"].collate(forget), None)
    want = plain_asu(student, hand_smoothed(original, 2.3), forget)
    torch.testing.assert_close(got, want, atol=5e-3, rtol=2e-2)


def test_deprecated_retain_loss_name_warns_and_maps_to_its_loss():
    with pytest.warns(AsuDeprecationWarning, match="'gd' is deprecated; use 'nll'"):
        assert resolve_retain_loss("gd") == "nll"
    assert issubclass(AsuDeprecationWarning, FutureWarning)  # shown to command-line users too


def test_objective_bad_arguments(tok):
    model = tiny_model(vocab_size=len(tok))
    with pytest.raises(ValueError, match="unknown method"):
        UnlearnObjective(model, method="forgetall")
    with pytest.raises(ValueError, match="retain loss"):
        UnlearnObjective(model, method="gd", retain_loss="mse")
    with pytest.raises(ValueError, match="lam"):
        UnlearnObjective(model, method="gd", lam=-1.0)
    with pytest.raises(ValueError, match="needs a teacher"):
        UnlearnObjective(model, method="asu")
    with pytest.raises(ValueError, match="unknown teacher"):
        build_teacher("twin", model, 2.3)
    with pytest.raises(ValueError, match="temperature"):
        build_teacher("copy", model, 0.0)
