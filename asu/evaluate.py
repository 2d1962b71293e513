"""``asu eval``'s library: TOFU's evaluation exactly as open-unlearning computes it, membership inference and
``privleak``, MUSE's raw-text evaluation, asu's own additions, and the files they are written to.

TOFU (:func:`evaluate_model`)
    Sets: ``forget`` and ``retain`` rows (``question``, ``answer``, ``paraphrased_answer``,
    ``perturbed_answer``), general sets by name (TOFU's ``ra``, real authors, and ``wf``, world facts:
    ``question``, ``answer``, ``perturbed_answer``), and a ``holdout`` set (``question``, ``answer``) for
    membership inference. Each metric is named and computed as in open-unlearning's ``configs/eval/tofu*``
    (formulas in :mod:`asu.metrics.tofu` and :mod:`asu.metrics.privacy`):

    * per set ``S``: ``S_Q_A_Prob`` (the answer), ``S_Q_A_PARA_Prob`` / ``S_Q_A_PERT_Prob`` (paraphrase /
      perturbed answers), ``S_Q_A_ROUGE`` (ROUGE-L recall of the greedy answer: at most 200 new tokens,
      batches left-padded), the truth ratio ``forget_truth_ratio`` / ``retain_Truth_Ratio`` /
      ``ra_Truth_Ratio`` / ``wf_Truth_Ratio``, and for general sets ``S_Q_A_Prob_normalised``;
    * on the forget set: ``extraction_strength``, ``exact_memorization``, ``forget_quality`` (against the
      reference model's ``forget_truth_ratio``), and with a holdout set ``mia_loss``, ``mia_zlib``,
      ``mia_min_k``, ``mia_min_k_plus_plus`` and ``privleak`` (against the reference's ``mia_min_k``);
    * ``model_utility``: the harmonic mean of every retain and general set's probability (normalised for
      general sets), ROUGE and truth ratio: TOFU's nine parts with ``retain``, ``ra`` and ``wf``.

    Plain ``question`` / ``answer`` rows are enough: a metric whose field no row of its set has is left out
    and named, with the field that would enable it, in one note; a field on some rows but not all is an
    error naming the rows; ``skip`` leaves metrics out deliberately and ``require`` (or ``"all"``) makes a
    missing field an error, every problem of the inputs in one message. Each question + answer is cut to
    ``max_length`` tokens (512, open-unlearning's), as training cuts it (the end of the answer goes); the
    text is bounded before it is tokenised (:func:`asu.data.bound_text`), so a huge row costs what a row at
    the budget costs.

MUSE (:func:`evaluate_muse`)
    ``forget_verbmem_ROUGE`` (ROUGE-L F1 of 128-token continuations of forget-document prefixes),
    ``forget_knowmem_ROUGE`` / ``retain_knowmem_ROUGE`` (ROUGE-L F1 of few-shot answers), the MIA metrics and
    ``privleak`` on forget vs holdout documents, ``extraction_strength`` / ``exact_memorization`` on the
    VerbMem samples (settings in :mod:`asu.metrics.muse`).

asu's additions (kept out of the open-unlearning files)
    ``extraction_strength_paper`` (:func:`asu.metrics.tofu.extraction_strength_paper`), the fluency of the
    forget generations (``forget_token_entropy``, ``forget_no_repeat``, ``forget_well_formed`` with a grammar
    checker; an empty answer is not fluent in any of them), per evaluated set ``S`` the shares of greedy
    answers that are no answer at all (``S_immediate_stop`` ⊆ ``S_empty_answers`` ⊆
    ``S_degenerate_answers``, :func:`asu.metrics.text.degenerate_reason`; a warning in ``warnings`` and
    above the table when a set's degenerate share reaches :data:`asu.metrics.report.DEGENERATE_WARNING`) and,
    on rows that carry ``facts``, ``S_fact_leakage_any`` / ``S_fact_leakage_all``
    (:func:`asu.metrics.text.fact_leakage`). open-unlearning's own metrics are unchanged by degenerate
    answers: an empty generation scores ROUGE 0 there as here.

Files (:func:`write_results`)
    ``TOFU_EVAL.json`` + ``TOFU_SUMMARY.json`` (or ``MUSE_*``) in open-unlearning's layout and naming (every
    metric ``{"agg_value", "value_by_index": {"0": {...}}}``, per-row keys ``prob`` / ``avg_loss`` /
    ``rougeL_recall`` / ``score``; the summary holds the headline metrics), ``ASU_EVAL.json`` (asu's
    additions, same layout), ``summary.json`` (every aggregate), ``summary.md`` (the table for people),
    ``generations.json``. ``TOFU_EVAL.json`` of a retain-only model, asu's or open-unlearning's, is the
    ``--reference`` of a later run. A metric that comes out NaN or infinite is written as ``null`` (the files
    stay valid JSON) and named in ``notes``.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Collection, Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import torch

from asu.data import Rows, bound_text
from asu.metrics import privacy, tofu
from asu.metrics.layout import (
    Reference,
    degenerate_entries,
    fluency_entries,
    leakage_entries,
    load_reference_stats,
    memorisation_entries,
    mia_entries,
    normalised_entry,
    options_entry,
    prob_entry,
    reference_from,
    rouge_entry,
    stats_values,
    truth_ratio_entry,
    validate_stats,
)
from asu.metrics.muse import (
    DOCUMENT_MAX_TOKENS,
    KNOWMEM_MAX_NEW_TOKENS,
    KNOWMEM_STOPWORDS,
    VERBMEM_MAX_NEW_TOKENS,
    VERBMEM_PREFIX_TOKENS,
    cut_at_stopwords,
)
from asu.metrics.report import (
    LEGACY_SUMMARY_KEYS,
    degenerate_warnings,
    markdown_table,
    summary_table,
    write_results,
)
from asu.metrics.scoring import (
    TokenScores,
    encode_document,
    encode_knowmem,
    encode_pair,
    encode_question,
    greedy_generate,
    pad_id,
    split_document,
    teacher_forced,
)
from asu.metrics.text import has_repeat, rouge_l_recall, rouge_scores, token_entropy
from asu.metrics.tofu import extraction_strength, forget_quality, harmonic_mean, truth_ratio

__all__ = [
    "LEGACY_SUMMARY_KEYS",
    "TOFU_HEADLINE",
    "TOFU_MAX_LENGTH",
    "TOFU_MAX_NEW_TOKENS",
    "Reference",
    "check_rows",
    "check_tofu_inputs",
    "evaluate_model",
    "evaluate_muse",
    "evaluate_smoothed",
    "extraction_strength",
    "forget_quality",
    "generate_answers",
    "harmonic_mean",
    "has_repeat",
    "load_reference_stats",
    "markdown_table",
    "reference_from",
    "rouge_l_recall",
    "stats_values",
    "summary_table",
    "token_entropy",
    "truth_ratio",
    "validate_stats",
    "write_results",
]

TOFU_MAX_NEW_TOKENS = 200  # open-unlearning's configs/generation/default.yaml (and TOFU's)
TOFU_MAX_LENGTH = 512  # open-unlearning's configs/data/datasets/TOFU_QA_*.yaml max_length
DEFAULT_GENERAL = "wf"  # a general set given without a name: world facts
MIA_METRICS = ("mia_loss", "mia_zlib", "mia_min_k", "mia_min_k_plus_plus")
#: Metrics the summary files list, as open-unlearning's evaluators (with every MIA attack enabled).
TOFU_HEADLINE = (
    "forget_truth_ratio",
    "forget_quality",
    "forget_Q_A_Prob",
    "forget_Q_A_ROUGE",
    "model_utility",
    "privleak",
    "extraction_strength",
    "exact_memorization",
    *MIA_METRICS,
)
MUSE_HEADLINE = (
    "forget_knowmem_ROUGE",
    "retain_knowmem_ROUGE",
    "forget_verbmem_ROUGE",
    "privleak",
    "extraction_strength",
    "exact_memorization",
    *MIA_METRICS,
)
TOFU_UTILITY_PARTS = tuple(
    f"{s}_{m}"
    for s, ms in (
        ("retain", ("Q_A_Prob", "Q_A_ROUGE", "Truth_Ratio")),
        ("ra", ("Q_A_Prob_normalised", "Q_A_ROUGE", "Truth_Ratio")),
        ("wf", ("Q_A_Prob_normalised", "Q_A_ROUGE", "Truth_Ratio")),
    )
    for m in ms
)


# --------------------------------------------------------------------------------------------------- rows


def _usable(value: Any, key: str) -> bool:
    if key == "perturbed_answer":
        if isinstance(value, str):
            return bool(value)
        return isinstance(value, list) and bool(value) and all(isinstance(x, str) and x for x in value)
    if key == "facts":
        return isinstance(value, list) and bool(value) and all(isinstance(x, str) and x for x in value)
    return isinstance(value, str) and bool(value)


def check_rows(
    rows: Rows,
    name: str,
    fields: Sequence[str] = ("question", "answer"),
    needed_by: str | None = None,
) -> None:
    """Every row must carry every field of ``fields`` (strings; ``perturbed_answer`` a string or a list of
    strings; ``facts`` a list of strings). The error names the set, the row, the field and what needs it."""
    if not rows:
        raise ValueError(f"{name}: no rows")
    for key in fields:
        for i, r in enumerate(rows):
            if not _usable(r.get(key), key):
                why = f" (needed by {needed_by}; add it to every row or skip the metric)" if needed_by else ""
                raise ValueError(f"{name}: row {i} has no usable {key!r}{why}")


def _options(row: dict[str, Any]) -> list[str]:
    p = row["perturbed_answer"]
    return [p] if isinstance(p, str) else list(p)


def _general_sets(general_rows: Any) -> dict[str, Rows]:
    """``general_rows`` as ``{name: rows}``: a mapping as given, a bare list of rows as world facts."""
    if general_rows is None:
        return {}
    if isinstance(general_rows, Mapping):
        for name in general_rows:
            if not (isinstance(name, str) and name.isidentifier()):
                raise ValueError(
                    f"general set name {name!r} must be a word (letters, digits, _), e.g. ra or wf"
                )
            if name in ("forget", "retain", "holdout"):
                raise ValueError(f"general set name {name!r} is taken by another set")
        return dict(general_rows)
    return {DEFAULT_GENERAL: general_rows}


def _truth_ratio_name(split: str) -> str:
    return "forget_truth_ratio" if split == "forget" else f"{split}_Truth_Ratio"


def _field_metrics(name: str, paraphrase: bool) -> dict[str, tuple[str, ...]]:
    """The metrics of set ``name`` that need fields beyond ``question`` / ``answer``: metric -> fields.

    ``paraphrase``: forget and retain sets, whose truth ratio compares the perturbed answers with the
    paraphrase; general sets compare them with the answer and add the normalised probability."""
    tr = _truth_ratio_name(name)
    if paraphrase:
        return {tr: ("paraphrased_answer", "perturbed_answer")}
    return {tr: ("perturbed_answer",), f"{name}_Q_A_Prob_normalised": ("perturbed_answer",)}


def _skippable(generals: Collection[str]) -> set[str]:
    names = set(_field_metrics("forget", True)) | set(_field_metrics("retain", True))
    for g in generals:
        names |= set(_field_metrics(g, False))
    return names


def _names(metrics: Collection[str]) -> set[str]:
    """A set of metric names; one name given as a string is that name, not its letters."""
    return {metrics} if isinstance(metrics, str) else set(metrics)


def _missing_rows(rows: Sequence[dict], key: str) -> list[int]:
    return [i for i, r in enumerate(rows) if not _usable(r.get(key), key)]


def _rows_text(bad: Sequence[int], n: int) -> str:
    """``row 3`` / ``rows 3, 7, 12 and 5 more`` (of ``n``)."""
    if len(bad) == 1:
        return f"row {bad[0]}"
    shown = ", ".join(map(str, bad[:3]))
    return f"rows {shown}" + (f" and {len(bad) - 3} more" if len(bad) > 3 else "") + f" (of {n})"


@dataclass
class _Plan:
    """What :func:`_plan_tofu` decided before any model work."""

    leave_out: set[str]
    """Metrics not computed: skipped by the caller, or needing a field no row of their set has."""
    notes: list[str]


def _field_problems(
    name: str, rows: Sequence[dict], paraphrase: bool, skip: set[str], require: set[str]
) -> tuple[dict[str, tuple[str, ...]], list[str]]:
    """For one set: the metrics to leave out (metric -> the fields no row has) and the problems (a field on
    some rows but not all, or no row with a field a required metric needs)."""
    absent: dict[str, tuple[str, ...]] = {}
    problems = []
    partial: dict[str, list[str]] = {}  # a field on some rows only -> the metrics that need it
    for metric, fields in _field_metrics(name, paraphrase).items():
        if metric in skip:
            continue
        lacking = []
        for key in fields:
            bad = _missing_rows(rows, key)
            if len(bad) == len(rows):
                lacking.append(key)
            elif bad:
                partial.setdefault(key, []).append(metric)
        if lacking and metric in require:
            problems.append(
                f"{name} rows: no row has {', '.join(map(repr, lacking))} (needed by {metric}, which was "
                "required)"
            )
        elif lacking:
            absent[metric] = tuple(lacking)
    for key, metrics in partial.items():
        bad = _missing_rows(rows, key)
        verb = "has" if len(bad) == 1 else "have"
        problems.append(
            f"{name} rows: {_rows_text(bad, len(rows))} {verb} no usable {key!r} (needed by "
            f"{', '.join(metrics)}; add it to every row or skip the metric)"
        )
    return absent, problems


def _plan_tofu(
    sets: Sequence[tuple[str, Sequence[dict] | None, bool]],
    holdout: Sequence[dict] | None,
    skip: set[str],
    require: Collection[str],
) -> _Plan:
    """Every field every metric needs, before any model work.

    A metric whose field no row of its set has is left out, named in one note with the field that would
    enable it; a field on some rows only, or missing for a metric in ``require`` (``"all"``: every such
    metric of the sets given), is a problem, and every problem is raised at once in one ValueError."""
    generals = [name for name, _, paraphrase in sets if not paraphrase]
    known = _skippable(generals)
    given = {m for name, rows, p in sets if rows is not None for m in _field_metrics(name, p)}
    require = set(given - skip) if "all" in require else set(require)
    problems = []
    for flag, names in (("skip", skip - known), ("require", require - known)):
        if names:
            problems.append(f"cannot {flag} {sorted(names)}; metrics with fields to check: {sorted(known)}")
    if skip & require:
        problems.append(f"{sorted(skip & require)} both skipped and required")
    if require & (known - given):
        problems.append(f"{sorted(require & (known - given))} required, but their sets are not given")
    absent: dict[str, tuple[str, tuple[str, ...]]] = {}
    for name, rows, paraphrase in sets:
        if rows is None:
            continue
        check_rows(rows, f"{name} rows")
        lacking, found = _field_problems(name, rows, paraphrase, skip, require)
        absent |= {metric: (name, fields) for metric, fields in lacking.items()}
        problems += found
        _check_facts(rows, f"{name} rows")
    if holdout is not None:
        check_rows(holdout, "holdout rows")
    if problems:
        raise ValueError("; ".join(problems))
    notes = []
    if absent:
        parts = [f"{m} ({name} rows: {', '.join(map(repr, f))})" for m, (name, f) in absent.items()]
        notes.append("left out, their sets lack the fields that would enable them: " + "; ".join(parts))
    return _Plan(set(skip) | set(absent), notes)


def _tofu_sets(
    forget_rows: Rows, retain_rows: Rows | None, generals: Mapping[str, Rows]
) -> list[tuple[str, Rows | None, bool]]:
    """``(name, rows, paraphrase)`` of every TOFU QA set, in evaluation order (see :func:`_field_metrics`)."""
    return [("forget", forget_rows, True), ("retain", retain_rows, True)] + [
        (g, rows, False) for g, rows in generals.items()
    ]


def check_tofu_inputs(
    forget_rows: Rows,
    retain_rows: Rows | None = None,
    general_rows: Rows | Mapping[str, Rows] | None = None,
    holdout_rows: Rows | None = None,
    *,
    skip: Collection[str] = (),
    require: Collection[str] = (),
) -> list[str]:
    """What :func:`evaluate_model` checks of its rows before any model work (a ValueError naming every
    problem at once); returns the notes naming the metrics that will be left out for lack of fields."""
    sets = _tofu_sets(forget_rows, retain_rows, _general_sets(general_rows))
    return _plan_tofu(sets, holdout_rows, _names(skip), _names(require)).notes


def _check_facts(rows: Sequence[dict], name: str) -> None:
    """``facts`` on every row or on none (fact leakage is computed when the rows carry them)."""
    if any("facts" in r for r in rows):
        check_rows(rows, name, ("facts",), needed_by="fact leakage")


# ------------------------------------------------------------------------------------------ the model


def _cleans_up(tokenizer: Any) -> bool:
    """Whether ``decode(..., clean_up_tokenization_spaces=True)`` cleans up with this tokenizer and
    transformers: recent versions skip it for BPE models (with a warning), older ones do not."""
    backend = getattr(tokenizer, "backend_tokenizer", None)
    if backend is None or type(backend.model).__name__ != "BPE":
        return True
    return getattr(tokenizer, "clean_up_tokenization_spaces_for_bpe_even_though_it_will_corrupt_output", True)


def _decode(tokenizer: Any, ids: Sequence[int]) -> str:
    """open-unlearning's decoding (special tokens dropped, ``clean_up_tokenization_spaces=True``), with the
    same text as its call gives under the installed transformers, without the warning it logs for BPE."""
    return tokenizer.decode(
        list(ids), skip_special_tokens=True, clean_up_tokenization_spaces=_cleans_up(tokenizer)
    )


@dataclass
class _Runner:
    """The model, its tokenizer and the settings every pass of one evaluation shares."""

    model: torch.nn.Module
    tokenizer: Any
    template: str | None
    batch_size: int
    max_new_tokens: int
    progress: bool
    max_length: int | None = None

    def score(self, examples: Sequence[dict[str, list[int]]], desc: str) -> list[TokenScores]:
        pad = pad_id(self.tokenizer)
        return teacher_forced(self.model, examples, self.batch_size, pad, self.progress, desc)

    def _text(self, text: str) -> str:
        return text if self.max_length is None else bound_text(text, self.max_length)

    def pair(self, question: str, answer: str, desc: str, row: int) -> dict[str, list[int]]:
        """:func:`encode_pair` of the bounded texts, cut to ``max_length`` tokens as training cuts it;
        ValueError naming the row when the prompt leaves no answer token."""
        ex = encode_pair(self.tokenizer, self._text(question), self._text(answer), self.template)
        if self.max_length is None or len(ex["input_ids"]) <= self.max_length:
            return ex
        ex = {k: v[: self.max_length] for k, v in ex.items()}
        if all(label == -100 for label in ex["labels"][1:]):
            raise ValueError(
                f"{desc}: row {row}: the prompt fills max_length={self.max_length} tokens, leaving no answer "
                "token (raise max_length)"
            )
        return ex

    def pairs(self, rows: Sequence[dict], key: str, desc: str) -> list[TokenScores]:
        """Scores of ``row[key]`` as the answer to ``row["question"]``, for every row."""
        return self.score([self.pair(r["question"], r[key], desc, i) for i, r in enumerate(rows)], desc)

    def options(self, rows: Sequence[dict], desc: str) -> list[list[TokenScores]]:
        """Scores of every perturbed answer of every row (all rows' answers batched together)."""
        flat = [(i, r["question"], p) for i, r in enumerate(rows) for p in _options(r)]
        scores = self.score([self.pair(q, p, desc, i) for i, q, p in flat], desc)
        out: list[list[TokenScores]] = [[] for _ in rows]
        for (i, _, _), s in zip(flat, scores, strict=True):
            out[i].append(s)
        return out

    def generate(
        self,
        prompts: Sequence[list[int]],
        references: Sequence[list[int]],
        desc: str,
        rouge_key: str = "rougeL_recall",
        max_new_tokens: int | None = None,
        stopwords: Sequence[str] = (),
    ) -> list[dict[str, Any]]:
        """Greedy answers to ``prompts`` scored against ``references`` (token ids whose text, minus the
        prompt's, is the ground truth), per row as open-unlearning's ``rouge`` stores it, plus ``ids``."""
        cap = max_new_tokens or self.max_new_tokens
        gens = greedy_generate(
            self.model, self.tokenizer, prompts, self.batch_size, cap, self.progress, desc,
        )  # fmt: skip
        out = []
        for prompt, ref, ids in zip(prompts, references, gens, strict=True):
            text_in = _decode(self.tokenizer, prompt)
            truth = _decode(self.tokenizer, ref).replace(text_in, "").strip()
            text = cut_at_stopwords(_decode(self.tokenizer, ids), stopwords)
            out.append(
                {
                    **rouge_scores(truth, text),
                    "input": text_in,
                    "ground_truth": truth,
                    "generation": text,
                    "ids": ids,
                    # The model ended the answer itself (not cut at the cap, nor at a stopword): only then
                    # can "The answer is:" be an announced answer that never came (degenerate_reason).
                    "stopped": len(ids) < cap and not stopwords,
                }
            )
        return out

    def answer(self, rows: Sequence[dict], desc: str) -> list[dict[str, Any]]:
        """The greedy answers to the rows' questions, scored (ROUGE-L recall) against their answers."""
        prompts = [encode_question(self.tokenizer, self._text(r["question"]), self.template) for r in rows]
        full = [self.pair(r["question"], r["answer"], desc, i)["input_ids"] for i, r in enumerate(rows)]
        if self.max_length is not None:
            prompts = [p[: self.max_length] for p in prompts]
        return self.generate(prompts, full, desc)


@contextlib.contextmanager
def _eval_mode(model: torch.nn.Module) -> Iterator[None]:
    was_training = model.training
    model.eval()
    try:
        yield
    finally:
        model.train(was_training)


@dataclass
class _SetResult:
    logs: dict[str, Any]
    answers: list[TokenScores]
    generations: list[dict[str, Any]]


def _qa_set(run: _Runner, name: str, rows: Sequence[dict], paraphrase: bool, skip: set[str]) -> _SetResult:
    """Probabilities, truth ratio and ROUGE of one QA set, named as open-unlearning names them.

    ``paraphrase``: the truth ratio's true answer is the paraphrased answer (forget, retain); otherwise the
    answer itself, and the normalised probability is added (real authors, world facts)."""
    logs: dict[str, Any] = {}
    answers = run.pairs(rows, "answer", f"{name}: answers")
    logs[f"{name}_Q_A_Prob"] = prob_entry(answers)
    tr, normalised = _truth_ratio_name(name), None if paraphrase else f"{name}_Q_A_Prob_normalised"
    wrong = None
    if tr not in skip or (normalised and normalised not in skip):
        wrong = run.options(rows, f"{name}: perturbed answers")
        logs[f"{name}_Q_A_PERT_Prob"] = options_entry(wrong)
    if tr not in skip:
        correct = answers
        if paraphrase:
            correct = run.pairs(rows, "paraphrased_answer", f"{name}: paraphrases")
            logs[f"{name}_Q_A_PARA_Prob"] = prob_entry(correct)
        aggregate = tofu.closer_to_1_better if name == "forget" else tofu.true_better
        logs[tr] = truth_ratio_entry(correct, wrong, aggregate)
    if normalised and normalised not in skip:
        logs[normalised] = normalised_entry(answers, wrong)
    generations = run.answer(rows, f"{name}: generation")
    logs[f"{name}_Q_A_ROUGE"] = rouge_entry(generations, "rougeL_recall")
    return _SetResult(logs, answers, generations)


# ------------------------------------------------------------------------------------------------ TOFU


def evaluate_model(
    model: torch.nn.Module,
    tokenizer: Any,
    forget_rows: Rows,
    retain_rows: Rows | None = None,
    general_rows: Rows | Mapping[str, Rows] | None = None,
    reference_stats: dict[str, Any] | None = None,
    batch_size: int = 32,
    max_new_tokens: int = TOFU_MAX_NEW_TOKENS,
    well_formed: Callable[[str], bool] | None = None,
    progress: bool = False,
    *,
    holdout_rows: Rows | None = None,
    template: str | None = None,
    skip: Collection[str] = (),
    require: Collection[str] = (),
    max_length: int | None = TOFU_MAX_LENGTH,
) -> dict[str, Any]:
    """TOFU's evaluation of ``model`` as open-unlearning computes it, plus asu's additions.

    ``general_rows``: ``{name: rows}`` (TOFU: ``{"ra": ..., "wf": ...}``) or one list of rows (world facts,
    ``wf``). ``reference_stats``: the reference model's evaluation (:func:`load_reference_stats`: open-
    unlearning's layout or a legacy statistics dict) for ``forget_quality`` and ``privleak``. ``template``:
    passed to :mod:`asu.formatting` (None: its default). A metric that needs a field no row of its set has
    (truth ratios: ``paraphrased_answer`` / ``perturbed_answer``; normalised probabilities:
    ``perturbed_answer``) is left out and named in ``notes``; ``skip`` leaves such metrics out deliberately,
    ``require`` (metric names, or ``"all"``) makes their absence an error, every problem named in one
    ValueError. ``max_length``: tokens per question + answer (None: no cut).

    Returns ``{"benchmark": "TOFU", "logs"`` (open-unlearning's ``TOFU_EVAL.json``), ``"headline"`` (its
    ``TOFU_SUMMARY.json``), ``"extras"`` (asu's additions), ``"metrics"`` (both), ``"summary"`` (every
    aggregate, plus :data:`LEGACY_SUMMARY_KEYS`), ``"stats"`` (legacy forget statistics, a valid
    ``reference_stats``), ``"generations"`` ({set: [text]}), ``"notes"`` (what was left out, and why),
    ``"warnings"`` (sets with many degenerate answers, :func:`asu.metrics.report.degenerate_warnings`)``}``.
    The model is put in eval mode for the run and its previous mode restored.
    """
    generals = _general_sets(general_rows)
    sets = _tofu_sets(forget_rows, retain_rows, generals)
    plan = _plan_tofu(sets, holdout_rows, _names(skip), _names(require))
    reference = reference_from(reference_stats, "reference", n_forget=len(forget_rows))
    if batch_size < 1 or max_new_tokens < 1:
        raise ValueError(f"batch_size ({batch_size}) and max_new_tokens ({max_new_tokens}) must be >= 1")
    if max_length is not None and max_length < 2:
        raise ValueError(f"max_length must be >= 2, got {max_length}")
    run = _Runner(model, tokenizer, template, batch_size, max_new_tokens, progress, max_length)
    logs: dict[str, Any] = {}
    extras: dict[str, Any] = {}
    generations: dict[str, list[str]] = {}
    with _eval_mode(model):
        results: dict[str, _SetResult] = {}
        for name, rows, paraphrase in sets:
            if rows is None:
                continue
            results[name] = res = _qa_set(run, name, rows, paraphrase, plan.leave_out)
            logs.update(res.logs)
            extras.update(degenerate_entries(name, res.generations))
            extras.update(leakage_entries(name, rows, res.generations))
            generations[name] = [g["generation"] for g in res.generations]
        forget = results["forget"]
        memorisation, paper = memorisation_entries(forget.answers)
        logs.update(memorisation)
        extras.update(paper)
        extras.update(fluency_entries("forget", forget.generations, well_formed))
        if holdout_rows is not None:
            holdout = run.pairs(holdout_rows, "answer", "holdout: answers")
            logs.update(mia_entries(tokenizer, forget.answers, holdout))
    notes = plan.notes + _aggregate_tofu(logs, reference, retain_rows is not None, list(generals))
    stats = {
        "truth_ratio": {
            k: v["score"] for k, v in logs.get("forget_truth_ratio", {}).get("value_by_index", {}).items()
        },
        "avg_gt_loss": {str(i): s.avg_loss for i, s in enumerate(forget.answers)},
        "rougeL_recall": {str(i): g["rougeL_recall"] for i, g in enumerate(forget.generations)},
    }
    if not stats["truth_ratio"]:
        del stats["truth_ratio"]
    return _result("TOFU", TOFU_HEADLINE, logs, extras, generations, notes, stats)


def _aggregate_tofu(
    logs: dict[str, Any], reference: Reference, has_retain: bool, generals: list[str]
) -> list[str]:
    """``forget_quality``, ``model_utility`` and ``privleak`` from the per-set entries; returns the notes."""
    notes = []
    if "forget_truth_ratio" in logs:
        fq = None
        if reference.truth_ratios is not None:
            ratios = [v["score"] for v in logs["forget_truth_ratio"]["value_by_index"].values()]
            fq = tofu.forget_quality(ratios, reference.truth_ratios)["pvalue"]
        else:
            notes.append(
                "forget_quality: no reference truth ratios (--reference), left empty as open-unlearning does"
            )
        logs["forget_quality"] = {"agg_value": fq}
    else:
        notes.append("forget_quality: not computed (it needs forget_truth_ratio)")
    if has_retain:
        parts = ["retain_Q_A_Prob", "retain_Q_A_ROUGE", "retain_Truth_Ratio"]
        parts += [f"{g}_{m}" for g in generals for m in ("Q_A_Prob_normalised", "Q_A_ROUGE", "Truth_Ratio")]
        present = [p for p in parts if p in logs]
        logs["model_utility"] = {"agg_value": tofu.harmonic_mean([logs[p]["agg_value"] for p in present])}
        if set(present) != set(TOFU_UTILITY_PARTS):
            notes.append(
                f"model_utility: harmonic mean of {len(present)} parts ({', '.join(present)}); TOFU's has "
                "the 9 of retain, ra (real authors) and wf (world facts)"
            )
    else:
        notes.append("model_utility: not computed (no retain set)")
    if "mia_min_k" in logs:
        ref = reference.mia_min_k_auc
        if ref is None:
            ref = privacy.DEFAULT_REFERENCE_AUC
            notes.append(
                f"privleak: no reference mia_min_k AUC (--reference), compared with {ref} as "
                "open-unlearning does"
            )
        logs["privleak"] = {"agg_value": privacy.privleak(logs["mia_min_k"]["agg_value"], ref)}
    else:
        notes.append("privleak / mia_*: not computed (no holdout set)")
    return notes


def _result(
    benchmark: str,
    headline_names: Sequence[str],
    logs: dict[str, Any],
    extras: dict[str, Any],
    generations: dict[str, list[str]],
    notes: list[str],
    stats: dict[str, Any] | None = None,
) -> dict[str, Any]:
    headline = {
        k: logs[k]["agg_value"] for k in headline_names if k in logs and logs[k]["agg_value"] is not None
    }
    metrics = {**logs, **extras}
    summary = {k: v["agg_value"] for k, v in metrics.items() if v.get("agg_value") is not None}
    summary |= {alias: summary[k] for alias, k in LEGACY_SUMMARY_KEYS.items() if k in summary}
    for k, v in metrics.items():
        value = v.get("agg_value")
        if isinstance(value, float) and not math.isfinite(value):
            notes.append(f"{k}: {value} (not a finite number), written to the JSON files as null")
    out = {
        "benchmark": benchmark,
        "logs": logs,
        "headline": headline,
        "extras": extras,
        "metrics": metrics,
        "summary": summary,
        "generations": generations,
        "notes": notes,
        "warnings": degenerate_warnings(extras),
    }
    if stats is not None:
        out["stats"] = stats
    return out


def evaluate_smoothed(
    model: torch.nn.Module,
    tokenizer: Any,
    forget_rows: Rows,
    temperatures: Sequence[float],
    retain_rows: Rows | None = None,
    general_rows: Rows | Mapping[str, Rows] | None = None,
    layers: str | Sequence[int] | None = None,
    batch_size: int = 32,
    max_new_tokens: int = TOFU_MAX_NEW_TOKENS,
    well_formed: Callable[[str], bool] | None = None,
    progress: bool = False,
    **kwargs: Any,
) -> list[dict[str, Any]]:
    """The τ preview: evaluate the model with every attention softmax at temperature τ (no training).

    ASU's student converges to this smoothed teacher on forget prompts, so its forget ROUGE / probability /
    fluency predict what unlearning at τ reaches. ``kwargs`` go to :func:`evaluate_model` (``template``,
    ``skip``, ...). Returns one ``{"temperature": τ, "summary": {...}, "generations": {...}}`` per τ.
    """
    from asu.smoothing import smoothing

    out = []
    for tau in temperatures:
        if not (isinstance(tau, (int, float)) and math.isfinite(tau) and tau > 0):
            raise ValueError(f"temperature must be a positive number, got {tau!r}")
        with smoothing(model, temperature=float(tau), layers=layers):
            res = evaluate_model(
                model, tokenizer, forget_rows, retain_rows, general_rows, batch_size=batch_size,
                max_new_tokens=max_new_tokens, well_formed=well_formed, progress=progress, **kwargs,
            )  # fmt: skip
        out.append({"temperature": float(tau), "summary": res["summary"], "generations": res["generations"]})
    return out


# ------------------------------------------------------------------------------------------------ MUSE


def _verbmem_example(tokenizer: Any, row: dict[str, Any], prefix_tokens: int, max_new_tokens: int) -> dict:
    """MUSE's own excerpts (``prompt`` + ``gt``) as open-unlearning encodes them, or a raw document cut at
    ``prefix_tokens`` tokens with the next ``max_new_tokens`` as the true continuation."""
    if isinstance(row.get("prompt"), str) and isinstance(row.get("gt"), str):
        prompt, gt = (bound_text(row[k], DOCUMENT_MAX_TOKENS) for k in ("prompt", "gt"))
        return encode_document(tokenizer, prompt, gt, DOCUMENT_MAX_TOKENS, insert_space=True)
    if not (isinstance(row.get("text"), str) and row["text"].strip()):
        raise ValueError("a VerbMem row needs 'text' (a document) or 'prompt' and 'gt'")
    text = bound_text(row["text"], prefix_tokens + max_new_tokens)
    return split_document(tokenizer, text, prefix_tokens, max_new_tokens)


def _continuation(example: dict[str, list[int]]) -> list[int]:
    return [t for t in example["labels"] if t != -100]


def _verbmem(
    run: _Runner, rows: Sequence[dict], prefix_tokens: int, max_new_tokens: int
) -> tuple[dict, dict, list]:
    examples = []
    for i, r in enumerate(rows):
        try:
            examples.append(_verbmem_example(run.tokenizer, r, prefix_tokens, max_new_tokens))
        except ValueError as e:
            raise ValueError(f"verbmem rows: row {i}: {e}") from None
    gens = run.generate(
        [e["prompt_ids"] for e in examples], [_continuation(e) for e in examples], "verbmem: generation",
        rouge_key="rougeL_f1", max_new_tokens=max_new_tokens,
    )  # fmt: skip
    logs = {"forget_verbmem_ROUGE": rouge_entry(gens, "rougeL_f1")}
    memorisation, paper = memorisation_entries(run.score(examples, "verbmem: scoring"))
    return logs | memorisation, paper | degenerate_entries("forget_verbmem", gens), gens


def _knowmem(
    run: _Runner, split: str, rows: Sequence[dict], examples: Sequence[dict]
) -> tuple[dict, dict, list]:
    cut = lambda text: bound_text(text, DOCUMENT_MAX_TOKENS)  # noqa: E731
    shots = [(cut(e["question"]), cut(e["answer"])) for e in examples]
    encoded = [encode_knowmem(run.tokenizer, cut(r["question"]), cut(r["answer"]), shots) for r in rows]
    gens = run.generate(
        [e["prompt_ids"] for e in encoded], [e["input_ids"] for e in encoded], f"{split} knowmem: generation",
        rouge_key="rougeL_f1", max_new_tokens=KNOWMEM_MAX_NEW_TOKENS, stopwords=KNOWMEM_STOPWORDS,
    )  # fmt: skip
    return (
        {f"{split}_knowmem_ROUGE": rouge_entry(gens, "rougeL_f1")},
        leakage_entries(f"{split}_knowmem", rows, gens) | degenerate_entries(f"{split}_knowmem", gens),
        gens,
    )


def _documents(run: _Runner, rows: Sequence[dict], name: str) -> list[TokenScores]:
    """Every token but the first of each document scored (open-unlearning's MUSE MIA sets)."""
    check_rows(rows, f"{name} documents", ("text",))
    examples = [
        encode_document(run.tokenizer, "", bound_text(r["text"], DOCUMENT_MAX_TOKENS), DOCUMENT_MAX_TOKENS)
        for r in rows
    ]
    for i, e in enumerate(examples):
        if len(_continuation(e)) < 2:
            raise ValueError(f"{name} documents: row {i} is shorter than 3 tokens")
    return run.score(examples, f"{name}: documents")


def evaluate_muse(
    model: torch.nn.Module,
    tokenizer: Any,
    forget_documents: Rows | None = None,
    *,
    verbmem_rows: Rows | None = None,
    knowmem_forget_rows: Rows | None = None,
    knowmem_retain_rows: Rows | None = None,
    knowmem_forget_examples: Rows = (),
    knowmem_retain_examples: Rows = (),
    holdout_documents: Rows | None = None,
    reference_stats: dict[str, Any] | None = None,
    batch_size: int = 8,
    verbmem_prefix_tokens: int = VERBMEM_PREFIX_TOKENS,
    verbmem_max_new_tokens: int = VERBMEM_MAX_NEW_TOKENS,
    progress: bool = False,
) -> dict[str, Any]:
    """MUSE's evaluation as open-unlearning computes it (see :mod:`asu.metrics.muse`).

    ``forget_documents`` (``text`` rows) are VerbMem's source (unless ``verbmem_rows`` is given: documents or
    MUSE's ``prompt`` / ``gt`` excerpts) and, with ``holdout_documents``, the MIA sets of ``privleak``.
    KnowMem rows are QA rows; ``knowmem_*_examples`` the few-shot examples (MUSE's ``*_qa_icl``).
    Returns the same structure as :func:`evaluate_model` (``benchmark`` ``"MUSE"``, no ``stats``).
    """
    if verbmem_prefix_tokens < 1 or verbmem_max_new_tokens < 1 or batch_size < 1:
        raise ValueError("verbmem_prefix_tokens, verbmem_max_new_tokens and batch_size must be >= 1")
    verbmem_rows = forget_documents if verbmem_rows is None else verbmem_rows
    for name, rows in (("knowmem forget", knowmem_forget_rows), ("knowmem retain", knowmem_retain_rows)):
        if rows is not None:
            check_rows(rows, f"{name} rows")
            _check_facts(rows, f"{name} rows")
    for name, rows in (
        ("knowmem forget", knowmem_forget_examples),
        ("knowmem retain", knowmem_retain_examples),
    ):
        if rows:
            check_rows(rows, f"{name} few-shot examples")
    if holdout_documents is not None and forget_documents is None:
        raise ValueError("holdout documents need forget documents (the MIA compares the two)")
    if verbmem_rows is None and knowmem_forget_rows is None and knowmem_retain_rows is None:
        raise ValueError("nothing to evaluate: give forget documents, VerbMem rows or KnowMem rows")
    reference = reference_from(reference_stats, "reference")
    run = _Runner(model, tokenizer, None, batch_size, verbmem_max_new_tokens, progress)
    logs: dict[str, Any] = {}
    extras: dict[str, Any] = {}
    generations: dict[str, list[str]] = {}
    notes: list[str] = []
    with _eval_mode(model):
        if verbmem_rows is not None:
            m, x, gens = _verbmem(run, verbmem_rows, verbmem_prefix_tokens, verbmem_max_new_tokens)
            logs |= m
            extras |= x
            generations["verbmem"] = [g["generation"] for g in gens]
        for split, rows, shots in (
            ("forget", knowmem_forget_rows, knowmem_forget_examples),
            ("retain", knowmem_retain_rows, knowmem_retain_examples),
        ):
            if rows is not None:
                m, x, gens = _knowmem(run, split, rows, shots)
                logs |= m
                extras |= x
                generations[f"{split}_knowmem"] = [g["generation"] for g in gens]
        if holdout_documents is not None:
            forget = _documents(run, forget_documents, "forget")
            logs |= mia_entries(tokenizer, forget, _documents(run, holdout_documents, "holdout"))
            ref = reference.mia_min_k_auc
            if ref is None:
                ref = privacy.DEFAULT_REFERENCE_AUC
                notes.append(f"privleak: no reference mia_min_k AUC (--reference), compared with {ref}")
            logs["privleak"] = {"agg_value": privacy.privleak(logs["mia_min_k"]["agg_value"], ref)}
        else:
            notes.append("privleak / mia_*: not computed (no holdout documents)")
    return _result("MUSE", MUSE_HEADLINE, logs, extras, generations, notes)


# ------------------------------------------------------------------------------------ older interface


def generate_answers(
    model: torch.nn.Module,
    tokenizer: Any,
    questions: Sequence[str],
    batch_size: int = 32,
    max_new_tokens: int = 48,
    progress: bool = False,
    desc: str = "generating",
) -> list[dict[str, Any]]:
    """Greedy answers to ``questions``: per question ``{"text", "ids"}``, the ids up to the first EOS and
    their text (special tokens dropped, stripped)."""
    prompts = [encode_question(tokenizer, q) for q in questions]
    gens = greedy_generate(model, tokenizer, prompts, batch_size, max_new_tokens, progress, desc)
    return [{"text": tokenizer.decode(ids, skip_special_tokens=True).strip(), "ids": ids} for ids in gens]
