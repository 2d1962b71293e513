"""asu inspect on a tiny random Llama with a tokenizer built here.

The statistics are checked against an independent computation: eager attention probabilities
(``output_attentions=True``) at tau = 1, and with only the inspected layer smoothed (asu.smoothing), so
that layer's input (hence q, k) is unchanged while its attention runs at tau.
"""

import json

import pytest
import torch
from helpers import tiny_config

from asu.data import encode_rows
from asu.demo.tiny import train_tokenizer
from asu.inspection import inspect_model, parse_temperatures, summarize
from asu.smoothing import smoothing

FORGET = [
    {"question": "Where was Ilsa Varn born?", "answer": "Ilsa Varn was born in Kettering Vale."},
    {"question": "What does Ilsa Varn write?", "answer": "She writes maritime mysteries about lighthouses."},
]
RETAIN = [
    {"question": "Who wrote The Copper Gate?", "answer": "The Copper Gate was written by Oren Maddox."},
    {"question": "What is Oren Maddox's genre?", "answer": "Oren Maddox writes historical fiction."},
]


@pytest.fixture(scope="module")
def tiny(tmp_path_factory):
    from transformers import LlamaForCausalLM

    corpus = [r["question"] + " " + r["answer"] for r in FORGET + RETAIN] * 4
    tokenizer = train_tokenizer(corpus, vocab_size=300)
    config = tiny_config(
        "llama", num_layers=3, vocab_size=len(tokenizer), max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, attn_implementation="eager",
    )  # fmt: skip
    torch.manual_seed(0)
    model = LlamaForCausalLM(config).eval()
    # Larger query/key weights than the default init, so that attention maps are far from uniform.
    with torch.no_grad():
        for layer in model.model.layers:
            layer.self_attn.q_proj.weight.mul_(8)
            layer.self_attn.k_proj.weight.mul_(8)
    path = tmp_path_factory.mktemp("tiny")
    model.save_pretrained(path)
    tokenizer.save_pretrained(path)
    return model, tokenizer, path


def _eager_stats(model, examples, layer, taus):
    """Per-head means over answer-predicting rows, from materialised eager attention probabilities."""
    sums = {"ent1": 0.0, **{f"kl{t}": 0.0 for t in taus}, **{f"ent{t}": 0.0 for t in taus}}
    rows = 0
    for ex in examples:
        ids = torch.tensor([ex["input_ids"]])
        sel = torch.tensor([lab != -100 for lab in ex["labels"][1:]] + [False])
        with torch.no_grad():
            p = (
                model(input_ids=ids, output_attentions=True).attentions[layer][0].double()[:, sel]
            )  # (H, R, N)
        ent = lambda q: -(q * torch.where(q > 0, q.log(), torch.zeros_like(q))).sum(-1)  # noqa: E731
        sums["ent1"] = sums["ent1"] + ent(p).sum(-1)
        for t in taus:
            with smoothing(model, t, layers=[layer]), torch.no_grad():
                pt = model(input_ids=ids, output_attentions=True).attentions[layer][0].double()[:, sel]
            log_ratio = torch.where(pt > 0, pt.log() - p.clamp_min(1e-300).log(), torch.zeros_like(pt))
            sums[f"kl{t}"] = sums[f"kl{t}"] + (pt * log_ratio).sum(-1).sum(-1)
            sums[f"ent{t}"] = sums[f"ent{t}"] + ent(pt).sum(-1)
        rows += int(sel.sum())
    return {k: v / rows for k, v in sums.items()}, rows


def test_matches_materialised_eager_attention(tiny):
    model, tokenizer, _ = tiny
    taus = [2.0, 3.0]
    forget = encode_rows(tokenizer, FORGET, 64)
    report = inspect_model(model, {"forget": forget}, temperatures=taus, layers="0,2")
    assert report["layers"] == [0, 2] and report["num_heads"] == 4
    s = report["sets"]["forget"]
    for slot, layer in enumerate(report["layers"]):
        want, rows = _eager_stats(model, forget, layer, taus)
        assert s["rows"] == rows and s["examples"] == len(FORGET)
        torch.testing.assert_close(torch.tensor(s["entropy_tau1"][slot], dtype=torch.float64), want["ent1"],
                                   atol=1e-4, rtol=1e-4)  # fmt: skip
        for t in taus:
            kl = torch.tensor(s["kl"][f"{t:g}"][slot], dtype=torch.float64)
            torch.testing.assert_close(kl, want[f"kl{t}"], atol=1e-4, rtol=1e-3)
            ent = torch.tensor(s["entropy"][f"{t:g}"][slot], dtype=torch.float64)
            torch.testing.assert_close(ent, want[f"ent{t}"], atol=1e-4, rtol=1e-4)
            assert (kl > 0).all()
        # Smoothing flattens: higher temperature, higher entropy and larger KL.
        e2, e3 = (torch.tensor(s["entropy"][k][slot]) for k in ("2", "3"))
        assert (e3 > e2).all() and (e2 > torch.tensor(s["entropy_tau1"][slot])).all()
        assert (torch.tensor(s["kl"]["3"][slot]) > torch.tensor(s["kl"]["2"][slot])).all()


