"""Choosing the attention temperature τ without training: bisect the smoothed-teacher preview.

ASU trains the student toward the forget-teacher ``θ_τ``, the original model with the selected layers'
attention softmax at temperature τ. On forget prompts the student ends close to that teacher, so what the
teacher *generates* at a given τ previews what unlearning at τ reaches, before any training. This module
turns that into a rule: find the τ at which the teacher's greedy answers to the forget questions keep a
chosen fraction of the original model's forget ROUGE-L, then unlearn at that τ.

Target (``temperature="auto[:R]"``)
    ``s(τ)`` is the mean ROUGE-L recall of the smoothed model's greedy answers against the true answers of
    (a sample of) the forget rows; ``s(1)`` is the original model's. The target is ``R · s(1)`` with
    ``R`` in (0, 1) (default :data:`DEFAULT_FRACTION`). No oracle model and no retain data is needed.

Search
    ``s`` falls as τ grows (flatter attention, less recall of the memorised answer), though not strictly.
    Bracket: ``lo = 1`` (``s(1) > target``), ``hi`` doubled from 2 until ``s(hi) ≤ target`` (at most
    :data:`MAX_TEMPERATURE`). Then bisect in ``log τ`` keeping ``s(lo) > target ≥ s(hi)``, until
    ``s(hi)`` is within ``tolerance`` of the target, ``hi / lo < 1 + ratio_tolerance`` or ``max_steps``
    previews have run. The answer is ``hi``: the smallest τ found whose teacher reaches the target. Every
    preview is recorded (the curve), so a caller can see how flat or bumpy ``s`` was.

Cost: one greedy generation over the forget sample per preview (about 6-10 previews), no gradient, no
retain data. The answers are generated up to twice the longest reference answer plus a margin (ROUGE-L
recall only counts the reference's words, so longer generations cannot change it much).
"""

from __future__ import annotations

import math
import random
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from typing import Any

import torch

from asu.data import Rows
from asu.metrics.scoring import encode_question, greedy_generate
from asu.metrics.text import fact_leakage, rouge_l_recall
from asu.smoothing import LayerSpec, smoothing

__all__ = [
    "AUTO",
    "DEFAULT_FRACTION",
    "TauChoice",
    "TauTarget",
    "bisect_temperature",
    "choose_temperature",
    "is_auto",
    "parse_auto",
    "preview_forget",
]

AUTO = "auto"
#: Default target: the teacher keeps half of the original model's forget ROUGE-L.
DEFAULT_FRACTION = 0.5
MAX_TEMPERATURE = 64.0
#: At most this many forget rows are previewed (a seeded sample beyond it).
PREVIEW_ROWS = 256


@dataclass(frozen=True)
class TauTarget:
    """What the automatic τ aims for: the teacher's forget ROUGE-L at ``fraction`` of the original's."""

    fraction: float = DEFAULT_FRACTION

    def __post_init__(self) -> None:
        if not (isinstance(self.fraction, (int, float)) and 0.0 < self.fraction < 1.0):
            raise ValueError(f"the auto temperature target must be in (0, 1), got {self.fraction!r}")

    @property
    def spec(self) -> str:
        return f"{AUTO}:{self.fraction:g}"


def is_auto(value: Any) -> bool:
    """Whether ``value`` asks for the automatic temperature (``"auto"`` or ``"auto:R"``)."""
    return isinstance(value, str) and value.strip().lower().split(":", 1)[0] == AUTO


def parse_auto(value: str) -> TauTarget:
    """``"auto"`` -> the default target; ``"auto:0.4"`` -> 0.4 of the original forget ROUGE-L.

    ValueError naming the problem for anything else (``"auto:"``, ``"auto:half"``, ``"auto:1.5"``)."""
    if not is_auto(value):
        raise ValueError(f"expected 'auto' or 'auto:R' with R in (0, 1), got {value!r}")
    _, sep, rest = value.strip().partition(":")
    if not sep:
        return TauTarget()
    try:
        fraction = float(rest)
    except ValueError:
        raise ValueError(
            f"temperature {value!r}: after 'auto:' give the fraction of the original forget ROUGE-L the "
            "smoothed teacher should keep, a number in (0, 1) such as 0.5"
        ) from None
    if not math.isfinite(fraction):
        raise ValueError(f"temperature {value!r}: the target must be a finite number in (0, 1)")
    return TauTarget(fraction)


