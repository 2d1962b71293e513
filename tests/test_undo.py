"""UNDO's shrink-and-perturb (asu.undo) and its hook in unlearn(): the formula, and the teacher built from the
undamaged model."""

from __future__ import annotations

import copy
import math

import pytest
import torch
from helpers import FORGET, RETAIN, tiny_model

from asu.data import encode_rows
from asu.undo import check_shrink_perturb, shrink_and_perturb
from asu.unlearn import UnlearnConfig, unlearn

pytestmark = pytest.mark.usefixtures("one_thread")


def test_shrink_and_perturb_formula():
    model = tiny_model()
    model.model.norm.weight.requires_grad_(False)  # a frozen parameter is left alone
    before = {k: v.clone() for k, v in model.named_parameters()}
    share = shrink_and_perturb(model, alpha=0.5, beta=0.2, seed=3)
    n_frozen = model.model.norm.weight.numel()
    assert share == pytest.approx(1 - n_frozen / sum(p.numel() for p in model.parameters()))
    gen = torch.Generator().manual_seed(3)
    for name, p in model.named_parameters():
        w = before[name]
        if not p.requires_grad:
            assert torch.equal(p, w), name
        elif p.dim() == 2:  # (1 - a) w + a b eps, eps ~ U(-bound, bound), drawn in parameter order
            bound = math.sqrt(6.0 / sum(p.shape))
            eps = (torch.rand(p.shape, generator=gen) * 2 - 1) * bound
            torch.testing.assert_close(p, 0.5 * w + 0.1 * eps, rtol=0, atol=1e-7)
            assert (p - 0.5 * w).abs().max() <= 0.1 * bound + 1e-7
        else:  # norm weights and biases: shrunk only
            torch.testing.assert_close(p, 0.5 * w, rtol=0, atol=0)
    again = tiny_model()
    again.model.norm.weight.requires_grad_(False)
    shrink_and_perturb(again, alpha=0.5, beta=0.2, seed=3)
    assert all(torch.equal(a, b) for a, b in zip(again.parameters(), model.parameters(), strict=True))


def test_the_option_is_checked():
    assert UnlearnConfig(shrink_perturb=[0.25, 0.1]).shrink_perturb == [0.25, 0.1]  # validated on use
    cfg = UnlearnConfig(shrink_perturb=[0.25, 0.1])
    cfg.validate()
    assert cfg.shrink_perturb == (0.25, 0.1)
    for bad, message in [
        (dict(shrink_perturb=(0.0, 0.1)), "0 < alpha"),
        (dict(shrink_perturb=(0.5,)), "(alpha, beta)"),
        (dict(shrink_perturb=(0.5, 0.1), lora_r=4), "full fine-tuning"),
        (dict(shrink_perturb=(0.5, 0.1), teacher="self", method="asu-attn"), "teacher 'copy' or 'cache'"),
    ]:
        with pytest.raises(ValueError, match=message):
            check_shrink_perturb(UnlearnConfig(**bad))


@torch.no_grad()
def _kl_to_uniform(model, tok) -> float:
    """``(1/S) sum_s (1/T_s) sum_t KL(p_model || uniform)`` over the forget rows' answer positions."""
    kls = []
    for ex in encode_rows(tok, FORGET, 64):
        ids = torch.tensor([ex["input_ids"]])
        logp = torch.log_softmax(model(input_ids=ids).logits[0, :-1].double(), -1)
        at = torch.tensor(ex["labels"][1:]) != -100
        kl = (logp.exp() * logp).sum(-1)[at] + math.log(logp.shape[-1])
        kls.append(kl.mean())
    return float(torch.stack(kls).mean())


def test_the_teacher_is_the_undamaged_model(tok, reference_backend):
    # alpha 1, beta 0 zeroes the student: its every distribution is uniform. The forget loss is then
    # KL(teacher || uniform) > 0; a teacher copied after the damage would be uniform too, and the loss 0.
    model = tiny_model(vocab_size=len(tok))
    with torch.no_grad():
        model.lm_head.weight.mul_(20.0)  # a confident teacher, far from uniform
    cfg = UnlearnConfig(
        shrink_perturb=(1.0, 0.0), temperature=1.0, epochs=1, batch_size=5, grad_accum=1, lr=1e-12,
        max_length=64, progress=False, warmup_epochs=0.0, pack=False,
    )  # fmt: skip
    original = copy.deepcopy(model)
    result = unlearn(model, tok, FORGET, RETAIN, cfg)
    assert result.history[0]["forget_loss"] == pytest.approx(_kl_to_uniform(original, tok), rel=1e-4)
    assert result.history[0]["forget_loss"] > 0.5
    assert all(p.abs().max() < 1e-9 for p in result.model.parameters())  # the student was zeroed
    assert any(p.abs().max() > 0.1 for p in original.parameters())
