"""How a question/answer pair becomes tokens: one format shared by training, unlearning and evaluation.

A template (:mod:`asu.templates`; default ``auto``: the tokenizer's chat template, else
``Question: {q}\\nAnswer: {a}``) renders the whole conversation to **one** string, which is tokenised
**once**: these are the tokens a model fine-tuned on the format has seen. The generation prompt is the same
conversation without the assistant turn, rendered with the template's generation prompt; it must be the start
of the full text. The label mask then marks

    every token after the generation prompt (the assistant's content, with any whitespace the template puts
    before it) through the first special token after the content: the end of the turn (EOS,
    ``<|eot_id|>``, ``<|im_end|>``, ...). When no special token follows the content (``plain``,
    ``tofu-llama2``), the tokenizer's EOS is appended and labelled.

Everything before (system prompt, question, template tags) is ``-100``, and so is anything the template
writes after the end-of-turn token (a trailing newline). So the labels are exactly what a model must generate
after the generation prompt, and generation and training see the same prefix.

The boundary is found exactly, never guessed: the generation prompt is tokenised on its own and must be a
token prefix of the full encoding; where the tokenizer merges across the boundary (a BPE token spanning the
prompt's last characters and the answer's first) the offsets mapping of the full encoding gives the first
token reaching past the prompt, and that merged token starts the labels. When offsets exist, the prefix answer
is checked against them (equal ids can hide an unknown-word token spanning the boundary). A tokenizer that
offers neither (a slow tokenizer with a merging boundary) is an error naming the question, never a silent
misalignment.

:func:`encode_prompt` returns the generation prompt's tokens: a token prefix of :func:`encode_qa`'s
``input_ids`` unless the tokenizer merges across the boundary.
"""

from __future__ import annotations

from typing import Any

from asu.templates import Template, answer_end, has_chat_template, resolve_template

__all__ = [
    "IGNORE_INDEX",
    "PLAIN_PROMPT",
    "encode_qa",
    "encode_prompt",
    "build_prompt",
    "answer_span",
    "encode_answer",
    "has_chat_template",
]

PLAIN_PROMPT = "Question: {question}\nAnswer:"
IGNORE_INDEX = -100

TemplateSpec = Template | str | None


def build_prompt(tokenizer: Any, question: str, template: TemplateSpec = None) -> str:
    """The text the model sees before the answer (the template's generation prompt)."""
    return resolve_template(template, tokenizer).render(tokenizer, question)


def encode_prompt(tokenizer: Any, question: str, template: TemplateSpec = None) -> list[int]:
    """Token ids of the generation prompt, BOS included when the format has one."""
    tpl = resolve_template(template, tokenizer)
    text = tpl.render(tokenizer, question)
    return list(tokenizer(text, add_special_tokens=tpl.add_special_tokens)["input_ids"])


def _special_ids(tokenizer: Any) -> set[int]:
    ids = set(getattr(tokenizer, "all_special_ids", []) or [])
    for token_id, token in (getattr(tokenizer, "added_tokens_decoder", None) or {}).items():
        if getattr(token, "special", False):
            ids.add(int(token_id))
    return ids


