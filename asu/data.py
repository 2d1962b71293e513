"""Unlearning data: TOFU-format files, tokenization, forget/retain pairing and the batch collators.

Rows
    * QA rows (TOFU format): ``question``, ``answer`` (strings), optional ``paraphrased_answer`` and
      ``perturbed_answer`` (kept, unused for training). Tokenized by :func:`asu.formatting.encode_qa` with a
      prompt template (:mod:`asu.templates`), so everything before the answer is masked with ``-100`` and the
      answer (plus the end of the turn) carries the labels.
    * Raw-text rows: ``text``. Every token is a label.

Sources (:func:`load_rows`)
    * a file: ``.json`` (a list of rows, or ``{"data": [...]}``), ``.jsonl`` (one row per line; TOFU's own
      ``.json`` files are JSON Lines), ``.csv`` (a header row, then one row per line), ``.parquet``;
    * a folder written by ``datasets.Dataset.save_to_disk`` (or a ``DatasetDict`` with one split);
    * a Hugging Face hub dataset ``NAME:CONFIG[:SPLIT]`` (split ``train`` by default), e.g.
      ``locuslab/TOFU:forget10``.

    Parquet, saved folders and the hub need the optional ``datasets`` package (``pip install 'asu[data]'``);
    JSON, JSON Lines and CSV need nothing. ``question_key`` / ``answer_key`` name the columns holding the
    question and the answer when they are called something else. Every error names the source and, where it
    has one, the line (or the row): malformed JSON or CSV, bytes that are not UTF-8 (with the byte offset),
    a field that is not a string, and text that is not valid Unicode (an unpaired surrogate, which a JSON
    escape such as ``"\\ud800"`` can produce and no tokenizer accepts).

Long rows
    A row's text is cut to :data:`CHARS_PER_TOKEN_LIMIT` characters per token of the budget (plus a margin)
    *before* it is tokenised (:func:`bound_text`), so a 50 MB row costs what a row at the budget costs; the
    tokens past the budget are dropped by truncation anyway.

Batches
    The unlearning dataset yields ``{"forget": example, "retain": example}`` (plus ``"idk"`` for the IDK
    baseline); the collators turn a list of such items into ``{"forget": batch, "retain": batch, ...}``.
    A batch is a dict of tensors, every one (R, L):

    * ``input_ids``, ``labels`` (``-100`` where no loss is taken), ``position_ids``;
    * ``attention_mask`` (padding collator only; absent from packed batches, see below);
    * ``sequence_ids``: index into ``example_ids`` of the example owning the token, ``-1`` on padding.

    and ``example_ids`` (S,) int64: the dataset index of each example, in row-major placement order.

Packing and attention
    :class:`PackingCollator` concatenates examples into rows of at most ``max_tokens`` tokens (first fit, in
    the order given) with ``position_ids`` restarting at 0 for each example and no ``attention_mask``.
    Transformers (>= 4.54) turns exactly that into per-document attention for every implementation: the
    ``eager``/``sdpa`` mask builders detect the restarts and build a block-diagonal causal mask, and the
    ``asu`` attention derives ``cu_seqlens`` from them (:func:`packed_documents`: a document starts at each
    row's first token and wherever ``position_ids[t] != position_ids[t - 1] + 1``, the rule of transformers'
    ``find_packed_sequence_indices``). So no padding fallback is needed for eager/sdpa.
    Trailing padding of a row gets its own ``position_ids`` run from 0, so it forms a separate document
    that no real token attends to.
"""

from __future__ import annotations

import hashlib
import json
import os
import random
from collections.abc import Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from asu.files import did_you_mean
from asu.formatting import IGNORE_INDEX, encode_qa
from asu.sources import (
    DataError,
    decode_utf8,
    is_hub_name,
    read_csv,
    read_hub,
    read_parquet,
    read_saved,
    rename_columns,
)
from asu.templates import Template

#: Rows as :func:`load_rows` returns them: one dict per QA row (``question``, ``answer``, ...) or document
#: (``text``).
Rows = Sequence[dict[str, Any]]

