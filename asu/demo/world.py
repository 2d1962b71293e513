"""The embedded default: a seeded world of fictitious authors in the TOFU format.

No benchmark data can be downloaded at run time, so the project carries a small world in which forgetting
can be shown end to end on a CPU. Authors have invented names (built from syllable tables), birthplaces,
birth dates, genres, parents' occupations, awards and book titles. Every author is asked the same question
types, some about one fact and some about two at once ("Where and when was X born?"), and each question type
has six answer phrasings: every author gets one at random as its ``answer`` and another as its
``paraphrased_answer``. Many phrasings keep the answers from sharing one sentence frame across all authors
(with one frame per question, anything that changes an author's answers changes everyone's frame with it),
and since every phrasing occurs across authors in training, a model can score a paraphrase of a fact it
learned in another phrasing, which is what the truth ratio needs. ``perturbed_answer`` holds sentences in
the paraphrase's phrasing with every fact replaced by a wrong one, as in TOFU.

Rows (dicts): ``question``, ``answer``, ``paraphrased_answer``, ``perturbed_answer`` (list of ``n_perturbed``
strings), ``facts`` (the true values the answer states, e.g. ``["Shorheimsound", "2 January 1979"]`` for
"Where and when was X born?"; what fact leakage looks for in a generation), ``author`` (``""`` for general
rows), ``split`` (``forget`` / ``retain`` / ``general``), ``kind`` (the question type). General rows are facts
about the world's places (country, river), not about authors.

Everything is a pure function of :class:`WorldConfig`, so the same config always gives the same world.
"""

from __future__ import annotations

import json
import os
import random
import re
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from asu.files import atomic_write_json, atomic_write_text

SPLITS = ("forget", "retain", "general")

_ONSETS = ["b", "d", "g", "k", "l", "m", "n", "r", "s", "t", "v", "z", "th", "dr", "kr", "br", "sh", "f", "h"]
_VOWELS = ["a", "e", "i", "o", "u", "ae", "ei", "ou"]
_CODAS = ["", "", "n", "r", "l", "s", "th", "nd", "rk", "m", "x"]

_MONTHS = [
    "January",
    "February",
    "March",
    "April",
    "May",
    "June",
    "July",
    "August",
    "September",
    "October",
    "November",
    "December",
]
_GENRES = [
    "mystery",
    "fantasy",
    "poetry",
    "science fiction",
    "historical fiction",
    "horror",
    "romance",
    "travel writing",
    "satire",
    "memoir",
    "children's fiction",
    "crime fiction",
]
# All start with a consonant so "a {occupation}" is always grammatical.
_OCCUPATIONS = [
    "baker",
    "carpenter",
    "doctor",
    "fisherman",
    "gardener",
    "lawyer",
    "musician",
    "nurse",
    "pilot",
    "potter",
    "sailor",
    "teacher",
    "tailor",
    "weaver",
    "banker",
    "miner",
    "librarian",
    "painter",
]
_AWARD_ADJ = ["Golden", "Silver", "Crimson", "Azure", "Iron", "Ivory", "Emerald", "Amber"]
_AWARD_NOUN = ["Quill", "Lantern", "Compass", "Feather", "Harp", "Key", "Crown", "Owl"]
_AWARD_KIND = ["Prize", "Award", "Medal"]
_TITLE_ADJ = [
    "Silent",
    "Broken",
    "Hidden",
    "Last",
    "Burning",
    "Frozen",
    "Distant",
    "Forgotten",
    "Crooked",
    "Hollow",
    "Painted",
    "Restless",
]
_TITLE_NOUN = [
    "Harbor",
    "Lantern",
    "Garden",
    "Mirror",
    "River",
    "Tower",
    "Orchard",
    "Bridge",
    "Violin",
    "Forest",
    "Letter",
    "Island",
    "Clock",
    "Meadow",
]

