"""Forget-teachers that collapse: a teacher whose answers end at once or vanish is not a teacher that
forgot. The automatic τ on a constructed model whose end of turn dominates once smoothed (it must refuse to
call the target reached, say why and name a layer set where a fluent teacher reaches it), the preview's
shares of empty and immediately-ended answers on a real generation, and the ``eos="renorm"`` teacher (the
end-of-turn mass removed and renormalised inside the answer) against the same KL on full logits."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from helpers import COLLATORS, FORGET, assert_fp32_close, encoded, tiny_model

import asu.tau as tau_module
from asu.data import label_positions, sequence_weights
from asu.losses import UnlearnObjective
from asu.methods.asu import stop_masked_bias
from asu.smoothing import _BASE_SCALING_ATTR, TEMPERATURE_ATTR, attention_modules, smoothing
from asu.tau import COLLAPSED, choose_temperature, preview_forget
from asu.teachers import CopyTeacher
from asu.warning import AsuWarning

pytestmark = pytest.mark.usefixtures("one_thread")

EOS = 2  # tiny_model's eos_token_id


def _temperatures(model: torch.nn.Module) -> list[float]:
    """Each attention layer's current temperature (1 where it is not smoothed): the ``asu`` attention's
    attribute, or the original softmax scale over the divided one (sdpa / eager)."""
    out = []
    for _, m in attention_modules(model):
        base = m.__dict__.get(_BASE_SCALING_ATTR)
        out.append(float(getattr(m, TEMPERATURE_ATTR, 1.0)) if base is None else base / m.scaling)
    return out


def _constructed_generation(tok, collapse_all_at: float = 2.0):
    """A stand-in for greedy generation by a model built to collapse: unsmoothed it answers every question
    with its true answer; with every layer smoothed it keeps most of the answer up to τ < ``collapse_all_at``
    and from there ends its turn at once (no token before the stop token), whatever the question; with only
    layer 0 smoothed at τ >= 2 it answers fluently but wrongly (it forgets without collapsing)."""
    by_prompt: dict[tuple[int, ...], list[int]] = {}

    def generate(model, tokenizer, prompts, batch_size, max_new_tokens, min_new_tokens=None, **kw):
        temps = _temperatures(model)
        out = []
        for p in prompts:
            answer = by_prompt[tuple(p)]
            if all(t >= collapse_all_at for t in temps):
                out.append([])  # the end of turn first
            elif temps[0] >= 2.0 and temps[1] == 1.0:
                out.append(tok("the sailor wrote books about rivers", add_special_tokens=False)["input_ids"])
            elif all(t > 1.0 for t in temps):
                out.append(answer[: max(1, -(-len(answer) * 3 // 4))])  # three quarters of the answer
            else:
                out.append(answer)
        return out

    return generate, by_prompt


def _register(by_prompt, tok, rows):
    from asu.metrics.scoring import encode_question

    for r in rows:
        by_prompt[tuple(encode_question(tok, r["question"], None))] = tok(
            r["answer"], add_special_tokens=False
        )["input_ids"]


def test_a_collapsing_teacher_never_reaches_the_target(tok, monkeypatch):
    generate, by_prompt = _constructed_generation(tok)
    _register(by_prompt, tok, FORGET)
    monkeypatch.setattr(tau_module, "greedy_generate", generate)
    model = tiny_model(vocab_size=len(tok))
    with pytest.warns(AsuWarning, match="NOT reached"):
        choice = choose_temperature(model, tok, FORGET, "auto:0.5")
    # Raw ROUGE-L at τ 2 is 0 (nothing answered): the old rule called that "reached".
    collapsed = [p for p in choice.curve if p["state"] == COLLAPSED]
    assert collapsed and all(p["forget_rouge"] == 0.0 and p["immediate_stop"] == 1.0 for p in collapsed)
    assert all(p["empty"] == 1.0 and p["degenerate"] == 1.0 for p in collapsed)
    assert not choice.reached and choice.reason == COLLAPSED
    # τ is the largest fluent one tried, below the cliff, and its teacher still answers.
    assert 1.0 < choice.temperature < 2.0
    at_tau = next(p for p in choice.curve if p["temperature"] == choice.temperature)
    assert at_tau["degenerate"] == 0.0 and at_tau["forget_rouge"] > choice.target
    # Bisection stayed where the teacher answers: every preview past the first collapse is below it.
    first = min(p["temperature"] for p in collapsed)
    assert all(p["state"] == "above" for p in choice.curve if p["temperature"] < first)
    # A layer set on which a fluent teacher reaches the target is named.
    found = [s for s in choice.suggestions if s["reached"]]
    assert [s["layers"] for s in found] == ["0"] and found[0]["degenerate"] == 0.0
    text = choice.describe()
    assert "stops answering" in text and "reached on layers 0" in text


def test_a_teacher_that_announces_an_answer_and_ends_its_turn_has_collapsed(tok, monkeypatch):
    """SmolLM2's smoothed teacher says "The answer to this question is:" and ends its turn: no fact, so raw
    ROUGE-L is near 0, but it is an empty answer, not forgetting. An answer cut at the token cap that ends
    with a colon may go on, and is not counted."""
    opener = tok("the is", add_special_tokens=False)["input_ids"]
    decode = tok.decode
    monkeypatch.setattr(tok, "decode", lambda ids, **kw: "The answer to this question is:"
                        if list(ids) == opener else decode(ids, **kw))  # fmt: skip

    def generate(model, tokenizer, prompts, batch_size, max_new_tokens, min_new_tokens=None, **kw):
        hot = all(t >= 2.0 for t in _temperatures(model))
        return [list(opener) if hot else list(opener) + [5] * (max_new_tokens - len(opener)) for _ in prompts]

    monkeypatch.setattr(tau_module, "greedy_generate", generate)
    model = tiny_model(vocab_size=len(tok))
    hot = preview_forget(model, tok, FORGET, 2.0, max_new_tokens=8)
    assert hot["reasons"] == ["announces an answer and stops"] * len(FORGET)
    assert hot["empty"] == 1.0 and hot["degenerate"] == 1.0
    cut = preview_forget(model, tok, FORGET, 2.0, max_new_tokens=len(opener))
    assert cut["degenerate"] == 0.0


def test_the_degenerate_share_is_a_setting(tok, monkeypatch):
    """Allowing every answer to be degenerate brings the old rule back: τ 2 'reaches' a score of 0 raw; the
    score that counts degenerate answers as the original's answer still refuses it."""
    generate, by_prompt = _constructed_generation(tok)
    _register(by_prompt, tok, FORGET)
    monkeypatch.setattr(tau_module, "greedy_generate", generate)
    model = tiny_model(vocab_size=len(tok))
    choice = choose_temperature(model, tok, FORGET, "auto:0.5", max_degenerate=0.99, suggest_layers=False,
                                warn=False)  # fmt: skip
    assert not choice.reached and choice.suggestions == []
    with pytest.raises(ValueError, match="max_degenerate"):
        choose_temperature(model, tok, FORGET, "auto", max_degenerate=1.0)