__all__ = [
    "CHARS_PER_TOKEN_LIMIT",
    "DataError",
    "Rows",
    "bound_row",
    "bound_text",
    "load_rows",
    "rows_fingerprint",
    "tokenizer_fingerprint",
    "validate_rows",
    "encode_row",
    "encode_rows",
    "load_idk_answers",
    "pair_indices",
    "pad_right",
    "UnlearnDataset",
    "PaddingCollator",
    "PackingCollator",
    "first_fit",
    "document_starts",
    "cu_seqlens",
    "packed_documents",
    "label_positions",
]


def _read_text(path: str | os.PathLike) -> str:
    path = os.fspath(path)
    if not os.path.exists(path):
        raise DataError(f"{path}: no such file{did_you_mean(path)}")
    if os.path.isdir(path):
        raise DataError(f"{path}: is a directory, expected a file")
    with open(path, "rb") as f:
        text = decode_utf8(f.read(), path)
    if not text.strip():
        raise DataError(f"{path}: the file is empty")
    return text


def load_rows(
    path: str | os.PathLike, question_key: str | None = None, answer_key: str | None = None
) -> list[dict[str, Any]]:
    """Rows of a data source (see the module docstring), validated by :func:`validate_rows`.

    ``path``: a ``.json`` / ``.jsonl`` / ``.csv`` / ``.parquet`` file, a ``datasets.save_to_disk`` folder, or
    a hub dataset ``NAME:CONFIG[:SPLIT]``. A JSON file that parses as one document is a list of rows,
    ``{"data": [...]}`` or one row; anything else is read as JSON Lines (blank lines skipped), whatever the
    extension (``.csv`` and ``.parquet`` excepted). ``question_key`` / ``answer_key``: the columns to read as
    ``question`` / ``answer``. Raises :class:`DataError` naming the source (and line or row) for a missing or
    empty source, malformed content, a row that is not an object, or a row without ``answer``/``text``.
    """
    source = os.fspath(path)
    if os.path.isdir(source):
        rows, lines = read_saved(source)
    elif not os.path.exists(source) and is_hub_name(source):
        rows, lines = read_hub(source)
    elif source.lower().endswith(".csv") and os.path.isfile(source):
        rows, lines = read_csv(source)
    elif source.lower().endswith(".parquet") and os.path.isfile(source):
        rows, lines = read_parquet(source)
    else:
        rows, lines = _read_json_rows(source)
    if not rows:
        raise DataError(f"{source}: the source holds no rows")
    rows = rename_columns(rows, source, lines, question_key, answer_key)
    validate_rows(rows, source=source, lines=lines)
    return rows


def _read_json_rows(path: str) -> tuple[list[Any], list[int]]:
    """Rows of a JSON or JSON Lines file and the line of each (0 for the rows of one JSON document)."""
    text = _read_text(path)
    rows: list[Any] = []
    lines: list[int] = []
    whole: Any = None
    if text.lstrip().startswith("["):
        try:
            whole = json.loads(text)
        except json.JSONDecodeError as e:
            raise DataError(f"{path}: line {e.lineno}: malformed JSON ({e.msg})") from None
    else:
        # One JSON document ({"data": [...]} or a single row), else JSON Lines -- whatever the extension:
        # TOFU's own ".json" files are JSON Lines.
        try:
            whole = json.loads(text)
        except json.JSONDecodeError:
            whole = None
    if whole is not None:
        if isinstance(whole, dict):
            whole = whole["data"] if isinstance(whole.get("data"), list) else [whole]
        if not isinstance(whole, list):
            raise DataError(f"{path}: expected a list of rows, got {type(whole).__name__}")
        rows = whole
        lines = [0] * len(rows)  # a JSON document has no per-row line; rows are named by index
        numbered = [i for i, line in enumerate(text.splitlines(), start=1) if line.strip()]
        if len(rows) == 1 and len(numbered) == 1:
            lines = numbered  # a one-line JSON Lines file
    else:
        for lineno, line in enumerate(text.splitlines(), start=1):
            if not line.strip():
                continue
            try:
                rows.append(json.loads(line))
            except json.JSONDecodeError as e:
                raise DataError(f"{path}: line {lineno}: malformed JSON ({e.msg})") from None
            lines.append(lineno)
    if not rows:
        raise DataError(f"{path}: the file holds no rows")
    return rows, lines


