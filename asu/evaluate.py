"""TOFU-style evaluation of a causal LM on forget / retain / general QA rows (``asu eval``).

Every row is encoded with :mod:`asu.formatting` (the format the model was trained and unlearned in). For an
answer ``a`` of ``n`` tokens (EOS included) after prompt ``x``, teacher-forced:

* ``avg_loss(a) = -(1/n) Σ_t log p(a_t | x, a_<t)`` (natural log), the per-token mean NLL.
* **Probability** (TOFU, open-unlearning ``probability``): ``P(a) = exp(-avg_loss(a))``, the length-normalised
  answer probability; the aggregate is the mean over rows. On ``general`` rows (TOFU's world facts) TOFU
  normalises over the answer options instead: ``P(a) / (P(a) + Σ_k P(p_k))``, ``p_k`` the perturbed answers.
* **Truth ratio** (TOFU / open-unlearning, stored per row as false over true):
  ``TR = exp(-mean_k avg_loss(p_k)) / exp(-avg_loss(a_para))`` with ``a_para`` the paraphrased answer and
  ``p_k`` the perturbed ones, i.e. the geometric mean of the normalised perturbed probabilities over the
  normalised paraphrase probability. Aggregates: forget ``mean(min(TR, 1/TR))`` (closer to 1 is better: the
  model cannot tell true from false); retain and general ``mean(max(0, 1 - TR))`` (higher is better).
* **ROUGE-L recall** of the greedy generation against the answer (``rouge_score``, stemmer on, as TOFU).
* **Exact memorisation** (open-unlearning): the fraction of answer tokens whose teacher-forced argmax equals
  the label. **Extraction strength**: ``1 - k/n`` with ``k`` the smallest prefix length such that the
  teacher-forced argmax reproduces every answer token from position ``k`` on (``k = n`` when even the last
  token is wrong, giving 0).
* **Fluency** on forget prompts: token entropy of each generation,
  ``TE = -(1/log m) Σ_w (c_w/m) log(c_w/m)`` over the ``m`` generated tokens (EOS excluded, ``TE = 0`` when
  ``m < 2``); the fraction of generations that are well-formed sentences of the world's grammar (when a
  checker is given); and the fraction without a repeated token 3-gram in the first 10 generated tokens
  (degenerate "Jad Jad Jad" answers fail it).
* **Forget quality**: the p-value of the two-sample KS test (``scipy.stats.ks_2samp``, default method) between
  the forget truth ratios and a reference model's (the oracle trained without the forget set).
* **Model utility**: the harmonic mean of retain probability, retain ROUGE-L, retain truth ratio and, when
  general rows are given, the same three on general rows (TOFU uses retain, real authors and world facts).

Each metric is written as ``{"agg_value": float, "value_by_index": {"0": {"score": ...}, ...}}`` (the
open-unlearning layout); the forget statistics file has the legacy layout ``{"truth_ratio": {i: v},
"avg_gt_loss": {i: v}, "rougeL_recall": {i: v}}`` and serves as ``--reference`` for a later run.
"""

from __future__ import annotations

import json
import math
import os
import warnings
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch

from asu.files import atomic_write_json, atomic_write_text
from asu.formatting import encode_answer, encode_prompt

STATS_KEYS = ("truth_ratio", "avg_gt_loss", "rougeL_recall")
REPEAT_N = 3
REPEAT_WINDOW = 10


# --------------------------------------------------------------------------------------------------- data


def check_rows(rows: Sequence[dict[str, Any]], name: str) -> None:
    """Every row must carry string ``question`` and ``answer`` fields."""
    if not rows:
        raise ValueError(f"{name}: no rows")
    for i, r in enumerate(rows):
        for key in ("question", "answer"):
            if not isinstance(r.get(key), str) or not r[key]:
                raise ValueError(f"{name}: row {i} has no string field {key!r}")


def _has_field(rows: Sequence[dict[str, Any]], key: str) -> bool:
    if key == "perturbed_answer":
        return all(
            isinstance(r.get(key), list) and r[key] and all(isinstance(x, str) for x in r[key]) for r in rows
        )
    return all(isinstance(r.get(key), str) and r[key] for r in rows)


# ------------------------------------------------------------------------------------- model primitives


