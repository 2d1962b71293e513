"""The paper's recipes as :class:`asu.unlearn.UnlearnConfig` values, one name each.

Every value comes from the authors' code (Salehzz/ASU-unlearning; the file is named per preset in
:data:`PRESETS`). Each preset names its method (``asu``, a name of the method registry :mod:`asu.methods`,
checked when the config is validated); ``--method`` given explicitly runs another method with the recipe's
training settings. Their runs used 2 GPUs for TOFU and 8 for MUSE; the effective batch (per-device batch x
accumulation x GPUs) is kept, here as ``batch_size x grad_accum`` on one device (``asu unlearn`` with
``torchrun`` multiplies by the world size, so lower ``--grad-accum`` there). Their optimiser was AdamW
(``paged_adamw_32bit`` for TOFU, ``adamw_torch`` for MUSE: the same update), in bf16.

``tofu``, ``tofu-continual``
    tau 2.3, lambda 0.1, lr 1e-5, 5 epochs, effective batch 32 (4 x 4 accumulation x 2 GPUs), max length
    500, weight decay 0.01, one epoch of warm-up then linear decay; retain loss ``nll`` (their ``ASU+GD``;
    the scripts also run ``ASU+KL``: ``--retain-loss kl``). Continual unlearning runs the same recipe on
    each forget01 task in turn, each starting from the previous result.
``real-world``
    tau 2.7, lambda 0.05, lr 5e-6, 5 epochs, effective batch 32, max length 300, weight decay 0.01, one
    epoch of warm-up then linear decay, retain loss ``nll`` (``ASU+GD``).
``muse-news``, ``muse-books``
    tau 2.5, lambda 1, lr 1e-5, 10 epochs, effective batch 32 (4 x 8 GPUs), max length 2048, no weight
    decay, constant learning rate without warm-up, retain loss ``kl`` with the token-mean reduction (their
    MUSE trainer adds the ASU term unweighted and averages both terms over all tokens of the batch). Their
    MUSE scripts name no ASU run: the training settings are those of their MUSE scripts, tau is the default
    of their MUSE trainer (the ``--attention_temp`` flag of their ``unlearn.py`` is never passed on), and the
    retain term is the KL regulariser both MUSE scripts use.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from asu.unlearn import UnlearnConfig

__all__ = ["Preset", "PRESETS", "preset_values", "preset_config"]


@dataclass(frozen=True)
class Preset:
    """A named recipe: :class:`UnlearnConfig` field values and the files of the authors' code behind them."""

    name: str
    values: dict[str, Any] = field(default_factory=dict)
    sources: tuple[str, ...] = ()


# The two base recipes side by side, so both set the same fields: UnlearnConfig field -> (TOFU, MUSE).
_RECIPES: dict[str, tuple[Any, Any]] = {
    "method": ("asu", "asu"),
    "temperature": (2.3, 2.5),
    "lam": (0.1, 1.0),
    "retain_loss": ("nll", "kl"),
    "retain_reduction": ("sequence", "token"),
    "lr": (1e-5, 1e-5),
    "epochs": (5, 10),
    "batch_size": (8, 4),
    "grad_accum": (4, 8),
    "max_length": (500, 2048),
    "weight_decay": (0.01, 0.0),
    "warmup_epochs": (1.0, 0.0),
    "lr_schedule": ("linear", "constant"),
}
_TOFU = {name: tofu for name, (tofu, _) in _RECIPES.items()}
_MUSE = {name: muse for name, (_, muse) in _RECIPES.items()}
_TOFU_FILES = (
    "Right-to-be-forgotten/config/tofu.yaml",
    "Right-to-be-forgotten/forget.py",
)
_MUSE_TRAINER = "muse/baselines/baselines/iterative.py"

PRESETS: dict[str, Preset] = {
    "tofu": Preset("tofu", _TOFU, ("Right-to-be-forgotten/scripts/tofu/asu.sh", *_TOFU_FILES)),
    "tofu-continual": Preset(
        "tofu-continual", _TOFU, ("Right-to-be-forgotten/scripts/continual_tofu/asu.sh", *_TOFU_FILES)
    ),
    "real-world": Preset(
        "real-world",
        {**_TOFU, "temperature": 2.7, "lam": 0.05, "lr": 5e-6, "max_length": 300},
        (
            "Right-to-be-forgotten/scripts/real_world/asu.sh",
            "Right-to-be-forgotten/config/real_world.yaml",
            "Right-to-be-forgotten/real_world_unlearn.py",
        ),
    ),
    "muse-news": Preset("muse-news", _MUSE, ("muse/baselines/scripts/unlearn_news.sh", _MUSE_TRAINER)),
    "muse-books": Preset("muse-books", _MUSE, ("muse/baselines/scripts/unlearn_books.sh", _MUSE_TRAINER)),
}


def preset_values(name: str) -> dict[str, Any]:
    """The :class:`UnlearnConfig` values of preset ``name`` (a copy); ValueError naming the choices."""
    if name not in PRESETS:
        raise ValueError(f"unknown preset {name!r}; choose one of {', '.join(PRESETS)}")
    return dict(PRESETS[name].values)


def preset_config(name: str, **overrides: Any) -> UnlearnConfig:
    """An :class:`UnlearnConfig` with preset ``name``'s values, then ``overrides`` (any field) on top."""
    cfg = UnlearnConfig(**{**preset_values(name), "preset": name, **overrides})
    cfg.validate()
    return cfg