@dataclass
class TauChoice:
    """The outcome of :func:`choose_temperature`.

    Attributes:
        temperature: the chosen τ (``hi`` of the final bracket).
        target: the teacher forget ROUGE-L aimed for (``fraction · original``).
        fraction: the requested fraction of the original forget ROUGE-L.
        original: the original model's forget ROUGE-L on the sample (τ = 1).
        reached: whether the chosen τ's preview is at or below the target (False when even
            :data:`MAX_TEMPERATURE` did not get there; the largest τ tried is returned then).
        curve: every preview in the order run: ``{"temperature", "forget_rouge"}`` plus
            ``forget_fact_leakage_any`` when the rows carry ``facts``.
        rows: how many forget rows were previewed; ``max_new_tokens``: the generation length.
        seconds: wall time of the search.
    """

    temperature: float
    target: float
    fraction: float
    original: float
    reached: bool
    curve: list[dict[str, float]] = field(default_factory=list)
    rows: int = 0
    max_new_tokens: int = 0
    layers: Any = None
    seconds: float = 0.0

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


def bisect_temperature(
    score: Callable[[float], float],
    target: float,
    *,
    tolerance: float = 0.02,
    ratio_tolerance: float = 0.05,
    max_steps: int = 10,
    max_temperature: float = MAX_TEMPERATURE,
) -> tuple[float, bool, list[tuple[float, float]]]:
    """The smallest τ found with ``score(τ) ≤ target``, by bracketing then bisecting in ``log τ``.

    ``score`` should fall as τ grows (it need not strictly); ``score(1)`` is evaluated first. Returns
    ``(τ, reached, curve)`` with ``curve`` the ``(τ, score)`` pairs in the order evaluated. ``reached`` is
    False when ``score(max_temperature)`` is still above the target (τ is then ``max_temperature``); when
    ``score(1)`` is already at or below it, τ is 1.
    """
    if max_steps < 2:
        raise ValueError(f"max_steps must be >= 2, got {max_steps}")
    curve: list[tuple[float, float]] = []

    def run(tau: float) -> float:
        s = float(score(tau))
        if not math.isfinite(s):
            raise ValueError(f"the preview score at temperature {tau:g} is not finite ({s})")
        curve.append((tau, s))
        return s

    if run(1.0) <= target:
        return 1.0, True, curve
    lo, hi = 1.0, 2.0
    s_hi = run(hi)
    while s_hi > target:
        if hi >= max_temperature or len(curve) >= max_steps:
            return hi, False, curve
        lo, hi = hi, min(2.0 * hi, max_temperature)
        s_hi = run(hi)
    while len(curve) < max_steps and s_hi < target - tolerance and hi / lo >= 1.0 + ratio_tolerance:
        mid = math.sqrt(lo * hi)
        s_mid = run(mid)
        if s_mid > target:
            lo = mid
        else:
            hi, s_hi = mid, s_mid
    return hi, True, curve


def _sample(rows: Rows, limit: int, seed: int) -> list[dict[str, Any]]:
    if len(rows) <= limit:
        return list(rows)
    picked = sorted(random.Random(seed).sample(range(len(rows)), limit))
    return [rows[i] for i in picked]


def _check_rows(rows: Rows) -> None:
    if not rows:
        raise ValueError("the automatic temperature needs forget rows to preview")
    for i, r in enumerate(rows):
        if not (isinstance(r.get("question"), str) and isinstance(r.get("answer"), str)):
            raise ValueError(
                f"the automatic temperature needs question/answer rows (forget row {i} has none); give a "
                "number for the temperature with raw-text data"
            )