def _where(source: str, lines: Sequence[int] | None, i: int) -> str:
    if lines and lines[i]:
        return f"{source}: line {lines[i]}"
    return f"{source}: row {i}"


def validate_rows(rows: Sequence[Any], source: str = "<rows>", lines: Sequence[int] | None = None) -> None:
    """Check that every row is a QA row (``question`` + ``answer`` strings), a raw-text row (``text``) or an
    excerpt row (``prompt`` + ``gt``: MUSE's VerbMem excerpts, a document's beginning and its continuation;
    evaluation only).

    All rows of one set must be of the same kind. Raises :class:`DataError` naming the source and row.
    """
    if isinstance(rows, (str, bytes)) or not isinstance(rows, Sequence):
        raise DataError(f"{source}: expected a list of rows, got {type(rows).__name__}")
    if len(rows) == 0:
        raise DataError(f"{source}: no rows")
    kinds = set()
    for i, row in enumerate(rows):
        where = _where(source, lines, i)
        if not isinstance(row, dict):
            raise DataError(f"{where}: expected a JSON object, got {type(row).__name__}")
        _check_unicode(row, where)
        if "text" in row and "answer" not in row:
            if not isinstance(row["text"], str) or not row["text"].strip():
                raise DataError(f"{where}: 'text' must be a non-empty string")
            kinds.add("text")
            continue
        if "prompt" in row and "gt" in row and "answer" not in row:
            for key in ("prompt", "gt"):
                if not isinstance(row[key], str) or not row[key].strip():
                    raise DataError(f"{where}: '{key}' must be a non-empty string")
            kinds.add("excerpt")
            continue
        if "answer" not in row:
            raise DataError(
                f"{where}: row has no 'answer' (QA rows need 'question' and 'answer', raw-text rows 'text', "
                "excerpt rows 'prompt' and 'gt')"
            )
        if "question" not in row:
            raise DataError(f"{where}: row has no 'question'")
        for key in ("question", "answer"):
            if not isinstance(row[key], str):
                raise DataError(f"{where}: '{key}' must be a string, got {type(row[key]).__name__}")
        if not row["answer"].strip():
            raise DataError(f"{where}: 'answer' is empty")
        kinds.add("qa")
    if len(kinds) > 1:
        raise DataError(f"{source}: mixes {' and '.join(sorted(kinds))} rows; use one kind per file")


def _check_unicode(row: dict[str, Any], where: str) -> None:
    """DataError naming the field of ``row`` whose text (a string, or a string in a list) is not valid
    Unicode: an unpaired surrogate, which no tokenizer and no UTF-8 file can hold."""
    for key, value in row.items():
        for text in value if isinstance(value, list) else [value]:
            if not isinstance(text, str):
                continue
            try:
                text.encode("utf-8")
            except UnicodeEncodeError as e:
                raise DataError(
                    f"{where}: '{key}' is not valid Unicode text (an unpaired surrogate "
                    f"\\u{ord(text[e.start]):04x} at character {e.start})"
                ) from None


#: A bound on the characters per token of real text under any tokenizer (BPE tokens average 3-5 characters;
#: the longest merges of common vocabularies, runs of spaces or punctuation, stay under it). Text longer than
#: ``(budget + TOKEN_MARGIN) * CHARS_PER_TOKEN_LIMIT`` characters is cut before tokenising.
CHARS_PER_TOKEN_LIMIT = 32
TOKEN_MARGIN = 16


def bound_text(text: str, max_tokens: int) -> str:
    """``text`` cut to ``(max_tokens + 16) * 32`` characters: what a tokenizer needs to produce the first
    ``max_tokens`` tokens (the margin covers the last word, which a cut may split), so that a huge field is
    never tokenised whole."""
    limit = (max_tokens + TOKEN_MARGIN) * CHARS_PER_TOKEN_LIMIT
    return text if len(text) <= limit else text[:limit]


