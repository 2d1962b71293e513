"""The package's floors import only the floors below them.

From the top: ``asu.commands`` (the CLI) -> ``asu.demo`` (world, tiny model, demo run) -> the ``asu`` library
-> ``asu_kernels``. So the library never imports ``asu.commands`` or ``asu.demo``, ``asu.demo`` never imports
``asu.commands``, and ``asu_kernels`` imports nothing but torch, triton, numpy, the standard library and
itself (never ``asu``, never transformers).

Every import statement counts, at module level or inside a function (``ast.walk`` sees both), as does
``importlib.import_module`` with a literal name; relative imports are resolved against the module's package.
"""

from __future__ import annotations

import ast
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
KERNEL_IMPORTS = {"torch", "triton", "numpy", "asu_kernels"}


def _within(name: str, package: str) -> bool:
    return name == package or name.startswith(package + ".")


def floor_of(module: str) -> str:
    """``asu.commands``, ``asu.demo``, ``asu`` (the library) or ``asu_kernels``."""
    for floor in ("asu.commands", "asu.demo", "asu_kernels", "asu"):
        if _within(module, floor):
            return floor
    raise ValueError(f"{module} is in none of the package's floors")


def forbidden(floor: str, imported: str) -> str | None:
    """Why ``floor`` may not import ``imported``, or None when it may."""
    if floor == "asu_kernels":
        top = imported.split(".")[0]
        if top in KERNEL_IMPORTS or top in sys.stdlib_module_names:
            return None
        return "asu_kernels imports only torch, triton, numpy and the standard library"
    upper = {"asu": ("asu.commands", "asu.demo"), "asu.demo": ("asu.commands",)}.get(floor, ())
    for package in upper:
        if _within(imported, package):
            return f"{floor} must not import {package}, a floor above it"
    return None


def module_name(path: Path) -> tuple[str, bool]:
    """The dotted name of a source file under ROOT, and whether it is a package's ``__init__``."""
    parts = list(path.relative_to(ROOT).with_suffix("").parts)
    is_package = parts[-1] == "__init__"
    return ".".join(parts[:-1] if is_package else parts), is_package


def imports(source: str, module: str, is_package: bool) -> Iterator[tuple[int, list[str], str]]:
    """``(line, imported modules, statement)`` for every import in ``source``.

    ``from X import a`` imports ``X`` and maybe ``X.a`` (``a`` may be a submodule: ``from asu import demo``).
    """
    package = module if is_package else module.rpartition(".")[0]
    for node in ast.walk(ast.parse(source)):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom):
            base = node.module or ""
            if node.level:
                parts = package.split(".")
                base = ".".join(parts[: len(parts) - (node.level - 1)] + ([base] if base else []))
            names = ([base] if base else []) + [
                f"{base}.{alias.name}" if base else alias.name for alias in node.names if alias.name != "*"
            ]
        elif _is_import_module_call(node):
            names = [node.args[0].value]
        else:
            continue
        yield node.lineno, names, " ".join((ast.get_source_segment(source, node) or "").split())


def _is_import_module_call(node: ast.AST) -> bool:
    """``importlib.import_module("a.b")`` or ``import_module("a.b")`` with a literal absolute name."""
    if not (isinstance(node, ast.Call) and node.args and isinstance(node.args[0], ast.Constant)):
        return False
    func = node.func
    name = func.attr if isinstance(func, ast.Attribute) else getattr(func, "id", None)
    value = node.args[0].value
    return name == "import_module" and isinstance(value, str) and not value.startswith(".")


def violations(source: str, label: str, module: str, is_package: bool = False) -> list[str]:
    """``label:line: `statement` imports NAME: why`` for each import that breaks the layering."""
    floor = floor_of(module)
    found = []
    for line, names, statement in imports(source, module, is_package):
        for name in names:
            why = forbidden(floor, name)
            if why:
                found.append((line, f"{label}:{line}: `{statement}` imports {name}: {why}"))
                break
    return [message for _, message in sorted(found)]


def package_sources() -> list[Path]:
    return sorted(p for top in ("asu", "asu_kernels") for p in (ROOT / top).rglob("*.py"))


def test_every_floor_imports_only_floors_below():
    problems = []
    for path in package_sources():
        module, is_package = module_name(path)
        label = str(path.relative_to(ROOT))
        problems += violations(path.read_text(encoding="utf-8"), label, module, is_package)
    assert not problems, "layering broken:\n" + "\n".join(problems)


