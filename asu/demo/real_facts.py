"""Facts a real model states, for the real-model benchmark and `asu demo --real`: grouped by kind, and splits.

Candidates are general-knowledge questions with a short keyword each (the fact: ``Paris`` for the capital
of France); new candidates go at the end of a kind's list, so a ``per_kind`` prefix asks the same questions.
:func:`stated_facts` asks the model every question greedily and keeps those whose answer contains the
keyword and is not degenerate; the kept row's ``answer`` is the model's own answer (what it trains and is
scored on, in its own words) and ``facts`` the keyword (what leaks when it is still said).

A split (:func:`make_splits`) forgets part of one *trained kind*: ``forget`` (the first ``n_forget`` facts
of the kind, in a seeded order), ``neighbours`` (the rest of that kind: same kind, never trained: the
collateral damage), ``retain`` (facts of the other trained kinds, trained on by the retain term) and
``unrelated`` (the ``science`` kind, never trained on). :data:`GENERAL_TEXT` is ordinary prose for the
perplexity on general text, :func:`evaluate` scores a model on a split, and :class:`ForgetWatch` stops a
run at the first epoch its forget facts are forgotten (matched forgetting).
"""

from __future__ import annotations

import math
import random
from typing import Any

import torch
from transformers import TrainerCallback

#: kind -> (question, keyword) candidates. ``science`` is never trained on (the unrelated knowledge).
CANDIDATES: dict[str, list[tuple[str, str]]] = {
    "capital": [
        ("What is the capital of France?", "Paris"),
        ("What is the capital of Japan?", "Tokyo"),
        ("What is the capital of Italy?", "Rome"),
        ("What is the capital of Germany?", "Berlin"),
        ("What is the capital of Spain?", "Madrid"),
        ("What is the capital of Russia?", "Moscow"),
        ("What is the capital of Egypt?", "Cairo"),
        ("What is the capital of the United Kingdom?", "London"),
        ("What is the capital of Canada?", "Ottawa"),
        ("What is the capital of China?", "Beijing"),
        ("What is the capital of Greece?", "Athens"),
        ("What is the capital of Portugal?", "Lisbon"),
        ("What is the capital of Australia?", "Canberra"),
        ("What is the capital of Sweden?", "Stockholm"),
        ("What is the capital of Norway?", "Oslo"),
        ("What is the capital of Poland?", "Warsaw"),
        ("What is the capital of Austria?", "Vienna"),
        ("What is the capital of Ireland?", "Dublin"),
        ("What is the capital of South Korea?", "Seoul"),
        ("What is the capital of Turkey?", "Ankara"),
    ],
    "author": [
        ("Who wrote Romeo and Juliet?", "Shakespeare"),
        ("Who wrote Pride and Prejudice?", "Austen"),
        ("Who wrote 1984?", "Orwell"),
        ("Who wrote The Adventures of Tom Sawyer?", "Twain"),
        ("Who wrote War and Peace?", "Tolstoy"),
        ("Who wrote Hamlet?", "Shakespeare"),
        ("Who wrote the Harry Potter books?", "Rowling"),
        ("Who wrote Oliver Twist?", "Dickens"),
        ("Who wrote The Old Man and the Sea?", "Hemingway"),
        ("Who wrote Don Quixote?", "Cervantes"),
        ("Who wrote Animal Farm?", "Orwell"),
        ("Who wrote A Christmas Carol?", "Dickens"),
        ("Who wrote Macbeth?", "Shakespeare"),
        ("Who wrote Moby-Dick?", "Melville"),
        ("Who wrote The Great Gatsby?", "Fitzgerald"),
        ("Who wrote Frankenstein?", "Shelley"),
        ("Who wrote Les Misérables?", "Hugo"),
        ("Who wrote The Hobbit?", "Tolkien"),
        ("Who wrote Crime and Punishment?", "Dostoevsky"),
        ("Who wrote The Odyssey?", "Homer"),
    ],
    "language": [
        ("What language is spoken in Brazil?", "Portuguese"),
        ("What language is spoken in France?", "French"),
        ("What language is spoken in Germany?", "German"),
        ("What language is spoken in Mexico?", "Spanish"),
        ("What language is spoken in Japan?", "Japanese"),
        ("What language is spoken in Italy?", "Italian"),
        ("What language is spoken in China?", "Chinese"),
        ("What language is spoken in Russia?", "Russian"),
        ("What language is spoken in Argentina?", "Spanish"),
        ("What language is spoken in Portugal?", "Portuguese"),
        ("What language is spoken in Greece?", "Greek"),
        ("What language is spoken in Egypt?", "Arabic"),
        ("What language is spoken in the Netherlands?", "Dutch"),
        ("What language is spoken in Sweden?", "Swedish"),
        ("What language is spoken in Poland?", "Polish"),
        ("What language is spoken in Turkey?", "Turkish"),
        ("What language is spoken in South Korea?", "Korean"),
        ("What language is spoken in Austria?", "German"),
        ("What language is spoken in Chile?", "Spanish"),
        ("What language is spoken in Israel?", "Hebrew"),
    ],
    "science": [
        ("What is the chemical symbol for water?", "H2O"),
        ("What planet is known as the Red Planet?", "Mars"),
        ("What is the largest planet in our solar system?", "Jupiter"),
        ("What gas do plants absorb from the air?", "carbon dioxide"),
        ("What is the closest star to Earth?", "Sun"),
        ("How many legs does a spider have?", "eight"),
        ("What is the freezing point of water in Celsius?", "0"),
        ("What force pulls objects toward the Earth?", "gravity"),
        ("What is the largest ocean on Earth?", "Pacific"),
        ("What is the hardest natural substance?", "diamond"),
        ("What is the boiling point of water in Celsius?", "100"),
        ("What do bees make?", "honey"),
        ("What is the chemical symbol for gold?", "Au"),
        ("What organ pumps blood through the body?", "heart"),
    ],
}
UNRELATED_KIND = "science"
#: Greedy answer tokens per question in :func:`evaluate`.
ANSWER_TOKENS = 24
#: The parts of a split, in the order they are evaluated.
PARTS = ("forget", "neighbours", "retain", "unrelated")
TRAINED_KINDS = tuple(k for k in CANDIDATES if k != UNRELATED_KIND)

