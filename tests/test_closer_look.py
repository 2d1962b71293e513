"""closer-look's metrics (the ASU paper's MU / FE): the formulas against hand computations, the encoding and
generation protocol on a byte-level tokenizer, the judges loaded from tiny random models of the real
classes, and ``asu eval --metrics closer-look`` / ``--benchmark real-world`` end to end."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest
import torch
import transformers
from scipy.stats import hmean
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from asu import closer_look
from asu.commands import main
from asu.judges import Judges, load_embedder, load_nli
from asu.metrics import closer_look as formulas

# ------------------------------------------------------------------------------------------- the data

QUESTIONS = [
    "Who wrote the book about rivers?",
    "Where was the sailor born?",
    "What did the teacher write?",
    "Which city did the painter love?",
]
ANSWERS = [
    "The teacher wrote the book about rivers.",
    "The sailor was born in a small harbour city.",
    "The teacher wrote three books about rivers and a city.",
    "The painter loved the old harbour city.",
]


def _qa_rows(general: bool = False, real_world: bool = False) -> list[dict]:
    rows = []
    for i, (q, a) in enumerate(zip(QUESTIONS, ANSWERS, strict=True)):
        row = {
            "question": q,
            "answer": a,
            "perturbed_answer": [f"The baker made {i} cakes.", "Nobody knows."],
        }
        if general:
            row |= {"answer": a.split()[1], "original_answer": a}
        else:
            row["paraphrased_answer"] = a.replace("The", "This", 1)
        if real_world:  # closer-look's data/real_world/*_perturbed.json fields (rows synthesised here)
            row |= {
                "name": "The Sailor", "answer": a + " He was famous for it.", "golden_answer": a,
                "paraphrased_question": q.lower(), "task_id": 1,
            }  # fmt: skip
        rows.append(row)
    return rows


def _corpus() -> list[str]:
    tags = ["Question: ", "\nAnswer: ", "[INST] ", " [/INST]", "This", "baker made cakes Nobody knows"]
    return QUESTIONS + ANSWERS + tags


def bpe_tokenizer() -> transformers.PreTrainedTokenizerFast:
    """A byte-level BPE tokenizer trained on the test rows: decoding gives back the text exactly (closer-look
    decodes its encoded rows to find the prompt), BOS ``<s>`` prepended, EOS ``</s>``."""
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=420, special_tokens=["<pad>", "<s>", "</s>"], show_progress=False,
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
    )  # fmt: skip
    tok.train_from_iterator(_corpus() * 4, trainer)
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", special_tokens=[("<s>", 1)])
    return transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>"
    )


def tiny_lm(tokenizer, seed: int = 0) -> transformers.PreTrainedModel:
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=64, num_hidden_layers=2,
        num_attention_heads=2, num_key_value_heads=1, max_position_embeddings=256, bos_token_id=1,
        eos_token_id=2, pad_token_id=0, tie_word_embeddings=False,
    )  # fmt: skip
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval()


@pytest.fixture(scope="module")
def bpe():
    return bpe_tokenizer()


# -------------------------------------------------------------------------------------------- judges


def _bert_tokenizer(path) -> transformers.BertTokenizerFast:
    words = sorted({w.strip(".,?").lower() for t in _corpus() for w in t.split()} - {""})
    vocab = path / "vocab.txt"
    vocab.write_text("\n".join(["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", *words]) + "\n")
    return transformers.BertTokenizerFast(vocab_file=str(vocab))


def save_tiny_nli(path, labels=("entailment", "neutral", "contradiction")) -> str:
    """A tiny random DebertaV2ForSequenceClassification (the class of closer-look's NLI model) with a word
    tokenizer, saved to ``path``."""
    path.mkdir(parents=True, exist_ok=True)
    tok = _bert_tokenizer(path)
    config = transformers.DebertaV2Config(
        vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=128, num_labels=len(labels), id2label=dict(enumerate(labels)),
        label2id={v: k for k, v in enumerate(labels)},
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.DebertaV2ForSequenceClassification(config).save_pretrained(path)
    tok.save_pretrained(path)
    return str(path)


def save_tiny_embedder(path) -> str:
    """A tiny random sentence-transformers model (BERT + mean pooling, the layout of paraphrase-MiniLM-L6-v2)
    saved to ``path``."""
    st = pytest.importorskip("sentence_transformers")
    bert = path / "bert"
    bert.mkdir(parents=True, exist_ok=True)
    tok = _bert_tokenizer(bert)
    config = transformers.BertConfig(
        vocab_size=len(tok), hidden_size=16, num_hidden_layers=1, num_attention_heads=2, intermediate_size=32,
        max_position_embeddings=128,
    )  # fmt: skip
    torch.manual_seed(0)
    transformers.BertModel(config).save_pretrained(bert)
    tok.save_pretrained(bert)
    # a plain transformers folder becomes a sentence-transformers model with mean pooling
    st.SentenceTransformer(str(bert), device="cpu").save(str(path / "st"))
    return str(path / "st")


@pytest.fixture(scope="module")
def judge_dirs(tmp_path_factory):
    root = tmp_path_factory.mktemp("judges")
    return {"nli": save_tiny_nli(root / "nli"), "embedding": save_tiny_embedder(root / "emb")}


# ------------------------------------------------------------------------------------------ formulas


def test_token_entropy_is_base_2_and_normalised():
    # frequencies 1/2, 1/4, 1/4: 1.5 bits over log2(4) = 2
    assert formulas.token_entropy(["a", "b", "a", "c"]) == pytest.approx(0.75)
    assert formulas.token_entropy(["x", "y", "z"]) == pytest.approx(1.0)
    assert formulas.token_entropy(["x", "x", "x"]) == 0.0
    assert formulas.token_entropy(["x"]) == formulas.token_entropy([]) == 0.0


def test_probability_and_truth_ratio_as_closer_look_defines_them():
    gt, para = [0.5, 1.5], [0.7, 0.2]
    pert = [[1.0, 2.0, 3.0], [0.1, 0.3, 0.2]]
    assert formulas.probability(gt) == pytest.approx((math.exp(-0.5) + math.exp(-1.5)) / 2)
    shares = [
        math.exp(-g) / (math.exp(-g) + sum(math.exp(-x) for x in p)) for g, p in zip(gt, pert, strict=True)
    ]
    assert formulas.normalised_probability(gt, pert) == pytest.approx(np.mean(shares))
    # r = P(paraphrase) / geometric-mean P(perturbed)
    r = [math.exp(np.mean(p) - c) for p, c in zip(pert, para, strict=True)]
    assert formulas.truth_ratio(para, pert, forget=True) == pytest.approx(
        1 - np.mean([min(x, 1 / x) for x in r])
    )
    assert formulas.truth_ratio(para, pert, forget=False) == pytest.approx(
        np.mean([max(0, 1 - 1 / x) for x in r])
    )
    with pytest.raises(ValueError, match="finite"):
        formulas.probability([float("nan")])


def test_entailment_below_the_rouge_floor_is_none():
    labels = formulas.entailment_labels(["entailment", "entailment", "neutral"], [0.05, 0.1, 0.9])
    assert labels == ["none", "entailment", "neutral"]  # 0.1 is not below the floor
    assert formulas.entailment_score(labels) == pytest.approx(1 / 3)
    assert formulas.cosine([1, 0], [-1, 0]) == 0.0 and formulas.cosine([1, 1], [1, 0]) == pytest.approx(
        2**-0.5
    )


def _components(seed: int) -> dict[str, float]:
    rng = np.random.default_rng(seed)
    return dict(zip(formulas.COMPONENTS, rng.uniform(0.05, 0.95, 6), strict=True))


def test_mu_fe_avg_and_the_asu_authors_fe():
    per_set = {s: _components(i) for i, s in enumerate(("retain", "ra", "wf", "forget"))}
    out = formulas.aggregate(per_set)
    utility = [v for s in ("retain", "ra", "wf") for v in per_set[s].values()]
    f = per_set["forget"]
    assert out["Model Utility"] == pytest.approx(hmean(utility))  # 18 numbers, entropy and cosine included
    assert out["Model Utility Retain"] == pytest.approx(hmean(list(per_set["retain"].values())))
    five = [f[k] for k in ("ROUGE", "Probability", "Truth Ratio", "Cosine Similarity", "Entailment Score")]
    assert out["Forget Efficacy"] == pytest.approx(1 - np.mean(five))
    asu = [
        1 - f["ROUGE"],
        1 - f["Probability"],
        1 - f["Truth Ratio"],
        f["Token Entropy"],
        1 - f["Entailment Score"],
    ]
    assert out["Forget Efficacy (ASU)"] == pytest.approx(hmean(asu))
    assert out["Avg"] == pytest.approx((out["Model Utility"] + out["Forget Efficacy"]) / 2)
    keys = formulas.summary_keys(out)
    assert keys["cl_model_utility"] == out["Model Utility"] and keys["cl_avg_asu"] == out["Avg (ASU)"]
    assert set(formulas.aggregate({"forget": f})) == {"Forget Efficacy", "Forget Efficacy (ASU)"}


# --------------------------------------------------------------------------------- encoding, generation


def test_encode_masks_the_prompt_and_appends_eos(bpe):
    fmt = closer_look.FORMATS["phi"]
    enc = closer_look.encode(bpe, fmt, QUESTIONS[0], ANSWERS[0], max_length=64)
    prompt = bpe.tokenize("Question: " + QUESTIONS[0] + "\n", add_special_tokens=True)
    full = bpe("Question: " + QUESTIONS[0] + "\nAnswer: " + ANSWERS[0])["input_ids"]
    assert enc["labels"] == [-100] * len(prompt) + full[len(prompt) :] + [bpe.eos_token_id]
    assert enc["padded"] == full + [bpe.eos_token_id] * (64 - len(full))
    cut = closer_look.encode(bpe, fmt, QUESTIONS[0], ANSWERS[0], max_length=len(full) - 2)
    assert cut["input_ids"] == full[:-2] and cut["labels"][-1] == full[-3]  # truncated: no EOS
    with pytest.raises(ValueError, match="leaving no answer"):
        closer_look.encode(bpe, fmt, QUESTIONS[0], ANSWERS[0], max_length=len(prompt))


@pytest.mark.parametrize(
    "name,prompt", [("phi", "Question: {q}\nAnswer: "), ("llama2-7b", "[INST] {q} [/INST]")]
)
def test_prompts_and_truths_from_the_decoded_row(bpe, name, prompt):
    fmt = closer_look.FORMATS[name]
    encoded = [closer_look.encode(bpe, fmt, q, a) for q, a in zip(QUESTIONS, ANSWERS, strict=True)]
    prompts, truths = closer_look.split_prompts(bpe, fmt, [e["padded"] for e in encoded])
    assert prompts == [prompt.format(q=q) for q in QUESTIONS] and truths == ANSWERS


def test_generation_budget_is_the_padded_prompt_plus_answer(bpe):
    model = tiny_lm(bpe)
    prompts = ["Question: " + q + "\nAnswer: " for q in QUESTIONS] + ["Question: why?\nAnswer: "]
    out = closer_look.generate(model, bpe, prompts, batch_size=5, max_length=40)
    width = max(len(bpe(p)["input_ids"]) for p in prompts)
    manual = model.generate(
        torch.tensor([bpe(prompts[0])["input_ids"]]),
        max_new_tokens=40 - width,
        do_sample=False,
        pad_token_id=2,
    )[0, len(bpe(prompts[0])["input_ids"]) :]
    assert all(len(g["ids"]) <= 40 - width for g in out)
    assert out[0]["text"] == bpe.decode(manual, skip_special_tokens=True)  # the longest prompt: no padding
    with pytest.raises(ValueError, match="leaves no room"):
        closer_look.generate(model, bpe, prompts, max_length=width)


def test_format_follows_the_template_or_the_flag(bpe):
    assert closer_look.resolve_format(None, "tofu-llama2").name == "llama2-7b"
    assert closer_look.resolve_format(None, None, bpe).name == "phi"  # auto without a chat template: plain
    assert closer_look.resolve_format("llama3-8b", "llama3").name == "llama3-8b"
    with pytest.raises(ValueError, match="name the format"):
        closer_look.resolve_format(None, "llama3")
    with pytest.raises(ValueError, match="unknown closer-look format"):
        closer_look.resolve_format("llama4", None)


# ----------------------------------------------------------------------------------------------- judges


def test_nli_pipeline_from_a_tiny_deberta(tmp_path):
    nli = load_nli(save_tiny_nli(tmp_path / "nli"))
    judges = Judges("nli", "emb", nli, embedder=None)
    labels = judges.labels([(a, q) for q, a in zip(QUESTIONS, ANSWERS, strict=True)], chunk=3)
    assert len(labels) == 4 and set(labels) <= {"entailment", "neutral", "contradiction"}
    with pytest.raises(ValueError, match="counts the label 'entailment'"):
        load_nli(save_tiny_nli(tmp_path / "other", labels=("yes", "no")))


def test_embedder_from_a_tiny_sentence_transformer(tmp_path):
    embedder = load_embedder(save_tiny_embedder(tmp_path / "emb"))
    vectors = Judges("nli", "emb", nli=None, embedder=embedder).embed(ANSWERS)
    assert vectors.shape == (4, 16)
    alone = embedder.encode(ANSWERS[2])  # encoded on its own, as closer-look encodes each text
    np.testing.assert_allclose(vectors[2], alone, rtol=1e-6)


def test_a_missing_judge_is_one_error_naming_it(tmp_path, monkeypatch):
    import huggingface_hub.constants

    with pytest.raises(ValueError, match="no such directory"):
        load_nli(str(tmp_path / "nli-missing"))
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)
    with pytest.raises(ValueError, match=r"'nobody/no-nli-model'.*hub is unreachable.*--nli-model DIR"):
        load_nli("nobody/no-nli-model")
    pytest.importorskip("sentence_transformers")
    with pytest.raises(ValueError, match=r"embedding model 'nobody/no-embedder'.*--embedding-model DIR"):
        load_embedder("nobody/no-embedder")


# ------------------------------------------------------------------------------------------- asu eval


def _write_jsonl(path, rows) -> str:
    """Rows as closer-look's data files hold them: one JSON object per line."""
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory, bpe):
    path = tmp_path_factory.mktemp("model") / "tiny"
    tiny_lm(bpe).save_pretrained(path)
    bpe.save_pretrained(path)
    return str(path)


