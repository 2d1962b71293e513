"""closer-look's evaluation (sail-sg/closer-look-LLM-unlearning ``metrics/metrics.py``, ``eval.py``,
``real_world_eval.py``, ``dataset/data_module.py``) run on a model in memory: its encoding, its generation and
its judges, then :mod:`asu.metrics.closer_look`'s formulas. This is the currency of the ASU paper's TOFU,
continual and real-world tables.

Encoding (closer-look's ``convert_raw_data_to_model_format``)
    A row is the text ``start + question + end + answer_tag + answer`` of the model family's tags
    (:data:`FORMATS`), tokenised once with the tokenizer's special tokens and cut at :data:`MAX_LENGTH` (200)
    tokens; the labels are the tokens after the first ``len(tokenize(start + question + end))`` (BOS counted)
    plus an appended EOS (none when the text fills the 200 tokens). It does not go through asu's templates:
    closer-look tokenises question and answer with fixed tags, and its numbers depend on exactly that.

Generation (closer-look's ``run_generation``)
    The encoded row, padded with EOS to 200 tokens, is decoded (special tokens dropped; kept for
    ``llama3-8b``), split at the family's answer marker into the prompt (everything before, plus the marker)
    and the ground truth (everything after; for ``llama3-8b`` up to ``<|eot_id|>``). The prompts are
    re-tokenised, left-padded with EOS in batches of :data:`BATCH_SIZE` (30) and continued greedily to a
    total length of 200 tokens (padded prompt included), stopping where the model's generation config says;
    the answer is the decoding of everything after the padded prompt, special tokens dropped, not stripped.

Per set (closer-look's ``get_all_evals``)
    * losses of the answer (``answer_key``: TOFU ``answer``, real-world ``golden_answer``), of the base answer
      (``paraphrased_answer`` on forget / retain sets, ``answer`` on real authors / world facts) and of each
      ``perturbed_answer``; ROUGE-L recall of the answer against the ground truth;
    * cosine similarity of the answer's and the target's embeddings (target: the row's ``answer`` on forget /
      retain sets, ``original_answer`` on real authors / world facts);
    * the NLI label of (answer, target) on TOFU's forget set and in the real-world setting, (target, answer)
      on TOFU's other sets (target: the ground truth, ``original_answer`` on real authors / world facts);
    * the token entropy of the answer re-tokenised.

    TOFU evaluates the first 300 rows of each set (closer-look's ``ds_size: 300``), the real-world setting
    every row. The logs are written in closer-look's layout (``CLOSER_LOOK_EVAL.json``: its
    ``eval_log_aggregated.json``), so its own ``get_eval_results`` reads them.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from asu.judges import Judges
from asu.metrics import closer_look as formulas
from asu.metrics.layout import degenerate_entries
from asu.metrics.scoring import TokenScores, stop_token_ids, teacher_forced
from asu.metrics.text import rouge_scores

IGNORE_INDEX = -100
#: closer-look's ``generation.max_length``: tokens per encoded row and per prompt + generated answer.
MAX_LENGTH = 200
#: closer-look's evaluation ``batch_size`` (generation, answer losses); base and perturbed answers go in
#: batches of a quarter of it, as its data loaders do.
BATCH_SIZE = 30
#: closer-look's TOFU ``ds_size``: rows evaluated per set.
TOFU_ROWS = 300
LLAMA3_TURN = "<|eot_id|>"


@dataclass(frozen=True)
class Format:
    """A model family's prompt tags (closer-look's ``config/model_config.yaml``) and its generation split."""

    name: str
    question_start: str
    question_end: str
    answer_tag: str
    marker: str
    """Where ``run_generation`` splits the decoded row into prompt and ground truth."""
    keep_special: bool = False
    """Decode with special tokens, cut the truth at ``<|eot_id|>``, drop ``<|begin_of_text|>`` (llama3-8b)."""


_LLAMA3_ASSISTANT = "<|eot_id|><|start_header_id|>assistant<|end_header_id|>\n\n"
#: closer-look's model families; ``phi`` is TOFU's phi-1.5 entry, which closer-look's generation treats as
#: every family but the two Llamas (prompt up to ``Answer: ``).
FORMATS = {
    "llama2-7b": Format("llama2-7b", "[INST] ", " [/INST]", "", " [/INST]"),
    "llama3-8b": Format(
        "llama3-8b",
        "<|start_header_id|>user<|end_header_id|>\n\n",
        _LLAMA3_ASSISTANT,
        "",
        _LLAMA3_ASSISTANT,
        keep_special=True,
    ),
    "phi": Format("phi", "Question: ", "\n", "Answer: ", "Answer: "),
}
#: asu templates that write the same text as a closer-look family.
TEMPLATE_FORMATS = {"tofu-llama2": "llama2-7b", "plain": "phi", "phi": "phi"}


@dataclass(frozen=True)
class Protocol:
    """What differs between closer-look's two settings."""

    name: str
    tofu: bool
    """TOFU's entailment order (the forget set's answer first, the other sets' target first); the real-world
    setting puts the answer first everywhere."""
    answer_key: str
    max_rows: int | None
    max_length: int = MAX_LENGTH
    """Tokens per encoded row and per prompt + generated answer (closer-look's ``generation.max_length``)."""


