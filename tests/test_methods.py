"""The method registry and every method added to it, against plain computations on full logits.

Each method's reference below is written from its formula (the module docstrings of ``asu/methods``), one
example at a time, on the full (T, V) logits of the model's own forward: no asu code path, no fused op.
Loss and every gradient must agree within fp32 rounding. The registry's rules (which teachers, retain terms
and parameters a method takes) and the end-to-end runs through :func:`asu.unlearn.unlearn` and ``asu
unlearn --method NAME`` are tested at the end.
"""

from __future__ import annotations

import copy
import json
import math

import helpers
import pytest
import torch
import torch.nn.functional as F
from helpers import COLLATORS, FORGET, RETAIN, assert_fp32_close, encoded, perturbed, tiny_model

from asu.commands import main
from asu.losses import UnlearnObjective
from asu.methods import METHODS, check_setup, get_method, method_setup
from asu.methods.rmu import control_vector
from asu.teachers import build_teacher
from asu.unlearn import UnlearnConfig, unlearn

REFUSALS = ["who where when", "what did write", "I"]


def rewrite(rows: list[dict], answers: list[str]) -> list[dict]:
    return [{"question": r["question"], "answer": answers[i % len(answers)]} for i, r in enumerate(rows)]


def rows_of(ex: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """An example's label-predicting positions and their targets."""
    labels = torch.tensor(ex["labels"])
    pos = torch.nonzero(labels[1:] != -100).flatten()
    return pos, labels[1:][pos]


def log_probs(model, ex: dict) -> tuple[torch.Tensor, torch.Tensor]:
    """Log-softmax of the full logits at the example's label rows (T, V) and the targets (T,)."""
    pos, targets = rows_of(ex)
    return F.log_softmax(helpers.full_logits(model, ex["input_ids"])[pos], -1), targets


# ---- the independent references, one per new method -------------------------------------------------------


def plain_asu_idk(student, teacher, forget, idk):
    """ASU without each answer's first row, per-sequence mean then mean, plus the token-mean IDK NLL."""
    per_seq = []
    for ex in forget:
        log_s, _ = log_probs(student, ex)
        with torch.no_grad():
            log_t, _ = log_probs(teacher, ex)
        kl = F.kl_div(log_s, log_t, reduction="none", log_target=True).sum(-1)
        per_seq.append(kl[1:].mean())
    return torch.stack(per_seq).mean() + helpers.plain_nll(student, idk)


def plain_dpo(student, original, lose, win, beta):
    nll_w, _ = helpers.plain_nll(student, win, "seq")
    nll_l, _ = helpers.plain_nll(student, lose, "seq")
    with torch.no_grad():
        ref_w, _ = helpers.plain_nll(original, win, "seq")
        ref_l, _ = helpers.plain_nll(original, lose, "seq")
    margin = (ref_w - nll_w) - (ref_l - nll_l)
    return -(2 / beta) * F.logsigmoid(beta * margin).mean()


def plain_me(student, forget):
    """Token mean of KL(U || p) = -log V - mean_v log p_v."""
    rows = torch.cat([log_probs(student, ex)[0] for ex in forget])
    return (-math.log(rows.shape[-1]) - rows.mean(-1)).mean()


def plain_ap(student, retain, refusals, beta):
    nll, _ = helpers.plain_nll(student, retain, "seq")
    idk, _ = helpers.plain_nll(student, refusals, "seq")
    return -F.logsigmoid(beta * (idk - nll)).mean() / beta


def plain_undial(student, original, forget, beta):
    """Mean over label rows of H(softmax(z_ref - beta e_y), p)."""
    terms = []
    for ex in forget:
        log_s, targets = log_probs(student, ex)
        pos, _ = rows_of(ex)
        with torch.no_grad():
            z = helpers.full_logits(original, ex["input_ids"])[pos]
            z[torch.arange(len(targets)), targets] -= beta
            q = F.softmax(z, -1)
        terms.append(-(q * log_s).sum(-1))
    return torch.cat(terms).mean()


def plain_weighted_ga(student, forget, weight_of):
    """-(1/M) sum_i w(p_i) NLL_i with the weight detached."""
    terms = []
    for ex in forget:
        log_s, targets = log_probs(student, ex)
        nll = -log_s[torch.arange(len(targets)), targets]
        terms.append(-weight_of(torch.exp(-nll).detach()) * nll)
    return torch.cat(terms).mean()


def plain_ceu(student, forget, ignore_first=1):
    """Mean over label rows (the first ``ignore_first`` of each answer left out) of H(t, p), ``t`` the
    detached softmax with the true token's logit at -inf."""
    terms = []
    for ex in forget:
        pos, targets = rows_of(ex)
        z = helpers.full_logits(student, ex["input_ids"])[pos][ignore_first:]
        y = targets[ignore_first:]
        masked = z.detach().clone()
        masked[torch.arange(len(y)), y] = float("-inf")
        terms.append(-(F.softmax(masked, -1) * F.log_softmax(z, -1)).sum(-1))
    return torch.cat(terms).mean()


def layer_output(model, ex: dict, layer: int) -> torch.Tensor:
    """Decoder layer ``layer``'s output (T, d) for one example, from a hook of the test's own."""
    seen = []
    handle = model.model.layers[layer].register_forward_hook(
        lambda m, a, out: seen.append(out[0] if isinstance(out, tuple) else out)
    )
    try:
        model(input_ids=torch.tensor([ex["input_ids"]]))
    finally:
        handle.remove()
    return seen[0][0]


def plain_activation_distance(model, examples, layer, target_of) -> torch.Tensor:
    """mean over examples of the mean over labelled tokens of mean_d (h - target)^2 (``target_of(ex)``: (T, d)
    or (d,))."""
    per_seq = []
    for ex in examples:
        labelled = torch.tensor(ex["labels"]) != -100
        h = layer_output(model, ex, layer)
        target = target_of(ex).expand_as(h)
        per_seq.append((h - target)[labelled].pow(2).mean(-1).mean())
    return torch.stack(per_seq).mean()


# ---- the comparisons ---------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def models(tok):
    original = tiny_model("llama", vocab_size=len(tok))
    return original, perturbed(original)


@pytest.fixture(scope="module")
def sets(tok):
    return {
        "forget": encoded(tok, FORGET),
        "retain": encoded(tok, RETAIN),
        "idk": encoded(tok, rewrite(FORGET, REFUSALS)),
        "alternate": encoded(tok, rewrite(FORGET, [r["answer"] for r in RETAIN])),
        "mismatch": encoded(tok, rewrite(FORGET, [r["answer"] for r in RETAIN[::-1]])),
        "retain_idk": encoded(tok, rewrite(RETAIN, REFUSALS[::-1])),
    }


def gradients(model) -> dict[str, torch.Tensor]:
    out = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return out


def assert_same(student, got: torch.Tensor, want: torch.Tensor, what: str) -> None:
    """Loss and the gradient of every student weight: asu's (``got``) against the plain one (``want``)."""
    student.zero_grad(set_to_none=True)
    got.backward()
    g_got = gradients(student)
    want.backward()
    g_want = gradients(student)
    assert_fp32_close(got.detach(), want.detach(), f"{what} loss")
    assert set(g_got) == set(g_want), what
    assert any(g.abs().sum() > 0 for g in g_want.values()), what
    for name in g_want:
        assert_fp32_close(g_got[name], g_want[name], f"{what} grad {name}", gradient=True)


#: Parameters other than the defaults where those make the term vanish on a random model (SatImp's p^5 with
#: p ~ 1/V).
ARGS = {"satimp": {"beta1": 0.5, "beta2": 2.0}}


def forget_case(method, models, sets, layout):
    """(asu's forget term, the plain reference) of ``method`` on the test rows."""
    original, student = models
    teacher = build_teacher("copy", original, 2.3)
    obj = UnlearnObjective(student, method=method, teacher=teacher, method_args=ARGS.get(method))
    b = {name: COLLATORS[layout].collate(part) for name, part in sets.items()}
    got = obj.forget_term(b["forget"], b["idk"], alternate=b["alternate"], mismatch=b["mismatch"])
    f = sets["forget"]
    want = {
        "asu-idk": lambda: plain_asu_idk(student, helpers.hand_smoothed(original, 2.3), f, sets["idk"]),
        "dpo": lambda: plain_dpo(student, original, f, sets["idk"], 0.1),
        "altpo": lambda: plain_dpo(student, original, f, sets["alternate"], 0.1),
        "me": lambda: plain_me(student, f),
        "llmu": lambda: -helpers.plain_nll(student, f) + helpers.plain_nll(student, sets["mismatch"]),
        "undial": lambda: plain_undial(student, original, f, 10.0),
        "wga": lambda: plain_weighted_ga(student, f, lambda p: p),
        "satimp": lambda: plain_weighted_ga(student, f, lambda p: p**0.5 * (1 - p) ** 2),
        "ceu": lambda: plain_ceu(student, f),
    }[method]()
    return student, got, want


NEW = ["asu-idk", "dpo", "altpo", "me", "llmu", "undial", "wga", "satimp", "ceu"]


@pytest.mark.parametrize("method", NEW)
def test_forget_terms_match_plain(method, models, sets, reference_backend):
    student, got, want = forget_case(method, models, sets, "packed")
    assert abs(want.item()) > 1e-3
    assert_same(student, got, want, method)


@pytest.mark.parametrize("method", ["asu-idk", "undial", "ceu", "wga"])
def test_forget_terms_on_the_kernels_padded(method, models, sets):
    """The same on padded batches, with the fused ops on their default path (the Triton kernels under
    TRITON_INTERPRET=1): the methods that read per-row probabilities or drop rows."""
    student, got, want = forget_case(method, models, sets, "padded")
    assert_same(student, got, want, method)


def test_ap_retain_term_matches_plain(models, sets, reference_backend):
    _, student = models
    obj = UnlearnObjective(student, method="idk", retain_loss="ap")
    col = COLLATORS["packed"]
    got = obj.retain_term(col.collate(sets["retain"]), retain_idk=col.collate(sets["retain_idk"]))
    assert_same(student, got, plain_ap(student, sets["retain"], sets["retain_idk"], 0.1), "ap")


def test_totals_use_each_methods_weights(models, sets, reference_backend):
    """SatImp's gamma 0.1 and alpha 1; AltPO's method_args; LLMU's default kl retain term; UNDIAL's alpha 0
    (no retain term at all)."""
    original, student = models
    col = COLLATORS["packed"]
    b = {name: col.collate(part) for name, part in sets.items()}
    out = UnlearnObjective(student, method="satimp")(b["forget"], b["retain"])
    assert_fp32_close(out["loss"], 0.1 * out["forget_loss"] + out["retain_loss"])
    teacher = build_teacher("copy", original, 2.3)
    altpo = UnlearnObjective(
        student, method="altpo", teacher=teacher, method_args={"gamma": 2.0, "alpha": 0.5}
    )
    out = altpo(b["forget"], b["retain"], alternate=b["alternate"])
    assert_fp32_close(out["loss"], 2.0 * out["forget_loss"] + 0.5 * out["retain_loss"])
    llmu = UnlearnObjective(student, method="llmu", teacher=teacher, retain_loss=None)
    out = llmu(b["forget"], b["retain"], mismatch=b["mismatch"])
    assert_fp32_close(out["retain_loss"], helpers.plain_kl(student, original, sets["retain"]))
    out = UnlearnObjective(student, method="undial", teacher=teacher)(b["forget"])
    assert "retain_loss" not in out and torch.equal(out["loss"], out["forget_loss"])


@pytest.mark.parametrize("layer", [0, 1])
def test_rmu_matches_plain(layer, models, sets, reference_backend):
    """RMU's forget term (the layer's output against the control vector) plus its embed retain term (against
    the original model's output of the layer), per example then over examples."""
    original, student = models
    obj = UnlearnObjective(
        student, method="rmu", teacher=build_teacher("copy", original, 1.0),
        method_args={"layer": layer, "steering_coeff": 6.5},
    )  # fmt: skip
    col = COLLATORS["padded"]
    out = obj(col.collate(sets["forget"]), col.collate(sets["retain"]))
    c = control_vector(obj, 64, 6.5, torch.zeros(()))
    assert c.shape == (64,) and torch.all(c >= 0) and torch.isclose(c.norm(), torch.tensor(6.5))
    assert torch.equal(
        c, control_vector(UnlearnObjective(student, method="rmu", retain_loss="nll"), 64, 6.5, c)
    )
    forget = plain_activation_distance(student, sets["forget"], layer, lambda ex: c)
    with torch.no_grad():
        reference = {id(ex): layer_output(original, ex, layer) for ex in sets["retain"]}
    retain = plain_activation_distance(student, sets["retain"], layer, lambda ex: reference[id(ex)])
    assert_same(student, out["loss"], forget + retain, f"rmu layer {layer}")


def test_rmu_trains_only_its_weights(tok, reference_backend):
    """The default ``trainable`` (auto): the MLP down projections of layers layer-2..layer; a pattern list
    otherwise; a pattern that matches nothing is refused before training."""
    model = tiny_model("llama", vocab_size=len(tok))
    before = copy.deepcopy(model.state_dict())
    cfg = UnlearnConfig(method="rmu", method_args={"layer": 1}, lr=1e-2, epochs=1, batch_size=5, grad_accum=1,
                        max_length=64, warmup_epochs=0, progress=False)  # fmt: skip
    result = unlearn(model, tok, FORGET, RETAIN, cfg)
    changed = {k for k, v in result.model.state_dict().items() if not torch.equal(before[k], v)}
    assert changed == {"model.layers.0.mlp.down_proj.weight", "model.layers.1.mlp.down_proj.weight"}
    bad = UnlearnConfig(
        method="rmu", method_args={"layer": 1, "trainable": ["lm_head\\.nothing"]}, progress=False
    )
    with pytest.raises(ValueError, match="nothing to train"):
        unlearn(tiny_model("llama", vocab_size=len(tok)), tok, FORGET, RETAIN, bad)


# ---- the registry ------------------------------------------------------------------------------------------


def test_every_method_declares_its_sources_and_defaults():
    fields = UnlearnConfig()
    for name, spec in METHODS.items():
        assert spec.reference and spec.formula and spec.title, name
        assert get_method(name) is spec
        for p in spec.params:
            assert p.source and p.help, (name, p.name)
            if p.field is not None:  # a parameter with a field of its own: the same default there
                assert getattr(fields, p.field) == p.default, (name, p.name)
        setup = method_setup(name)
        assert setup.retain_loss in spec.retain_losses or spec.retain == "none"
    assert get_method("graddiff").name == "gd"
    assert (
        UnlearnConfig(method="rmu").retain_loss == "embed"
        and UnlearnConfig(method="llmu").retain_loss == "kl"
    )
    assert UnlearnConfig().retain_loss == "nll"


def test_registry_rules_are_checked_once_for_config_and_objective(tok):
    with pytest.raises(ValueError, match="takes retain_loss"):
        UnlearnConfig(method="npo", retain_loss="embed").validate()
    with pytest.raises(ValueError, match="cache"):
        UnlearnConfig(method="rmu", teacher="cache").validate()
    UnlearnConfig(method="rmu", retain_loss="nll", teacher="cache").validate()  # nothing read from a teacher
    with pytest.raises(ValueError, match="gradient_checkpointing"):
        UnlearnConfig(method="rmu", gradient_checkpointing=True).validate()
    with pytest.raises(ValueError, match="no LoRA"):
        UnlearnConfig(method="rmu", lora_r=4, teacher="copy").validate()
    with pytest.raises(ValueError, match="has no parameter 'betta'; its parameters: alpha, beta, gamma"):
        UnlearnConfig(method="wga", method_args={"betta": 1.0}).validate()
    with pytest.raises(ValueError, match="must be >= 0"):
        UnlearnConfig(method="satimp", method_args={"gamma": -1}).validate()
    with pytest.raises(ValueError, match="ap_beta"):
        UnlearnConfig(method="idk", retain_loss="ap", method_args={"ap_beta": 0}).validate()
    cfg = UnlearnConfig(method="npo", method_args={"beta": 0.3})
    cfg.validate()  # a parameter with a field of its own moves there
    assert cfg.npo_beta == 0.3 and cfg.method_args == {}
    setup = method_setup("undial", "nll", method_args={"alpha": 0.5})
    assert setup.retain is not None and setup.parts == ("forget", "retain")
    assert method_setup("dpo", "ap").needs_refusals and method_setup("dpo", "ap").parts[-1] == "retain_idk"
    with pytest.raises(ValueError, match="needs a teacher"):
        check_setup(method_setup("undial"), None)
    with pytest.raises(ValueError, match="needs a teacher"):
        UnlearnObjective(tiny_model(vocab_size=len(tok)), method="dpo")


def test_unlearn_checks_the_rows_a_method_rewrites(tok, tmp_path):
    model = tiny_model(vocab_size=len(tok))
    cases = [
        (UnlearnConfig(method="dpo"), FORGET, RETAIN, None, "needs idk_answers"),
        (UnlearnConfig(method="idk", retain_loss="ap"), FORGET, RETAIN, None, "needs idk_answers"),
        (UnlearnConfig(method="altpo"), FORGET, RETAIN, None, "'alternate' answer"),
        (UnlearnConfig(method="llmu"), FORGET, [{"text": "a b c"}], None, "retain row 0 has no 'answer'"),
        (
            UnlearnConfig(method="idk"),
            [{"text": "a b c"}],
            RETAIN,
            REFUSALS,
            "forget row 0 has no 'question'",
        ),
    ]
    for cfg, forget, retain, refusals, message in cases:
        with pytest.raises(ValueError, match=message):
            unlearn(model, tok, forget, retain, cfg, output_dir=str(tmp_path / "o"), idk_answers=refusals)
        assert not (tmp_path / "o").exists()


RUNS = {
    "asu-idk": {}, "dpo": {}, "altpo": {}, "me": {"lam": 1.0}, "llmu": {}, "undial": {},
    "satimp": {}, "wga": {}, "ceu": {}, "idk": {"retain_loss": "ap"}, "rmu": {"method_args": {"layer": 0}},
}  # fmt: skip


@pytest.mark.parametrize("method", list(RUNS))
def test_unlearn_runs_every_new_method(tok, method, reference_backend):
    """One short run each through unlearn() (cache teacher where one is read and can be cached), every
    logged total equal to the method's weighted sum of its terms."""
    model = tiny_model(vocab_size=len(tok))
    before = copy.deepcopy(model.state_dict())
    forget = [{**r, "alternate": [a["answer"] for a in RETAIN]} for r in FORGET]
    teacher = "copy" if method == "rmu" else "cache"
    cfg = UnlearnConfig(method=method, teacher=teacher, lr=1e-3, epochs=1, batch_size=3, grad_accum=1,
                        max_length=64, warmup_epochs=0, progress=False, **RUNS[method])  # fmt: skip
    result = unlearn(model, tok, forget, RETAIN, cfg, idk_answers=REFUSALS)
    setup = cfg.method_setup()
    assert len(result.history) == 2
    for h in result.history:
        want = setup.forget_weight * h["forget_loss"] + setup.retain_weight * h.get("retain_loss", 0.0)
        assert h["loss"] == pytest.approx(want, rel=1e-5, abs=1e-7)
    assert any(not torch.equal(before[k], v) for k, v in result.model.state_dict().items())


def test_cli_method_and_method_args(tok, tmp_path, reference_backend):
    model_dir, out = tmp_path / "model", tmp_path / "out"
    tiny_model(vocab_size=len(tok)).save_pretrained(model_dir)
    tok.save_pretrained(model_dir)
    forget, retain, idk = tmp_path / "f.jsonl", tmp_path / "r.jsonl", tmp_path / "idk.txt"
    forget.write_text("".join(json.dumps(r) + "\n" for r in FORGET))
    retain.write_text("".join(json.dumps(r) + "\n" for r in RETAIN))
    idk.write_text("\n".join(REFUSALS) + "\n")
    argv = ["unlearn", "--model", str(model_dir), "--forget", str(forget), "--retain", str(retain), "--out",
            str(out), "--epochs", "1", "--batch-size", "5", "--grad-accum", "1", "--max-length", "64",
            "--lr", "1e-3", "--no-progress", "--method", "dpo"]  # fmt: skip
    assert main(argv + ["--method-arg", "beta=0.5"]) == 2  # no --idk-file: refused, nothing written
    assert not out.exists()
    assert main(argv + ["--method-arg", "betta=0.5", "--idk-file", str(idk)]) == 2
    assert main(argv + ["--method-arg", "beta=0.5", "--idk-file", str(idk)]) == 0
    config = json.loads((out / "run.json").read_text())["config"]
    assert config["method"] == "dpo" and config["method_args"] == {"beta": 0.5}
