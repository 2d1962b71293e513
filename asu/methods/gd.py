"""GD (GradDiff): gradient ascent on the forget answers plus a retain term, ``-(token-mean NLL) + L_R``.

As ``GA+GD`` / ``GA+KL`` of the authors' trainer and open-unlearning's ``GradDiff`` (gamma 1, alpha 1).
"""

from __future__ import annotations

from asu.methods.ga import ga_term
from asu.methods.sources import AUTHORS_LOSSES, ou_trainer
from asu.methods.spec import Method

__all__ = ["METHOD"]

METHOD = Method(
    name="gd", title="GradDiff (GA + retain)", forget=ga_term, aliases=("graddiff",),
    formula="−NLL of forget answers (token mean)",
    reference=f"{AUTHORS_LOSSES} (ga_loss + gd_loss / kl_loss); {ou_trainer('grad_diff')}",
)  # fmt: skip
