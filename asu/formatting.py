"""How a question/answer pair becomes tokens: one format shared by training, unlearning and evaluation.

A tokenizer with a chat template gets the question as a user turn (``add_generation_prompt=True``); one
without gets the plain ``"Question: {question}\\nAnswer:"`` prompt. The answer follows the prompt (after a
space in the plain format) and ends with EOS. Prompt and answer are tokenized separately and joined, so
the boundary between them is exact and the label mask covers the prompt precisely.
"""

from __future__ import annotations

from typing import Any

PLAIN_PROMPT = "Question: {question}\nAnswer:"
IGNORE_INDEX = -100


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def build_prompt(tokenizer: Any, question: str) -> str:
    """The text the model sees before the answer."""
    if has_chat_template(tokenizer):
        return tokenizer.apply_chat_template(
            [{"role": "user", "content": question}], tokenize=False, add_generation_prompt=True
        )
    return PLAIN_PROMPT.format(question=question)


def encode_prompt(tokenizer: Any, question: str) -> list[int]:
    """Token ids of the prompt, BOS included when the tokenizer uses one."""
    text = build_prompt(tokenizer, question)
    # A chat template writes its own special tokens into the text.
    ids = tokenizer(text, add_special_tokens=not has_chat_template(tokenizer))["input_ids"]
    return list(ids)


def encode_answer(tokenizer: Any, answer: str) -> list[int]:
    """Token ids of the answer followed by EOS."""
    text = answer if has_chat_template(tokenizer) else " " + answer
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token_id; answers must end with EOS")
    return ids + [tokenizer.eos_token_id]


def encode_qa(
    tokenizer: Any, question: str, answer: str, max_length: int | None = None
) -> dict[str, list[int]]:
    """``input_ids`` of prompt + answer + EOS and ``labels`` with the prompt masked (``-100``).

    Sequences longer than ``max_length`` lose the end of the answer; a prompt that leaves no room for a
    single answer token is an error, since the row would teach nothing.
    """
    prompt = encode_prompt(tokenizer, question)
    target = encode_answer(tokenizer, answer)
    if max_length is not None:
        if len(prompt) >= max_length:
            raise ValueError(
                f"the prompt is {len(prompt)} tokens, max_length={max_length} leaves no room for the answer: "
                f"{question[:80]!r}"
            )
        target = target[: max_length - len(prompt)]
    return {"input_ids": prompt + target, "labels": [IGNORE_INDEX] * len(prompt) + target}
