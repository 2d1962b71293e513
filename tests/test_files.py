"""asu.files: a write either lands whole or leaves the old file (and no temporary file) behind."""

from __future__ import annotations

import json
import os
import signal
import stat
import subprocess
import sys
from pathlib import Path

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


# ---- valid JSON, output folders ---------------------------------------------------------------------------


def test_non_finite_values_are_written_as_null_with_a_note(tmp_path, caplog):
    from asu.files import finite_json

    obj = {"a": float("nan"), "b": [1.0, float("inf"), {"c": -float("inf")}], "d": (2.5, "x"), "e": 3}
    clean, where = finite_json(obj)
    assert clean == {"a": None, "b": [1.0, None, {"c": None}], "d": [2.5, "x"], "e": 3}
    assert where == ["$.a", "$.b[1]", "$.b[2].c"]
    with caplog.at_level("WARNING"):
        atomic_write_json(tmp_path / "r.json", obj)
    assert json.loads((tmp_path / "r.json").read_text()) == clean  # strict JSON: no NaN/Infinity tokens
    assert "3 non-finite value(s) written as null ($.a, $.b[1], $.b[2].c)" in caplog.text
    # A value turned into JSON by ``default`` is cleaned too.
    atomic_write_json(tmp_path / "s.json", {"x": complex(1, 2)}, default=lambda v: float("nan"))
    assert json.loads((tmp_path / "s.json").read_text()) == {"x": None}


def test_output_location_is_checked_against_inputs(tmp_path):
    from asu.files import check_output_location

    model = tmp_path / "model"
    model.mkdir()
    (tmp_path / "link").symlink_to(model)
    (tmp_path / "file").write_text("x")
    for out, message in [
        (model, "is the --model folder"),
        (tmp_path / "link", "is the --model folder"),  # symlinks are resolved
        (model / "sub" / "deeper", "lies inside the --model folder"),
        (tmp_path / "link" / "sub", "lies inside the --model folder"),
        (tmp_path, "contains the --model folder"),
    ]:
        with pytest.raises(ValueError, match=message):
            check_output_location(out, {"--model": model})
    with pytest.raises(NotADirectoryError, match="exists and is not a directory"):
        check_output_location(tmp_path / "file", {"--model": model})
    with pytest.raises(NotADirectoryError, match="is a file"):
        check_output_location(tmp_path / "file" / "out", {})
    check_output_location(tmp_path / "elsewhere" / "out", {"--model": model, "--other": None})


def test_output_lock_is_exclusive_names_the_holder_and_is_removed(tmp_path):
    from asu.files import LOCK_FILE, OutputInUseError, check_not_in_use, output_lock

    out = tmp_path / "out"
    with output_lock(out) as lock:
        assert lock == out / LOCK_FILE and lock.read_text().strip() == str(os.getpid())
        check_not_in_use(out)  # this process's own lock is no obstacle to its own checks
        with pytest.raises(OutputInUseError, match=f"in use by another asu run \\(pid {os.getpid()}\\)"):
            with output_lock(out):  # another open file description: flock refuses it, even in-process
                pass
    assert not (out / LOCK_FILE).exists()
    with output_lock(out):  # free again
        pass


def test_a_killed_holder_leaves_the_folder_free(tmp_path):
    """The kernel drops a dead process's flock: a run killed with SIGKILL never leaves its folder locked."""
    from asu.files import check_not_in_use, output_lock

    out = tmp_path / "out"
    files_py = Path(__file__).resolve().parents[1] / "asu" / "files.py"
    script = (
        "import importlib.util, sys, time\n"
        f"spec = importlib.util.spec_from_file_location('files', {str(files_py)!r})\n"
        "files = importlib.util.module_from_spec(spec); spec.loader.exec_module(files)\n"
        f"with files.output_lock({str(out)!r}):\n"
        "    print('locked', flush=True); time.sleep(60)\n"
    )
    holder = subprocess.Popen([sys.executable, "-c", script], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout.readline().strip() == "locked"
        with pytest.raises(OSError, match=f"pid {holder.pid}"):
            check_not_in_use(out)
    finally:
        holder.send_signal(signal.SIGKILL)
        holder.wait()
    check_not_in_use(out)
    with output_lock(out):
        pass


def test_stale_temporaries_are_removed_and_results_kept(tmp_path):
    from asu.files import remove_stale_temporaries

    keep = ["run.json", "model.safetensors", ".hidden", "notes.tmp", ".result-x", ".a.tmp"]
    for name in keep:
        (tmp_path / name).write_text("x")
    (tmp_path / ".run.json.k2j4_9zq.tmp.json").write_text("half")
    (tmp_path / ".model.safetensors.abcdefgh.tmp.safetensors").write_text("half")
    (tmp_path / ".result-a1b2c3d4").mkdir()
    (tmp_path / ".result-a1b2c3d4" / "model.safetensors").write_text("half")
    removed = remove_stale_temporaries(tmp_path)
    assert removed == [
        ".model.safetensors.abcdefgh.tmp.safetensors",
        ".result-a1b2c3d4",
        ".run.json.k2j4_9zq.tmp.json",
    ]
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(keep)
