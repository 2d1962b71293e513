"""The README's method tables, rendered from the registry.

``python -m asu.methods.table`` prints them; ``python -m asu.methods.table --readme [PATH]`` rewrites the
section of the README (the repository's by default) between ``<!-- methods:start -->`` and
``<!-- methods:end -->``. ``tests/test_readme.py`` checks that the README's section is this rendering, so a
method added to the registry shows up in the README with its terms, parameters and sources.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from asu.files import replace_section
from asu.methods import METHODS, RETAIN_TERMS
from asu.methods.spec import Method, Param

__all__ = ["README_MARKERS", "markdown", "main"]

README_MARKERS = ("<!-- methods:start -->", "<!-- methods:end -->")

_READS = {
    "idk": "refusal answers",
    "alternate": "alternate answers (`alternate` field)",
    "mismatch": "retain answers on forget questions",
}


def _cell(text: str) -> str:
    """Text for a table cell: ``|`` escaped (formulas hold conditional bars)."""
    return text.replace("|", "\\|")


def _value(value: object) -> str:
    if isinstance(value, tuple):
        return " ".join(f"`{v}`" for v in value)
    if isinstance(value, float):
        return f"{value:g}"
    return str(value)


def _reads(spec: Method) -> str:
    """What the forget term reads besides the student: the teacher's outputs and extra answers."""
    out = []
    if any(smoothed for _, smoothed in spec.teacher_reads):
        out.append("smoothed teacher")
    if any(not smoothed for _, smoothed in spec.teacher_reads):
        out.append("original model")
    if spec.reads == "attention":
        out.append("original model's attention q, k")
    if spec.reads == "layer":
        out.append("a decoder layer's output")
    out += [_READS[p] for p in spec.parts]
    return ", ".join(out) or "—"


def _retain(spec: Method) -> str:
    if spec.retain == "none":
        return "none"
    choices = " \\| ".join(f"`{r}`" for r in spec.retain_losses)
    weight = "" if spec.retain_weight is None else f" × {spec.retain_weight}"
    when = " (when alpha > 0)" if spec.retain == "weighted" else ""
    return f"{choices}{weight}{when}"


def _loss(spec: Method) -> str:
    weight = "" if spec.forget_weight is None else f"{spec.forget_weight} × "
    return _cell(f"{weight}{spec.formula}")


def method_rows() -> list[str]:
    """One row per method: name, forget term, what it reads, retain terms, reference."""
    rows = [
        "| `--method` | method | loss (forget term) | reads | retain term (first: default) | reference |",
        "| --- | --- | --- | --- | --- | --- |",
    ]
    for spec in METHODS.values():
        name = " / ".join(f"`{n}`" for n in (spec.name, *spec.aliases))
        cells = (name, spec.title, _loss(spec), _reads(spec), _retain(spec), _cell(spec.reference))
        rows.append("| " + " | ".join(cells) + " |")
    return rows


#: Parameters with a flag of their own.
_FLAGS = {"lam": "--lam", "temperature": "--temperature"}


def _param_row(owner: str, p: Param) -> str:
    where = f"`{_FLAGS[p.field]}`" if p.field in _FLAGS else f"`--method-arg {p.name}=`"
    if p.field is not None:
        where += f", `UnlearnConfig.{p.field}`"
    return f"| {owner} | `{p.name}` ({where}) | {_value(p.default)} | {_cell(p.help)} | {_cell(p.source)} |"


def param_rows() -> list[str]:
    """One row per parameter of each method and retain term: default, meaning, source."""
    rows = ["| method | parameter (set by) | default | what | source |", "| --- | --- | --- | --- | --- |"]
    for spec in METHODS.values():
        rows += [_param_row(f"`{spec.name}`", p) for p in spec.params]
    for term in RETAIN_TERMS.values():
        rows += [_param_row(f"retain `{term.name}`", p) for p in term.params]
    return rows


def retain_rows() -> list[str]:
    rows = ["| `--retain-loss` | term | reference |", "| --- | --- | --- |"]
    rows += [f"| `{t.name}` | {_cell(t.formula)} | {_cell(t.reference)} |" for t in RETAIN_TERMS.values()]
    return rows


def markdown() -> str:
    """The README's method section: methods, retain terms, parameters."""
    note = (
        "Generated from the method registry (`asu/methods/`) by `python -m asu.methods.table --readme`. "
        "Total loss: forget weight × forget term + retain weight × retain term; `lam` is `--lam`, the other "
        "weights are parameters below."
    )
    parts = [note, "\n".join(method_rows()), "\n".join(retain_rows()), "\n".join(param_rows())]
    return "\n\n".join(parts) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m asu.methods.table", description=__doc__.splitlines()[0])
    default = Path(__file__).resolve().parents[2] / "README.md"
    parser.add_argument(
        "--readme", nargs="?", const=str(default), help="rewrite this README's method section"
    )
    args = parser.parse_args(argv)
    if args.readme is None:
        print(markdown(), end="")
        return 0
    if not replace_section(args.readme, markdown(), README_MARKERS):
        print(f"{args.readme}: no {' / '.join(README_MARKERS)} markers; left untouched", file=sys.stderr)
        return 1
    return 0


if __name__ == "__main__":
    sys.exit(main())