def test_reads_modules_of_every_floor():
    counts = {"asu.commands": 0, "asu.demo": 0, "asu": 0, "asu_kernels": 0}
    for path in package_sources():
        counts[floor_of(module_name(path)[0])] += 1
    assert all(n > 0 for n in counts.values()), counts
    # Each floor's package itself is read (not only stray files).
    for floor in counts:
        assert (ROOT / floor.replace(".", "/") / "__init__.py") in package_sources(), floor


def test_no_test_module_imports_another():
    """Shared test code lives in tests/helpers.py (and fixtures in conftest.py), never in a test module."""
    problems = []
    files = sorted((ROOT / "tests").rglob("*.py"))
    assert len(files) > 1
    for path in files:
        source = path.read_text(encoding="utf-8")
        for line, names, statement in imports(source, "tests." + path.stem, False):
            if any(name.split(".")[-1].startswith("test_") or name == "conftest" for name in names[:1]):
                problems.append(f"{path.relative_to(ROOT)}:{line}: `{statement}`")
    assert not problems, "test modules importing test modules:\n" + "\n".join(problems)


LIBRARY_SOURCE = """\
import os
import asu.commands

def run():
    from asu.demo.tiny import build_model
    from .commands import main
    from . import demo
    from .data import encode_rows
    importlib.import_module("asu.commands.eval")
"""


def test_checker_catches_an_upper_floor_import_at_any_depth():
    found = violations(LIBRARY_SOURCE, "asu/fake.py", "asu.fake")
    lines = [f.split(":")[1] for f in found]
    assert lines == ["2", "5", "6", "7", "9"], found
    assert found[0] == (
        "asu/fake.py:2: `import asu.commands` imports asu.commands: "
        "asu must not import asu.commands, a floor above it"
    )
    assert "`from asu.demo.tiny import build_model` imports asu.demo.tiny" in found[1]
    assert "imports asu.commands" in found[2] and "imports asu.demo" in found[3]
    # The same source is fine one floor up, except for the CLI imports.
    demo = violations(LIBRARY_SOURCE, "asu/demo/fake.py", "asu.demo.fake")
    assert [f.split(":")[1] for f in demo] == ["2", "9"], demo  # `.commands` is asu.demo.commands there
    assert violations(LIBRARY_SOURCE, "asu/commands/fake.py", "asu.commands.fake") == []


@pytest.mark.parametrize(
    "statement, allowed",
    [
        ("import torch.nn.functional as F", True),
        ("from triton import language as tl", True),
        ("import numpy as np", True),
        ("import math, os.path", True),
        ("from __future__ import annotations", True),
        ("from . import reference", True),
        ("from ._backend import interpreting", True),
        ("import transformers", False),
        ("from asu.smoothing import smoothing", False),
        ("import asu", False),
        ("from .. import asu", False),  # the parent of asu_kernels is the top level: this is `asu`
        ("import safetensors.torch", False),
    ],
)
def test_checker_on_kernel_imports(statement, allowed):
    source = f"def f():\n    {statement}\n"
    found = violations(source, "asu_kernels/fake.py", "asu_kernels.fake")
    assert (found == []) == allowed, found
    if not allowed:
        assert found[0].startswith("asu_kernels/fake.py:2: `")


_CLI_FLAG = __import__("re").compile(r"(?<![\w-])--[a-z][a-z0-9-]*")


def _raised_flags(path: Path) -> Iterator[tuple[int, str]]:
    """``(line, flag)`` for each ``--flag`` written in a string literal inside a ``raise`` statement."""
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Raise) and node.exc is not None:
            for sub in ast.walk(node.exc):
                if isinstance(sub, ast.Constant) and isinstance(sub.value, str):
                    for flag in _CLI_FLAG.findall(sub.value):
                        yield sub.lineno, flag


def test_library_errors_do_not_name_command_line_flags():
    """The library is called from Python too: its errors name arguments and config fields, not the flags of
    one command (the commands word their own errors)."""
    library = [
        p
        for p in sorted((ROOT / "asu").rglob("*.py"))
        if floor_of(".".join(p.relative_to(ROOT).with_suffix("").parts)) == "asu"
    ]
    found = [f"{p.relative_to(ROOT)}:{line}: {flag}" for p in library for line, flag in _raised_flags(p)]
    assert not found, "library errors naming CLI flags:\n" + "\n".join(found)