def bound_row(row: dict[str, Any], max_tokens: int) -> dict[str, Any]:
    """``row`` with every string field (and every string in a list field) cut by :func:`bound_text`."""
    out = {}
    for key, value in row.items():
        if isinstance(value, str):
            value = bound_text(value, max_tokens)
        elif isinstance(value, list):
            value = [bound_text(v, max_tokens) if isinstance(v, str) else v for v in value]
        out[key] = value
    return out


def rows_fingerprint(rows: Sequence[Any]) -> str:
    """SHA-256 of the rows' content (keys sorted, so the column order of a file does not matter)."""
    text = json.dumps(list(rows), sort_keys=True, ensure_ascii=True, default=str)
    return hashlib.sha256(text.encode("ascii")).hexdigest()


def tokenizer_fingerprint(tokenizer: Any) -> str:
    """SHA-256 of what decides a tokenizer's ids: its whole ``tokenizers`` definition (vocabulary, merges,
    normaliser, pre- and post-processing) or, for a slow tokenizer, its vocabulary, plus its special tokens
    and chat template."""
    digest = hashlib.sha256()
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is not None:
        digest.update(backend.to_str().encode("utf-8"))
    else:
        vocab = sorted(tokenizer.get_vocab().items())
        digest.update(json.dumps(vocab, ensure_ascii=True).encode("ascii"))
    for name in ("bos_token", "eos_token", "pad_token", "unk_token", "chat_template"):
        digest.update(repr(getattr(tokenizer, name, None)).encode("utf-8", "backslashreplace"))
    return digest.hexdigest()


def encode_row(
    tokenizer: Any, row: dict[str, Any], max_length: int, template: Template | str | None = None
) -> dict[str, list[int]]:
    """``{"input_ids", "labels"}`` of one row: QA via :func:`encode_qa` in ``template`` (None = ``auto``),
    raw text with every token a label. Fields are bounded (:func:`bound_text`) before tokenising."""
    row = bound_row(row, max_length)
    if "answer" in row:
        return encode_qa(tokenizer, row["question"], row["answer"], max_length, template=template)
    if "text" not in row:
        raise DataError(
            "excerpt rows ('prompt' / 'gt') are for evaluation (MUSE VerbMem); train on 'text' or QA rows"
        )
    ids = list(tokenizer(row["text"], add_special_tokens=True)["input_ids"])[:max_length]
    if len(ids) < 2:
        raise DataError(f"text row is {len(ids)} token(s) long; at least 2 are needed to predict one")
    return {"input_ids": ids, "labels": list(ids)}


def encode_rows(
    tokenizer: Any,
    rows: Rows,
    max_length: int,
    source: str = "<rows>",
    template: Template | str | None = None,
) -> list[dict[str, list[int]]]:
    """Encode every row (see :func:`encode_row`); errors name the source and row index."""
    if max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    out = []
    for i, row in enumerate(rows):
        try:
            enc = encode_row(tokenizer, row, max_length, template)
        except ValueError as e:
            raise DataError(f"{source}: row {i}: {e}") from None
        if not any(label != IGNORE_INDEX for label in enc["labels"][1:]):
            raise DataError(f"{source}: row {i}: no answer token left after truncation to {max_length}")
        out.append(enc)
    return out


def load_idk_answers(path: str | os.PathLike) -> list[str]:
    """Refusal answers for the IDK baseline: one per line (plain text or JSON strings, TOFU's idontknow)."""
    text = _read_text(path)
    answers = []
    for lineno, line in enumerate(text.splitlines(), start=1):
        line = line.strip()
        if not line:
            continue
        if line.startswith(("{", '"')):
            try:
                value = json.loads(line)
            except json.JSONDecodeError as e:
                raise DataError(f"{os.fspath(path)}: line {lineno}: malformed JSON ({e.msg})") from None
            if isinstance(value, dict):
                value = value.get("answer", value.get("text"))
            if not isinstance(value, str):
                raise DataError(
                    f"{os.fspath(path)}: line {lineno}: expected a string or an object with 'answer'"
                )
            line = value
        _check_unicode({"answer": line}, f"{os.fspath(path)}: line {lineno}")
        answers.append(line)
    if not answers:
        raise DataError(f"{os.fspath(path)}: no answers")
    return answers


