"""Prompt templates and the label mask: every named template token by token against a hand-written
encoding, ``auto`` with four chat templates against the single-string encoding, the merge fallback, and a
model that keeps its retain answers when unlearned in the format it was trained in."""

from __future__ import annotations

import copy
import string

import pytest
import torch
import transformers
from helpers import FORGET, RETAIN
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

from asu.data import PaddingCollator
from asu.formatting import IGNORE_INDEX, answer_span, build_prompt, encode_prompt, encode_qa
from asu.metrics.text import rouge_l_recall
from asu.templates import TEMPLATE_NAMES, Template, describe_template, get_template, resolve_template

Q, A = FORGET[0]["question"], FORGET[0]["answer"]
LLAMA3_SPECIALS = [
    "<|begin_of_text|>",
    "<|end_of_text|>",
    "<|start_header_id|>",
    "<|end_header_id|>",
    "<|eot_id|>",
]


# ---- tokenizers --------------------------------------------------------------------------------------------


def char_tokenizer(specials=("<s>", "</s>"), bos="<s>", eos="</s>", add_bos=True, merges=()):
    """One token per character (printable ASCII and newline), ``specials`` as single tokens; ``merges``
    (pairs of strings) joins those pairs, to make a tokenizer that merges across a boundary."""
    chars = list(dict.fromkeys(string.printable))
    vocab = {t: i for i, t in enumerate(["<unk>", *specials, *chars, *(a + b for a, b in merges)])}
    tok = Tokenizer(models.BPE(vocab, list(merges), unk_token="<unk>"))
    tok.decoder = decoders.Fuse()
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, vocab[bos])]
        )
    fast = transformers.PreTrainedTokenizerFast(
        tokenizer_object=tok, bos_token=bos, eos_token=eos, unk_token="<unk>"
    )
    fast.add_special_tokens({"additional_special_tokens": [s for s in specials if s not in (bos, eos)]})
    return fast


def bpe_tokenizer(specials, bos, eos, add_bos=True, chat_template=None):
    """A byte-level BPE (GPT-2 / Llama-3 style) trained on the test rows and template text."""
    texts = [r["question"] + " " + r["answer"] for r in FORGET + RETAIN] * 3
    texts += ["Question: Answer: [INST] [/INST] user assistant model system You are a helpful assistant."] * 3
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=400, special_tokens=list(specials), initial_alphabet=pre_tokenizers.ByteLevel.alphabet()
    )
    tok.train_from_iterator(texts, trainer=trainer)
    if add_bos:
        tok.post_processor = processors.TemplateProcessing(
            single=f"{bos} $A", special_tokens=[(bos, tok.token_to_id(bos))]
        )
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, bos_token=bos, eos_token=eos)
    fast.add_special_tokens({"additional_special_tokens": [s for s in specials if s not in (bos, eos)]})
    fast.chat_template = chat_template
    return fast


def expect(tok, *segments):
    """Hand-written encoding: a segment naming a special token is that token, any other one character each."""
    ids = []
    for seg in segments:
        if seg in tok.all_special_tokens:
            ids.append(tok.convert_tokens_to_ids(seg))
        else:
            ids += tok.convert_tokens_to_ids(list(seg))
    return ids


def check(tok, template, ids_want, answer_from, end_token=None):
    """encode_qa gives ``ids_want``, labels exactly ``ids_want[answer_from:]`` and the generation prompt is
    ``ids_want[:answer_from]``."""
    enc = encode_qa(tok, Q, A, template=template)
    assert tok.convert_ids_to_tokens(enc["input_ids"]) == tok.convert_ids_to_tokens(ids_want)
    assert enc["labels"] == [IGNORE_INDEX] * answer_from + ids_want[answer_from:]
    assert encode_prompt(tok, Q, template=template) == ids_want[:answer_from]
    if end_token is not None:
        assert enc["labels"][-1] == tok.convert_tokens_to_ids(end_token)


# ---- named templates, token by token -----------------------------------------------------------------------