def _device(model: torch.nn.Module) -> torch.device:
    return next(model.parameters()).device


def _pad_id(tokenizer: Any) -> int:
    pad = tokenizer.pad_token_id
    return int(pad if pad is not None else tokenizer.eos_token_id)


@torch.no_grad()
def answer_scores(
    model: torch.nn.Module,
    tokenizer: Any,
    questions: Sequence[str],
    answers: Sequence[str],
    batch_size: int = 32,
) -> list[dict[str, Any]]:
    """Teacher-forced scores of ``answers[i]`` after the prompt of ``questions[i]``.

    Returns per pair ``{"avg_loss": float, "n_tokens": int, "correct": list[bool]}``: the per-token mean NLL
    over the answer tokens (EOS included) and, per answer token, whether the argmax prediction equals it.
    Sequences are right-padded; padded positions are masked out of attention and of the loss.
    """
    if len(questions) != len(answers):
        raise ValueError(f"{len(questions)} questions but {len(answers)} answers")
    device = _device(model)
    pad = _pad_id(tokenizer)
    out: list[dict[str, Any]] = []
    for s in range(0, len(questions), batch_size):
        encs = []
        for q, a in zip(questions[s : s + batch_size], answers[s : s + batch_size], strict=True):
            prompt, target = encode_prompt(tokenizer, q), encode_answer(tokenizer, a)
            encs.append((prompt + target, len(prompt)))
        width = max(len(ids) for ids, _ in encs)
        ids = torch.full((len(encs), width), pad, dtype=torch.long)
        mask = torch.zeros((len(encs), width), dtype=torch.long)
        for i, (seq, _) in enumerate(encs):
            ids[i, : len(seq)] = torch.tensor(seq)
            mask[i, : len(seq)] = 1
        logits = model(input_ids=ids.to(device), attention_mask=mask.to(device)).logits.float()
        logp = torch.log_softmax(logits[:, :-1], dim=-1)
        tgt = ids[:, 1:].to(device)
        nll = -logp.gather(-1, tgt.unsqueeze(-1)).squeeze(-1).cpu()
        hit = (logits[:, :-1].argmax(-1) == tgt).cpu()
        for i, (seq, n_prompt) in enumerate(encs):
            # Position t predicts token t+1: answer tokens n_prompt..len-1 are predicted at n_prompt-1..len-2.
            sl = slice(n_prompt - 1, len(seq) - 1)
            out.append(
                {
                    "avg_loss": float(nll[i, sl].mean()),
                    "n_tokens": len(seq) - n_prompt,
                    "correct": hit[i, sl].tolist(),
                }
            )
    return out


@torch.no_grad()
def generate_answers(
    model: torch.nn.Module,
    tokenizer: Any,
    questions: Sequence[str],
    batch_size: int = 32,
    max_new_tokens: int = 48,
    progress: bool = False,
    desc: str = "generating",
) -> list[dict[str, Any]]:
    """Greedy generations for each question's prompt, batched with left padding.

    Returns per question ``{"text": str, "ids": list[int]}``: the generated token ids up to (excluding) the
    first EOS and their decoded text, stripped.
    """
    from tqdm.auto import tqdm

    device = _device(model)
    pad = _pad_id(tokenizer)
    eos = tokenizer.eos_token_id
    out: list[dict[str, Any]] = []
    starts = range(0, len(questions), batch_size)
    for s in tqdm(starts, desc=desc, disable=not progress, leave=False):
        prompts = [encode_prompt(tokenizer, q) for q in questions[s : s + batch_size]]
        width = max(len(p) for p in prompts)
        ids = torch.full((len(prompts), width), pad, dtype=torch.long)
        mask = torch.zeros((len(prompts), width), dtype=torch.long)
        for i, p in enumerate(prompts):
            ids[i, width - len(p) :] = torch.tensor(p)
            mask[i, width - len(p) :] = 1
        gen = model.generate(
            input_ids=ids.to(device),
            attention_mask=mask.to(device),
            max_new_tokens=max_new_tokens,
            do_sample=False,
            eos_token_id=eos,
            pad_token_id=pad,
        )[:, width:].cpu()
        for row in gen.tolist():
            if eos in row:
                row = row[: row.index(eos)]
            out.append({"text": tokenizer.decode(row, skip_special_tokens=True).strip(), "ids": row})
    return out