def pair_indices(n_forget: int, n_retain: int, seed: int) -> list[int]:
    """The retain example paired with each forget example: a seeded permutation of the retain set, cycled.

    Deterministic per ``seed``; every retain example is used before any is reused.
    """
    if n_forget < 1 or n_retain < 1:
        raise ValueError(f"need at least one forget and one retain example, got {n_forget} and {n_retain}")
    perm = list(range(n_retain))
    random.Random(seed).shuffle(perm)
    return [perm[i % n_retain] for i in range(n_forget)]


class UnlearnDataset(torch.utils.data.Dataset):
    """Item ``i``: forget example ``i`` and its paired retain example, and the rewrites a method trains on.

    Each example is ``{"input_ids", "labels", "example_id"}``; ``example_id`` is the index in its own set
    (what the teacher cache is keyed by). ``idk`` (the refusal rewrite) and every list of ``extras`` hold one
    example per forget example and are served with it (``example_id`` ``i``); every list of
    ``retain_extras`` holds one per retain example and is served with the paired retain example (its
    ``example_id``).
    """

    def __init__(
        self,
        forget: Sequence[dict[str, list[int]]],
        retain: Sequence[dict[str, list[int]]] | None = None,
        seed: int = 0,
        idk: Sequence[dict[str, list[int]]] | None = None,
        extras: dict[str, Sequence[dict[str, list[int]]]] | None = None,
        retain_extras: dict[str, Sequence[dict[str, list[int]]]] | None = None,
    ) -> None:
        if len(forget) == 0:
            raise ValueError("the forget set is empty")
        self.forget = list(forget)
        self.retain = list(retain) if retain else None
        self.extras = {name: list(part) for name, part in (extras or {}).items()}
        if idk is not None:
            self.extras["idk"] = list(idk)
        for name, part in self.extras.items():
            if len(part) != len(self.forget):
                raise ValueError(f"{name} has {len(part)} examples, the forget set {len(self.forget)}")
        self.retain_extras = {name: list(part) for name, part in (retain_extras or {}).items()}
        if self.retain_extras and self.retain is None:
            raise ValueError(f"{', '.join(self.retain_extras)} need a retain set")
        for name, part in self.retain_extras.items():
            if len(part) != len(self.retain):
                raise ValueError(f"{name} has {len(part)} examples, the retain set {len(self.retain)}")
        self.pairing = pair_indices(len(self.forget), len(self.retain), seed) if self.retain else None

    @property
    def idk(self) -> list[dict[str, list[int]]] | None:
        return self.extras.get("idk")

    def __len__(self) -> int:
        return len(self.forget)

    def __getitem__(self, i: int) -> dict[str, dict[str, Any]]:
        item = {"forget": {**self.forget[i], "example_id": i}}
        if self.retain is not None:
            j = self.pairing[i]
            item["retain"] = {**self.retain[j], "example_id": j}
            for name, part in self.retain_extras.items():
                item[name] = {**part[j], "example_id": j}
        for name, part in self.extras.items():
            item[name] = {**part[i], "example_id": i}
        return item


def _check_examples(examples: Sequence[dict[str, Any]]) -> None:
    if len(examples) == 0:
        raise ValueError("cannot collate an empty list of examples")
    for ex in examples:
        if len(ex["input_ids"]) != len(ex["labels"]) or len(ex["input_ids"]) == 0:
            raise ValueError("every example needs input_ids and labels of the same, non-zero length")


def _stack(rows: list[list[int]], width: int, fill: int) -> torch.Tensor:
    return torch.tensor([r + [fill] * (width - len(r)) for r in rows], dtype=torch.long)