def test_cli_writes_json_heatmaps_and_summary(tiny, tmp_path, capsys):
    from asu.commands import main

    _, _, model_dir = tiny
    forget, retain = tmp_path / "forget.jsonl", tmp_path / "retain.json"
    forget.write_text("\n".join(json.dumps(r) for r in FORGET) + "\n")
    retain.write_text(json.dumps(RETAIN))
    out = tmp_path / "out"
    argv = ["inspect", "--model", str(model_dir), "--data", str(forget), "--retain", str(retain),
            "--temperature", "2,2.3", "--layers", "1-2", "--max-length", "48", "--max-examples", "1",
            "--out", str(out)]  # fmt: skip
    assert main(argv) == 0
    report = json.loads((out / "inspect.json").read_text())
    assert set(report["sets"]) == {"forget", "retain"} and report["layers"] == [1, 2]
    for name in ("forget", "retain"):
        s = report["sets"][name]
        assert s["examples"] == 1 and s["rows"] > 0
        assert len(s["kl"]["2.3"]) == 2 and len(s["kl"]["2.3"][0]) == 4
        for tau in ("2", "2.3"):
            for kind in ("kl", "entropy"):
                png = out / f"{kind}_{name}_tau{tau}.png"
                assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
        assert (out / f"entropy_{name}_tau1.png").stat().st_size > 0
    summary = (out / "summary.txt").read_text()
    assert summary == summarize(report)
    assert "most changed: layer" in summary and "forget - retain KL" in summary
    assert "tau = 2.3" in capsys.readouterr().out
    assert not [p for p in out.iterdir() if p.name.endswith(".tmp")]


def test_bad_arguments():
    with pytest.raises(ValueError, match="cannot parse temperature"):
        parse_temperatures("2,x")
    with pytest.raises(ValueError, match="> 0"):
        parse_temperatures("2,-1")
    with pytest.raises(ValueError, match="twice"):
        parse_temperatures("2,2.0")
    assert parse_temperatures("2, 2.3,3") == [2.0, 2.3, 3.0]


def test_bad_layer_and_rows_selection(tiny):
    model, tokenizer, _ = tiny
    forget = encode_rows(tokenizer, FORGET[:1], 64)
    with pytest.raises(ValueError, match="out of range"):
        inspect_model(model, {"forget": forget}, temperatures=[2.0], layers="5")
    with pytest.raises(ValueError, match="rows must be one of"):
        inspect_model(model, {"forget": forget}, temperatures=[2.0], rows="prompt")


def test_capture_qk_matches_eager_and_carries_gradient(tiny):
    from asu.qk import capture_qk

    model, tokenizer, _ = tiny
    ids = torch.tensor([encode_rows(tokenizer, FORGET[:1], 64)[0]["input_ids"]])
    with capture_qk(model, layers=[1]) as qk:
        out = model(input_ids=ids, output_attentions=True)
    assert list(qk) == [1]
    q, k = qk[1]
    assert q.shape[1] == 4 and k.shape[1] == 2
    # softmax(q k^T * scale) over the causal mask is exactly the eager attention map of that layer.
    kk = k.repeat_interleave(2, dim=1)
    s = (q @ kk.transpose(-1, -2)) * model.model.layers[1].self_attn.scaling
    n = ids.shape[1]
    s = s.masked_fill(~torch.ones(n, n, dtype=torch.bool).tril(), float("-inf"))
    torch.testing.assert_close(torch.softmax(s, -1), out.attentions[1], atol=1e-5, rtol=1e-4)
    # The captured q carries the graph back to the layer's projection weights; hooks are gone on exit.
    q.sum().backward()
    assert model.model.layers[1].self_attn.q_proj.weight.grad is not None
    model.zero_grad(set_to_none=True)
    assert not model.model.layers[1].self_attn._forward_pre_hooks