# ---------------------------------------------------------------------------------------- pure metrics

_SCORER = None


def rouge_l_recall(reference: str, prediction: str) -> float:
    """ROUGE-L recall of ``prediction`` against ``reference`` (LCS / reference length, stemmed words)."""
    global _SCORER
    if _SCORER is None:
        from rouge_score import rouge_scorer

        _SCORER = rouge_scorer.RougeScorer(["rougeL"], use_stemmer=True)
    return float(_SCORER.score(reference, prediction)["rougeL"].recall)


def truth_ratio(paraphrased_loss: float, perturbed_losses: Sequence[float]) -> float:
    """``exp(-mean_k L_k) / exp(-L_para) = exp(L_para - mean_k L_k)`` from per-token mean NLLs.

    ``L_para`` is the paraphrased answer's loss, ``L_k`` the perturbed answers'; the ratio is false over true.
    """
    if len(perturbed_losses) == 0:
        raise ValueError("truth_ratio needs at least one perturbed answer")
    return float(math.exp(paraphrased_loss - float(np.mean(perturbed_losses))))


def extraction_strength(correct: Sequence[bool]) -> float:
    """``1 - k/n``, ``k`` the smallest index from which every teacher-forced prediction is correct."""
    n = len(correct)
    if n == 0:
        raise ValueError("extraction_strength of an empty answer")
    k = n
    while k > 0 and correct[k - 1]:
        k -= 1
    return 1.0 - k / n


def token_entropy(ids: Sequence[int]) -> float:
    """Normalised entropy of the token frequencies of one generation (1 when all tokens differ)."""
    m = len(ids)
    if m < 2:
        return 0.0
    _, counts = np.unique(np.asarray(ids), return_counts=True)
    f = counts / m
    return float(-(f * np.log(f)).sum() / math.log(m))


def has_repeat(ids: Sequence[int], n: int = REPEAT_N, window: int = REPEAT_WINDOW) -> bool:
    """Whether some token n-gram occurs twice (overlaps allowed) among the first ``window`` tokens."""
    head = list(ids[:window])
    grams = [tuple(head[i : i + n]) for i in range(len(head) - n + 1)]
    return len(set(grams)) < len(grams)


def forget_quality(
    truth_ratios: Sequence[float], reference_truth_ratios: Sequence[float]
) -> dict[str, float]:
    """Two-sample KS test of truth ratios against the reference model's: ``{"pvalue", "statistic"}``."""
    from scipy.stats import ks_2samp

    a, b = np.asarray(truth_ratios, dtype=float), np.asarray(reference_truth_ratios, dtype=float)
    if a.size == 0 or b.size == 0:
        raise ValueError("forget_quality needs non-empty truth-ratio samples")
    if not (np.isfinite(a).all() and np.isfinite(b).all()):
        raise ValueError("forget_quality: truth ratios must be finite")
    res = ks_2samp(a, b)
    return {"pvalue": float(res.pvalue), "statistic": float(res.statistic)}


def harmonic_mean(values: Sequence[float]) -> float:
    """Harmonic mean; 0 when any value is 0 (a model that fails one side has no utility)."""
    v = np.asarray(values, dtype=float)
    if v.size == 0:
        raise ValueError("harmonic_mean of nothing")
    if (v < 0).any():
        raise ValueError(f"harmonic_mean of negative values: {v.tolist()}")
    if (v == 0).any():
        return 0.0
    return float(v.size / (1.0 / v).sum())


def load_reference_stats(path: str | os.PathLike[str]) -> dict[str, dict[str, float]]:
    """Read a statistics file (``{"truth_ratio": {index: value}, ...}``) and check its shape."""
    p = Path(path)
    if not p.is_file():
        raise FileNotFoundError(f"reference statistics not found: {p}")
    try:
        stats = json.loads(p.read_text(encoding="utf-8"))
    except json.JSONDecodeError as e:
        raise ValueError(f"{p}: not valid JSON ({e})") from None
    validate_stats(stats, str(p))
    return stats


