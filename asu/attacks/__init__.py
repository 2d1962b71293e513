"""Attacks on unlearning: does the forgotten knowledge come back?

The field scores forgetting by what survives attacks (open-unlearning's meta-evaluation, arXiv 2506.12618):

* :mod:`asu.attacks.quant`: the weights quantized as bitsandbytes quantizes them (NF4 / FP4 block-wise absmax,
  LLM.int8() row-wise), in plain torch; score ``Q``;
* :mod:`asu.attacks.relearn`: a copy fine-tuned on the forget set (and on half of it, scored on the other
  half), with curves over the steps; score ``R`` against the retain-only model's own relearning;
* :mod:`asu.attacks.probes`: paraphrased questions, and the answer prefilled with an affirmative opener;
* :mod:`asu.attacks.scores`: ``R``, ``Q`` and robustness (their harmonic mean), with their guards;
* :mod:`asu.attacks.registry`: the ``--attack`` specs, running them, adding them to an evaluation.

Attacks never modify the model they are given: they work on copies.
"""

from asu.attacks.context import TRACKED, AttackContext, AttackOutcome
from asu.attacks.quant import FORMATS, fake_quantize, quantizable_modules, quantized_copy
from asu.attacks.registry import ATTACKS, AttackSpec, attach, parse_attacks, run_attacks
from asu.attacks.relearn import RelearnProtocol, relearn_curve, split_indices
from asu.attacks.scores import PRIMARY_METRIC, quant_score, relearn_score, robustness_score

__all__ = [
    "ATTACKS",
    "FORMATS",
    "PRIMARY_METRIC",
    "TRACKED",
    "AttackContext",
    "AttackOutcome",
    "AttackSpec",
    "RelearnProtocol",
    "attach",
    "fake_quantize",
    "parse_attacks",
    "quant_score",
    "quantizable_modules",
    "quantized_copy",
    "relearn_curve",
    "relearn_score",
    "robustness_score",
    "run_attacks",
    "split_indices",
]
