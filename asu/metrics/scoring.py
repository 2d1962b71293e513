"""What evaluation asks of the model: the tokens of each row, teacher-forced token scores, greedy generation.

Encoding
    Every QA pair goes through :func:`encode_pair`, which calls :func:`asu.formatting.encode_qa`: the tokens
    (and the label span: answer + EOS) the model was trained and unlearned on. The generation prompt comes
    from :func:`asu.formatting.encode_prompt`. Raw documents (MUSE) are encoded as open-unlearning's
    ``preprocess_pretraining_instance`` does (:func:`encode_document`, :func:`split_document`), and MUSE's
    KnowMem questions in MUSE's own few-shot format (:func:`encode_knowmem`).

Teacher forcing (:func:`teacher_forced`)
    Rows are right-padded into batches (padding masked out of attention); position ``t - 1`` predicts
    token ``t``, and only the positions whose label is not ``-100`` are scored. Per row, over its ``n`` label
    tokens, from the float32 log-softmax of the logits: the per-token mean NLL, each label token's
    log-probability, whether the argmax is the label, and the standardised log-probability of min-k%++
    (:mod:`asu.metrics.privacy`). Only the label positions' ``(n, V)`` slice of the logits is upcast.

Generation (:func:`greedy_generate`)
    Prompts are left-padded into batches and continued greedily for at most ``max_new_tokens`` tokens; a row
    ends at its first stop token (the tokenizer's EOS and every EOS of the model's generation config), and the
    batch ends when every row has. ``min_new_tokens`` (per row) bans the stop tokens before a row has
    generated that many tokens (the τ preview of a teacher whose end of turn is removed inside the answer).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch

from asu.data import pad_right
from asu.formatting import IGNORE_INDEX, encode_prompt, encode_qa
from asu.metrics.muse import knowmem_prompt

MIN_VARIANCE = 1e-6  # min-k%++'s floor on the variance of the next-token log-probability


def _template_kwargs(template: str | None) -> dict[str, Any]:
    # Passed only when set, so the default ("auto") works with any version of asu.formatting.
    return {} if template is None else {"template": template}


def encode_pair(
    tokenizer: Any, question: str, answer: str, template: str | None = None
) -> dict[str, list[int]]:
    """``{"input_ids", "labels"}`` of one QA pair, exactly as training encodes it (``labels`` is ``-100``
    outside the answer + EOS span)."""
    enc = encode_qa(tokenizer, question, answer, **_template_kwargs(template))
    return {"input_ids": list(enc["input_ids"]), "labels": list(enc["labels"])}


def encode_question(tokenizer: Any, question: str, template: str | None = None) -> list[int]:
    """The generation prompt of ``question``: the prefix the answer follows in :func:`encode_pair`."""
    return list(encode_prompt(tokenizer, question, **_template_kwargs(template)))


def encode_document(
    tokenizer: Any, prefix: str, text: str, max_tokens: int, insert_space: bool = False
) -> dict[str, list[int]]:
    """A raw-text sample as open-unlearning encodes it: ``{"input_ids", "labels", "prompt_ids"}``.

    ``input_ids = tok(prefix + (" " if insert_space else "") + text)`` with special tokens, cut to the
    prefix's length + ``max_tokens``; ``prompt_ids = tok(prefix)``; the labels are ``-100`` over the prefix
    (at least the first token, which nothing predicts) and the ids after it.
    """
    full = list(
        tokenizer(prefix + (" " if insert_space else "") + text, add_special_tokens=True)["input_ids"]
    )
    prompt = list(tokenizer(prefix, add_special_tokens=True)["input_ids"])
    full = full[: len(prompt) + max_tokens]
    masked = max(1, len(prompt))
    return {"input_ids": full, "labels": [IGNORE_INDEX] * masked + full[masked:], "prompt_ids": prompt}


def split_document(
    tokenizer: Any, text: str, prefix_tokens: int, continuation_tokens: int
) -> dict[str, list[int]]:
    """A document cut into a prompt of its first ``prefix_tokens`` tokens (after the tokenizer's leading
    special tokens) and the next ``continuation_tokens`` as labels: ``{"input_ids", "labels", "prompt_ids"}``.

    Cut in token space, so no re-tokenisation can move the boundary.
    """
    ids = list(tokenizer(text, add_special_tokens=True)["input_ids"])
    lead = len(tokenizer("", add_special_tokens=True)["input_ids"])
    cut = lead + prefix_tokens
    if len(ids) <= cut:
        raise ValueError(
            f"the document is {len(ids) - lead} tokens long; VerbMem needs more than its "
            f"{prefix_tokens}-token prefix: {text[:80]!r}"
        )
    prompt, continuation = ids[:cut], ids[cut : cut + continuation_tokens]
    return {
        "input_ids": prompt + continuation,
        "labels": [IGNORE_INDEX] * len(prompt) + continuation,
        "prompt_ids": prompt,
    }


def encode_knowmem(
    tokenizer: Any, question: str, answer: str, examples: Sequence[tuple[str, str]] = ()
) -> dict[str, list[int]]:
    """A KnowMem question in MUSE's few-shot format (:func:`asu.metrics.muse.knowmem_prompt`), encoded as
    open-unlearning encodes it with its plain (Llama-2 base) template:
    ``{"input_ids", "labels", "prompt_ids"}``.

    MUSE probes document-trained models with this fixed format rather than a QA template, so it does not go
    through :func:`encode_pair`. ``input_ids = tok(prompt + answer)`` (special tokens, EOS appended unless
    already last), ``prompt_ids = tok(prompt)``, labels ``-100`` over the prompt's length.
    """
    prompt = knowmem_prompt(question, examples)
    full = list(tokenizer(prompt + answer, add_special_tokens=True)["input_ids"])
    if tokenizer.eos_token_id is not None and full[-1] != tokenizer.eos_token_id:
        full.append(int(tokenizer.eos_token_id))
    prompt_ids = list(tokenizer(prompt, add_special_tokens=True)["input_ids"])
    return {
        "input_ids": full,
        "labels": [IGNORE_INDEX] * len(prompt_ids) + full[len(prompt_ids) :],
        "prompt_ids": prompt_ids,
    }


@dataclass
class TokenScores:
    """Teacher-forced scores of one sample over its ``n`` label tokens (in order)."""

    avg_loss: float
    """Per-token mean NLL (natural log) over the ``n`` label tokens."""
    label_ids: list[int]
    """The label tokens."""
    logprobs: np.ndarray
    """(n,) ``log p(label_t | tokens before t)``."""
    correct: np.ndarray
    """(n,) bool: the argmax prediction at ``t`` is the label."""
    standardised: np.ndarray
    """(n,) ``(logprob_t - mu_t) / sigma_t`` (min-k%++), ``mu_t, sigma_t^2`` the mean and variance of
    ``log p(v)`` for ``v`` drawn from the next-token distribution at ``t`` (variance floored at 1e-6)."""


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def pad_id(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id
    return int(pad if pad is not None else tokenizer.eos_token_id)


def _row_scores(logits: torch.Tensor, labels: torch.Tensor) -> TokenScores:
    """Scores of one row from its logits (L, V) and labels (L,)."""
    pos = torch.nonzero(labels[1:] != IGNORE_INDEX).squeeze(-1) + 1  # label positions (never 0)
    if pos.numel() == 0:
        empty = np.zeros(0)
        return TokenScores(float("nan"), [], empty, empty.astype(bool), empty)
    lp = torch.log_softmax(logits[pos - 1].float(), dim=-1)  # (n, V): position t - 1 predicts token t
    target = labels[pos]
    token_lp = lp.gather(-1, target.unsqueeze(-1)).squeeze(-1)
    p = lp.exp()
    mu = (p * lp).sum(-1)
    var = ((p * lp.square()).sum(-1) - mu.square()).clamp(min=MIN_VARIANCE)
    return TokenScores(
        avg_loss=float(-token_lp.mean()),
        label_ids=target.tolist(),
        logprobs=token_lp.cpu().double().numpy(),
        correct=(lp.argmax(-1) == target).cpu().numpy(),
        standardised=((token_lp - mu) / var.sqrt()).cpu().double().numpy(),
    )


def _batches(n: int, batch_size: int, progress: bool, desc: str):
    from tqdm.auto import tqdm

    return tqdm(range(0, n, batch_size), desc=desc, disable=not progress, leave=False)


@torch.no_grad()
def teacher_forced(
    model: torch.nn.Module,
    examples: Sequence[dict[str, list[int]]],
    batch_size: int,
    pad_token_id: int,
    progress: bool = False,
    desc: str = "scoring",
) -> list[TokenScores]:
    """:class:`TokenScores` of every ``{"input_ids", "labels"}`` example, batched with right padding."""
    device = _device(model)
    out: list[TokenScores] = []
    for s in _batches(len(examples), batch_size, progress, desc):
        chunk = examples[s : s + batch_size]
        batch = {k: v.to(device) for k, v in pad_right(chunk, pad_token_id).items()}
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        labels = batch["labels"]
        out += [_row_scores(logits[i], labels[i]) for i in range(len(chunk))]
    return out


def stop_token_ids(model: torch.nn.Module, tokenizer: Any) -> list[int]:
    """The tokenizer's EOS and every EOS id of the model's generation config (Llama-3 has several)."""
    ids = [] if tokenizer.eos_token_id is None else [int(tokenizer.eos_token_id)]
    config_eos = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    for i in config_eos if isinstance(config_eos, (list, tuple)) else [config_eos]:
        if i is not None and int(i) not in ids:
            ids.append(int(i))
    if not ids:
        raise ValueError("neither the tokenizer nor the model's generation config has an EOS token")
    return ids


class _StopsBanned:
    """A ``transformers`` logits processor: the stop tokens' scores at ``-inf`` in row ``i`` until that row
    has generated ``min_new[i]`` tokens (``width``: the padded prompt length all rows start from)."""

    def __init__(self, stops: Sequence[int], min_new: Sequence[int], width: int) -> None:
        self.stops = torch.tensor(list(stops), dtype=torch.long)
        self.min_new = torch.tensor(list(min_new), dtype=torch.long)
        self.width = width

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        generated = input_ids.shape[1] - self.width
        banned = (self.min_new.to(scores.device) > generated).nonzero().squeeze(-1)
        if banned.numel():
            rows, cols = torch.meshgrid(banned, self.stops.to(scores.device), indexing="ij")
            scores = scores.clone()
            scores[rows, cols] = float("-inf")
        return scores


@torch.no_grad()
def greedy_generate(
    model: torch.nn.Module,
    tokenizer: Any,
    prompts: Sequence[list[int]],
    batch_size: int,
    max_new_tokens: int,
    progress: bool = False,
    desc: str = "generating",
    min_new_tokens: Sequence[int] | None = None,
) -> list[list[int]]:
    """Greedy continuations of token-id ``prompts``, batched with left padding; each cut before its first
    stop token (:func:`stop_token_ids`), which ``min_new_tokens[i]`` (when given) bans before row ``i`` has
    generated that many tokens."""
    from transformers import LogitsProcessorList

    device = _device(model)
    pad = pad_id(tokenizer)
    stops = stop_token_ids(model, tokenizer)
    if min_new_tokens is not None and len(min_new_tokens) != len(prompts):
        raise ValueError(f"{len(min_new_tokens)} minimum lengths for {len(prompts)} prompts")
    out: list[list[int]] = []
    for s in _batches(len(prompts), batch_size, progress, desc):
        chunk = prompts[s : s + batch_size]
        width = max(len(p) for p in chunk)
        ids = torch.full((len(chunk), width), pad, dtype=torch.long)
        mask = torch.zeros((len(chunk), width), dtype=torch.long)
        for i, p in enumerate(chunk):
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        extra = {}
        if min_new_tokens is not None:  # only then: the plain call stays the one every generate() accepts
            extra["logits_processor"] = LogitsProcessorList(
                [_StopsBanned(stops, min_new_tokens[s : s + batch_size], width)]
            )
        gen = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=stops,
            pad_token_id=pad,
            **extra,
        )[:, width:].tolist()
        for row in gen:
            end = next((j for j, t in enumerate(row) if t in stops), len(row))
            out.append(row[:end])
    return out
