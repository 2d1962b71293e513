"""The relearning attack (asu.attacks.relearn): a model that memorised facts and lost them relearns them; the
protocol's steps, split and loss normalisation."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from helpers import FORGET, tiny_model, tiny_tokenizer

from asu.attacks.context import evaluator
from asu.attacks.relearn import RelearnProtocol, _step_loss, _steps, relearn_curve, split_indices
from asu.data import encode_rows, pad_right

pytestmark = pytest.mark.usefixtures("one_thread")  # they train tiny models


def _nll(model, batch) -> torch.Tensor:
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(logits[:, :-1].reshape(-1, logits.shape[-1]), batch["labels"][:, 1:].reshape(-1))


def _train(model, tokenizer, rows, steps: int, lr: float, sign: float = 1.0) -> None:
    """Full-batch AdamW on the answer NLL (``sign=-1``: gradient ascent, a crude unlearning)."""
    batch = pad_right(encode_rows(tokenizer, rows, 64), 0)
    opt = torch.optim.AdamW(model.parameters(), lr=lr, weight_decay=0.0)
    model.train()
    for _ in range(steps):
        (sign * _nll(model, batch)).backward()
        opt.step()
        opt.zero_grad()
    model.eval()


@pytest.fixture(scope="module")
def unlearned():
    """A tiny model that memorised the forget rows, then lost them to gradient ascent."""
    tok = tiny_tokenizer()
    model = tiny_model(vocab_size=len(tok))
    _train(model, tok, FORGET, steps=60, lr=3e-3)
    evaluate = evaluator(tok, batch_size=8, max_new_tokens=12)
    memorised = evaluate(model, FORGET)["forget_Q_A_Prob"]
    _train(model, tok, FORGET, steps=3, lr=3e-3, sign=-1.0)
    return model, tok, evaluate, memorised


def test_a_model_that_memorised_a_fact_relearns_it(unlearned):
    model, tok, evaluate, memorised = unlearned
    state = {k: v.clone() for k, v in model.state_dict().items()}
    protocol = RelearnProtocol(steps=6, lr=3e-3, batch_size=2, grad_accum=2, curve_points=4)
    curve = relearn_curve(model, tok, FORGET, protocol, lambda m: evaluate(m, FORGET))
    forgotten, relearned = curve[0]["forget_Q_A_Prob"], curve[-1]["forget_Q_A_Prob"]
    assert memorised > 0.5 and forgotten < 0.5 * memorised  # it knew, then lost it
    assert relearned > forgotten + 0.3  # and fine-tuning on the forget rows brings it back
    assert [p["step"] for p in curve] == [0, 2, 4, 6] and curve[0]["loss"] is None and curve[-1]["loss"] > 0
    assert curve[0]["forget_Q_A_Prob"] == pytest.approx(evaluate(model, FORGET)["forget_Q_A_Prob"], rel=1e-6)
    assert all(torch.equal(state[k], v) for k, v in model.state_dict().items())  # a copy was trained
    # A model that never saw the rows gains far less from the same fine-tuning: what came back was hidden.
    fresh = tiny_model(vocab_size=len(tok))
    never = relearn_curve(fresh, tok, FORGET, protocol, lambda m: evaluate(m, FORGET))
    assert never[-1]["forget_Q_A_Prob"] - never[0]["forget_Q_A_Prob"] < 0.25 * (relearned - forgotten)


def test_the_loss_is_the_token_mean_over_the_effective_batch():
    tok = tiny_tokenizer()
    model = tiny_model(vocab_size=len(tok))
    examples = encode_rows(tok, FORGET, 64)
    protocol = RelearnProtocol(batch_size=2, grad_accum=3)
    loss = _step_loss(model, examples, list(range(5)), protocol, pad=0)
    grad = model.lm_head.weight.grad.clone()
    model.zero_grad()
    want = _nll(model, pad_right(examples, 0))  # one batch: token mean over every answer token
    want.backward()
    assert loss == pytest.approx(want.item(), rel=1e-5)
    torch.testing.assert_close(grad, model.lm_head.weight.grad, rtol=1e-4, atol=1e-7)


def test_steps_epochs_and_curve_points():
    p = RelearnProtocol()  # open-unlearning's batch: 8 x 4 rows per step
    assert p.total_steps(400) == 13 and p.total_steps(32) == 1
    assert RelearnProtocol(steps=7).total_steps(400) == 7
    assert p.curve_steps(13) == [0, 3, 6, 10, 13] and p.curve_steps(1) == [0, 1]
    small = RelearnProtocol(batch_size=2, grad_accum=1, seed=3)
    batches = list(_steps(5, small, 5))  # 3 steps per epoch (2, 2, 1 rows), then a new permutation
    assert [len(b) for b in batches] == [2, 2, 1, 2, 2]
    assert sorted(i for b in batches[:3] for i in b) == list(range(5))  # an epoch sees every row once
    assert batches == list(_steps(5, small, 5))  # seeded
    for bad in (dict(steps=0), dict(lr=0.0), dict(lr=float("nan")), dict(curve_points=1), dict(grad_accum=0)):
        with pytest.raises(ValueError):
            RelearnProtocol(**bad)


def test_the_split_is_seeded_disjoint_and_complete():
    train, score = split_indices(9, seed=0)
    assert len(train) == 4 and len(score) == 5 and sorted(train + score) == list(range(9))
    assert (train, score) == split_indices(9, seed=0) and (train, score) != split_indices(9, seed=1)
    with pytest.raises(ValueError, match="at least 2"):
        split_indices(1, seed=0)
