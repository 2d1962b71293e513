"""RMU, representation misdirection (Li et al. 2024, the WMDP paper), as open-unlearning's ``RMU`` trainer
with its WMDP configuration.

RMU acts on the hidden states that decoder layer ``layer`` outputs, not on logits. On forget tokens it pulls
them toward a fixed random direction ``c = steering_coeff * u / ||u||`` (``u`` uniform in ``[0, 1)^d``, drawn
once per run from the run's seed); on retain tokens (the ``embed`` retain term, open-unlearning's
``EMBED_DIFF``) it keeps them at the original model's. Each is
``(1/S) sum_s (1/T_s) sum_t mean_d (h_t - target_t)^2`` over the tokens that carry a label (open-unlearning's
``labels != -100``, the answer tokens and EOS), per example then over examples; total
``gamma * forget + alpha * retain``. Only the weights matching ``trainable`` are trained (:func:`prepare`).

Defaults: ``configs/experiment/unlearn/wmdp/default.yaml`` of open-unlearning (zephyr-7b-beta, 32 layers):
layer 7, steering coefficient 2, gamma 1, alpha 1, the MLP down-projection weights of layers 5, 6 and 7
(``auto`` below: layers ``layer - 2`` to ``layer``); that run also uses lr 5e-5, a constant schedule, batch 16
(1 x 16 accumulation) and 80 steps, which are training settings (``--lr``, ``--lr-schedule``, ...). A model
with fewer layers needs another ``layer``.

Differences from open-unlearning: its trainer computes the gradient of every weight and clips the norm over
all of them while updating only ``trainable``; here the other weights get no gradient, so the clipping norm
covers the trained ones. Its control vector comes from the global random state at the first step; here from
the run's seed (a resumed run draws the same one). Its ``compute_activation_loss`` divides a (B,) tensor of
per-example sums by a (B, 1) tensor of token counts, which broadcasts to (B, B): over a batch of several
examples its loss is the mean of the sums times the mean of the inverse counts, not the per-example mean;
the two agree at its WMDP batch of one example per device step, and here the per-example mean is taken at
every batch size.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any

import torch
from torch import nn

from asu.data import sequence_weights
from asu.methods.sources import OU_WMDP, ou_trainer
from asu.methods.spec import Batches, Method, Param, RetainTerm, weight_params
from asu.teachers import decoder_layer_output, decoder_layers

__all__ = ["METHOD", "EMBED", "activation_distance", "control_vector", "prepare", "trainable_names"]

_WMDP = OU_WMDP


def activation_distance(
    hidden: torch.Tensor, target: torch.Tensor, batch: dict[str, torch.Tensor]
) -> torch.Tensor:
    """``(1/S) sum_s (1/T_s) sum_t mean_d (hidden_t - target_t)^2`` over the tokens of ``batch`` that carry a
    label; ``hidden`` (R, L, d), ``target`` broadcastable to it (detached by the caller)."""
    mask = (batch["labels"] != -100) & (batch["sequence_ids"] >= 0)
    per_token = (hidden.float() - target.float()).pow(2).mean(-1)[mask]
    seq = batch["sequence_ids"][mask]
    weights = sequence_weights(seq, int(batch["example_ids"].numel())).to(per_token.device)
    return (per_token * weights).sum()


def control_vector(ctx: Any, dim: int, coeff: float, like: torch.Tensor) -> torch.Tensor:
    """The run's random direction (d,): ``coeff * u / ||u||``, ``u ~ U[0, 1)^d`` from ``ctx.seed``, drawn
    once."""
    key = ("rmu_control", dim, coeff)
    if key not in ctx.state:
        u = torch.rand(dim, generator=torch.Generator().manual_seed(ctx.seed), dtype=torch.float64)
        ctx.state[key] = (u / u.norm() * coeff).float()
    return ctx.state[key].to(device=like.device, dtype=like.dtype)


def rmu_term(ctx: Any, batches: Batches, params: Mapping[str, Any]) -> torch.Tensor:
    """RMU's forget term: the layer's output on forget tokens against the control vector."""
    hidden = decoder_layer_output(ctx.student, batches.forget, params["layer"])
    target = control_vector(ctx, hidden.shape[-1], params["steering_coeff"], hidden)
    return activation_distance(hidden, target, batches.forget)


def embed_term(ctx: Any, batches: Batches, params: Mapping[str, Any]) -> torch.Tensor:
    """``embed``: the layer's output on retain tokens against the original model's."""
    retain = batches.part("retain", ctx.method)
    hidden = decoder_layer_output(ctx.student, retain, params["layer"])
    return activation_distance(hidden, ctx.teacher.layer_output(retain, params["layer"]), retain)


def trainable_names(model: nn.Module, params: Mapping[str, Any]) -> list[str]:
    """The names of the weights RMU trains: those fully matching a ``trainable`` pattern, or with ``auto`` the
    ``mlp.down_proj.weight`` of decoder layers ``layer - 2`` to ``layer``. ValueError when none matches."""
    layer, patterns = params["layer"], params["trainable"]
    stack = decoder_layers(model)
    if not 0 <= layer < len(stack):
        raise ValueError(f"RMU's layer {layer} is out of range: the model has {len(stack)} decoder layers")
    if patterns == ("auto",):
        wanted = {id(p) for i in range(max(0, layer - 2), layer + 1) for n, p in stack[i].named_parameters()
                  if n == "mlp.down_proj.weight"}  # fmt: skip
        names = [n for n, p in model.named_parameters() if id(p) in wanted]
        what = f"no mlp.down_proj.weight in decoder layers {max(0, layer - 2)}-{layer}"
    else:
        names = [n for n, _ in model.named_parameters() if any(re.fullmatch(p, n) for p in patterns)]
        what = f"no weight name matches {list(patterns)}"
    if not names:
        raise ValueError(f"RMU has nothing to train: {what}; set its parameter 'trainable'")
    return names


def prepare(model: nn.Module, params: Mapping[str, Any]) -> None:
    """Train only :func:`trainable_names`: every other weight of ``model`` stops requiring a gradient."""
    keep = set(trainable_names(model, params))
    for name, p in model.named_parameters():
        p.requires_grad_(name in keep)


EMBED = RetainTerm(
    name="embed",
    loss=embed_term,
    formula="mean_s (1/T_s) Σ_t mean_d (h_θ,l − h_ref,l)² on retain tokens (RMU only)",
    reference=f"{ou_trainer('rmu')} (EMBED_DIFF)",
    reads_layer=True,
)

METHOD = Method(
    name="rmu", title="RMU", forget=rmu_term, reference=ou_trainer("rmu"), reads="layer", prepare=prepare,
    formula="mean_s (1/T_s) Σ_t mean_d (h_θ,l − c)² on forget tokens, c a fixed random direction",
    forget_weight="gamma", retain_weight="alpha", retain_losses=("embed", "nll", "kl"),
    params=(
        Param("layer", 7, f"{_WMDP} (module_regex)", "decoder layer whose output is steered", "count"),
        Param("steering_coeff", 2.0, f"{_WMDP} (steering_coeff)", "length of the control vector"),
        *weight_params(1.0, 1.0, f"{_WMDP} (gamma, alpha)"),
        Param(
            "trainable", ("auto",), f"{_WMDP} (trainable_params_regex)",
            "weights trained: regular expressions over parameter names (auto: layers layer-2..layer's "
            "mlp.down_proj.weight)", "patterns",
        ),
    ),
)  # fmt: skip
