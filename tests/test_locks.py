"""The locked test environments (requirements/): every lock is whole, agrees with its job's spec and with
pyproject.toml's ranges, the Makefile installs only from them, and README's versions table is theirs."""

from __future__ import annotations

import importlib.util
import re
from pathlib import Path

import pytest
import tomllib
from packaging.requirements import Requirement

ROOT = Path(__file__).resolve().parents[1]


def _load_locks():
    spec = importlib.util.spec_from_file_location("locks", ROOT / "requirements" / "locks.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


locks = _load_locks()


def _project_requirements() -> list[Requirement]:
    """pyproject.toml's dependencies and its dev extra (what every job installs), markers evaluated here."""
    project = tomllib.loads((ROOT / "pyproject.toml").read_text(encoding="utf-8"))["project"]
    lines = project["dependencies"] + project["optional-dependencies"]["dev"]
    reqs = [Requirement(line) for line in lines]
    return [r for r in reqs if r.marker is None or r.marker.evaluate()]


@pytest.mark.parametrize("job", locks.JOBS)
def test_lock_is_whole_and_agrees_with_its_spec_and_the_declared_ranges(job):
    pins = locks.read_pins(locks.lock_path(job))
    header = locks.lock_path(job).read_text(encoding="utf-8").splitlines()[:3]
    assert all(line.startswith("#") for line in header) and re.search(r"Python 3\.\d+\.\d+", header[1])
    assert "asu" not in pins  # the project itself is installed editable, never locked
    for line in locks.spec_lines(job):
        req = Requirement(line)
        key = locks.canonical(req.name)
        assert key in pins, f"{job}.lock lacks {req.name}, which {job}.in pins"
        version = pins[key][1]
        assert req.specifier.contains(version, prereleases=True), f"{job}.lock: {req.name} {version}"
    for req in _project_requirements():
        key = locks.canonical(req.name)
        assert key in pins, f"{job}.lock lacks the dependency {req.name}"
        version = pins[key][1]
        assert req.specifier.contains(version, prereleases=True), f"{job}.lock: {req.name} {version} vs {req}"


def test_every_job_has_a_spec_that_describes_it():
    for job in locks.JOBS:
        notes = locks.spec_notes(job)
        assert notes.get("job") and notes.get("runs"), f"{job}.in needs '# job:' and '# runs:' lines"


def test_readme_versions_table_is_the_locks():
    readme = (ROOT / "README.md").read_text(encoding="utf-8")
    table = readme.split(locks.BEGIN, 1)[1].split(locks.END, 1)[0].strip()
    assert table == locks.render_table()
    rows = table.splitlines()[2:]
    assert len(rows) == len(locks.JOBS)


def test_makefile_installs_every_venv_from_a_lock():
    """No recipe of the Makefile runs pip itself: every venv goes through ``locks.py install``, which
    installs the lock with --no-deps and compares the result with it."""
    makefile = (ROOT / "Makefile").read_text(encoding="utf-8")
    assert "pip install" not in makefile
    assert "requirements/locks.py install $(2) --venv $(1) --source $(SOURCE)" in makefile
    for job, variable in [("test", "VENV"), ("newest", "NEWEST_VENV"), ("floor", "FLOOR_VENV")]:
        assert f"$(call job_venv,$({variable}),{job})" in makefile
    assert "$(call job_venv,$(GPU_IMAGE_VENV),gpu-image)" in makefile
    assert "SOURCE  ?= lock" in makefile


def test_read_pins_names_a_malformed_or_repeated_line(tmp_path):
    bad = tmp_path / "x.lock"
    bad.write_text("# header\ntorch>=2\n", encoding="utf-8")
    with pytest.raises(ValueError, match=r"x.lock:2: not a 'name==version' pin"):
        locks.read_pins(bad)
    bad.write_text("Torch==2.13.0\ntorch==2.11.0\n", encoding="utf-8")
    with pytest.raises(ValueError, match="torch is pinned twice"):
        locks.read_pins(bad)


def test_differences_name_what_is_missing_extra_or_moved():
    want = {"torch": ("torch", "2.13.0+cpu"), "numpy": ("numpy", "2.3.5"), "tqdm": ("tqdm", "4.67.1")}
    have = {"torch": ("torch", "2.13.0+cpu"), "numpy": ("numpy", "2.4.0"), "rich": ("rich", "15.0.0")}
    assert locks.differences(want, have) == [
        "numpy: lock 2.3.5, installed 2.4.0",
        "rich 15.0.0 is installed but not in the lock",
        "tqdm 4.67.1 is in the lock but not installed",
    ]
    assert locks.differences(want, dict(want)) == []


def test_failures_are_read_from_pytest_junit(tmp_path):
    junit = tmp_path / "junit.xml"
    junit.write_text(
        '<testsuites><testsuite><testcase classname="tests.test_a" name="test_ok"/>'
        '<testcase classname="tests.test_a" name="test_bad"><failure message="assert 0.3 == 0.28">x'
        '</failure></testcase><testcase classname="tests.test_b" name="test_err"><error message="boom"/>'
        "</testcase></testsuite></testsuites>",
        encoding="utf-8",
    )
    assert locks._failures(junit) == [
        ("tests.test_a::test_bad", "assert 0.3 == 0.28"),
        ("tests.test_b::test_err", "boom"),
    ]
    assert locks._failures(tmp_path / "missing.xml")[0][0] == "(no junit report)"
