"""AltPO, alternate preference optimisation (Mekala et al. 2024), as open-unlearning runs it.

DPO with a plausible *alternate* answer preferred over the forget answer (open-unlearning's ``DPO`` trainer
with the ``QAwithAlternateDataset`` forget data of ``community/methods/AltPO``):
``gamma * DPO(alternate over answer) + alpha * L_R``. The alternate answers are a field of the forget rows
(``alternate``, a string or a list of strings of which one is drawn per example, seeded); open-unlearning
generates them with the model itself (``community/methods/AltPO/generate.py``), which is not done here.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

import torch

from asu.methods.dpo import BETA, preference_term
from asu.methods.sources import OU_UTILS, ou_config
from asu.methods.spec import Batches, Method, weight_params

__all__ = ["METHOD", "altpo_term"]

_CONFIG = ou_config("DPO")


def altpo_term(ctx: Any, batches: Batches, params: Mapping[str, Any]) -> torch.Tensor:
    """DPO with the ``alternate`` rewrite of the forget batch preferred."""
    return preference_term(ctx, batches, params, "alternate")


METHOD = Method(
    name="altpo", title="AltPO", forget=altpo_term, parts=("alternate",), retain_weight="alpha",
    formula="DPO with the alternate answer preferred over the forget answer", forget_weight="gamma",
    reference=f"{OU_UTILS} (compute_dpo_loss); community/methods/AltPO",
    teacher_reads=(("forget", False), ("alternate", False)), params=(BETA, *weight_params(1.0, 1.0, _CONFIG)),
)  # fmt: skip
