"""MUSE's raw-text evaluation settings: VerbMem and KnowMem prompts, lengths and stop words.

* **VerbMem**: the model is given the first ``l`` tokens of a forget document and greedily continues it for
  up to 128 new tokens; the score is the ROUGE-L F1 of the continuation against the document's true
  continuation. MUSE ships its VerbMem excerpts already split (``prompt``, ``gt``), which are used as they
  are; a raw document (``text``) is split here at ``l = 32`` tokens, with the true continuation cut at 128
  tokens (MUSE's ``metrics/verbmem.py`` cuts the reference to ``max_new_tokens`` tokens).
* **KnowMem**: questions about the forget (or retain) documents, asked after few-shot examples in MUSE's
  format ``Question: {q}\\nAnswer: {a}\\n\\n``; up to 32 new tokens, cut at the first stop word; ROUGE-L F1
  against the answer.
* **PrivLeak**: min-k% (k = 0.4) membership inference between forget and holdout documents, every token of a
  document but the first scored (:mod:`asu.metrics.privacy`).

ROUGE uses the stemmer, as open-unlearning's MUSE configs do (MUSE's own code does not stem).
"""

from __future__ import annotations

from collections.abc import Sequence

VERBMEM_PREFIX_TOKENS = 32
VERBMEM_MAX_NEW_TOKENS = 128
KNOWMEM_MAX_NEW_TOKENS = 32
KNOWMEM_STOPWORDS = ("\n\n", "\nQuestion", "Question:")
DOCUMENT_MAX_TOKENS = 2048


def knowmem_prompt(question: str, examples: Sequence[tuple[str, str]] = ()) -> str:
    """MUSE's few-shot prompt: ``Question: {q_i}\\nAnswer: {a_i}\\n\\n`` per example, then
    ``Question: {question}\\nAnswer: `` (the format of open-unlearning's Llama-2 base-model template too)."""
    shots = "".join(f"Question: {q}\nAnswer: {a}\n\n" for q, a in examples)
    return shots + f"Question: {question}\nAnswer: "


def cut_at_stopwords(text: str, stopwords: Sequence[str]) -> str:
    """``text`` up to the first occurrence of each stop word in turn, stripped (open-unlearning's cut)."""
    for word in stopwords:
        if word and word in text:
            text = text.split(word)[0]
    return text.strip()