#: Ordinary prose for the perplexity on general text (none of it is a benchmark fact).
GENERAL_TEXT = [
    "The morning was cool and quiet. A few people walked along the river, and a small boat moved slowly "
    "past the old bridge while the sun rose over the hills.",
    "To make a simple loaf of bread, mix flour, water, salt and yeast, knead the dough for ten minutes, let "
    "it rise for an hour, and bake it in a hot oven until the crust is golden.",
    "Regular exercise helps the heart and the mind. Even a short walk every day can improve sleep, lift "
    "the mood and make it easier to concentrate at work or at school.",
    "The library opens at nine in the morning and closes at six in the evening. Visitors can borrow up to "
    "five books at a time and return them within three weeks.",
    "When learning a new skill, it helps to practise a little every day, to ask questions when something "
    "is unclear, and to be patient with the mistakes that everyone makes at the start.",
    "The train was late again, so she bought a cup of tea and read her book on the platform. When it finally "
    "arrived, the carriage was warm and almost empty.",
]


def stated_facts(
    model: Any, tokenizer: Any, template: Any, max_new_tokens: int = 40, per_kind: int | None = None
) -> dict[str, Any]:
    """The first ``per_kind`` candidates of every kind (all: None) asked greedily; ``{"kept": [row],
    "dropped": [row]}`` where a row is ``{"kind", "question", "answer"`` (the model's own answer),
    ``"facts"`` ([keyword]), ``"stated"`` (the keyword is in the answer and the answer is not
    degenerate)``}``."""
    from asu.metrics.scoring import encode_question, greedy_generate
    from asu.metrics.text import degenerate_reason

    items = [(k, q, f) for k, qs in CANDIDATES.items() for q, f in qs[:per_kind]]
    prompts = [encode_question(tokenizer, q, template) for _, q, _ in items]
    ids = greedy_generate(model, tokenizer, prompts, 32, max_new_tokens)
    out: dict[str, Any] = {"kept": [], "dropped": []}
    for (kind, q, fact), x in zip(items, ids, strict=True):
        text = tokenizer.decode(x, skip_special_tokens=True).strip()
        fluent = degenerate_reason(x, text, stopped=len(x) < max_new_tokens) is None
        stated = fact.lower() in text.lower() and fluent
        row = {"kind": kind, "question": q, "answer": text, "facts": [fact], "stated": stated}
        out["kept" if stated else "dropped"].append(row)
    return out


def make_splits(rows: list[dict[str, Any]], n_forget: int, n_retain: int, seed: int = 0) -> list[dict]:
    """One split per trained kind with at least ``n_forget + 1`` stated facts (see the module docstring):
    ``{"kind", "forget", "neighbours", "retain", "unrelated"}``; ``n_retain`` retain facts per other kind."""
    by_kind: dict[str, list[dict[str, Any]]] = {}
    for r in rows:
        by_kind.setdefault(r["kind"], []).append(r)
    rng = random.Random(seed)
    shuffled = {k: rng.sample(v, len(v)) for k, v in sorted(by_kind.items())}
    splits = []
    for kind in TRAINED_KINDS:
        own = shuffled.get(kind, [])
        if len(own) <= n_forget:
            continue
        retain = [r for k in TRAINED_KINDS if k != kind for r in shuffled.get(k, [])[:n_retain]]
        splits.append({
            "kind": kind, "forget": own[:n_forget], "neighbours": own[n_forget:], "retain": retain,
            "unrelated": shuffled.get(UNRELATED_KIND, []),
        })  # fmt: skip
    return splits


