"""asu.files: a write either lands whole or leaves the old file (and no temporary file) behind."""

from __future__ import annotations

import json
import stat

import pytest

from asu.files import atomic_write, atomic_write_json, atomic_write_text


def test_writes_text_and_json_creating_parents(tmp_path):
    path = atomic_write_text(tmp_path / "a" / "b" / "note.txt", "τ = 2.3\n")
    assert path.read_text(encoding="utf-8") == "τ = 2.3\n"
    atomic_write_json(tmp_path / "r.json", {"tau": 2.3, "name": "é", "path": tmp_path}, default=str)
    assert json.loads((tmp_path / "r.json").read_text(encoding="utf-8"))["name"] == "é"
    assert stat.S_IMODE((tmp_path / "r.json").stat().st_mode) == 0o644


def test_failed_write_keeps_the_old_file_and_leaves_no_temporary(tmp_path):
    target = tmp_path / "results.json"
    target.write_text("old")

    def half_then_fail(tmp: str) -> None:
        with open(tmp, "w") as f:
            f.write("half")
        raise RuntimeError("disk full")

    with pytest.raises(RuntimeError, match="disk full"):
        atomic_write(target, half_then_fail)
    assert target.read_text() == "old"
    assert sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]


def test_unserialisable_json_leaves_nothing(tmp_path):
    with pytest.raises(TypeError):
        atomic_write_json(tmp_path / "x.json", {"bad": object()})
    assert list(tmp_path.iterdir()) == []


def test_temporary_keeps_the_suffix_for_writers_that_read_it(tmp_path):
    seen = []
    atomic_write(tmp_path / "plot.png", lambda tmp: (seen.append(tmp), open(tmp, "wb").close()))
    assert seen[0].endswith(".png") and (tmp_path / "plot.png").exists()
