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

A teacher that answers nothing has not forgotten
    Smoothing every layer of a real instruct model can make the teacher end its turn at once or babble
    (SmolLM2-135M-Instruct at τ 2: the end-of-turn token is its top-1 first answer token), and such answers
    have ROUGE-L 0, which would read as perfect forgetting. So every preview also classifies each answer by
    :func:`asu.metrics.text.degenerate_reason` (stops at once, empty, announces an answer and ends its turn
    — "The answer to this question is:" —, no letter or digit, one token repeated, repeated 3-grams) and
    records the shares along the curve; a degenerate answer scores the original model's ROUGE-L on that row
    (no forgetting credit), and a preview whose degenerate share exceeds
    ``max_degenerate`` (default :data:`MAX_DEGENERATE`) is a *collapsed* teacher: it never counts as reaching
    the target, whatever its score.

Search
    ``s`` falls as τ grows (flatter attention, less recall of the memorised answer), though not strictly.
    Each preview is *above* (fluent, ``s > target``), *reached* (fluent, ``s ≤ target``) or *collapsed*.
    Bracket: ``lo = 1``, ``hi`` doubled from 2 while it is above (at most :data:`MAX_TEMPERATURE`). Then
    bisect in ``log τ``: an above midpoint becomes ``lo``, any other ``hi``, until a reached ``hi`` is within
    ``tolerance`` of the target, ``hi / lo < 1 + ratio_tolerance`` or ``max_steps`` previews have run. The
    answer is the smallest reached τ; when none is, the target is **not reached** and the answer is the
    largest fluent τ tried, with the reason (``collapsed``: the teacher degenerates before its answers reach
    the target; ``max_temperature`` or ``steps``). Every preview is recorded (the curve), so a caller can see
    how flat, bumpy or broken ``s`` was.

Layers
    When the target is not reached on the chosen layers, :func:`choose_temperature` (``suggest_layers``)
    brackets a few other contiguous layer sets (:func:`candidate_layers`: the thirds of the depth) and names
    those on which a fluent teacher reaches the target; :func:`choose_layers` runs the full search on every
    candidate and picks one.