def test_tofu_llama2_hand_written():
    tok = char_tokenizer()
    prompt = expect(tok, "<s>", f"[INST] {Q} [/INST]")
    check(tok, "tofu-llama2", prompt + expect(tok, A, "</s>"), len(prompt), "</s>")
    # A system prompt goes into Llama-2's <<SYS>> block of the first turn.
    prompt = expect(tok, "<s>", f"[INST] <<SYS>>\nbe brief\n<</SYS>>\n\n{Q} [/INST]")
    check(
        tok,
        get_template("tofu-llama2", system_prompt="be brief"),
        prompt + expect(tok, A, "</s>"),
        len(prompt),
    )


@pytest.mark.parametrize("name", ["plain", "phi"])
def test_plain_hand_written(name):
    tok = char_tokenizer()
    prompt = expect(tok, "<s>", f"Question: {Q}\nAnswer:")
    # The space after "Answer:" is what the model generates first: it starts the labels.
    check(tok, name, prompt + expect(tok, " " + A, "</s>"), len(prompt), "</s>")


@pytest.mark.parametrize("eos", ["<|eot_id|>", "<|end_of_text|>"])
def test_llama3_hand_written(eos):
    """open-unlearning's Llama-3.x settings; the labels end at <|eot_id|> whether or not it is the EOS."""
    tok = char_tokenizer(LLAMA3_SPECIALS, bos="<|begin_of_text|>", eos=eos, add_bos=False)
    h, e, t = "<|start_header_id|>", "<|end_header_id|>", "<|eot_id|>"
    system = (
        "\n\nCutting Knowledge Date: December 2023\nToday Date: 10 Apr 2025\n\nYou are a helpful assistant."
    )
    prompt = expect(
        tok,
        "<|begin_of_text|>",
        h,
        "system",
        e,
        system,
        t,
        h,
        "user",
        e,
        "\n\n" + Q,
        t,
        h,
        "assistant",
        e,
        "\n\n",
    )
    check(tok, "llama3", prompt + expect(tok, A, t), len(prompt), t)


def test_template_names_and_files(tmp_path):
    assert set(TEMPLATE_NAMES) == {"auto", "plain", "phi", "tofu-llama2", "llama3"}
    with pytest.raises(ValueError, match="unknown template 'llama9'"):
        get_template("llama9")
    with pytest.raises(ValueError, match="does not exist"):
        get_template(str(tmp_path / "missing.jinja"))
    (tmp_path / "empty.jinja").write_text("  \n")
    with pytest.raises(ValueError, match="is empty"):
        get_template(tmp_path / "empty.jinja")
    with pytest.raises(TypeError):
        get_template(3)


def test_jinja_file_gets_chat_template_variables(tmp_path):
    """A user file is rendered like a chat template: messages, add_generation_prompt, bos/eos tokens."""
    path = tmp_path / "qa.jinja"
    path.write_text(
        "{{ bos_token }}{% for m in messages %}{% if m.role == 'system' %}<{{ m.content }}>"
        "{% elif m.role == 'user' %}Q: {{ m.content }}\n"
        "{% else %}A: {{ m.content }}{{ eos_token }}{% endif %}"
        "{% endfor %}{% if add_generation_prompt %}A: {% endif %}"
    )
    tok = char_tokenizer()
    template = get_template(str(path), system_prompt="sys")
    assert build_prompt(tok, Q, template) == f"<s><sys>Q: {Q}\nA: "
    prompt = expect(tok, "<s>", f"<sys>Q: {Q}\nA: ")
    check(tok, template, prompt + expect(tok, A, "</s>"), len(prompt), "</s>")
    record = describe_template(template, tok)
    assert record["name"] == "file" and record["path"] == str(path) and record["system_prompt"] == "sys"
    assert record["source"] == path.read_text() and len(record["sha256"]) == 64


# ---- auto: the tokenizer's own chat template ---------------------------------------------------------------

