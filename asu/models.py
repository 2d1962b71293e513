"""Loading a model folder for the commands: every way a folder can be unusable becomes one error naming the
folder or the file, and a model whose weights are not finite is refused.

What is checked, in order, before and after ``from_pretrained``:

* the folder exists and holds a valid ``config.json``; a missing one is named as a missing folder, with the
  closest folder beside it ("did you mean"). A hub name, ``org/model``, is one only when no local path of
  that name or its first part exists (``runs/x`` with a ``runs`` folder is a mistyped local folder); it skips
  the folder checks, and is refused at once, naming it, when the hub is unreachable
  (:func:`asu.sources.hub_unreachable`) and the local cache does not hold it;
* every ``*.safetensors`` file has a readable header that covers the whole file (a truncated, empty or
  garbled file is named, instead of surfacing as safetensors' ``SafetensorError`` mid-load);
* the tokenizer and the model load (their ``OSError`` / ``ValueError`` become one line);
* every floating-point parameter and buffer is finite (:func:`check_finite_weights`): a model with NaN or
  infinite weights would evaluate to NaN metrics, train to NaN and be written back as if nothing happened.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import Any

import torch
from torch import nn

from asu.files import did_you_mean

__all__ = ["ModelError", "check_model_folder", "check_finite_weights", "load_model", "load_tokenizer"]

_HUB_NAME = re.compile(r"^[A-Za-z0-9][\w.-]*/[\w.-]+$")


class ModelError(ValueError):
    """A model folder, file or weight that cannot be used; the message names it."""


def _first_line(error: BaseException) -> str:
    text = str(error).strip()
    return text.splitlines()[0] if text else type(error).__name__


def _is_hub_name(path: str) -> bool:
    """``org/name`` with neither it nor ``org`` on disk (else it is a local path, perhaps mistyped)."""
    if os.path.exists(path) or not _HUB_NAME.match(path):
        return False
    return not os.path.exists(path.split("/", 1)[0])


def _check_hub_model(name: str) -> None:
    """ModelError naming ``name`` when the hub is unreachable and the local cache does not hold its
    ``config.json`` (a reachable hub, or a cached model, is left to ``from_pretrained``)."""
    from asu.sources import hub_unreachable

    unreachable = hub_unreachable()
    if unreachable is None:
        return
    from huggingface_hub import try_to_load_from_cache

    if isinstance(try_to_load_from_cache(name, "config.json"), str):
        return
    raise ModelError(
        f"model {name}: no such local folder{did_you_mean(name, Path.is_dir)}, and the Hugging Face hub is "
        f"unreachable ({unreachable}) with the model not in the local cache"
    )


def check_model_folder(path: str | os.PathLike[str]) -> None:
    """ModelError unless ``path`` is a folder with ``config.json`` whose safetensors files all open.

    Opening a safetensors file reads only its header; safetensors checks that the header's tensors cover
    the file exactly, so a truncated or padded file fails here. A hub name is checked only for an
    unreachable hub (see the module docstring).
    """
    source = os.fspath(path)
    if _is_hub_name(source):
        _check_hub_model(source)
        return
    folder = Path(source)
    if not folder.exists():
        raise ModelError(f"model folder {source} does not exist{did_you_mean(source, Path.is_dir)}")
    if not folder.is_dir():
        raise ModelError(f"model folder {source} is not a directory")
    if not (folder / "config.json").is_file():
        raise ModelError(f"{source}: no config.json (not a Hugging Face model folder)")
    try:
        config = json.loads((folder / "config.json").read_bytes().decode("utf-8"))
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise ModelError(f"{folder / 'config.json'}: not valid JSON ({_first_line(e)})") from None
    if not isinstance(config, dict):
        raise ModelError(f"{folder / 'config.json'}: expected a JSON object")
    from safetensors import safe_open

    for file in sorted(folder.glob("*.safetensors")):
        try:
            with safe_open(str(file), framework="pt"):
                pass
        except Exception as e:  # safetensors raises its own SafetensorError (not an OSError)
            raise ModelError(f"{file}: not a readable safetensors file ({_first_line(e)})") from None


def check_finite_weights(model: nn.Module, source: str | os.PathLike[str] = "the model") -> None:
    """ModelError naming the first floating-point parameter or buffer holding NaN or +-inf values."""
    tensors = [*model.named_parameters(), *model.named_buffers()]
    for name, tensor in tensors:
        if tensor is None or not tensor.is_floating_point() or tensor.device.type == "meta":
            continue
        finite = torch.isfinite(tensor.detach())
        if not bool(finite.all()):
            bad = int((~finite).sum())
            raise ModelError(
                f"{os.fspath(source)}: weight {name} holds {bad} non-finite value(s) (NaN or inf) out of "
                f"{tensor.numel()}; refusing a broken model"
            )


def load_tokenizer(path: str | os.PathLike[str]) -> Any:
    """``AutoTokenizer.from_pretrained(path)`` after :func:`check_model_folder`, its failures as one
    ModelError."""
    from transformers import AutoTokenizer

    check_model_folder(path)
    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError, TypeError, KeyError) as e:
        raise ModelError(f"cannot load a tokenizer from {os.fspath(path)}: {_first_line(e)}") from None


def load_model(
    path: str | os.PathLike[str],
    *,
    dtype: torch.dtype | str | None = None,
    attn_implementation: str | None = None,
    device: str | torch.device | None = None,
) -> nn.Module:
    """``AutoModelForCausalLM.from_pretrained(path, ...)`` after :func:`check_model_folder`, moved to
    ``device`` when given, with :func:`check_finite_weights`; every failure is one ModelError."""
    from transformers import AutoModelForCausalLM

    check_model_folder(path)
    kwargs: dict[str, Any] = {}
    if dtype is not None:
        kwargs["dtype"] = dtype
    if attn_implementation is not None:
        kwargs["attn_implementation"] = attn_implementation
    try:
        model = AutoModelForCausalLM.from_pretrained(path, **kwargs)
    except ModelError:
        raise
    except (OSError, ValueError, TypeError, KeyError, RuntimeError) as e:
        raise ModelError(f"cannot load a model from {os.fspath(path)}: {_first_line(e)}") from None
    except Exception as e:  # SafetensorError of a file that changed after the check, and the like
        if type(e).__name__ != "SafetensorError":
            raise
        raise ModelError(f"{os.fspath(path)}: unreadable weights ({_first_line(e)})") from None
    if device is not None:
        model = model.to(device)
    check_finite_weights(model, path)
    return model
