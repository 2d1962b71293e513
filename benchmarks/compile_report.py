"""Ahead-of-time compile report: every kernel configuration, compiled for sm_80 and sm_90 without a GPU.

    python -m benchmarks.compile_report [--module attention,linear_kl] [--quick] [--cc 80,90] [--out FILE]

For each ``asu_kernels.<module>.aot_specs()`` (modules without one are skipped), every spec is built with
``triton.compile(ASTSource(fn, signature, constexprs), target=GPUTarget("cuda", cc, 32))``; registers and
spill bytes come from the ``ptxas -v`` log of Triton's own PTX -> cubin step (``sm_90a`` for Hopper, needed
by wgmma), so the ptxas is the one the installed Triton uses for the target (:func:`resolve_ptxas`), with
Triton's flags, and it accepts the PTX version Triton emitted; the sm_90 PTX is searched for ``wgmma``. The
report's header names the binary, its CUDA release and the PTX version. One table row per (spec, cc): shared
memory, registers, spill bytes, wgmma, status.

Run it as its own process: it clears ``TRITON_INTERPRET`` before importing the kernels. Exit status 1
when a spec fails to compile, needs more shared memory than the device has (sm_80: 163 KiB, sm_90:
227 KiB), or spills on sm_90 in a config flagged ``h100_candidate`` (spills elsewhere are reported; with
``--allow-spills`` those are reported only, for a check that every config compiles).
"""

from __future__ import annotations

import argparse
import contextlib
import functools
import importlib
import io
import os
import platform
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import dataclass
from pathlib import Path

DEFAULT_MODULES = ("attention", "linear_kl", "attention_kl")
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}


@dataclass
class Row:
    """One compiled (spec, cc) pair."""

    module: str
    spec: str
    cc: int
    h100_candidate: bool
    smem: int = -1
    regs: int = -1
    spill: int = -1
    wgmma: bool | None = None
    seconds: float = 0.0
    ptx: str = ""  # the PTX ``.version`` Triton emitted
    error: str = ""

    def problems(self, allow_spills: bool = False) -> list[str]:
        """What fails the report; ``allow_spills`` leaves out sm_90 spills of h100 candidates (they still
        compile, and the table still shows them)."""
        out = []
        if self.error:
            out.append(f"compile error: {self.error}")
        else:
            if self.smem > SMEM_LIMIT[self.cc]:
                out.append(f"shared memory {self.smem} B > sm_{self.cc} limit {SMEM_LIMIT[self.cc]} B")
            if self.h100_candidate and self.cc == 90 and self.spill > 0 and not allow_spills:
                out.append(f"{self.spill} spill bytes in an h100_candidate config")
            if self.spill < 0:
                out.append("ptxas -v gave no register/spill numbers")
        return out


@dataclass(frozen=True)
class Ptxas:
    """The ptxas binary the installed Triton runs for one compute capability, and its CUDA release."""

    path: str
    release: str

    def shown(self) -> str:
        """The path relative to the triton package when it is the bundled binary, else as given."""
        import triton

        package = Path(triton.__file__).resolve().parent
        try:
            return "triton/" + Path(self.path).resolve().relative_to(package).as_posix()
        except ValueError:
            return self.path


@functools.cache
def resolve_ptxas(cc: int) -> Ptxas:
    """The ptxas Triton itself uses for ``sm_<cc>``, found through Triton's own helpers.

    Triton picks the binary per architecture (triton 3.9 compiles sm_90 with its CUDA 13 ``ptxas-blackwell``
    and sm_80 with the CUDA 12 ``ptxas``) and honours ``TRITON_PTXAS_PATH`` /
    ``TRITON_PTXAS_BLACKWELL_PATH``; asking it here keeps the report's ``ptxas -v`` on the same binary,
    which accepts the PTX version Triton emitted.
    """
    try:
        from triton.backends.nvidia.compiler import get_ptxas
    except ImportError:  # no per-architecture choice: the one ptxas knob
        from triton import knobs

        tool = knobs.nvidia.ptxas
    else:
        tool = get_ptxas(cc)
    return Ptxas(str(tool.path), str(tool.version))


def ptx_version(ptx: str) -> str:
    """The ``.version X.Y`` directive of a PTX module (``?`` when absent)."""
    found = re.search(r"^\s*\.version\s+(\d+\.\d+)", ptx, flags=re.MULTILINE)
    return found.group(1) if found else "?"