def validate_stats(stats: Any, name: str = "reference statistics", n_items: int | None = None) -> None:
    """A statistics dict needs ``truth_ratio`` mapping item index -> finite float (``n_items`` of them)."""
    if not isinstance(stats, dict) or not isinstance(stats.get("truth_ratio"), dict):
        raise ValueError(f"{name}: expected an object with a 'truth_ratio' mapping of item index -> value")
    tr = stats["truth_ratio"]
    for k, v in tr.items():
        if not isinstance(v, (int, float)) or not math.isfinite(v):
            raise ValueError(f"{name}: truth_ratio[{k!r}] = {v!r} is not a finite number")
    if n_items is not None and len(tr) != n_items:
        raise ValueError(
            f"{name}: {len(tr)} reference truth ratios but {n_items} forget rows; the reference must "
            "come from the same forget set"
        )


def stats_values(stats: dict[str, dict[str, float]], key: str = "truth_ratio") -> list[float]:
    """The per-item values of one statistic, ordered by integer index."""
    return [float(v) for _, v in sorted(stats[key].items(), key=lambda kv: int(kv[0]))]


# ----------------------------------------------------------------------------------------- evaluation


def _metric(
    values: Sequence[Any], agg: float, extra: Sequence[dict[str, Any]] | None = None
) -> dict[str, Any]:
    by_index = {}
    for i, v in enumerate(values):
        entry = {"score": v}
        if extra is not None:
            entry.update(extra[i])
        by_index[str(i)] = entry
    return {"agg_value": float(agg), "value_by_index": by_index}


def _split_metrics(
    model: torch.nn.Module,
    tokenizer: Any,
    rows: Sequence[dict[str, Any]],
    split: str,
    batch_size: int,
    max_new_tokens: int,
    well_formed: Callable[[str], bool] | None,
    progress: bool,
    fluency: bool,
) -> tuple[dict[str, dict[str, Any]], dict[str, Any]]:
    questions = [r["question"] for r in rows]
    answers = [r["answer"] for r in rows]
    metrics: dict[str, dict[str, Any]] = {}
    raw: dict[str, Any] = {}

    gt = answer_scores(model, tokenizer, questions, answers, batch_size)
    losses = [g["avg_loss"] for g in gt]
    probs = [math.exp(-x) for x in losses]
    raw["avg_gt_loss"] = losses
    gens = generate_answers(
        model, tokenizer, questions, batch_size, max_new_tokens, progress=progress, desc=f"{split} generation"
    )
    rouge = [rouge_l_recall(a, g["text"]) for a, g in zip(answers, gens, strict=True)]
    raw["rougeL_recall"] = rouge
    raw["generations"] = [g["text"] for g in gens]
    metrics[f"{split}_rouge"] = _metric(
        rouge,
        np.mean(rouge),
        [
            {"input": q, "ground_truth": a, "generation": g["text"]}
            for q, a, g in zip(questions, answers, gens, strict=True)
        ],
    )
    em = [float(np.mean(g["correct"])) for g in gt]
    es = [extraction_strength(g["correct"]) for g in gt]
    metrics[f"{split}_exact_memorization"] = _metric(em, np.mean(em))
    metrics[f"{split}_extraction_strength"] = _metric(es, np.mean(es))

    has_para = _has_field(rows, "paraphrased_answer")
    pert_losses: list[list[float]] | None = None
    if _has_field(rows, "perturbed_answer"):
        pert_losses = _perturbed_losses(model, tokenizer, rows, batch_size)
    else:
        warnings.warn(f"{split}: rows lack 'perturbed_answer'; truth ratio skipped", stacklevel=2)

    if split == "general" and pert_losses is not None:
        # TOFU's world-facts probability: normalised over the answer options.
        probs = [p / (p + sum(math.exp(-x) for x in pl)) for p, pl in zip(probs, pert_losses, strict=True)]
    metrics[f"{split}_prob"] = _metric(probs, np.mean(probs))
    raw["prob"] = probs

    if pert_losses is not None and not has_para:
        warnings.warn(f"{split}: rows lack 'paraphrased_answer'; truth ratio skipped", stacklevel=2)
    if pert_losses is not None and has_para:
        para = answer_scores(model, tokenizer, questions, [r["paraphrased_answer"] for r in rows], batch_size)
        tr = [truth_ratio(p["avg_loss"], pl) for p, pl in zip(para, pert_losses, strict=True)]
        raw["truth_ratio"] = tr
        arr = np.asarray(tr)
        if split == "forget":
            agg = float(np.mean(np.minimum(arr, 1.0 / np.maximum(arr, 1e-10))))
        else:
            agg = float(np.mean(np.maximum(0.0, 1.0 - arr)))
        metrics[f"{split}_truth_ratio"] = _metric(tr, agg)

    if fluency:
        metrics.update(_fluency_metrics(split, gens, well_formed))
    return metrics, raw


