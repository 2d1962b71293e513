"""The metric formulas of ``asu eval``, one module per source, each a pure function of numbers or strings.

* :mod:`asu.metrics.tofu`: TOFU's metrics as open-unlearning computes them (probability, truth ratio,
  normalised probability, exact memorisation, extraction strength, forget quality, model utility).
* :mod:`asu.metrics.privacy`: membership-inference scores (LOSS, zlib, min-k%, min-k%++), their AUC and
  ``privleak``, as open-unlearning defines them.
* :mod:`asu.metrics.muse`: MUSE's VerbMem / KnowMem prompts, lengths and stop words.
* :mod:`asu.metrics.text`: text-level scores: ROUGE, fluency of a generation, fact leakage.
* :mod:`asu.metrics.scoring`: the model-facing part: the one encoding of evaluation rows, teacher-forced token
  scores and batched greedy generation.

:mod:`asu.evaluate` runs a model through them and writes the results.
"""