def _generation_length(tokenizer: Any, rows: Rows) -> int:
    longest = max(len(tokenizer(r["answer"], add_special_tokens=False)["input_ids"]) for r in rows)
    return min(200, 2 * longest + 16)


@torch.no_grad()
def preview_forget(
    model: torch.nn.Module,
    tokenizer: Any,
    rows: Rows,
    temperature: float,
    *,
    layers: LayerSpec = None,
    template: Any = None,
    batch_size: int = 32,
    max_new_tokens: int | None = None,
) -> dict[str, Any]:
    """The smoothed model's greedy answers to the forget questions, scored: no training.

    Returns ``{"temperature", "forget_rouge"`` (mean ROUGE-L recall against ``answer``),
    ``"forget_fact_leakage_any"`` (when every row carries ``facts``), ``"generations"}``. ``temperature``
    1 is the original model. The model's training mode is restored afterwards.
    """
    _check_rows(rows)
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    tokens = max_new_tokens or _generation_length(tokenizer, rows)
    prompts = [encode_question(tokenizer, r["question"], template) for r in rows]
    was_training = model.training
    model.eval()
    try:
        with smoothing(model, float(temperature), layers):
            ids = greedy_generate(model, tokenizer, prompts, batch_size, tokens)
    finally:
        model.train(was_training)
    texts = [tokenizer.decode(x, skip_special_tokens=True).strip() for x in ids]
    out: dict[str, Any] = {
        "temperature": float(temperature),
        "forget_rouge": sum(rouge_l_recall(r["answer"], t) for r, t in zip(rows, texts, strict=True))
        / len(rows),
    }
    if all(isinstance(r.get("facts"), list) and r["facts"] for r in rows):
        leak = fact_leakage(texts, [r["facts"] for r in rows])
        out["forget_fact_leakage_any"] = sum(leak["any"]) / len(rows)
    out["generations"] = texts
    return out


def choose_temperature(
    model: torch.nn.Module,
    tokenizer: Any,
    forget_rows: Rows,
    target: TauTarget | str | None = None,
    *,
    layers: LayerSpec = None,
    template: Any = None,
    batch_size: int = 32,
    max_rows: int = PREVIEW_ROWS,
    seed: int = 0,
    max_steps: int = 10,
    tolerance: float = 0.02,
) -> TauChoice:
    """The τ at which the smoothed teacher's forget ROUGE-L reaches ``target`` (see the module docstring).

    ``target``: a :class:`TauTarget`, an ``"auto[:R]"`` string or None (the default target). ``layers``
    and ``template`` must be the unlearning run's (the teacher smooths those layers; the prompts are
    rendered as training renders them). At most ``max_rows`` forget rows are previewed (a sample seeded by
    ``seed``).
    """
    import time

    if target is None:
        target = TauTarget()
    elif isinstance(target, str):
        target = parse_auto(target)
    t0 = time.perf_counter()
    rows = _sample(forget_rows, max_rows, seed)
    _check_rows(rows)
    tokens = _generation_length(tokenizer, rows)
    previews: list[dict[str, Any]] = []

    def score(tau: float) -> float:
        p = preview_forget(
            model, tokenizer, rows, tau, layers=layers, template=template, batch_size=batch_size,
            max_new_tokens=tokens,
        )  # fmt: skip
        previews.append({k: v for k, v in p.items() if k != "generations"})
        return p["forget_rouge"]

    original = score(1.0)
    goal = target.fraction * original
    # The search starts with τ = 1, already previewed: reuse it.
    cached = {1.0: original}
    tau, reached, _ = bisect_temperature(
        lambda t: cached[t] if t in cached else score(t), goal, tolerance=tolerance, max_steps=max_steps
    )
    return TauChoice(
        temperature=tau,
        target=goal,
        fraction=target.fraction,
        original=original,
        reached=reached,
        curve=previews,
        rows=len(rows),
        max_new_tokens=tokens,
        layers=layers if layers is None or isinstance(layers, (str, int)) else list(layers),
        seconds=time.perf_counter() - t0,
    )