def _end_of_turn_when_smoothed(model: torch.nn.Module) -> torch.nn.Module:
    """``model`` built so its end of turn dominates at high τ: its LM head's EOS logit is pushed down by
    100 while no layer is smoothed and up by 100 once every layer runs at τ >= 2."""

    def hook(module, inputs, output):
        temps = _temperatures(model)
        shift = 100.0 if all(t >= 2.0 for t in temps) else (-100.0 if all(t == 1.0 for t in temps) else 0.0)
        output = output.clone()
        output[..., EOS] += shift
        return output

    model.lm_head.register_forward_hook(hook)
    return model


def test_the_preview_counts_immediate_stops_on_a_real_generation(tok):
    model = _end_of_turn_when_smoothed(tiny_model(vocab_size=len(tok)))
    plain = preview_forget(model, tok, FORGET, 1.0, max_new_tokens=6)
    assert plain["immediate_stop"] == 0.0 and all(plain["generations"])
    hot = preview_forget(model, tok, FORGET, 2.0, max_new_tokens=6)
    assert hot["immediate_stop"] == 1.0 and hot["empty"] == 1.0 and hot["degenerate"] == 1.0
    assert hot["reasons"] == ["stops at once"] * len(FORGET) and hot["forget_rouge"] == 0.0
    # The renorm teacher's preview bans the stop tokens inside the answer: it answers something.
    renorm = preview_forget(model, tok, FORGET, 2.0, max_new_tokens=6, eos="renorm")
    assert renorm["immediate_stop"] == 0.0 and "stops at once" not in renorm["reasons"]
    with pytest.raises(ValueError, match="eos"):
        preview_forget(model, tok, FORGET, 2.0, eos="drop")