# Four common shapes: ChatML with a default system prompt and a newline after the end of turn; Zephyr, which
# writes EOS as text; Mistral / Llama-2 chat, with BOS in the template and a space before the trimmed answer;
# Gemma, whose end-of-turn token is not the EOS.
CHAT_TEMPLATES = {
    "chatml": (
        ["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
        "<|endoftext|>",
        "<|im_end|>",
        "<|im_end|>",
        "{% for m in messages %}{% if loop.first and m.role != 'system' %}<|im_start|>system\nYou are a "
        "helpful assistant.<|im_end|>\n{% endif %}<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>\n"
        "{% endfor %}{% if add_generation_prompt %}<|im_start|>assistant\n{% endif %}",
    ),
    "zephyr": (
        ["<s>", "</s>", "<|user|>", "<|assistant|>"],
        "<s>",
        "</s>",
        "</s>",
        "{% for m in messages %}<|{{ m.role }}|>\n{{ m.content }}{{ eos_token }}\n{% endfor %}"
        "{% if add_generation_prompt %}<|assistant|>\n{% endif %}",
    ),
    "mistral": (
        ["<s>", "</s>"],
        "<s>",
        "</s>",
        "</s>",
        "{{ bos_token }}{% for m in messages %}{% if m.role == 'user' %}[INST] {{ m.content }} [/INST]"
        "{% else %}{{ ' ' + m.content | trim + eos_token }}{% endif %}{% endfor %}",
    ),
    "gemma": (
        ["<bos>", "<eos>", "<start_of_turn>", "<end_of_turn>"],
        "<bos>",
        "<eos>",
        "<end_of_turn>",
        "{{ bos_token }}{% for m in messages %}"
        "<start_of_turn>{{ 'model' if m.role == 'assistant' else m.role }}\n"
        "{{ m.content | trim }}<end_of_turn>\n{% endfor %}"
        "{% if add_generation_prompt %}<start_of_turn>model\n{% endif %}",
    ),
}


@pytest.mark.parametrize("kind", list(CHAT_TEMPLATES))
def test_auto_uses_the_chat_template(kind):
    specials, bos, eos, end, source = CHAT_TEMPLATES[kind]
    tok = bpe_tokenizer(specials, bos, eos, add_bos=False, chat_template=source)
    for row in FORGET + RETAIN:
        q, a = row["question"], row["answer"]
        full = tok.apply_chat_template(
            [{"role": "user", "content": q}, {"role": "assistant", "content": a}], tokenize=False
        )
        enc = encode_qa(tok, q, a)  # template None = auto
        single = tok(full, add_special_tokens=False)["input_ids"]
        assert (
            enc["input_ids"] == single
        )  # one string, tokenised once; nothing appended (the turn has an end)
        labelled = [i for i, x in enumerate(enc["labels"]) if x != IGNORE_INDEX]
        start, stop = labelled[0], labelled[-1] + 1
        assert labelled == list(range(start, stop))  # one contiguous span
        assert enc["labels"][start:stop] == single[start:stop]
        prompt = encode_prompt(tok, q)
        assert prompt == single[:start]  # the generation prompt is exactly the unlabelled prefix
        assert tok.convert_ids_to_tokens(single[stop - 1]) == end  # the span ends with the end of turn
        assert tok.decode(single[start : stop - 1]).strip() == a.strip()  # and holds exactly the answer
    record = describe_template(None, tok)
    assert record["name"] == "auto" and record["resolved"] == "chat_template" and len(record["sha256"]) == 64


def test_auto_without_chat_template_is_plain(tok):
    assert resolve_template("auto", tok).source == get_template("plain").source
    assert encode_qa(tok, Q, A) == encode_qa(tok, Q, A, template="plain")
    assert describe_template("auto", tok)["resolved"] == "plain"
    # A system prompt given to auto survives the fallback.
    assert resolve_template(get_template("auto", system_prompt="be brief"), tok).system_prompt == "be brief"


def test_system_prompt_reaches_the_chat_template():
    specials, bos, eos, _, source = CHAT_TEMPLATES["chatml"]
    tok = bpe_tokenizer(specials, bos, eos, add_bos=False, chat_template=source)
    text = build_prompt(tok, Q, get_template("auto", system_prompt="Answer briefly."))
    assert text.startswith("<|im_start|>system\nAnswer briefly.<|im_end|>\n<|im_start|>user\n")


# ---- boundaries --------------------------------------------------------------------------------------------


def test_merge_across_the_boundary_uses_offsets():
    """A tokenizer with the merge ": " + "t": the prompt "...Answer:" is no token prefix of "...Answer: the";
    the offsets find the merged token, which starts the labels."""
    tok = char_tokenizer(merges=[(":", " "), (": ", "t")])
    enc = encode_qa(tok, Q, A, template="plain")
    tokens = tok.convert_ids_to_tokens(enc["input_ids"])
    start = next(i for i, x in enumerate(enc["labels"]) if x != IGNORE_INDEX)
    assert tokens[start] == ": t" and tokens[start - 1] == "r"  # "...Answe r | : t he ..."
    assert enc["input_ids"] == tok(build_prompt(tok, Q, "plain") + " " + A)["input_ids"] + [tok.eos_token_id]
    assert encode_prompt(tok, Q, template="plain") != enc["input_ids"][:start]  # merged: no exact prefix
    assert tok.decode(enc["labels"][start:]) == ": " + A + "</s>"


class SlowView:
    """A fast tokenizer that claims to be slow (no offsets), to reach the last-resort error."""

    is_fast = False

    def __init__(self, tok):
        self._tok = tok

    def __getattr__(self, name):
        return getattr(self._tok, name)

    def __call__(self, text, **kwargs):
        kwargs.pop("return_offsets_mapping", None)
        return self._tok(text, **kwargs)


def test_slow_tokenizer_merge_is_an_error_naming_the_row():
    slow = SlowView(char_tokenizer(merges=[(":", " ")]))
    with pytest.raises(ValueError, match="merges the prompt's last characters") as e:
        encode_qa(slow, Q, A, template="plain")
    assert Q[:30] in str(e.value)
    # Without a merge a slow tokenizer is fine: the prompt is a token prefix.
    assert encode_qa(SlowView(char_tokenizer()), Q, A, template="plain") == encode_qa(
        char_tokenizer(), Q, A, template="plain"
    )


def test_unknown_word_spanning_the_boundary_is_found(tok):
    """Word-level test tokenizer: "[/INST]the" is one unknown word. Prompt and full ids agree (<unk> both),
    but the offsets show that token holds the answer's first word, so it is labelled."""
    enc = encode_qa(tok, Q, A, template="tofu-llama2")
    start = next(i for i, x in enumerate(enc["labels"]) if x != IGNORE_INDEX)
    assert enc["input_ids"][start] == tok.unk_token_id and enc["labels"][-1] == tok.eos_token_id


def test_truncation_and_errors():
    tok = char_tokenizer()
    prompt = len(encode_prompt(tok, Q, template="tofu-llama2"))
    short = encode_qa(tok, Q, A, max_length=prompt + 3, template="tofu-llama2")
    assert len(short["input_ids"]) == prompt + 3 and short["labels"][prompt:] == short["input_ids"][prompt:]
    with pytest.raises(ValueError, match="leaves no room"):
        encode_qa(tok, Q, A, max_length=prompt, template="tofu-llama2")
    bad = Template("bad", "{{ messages[-1].content }}", add_special_tokens=True)  # prompt is not a prefix
    with pytest.raises(ValueError, match="not the start of the rendered conversation"):
        encode_qa(tok, Q, A, template=bad)
    no_answer = Template("no-answer", "{% for m in messages %}{{ m.role }}{% endfor %}")
    with pytest.raises(ValueError, match="does not appear"):
        encode_qa(tok, Q, A, template=no_answer)
    ids, start, end = answer_span(tok, Q, A, "plain")
    assert end == len(ids) and ids[-1] == tok.eos_token_id and start < end


# ---- a model keeps what it was trained on when unlearned in the same format --------------------------------


def _greedy(model, tok, question, template, max_new=40) -> str:
    prompt = torch.tensor([encode_prompt(tok, question, template=template)])
    with torch.no_grad():
        out = model.generate(
            prompt, max_new_tokens=max_new, do_sample=False, eos_token_id=tok.eos_token_id, pad_token_id=0
        )
    return tok.decode(out[0, prompt.shape[1] :], skip_special_tokens=True)


def _nll(model, tok, rows, template) -> float:
    losses = []
    for r in rows:
        enc = encode_qa(tok, r["question"], r["answer"], template=template)
        batch = {k: torch.tensor([v]) for k, v in enc.items()}
        with torch.no_grad():
            losses.append(model(**batch).loss.item())
    return sum(losses) / len(losses)


def _memorise_then_unlearn(forget, retain, template, unlearn_epochs):
    """Train a tiny Llama on ``forget + retain`` in ``template`` until it answers every question exactly,
    then unlearn ``forget`` with ASU in the same template; returns the model before, the result and the
    tokenizer."""
    from asu.demo.tiny import seeded_llama, train_tokenizer
    from asu.unlearn import UnlearnConfig, unlearn

    rows = forget + retain
    tok = train_tokenizer([f"[INST] {r['question']} [/INST]{r['answer']}" for r in rows], 320)
    model = seeded_llama(
        0, vocab_size=len(tok), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=128,
        bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id,
        attn_implementation="sdpa",
    )  # fmt: skip
    examples = [encode_qa(tok, r["question"], r["answer"], template=template) for r in rows]
    batch = PaddingCollator(pad_token_id=tok.pad_token_id).collate(examples)
    batch = {k: batch[k] for k in ("input_ids", "labels", "attention_mask")}
    torch.manual_seed(0)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-2)
    model.train()
    for _ in range(300):
        loss = model(**batch).loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        if loss.item() < 0.02:
            break
    model.eval()
    assert all(_greedy(model, tok, r["question"], template) == r["answer"] for r in rows)  # memorised
    before = copy.deepcopy(model)
    cfg = UnlearnConfig(
        template=template, temperature=3.0, lam=1.0, lr=2e-3, epochs=unlearn_epochs, batch_size=len(forget),
        grad_accum=1, warmup_epochs=0, max_length=96, progress=False,
    )  # fmt: skip
    return before, unlearn(model, tok, forget, retain, cfg), tok