def _recomputed(out) -> dict:
    """closer-look's aggregates recomputed from the per-set logs the run wrote (its layout)."""
    logs = json.loads((out / "CLOSER_LOOK_EVAL.json").read_text())
    names = {file: split for split, (file, _) in formulas.SET_FILES.items()}
    return formulas.results({names[f]: log for f, log in logs.items()})


def test_asu_eval_closer_look_beside_open_unlearning(tmp_path, model_dir, judge_dirs, capsys):
    files = {
        "--data": _write_jsonl(tmp_path / "forget.json", _qa_rows()[:3]),
        "--retain": _write_jsonl(tmp_path / "retain.json", _qa_rows()),
        "--real-authors": _write_jsonl(tmp_path / "ra.json", _qa_rows(general=True)),
        "--world-facts": _write_jsonl(tmp_path / "wf.json", _qa_rows(general=True)[1:]),
    }
    out = tmp_path / "eval"
    argv = ["eval", "--model", model_dir, *[x for kv in files.items() for x in kv], "--no-progress"]
    argv += ["--metrics", "closer-look", "--nli-model", judge_dirs["nli"], "--max-new-tokens", "8"]
    argv += ["--closer-look-max-length", "48"]
    assert main([*argv, "--embedding-model", judge_dirs["embedding"], "--out", str(out)]) == 0
    printed = capsys.readouterr().out
    assert "| cl_model_utility |" in printed and "| forget_Q_A_ROUGE |" in printed  # both currencies
    summary = json.loads((out / "summary.json").read_text())
    written = json.loads((out / "CLOSER_LOOK_SUMMARY.json").read_text())
    assert written == pytest.approx(_recomputed(out))
    assert summary["cl_model_utility"] == pytest.approx(written["Model Utility"])
    assert summary["cl_avg"] == pytest.approx((written["Model Utility"] + written["Forget Efficacy"]) / 2)
    assert (out / "TOFU_EVAL.json").is_file() and "forget_Q_A_ROUGE" in summary
    logs = json.loads((out / "CLOSER_LOOK_EVAL.json").read_text())
    assert {f: len(log["avg_gt_loss"]) for f, log in logs.items()} == {
        "eval_log_forget.json": 3,
        "eval_log.json": 4,
        "eval_real_author_wo_options.json": 4,
        "eval_real_world_wo_options.json": 3,
    }
    prompt, _, truth, target = logs["eval_log_forget.json"]["generated_text"][0]
    assert (prompt, truth, target) == (f"Question: {QUESTIONS[0]}\nAnswer: ", ANSWERS[0], ANSWERS[0])
    recorded = json.loads((out / "eval_config.json").read_text())["closer_look"]
    assert recorded["format"] == "phi" and recorded["nli_model"] == judge_dirs["nli"]
    assert recorded["max_length"] == 48 and recorded["rows_per_set"] == closer_look.TOFU_ROWS