End of turn removed (``eos="renorm"``, ASU's ``eos`` parameter)
    The student of such a teacher never sees a stop token inside the answer (:mod:`asu.methods.asu`), so its
    preview generates with the stop tokens banned until each row has produced as many tokens as its true
    answer has.

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
from asu.metrics.text import EMPTY_REASONS, STOPS_AT_ONCE, degenerate_reason, fact_leakage, rouge_l_recall
from asu.smoothing import LayerSpec, smoothing
from asu.warning import AsuWarning

__all__ = [
    "AUTO",
    "DEFAULT_FRACTION",
    "TauChoice",
    "TauTarget",
    "bisect_temperature",
    "candidate_layers",
    "choose_layers",
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
#: A preview with a larger share of degenerate answers is a collapsed teacher (never "reached").
MAX_DEGENERATE = 0.25
#: Why a target was not reached (``TauChoice.reason``).
COLLAPSED, MAX_REACHED, OUT_OF_STEPS, ORIGINAL_DEGENERATE = (
    "collapsed", "max_temperature", "steps", "original_degenerate",
)  # fmt: skip


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
        temperature: the chosen τ: the smallest τ found whose fluent teacher reaches the target, else the
            largest fluent τ tried (see ``reached`` and ``reason``).
        target: the teacher forget ROUGE-L aimed for (``fraction · original``).
        fraction: the requested fraction of the original forget ROUGE-L.
        original: the original model's forget ROUGE-L on the sample (τ = 1).
        reached: whether a fluent teacher met the target at ``temperature``.
        curve: every preview in the order run: ``{"temperature", "forget_rouge"`` (raw ROUGE-L),
            ``"score"`` (degenerate answers scored as the original's), ``"degenerate"``, ``"empty"``,
            ``"immediate_stop"`` (shares of the answers), ``"state"`` (above / reached / collapsed)``}``, plus
            ``forget_fact_leakage_any`` when the rows carry ``facts``.
        rows: how many forget rows were previewed; ``max_new_tokens``: the generation length.
        layers: the smoothed layers (None: all).
        seconds: wall time of the search.
        reason: why the target was not reached (None when it was): ``collapsed`` (the teacher degenerated
            first), ``max_temperature``, ``steps`` or ``original_degenerate`` (the original model's own
            answers are degenerate).
        max_degenerate: the largest degenerate share a fluent preview may have.
        eos: the ASU teacher's end-of-turn handling previewed (``keep`` or ``renorm``).
        suggestions: other layer sets bracketed when the target was not reached: ``{"layers",
            "temperature", "reached", "degenerate"}`` each.
    """

    temperature: float
    target: float
    fraction: float
    original: float
    reached: bool
    curve: list[dict[str, Any]] = field(default_factory=list)
    rows: int = 0
    max_new_tokens: int = 0
    layers: Any = None
    seconds: float = 0.0
    reason: str | None = None
    max_degenerate: float = MAX_DEGENERATE
    eos: str = "keep"
    suggestions: list[dict[str, Any]] = field(default_factory=list)

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)

    def describe(self) -> str:
        """One plain line: the τ, the target and whether (and why not) it was reached."""
        where = "all layers" if self.layers is None else f"layers {self.layers}"
        head = (
            f"tau = {self.temperature:.3g} chosen by the preview on {where}: teacher forget ROUGE-L target "
            f"{self.target:.3f} ({self.fraction:g} x original {self.original:.3f})"
        )
        if self.reached:
            return (
                f"{head} reached, {len(self.curve)} previews on {self.rows} forget rows, {self.seconds:.1f} s"
            )
        share = f"{self.max_degenerate:.0%}"
        why = {
            COLLAPSED: f"the smoothed teacher stops answering (degenerate answers above {share}) before its "
            "answers forget that much; tau is the largest fluent one tried",
            MAX_REACHED: f"not even at tau {MAX_TEMPERATURE:g}",
            OUT_OF_STEPS: "the previews ran out first; tau is the largest fluent one tried",
            ORIGINAL_DEGENERATE: "the original model's own answers are degenerate",
        }.get(self.reason or "", "")
        found = [s for s in self.suggestions if s["reached"]]
        hint = (
            "; reached on " + ", ".join(f"layers {s['layers']} (tau {s['temperature']:.3g})" for s in found)
            if found
            else ("; no other layer set tried reaches it" if self.suggestions else "")
        )
        return f"{head} NOT reached: {why}{hint}"


Score = Callable[[float], "float | tuple[float, bool]"]


def _state(value: float, fluent: bool, target: float) -> str:
    if not fluent:
        return COLLAPSED
    return "reached" if value <= target else "above"


def bisect_temperature(
    score: Score,
    target: float,
    *,
    tolerance: float = 0.02,
    ratio_tolerance: float = 0.05,
    max_steps: int = 10,
    max_temperature: float = MAX_TEMPERATURE,
) -> tuple[float, bool, list[tuple[float, float]]]:
    """The smallest τ found whose preview reaches ``target``, by bracketing then bisecting in ``log τ``.

    ``score(τ)`` is the preview's score (it should fall as τ grows, not necessarily strictly), or a pair
    ``(score, fluent)``: a preview that is not fluent (a collapsed teacher) never reaches the target. Returns
    ``(τ, reached, curve)`` with ``curve`` the ``(τ, score)`` pairs in the order evaluated. When nothing
    reaches the target, ``reached`` is False and τ is the largest fluent τ tried (``max_temperature`` when
    the score stays above the target up to there); when ``score(1)`` already reaches it, τ is 1.
    """
    if max_steps < 2:
        raise ValueError(f"max_steps must be >= 2, got {max_steps}")
    curve: list[tuple[float, float]] = []

    def run(tau: float) -> tuple[str, float]:
        out = score(tau)
        value, fluent = (out, True) if isinstance(out, (int, float)) else (out[0], bool(out[1]))
        value = float(value)
        if not math.isfinite(value):
            raise ValueError(f"the preview score at temperature {tau:g} is not finite ({value})")
        curve.append((tau, value))
        return _state(value, fluent, target), value

    first, _ = run(1.0)
    if first != "above":
        return 1.0, first == "reached", curve
    lo, hi = 1.0, 2.0
    state, s_hi = run(hi)
    while state == "above":
        if hi >= max_temperature or len(curve) >= max_steps:
            return hi, False, curve
        lo, hi = hi, min(2.0 * hi, max_temperature)
        state, s_hi = run(hi)
    best = hi if state == "reached" else None
    while len(curve) < max_steps and hi / lo >= 1.0 + ratio_tolerance:
        if state == "reached" and s_hi >= target - tolerance:
            break
        mid = math.sqrt(lo * hi)
        mid_state, s_mid = run(mid)
        if mid_state == "above":
            lo = mid
        else:
            hi, state, s_hi = mid, mid_state, s_mid
            best = mid if mid_state == "reached" else best
    return (best, True, curve) if best is not None else (lo, False, curve)


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


def _answer_lengths(tokenizer: Any, rows: Rows) -> list[int]:
    return [len(tokenizer(r["answer"], add_special_tokens=False)["input_ids"]) for r in rows]


def _generation_length(tokenizer: Any, rows: Rows) -> int:
    return min(200, 2 * max(_answer_lengths(tokenizer, rows)) + 16)


def _check_eos(eos: str) -> None:
    if eos not in ("keep", "renorm"):
        raise ValueError(f"eos must be 'keep' or 'renorm', got {eos!r}")


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
    eos: str = "keep",
) -> dict[str, Any]:
    """The smoothed model's greedy answers to the forget questions, scored: no training.

    Returns ``{"temperature", "forget_rouge"`` (mean ROUGE-L recall against ``answer``), ``"degenerate"``,
    ``"empty"``, ``"immediate_stop"`` (shares of the answers, :func:`asu.metrics.text.degenerate_reason`),
    ``"forget_fact_leakage_any"`` (when every row carries ``facts``), ``"generations"``, ``"rouge"`` and
    ``"reasons"`` (per row)``}``. ``temperature`` 1 is the original model. With ``eos="renorm"`` the stop
    tokens are banned until each answer is as long as its true one (the ``renorm`` teacher's student never
    ends inside the answer). The model's training mode is restored afterwards.
    """
    _check_rows(rows)
    _check_eos(eos)
    if not (isinstance(temperature, (int, float)) and math.isfinite(temperature) and temperature > 0):
        raise ValueError(f"temperature must be a positive number, got {temperature!r}")
    tokens = max_new_tokens or _generation_length(tokenizer, rows)
    prompts = [encode_question(tokenizer, r["question"], template) for r in rows]
    min_new = [min(n, tokens) for n in _answer_lengths(tokenizer, rows)] if eos == "renorm" else None
    was_training = model.training
    model.eval()
    try:
        with smoothing(model, float(temperature), layers):
            ids = greedy_generate(model, tokenizer, prompts, batch_size, tokens, min_new_tokens=min_new)
    finally:
        model.train(was_training)
    texts = [tokenizer.decode(x, skip_special_tokens=True).strip() for x in ids]
    rouge = [rouge_l_recall(r["answer"], t) for r, t in zip(rows, texts, strict=True)]
    # An answer shorter than the cap was ended by the model itself: "The answer is:" + end of turn is empty.
    reasons = [degenerate_reason(x, t, stopped=len(x) < tokens) for x, t in zip(ids, texts, strict=True)]
    n = len(rows)
    out: dict[str, Any] = {
        "temperature": float(temperature),
        "forget_rouge": sum(rouge) / n,
        "degenerate": sum(r is not None for r in reasons) / n,
        "empty": sum(r in EMPTY_REASONS for r in reasons) / n,
        "immediate_stop": sum(r == STOPS_AT_ONCE for r in reasons) / n,
    }
    if all(isinstance(r.get("facts"), list) and r["facts"] for r in rows):
        leak = fact_leakage(texts, [r["facts"] for r in rows])
        out["forget_fact_leakage_any"] = sum(leak["any"]) / n
    out.update(generations=texts, rouge=rouge, reasons=reasons)
    return out


def _scored(preview: dict[str, Any], original_rouge: list[float]) -> float:
    """Mean ROUGE-L with every degenerate answer scored as the original model's answer on that row."""
    values = [
        o if why is not None else r
        for r, o, why in zip(preview["rouge"], original_rouge, preview["reasons"], strict=True)
    ]
    return sum(values) / len(values)


def candidate_layers(num_layers: int) -> list[str]:
    """Contiguous layer sets to preview besides the chosen ones: the thirds of the depth (``"0-9"``,
    ``"10-19"``, ``"20-29"`` of 30 layers); a model of fewer than 3 layers gets each layer alone."""
    if num_layers < 3:
        return [str(i) for i in range(num_layers)]
    cuts = [round(i * num_layers / 3) for i in range(4)]
    return [f"{a}-{b - 1}" if b - 1 > a else str(a) for a, b in zip(cuts, cuts[1:], strict=False)]


@dataclass
class _Search:
    """One model's preview search over the forget sample: what every preview of :func:`choose_temperature`
    and :func:`choose_layers` shares (the rows, the generation settings and the original's answers)."""

    model: torch.nn.Module
    tokenizer: Any
    rows: list[dict[str, Any]]
    template: Any
    batch_size: int
    eos: str
    max_degenerate: float
    tokens: int | None = None
    original: dict[str, Any] = field(default_factory=dict)

    def __post_init__(self) -> None:
        _check_rows(self.rows)
        _check_eos(self.eos)
        if not 0.0 <= self.max_degenerate < 1.0:
            raise ValueError(f"max_degenerate must be in [0, 1), got {self.max_degenerate!r}")
        self.tokens = self.tokens or _generation_length(self.tokenizer, self.rows)
        # The original model (τ = 1) never has its stop tokens banned: it is the reference as it answers.
        self.original = self.preview(1.0, None, eos="keep")

    def preview(self, tau: float, layers: LayerSpec, eos: str | None = None) -> dict[str, Any]:
        return preview_forget(
            self.model, self.tokenizer, self.rows, tau, layers=layers, template=self.template,
            batch_size=self.batch_size, max_new_tokens=self.tokens, eos=eos or self.eos,
        )  # fmt: skip

    def run(self, target: float, layers: LayerSpec, max_steps: int, tolerance: float) -> tuple[Any, ...]:
        """``(τ, reached, reason, curve)`` of the bisection on ``layers``."""
        curve: list[dict[str, Any]] = []

        def score(tau: float) -> tuple[float, bool]:
            p = self.original if tau == 1.0 else self.preview(tau, layers)
            value = _scored(p, self.original["rouge"])
            fluent = p["degenerate"] <= self.max_degenerate
            keep = {k: v for k, v in p.items() if k not in ("generations", "rouge", "reasons")}
            curve.append({**keep, "score": value, "state": _state(value, fluent, target)})
            return value, fluent

        tau, reached, _ = bisect_temperature(score, target, tolerance=tolerance, max_steps=max_steps)
        return tau, reached, None if reached else _reason(curve, max_steps), curve


def _reason(curve: list[dict[str, Any]], max_steps: int) -> str:
    if curve[0]["state"] == COLLAPSED:
        return ORIGINAL_DEGENERATE
    if any(p["state"] == COLLAPSED for p in curve):
        return COLLAPSED
    if curve[-1]["temperature"] >= MAX_TEMPERATURE:
        return MAX_REACHED
    return OUT_OF_STEPS


def _suggest(search: _Search, target: float, layers: LayerSpec) -> list[dict[str, Any]]:
    """Bracket (τ 2, 4, 8) each candidate layer set other than ``layers``; the first fluent τ reaching the
    target on each, or not reached."""
    num = _num_layers(search.model)
    out = []
    for cand in candidate_layers(num):
        if layers is not None and str(layers) == cand:
            continue
        tau, reached, _, curve = search.run(target, cand, max_steps=4, tolerance=1.0)
        out.append({"layers": cand, "temperature": tau, "reached": reached,
                    "degenerate": curve[-1]["degenerate"]})  # fmt: skip
    return out


def _num_layers(model: torch.nn.Module) -> int:
    from asu.smoothing import attention_modules

    return len(attention_modules(model))


def _as_target(target: TauTarget | str | None) -> TauTarget:
    if target is None:
        return TauTarget()
    return parse_auto(target) if isinstance(target, str) else target


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
    eos: str = "keep",
    max_degenerate: float = MAX_DEGENERATE,
    suggest_layers: bool = True,
    warn: bool = True,
    max_new_tokens: int | None = None,
) -> TauChoice:
    """The τ at which the smoothed teacher's forget ROUGE-L reaches ``target`` (see the module docstring).

    ``target``: a :class:`TauTarget`, an ``"auto[:R]"`` string or None (the default target). ``layers``,
    ``template`` and ``eos`` must be the unlearning run's (the teacher smooths those layers; the prompts are
    rendered as training renders them). At most ``max_rows`` forget rows are previewed (a sample seeded by
    ``seed``). A preview with more than ``max_degenerate`` degenerate answers is a collapsed teacher. When the
    target is not reached: with ``suggest_layers`` the candidate layer sets are bracketed and named in the
    choice, and with ``warn`` an :class:`asu.warning.AsuWarning` says so (:meth:`TauChoice.describe`).
    ``max_new_tokens`` caps the previews' answers (None: twice the longest forget answer plus 16, at most
    200); a smaller cap makes each preview cheaper on a slow machine.
    """
    import time
    import warnings

    target = _as_target(target)
    t0 = time.perf_counter()
    search = _Search(model, tokenizer, _sample(forget_rows, max_rows, seed), template, batch_size, eos,
                     max_degenerate, max_new_tokens)  # fmt: skip
    goal = target.fraction * search.original["forget_rouge"]
    tau, reached, reason, curve = search.run(goal, layers, max_steps, tolerance)
    # Other layers cannot help when the original model itself does not answer.
    suggest = not reached and suggest_layers and reason != ORIGINAL_DEGENERATE
    suggestions = _suggest(search, goal, layers) if suggest else []
    choice = TauChoice(
        temperature=tau, target=goal, fraction=target.fraction, original=search.original["forget_rouge"],
        reached=reached, curve=curve, rows=len(search.rows), max_new_tokens=search.tokens,
        layers=layers if layers is None or isinstance(layers, (str, int)) else list(layers),
        seconds=time.perf_counter() - t0, reason=reason, max_degenerate=max_degenerate, eos=eos,
        suggestions=suggestions,
    )  # fmt: skip
    if not reached and warn:
        warnings.warn(choice.describe(), AsuWarning, stacklevel=2)
    return choice


def choose_layers(
    model: torch.nn.Module,
    tokenizer: Any,
    forget_rows: Rows,
    target: TauTarget | str | None = None,
    *,
    candidates: list[LayerSpec] | None = None,
    template: Any = None,
    batch_size: int = 32,
    max_rows: int = PREVIEW_ROWS,
    seed: int = 0,
    max_steps: int = 8,
    eos: str = "keep",
    max_degenerate: float = MAX_DEGENERATE,
    max_new_tokens: int | None = None,
) -> tuple[TauChoice | None, list[TauChoice]]:
    """Layers chosen by preview: the automatic τ searched on every candidate layer set (default: all layers
    and :func:`candidate_layers`), and the best: among the sets whose fluent teacher reaches the target, the
    one with the fewest degenerate answers at its τ (then the smaller τ). Returns ``(best or None, every
    choice)``; no warning is issued (the choices say what was reached)."""
    import time

    target = _as_target(target)
    search = _Search(model, tokenizer, _sample(forget_rows, max_rows, seed), template, batch_size, eos,
                     max_degenerate, max_new_tokens)  # fmt: skip
    goal = target.fraction * search.original["forget_rouge"]
    sets = candidates if candidates is not None else [None, *candidate_layers(_num_layers(model))]
    choices = []
    for layers in sets:
        t0 = time.perf_counter()
        tau, reached, reason, curve = search.run(goal, layers, max_steps, 0.02)
        choices.append(TauChoice(
            temperature=tau, target=goal, fraction=target.fraction, original=search.original["forget_rouge"],
            reached=reached, curve=curve, rows=len(search.rows), max_new_tokens=search.tokens,
            layers=layers, seconds=time.perf_counter() - t0, reason=reason, max_degenerate=max_degenerate,
            eos=eos,
        ))  # fmt: skip
    reached = [c for c in choices if c.reached]
    if not reached:
        return None, choices

    def at_tau(c: TauChoice) -> float:
        return next(p["degenerate"] for p in c.curve if p["temperature"] == c.temperature)

    return min(reached, key=lambda c: (at_tau(c), c.temperature)), choices