def _perturbed_losses(
    model: torch.nn.Module, tokenizer: Any, rows: Sequence[dict[str, Any]], batch_size: int
) -> list[list[float]]:
    """Per row, the per-token mean NLL of each of its perturbed answers (all rows' answers batched)."""
    flat_q, flat_a, owner = [], [], []
    for i, r in enumerate(rows):
        for p in r["perturbed_answer"]:
            flat_q.append(r["question"])
            flat_a.append(p)
            owner.append(i)
    scores = answer_scores(model, tokenizer, flat_q, flat_a, batch_size)
    losses: list[list[float]] = [[] for _ in rows]
    for i, s in zip(owner, scores, strict=True):
        losses[i].append(s["avg_loss"])
    return losses


def _fluency_metrics(
    split: str, gens: list[dict[str, Any]], well_formed: Callable[[str], bool] | None
) -> dict[str, dict[str, Any]]:
    """Token entropy, no-repeat fraction and (with a checker) well-formed fraction of the generations."""
    te = [token_entropy(g["ids"]) for g in gens]
    no_rep = [0.0 if has_repeat(g["ids"]) else 1.0 for g in gens]
    metrics = {
        f"{split}_token_entropy": _metric(te, np.mean(te)),
        f"{split}_no_repeat": _metric(no_rep, np.mean(no_rep)),
    }
    if well_formed is not None:
        wf = [1.0 if well_formed(g["text"]) else 0.0 for g in gens]
        metrics[f"{split}_well_formed"] = _metric(wf, np.mean(wf))
    return metrics


def evaluate_model(
    model: torch.nn.Module,
    tokenizer: Any,
    forget_rows: Sequence[dict[str, Any]],
    retain_rows: Sequence[dict[str, Any]] | None = None,
    general_rows: Sequence[dict[str, Any]] | None = None,
    reference_stats: dict[str, dict[str, float]] | None = None,
    batch_size: int = 32,
    max_new_tokens: int = 48,
    well_formed: Callable[[str], bool] | None = None,
    progress: bool = False,
) -> dict[str, Any]:
    """Evaluate ``model`` on the forget rows (and retain / general rows when given).

    Returns ``{"metrics": {name: {"agg_value", "value_by_index"}}, "summary": {name: agg_value},
    "stats": {"truth_ratio": {i: v}, "avg_gt_loss": {...}, "rougeL_recall": {...}}, "generations": {split:
    [text]}}``. ``stats`` describes the forget rows and is what a later run takes as ``reference_stats``;
    with ``reference_stats`` the ``forget_quality`` metric is added, with retain rows ``model_utility``.
    The model is put in eval mode for the run and its previous mode restored.
    """
    check_rows(forget_rows, "forget rows")
    if retain_rows is not None:
        check_rows(retain_rows, "retain rows")
    if general_rows is not None:
        check_rows(general_rows, "general rows")
    if reference_stats is not None:
        validate_stats(reference_stats, n_items=len(forget_rows))
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"batch_size ({batch_size}) and max_new_tokens ({max_new_tokens}) must be >= 1")

    was_training = model.training
    model.eval()
    try:
        metrics: dict[str, dict[str, Any]] = {}
        generations: dict[str, list[str]] = {}
        raws: dict[str, dict[str, Any]] = {}
        for split, rows in (("forget", forget_rows), ("retain", retain_rows), ("general", general_rows)):
            if rows is None:
                continue
            m, raw = _split_metrics(
                model,
                tokenizer,
                rows,
                split,
                batch_size,
                max_new_tokens,
                well_formed,
                progress,
                fluency=split == "forget",
            )
            metrics.update(m)
            generations[split] = raw["generations"]
            raws[split] = raw
    finally:
        model.train(was_training)

    fr = raws["forget"]
    stats = {k: {str(i): float(v) for i, v in enumerate(fr[k])} for k in STATS_KEYS if k in fr}
    if reference_stats is not None:
        if "truth_ratio" not in fr:
            warnings.warn("forget quality skipped: forget rows have no truth ratio", stacklevel=2)
        else:
            fq = forget_quality(fr["truth_ratio"], stats_values(reference_stats))
            metrics["forget_quality"] = {
                "agg_value": fq["pvalue"],
                "value_by_index": {},
                "statistic": fq["statistic"],
            }
    if retain_rows is not None:
        parts = [f"{s}_{m}" for s in ("retain", "general") for m in ("prob", "rouge", "truth_ratio")]
        parts = [p for p in parts if p in metrics]
        metrics["model_utility"] = {
            "agg_value": harmonic_mean([metrics[p]["agg_value"] for p in parts]),
            "value_by_index": {},
            "components": parts,
        }
    summary = {k: v["agg_value"] for k, v in metrics.items()}
    return {"metrics": metrics, "summary": summary, "stats": stats, "generations": generations}