def _real_world_rows(n: int) -> list[dict]:
    return _qa_rows(real_world=True)[:n]


def test_asu_eval_real_world_reads_closer_looks_files(tmp_path, model_dir, judge_dirs, capsys):
    forget = _write_jsonl(tmp_path / "forget_perturbed.json", _real_world_rows(3))
    neighbour = _write_jsonl(tmp_path / "neighbor_perturbed.json", _real_world_rows(4))
    judges = ["--nli-model", judge_dirs["nli"], "--embedding-model", judge_dirs["embedding"]]
    argv = ["eval", "--benchmark", "real-world", "--model", model_dir, *judges, "--no-progress"]
    argv += ["--closer-look-max-length", "48"]
    out = tmp_path / "rw"
    assert main([*argv, "--data", forget, "--retain", neighbour, "--out", str(out)]) == 0
    summary = json.loads((out / "summary.json").read_text())
    written = json.loads((out / "CLOSER_LOOK_SUMMARY.json").read_text())
    assert written == pytest.approx(_recomputed(out))
    retain = [written[f"Retain {c}"] for c in formulas.COMPONENTS]
    assert summary["cl_model_utility"] == pytest.approx(hmean(retain))  # the neighbour set alone
    assert not (out / "TOFU_EVAL.json").exists()
    logs = json.loads((out / "CLOSER_LOOK_EVAL.json").read_text())
    # the real-world setting scores golden_answer and embeds against the row's long answer
    _, _, truth, target = logs["eval_log.json"]["generated_text"][1]
    assert (truth, target) == (ANSWERS[1], _real_world_rows(4)[1]["answer"])
    capsys.readouterr()
    bad = _real_world_rows(2)
    del bad[1]["golden_answer"]
    broken = _write_jsonl(tmp_path / "broken.json", bad)
    assert main([*argv, "--data", broken, "--out", str(tmp_path / "bad")]) == 2
    err = capsys.readouterr().err
    assert "row 1 has no usable 'golden_answer'" in err and not (tmp_path / "bad").exists()
    assert main([*argv, "--data", forget, "--split", "forget01", "--out", str(tmp_path / "bad")]) == 2
    assert "--split: not part of the real-world setting" in capsys.readouterr().err


