"""``asu inspect``: how much attention smoothing changes each layer and head, on forget versus retain data.

For every selected layer and head, over the query rows of the prompts (by default the rows that predict
answer tokens, the ones ASU's loss counts), it reports the mean attention entropy at ``tau = 1`` and at each
``tau``, and the mean ``KL(smoothed || original)`` where the smoothed map is ``softmax(q k^T * scale / tau)``
and the original the same at ``tau = 1``. Means are token-weighted over all rows of all prompts of a set.

How q and k are captured: a forward *pre*-hook (``with_kwargs=True``) on each selected attention module
receives the layer's input hidden states and its ``position_embeddings`` (cos, sin); it recomputes the
post-RoPE queries and keys with the module's own ``q_proj`` / ``k_proj`` (and ``q_norm`` / ``k_norm`` when
the architecture has them) and the ``apply_rotary_pos_emb`` of the module's modelling file. Nothing in the
model is patched or replaced, the model's own attention runs unchanged (any implementation), and the cost
is one extra q/k projection per selected layer. The statistics come from
:func:`asu_kernels.attention_kl.attention_kl`, linear in the prompt length (no N x N map), so 8k+-token
prompts fit; prompts run one at a time, so no padding enters the statistics.

Outputs in ``--out``: ``inspect.json`` (every number), ``summary.txt`` (which layers smoothing changes
most) and heatmaps (layers x heads) ``kl_<set>_tau<tau>.png``, ``entropy_<set>_tau<tau>.png`` and
``entropy_<set>_tau1.png``.
"""

from __future__ import annotations

import argparse
import contextlib
import json
import math
import os
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import torch

from asu_kernels.attention_kl import attention_kl

ROW_CHOICES = ("answer", "all")