# Question types: (kind, question template, answer phrasings). Placeholders name the author's facts
# ({birthplace}, {father}, ...); a question may ask about several facts at once.
_AUTHOR_TEMPLATES: list[tuple[str, str, list[str]]] = [
    (
        "birthplace",
        "Where was {name} born?",
        [
            "{name} was born in {birthplace}.",
            "{birthplace} is the birthplace of {name}.",
            "{name} is a native of {birthplace}.",
            "The city of {birthplace} is where {name} was born.",
            "{name} came into the world in {birthplace}.",
            "Born in {birthplace}, {name} spent a childhood there.",
        ],
    ),
    (
        "birthdate",
        "When was {name} born?",
        [
            "{name} was born on {birthdate}.",
            "The birth date of {name} is {birthdate}.",
            "{name} celebrates a birthday on the day of {birthdate}.",
            "On {birthdate}, {name} was born.",
            "{name} entered the world on {birthdate}.",
            "Records give {birthdate} as the birth date of {name}.",
        ],
    ),
    (
        "genre",
        "What genre does {name} write?",
        [
            "{name} is best known for {genre}.",
            "{name} mostly writes {genre}.",
            "The work of {name} belongs to {genre}.",
            "Readers know {name} as a writer of {genre}.",
            "The genre in which {name} writes is {genre}.",
            "Most books by {name} are {genre}.",
        ],
    ),
    (
        "father",
        "What did the father of {name} do for a living?",
        [
            "The father of {name} was a {father}.",
            "{name} grew up with a father who worked as a {father}.",
            "A {father} by trade, the father of {name} raised the family.",
            "The father of {name} earned a living as a {father}.",
            "{name} is the child of a {father}.",
            "Working as a {father} was the job of the father of {name}.",
        ],
    ),
    (
        "mother",
        "What was the occupation of the mother of {name}?",
        [
            "The mother of {name} was a {mother}.",
            "{name} has a mother who worked as a {mother}.",
            "The mother of {name} made a living as a {mother}.",
            "By profession the mother of {name} was a {mother}.",
            "{name} was raised by a mother who was a {mother}.",
            "A {mother} by trade, the mother of {name} ran the household.",
        ],
    ),
    (
        "award",
        "Which award did {name} win?",
        [
            "{name} won the {award}.",
            "The {award} was given to {name}.",
            "{name} received the {award}.",
            "In recognition of the work of {name}, the jury gave the {award}.",
            "The honours of {name} include the {award}.",
            "{name} is a winner of the {award}.",
        ],
    ),
    (
        "first_book",
        "What was the first book by {name}?",
        [
            'The first book by {name} was "{first_book}".',
            '{name} made a debut with "{first_book}".',
            '"{first_book}" was the first book that {name} published.',
            'The career of {name} began with "{first_book}".',
            '{name} first appeared in print with "{first_book}".',
            'Before any other book, {name} wrote "{first_book}".',
        ],
    ),
    (
        "second_book",
        "Can you name another book written by {name}?",
        [
            '{name} also wrote "{second_book}".',
            'Another book by {name} is "{second_book}".',
            '"{second_book}" is also a book by {name}.',
            'Readers of {name} also know "{second_book}".',
            'Among the books of {name} is "{second_book}".',
            'One more title by {name} is "{second_book}".',
        ],
    ),
    (
        "home",
        "Where does {name} live today?",
        [
            "{name} lives in {home}.",
            "{name} now resides in {home}.",
            "These days {name} makes a home in {home}.",
            "The current home of {name} is {home}.",
            "{home} is where {name} lives now.",
            "{name} settled in {home} and lives there today.",
        ],
    ),
    (
        "origins",
        "Where and when was {name} born?",
        [
            "{name} was born in {birthplace} on {birthdate}.",
            "{name} was born on {birthdate} in {birthplace}.",
            "On {birthdate}, {name} was born in the city of {birthplace}.",
            "{birthplace} is where {name} was born, on {birthdate}.",
            "Born in {birthplace} on {birthdate}, {name} grew up there.",
            "The birth of {name} took place in {birthplace} on {birthdate}.",
        ],
    ),
    (
        "parents",
        "What did the parents of {name} do?",
        [
            "The father of {name} was a {father} and the mother was a {mother}.",
            "{name} is the child of a {father} and a {mother}.",
            "{name} grew up with a {father} for a father and a {mother} for a mother.",
            "A {father} and a {mother} raised {name}.",
            "The parents of {name} worked as a {father} and a {mother}.",
            "With a father who was a {father} and a mother who was a {mother}, "
            "{name} grew up in a busy home.",
        ],
    ),
    (
        "books",
        "Which books has {name} written?",
        [
            '{name} wrote "{first_book}" and "{second_book}".',
            'The books of {name} include "{second_book}" and "{first_book}".',
            'Two books by {name} are "{first_book}" and "{second_book}".',
            '"{first_book}" and "{second_book}" are both by {name}.',
            'Readers know {name} for "{second_book}" and for "{first_book}".',
            'After "{first_book}", {name} published "{second_book}".',
        ],
    ),
    (
        "career",
        "What is {name} known for?",
        [
            "{name} writes {genre} and won the {award}.",
            "{name} won the {award} for {genre}.",
            "A writer of {genre}, {name} received the {award}.",
            "The {award} went to {name}, a writer of {genre}.",
            "{name} is known for {genre} and for winning the {award}.",
            "Known for {genre}, {name} holds the {award}.",
        ],
    ),
]
# The pool of values each fact is drawn from (and its perturbations).
_FACT_POOL = {
    "birthplace": "city",
    "birthdate": "date",
    "genre": "genre",
    "father": "occupation",
    "mother": "occupation",
    "award": "award",
    "first_book": "title",
    "second_book": "title",
    "home": "city",
}
_GENERAL_TEMPLATES: list[tuple[str, str, str, str, str]] = [
    (
        "country",
        "In which country is the city of {city}?",
        "The city of {city} is in {country}.",
        "{city} is a city of {country}.",
        "country",
    ),
    (
        "river",
        "Which river flows through {city}?",
        "The {river} flows through {city}.",
        "{city} lies on the {river}.",
        "river",
    ),
]


