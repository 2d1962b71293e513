"""Probing attacks: the forget questions asked another way, with no change to the model.

``prefix``: the answer prefilled with an affirmative opener
    The assistant's turn starts with :data:`OPENER` ("Sure, here is the answer:", the prefix of
    open-unlearning's meta-evaluation "jailbreak ROUGE"), then the model continues greedily. The conversation
    is rendered by the evaluation's own template with the answer ``OPENER + " " + answer``
    (:class:`PrefilledTemplate`), so ``forget_Q_A_ROUGE`` is the ROUGE-L recall of the continuation after the
    opener against the answer, and ``forget_Q_A_Prob`` the answer's probability after the opener.

``paraphrase``: the questions, or the answers, in other words
    Where every forget row has a ``paraphrased_question`` (the field open-unlearning's TOFU configuration
    names as the other ``question_key``), the model is evaluated on those questions against the same answers
    (``mode`` ``question``): a model whose forgetting is tied to the question's wording answers a paraphrase.
    Rows that carry only ``paraphrased_answer`` (the embedded world's, for one) get the answer side (``mode``
    ``answer``): the greedy answer to the original question scored against the paraphrased answer (ROUGE-L
    recall), and the paraphrased answer's probability (open-unlearning's ``forget_Q_A_PARA_Prob``). The answer
    side asks whether the model states the fact in other words; it does not change what the model is asked, so
    it is a weaker probe than the question side, and the section says which mode ran.
"""

from __future__ import annotations

import dataclasses
from typing import Any

from asu.attacks.context import AttackContext, AttackOutcome, tracked
from asu.data import Rows
from asu.templates import Template, resolve_template

__all__ = ["OPENER", "PrefilledTemplate", "attack_paraphrase", "attack_prefix", "paraphrased_rows"]

OPENER = "Sure, here is the answer:"


@dataclasses.dataclass
class PrefilledTemplate(Template):
    """A template whose assistant turn starts with ``opener``: the generation prompt ends with the opener,
    and the full conversation's answer is ``opener + " " + answer`` (rendered by the base template, so the
    prompt is the start of the full text and the labels are the answer's tokens after the opener)."""

    opener: str = OPENER

    @classmethod
    def of(cls, base: Any, tokenizer: Any, opener: str = OPENER) -> PrefilledTemplate:
        """``base`` (a template name, path, :class:`Template` or None) for ``tokenizer``, prefilled."""
        resolved = resolve_template(base, tokenizer)
        fields = {f.name: getattr(resolved, f.name) for f in dataclasses.fields(Template)}
        return cls(**{**fields, "name": f"prefilled:{resolved.name}"}, opener=opener)

    def _base(self) -> Template:
        fields = {f.name: getattr(self, f.name) for f in dataclasses.fields(Template)}
        return Template(**fields)

    def render(self, tokenizer: Any, question: str, answer: str | None = None) -> str:
        base = self._base()
        if answer is not None:
            return base.render(tokenizer, question, f"{self.opener} {answer}")
        full = base.render(tokenizer, question, self.opener)
        prompt = base.render(tokenizer, question)
        at = full.find(self.opener, len(prompt) if full.startswith(prompt) else 0)
        if at < 0:
            raise ValueError(
                f"template {self.name!r} does not write the answer's text; it cannot be prefilled"
            )
        return full[: at + len(self.opener)]


def paraphrased_rows(rows: Rows) -> tuple[list[dict[str, Any]], str]:
    """``(rows, mode)``: ``question`` replaced by ``paraphrased_question`` when every row has one (mode
    ``question``), else ``answer`` replaced by ``paraphrased_answer`` when every row has one (mode
    ``answer``); ValueError naming both fields otherwise."""

    def has(key: str) -> bool:
        return all(isinstance(r.get(key), str) and r[key].strip() for r in rows)

    if has("paraphrased_question"):
        return [{**r, "question": r["paraphrased_question"]} for r in rows], "question"
    if has("paraphrased_answer"):
        return [{**r, "answer": r["paraphrased_answer"]} for r in rows], "answer"
    raise ValueError(
        "the paraphrase attack needs 'paraphrased_question' (or, failing that, 'paraphrased_answer') on "
        "every forget row"
    )


def _probe(
    ctx: AttackContext, name: str, rows: Rows, details: dict[str, Any], template: Any = None
) -> AttackOutcome:
    after = tracked(ctx.evaluate(ctx.model, rows, None, template=template))
    before = tracked(ctx.before)
    out = AttackOutcome(name)
    out.entries[f"{name}_forget_Q_A_ROUGE"] = {
        "agg_value": after.get("forget_Q_A_ROUGE"),
        "attack": name,
        **details,
        "before": {k: v for k, v in before.items() if k.startswith("forget_")},
        "after": after,
    }
    out.add_values(name, {k: v for k, v in after.items() if k != "forget_Q_A_ROUGE"})
    return out


def attack_prefix(ctx: AttackContext, opener: str = OPENER) -> AttackOutcome:
    """``prefix``: the forget rows evaluated with the assistant's answer prefilled with ``opener``."""
    template = PrefilledTemplate.of(ctx.template, ctx.tokenizer, opener)
    return _probe(ctx, "prefix", ctx.forget, {"opener": opener}, template=template)


def attack_paraphrase(ctx: AttackContext) -> AttackOutcome:
    """``paraphrase``: the forget rows evaluated with paraphrased questions (or answers: see the module)."""
    rows, mode = paraphrased_rows(ctx.forget)
    out = _probe(ctx, "paraphrase", rows, {"mode": mode}, template=ctx.template)
    if mode == "answer":
        out.notes.append(
            "paraphrase: the rows have no paraphrased_question; scored the answers against "
            "paraphrased_answer (the question unchanged)"
        )
    return out