def add_arguments(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--model", required=True, help="Hugging Face model directory or hub id")
    parser.add_argument(
        "--data", required=True, help="forget set: TOFU-style JSON/JSONL (question/answer or text)"
    )
    parser.add_argument("--retain", default=None, help="optional retain set to compare against")
    parser.add_argument(
        "--temperature", default="2,2.3,3", help="comma-separated temperatures > 0 (default 2,2.3,3)"
    )
    parser.add_argument("--layers", default="all", help="'all', '6-8' or '0,2,5-7' (default all)")
    parser.add_argument("--max-length", type=int, default=512, help="tokens per prompt (default 512)")
    parser.add_argument("--max-examples", type=int, default=None, help="use at most this many rows per set")
    parser.add_argument(
        "--rows",
        choices=ROW_CHOICES,
        default="answer",
        help="query rows averaged: those predicting answer tokens (default) or every row",
    )
    parser.add_argument("--out", required=True, help="output directory")
    parser.add_argument("--device", default=None, help="default: cuda when available, else cpu")
    parser.add_argument(
        "--dtype", choices=("auto", "float32", "bfloat16", "float16"), default="auto", help="model dtype"
    )


def parse_temperatures(text: str) -> list[float]:
    """``"2,2.3,3"`` -> ``[2.0, 2.3, 3.0]``; each must be a finite number > 0, no duplicates."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("--temperature is empty; pass e.g. 2,2.3,3")
    out: list[float] = []
    for item in text.split(","):
        try:
            value = float(item)
        except ValueError:
            raise ValueError(f"cannot parse temperature {item.strip()!r} in {text!r}") from None
        if not math.isfinite(value) or value <= 0:
            raise ValueError(f"temperatures must be finite and > 0, got {item.strip()!r}")
        if value in out:
            raise ValueError(f"temperature {value:g} is listed twice in {text!r}")
        out.append(value)
    return out


def _tau_key(tau: float) -> str:
    return f"{tau:g}"


# ----------------------------------------------------------------------------------------------------------
# Capturing q and k.


def _rotary_fn(module: torch.nn.Module) -> Any:
    """The ``apply_rotary_pos_emb`` of the module's own modelling file (each architecture ships its own)."""
    fn = getattr(sys.modules.get(type(module).__module__), "apply_rotary_pos_emb", None)
    if fn is None:
        raise ValueError(
            f"{type(module).__name__} ({type(module).__module__}) has no apply_rotary_pos_emb in its "
            "modelling file; asu inspect supports rotary attention modules of the Llama family "
            "(q_proj/k_proj + RoPE)"
        )
    return fn


def post_rope_qk(module: torch.nn.Module, hidden: torch.Tensor, position_embeddings: Any) -> tuple:
    """Post-RoPE ``q`` (B, Hq, N, D) and ``k`` (B, Hkv, N, D) of an attention module, from its input.

    Mirrors the Llama-family attention forward: ``proj(h).view(B, N, -1, D)``, the optional per-head
    ``q_norm`` / ``k_norm`` (Qwen3, Gemma3), transpose, then ``apply_rotary_pos_emb(q, k, cos, sin)``.
    """
    head_dim = getattr(module, "head_dim", None)
    if not isinstance(head_dim, int):
        raise ValueError(f"{type(module).__name__} has no integer head_dim attribute")
    shape = (*hidden.shape[:-1], -1, head_dim)
    q = module.q_proj(hidden).view(shape)
    k = module.k_proj(hidden).view(shape)
    if isinstance(getattr(module, "q_norm", None), torch.nn.Module):
        q = module.q_norm(q)
    if isinstance(getattr(module, "k_norm", None), torch.nn.Module):
        k = module.k_norm(k)
    q, k = q.transpose(1, 2), k.transpose(1, 2)
    if position_embeddings is None:
        raise ValueError(
            f"{type(module).__name__} was called without position_embeddings; asu inspect needs the "
            "(cos, sin) pair that Llama-family decoder layers pass to their attention"
        )
    cos, sin = position_embeddings
    return _rotary_fn(module)(q, k, cos, sin)


def _hidden_and_rope(args: tuple, kwargs: dict) -> tuple[torch.Tensor, Any]:
    hidden = kwargs.get("hidden_states", args[0] if args else None)
    if not isinstance(hidden, torch.Tensor):
        raise ValueError("the attention module was called without hidden_states")
    return hidden, kwargs.get("position_embeddings")


@contextlib.contextmanager
def capture_qk(model: torch.nn.Module, layers: Any = "all") -> Iterator[dict[int, tuple]]:
    """Context manager: each forward of ``model`` inside the block stores the selected layers' post-RoPE
    ``(q, k)`` — (B, Hq, N, D) and (B, Hkv, N, D) — in the yielded dict, keyed by layer index.

    The tensors carry the autograd graph when grad is enabled, so a layer-local objective (e.g.
    ``attention_kl`` of a student's q, k against a frozen teacher's) can backpropagate into ``q_proj`` /
    ``k_proj`` and everything below. A later forward overwrites the entries. Hooks are removed on exit.
    """
    from asu.smoothing import attention_modules, parse_layers

    by_index = dict(attention_modules(model))
    chosen = parse_layers(layers, max(by_index) + 1)
    missing = [i for i in chosen if i not in by_index]
    if missing:
        raise ValueError(f"layers {missing} have no attention module in this model")
    captured: dict[int, tuple] = {}

    def make_hook(layer: int):
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            captured[layer] = post_rope_qk(module, *_hidden_and_rope(args, kwargs))

        return hook

    handles = [by_index[i].register_forward_pre_hook(make_hook(i), with_kwargs=True) for i in chosen]
    try:
        yield captured
    finally:
        for h in handles:
            h.remove()


class _Accumulator:
    """Token-weighted sums per (layer, head) of the entropy at tau = 1 and, per tau, entropy and KL."""

    def __init__(self, layers: list[int], num_heads: int, temperatures: list[float]) -> None:
        shape = (len(layers), num_heads)
        self.layers = layers
        self.rows = 0
        self.examples = 0
        self.entropy_1 = torch.zeros(shape, dtype=torch.float64)
        self.entropy = {t: torch.zeros(shape, dtype=torch.float64) for t in temperatures}
        self.kl = {t: torch.zeros(shape, dtype=torch.float64) for t in temperatures}

    def means(self) -> dict[str, Any]:
        n = max(self.rows, 1)
        return {
            "examples": self.examples,
            "rows": self.rows,
            "entropy_tau1": (self.entropy_1 / n).tolist(),
            "entropy": {_tau_key(t): (v / n).tolist() for t, v in self.entropy.items()},
            "kl": {_tau_key(t): (v / n).tolist() for t, v in self.kl.items()},
        }


def _layer_stats(
    q: torch.Tensor,
    k: torch.Tensor,
    *,
    rows: torch.Tensor,
    temperatures: list[float],
    scale: float | None,
    window: int | None,
) -> tuple[torch.Tensor, dict[float, torch.Tensor], dict[float, torch.Tensor]]:
    """Per-head sums over the selected rows: entropy at tau=1, and per tau the entropy and KL(smoothed||orig).

    ``q``: (1, Hq, N, D), ``k``: (1, Hkv, N, D), ``rows``: (N,) bool. Each call to :func:`attention_kl` uses
    the layer's own q, k as both maps (teacher at ``tau``, student at 1), linear in N.
    """
    ent_1 = None
    ent: dict[float, torch.Tensor] = {}
    kl: dict[float, torch.Tensor] = {}
    for tau in temperatures:
        kl_t, h_orig, h_smooth = attention_kl(
            q, k, temperature_t=tau, temperature_s=1.0, causal=True, window=window, scale=scale,
            return_entropy=True,
        )  # fmt: skip
        pick = lambda t: t[0][:, rows].double().sum(-1).cpu()  # noqa: E731  (Hq,) sums over chosen rows
        kl[tau], ent[tau] = pick(kl_t), pick(h_smooth)
        if ent_1 is None:
            ent_1 = pick(h_orig)
    assert ent_1 is not None
    return ent_1, ent, kl


def _row_mask(labels: list[int], mode: str) -> torch.Tensor:
    """Query rows to average: row ``i`` predicts token ``i + 1``; ``answer`` keeps rows whose target is
    a label (an answer token or the final EOS)."""
    n = len(labels)
    if mode == "all":
        return torch.ones(n, dtype=torch.bool)
    mask = torch.zeros(n, dtype=torch.bool)
    mask[:-1] = torch.tensor([lab != -100 for lab in labels[1:]], dtype=torch.bool)
    return mask


@torch.no_grad()
def inspect_model(
    model: torch.nn.Module,
    examples: dict[str, list[dict[str, list[int]]]],
    *,
    temperatures: list[float],
    layers: Any = "all",
    rows: str = "answer",
) -> dict[str, Any]:
    """Run ``model`` over each set of encoded examples and return the per-layer/head statistics.

    Args:
        model: a Hugging Face causal LM of the Llama family (attention modules with q_proj/k_proj + RoPE).
        examples: set name -> list of ``{"input_ids", "labels"}`` (see :func:`asu.data.encode_rows`).
        temperatures: smoothing temperatures (> 0).
        layers: a layer selection for :func:`asu.smoothing.parse_layers`.
        rows: ``"answer"`` (rows predicting answer tokens) or ``"all"``.

    Returns:
        ``{"layers": [...], "num_heads": H, "temperatures": [...], "rows": rows, "sets": {name: {...}}}``
        where each set holds ``examples``, ``rows`` and (layers x heads) lists ``entropy_tau1``,
        ``entropy[tau]`` and ``kl[tau]``.
    """
    from asu.smoothing import attention_modules, parse_layers

    if rows not in ROW_CHOICES:
        raise ValueError(f"rows must be one of {ROW_CHOICES}, got {rows!r}")
    if not temperatures:
        raise ValueError("at least one temperature is needed")
    modules = attention_modules(model)
    by_index = dict(modules)
    chosen = parse_layers(layers, max(by_index) + 1)
    missing = [i for i in chosen if i not in by_index]
    if missing:
        raise ValueError(f"layers {missing} have no attention module in this model")
    num_heads = model.config.num_attention_heads
    device = next(model.parameters()).device
    results: dict[str, Any] = {}
    model.eval()
    for set_name, items in examples.items():
        acc = _Accumulator(chosen, num_heads, temperatures)
        current: dict[str, torch.Tensor] = {}

        def make_hook(slot: int, acc: _Accumulator = acc, current: dict = current):
            def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
                q, k = post_rope_qk(module, *_hidden_and_rope(args, kwargs))
                scale = getattr(module, "scaling", None)
                window = getattr(module, "sliding_window", None)
                ent_1, ent, kl = _layer_stats(
                    q, k, rows=current["rows"], temperatures=temperatures, scale=scale, window=window
                )
                acc.entropy_1[slot] += ent_1
                for tau in temperatures:
                    acc.entropy[tau][slot] += ent[tau]
                    acc.kl[tau][slot] += kl[tau]

            return hook

        handles = [
            by_index[layer].register_forward_pre_hook(make_hook(slot), with_kwargs=True)
            for slot, layer in enumerate(chosen)
        ]
        try:
            for ex in items:
                mask = _row_mask(ex["labels"], rows)
                if not mask.any():
                    continue
                current["rows"] = mask.to(device)
                ids = torch.tensor([ex["input_ids"]], dtype=torch.long, device=device)
                model(input_ids=ids, use_cache=False)
                acc.rows += int(mask.sum())
                acc.examples += 1
        finally:
            for h in handles:
                h.remove()
        results[set_name] = acc.means()
    return {
        "layers": chosen,
        "num_heads": num_heads,
        "temperatures": [_tau_key(t) for t in temperatures],
        "rows": rows,
        "sets": results,
    }


# ----------------------------------------------------------------------------------------------------------
# Reporting.


def summarize(report: dict[str, Any], top: int = 3) -> str:
    """A short text: per tau, the layers whose attention smoothing changes most (mean KL over heads)."""
    layers = report["layers"]
    sets = report["sets"]
    lines = [f"asu inspect: {len(layers)} layers x {report['num_heads']} heads, rows = {report['rows']}"]
    for name, s in sets.items():
        lines.append(f"  {name}: {s['examples']} examples, {s['rows']} rows")
    for tau in report["temperatures"]:
        lines.append(f"tau = {tau}:")
        for name, s in sets.items():
            kl = torch.tensor(s["kl"][tau]).mean(-1)
            d_ent = (torch.tensor(s["entropy"][tau]) - torch.tensor(s["entropy_tau1"])).mean(-1)
            order = torch.argsort(kl, descending=True)[:top].tolist()
            ranked = ", ".join(
                f"layer {layers[i]} (KL {kl[i]:.4g}, entropy {d_ent[i]:+.3g} nats)" for i in order
            )
            lines.append(f"  {name}: mean KL(smoothed || original) {kl.mean():.4g}; most changed: {ranked}")
        if "forget" in sets and "retain" in sets:
            f = torch.tensor(sets["forget"]["kl"][tau]).mean(-1)
            r = torch.tensor(sets["retain"]["kl"][tau]).mean(-1)
            gap = f - r
            i = int(torch.argmax(gap))
            lines.append(
                f"  forget - retain KL: largest at layer {layers[i]} ({gap[i]:+.4g}); "
                f"mean over layers {gap.mean():+.4g}"
            )
    return "\n".join(lines) + "\n"


def _atomic_write(path: Path, write) -> None:
    """Write through a temporary file in the same directory, then rename into place."""
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    os.close(fd)
    try:
        write(tmp)
        os.replace(tmp, path)
    except BaseException:
        if os.path.exists(tmp):
            os.unlink(tmp)
        raise


def _heatmap(path: Path, values: list[list[float]], layers: list[int], title: str, label: str) -> None:
    from matplotlib.figure import Figure  # no pyplot: no global backend state, renders with Agg

    data = torch.tensor(values, dtype=torch.float64).numpy()
    n_layers, n_heads = data.shape
    fig = Figure(figsize=(max(4.0, 0.35 * n_heads + 2.5), max(3.0, 0.3 * n_layers + 1.8)))
    ax = fig.add_subplot()
    im = ax.imshow(data, aspect="auto", cmap="viridis", interpolation="nearest")
    ax.set_xlabel("head")
    ax.set_ylabel("layer")
    ax.set_yticks(range(n_layers), [str(i) for i in layers])
    if n_heads <= 32:
        ax.set_xticks(range(n_heads))
    ax.set_title(title)
    fig.colorbar(im, ax=ax, label=label)
    fig.tight_layout()
    _atomic_write(path, lambda tmp: fig.savefig(tmp, format="png", dpi=100))


def write_outputs(report: dict[str, Any], out_dir: str | os.PathLike) -> list[Path]:
    """``inspect.json``, ``summary.txt`` and the heatmaps into ``out_dir``; returns the paths written."""
    out = Path(out_dir)
    out.mkdir(parents=True, exist_ok=True)
    written = []
    path = out / "inspect.json"
    text = json.dumps(report, indent=1)
    _atomic_write(path, lambda tmp: Path(tmp).write_text(text))
    written.append(path)
    path = out / "summary.txt"
    summary = summarize(report)
    _atomic_write(path, lambda tmp: Path(tmp).write_text(summary))
    written.append(path)
    layers = report["layers"]
    for name, s in report["sets"].items():
        path = out / f"entropy_{name}_tau1.png"
        _heatmap(path, s["entropy_tau1"], layers, f"{name}: attention entropy at tau=1", "nats")
        written.append(path)
        for tau in report["temperatures"]:
            path = out / f"entropy_{name}_tau{tau}.png"
            _heatmap(path, s["entropy"][tau], layers, f"{name}: attention entropy at tau={tau}", "nats")
            written.append(path)
            path = out / f"kl_{name}_tau{tau}.png"
            _heatmap(path, s["kl"][tau], layers, f"{name}: KL(smoothed tau={tau} || original)", "nats")
            written.append(path)
    return written


def _load_set(
    tokenizer: Any, path: str, max_length: int, max_examples: int | None
) -> list[dict[str, list[int]]]:
    from asu.data import encode_rows, load_rows

    rows = load_rows(path)
    if max_examples is not None:
        rows = rows[:max_examples]
    return encode_rows(tokenizer, rows, max_length, source=path)


def run(args: argparse.Namespace) -> int:
    from transformers import AutoModelForCausalLM, AutoTokenizer

    temperatures = parse_temperatures(args.temperature)
    if args.max_length < 2:
        raise ValueError(f"--max-length must be >= 2, got {args.max_length}")
    if args.max_examples is not None and args.max_examples < 1:
        raise ValueError(f"--max-examples must be >= 1, got {args.max_examples}")
    try:
        import matplotlib  # noqa: F401
    except ModuleNotFoundError:
        raise SystemExit("asu inspect writes heatmaps with matplotlib: pip install matplotlib") from None
    device = torch.device(args.device or ("cuda" if torch.cuda.is_available() else "cpu"))
    dtype = {
        "auto": torch.bfloat16 if device.type == "cuda" else torch.float32,
        "float32": torch.float32,
        "bfloat16": torch.bfloat16,
        "float16": torch.float16,
    }[args.dtype]
    start = time.perf_counter()
    tokenizer = AutoTokenizer.from_pretrained(args.model)
    model = AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype).to(device)
    examples = {"forget": _load_set(tokenizer, args.data, args.max_length, args.max_examples)}
    if args.retain:
        examples["retain"] = _load_set(tokenizer, args.retain, args.max_length, args.max_examples)
    report = inspect_model(model, examples, temperatures=temperatures, layers=args.layers, rows=args.rows)
    report["model"] = str(args.model)
    report["data"] = {"forget": str(args.data), "retain": None if args.retain is None else str(args.retain)}
    report["max_length"] = args.max_length
    report["seconds"] = round(time.perf_counter() - start, 3)
    paths = write_outputs(report, args.out)
    print(summarize(report), end="")
    print(f"wrote {len(paths)} files to {args.out}")
    return 0