def pad_right(examples: Sequence[dict[str, Any]], pad_token_id: int) -> dict[str, torch.Tensor]:
    """``{"input_ids", "labels", "attention_mask"}`` of ``{"input_ids", "labels"}`` examples, each (B, T)
    int64 with T the longest example's length: example ``b`` fills the start of row ``b``, the rest of the
    row is ``pad_token_id`` / ``-100`` (no loss) / ``0`` (not attended)."""
    width = max(len(ex["input_ids"]) for ex in examples)
    return {
        "input_ids": _stack([list(ex["input_ids"]) for ex in examples], width, pad_token_id),
        "labels": _stack([list(ex["labels"]) for ex in examples], width, IGNORE_INDEX),
        "attention_mask": _stack([[1] * len(ex["input_ids"]) for ex in examples], width, 0),
    }


class _Collator:
    """Collates dataset items ``{"forget": ex, "retain": ex, ...}`` part by part with :meth:`collate`."""

    def collate(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        raise NotImplementedError

    def __call__(self, items: Sequence[dict[str, Any]]) -> dict[str, Any]:
        if len(items) == 0:
            raise ValueError("cannot collate an empty batch")
        if "input_ids" in items[0]:  # plain examples, not forget/retain items
            return self.collate(items)
        return {part: self.collate([it[part] for it in items]) for part in items[0]}


@dataclass
class PaddingCollator(_Collator):
    """One example per row, right-padded to the longest; ``attention_mask`` marks real tokens."""

    pad_token_id: int = 0

    def collate(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        _check_examples(examples)
        lengths = [len(ex["input_ids"]) for ex in examples]
        width = max(lengths)
        return {
            **pad_right(examples, self.pad_token_id),
            "position_ids": _stack([list(range(n)) for n in lengths], width, 0),
            "sequence_ids": _stack([[s] * n for s, n in enumerate(lengths)], width, -1),
            "example_ids": torch.tensor([ex.get("example_id", s) for s, ex in enumerate(examples)]),
        }


@dataclass
class PackingCollator(_Collator):
    """Examples concatenated into rows of at most ``max_tokens`` tokens, first fit in the given order.

    ``position_ids`` restart at 0 for every example (per-document attention, see the module docstring);
    there is no ``attention_mask``. ``example_ids`` lists the examples row by row, left to right.
    """

    max_tokens: int = 512
    pad_token_id: int = 0

    def collate(self, examples: Sequence[dict[str, Any]]) -> dict[str, torch.Tensor]:
        _check_examples(examples)
        lengths = [len(ex["input_ids"]) for ex in examples]
        if max(lengths) > self.max_tokens:
            # Name the longest example, not merely the first that does not fit.
            raise ValueError(
                f"an example of {max(lengths)} tokens does not fit the packing budget {self.max_tokens}"
            )
        rows = first_fit(lengths, self.max_tokens)
        width = max(sum(lengths[i] for i in members) for members in rows)
        ids, labels, pos, seq, order = [], [], [], [], []
        for members in rows:
            r_ids, r_labels, r_pos, r_seq = [], [], [], []
            for i in members:
                ex = examples[i]
                n = len(ex["input_ids"])
                r_ids += list(ex["input_ids"])
                r_labels += list(ex["labels"])
                r_pos += list(range(n))
                r_seq += [len(order)] * n
                order.append(ex.get("example_id", i))
            pad = width - len(r_ids)
            ids.append(r_ids + [self.pad_token_id] * pad)
            labels.append(r_labels + [IGNORE_INDEX] * pad)
            pos.append(r_pos + list(range(pad)))
            seq.append(r_seq + [-1] * pad)
        return {
            "input_ids": torch.tensor(ids, dtype=torch.long),
            "labels": torch.tensor(labels, dtype=torch.long),
            "position_ids": torch.tensor(pos, dtype=torch.long),
            "sequence_ids": torch.tensor(seq, dtype=torch.long),
            "example_ids": torch.tensor(order, dtype=torch.long),
        }


def first_fit(lengths: Sequence[int], budget: int) -> list[list[int]]:
    """First-fit packing: the indices of ``lengths`` grouped into rows of at most ``budget`` tokens, each
    item going into the first row (in creation order) with room for it; items keep their order in a row.

    Raises ValueError for an item longer than ``budget``.
    """
    rows: list[list[int]] = []
    used: list[int] = []
    for i, n in enumerate(lengths):
        if n > budget:
            raise ValueError(f"an example of {n} tokens does not fit the packing budget {budget}")
        for r in range(len(rows)):
            if used[r] + n <= budget:
                rows[r].append(i)
                used[r] += n
                break
        else:
            rows.append([i])
            used.append(n)
    return rows


def document_starts(position_ids: torch.Tensor) -> torch.Tensor:
    """(R, L) bool, True where a document of a packed batch starts: at each row's first token and wherever
    ``position_ids[t] != position_ids[t - 1] + 1`` (:class:`PackingCollator` restarts them at 0)."""
    starts = torch.ones_like(position_ids, dtype=torch.bool)
    starts[:, 1:] = position_ids[:, 1:] != position_ids[:, :-1] + 1
    return starts


def cu_seqlens(starts: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``(cu_seqlens int32 (docs + 1,), max_seqlen)`` over the flattened (R * L) tokens, from
    :func:`document_starts`: the varlen layout of the attention kernels."""
    flat = starts.reshape(-1).nonzero().view(-1)
    total = torch.tensor([starts.numel()], device=starts.device)
    cu = torch.cat([flat, total]).to(torch.int32)
    return cu, int((cu[1:] - cu[:-1]).max())


def packed_documents(position_ids: torch.Tensor) -> tuple[torch.Tensor, int]:
    """``(cu_seqlens, max_seqlen)`` of the documents of a packed batch with ``position_ids`` (R, L)."""
    if position_ids.dim() != 2:
        raise ValueError(f"position_ids must be (rows, length), got shape {tuple(position_ids.shape)}")
    return cu_seqlens(document_starts(position_ids))


def label_positions(batch: dict[str, torch.Tensor]) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Where the loss is taken: the hidden state at ``t`` predicts ``labels[t + 1]`` of the same example.

    Returns:
        ``mask`` (R, L) bool, True at positions ``t`` whose next token is a label of the same example;
        ``targets`` (M,) the labels they predict; ``seq`` (M,) the owning example's index into
        ``example_ids``. Rows are in row-major order, so each example's positions are contiguous and the
        examples come in ``example_ids`` order.
    """
    labels, seq_ids = batch["labels"], batch["sequence_ids"]
    nxt = labels[:, 1:]
    same = (seq_ids[:, 1:] == seq_ids[:, :-1]) & (seq_ids[:, :-1] >= 0)
    valid = same & (nxt != IGNORE_INDEX)
    mask = torch.zeros_like(labels, dtype=torch.bool)
    mask[:, :-1] = valid
    return mask, nxt[valid], seq_ids[:, :-1][valid]


def sequence_weights(seq: torch.Tensor, num_sequences: int) -> torch.Tensor:
    """Per-row weights of the paper's reduction: ``w_i = 1 / (T_s * S)`` for row ``i`` of example ``s``.

    ``T_s`` is the example's number of label rows and ``S`` the number of examples with at least one, so
    ``sum_i w_i x_i`` is the per-example mean of ``x`` averaged over examples.
    """
    counts = torch.bincount(seq, minlength=num_sequences).to(torch.float64)
    present = int((counts > 0).sum())
    if present == 0:
        return torch.zeros(0, dtype=torch.float32, device=seq.device)
    return (1.0 / (counts[seq] * present)).to(torch.float32)


def iter_batches(items: Iterable[Any], size: int) -> Iterable[list[Any]]:
    """Consecutive chunks of ``size`` items (the last may be shorter)."""
    chunk: list[Any] = []
    for it in items:
        chunk.append(it)
        if len(chunk) == size:
            yield chunk
            chunk = []
    if chunk:
        yield chunk
