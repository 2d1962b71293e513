"""Attention statistics under smoothing (what ``asu inspect`` reports): how much attention smoothing changes
each layer and head, on forget versus retain data.

For every selected layer and head, over the query rows of the prompts (by default the rows that predict
answer tokens, the ones ASU's loss counts), it reports the mean attention entropy at ``tau = 1`` and at each
``tau``, and the mean ``KL(smoothed || original)`` where the smoothed map is ``softmax(q k^T * scale / tau)``
and the original the same at ``tau = 1``. Means are token-weighted over all rows of all prompts of a set.

The post-RoPE q and k come from :mod:`asu.qk` (hooks, nothing patched) and the statistics from
:func:`asu_kernels.attention_kl`, linear in the prompt length (no N x N map), so 8k+-token prompts fit;
prompts run one at a time, so no padding enters the statistics.
"""

from __future__ import annotations

import math
from typing import Any

import torch

from asu.qk import hidden_and_rope, post_rope_qk
from asu.smoothing import attention_modules, parse_layers, scale_attribute
from asu_kernels.attention_kl import attention_kl

__all__ = ["ROW_CHOICES", "inspect_model", "parse_temperatures", "summarize", "tau_key"]

ROW_CHOICES = ("answer", "all")


def parse_temperatures(text: str) -> list[float]:
    """``"2,2.3,3"`` -> ``[2.0, 2.3, 3.0]``; each must be a finite number > 0, no duplicates."""
    if not isinstance(text, str) or not text.strip():
        raise ValueError("no temperature given; pass e.g. '2,2.3,3'")
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


def tau_key(tau: float) -> str:
    return f"{tau:g}"


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
            "entropy": {tau_key(t): (v / n).tolist() for t, v in self.entropy.items()},
            "kl": {tau_key(t): (v / n).tolist() for t, v in self.kl.items()},
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
        model: a Hugging Face causal LM whose attention goes through transformers' attention interface
            (see :func:`asu.smoothing.attention_modules`; families whose attention soft-caps its logits are
            refused by :mod:`asu.qk`).
        examples: set name -> list of ``{"input_ids", "labels"}`` (see :func:`asu.data.encode_rows`).
        temperatures: smoothing temperatures (> 0).
        layers: a layer selection for :func:`asu.smoothing.parse_layers`.
        rows: ``"answer"`` (rows predicting answer tokens) or ``"all"``.

    Returns:
        ``{"layers": [...], "num_heads": H, "temperatures": [...], "rows": rows, "sets": {name: {...}}}``
        where each set holds ``examples``, ``rows`` and (layers x heads) lists ``entropy_tau1``,
        ``entropy[tau]`` and ``kl[tau]``.
    """
    if rows not in ROW_CHOICES:
        raise ValueError(f"rows must be one of {ROW_CHOICES}, got {rows!r}")
    if not temperatures:
        raise ValueError("at least one temperature is needed")
    by_layer = _chosen_attention_modules(model, layers)
    model.eval()
    results = {
        name: _inspect_set(model, by_layer, items, temperatures, rows) for name, items in examples.items()
    }
    return {
        "layers": list(by_layer),
        "num_heads": model.config.num_attention_heads,
        "temperatures": [tau_key(t) for t in temperatures],
        "rows": rows,
        "sets": results,
    }


def _chosen_attention_modules(model: torch.nn.Module, layers: Any) -> dict[int, torch.nn.Module]:
    """Layer index -> attention module of the layers ``layers`` selects, in order; an error names the chosen
    layers the model has no attention module for."""
    by_index = dict(attention_modules(model))
    chosen = parse_layers(layers, max(by_index) + 1)
    missing = [i for i in chosen if i not in by_index]
    if missing:
        raise ValueError(f"layers {missing} have no attention module in this model")
    return {i: by_index[i] for i in chosen}


def _inspect_set(
    model: torch.nn.Module,
    by_layer: dict[int, torch.nn.Module],
    items: list[dict[str, list[int]]],
    temperatures: list[float],
    rows: str,
) -> dict[str, Any]:
    """The statistics of one set of examples: a forward pass each, the chosen layers' q, k read by hooks."""
    acc = _Accumulator(list(by_layer), model.config.num_attention_heads, temperatures)
    device = next(model.parameters()).device
    current: dict[str, torch.Tensor] = {}

    def make_hook(slot: int):
        def hook(module: torch.nn.Module, args: tuple, kwargs: dict) -> None:
            q, k = post_rope_qk(module, *hidden_and_rope(args, kwargs))
            scale = getattr(module, scale_attribute(module) or "scaling", None)
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
        module.register_forward_pre_hook(make_hook(slot), with_kwargs=True)
        for slot, module in enumerate(by_layer.values())
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
    return acc.means()


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