def answer_span(
    tokenizer: Any, question: str, answer: str, template: TemplateSpec = None
) -> tuple[list[int], int, int]:
    """``(input_ids, start, end)``: the conversation's token ids and the labelled span ``[start, end)``
    (what follows the generation prompt through the end-of-turn token; see the module docstring).
    ``input_ids`` is the single-string encoding, with the tokenizer's EOS appended when no special token
    follows the content.

    Raises ValueError when the boundary cannot be located exactly.
    """
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token_id; answers must end with EOS")
    tpl = resolve_template(template, tokenizer)
    full = tpl.render(tokenizer, question, answer)
    prompt = tpl.render(tokenizer, question)
    content_end = answer_end(tpl, full, prompt, answer, question)
    at = len(prompt)
    fast = bool(getattr(tokenizer, "is_fast", False))
    enc = tokenizer(full, add_special_tokens=tpl.add_special_tokens, return_offsets_mapping=fast)
    ids = list(enc["input_ids"])
    offsets = [tuple(o) for o in enc["offset_mapping"]] if fast else None
    head = list(tokenizer(prompt, add_special_tokens=tpl.add_special_tokens)["input_ids"])
    prefix = len(head) < len(ids) and ids[: len(head)] == head
    if offsets is not None:
        # The offsets are the authority: equal ids can still hide a token that swallowed answer characters
        # (an unknown-word token spanning the boundary).
        exact = prefix and _boundary_agrees(offsets, len(head), at)
        start = len(head) if exact else _first_token_after(offsets, at)
    elif prefix:
        start = len(head)
    else:
        raise ValueError(
            "the tokenizer merges the prompt's last characters with the answer's first, and a slow "
            "tokenizer gives no offsets to find the boundary; use a fast tokenizer or a template whose "
            f"answer starts at a token boundary (question {question[:60]!r})"
        )
    if start >= len(ids):
        raise ValueError(f"no token follows the generation prompt (question {question[:60]!r})")
    # The turn ends at the first special token after the content (an unknown-word token is no turn end; a
    # token the tokenizer's post-processor adds has the empty offsets (0, 0)).
    unknown = getattr(tokenizer, "unk_token_id", None)
    special = (_special_ids(tokenizer) | {tokenizer.eos_token_id}) - {unknown}
    end = next(
        (
            i + 1
            for i in range(start + 1, len(ids))
            if ids[i] in special and (offsets is None or offsets[i][0] >= content_end or offsets[i][1] == 0)
        ),
        None,
    )
    if end is None:
        ids.append(tokenizer.eos_token_id)
        end = len(ids)
    return ids, start, end


def _boundary_agrees(offsets: list[tuple[int, int]], start: int, at: int) -> bool:
    """No prompt token reaches past character ``at`` and the first answer token does (empty spans, which
    post-processors and offset trimming give, are ignored)."""
    before = all(hi <= at for lo, hi in offsets[:start] if hi > lo)
    lo, hi = offsets[start]
    return before and (hi > at or hi == lo)


def _first_token_after(offsets: list[tuple[int, int]], at: int) -> int:
    """Index of the first token whose characters reach past ``at`` (the first after the prompt)."""
    for i, (lo, hi) in enumerate(offsets):
        if hi > at and hi > lo:
            return i
    return len(offsets)


def encode_qa(
    tokenizer: Any,
    question: str,
    answer: str,
    max_length: int | None = None,
    template: TemplateSpec = None,
) -> dict[str, list[int]]:
    """``input_ids`` of the rendered conversation and ``labels`` (``-100`` outside the answer span).

    ``template``: None (``auto``), a name, a path to a ``.jinja`` file, or a :class:`asu.templates.Template`.
    Sequences longer than ``max_length`` lose their end (the end of the answer); a prompt that leaves no room
    for a single answer token is an error, since the row would teach nothing.
    """
    ids, start, end = answer_span(tokenizer, question, answer, template)
    labels = [IGNORE_INDEX] * start + ids[start:end] + [IGNORE_INDEX] * (len(ids) - end)
    if max_length is not None and len(ids) > max_length:
        if start >= max_length:
            raise ValueError(
                f"the prompt is {start} tokens, max_length={max_length} leaves no room for the answer: "
                f"{question[:80]!r}"
            )
        ids, labels = ids[:max_length], labels[:max_length]
    return {"input_ids": ids, "labels": labels}


def encode_answer(tokenizer: Any, answer: str) -> list[int]:
    """Token ids of the answer alone followed by EOS (the former, separately tokenised format).

    Kept for callers that still join :func:`encode_prompt` and these ids; that join is not the tokens of the
    rendered conversation for most tokenizers (use :func:`encode_qa`).
    """
    text = answer if has_chat_template(tokenizer) else " " + answer
    ids = list(tokenizer(text, add_special_tokens=False)["input_ids"])
    if tokenizer.eos_token_id is None:
        raise ValueError("the tokenizer has no eos_token_id; answers must end with EOS")
    return ids + [tokenizer.eos_token_id]