def _ptxas_stats(ptx: str, cc: int, options: dict) -> tuple[int, int]:
    """(registers, spill bytes = stores + loads) of the kernel's PTX, from Triton's own PTX -> cubin step.

    The step is run again with its ``-v`` log printed (``TRITON_DUMP_PTXAS_LOG``), so the numbers are those
    of the cubin ``triton.compile`` builds: the same ptxas (:func:`resolve_ptxas`) with the same flags (triton
    3.9 adds ``--regAllocOptLevel=2``, which changes register allocation and spills).
    """
    from triton.backends.compiler import GPUTarget
    from triton.backends.nvidia.compiler import CUDABackend

    backend = CUDABackend(GPUTarget("cuda", cc, 32))
    log = io.StringIO()
    previous = os.environ.get("TRITON_DUMP_PTXAS_LOG")
    os.environ["TRITON_DUMP_PTXAS_LOG"] = "1"
    try:
        with contextlib.redirect_stdout(log):
            backend.make_cubin(ptx, {}, backend.parse_options(options), cc)
    finally:
        if previous is None:
            os.environ.pop("TRITON_DUMP_PTXAS_LOG", None)
        else:
            os.environ["TRITON_DUMP_PTXAS_LOG"] = previous
    text = log.getvalue()
    regs = re.search(r"Used (\d+) registers", text)
    stores = re.search(r"(\d+) bytes spill stores", text)
    loads = re.search(r"(\d+) bytes spill loads", text)
    if not (regs and stores and loads):
        return -1, -1
    return int(regs.group(1)), int(stores.group(1)) + int(loads.group(1))


def _load_specs(module: str) -> list | None:
    """The module's ``aot_specs()``, or None when the module or the function does not exist."""
    try:
        mod = importlib.import_module(f"asu_kernels.{module}")
    except ModuleNotFoundError as exc:
        if exc.name in (f"asu_kernels.{module}",):
            return None
        raise
    fn = getattr(mod, "aot_specs", None)
    return None if fn is None else list(fn())


def _attrs_for(module: str, spec) -> dict:
    """Argument attributes: the module's ``aot_attrs(spec)`` when it has one, else 16-aligned pointers."""
    mod = importlib.import_module(f"asu_kernels.{module}")
    hook = getattr(mod, "aot_attrs", None)
    if hook is not None:
        return hook(spec)
    names = spec.fn.arg_names
    return {
        (names.index(n),): [["tt.divisibility", 16]] for n, t in spec.signature.items() if t.startswith("*")
    }


def _compile_one(job: tuple[str, int, int]) -> Row:
    """Compile spec ``index`` of ``module`` for ``cc`` (runs in a worker process)."""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    module, index, cc = job
    spec = _load_specs(module)[index]
    row = Row(module, spec.name, cc, spec.h100_candidate)
    start = time.perf_counter()
    try:
        src = ASTSource(spec.fn, spec.signature, constexprs=spec.constexprs, attrs=_attrs_for(module, spec))
        options = {"num_warps": spec.num_warps, "num_stages": spec.num_stages}
        kernel = triton.compile(src, target=GPUTarget("cuda", cc, 32), options=options)
        row.smem = int(kernel.metadata.shared)
        ptx = kernel.asm["ptx"]
        row.ptx = ptx_version(ptx)
        row.regs, row.spill = _ptxas_stats(ptx, cc, options)
        row.wgmma = ("wgmma" in ptx) if cc >= 90 else None
    except Exception as exc:  # a failed compile is a report row, not a crash of the whole report
        row.error = f"{type(exc).__name__}: {str(exc).strip().splitlines()[-1] if str(exc).strip() else ''}"
    row.seconds = time.perf_counter() - start
    return row


def _quick_subset(specs: list) -> list[int]:
    """One spec per kernel: the first h100 candidate when there is one, else the first spec."""
    chosen: dict[str, int] = {}
    for i, spec in enumerate(specs):
        kernel = spec.name.split("[", 1)[0]
        if kernel not in chosen or (spec.h100_candidate and not specs[chosen[kernel]].h100_candidate):
            chosen[kernel] = i
    return sorted(chosen.values())


def _table(rows: list[Row]) -> str:
    head = "| spec | cc | smem (B) | regs | spill (B) | wgmma | h100 cand. | s | status |"
    lines = [head, "|" + "---|" * 9]
    for r in rows:
        wg = "-" if r.wgmma is None else ("yes" if r.wgmma else "no")
        status = "; ".join(r.problems()) or "ok"
        lines.append(
            f"| {r.spec} | sm_{r.cc} | {r.smem} | {r.regs} | {r.spill} | {wg} | "
            f"{'yes' if r.h100_candidate else ''} | {r.seconds:.1f} | {status} |"
        )
    return "\n".join(lines)