TOFU = Protocol("tofu", True, "answer", TOFU_ROWS)
REAL_WORLD = Protocol("real-world", False, "golden_answer", None)
#: The sets closer-look evaluates; the real-world setting's neighbour set is its ``retain`` set.
SETS = ("retain", "ra", "wf", "forget")


def _general(split: str) -> bool:
    return split in ("ra", "wf")


def needed_fields(split: str, protocol: Protocol) -> tuple[str, ...]:
    """The fields every row of set ``split`` must have."""
    base = "answer" if _general(split) else "paraphrased_answer"
    target = "original_answer" if _general(split) else "answer"
    return tuple(dict.fromkeys(("question", protocol.answer_key, base, "perturbed_answer", target)))


def _usable(value: Any, key: str) -> bool:
    if key == "perturbed_answer" and isinstance(value, list):
        return bool(value) and all(isinstance(x, str) and x for x in value)
    return isinstance(value, str) and bool(value)


def check_set(split: str, rows: Sequence[dict], protocol: Protocol) -> None:
    """ValueError naming the first row of set ``split`` without a field closer-look reads
    (:func:`needed_fields`), and every field the set needs."""
    if not rows:
        raise ValueError(f"{split} rows: no rows")
    fields = needed_fields(split, protocol)
    for key in fields:
        for i, row in enumerate(rows):
            if not _usable(row.get(key), key):
                raise ValueError(
                    f"{split} rows: row {i} has no usable {key!r}; closer-look's {protocol.name} metrics "
                    f"read {', '.join(fields)} on every {split} row"
                )


def resolve_format(name: str | None, template: str | None, tokenizer: Any = None) -> Format:
    """``name`` (a :data:`FORMATS` key), else the family whose text the asu ``template`` writes (``plain``,
    also ``auto`` on a tokenizer without a chat template); ValueError asking for the flag otherwise."""
    if name is not None:
        if name not in FORMATS:
            raise ValueError(f"unknown closer-look format {name!r}; choose one of {', '.join(FORMATS)}")
        return FORMATS[name]
    key = template or "auto"
    if key == "auto" and tokenizer is not None and not getattr(tokenizer, "chat_template", None):
        key = "plain"
    if key in TEMPLATE_FORMATS:
        return FORMATS[TEMPLATE_FORMATS[key]]
    raise ValueError(
        f"closer-look formats prompts with its model family's tags, and template {key!r} is none of them: "
        f"name the format ({', '.join(FORMATS)}; llama3-8b for Llama-3-8B-Instruct)"
    )


# ------------------------------------------------------------------------------------------------ tokens


def encode(tokenizer: Any, fmt: Format, question: str, answer: str, max_length: int = MAX_LENGTH) -> dict:
    """``{"input_ids", "labels", "padded"}`` of one row as closer-look encodes it (``padded``: the ids padded
    with EOS to ``max_length``, what its generation decodes)."""
    prompt = fmt.question_start + question + fmt.question_end
    n_prompt = len(tokenizer.tokenize(prompt, add_special_tokens=True))
    full = prompt + fmt.answer_tag + answer
    ids = list(tokenizer(full, add_special_tokens=True, max_length=max_length, truncation=True)["input_ids"])
    eos = int(tokenizer.eos_token_id)
    room = len(ids) < max_length
    labels = ids + [eos] if room else list(ids)
    if n_prompt >= len(labels):
        raise ValueError(
            f"the prompt fills closer-look's {max_length} tokens, leaving no answer: {question[:60]!r}"
        )
    labels[:n_prompt] = [IGNORE_INDEX] * n_prompt
    input_ids = ids + [eos] if room else ids
    return {"input_ids": input_ids, "labels": labels, "padded": ids + [eos] * (max_length - len(ids))}