def _check_kept(before, result, tok, forget, retain, template):
    # The format matters: in another format the same retain answers are far from what the model learned...
    assert _nll(before, tok, retain, template) < 0.05 < 1.0 < _nll(before, tok, retain, "plain")
    # ...and in its own, the retain steps start from an already-fit retain set: nothing to re-teach.
    assert result.history[0]["retain_loss"] < 0.05
    # After unlearning the retain answers are still the model's: low NLL, far below the forget rows', and the
    # greedy answers near-exact. Not all exact: the retain rows share words with the forget rows, and on
    # some CPUs one answer drifts by a word or two after 4 epochs at lambda 1 (measured: recall 0.71 for
    # one of three, retain NLL 0.08 against 1.2 on the forget rows).
    assert _nll(result.model, tok, retain, template) < 0.5 < _nll(result.model, tok, forget, template)
    answers = [_greedy(result.model, tok, r["question"], template) for r in retain]
    recall = [rouge_l_recall(r["answer"], a) for r, a in zip(retain, answers, strict=True)]
    assert sum(recall) / len(recall) > 0.8 and min(recall) > 0.5, answers
    assert _nll(result.model, tok, forget, template) > _nll(before, tok, forget, template)  # forget moved


def test_unlearning_in_the_training_format_keeps_retain_answers(reference_backend, one_thread):
    before, result, tok = _memorise_then_unlearn(FORGET, RETAIN, "tofu-llama2", unlearn_epochs=4)
    _check_kept(before, result, tok, FORGET, RETAIN, "tofu-llama2")