def evaluate_smoothed(
    model: torch.nn.Module,
    tokenizer: Any,
    forget_rows: Sequence[dict[str, Any]],
    temperatures: Sequence[float],
    retain_rows: Sequence[dict[str, Any]] | None = None,
    general_rows: Sequence[dict[str, Any]] | None = None,
    layers: str | Sequence[int] | None = None,
    batch_size: int = 32,
    max_new_tokens: int = 48,
    well_formed: Callable[[str], bool] | None = None,
    progress: bool = False,
) -> list[dict[str, Any]]:
    """The τ preview: evaluate the model with every attention softmax at temperature τ (no training).

    ASU's student converges to this smoothed teacher on forget prompts, so its forget ROUGE / probability /
    fluency predict what unlearning at τ reaches. Returns one ``{"temperature": τ, "summary": {...}}`` per τ.
    """
    from asu.smoothing import smoothing

    out = []
    for tau in temperatures:
        if not (isinstance(tau, (int, float)) and math.isfinite(tau) and tau > 0):
            raise ValueError(f"temperature must be a positive number, got {tau!r}")
        with smoothing(model, temperature=float(tau), layers=layers):
            res = evaluate_model(
                model,
                tokenizer,
                forget_rows,
                retain_rows,
                general_rows,
                batch_size=batch_size,
                max_new_tokens=max_new_tokens,
                well_formed=well_formed,
                progress=progress,
            )
        out.append({"temperature": float(tau), "summary": res["summary"], "generations": res["generations"]})
    return out


# ------------------------------------------------------------------------------------------- writing


def markdown_table(columns: dict[str, dict[str, float]], metric_names: Sequence[str] | None = None) -> str:
    """A markdown table with one row per metric and one column per named summary."""
    names = list(metric_names) if metric_names is not None else []
    if not names:
        for summary in columns.values():
            names += [k for k in summary if k not in names]
    head = "| metric | " + " | ".join(columns) + " |\n|---|" + "---|" * len(columns) + "\n"
    body = ""
    for n in names:
        cells = []
        for summary in columns.values():
            v = summary.get(n)
            cells.append("" if v is None else (f"{v:.3g}" if abs(v) < 1e-3 and v != 0 else f"{v:.3f}"))
        body += f"| {n} | " + " | ".join(cells) + " |\n"
    return head + body


def write_results(result: dict[str, Any], out_dir: str | os.PathLike[str]) -> None:
    """One JSON per metric, ``stats.json`` (forget statistics, usable as a reference), ``summary.json``,
    ``summary.md`` and ``generations.json`` under ``out_dir``, each written atomically."""
    out = Path(out_dir)
    for name, m in result["metrics"].items():
        atomic_write_json(out / f"{name}.json", m)
    atomic_write_json(out / "stats.json", result["stats"])
    atomic_write_json(out / "summary.json", result["summary"])
    atomic_write_json(out / "generations.json", result["generations"])
    atomic_write_text(out / "summary.md", markdown_table({"value": result["summary"]}))