def split_prompts(tokenizer: Any, fmt: Format, padded: Sequence[list[int]]) -> tuple[list[str], list[str]]:
    """The generation prompts and ground truths of encoded rows (``run_generation``'s decode and split)."""
    texts = tokenizer.batch_decode([list(p) for p in padded], skip_special_tokens=not fmt.keep_special)
    prompts, truths = [], []
    for i, s in enumerate(texts):
        parts = s.split(fmt.marker)
        if len(parts) < 2:
            raise ValueError(
                f"row {i}: the decoded row has no {fmt.marker!r} to split prompt from answer: {s[:80]!r}"
            )
        truth, prompt = parts[1], parts[0] + fmt.marker
        if fmt.keep_special:
            truth = truth.split(LLAMA3_TURN)[0]
            prompt = prompt.replace("<|begin_of_text|>", "")
        prompts.append(prompt)
        truths.append(truth)
    return prompts, truths


@torch.no_grad()
def generate(
    model: torch.nn.Module, tokenizer: Any, prompts: Sequence[str], batch_size: int = BATCH_SIZE,
    max_length: int = MAX_LENGTH,
) -> list[dict[str, Any]]:  # fmt: skip
    """Greedy answers to ``prompts`` as closer-look generates them: ``{"text", "ids"}`` per prompt (``ids``:
    the generated tokens before the first stop token, for asu's degenerate-answer check)."""
    eos = int(tokenizer.eos_token_id)
    stops = stop_token_ids(model, tokenizer)
    device = next(model.parameters()).device
    out: list[dict[str, Any]] = []
    for s in range(0, len(prompts), batch_size):
        enc = [list(tokenizer(p, add_special_tokens=True)["input_ids"]) for p in prompts[s : s + batch_size]]
        width = max(len(e) for e in enc)
        if width >= max_length:
            raise ValueError(
                f"rows {s}-{s + len(enc) - 1}: a prompt of {width} tokens leaves no room in closer-look's "
                f"{max_length}-token generation budget"
            )
        ids = torch.tensor([[eos] * (width - len(e)) + e for e in enc], device=device)
        mask = torch.tensor([[0] * (width - len(e)) + [1] * len(e) for e in enc], device=device)
        gen = model.generate(
            ids, attention_mask=mask, max_length=max_length, max_new_tokens=None, do_sample=False,
            use_cache=True, pad_token_id=eos,
        )[:, width:]  # fmt: skip
        texts = tokenizer.batch_decode(gen, skip_special_tokens=True)
        for row, text in zip(gen.tolist(), texts, strict=True):
            end = next((j for j, t in enumerate(row) if t in stops), len(row))
            out.append({"text": text, "ids": row[:end]})
    return out


def _losses(
    model: torch.nn.Module, tokenizer: Any, examples: list[dict], batch_size: int
) -> list[TokenScores]:
    """Teacher-forced scores of encoded rows (right-padded with EOS, which attention masks out)."""
    rows = [{"input_ids": e["input_ids"], "labels": e["labels"]} for e in examples]
    return teacher_forced(model, rows, batch_size, pad_token_id=int(tokenizer.eos_token_id))


# -------------------------------------------------------------------------------------------------- sets


@dataclass
class SetRun:
    """One evaluated set: closer-look's per-row log and asu's generation records."""

    log: dict[str, Any]
    generations: list[dict[str, Any]]


def _perturbed(row: dict[str, Any]) -> list[str]:
    p = row["perturbed_answer"]
    return [p] if isinstance(p, str) else list(p)


def _pair_losses(
    model: Any, tokenizer: Any, fmt: Format, pairs: list[tuple[str, str]], batch: int, max_length: int
) -> list[float]:
    scores = _losses(model, tokenizer, [encode(tokenizer, fmt, q, a, max_length) for q, a in pairs], batch)
    return [s.avg_loss for s in scores]


