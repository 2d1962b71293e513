"""closer-look's metrics (sail-sg/closer-look-LLM-unlearning, ``metrics/metrics.py``): the currency of the
ASU paper's TOFU, continual and real-world tables. Pure functions of per-row numbers and strings; the model
side is :mod:`asu.closer_look`.

Per evaluated set (closer-look's ``get_all_evals``), for ``n`` rows, with ``L(a)`` the per-token mean NLL of
answer ``a`` (its tokens and the appended EOS, natural log) after the prompt, teacher-forced:

* **ROUGE**: mean ROUGE-L recall (``rouge_score``, stemmed) of the greedy answer against the ground truth;
* **Probability**: ``mean exp(-L(answer))`` on the retain and forget sets; on real authors / world facts the
  answer's share of all options, ``mean P(a) / (P(a) + Σ_k P(p_k))`` (no guard term);
* **Truth Ratio**: ``r = exp(mean_k L(p_k) - L(c))`` per row (``c`` the paraphrased answer on retain / forget,
  the answer on real authors / world facts; the mean over the perturbed answers' per-token losses); forget
  ``1 - mean min(r, 1/r)``, the others ``mean max(0, 1 - 1/r)`` (no guard terms);
* **Token Entropy**: mean over answers of ``-Σ_w f_w log2 f_w / log2 m`` over the ``m`` tokens of the answer
  re-tokenised (``tokenizer.tokenize``), ``f_w`` each distinct token's frequency; 0 for ``m <= 1``;
* **Cosine Similarity**: mean of ``max(0, cos(e(answer), e(target)))`` over sentence embeddings;
* **Entailment Score**: the share of rows an NLI model labels ``entailment``; a row whose ROUGE-L recall is
  below 0.1 is labelled ``none`` whatever the model says.

Aggregates (closer-look's ``get_eval_results``), over the components of every set present:

* **Model Utility** (MU): the harmonic mean of all six components of every set but the forget set (TOFU:
  retain, real authors, world facts: 18 numbers, token entropy and cosine similarity included); **Model
  Utility Retain**: the same over the retain set alone;
* **Forget Efficacy** (FE): ``1 - mean`` of the forget set's components without token entropy (ROUGE,
  probability, truth ratio, cosine similarity, entailment);
* **Avg**: ``(MU + FE) / 2``, the paper's "Avg." column (not in closer-look's code).

The ASU authors' copy of this code (Salehzz/ASU-unlearning, ``Right-to-be-forgotten/metrics/metrics.py``)
computes FE differently, and so do the ASU paper's tables: **FE (ASU)** is the harmonic mean of ``1 - ROUGE``,
``1 - Probability``, ``1 - Truth Ratio``, ``Token Entropy`` and ``1 - Entailment`` of the forget set (cosine
similarity left out). Both are computed; MU is the same in both.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from typing import Any

import numpy as np

from asu.metrics.tofu import harmonic_mean

#: closer-look's component names (``get_eval_results``' ``metrics``), in its order.
COMPONENTS = (
    "ROUGE",
    "Probability",
    "Truth Ratio",
    "Token Entropy",
    "Cosine Similarity",
    "Entailment Score",
)
#: A generation whose ROUGE-L recall is below this is labelled ``none`` instead of the NLI model's label.
ROUGE_FLOOR = 0.1
ENTAILMENT = "entailment"

#: asu's set name -> closer-look's per-set log file and the name its results carry.
SET_FILES = {
    "retain": ("eval_log.json", "Retain"),
    "ra": ("eval_real_author_wo_options.json", "Real Authors"),
    "wf": ("eval_real_world_wo_options.json", "Real World"),
    "forget": ("eval_log_forget.json", "Forget"),
}
#: The key of each component in asu's summary (``cl_{set}_{key}``).
SUMMARY_KEYS = {
    "ROUGE": "ROUGE",
    "Probability": "Prob",
    "Truth Ratio": "Truth_Ratio",
    "Token Entropy": "Token_Entropy",
    "Cosine Similarity": "Cosine_Similarity",
    "Entailment Score": "Entailment_Score",
}


def token_entropy(tokens: Sequence[str]) -> float:
    """Normalised entropy of the token frequencies of one answer of ``m`` tokens:
    ``-Σ_w f_w log2 f_w / log2 m``; 0 when ``m <= 1`` (closer-look's ``compute_token_entropy``)."""
    m = len(tokens)
    if m <= 1:
        return 0.0
    _, counts = np.unique(np.asarray(tokens, dtype=object).astype(str), return_counts=True)
    f = counts / m
    return float(np.sum(-f * np.log(f) / np.log(2)) / np.log2(m))


def cosine(a: Sequence[float], b: Sequence[float]) -> float:
    """``max(0, a·b / (|a| |b|))`` of two embeddings; 0 when either is the zero vector."""
    x, y = np.asarray(a, dtype=np.float64), np.asarray(b, dtype=np.float64)
    norm = float(np.linalg.norm(x) * np.linalg.norm(y))
    return max(0.0, float(x @ y) / norm) if norm > 0 else 0.0


def entailment_labels(nli_labels: Sequence[str], rouge_recalls: Sequence[float]) -> list[str]:
    """The NLI model's label per row, ``none`` where the row's ROUGE-L recall is below :data:`ROUGE_FLOOR`
    (closer-look: such an answer is taken as factually wrong)."""
    if len(nli_labels) != len(rouge_recalls):
        raise ValueError(f"{len(nli_labels)} NLI labels but {len(rouge_recalls)} ROUGE values")
    return [
        "none" if r < ROUGE_FLOOR else str(label) for label, r in zip(nli_labels, rouge_recalls, strict=True)
    ]


def entailment_score(labels: Sequence[str]) -> float:
    """The share of ``labels`` equal to ``entailment``."""
    if len(labels) == 0:
        raise ValueError("entailment_score of no rows")
    return sum(label == ENTAILMENT for label in labels) / len(labels)


def _losses(values: Any, name: str) -> np.ndarray:
    arr = np.asarray(values, dtype=np.float64)
    if arr.size == 0 or not np.isfinite(arr).all():
        raise ValueError(f"{name}: expected finite per-row losses, got {arr.size} values")
    return arr


def probability(avg_gt_loss: Sequence[float]) -> float:
    """Retain / forget sets: ``mean exp(-L(answer))``."""
    return float(np.mean(np.exp(-_losses(avg_gt_loss, "avg_gt_loss"))))


def normalised_probability(
    avg_gt_loss: Sequence[float], average_perturb_loss: Sequence[Sequence[float]]
) -> float:
    """Real authors / world facts: ``mean P(a) / (P(a) + Σ_k P(p_k))``, ``P = exp(-L)``."""
    true = np.exp(-_losses(avg_gt_loss, "avg_gt_loss"))
    false = [np.exp(-_losses(row, "average_perturb_loss")).sum() for row in average_perturb_loss]
    return float(np.mean(true / (true + np.asarray(false))))


def truth_ratio(
    avg_paraphrased_loss: Sequence[float], average_perturb_loss: Sequence[Sequence[float]], forget: bool
) -> float:
    """``r = exp(mean_k L(p_k) - L(c))`` per row; forget ``1 - mean min(r, 1/r)``, else
    ``mean max(0, 1 - 1/r)``."""
    c = _losses(avg_paraphrased_loss, "avg_paraphrased_loss")
    wrong = np.asarray([_losses(row, "average_perturb_loss").mean() for row in average_perturb_loss])
    if wrong.shape != c.shape:
        raise ValueError(f"{len(c)} paraphrase losses but {len(wrong)} rows of perturbed losses")
    r = np.exp(wrong - c)
    if forget:
        return float(1 - np.mean(np.minimum(r, 1 / r)))
    return float(np.mean(np.maximum(0, 1 - 1 / r)))


def components(log: Mapping[str, Any], split: str) -> dict[str, float]:
    """The six components of one set from its per-row log (closer-look's keys: ``avg_gt_loss``,
    ``average_perturb_loss``, ``avg_paraphrased_loss``, ``rougeL_recall``, ``token_entropy``,
    ``cosine_similarity``, ``entailment_labels``). ``split``: ``forget``, ``retain``, or a general set
    (``ra``, ``wf``: normalised probability)."""
    general = split not in ("forget", "retain")
    prob = (
        normalised_probability(log["avg_gt_loss"], log["average_perturb_loss"])
        if general
        else probability(log["avg_gt_loss"])
    )
    return {
        "ROUGE": float(np.mean(log["rougeL_recall"])),
        "Probability": prob,
        "Truth Ratio": truth_ratio(
            log["avg_paraphrased_loss"], log["average_perturb_loss"], split == "forget"
        ),
        "Token Entropy": float(np.mean(log["token_entropy"])),
        "Cosine Similarity": float(np.mean(log["cosine_similarity"])),
        "Entailment Score": entailment_score(log["entailment_labels"]),
    }


def forget_efficacy(forget: Mapping[str, float]) -> float:
    """closer-look's FE: ``1 - mean`` of the forget components without token entropy."""
    return float(1.0 - np.mean([v for k, v in forget.items() if k != "Token Entropy"]))


def forget_efficacy_asu(forget: Mapping[str, float]) -> float:
    """The ASU authors' FE: harmonic mean of ``1 - v`` for ROUGE, probability, truth ratio and entailment,
    and the token entropy itself (cosine similarity left out)."""
    parts = [v if k == "Token Entropy" else 1.0 - v for k, v in forget.items() if k != "Cosine Similarity"]
    return harmonic_mean(parts)


def aggregate(per_set: Mapping[str, Mapping[str, float]]) -> dict[str, float]:
    """MU, MU retain, FE, FE (ASU) and Avg from the components of each set (``{split: components}``);
    an aggregate whose sets are absent is left out."""
    out: dict[str, float] = {}
    utility = [v for split, comps in per_set.items() if split != "forget" for v in comps.values()]
    if utility:
        out["Model Utility"] = harmonic_mean(utility)
    if "retain" in per_set:
        out["Model Utility Retain"] = harmonic_mean(list(per_set["retain"].values()))
    if "forget" in per_set:
        out["Forget Efficacy"] = forget_efficacy(per_set["forget"])
        out["Forget Efficacy (ASU)"] = forget_efficacy_asu(per_set["forget"])
        if "Model Utility" in out:
            out["Avg"] = (out["Model Utility"] + out["Forget Efficacy"]) / 2
            out["Avg (ASU)"] = (out["Model Utility"] + out["Forget Efficacy (ASU)"]) / 2
    return out


def results(logs: Mapping[str, Mapping[str, Any]]) -> dict[str, float]:
    """closer-look's ``get_eval_results`` output for per-set logs keyed by asu's set names: ``"{Set}
    {component}"`` for every set (``Retain ROUGE``, ``Forget Truth Ratio``, ...) and the aggregates."""
    per_set = {split: components(log, split) for split, log in logs.items()}
    out = {f"{SET_FILES[s][1]} {name}": v for s, comps in per_set.items() for name, v in comps.items()}
    return out | aggregate(per_set)


#: Summary key of each aggregate of :func:`aggregate`.
AGGREGATE_KEYS = {
    "Model Utility": "cl_model_utility",
    "Model Utility Retain": "cl_model_utility_retain",
    "Forget Efficacy": "cl_forget_efficacy",
    "Avg": "cl_avg",
    "Forget Efficacy (ASU)": "cl_forget_efficacy_asu",
    "Avg (ASU)": "cl_avg_asu",
}


def summary_keys(output: Mapping[str, float]) -> dict[str, float]:
    """:func:`results`' names as asu's summary keys: ``cl_{set}_{component}`` and ``cl_model_utility`` etc."""
    names = {
        f"{label} {c}": f"cl_{split}_{SUMMARY_KEYS[c]}"
        for split, (_, label) in SET_FILES.items()
        for c in COMPONENTS
    }
    names |= AGGREGATE_KEYS
    return {names[k]: v for k, v in output.items() if k in names and math.isfinite(v)}


_COMPONENT_TEXT = {
    "ROUGE": "ROUGE-L recall of the greedy answer",
    "Probability": "answer probability (ra/wf: its share of the options)",
    "Truth Ratio": "truth ratio (forget: 1 - mean min(r, 1/r))",
    "Token Entropy": "normalised entropy of the answer's tokens",
    "Cosine Similarity": "embedding cosine of answer and target",
    "Entailment Score": "share of answers the NLI model calls entailment",
}
_AGGREGATE_TEXT = {
    "cl_model_utility": "MU: harmonic mean of every non-forget component",
    "cl_model_utility_retain": "harmonic mean of the retain components",
    "cl_forget_efficacy": "FE: 1 - mean forget ROUGE/Prob/TR/cos/entailment",
    "cl_avg": "(MU + FE) / 2",
    "cl_forget_efficacy_asu": "ASU authors' FE: hmean of 1-ROUGE/Prob/TR/entail, entropy",
    "cl_avg_asu": "(MU + FE (ASU)) / 2",
}


def descriptions(keys: Sequence[str]) -> dict[str, str]:
    """What each ``cl_*`` summary key measures, for the summary table."""
    out = {}
    for split, (_, label) in SET_FILES.items():
        for c in COMPONENTS:
            out[f"cl_{split}_{SUMMARY_KEYS[c]}"] = f"closer-look {label}: {_COMPONENT_TEXT[c]}"
    out |= {k: f"closer-look {v}" for k, v in _AGGREGATE_TEXT.items()}
    return {k: out[k] for k in keys if k in out}