def test_real_world_training_files_load_as_question_answer_rows(tmp_path):
    """The real-world preset trains on closer-look's forget.json / neighbor.json: question and answer."""
    from asu.data import load_rows

    rows = [
        {k: r[k] for k in ("name", "question", "answer", "golden_answer", "task_id")}
        for r in _real_world_rows(2)
    ]
    loaded = load_rows(_write_jsonl(tmp_path / "forget.json", rows))
    assert [(r["question"], r["answer"]) for r in loaded] == [(r["question"], r["answer"]) for r in rows]


def test_closer_look_flags_are_checked_before_the_model_loads(tmp_path, capsys):
    forget = _write_jsonl(tmp_path / "forget.json", _qa_rows())
    argv = ["eval", "--model", str(tmp_path / "no-model"), "--data", forget, "--out", str(tmp_path / "o")]
    assert main([*argv, "--metrics", "rouge-only"]) == 2
    assert "--metrics rouge-only: unknown" in capsys.readouterr().err
    bare = _write_jsonl(
        tmp_path / "bare.json",
        [{"question": q, "answer": a} for q, a in zip(QUESTIONS, ANSWERS, strict=True)],
    )
    argv[4] = bare
    assert main([*argv, "--metrics", "closer-look"]) == 2
    assert "no usable 'paraphrased_answer'" in capsys.readouterr().err