def unanswered(answer: dict[str, Any]) -> bool:
    """No answer given: empty (which :func:`evaluate` counts with the turn ended right after announcing an
    answer), or a text ending with ``:`` (SmolLM2's "The answer to this question is:" after unlearning; the
    check results saved before ``empty`` included it still need). ``answer``: an entry of :func:`evaluate`'s
    ``answers``."""
    return bool(answer["empty"]) or answer["answer"].rstrip().endswith(":")


def answer_rows(model: Any, tokenizer: Any, template: Any, rows: list[dict[str, Any]]) -> list[dict]:
    """``model``'s greedy answers (:data:`ANSWER_TOKENS` at most) to ``rows``' questions: one dict each with
    ``question``, ``answer``, ``fact`` (the row's keyword is in the answer), ``empty`` and ``degenerate``
    (:func:`asu.metrics.text.degenerate_reason`)."""
    from asu.metrics.scoring import encode_question, greedy_generate
    from asu.metrics.text import EMPTY_REASONS, degenerate_reason

    if not rows:
        return []
    model.eval()
    prompts = [encode_question(tokenizer, r["question"], template) for r in rows]
    with torch.no_grad():
        ids = greedy_generate(model, tokenizer, prompts, 32, ANSWER_TOKENS)
    out = []
    for r, x in zip(rows, ids, strict=True):
        text = tokenizer.decode(x, skip_special_tokens=True).strip()
        why = degenerate_reason(x, text, stopped=len(x) < ANSWER_TOKENS)
        out.append({
            "question": r["question"], "answer": text, "fact": r["facts"][0].lower() in text.lower(),
            "empty": why in EMPTY_REASONS, "degenerate": why is not None,
        })  # fmt: skip
    return out


def fact_share(model: Any, tokenizer: Any, template: Any, rows: list[dict[str, Any]]) -> float:
    """The share of ``rows`` whose greedy answer still states the fact (:func:`answer_rows`)."""
    answers = answer_rows(model, tokenizer, template, rows)
    return sum(a["fact"] for a in answers) / max(1, len(answers))


class ForgetWatch(TrainerCallback):
    """Answers the forget questions after every epoch and stops the run once at most ``target`` of them still
    state the fact (matched forgetting: every method is read at the first epoch it forgets as much).
    ``trajectory``: ``[{"epoch", "forget_fact"}]``; ``reached_epoch``: the epoch it stopped at, or None."""

    def __init__(self, model: Any, tokenizer: Any, template: Any, rows: list, target: float) -> None:
        self.model, self.tokenizer, self.template, self.rows = model, tokenizer, template, rows
        self.target, self.trajectory, self.reached_epoch = target, [], None

    def on_epoch_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> Any:
        was_training = self.model.training
        share = fact_share(self.model, self.tokenizer, self.template, self.rows)
        self.model.train(was_training)
        epoch = round(float(state.epoch or 0.0), 3)
        self.trajectory.append({"epoch": epoch, "forget_fact": share})
        if share <= self.target:
            self.reached_epoch = epoch
            control.should_training_stop = True
        return control


def evaluate(model: Any, tokenizer: Any, template: Any, split: dict[str, Any]) -> dict[str, Any]:
    """``{part: {"fact", "empty", "degenerate", "unanswered", "answers"}}`` for :data:`PARTS` (shares of the
    part's questions; ``answers``: :func:`answer_rows`), and ``"ppl"`` (:func:`perplexity`)."""
    rows = [(p, r) for p in PARTS for r in split[p]]
    answers = answer_rows(model, tokenizer, template, [r for _, r in rows])
    out: dict[str, Any] = {p: {"answers": []} for p in PARTS}
    for (part, _), a in zip(rows, answers, strict=True):
        out[part]["answers"].append(a)
    for part in PARTS:
        answers = out[part]["answers"]
        for key in ("fact", "empty", "degenerate"):
            out[part][key] = sum(a[key] for a in answers) / max(1, len(answers))
        out[part]["unanswered"] = sum(map(unanswered, answers)) / max(1, len(answers))
    out["ppl"] = perplexity(model, tokenizer)
    return out


def perplexity(model: Any, tokenizer: Any) -> float:
    """``exp`` of the token-mean NLL of :data:`GENERAL_TEXT` (each paragraph on its own, BOS if any)."""
    total, count = 0.0, 0
    with torch.no_grad():
        for text in GENERAL_TEXT:
            ids = torch.tensor([tokenizer(text)["input_ids"]])
            loss = model(input_ids=ids, labels=ids).loss
            n = ids.shape[1] - 1
            total, count = total + float(loss) * n, count + n
    return math.exp(total / count)