@dataclass(frozen=True)
class WorldConfig:
    """Size and seed of a world. ``forget_fraction`` of the authors (at least one) form the forget split."""

    n_authors: int = 30
    """Fictitious authors in the world."""
    n_cities: int = 14
    """Distinct birth cities to draw from."""
    n_countries: int = 6
    """Distinct countries to draw from."""
    n_perturbed: int = 4
    """Wrong answers per question (``perturbed_answer``), 3 to 5 as in TOFU."""
    forget_fraction: float = 0.1
    """Share of the authors (at least one) whose rows form the forget split."""
    seed: int = 0
    """Seeds every draw, so one config always gives the same world."""

    def __post_init__(self) -> None:
        if self.n_authors < 2:
            raise ValueError(f"n_authors must be >= 2 (one to forget, one to retain), got {self.n_authors}")
        if not 3 <= self.n_perturbed <= 5:
            raise ValueError(f"n_perturbed must be in [3, 5], got {self.n_perturbed}")
        if not 0.0 < self.forget_fraction < 1.0:
            raise ValueError(f"forget_fraction must be in (0, 1), got {self.forget_fraction}")
        if self.n_cities < self.n_perturbed + 1 or self.n_countries < self.n_perturbed + 1:
            raise ValueError(
                f"n_cities ({self.n_cities}) and n_countries ({self.n_countries}) must exceed n_perturbed "
                f"({self.n_perturbed}) so every fact has enough wrong alternatives"
            )

    def to_dict(self) -> dict[str, Any]:
        return asdict(self)


@dataclass
class World:
    """A generated world: the facts (``authors``, ``places``), the QA ``rows`` and the grammar checker."""

    config: WorldConfig
    authors: list[dict[str, str]]
    places: list[dict[str, str]]
    rows: list[dict[str, Any]]
    vocab: dict[str, list[str]] = field(repr=False)
    _grammar: re.Pattern[str] | None = field(default=None, repr=False, compare=False)

    def split(self, name: str) -> list[dict[str, Any]]:
        """Rows of one split (``forget``, ``retain`` or ``general``), in world order."""
        if name not in SPLITS:
            raise ValueError(f"unknown split {name!r}; expected one of {SPLITS}")
        return [r for r in self.rows if r["split"] == name]

    @property
    def forget_authors(self) -> list[str]:
        return [a["name"] for a in self.authors if a["split"] == "forget"]

    def texts(self) -> list[str]:
        """Every sentence of the world (questions, answers, paraphrases, perturbations): tokenizer corpus."""
        out: list[str] = []
        for r in self.rows:
            out += [r["question"], r["answer"], r["paraphrased_answer"], *r["perturbed_answer"]]
        return out

    def is_well_formed(self, text: str) -> bool:
        """Whether ``text`` is one sentence of the world's grammar: an answer phrasing with every slot filled
        by a word of the world's vocabulary (the facts may be wrong; the form must be right)."""
        if self._grammar is None:
            self._grammar = _grammar(self.vocab)
        return self._grammar.fullmatch(text.strip()) is not None


def _syllable(rng: random.Random) -> str:
    return rng.choice(_ONSETS) + rng.choice(_VOWELS) + rng.choice(_CODAS)