def _header(rows: list[Row], ccs: list[int], argv: list[str]) -> str:
    """Title, command, machine, versions and, per target, the ptxas binary and the PTX version used."""
    import triton
    from triton.backends.nvidia.compiler import sm_arch_from_capability

    from asu.environment import cpu_model, library_versions, utc_timestamp

    command = " ".join(["python -m benchmarks.compile_report", *argv])
    libraries = ", ".join(f"{k} {v}" for k, v in library_versions(("torch", "triton", "numpy")).items())
    lines = [
        "# Ahead-of-time compile report",
        "",
        f"Produced by `{command}` on {cpu_model()} ({os.cpu_count()} cores, no GPU needed), "
        f"{utc_timestamp()}; python {platform.python_version()}, {libraries}.",
        "",
        f"ptxas as the installed triton {triton.__version__} resolves it for each target (its "
        "`TRITON_PTXAS_PATH` / `TRITON_PTXAS_BLACKWELL_PATH` honoured) and runs it in its own PTX -> cubin "
        "step, whose `-v` log gives registers and spills; the PTX version Triton emitted:",
        "",
    ]
    for cc in ccs:
        tool = resolve_ptxas(cc)
        ptx = sorted({r.ptx for r in rows if r.cc == cc and r.ptx})
        lines.append(
            f"* sm_{cc}: `{tool.shown()}` (CUDA {tool.release}), `--gpu-name={sm_arch_from_capability(cc)}`; "
            f"PTX `.version {', '.join(ptx) or '?'}`"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument(
        "--module", default=",".join(DEFAULT_MODULES), help="comma-separated asu_kernels modules"
    )
    parser.add_argument("--cc", default="80,90", help="compute capabilities, e.g. 80,90")
    parser.add_argument("--quick", action="store_true", help="one config per kernel (the compile test)")
    parser.add_argument("--filter", default="", help="only specs whose name contains this substring")
    parser.add_argument("--jobs", type=int, default=min(2, os.cpu_count() or 1), help="worker processes")
    parser.add_argument("--out", type=Path, default=None, help="also write the markdown table here")
    parser.add_argument(
        "--allow-spills",
        action="store_true",
        help="sm_90 spills in h100_candidate configs are shown but do not fail (compile checks only)",
    )
    args = parser.parse_args(argv)
    if "asu_kernels" in sys.modules and os.environ.get("TRITON_INTERPRET", "0") not in ("", "0"):
        # kernels defined while interpreting are interpreter objects that cannot be compiled
        parser.error("run the report in a fresh process without TRITON_INTERPRET")
    os.environ.pop("TRITON_INTERPRET", None)  # the worker processes and the kernel imports below compile
    ccs = [int(c) for c in args.cc.split(",") if c]
    bad_cc = [c for c in ccs if c not in SMEM_LIMIT]
    if bad_cc:
        parser.error(f"unsupported --cc {bad_cc}; choose from {sorted(SMEM_LIMIT)}")

    jobs: list[tuple[str, int, int]] = []
    notes: list[str] = []
    for module in [m.strip() for m in args.module.split(",") if m.strip()]:
        specs = _load_specs(module)
        if specs is None:
            notes.append(f"asu_kernels.{module}: no aot_specs(), skipped")
            continue
        indices = _quick_subset(specs) if args.quick else range(len(specs))
        indices = [i for i in indices if args.filter in specs[i].name]
        jobs += [(module, i, cc) for i in indices for cc in ccs]
    if not jobs:
        print("\n".join(notes + ["nothing to compile"]))
        return 1

    start = time.perf_counter()
    if args.jobs > 1:
        with ProcessPoolExecutor(max_workers=args.jobs) as pool:
            rows = list(pool.map(_compile_one, jobs))
    else:
        rows = [_compile_one(j) for j in jobs]
    elapsed = time.perf_counter() - start

    failures = [(r, p) for r in rows for p in r.problems(args.allow_spills)]
    spilling = [r for r in rows if r.problems() != r.problems(allow_spills=True)]
    import triton

    summary = [
        f"triton {triton.__version__}; {len(rows)} compiles in {elapsed:.0f} s; "
        f"{sum(1 for r in rows if not r.error)} ok, {len(failures)} problem(s)"
        + (f"; {len(spilling)} h100_candidate spill(s) on sm_90 allowed" if args.allow_spills else ""),
        *notes,
    ]
    argv = sys.argv[1:] if argv is None else argv
    text = "\n\n".join([_header(rows, ccs, argv), _table(rows), "\n".join(summary)]) + "\n"
    print(text)
    if args.out is not None:
        from asu.files import atomic_write_text

        atomic_write_text(args.out, text)
    for row, problem in failures:
        print(f"FAIL {row.spec} sm_{row.cc}: {problem}", file=sys.stderr)
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
