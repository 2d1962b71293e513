"""The models that judge generated answers for closer-look's metrics: an NLI classifier (entailment) and a
sentence embedder (cosine similarity), each loaded with the library made for it.

* NLI: a sequence-classification model and its tokenizer (``transformers``' auto classes) in a
  ``text-classification`` pipeline, as closer-look calls ``pipeline("text-classification", model=NAME)``;
  default ``sileod/deberta-v3-base-tasksource-nli``. Its labels must include ``entailment`` (what
  closer-look counts).
* Embeddings: ``sentence_transformers.SentenceTransformer`` (the optional ``closer-look`` extra); default
  ``paraphrase-MiniLM-L6-v2``.

A name is a local directory (a path that is absolute or starts with ``.`` or ``~`` must exist) or a Hugging
Face hub name. A hub name is looked up in the local cache first;
only when it is not there is the hub asked, and a failure is one ValueError naming the model, saying that it
is neither local nor cached and the hub cannot be reached, and which flag takes a local directory instead.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

from asu.sources import _quiet_hub

DEFAULT_NLI_MODEL = "sileod/deberta-v3-base-tasksource-nli"
DEFAULT_EMBEDDING_MODEL = "paraphrase-MiniLM-L6-v2"
_INSTALL = "pip install sentence-transformers (or pip install 'asu[closer-look]')"


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _load(what: str, name: str, flag: str, load: Callable[[bool], Any]) -> Any:
    """``load(local_files_only)`` for a local directory, else from the cache, else from the hub; one
    ValueError naming the model when none works."""
    if not os.path.isdir(name) and (os.path.isabs(name) or name.startswith((".", "~"))):
        raise ValueError(f"{what} {name}: no such directory")
    if os.path.isdir(name):
        try:
            return load(True)
        except Exception as e:  # noqa: BLE001 - any loader failure becomes one line naming the model
            raise ValueError(
                f"{what} {name}: cannot be loaded from the directory ({_first_line(e)})"
            ) from None
    try:
        with _quiet_hub():
            return load(True)
    except Exception:  # noqa: BLE001 - not in the cache: ask the hub below
        pass
    try:
        with _quiet_hub():
            return load(False)
    except Exception as e:  # noqa: BLE001
        raise ValueError(
            f"{what} {name!r} is not a local directory, not in the Hugging Face cache, and cannot be "
            f"downloaded: the hub is unreachable ({_first_line(e)}); offline, fetch it where the hub is "
            f"reachable and give {flag} DIR"
        ) from None


@dataclass
class Judges:
    """The loaded judges: ``nli(pairs)`` labels ``{"text", "text_pair"}`` dicts, ``embed(texts)`` returns one
    embedding per text; with the names they were loaded from."""

    nli_model: str
    embedding_model: str
    nli: Callable[[list[dict[str, str]]], list[dict[str, Any]]]
    embedder: Any

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        """(n, d) embeddings, each text encoded on its own (batch of one), as closer-look encodes them."""
        if not texts:
            return np.zeros((0, 0))
        return np.asarray(self.embedder.encode(list(texts), batch_size=1, show_progress_bar=False))

    def labels(self, pairs: Sequence[tuple[str, str]], chunk: int = 30) -> list[str]:
        """The NLI model's top label for each ``(text, text_pair)``, asked ``chunk`` pairs at a time."""
        out: list[str] = []
        for s in range(0, len(pairs), chunk):
            batch = [{"text": a, "text_pair": b} for a, b in pairs[s : s + chunk]]
            out += [str(r["label"]) for r in self.nli(batch)]
        return out


def load_nli(name: str = DEFAULT_NLI_MODEL, device: str = "cpu") -> Callable[..., Any]:
    """A ``text-classification`` pipeline over NLI model ``name``; ValueError when it cannot be loaded or has
    no ``entailment`` label."""
    import transformers

    def load(local: bool) -> Any:
        model = transformers.AutoModelForSequenceClassification.from_pretrained(name, local_files_only=local)
        tokenizer = transformers.AutoTokenizer.from_pretrained(name, local_files_only=local)
        return model, tokenizer

    model, tokenizer = _load("NLI model", name, "--nli-model", load)
    labels = sorted(str(v) for v in (model.config.id2label or {}).values())
    if "entailment" not in labels:
        raise ValueError(
            f"NLI model {name}: its labels are {labels}; closer-look counts the label 'entailment', so every "
            "entailment score would be 0"
        )
    return transformers.pipeline("text-classification", model=model, tokenizer=tokenizer, device=device)


def load_embedder(name: str = DEFAULT_EMBEDDING_MODEL, device: str = "cpu") -> Any:
    """``SentenceTransformer(name)`` on ``device``; ValueError when the package or the model is missing."""
    try:
        from sentence_transformers import SentenceTransformer
    except ImportError:
        raise ValueError(f"the embedding model needs the sentence-transformers package: {_INSTALL}") from None
    return _load(
        "embedding model",
        name,
        "--embedding-model",
        lambda local: SentenceTransformer(name, device=device, local_files_only=local),
    )


def load_judges(
    nli_model: str = DEFAULT_NLI_MODEL, embedding_model: str = DEFAULT_EMBEDDING_MODEL, device: str = "cpu"
) -> Judges:
    """Both judges (the embedder first: its package is the optional one)."""
    embedder = load_embedder(embedding_model, device)
    return Judges(nli_model, embedding_model, load_nli(nli_model, device), embedder)