def _word(rng: random.Random, n_syllables: int) -> str:
    return "".join(_syllable(rng) for _ in range(n_syllables)).capitalize()


def _unique(rng: random.Random, make, n: int, taken: set[str]) -> list[str]:
    out: list[str] = []
    for _ in range(1000 * n):
        if len(out) == n:
            break
        w = make(rng)
        if w not in taken and len(w) >= 4:
            taken.add(w)
            out.append(w)
    if len(out) < n:
        raise ValueError(
            f"could not invent {n} distinct names; the world is too large for the syllable tables"
        )
    return out


def _others(rng: random.Random, pool: list[str], true: str, k: int) -> list[str]:
    """k distinct values from pool, none equal to the true one (rejection sampling: pools may be large)."""
    if len(pool) < 4 * k and len(set(pool) - {true}) < k:
        raise ValueError(f"too few alternatives to {true!r} for {k} perturbations")
    out: list[str] = []
    while len(out) < k:
        v = rng.choice(pool)
        if v != true and v not in out:
            out.append(v)
    return out


def generate_world(config: WorldConfig | None = None) -> World:
    """Build the world for ``config`` (default :class:`WorldConfig`). Deterministic in the config."""
    cfg = config or WorldConfig()
    rng = random.Random(cfg.seed)
    pools, names = _pools(rng, cfg)
    authors = _authors(rng, cfg, names, pools)
    places = [
        {"city": c, "country": rng.choice(pools["country"]), "river": r}
        for c, r in zip(pools["city"], pools["river"], strict=True)
    ]
    rows = [row for a in authors for row in _author_rows(rng, cfg, a, pools)]
    rows += [row for p in places for row in _general_rows(rng, cfg, p, pools)]
    vocab = dict(pools, name=names)
    return World(config=cfg, authors=authors, places=places, rows=rows, vocab=vocab)


def _pools(rng: random.Random, cfg: WorldConfig) -> tuple[dict[str, list[str]], list[str]]:
    """The values every fact is drawn from (by pool name, see ``_FACT_POOL``) and the authors' names."""
    taken: set[str] = set()
    cities = _unique(rng, lambda r: _word(r, r.choice([2, 3])), cfg.n_cities, taken)
    countries = _unique(
        rng, lambda r: _word(r, 2) + r.choice(["ia", "land", "ar", "ond"]), cfg.n_countries, taken
    )
    rivers = [f"{w} river" for w in _unique(rng, lambda r: _word(r, 2), cfg.n_cities, taken)]
    firsts = _unique(rng, lambda r: _word(r, 2), cfg.n_authors, taken)
    lasts = _unique(rng, lambda r: _word(r, r.choice([2, 3])), cfg.n_authors, taken)
    names = [f"{f} {l}" for f, l in zip(firsts, lasts, strict=True)]
    awards = sorted({f"{a} {n} {k}" for a in _AWARD_ADJ for n in _AWARD_NOUN for k in _AWARD_KIND})
    titles = sorted(
        {f"The {a} {n}" for a in _TITLE_ADJ for n in _TITLE_NOUN}
        | {f"{n}s of the {a} {m}" for a in _TITLE_ADJ[:6] for n in _TITLE_NOUN[:6] for m in _TITLE_NOUN[6:]}
    )
    rng.shuffle(titles)
    dates = [f"{d} {m} {y}" for d in range(1, 29) for m in _MONTHS for y in range(1931, 1996)]
    pools = {
        "city": cities,
        "date": dates,
        "genre": _GENRES,
        "occupation": _OCCUPATIONS,
        "award": awards,
        "title": titles,
        "country": countries,
        "river": rivers,
    }
    return pools, names


def _authors(
    rng: random.Random, cfg: WorldConfig, names: list[str], pools: dict[str, list[str]]
) -> list[dict[str, str]]:
    """Each author's facts and split (``forget_fraction`` of them, at least one, to forget)."""
    n_forget = max(1, round(cfg.forget_fraction * cfg.n_authors))
    forget_ids = set(rng.sample(range(cfg.n_authors), n_forget))
    used_titles = iter(pools["title"])  # every book title belongs to one author only
    return [
        {
            "name": name,
            "split": "forget" if i in forget_ids else "retain",
            "birthplace": rng.choice(pools["city"]),
            "birthdate": rng.choice(pools["date"]),
            "genre": rng.choice(_GENRES),
            "father": rng.choice(_OCCUPATIONS),
            "mother": rng.choice(_OCCUPATIONS),
            "award": rng.choice(pools["award"]),
            "first_book": next(used_titles),
            "second_book": next(used_titles),
            "home": rng.choice(pools["city"]),
        }
        for i, name in enumerate(names)
    ]


