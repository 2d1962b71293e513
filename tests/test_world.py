"""The embedded world: determinism, schema, splits, the grammar checker and the JSONL writer."""

from __future__ import annotations

import json

import pytest

from asu.demo.world import SPLITS, WorldConfig, generate_world, write_splits


def test_same_config_same_world_other_seed_other_world():
    a, b = (
        generate_world(WorldConfig(n_authors=12, seed=3)),
        generate_world(WorldConfig(n_authors=12, seed=3)),
    )
    assert a.rows == b.rows and a.authors == b.authors
    c = generate_world(WorldConfig(n_authors=12, seed=4))
    assert [r["answer"] for r in c.rows] != [r["answer"] for r in a.rows]


def test_schema_and_splits():
    cfg = WorldConfig(n_authors=20, n_perturbed=5, seed=1)
    w = generate_world(cfg)
    assert {r["split"] for r in w.rows} == set(SPLITS)
    assert len(w.forget_authors) == 2  # 10% of 20 authors
    per_author = {}
    for r in w.rows:
        assert set(r) >= {"question", "answer", "paraphrased_answer", "perturbed_answer", "author", "split"}
        assert len(r["perturbed_answer"]) == 5
        assert r["answer"] not in r["perturbed_answer"]
        assert r["paraphrased_answer"] not in r["perturbed_answer"]
        assert len(set(r["perturbed_answer"])) == 5
        assert r["paraphrased_answer"] != r["answer"]
        if r["split"] == "general":
            assert r["author"] == ""
        else:
            assert r["author"] in r["question"]
            per_author.setdefault(r["author"], set()).add(r["split"])
    # An author's rows are all in one split, and the forget split is exactly the forget authors.
    assert all(len(s) == 1 for s in per_author.values())
    assert sorted(a for a, s in per_author.items() if s == {"forget"}) == sorted(w.forget_authors)
    assert len(w.split("forget")) == 13 * len(w.forget_authors)  # 13 question types
    # Questions are unique, so a model can tell every fact apart.
    assert len({r["question"] for r in w.rows}) == len(w.rows)


def test_grammar_checker():
    w = generate_world(WorldConfig(n_authors=10, seed=2))
    for r in w.rows:
        assert w.is_well_formed(r["answer"]) and w.is_well_formed(r["paraphrased_answer"])
        assert all(w.is_well_formed(p) for p in r["perturbed_answer"])
    r = w.split("retain")[0]
    assert not w.is_well_formed(r["answer"][:-1])  # no full stop
    assert not w.is_well_formed(r["answer"] + " " + r["answer"])
    assert not w.is_well_formed("Jad Jad Jad Jad")
    assert not w.is_well_formed(r["answer"].replace(r["author"], "Zzq Qqz"))  # not a name of the world
    assert not w.is_well_formed("")


def test_bad_config():
    with pytest.raises(ValueError, match="n_perturbed"):
        WorldConfig(n_perturbed=7)
    with pytest.raises(ValueError, match="forget_fraction"):
        WorldConfig(forget_fraction=1.5)
    with pytest.raises(ValueError, match="split"):
        generate_world(WorldConfig(n_authors=4)).split("test")


def test_write_splits(tmp_path):
    w = generate_world(WorldConfig(n_authors=10, seed=0))
    paths = write_splits(w, tmp_path / "data")
    for name in SPLITS:
        lines = paths[name].read_text().splitlines()
        assert [json.loads(x) for x in lines] == w.split(name)
    meta = json.loads((tmp_path / "data" / "world.json").read_text())
    assert generate_world(WorldConfig(**meta["config"])).rows == w.rows
    assert not [p for p in (tmp_path / "data").iterdir() if p.name.endswith(".tmp")]