def test_stop_masked_bias_renormalises_without_the_stop_tokens():
    g = torch.Generator().manual_seed(0)
    weight, h = torch.randn(10, 4, generator=g), torch.randn(3, 4, generator=g)
    stops = torch.tensor([2, 7])
    for bias in (None, torch.randn(10, generator=g)):
        b = torch.zeros(10) if bias is None else bias
        p = F.softmax(h @ weight.T + b, -1)
        got = F.softmax(h @ weight.T + stop_masked_bias(bias, weight, stops), -1)
        keep = torch.ones(10, dtype=torch.bool)
        keep[stops] = False
        want = torch.where(keep, p, 0.0) / p[:, keep].sum(-1, keepdim=True)
        assert_fp32_close(got, want, "renormalised")
        assert bias is None or not torch.isinf(bias).any()  # the caller's bias is untouched


def test_renorm_teacher_loss_equals_the_full_logit_kl(tok):
    """``eos="renorm"``: ``sum_i w_i KL(p~_tau,i || p_theta,i)`` with ``p~`` the smoothed teacher without its
    EOS mass (renormalised) at every row whose target is not EOS and the full ``p_tau`` at the true end."""
    tau = 2.3
    original = tiny_model(vocab_size=len(tok))
    student = copy.deepcopy(original)
    with torch.no_grad():
        g = torch.Generator().manual_seed(7)
        for p in student.parameters():
            p.add_(0.02 * torch.randn(p.shape, generator=g))
    forget = COLLATORS["padded"].collate(encoded(tok, FORGET[:3]))
    mask, targets, seq = label_positions(forget)
    assert (targets == EOS).any() and (targets != EOS).any()  # both kinds of rows are present
    inputs = {k: forget[k] for k in ("input_ids", "attention_mask") if k in forget}
    reference = copy.deepcopy(original)
    with torch.no_grad(), smoothing(reference, tau):
        t_logits = reference(**inputs).logits[mask]
    t_logits[targets != EOS, EOS] = float("-inf")
    s_logits = copy.deepcopy(student)(**inputs).logits[mask]
    w = sequence_weights(seq, int(forget["example_ids"].numel()))
    kl_rows = F.kl_div(s_logits.log_softmax(-1), t_logits.log_softmax(-1), log_target=True, reduction="none")
    want = (w * kl_rows.nan_to_num(0.0).sum(-1)).sum()
    results = {}
    for eos in ("renorm", "keep"):
        objective = UnlearnObjective(student, method="asu", lam=1.0, teacher=CopyTeacher(original, tau),
                                     method_args={"eos": eos})  # fmt: skip
        with torch.no_grad():
            results[eos] = objective.forget_term(forget)
    assert_fp32_close(results["renorm"], want, "renorm ASU term")
    assert not torch.allclose(results["renorm"], results["keep"])
    with pytest.raises(ValueError, match="eos"):
        UnlearnObjective(student, method="asu", teacher=CopyTeacher(original, tau), method_args={"eos": "x"})