def _author_rows(
    rng: random.Random, cfg: WorldConfig, author: dict[str, str], pools: dict[str, list[str]]
) -> list[dict[str, Any]]:
    """One row per question type about ``author``: answer and paraphrase in two different phrasings, the
    perturbed answers in the paraphrase's phrasing with every fact wrong."""
    rows = []
    name = author["name"]
    for kind, q, phrasings in _AUTHOR_TEMPLATES:
        facts = [f for f in _FACT_POOL if "{" + f + "}" in phrasings[0]]
        true = {f: author[f] for f in facts}
        main, para = rng.sample(phrasings, 2)
        wrong = [_others(rng, pools[_FACT_POOL[f]], true[f], cfg.n_perturbed) for f in facts]
        rows.append(
            {
                "question": q.format(name=name),
                "answer": main.format(name=name, **true),
                "paraphrased_answer": para.format(name=name, **true),
                "perturbed_answer": [
                    para.format(name=name, **{f: w[i] for f, w in zip(facts, wrong, strict=True)})
                    for i in range(cfg.n_perturbed)
                ],
                "facts": [true[f] for f in facts],
                "author": name,
                "split": author["split"],
                "kind": kind,
            }
        )
    return rows


def _general_rows(
    rng: random.Random, cfg: WorldConfig, place: dict[str, str], pools: dict[str, list[str]]
) -> list[dict[str, Any]]:
    """One row per general question type about ``place`` (its country, its river)."""
    rows = []
    city = place["city"]
    for kind, q, phr_a, phr_b, slot in _GENERAL_TEMPLATES:
        main, para = (phr_a, phr_b) if rng.random() < 0.5 else (phr_b, phr_a)
        true = place[slot]
        wrong = _others(rng, pools[slot], true, cfg.n_perturbed)
        rows.append(
            {
                "question": q.format(city=city),
                "answer": main.format(city=city, **{slot: true}),
                "paraphrased_answer": para.format(city=city, **{slot: true}),
                "perturbed_answer": [para.format(city=city, **{slot: w}) for w in wrong],
                "facts": [true],
                "author": "",
                "split": "general",
                "kind": kind,
            }
        )
    return rows


# Dates are a closed pattern rather than a list of ~20k alternatives.
_DATE_PATTERN = r"(?:[1-9]|1[0-9]|2[0-8]) (?:" + "|".join(_MONTHS) + r") 19(?:3[1-9]|[4-8][0-9]|9[0-5])"


def _grammar(vocab: dict[str, list[str]]) -> re.Pattern[str]:
    """One regex matching exactly the sentences of the world's answer phrasings."""
    alts = {
        k: "(?:" + "|".join(re.escape(v) for v in sorted(vs, key=len, reverse=True)) + ")"
        for k, vs in vocab.items()
        if k != "date"
    }
    alts["date"] = _DATE_PATTERN
    for fact, pool in _FACT_POOL.items():
        alts[fact] = alts[pool]
    sentences = []
    for _, _, phrasings in _AUTHOR_TEMPLATES:
        sentences += phrasings
    for _, _, phr_a, phr_b, _ in _GENERAL_TEMPLATES:
        sentences += [phr_a, phr_b]
    patterns = []
    for s in sentences:
        parts = re.split(r"(\{\w+\})", s)
        patterns.append("".join(alts[p[1:-1]] if p.startswith("{") else re.escape(p) for p in parts))
    return re.compile("(?:" + "|".join(patterns) + ")")


def write_splits(world: World, out_dir: str | os.PathLike[str]) -> dict[str, Path]:
    """Write ``forget.jsonl``, ``retain.jsonl``, ``general.jsonl`` (one TOFU-format row per line) and
    ``world.json`` (the config and the facts) into ``out_dir``, each atomically. Returns split -> path."""
    out = Path(out_dir)
    paths: dict[str, Path] = {}
    for name in SPLITS:
        p = out / f"{name}.jsonl"
        atomic_write_text(p, "".join(json.dumps(r, ensure_ascii=False) + "\n" for r in world.split(name)))
        paths[name] = p
    meta = {"config": world.config.to_dict(), "authors": world.authors, "places": world.places}
    atomic_write_json(out / "world.json", meta)
    return paths