def evaluate_set(
    model: Any,
    tokenizer: Any,
    split: str,
    rows: Sequence[dict],
    fmt: Format,
    protocol: Protocol,
    judges: Judges,
) -> SetRun:
    """closer-look's per-set log of ``rows`` (already cut to the protocol's row count)."""
    general = _general(split)
    length = protocol.max_length
    answers = [encode(tokenizer, fmt, r["question"], r[protocol.answer_key], length) for r in rows]
    gt = _losses(model, tokenizer, answers, BATCH_SIZE)
    prompts, truths = split_prompts(tokenizer, fmt, [a["padded"] for a in answers])
    gens = generate(model, tokenizer, prompts, max_length=length)
    texts = [g["text"] for g in gens]
    rouge = [rouge_scores(t, g) for t, g in zip(truths, texts, strict=True)]
    small = max(1, BATCH_SIZE // 4)
    base_key = "answer" if general else "paraphrased_answer"
    base = _pair_losses(model, tokenizer, fmt, [(r["question"], r[base_key]) for r in rows], small, length)
    flat = [(i, r["question"], p) for i, r in enumerate(rows) for p in _perturbed(r)]
    per = max(len(_perturbed(r)) for r in rows)
    flat_losses = _pair_losses(model, tokenizer, fmt, [(q, p) for _, q, p in flat], small * per, length)
    perturb: list[list[float]] = [[] for _ in rows]
    for (i, _, _), loss in zip(flat, flat_losses, strict=True):
        perturb[i].append(loss)
    targets = [r["original_answer"] if general else r["answer"] for r in rows]
    embedded = judges.embed(texts + targets)
    cos = [formulas.cosine(embedded[i], embedded[len(texts) + i]) for i in range(len(texts))]
    nli_targets = targets if general else truths
    answer_first = split == "forget" or not protocol.tofu
    pairs = [(g, t) if answer_first else (t, g) for g, t in zip(texts, nli_targets, strict=True)]
    recalls = [r["rougeL_recall"] for r in rouge]
    log = {
        "avg_gt_loss": [s.avg_loss for s in gt],
        "num_token_gt": [len(s.label_ids) for s in gt],
        "rouge1_recall": [r["rouge1_recall"] for r in rouge],
        "rougeL_recall": recalls,
        "avg_paraphrased_loss": base,
        "average_perturb_loss": perturb,
        "generated_text": [list(x) for x in zip(prompts, texts, truths, targets, strict=True)],
        "cosine_similarity": cos,
        "entailment_labels": formulas.entailment_labels(judges.labels(pairs), recalls),
        "token_entropy": [formulas.token_entropy(tokenizer.tokenize(g)) for g in texts],
    }
    records = [{"generation": t, "ids": g["ids"]} for t, g in zip(texts, gens, strict=True)]
    return SetRun(log, records)


def evaluate(
    model: Any, tokenizer: Any, sets: Mapping[str, Sequence[dict]], fmt: Format, protocol: Protocol,
    judges: Judges,
) -> dict[str, SetRun]:  # fmt: skip
    """Every set of ``sets`` (keys of :data:`SETS`; each cut to the protocol's row count), in closer-look's
    order. The model is put in eval mode for the run and its previous mode restored."""
    unknown = set(sets) - set(SETS)
    if unknown:
        raise ValueError(f"closer-look evaluates the sets {', '.join(SETS)}, not {sorted(unknown)}")
    was_training = model.training
    model.eval()
    try:
        return {
            split: evaluate_set(
                model, tokenizer, split, list(sets[split])[: protocol.max_rows], fmt, protocol, judges
            )
            for split in SETS
            if split in sets
        }
    finally:
        model.train(was_training)


def attach(
    result: dict[str, Any], runs: Mapping[str, SetRun], settings: dict[str, Any], degenerate: bool
) -> None:
    """Add closer-look's numbers to an evaluation result (:func:`asu.evaluate.evaluate_model`'s layout):
    ``summary`` (``cl_*`` keys), ``added`` (the table's rows), ``files`` (``CLOSER_LOOK_EVAL.json``, its
    per-set logs in closer-look's layout, and ``CLOSER_LOOK_SUMMARY.json``, its ``get_eval_results`` names),
    ``generations`` (``cl_{set}``) and ``settings``; with ``degenerate``, asu's degenerate-answer shares of
    the generations (``cl_{set}_degenerate_answers``, ...) in ``extras``."""
    logs = {split: run.log for split, run in runs.items()}
    output = formulas.results(logs)
    summary = formulas.summary_keys(output)
    result["summary"].update(summary)
    result.setdefault("added", []).extend(summary)
    result.setdefault("descriptions", {}).update(formulas.descriptions(list(summary)))
    files = result.setdefault("files", {})
    files["CLOSER_LOOK_EVAL.json"] = {formulas.SET_FILES[s][0]: log for s, log in logs.items()}
    files["CLOSER_LOOK_SUMMARY.json"] = output
    for split, run in runs.items():
        result["generations"][f"cl_{split}"] = [g["generation"] for g in run.generations]
        if degenerate:
            entries = degenerate_entries(f"cl_{split}", run.generations)
            result["extras"].update(entries)
            result["metrics"].update(entries)
            result["summary"].update({k: v["agg_value"] for k, v in entries.items()})
    result.setdefault("settings", {})["closer_look"] = settings
