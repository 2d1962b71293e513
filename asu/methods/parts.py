"""The rewrites of the forget and retain rows that some methods train on (the micro-batch's extra parts).

* ``idk``: each forget question answered with a refusal (IDK, ASU+IDK, DPO);
* ``retain_idk``: each retain question answered with a refusal (the AP retain term);
* ``mismatch``: each forget question answered with the answer of the retain row it is paired with (LLMU);
* ``alternate``: each forget question answered with its row's ``alternate`` answer (AltPO).

The refusal of a row is drawn from the refusal answers with ``random.Random(seed)`` (forget rows in order,
then retain rows with their own generator), a list of alternates likewise; the retain row paired with forget
row ``i`` is :func:`asu.data.pair_indices`'s, the pairing the training batches use. ``idk``, ``mismatch`` and
``alternate`` hold one row per forget row (served with it); ``retain_idk`` one per retain row (served with
it).
"""

from __future__ import annotations

import random
from collections.abc import Sequence
from typing import Any

from asu.data import Rows, pair_indices

__all__ = ["FORGET_ALIGNED", "RETAIN_ALIGNED", "part_rows", "check_part_sources"]

#: Parts with one row per forget row, and with one row per retain row.
FORGET_ALIGNED = ("idk", "mismatch", "alternate")
RETAIN_ALIGNED = ("retain_idk",)
#: The field of a forget row holding its alternate answer(s) (open-unlearning's ``alternate_key``).
ALTERNATE_KEY = "alternate"
#: The (set, field) each part is made of.
_FIELDS = {
    "idk": (("forget", "question"),),
    "retain_idk": (("retain", "question"),),
    "mismatch": (("forget", "question"), ("retain", "answer")),
    "alternate": (("forget", "question"),),
}


def _refusals(n: int, answers: Sequence[str], seed: int) -> list[str]:
    rng = random.Random(seed)
    return [rng.choice(list(answers)) for _ in range(n)]


def _alternate(row: dict[str, Any], rng: random.Random) -> str:
    value = row[ALTERNATE_KEY]
    return value if isinstance(value, str) else rng.choice(list(value))


def check_part_sources(
    parts: Sequence[str],
    method: str,
    forget_rows: Rows,
    retain_rows: Rows | None,
    refusals: Sequence[str] | None,
) -> None:
    """ValueError naming what is missing for ``parts``: refusal answers, question/answer rows, alternates."""
    needs_refusals = [p for p in parts if p in ("idk", "retain_idk")]
    if needs_refusals and not refusals:
        raise ValueError(f"method={method!r} needs idk_answers (refusal strings)")
    sets = {"forget": forget_rows, "retain": retain_rows or []}
    for part in parts:
        for name, key in _FIELDS.get(part, ()):
            for i, row in enumerate(sets[name]):
                if key not in row:
                    raise ValueError(
                        f"method={method!r} trains on rewritten rows ({part}) made of the {name} rows' "
                        f"{key}s, so they must be question/answer rows; {name} row {i} has no {key!r}"
                    )
    if "alternate" in parts:
        for i, row in enumerate(forget_rows):
            value = row.get(ALTERNATE_KEY)
            ok = isinstance(value, str) or (
                isinstance(value, list) and value and all(isinstance(v, str) for v in value)
            )
            if not ok:
                raise ValueError(
                    f"method={method!r} needs an {ALTERNATE_KEY!r} answer (a string or a list of strings) "
                    f"in every forget row; row {i} has {value!r}"
                )


def part_rows(
    part: str,
    forget_rows: Rows,
    retain_rows: Rows | None,
    refusals: Sequence[str] | None,
    seed: int,
) -> list[dict[str, str]]:
    """The question/answer rows of ``part`` (see the module docstring), before tokenisation."""
    if part == "idk":
        answers = _refusals(len(forget_rows), refusals, seed)
        return [{"question": r["question"], "answer": a} for r, a in zip(forget_rows, answers, strict=True)]
    if part == "retain_idk":
        answers = _refusals(len(retain_rows), refusals, seed + 1)
        return [{"question": r["question"], "answer": a} for r, a in zip(retain_rows, answers, strict=True)]
    if part == "mismatch":
        pairing = pair_indices(len(forget_rows), len(retain_rows), seed)
        return [
            {"question": r["question"], "answer": retain_rows[j]["answer"]}
            for r, j in zip(forget_rows, pairing, strict=True)
        ]
    if part == "alternate":
        rng = random.Random(seed)
        return [{"question": r["question"], "answer": _alternate(r, rng)} for r in forget_rows]
    raise ValueError(f"unknown part {part!r}")
