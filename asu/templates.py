"""Prompt templates: how one conversation (optional system prompt, a question, its answer) becomes one string.

A :class:`Template` is Jinja source rendered by the tokenizer's own chat-template machinery
(``tokenizer.apply_chat_template(messages, chat_template=source, tokenize=False)``), so every template, named
or user-supplied, sees exactly the variables a chat template gets: ``messages`` (a list of
``{"role": "system"|"user"|"assistant", "content": str}``), ``add_generation_prompt``, ``bos_token``,
``eos_token`` and the tokenizer's other special tokens, plus the template's own ``variables`` (``date_string``
for ``llama3``). The full conversation (system, user, assistant) is rendered once and tokenised once; the
generation prompt is the same conversation without the assistant turn, rendered with
``add_generation_prompt=True`` (:mod:`asu.formatting` turns both into token ids and the label mask).

Named templates (the model configurations of open-unlearning, ``configs/model/*.yaml``, rendered as its
``preprocess_chat_instance`` renders them):

``auto`` (default)
    The tokenizer's own chat template with both turns, as TRL's SFT trainer renders a conversation; a
    tokenizer without one gets ``plain``.
``plain`` (also ``phi``)
    ``Question: {q}\\nAnswer: {a}``, tokenised with the tokenizer's special tokens (BOS); the generation
    prompt is ``Question: {q}\\nAnswer:``. open-unlearning's format for phi-1.5 and the Llama-2 base models.
``tofu-llama2``
    ``[INST] {q} [/INST]{a}``, BOS from the tokenizer, no space before the answer: TOFU's and
    open-unlearning's format for Llama-2-7b-chat, and the paper's TOFU runs.
``llama3``
    The Llama-3.1/3.2 Instruct format with open-unlearning's settings: system prompt "You are a helpful
    assistant." and ``date_string`` "10 Apr 2025" (``<|begin_of_text|><|start_header_id|>system...``).

A path to a ``.jinja`` file is a user template, rendered like a chat template (its text writes its own
special tokens: ``add_special_tokens=False``).
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "Template",
    "TEMPLATE_NAMES",
    "TEMPLATE_ALIASES",
    "get_template",
    "resolve_template",
    "has_chat_template",
    "describe_template",
]

# Jinja sources. transformers renders chat templates with trim_blocks and lstrip_blocks; every tag here strips
# its own whitespace, so the text written is exactly the quoted strings.
_PLAIN = r"""
{%- for message in messages -%}
{%- if message.role == 'system' -%}{{- message.content + '\n\n' -}}
{%- elif message.role == 'user' -%}{{- 'Question: ' + message.content + '\n' -}}
{%- elif message.role == 'assistant' -%}{{- 'Answer: ' + message.content + ('' if loop.last else '\n\n') -}}
{%- endif -%}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- 'Answer:' -}}{%- endif -%}
"""

_TOFU_LLAMA2 = r"""
{%- set system = messages[0].content if messages[0].role == 'system' else none -%}
{%- for message in messages if message.role != 'system' -%}
{%- if message.role == 'user' -%}
{{- '[INST] ' -}}
{%- if system is not none and loop.first -%}{{- '<<SYS>>\n' + system + '\n<</SYS>>\n\n' -}}{%- endif -%}
{{- message.content + ' [/INST]' -}}
{%- elif message.role == 'assistant' -%}{{- message.content + ('' if loop.last else ' ') -}}
{%- endif -%}
{%- endfor -%}
"""

_LLAMA3 = r"""
{{- bos_token -}}
{%- if messages[0].role == 'system' -%}
{%- set system_message = messages[0].content | trim -%}
{%- set messages = messages[1:] -%}
{%- else -%}
{%- set system_message = '' -%}
{%- endif -%}
{{- '<|start_header_id|>system<|end_header_id|>\n\n' -}}
{{- 'Cutting Knowledge Date: December 2023\n' -}}
{{- 'Today Date: ' + date_string + '\n\n' -}}
{{- system_message + '<|eot_id|>' -}}
{%- for message in messages -%}
{{- '<|start_header_id|>' + message.role + '<|end_header_id|>\n\n' + message.content | trim + '<|eot_id|>' -}}
{%- endfor -%}
{%- if add_generation_prompt -%}{{- '<|start_header_id|>assistant<|end_header_id|>\n\n' -}}{%- endif -%}
"""


@dataclass
class Template:
    """One prompt format.

    Attributes:
        name: ``auto``, a named template, or ``file`` for a user's Jinja file.
        source: Jinja text; ``None`` = the tokenizer's own chat template (``auto``).
        add_special_tokens: tokenise the rendered text with the tokenizer's special tokens (BOS) added, as
            open-unlearning does for its non-chat formats; chat templates write their own (False).
        system_prompt: the system message, or None for none.
        variables: extra template variables (``llama3``: ``date_string``).
        path: the Jinja file a user template came from.
    """

    name: str
    source: str | None = None
    add_special_tokens: bool = False
    system_prompt: str | None = None
    variables: dict[str, Any] = field(default_factory=dict)
    path: str | None = None

    def messages(self, question: str, answer: str | None = None) -> list[dict[str, str]]:
        """The conversation: optional system turn, the question, and the answer when given."""
        out = []
        if self.system_prompt is not None:
            out.append({"role": "system", "content": self.system_prompt})
        out.append({"role": "user", "content": question})
        if answer is not None:
            out.append({"role": "assistant", "content": answer})
        return out

    def render(self, tokenizer: Any, question: str, answer: str | None = None) -> str:
        """The whole conversation as one string; without ``answer``, the generation prompt."""
        if self.source is None and not has_chat_template(tokenizer):
            raise ValueError(f"template {self.name!r} uses the tokenizer's chat template, and it has none")
        kwargs = dict(self.variables)
        if self.source is not None:
            kwargs["chat_template"] = self.source
        text = tokenizer.apply_chat_template(
            self.messages(question, answer),
            tokenize=False,
            add_generation_prompt=answer is None,
            **kwargs,
        )
        if not isinstance(text, str):
            raise TypeError(f"template {self.name!r} rendered {type(text).__name__}, expected a string")
        return text


#: Named templates (``auto`` is resolved per tokenizer, see :func:`resolve_template`).
_NAMED = {
    "plain": Template("plain", _PLAIN.strip(), add_special_tokens=True),
    "tofu-llama2": Template("tofu-llama2", _TOFU_LLAMA2.strip(), add_special_tokens=True),
    "llama3": Template(
        "llama3",
        _LLAMA3.strip(),
        add_special_tokens=False,
        system_prompt="You are a helpful assistant.",
        variables={"date_string": "10 Apr 2025"},
    ),
}
#: Other accepted names: open-unlearning's phi-1.5 configuration is the plain format.
TEMPLATE_ALIASES = {"phi": "plain"}
TEMPLATE_NAMES = ("auto", *_NAMED, *TEMPLATE_ALIASES)

_KEEP = object()  # "leave the template's own system prompt"


def has_chat_template(tokenizer: Any) -> bool:
    return bool(getattr(tokenizer, "chat_template", None))


def _looks_like_path(spec: str) -> bool:
    is_jinja = spec.endswith((".jinja", ".j2", ".jinja2"))
    return is_jinja or "/" in spec or os.sep in spec or os.path.isfile(spec)


def get_template(spec: Template | str | os.PathLike | None = None, system_prompt: Any = _KEEP) -> Template:
    """The template named by ``spec``: None or ``"auto"``, a name (:data:`TEMPLATE_NAMES`), a path to a
    Jinja file, or a :class:`Template` (returned as is). ``system_prompt`` (a string, or None for none)
    replaces the template's own.

    ``auto`` comes back unresolved (``source=None``); :func:`resolve_template` picks for a tokenizer.
    Raises ValueError for an unknown name or a missing/empty file.
    """
    if isinstance(spec, Template):
        template = spec
    elif spec is None or spec == "auto":
        template = Template("auto")
    elif isinstance(spec, (str, os.PathLike)):
        spec = os.fspath(spec)
        name = TEMPLATE_ALIASES.get(spec, spec)
        if name in _NAMED:
            template = dataclasses.replace(_NAMED[name], variables=dict(_NAMED[name].variables))
        elif _looks_like_path(spec):
            template = _from_file(spec)
        else:
            raise ValueError(
                f"unknown template {spec!r}; choose one of {', '.join(TEMPLATE_NAMES)} or give a .jinja file"
            )
    else:
        raise TypeError(f"template must be a name, a path or a Template, got {type(spec).__name__}")
    if system_prompt is not _KEEP:
        if system_prompt is not None and not isinstance(system_prompt, str):
            raise TypeError(f"system_prompt must be a string or None, got {type(system_prompt).__name__}")
        template = dataclasses.replace(template, system_prompt=system_prompt)
    return template


def _from_file(path: str) -> Template:
    if not os.path.isfile(path):
        raise ValueError(f"template file {path} does not exist")
    with open(path, encoding="utf-8") as f:
        source = f.read()
    if not source.strip():
        raise ValueError(f"template file {path} is empty")
    return Template("file", source, add_special_tokens=False, path=path)


def resolve_template(spec: Template | str | os.PathLike | None, tokenizer: Any) -> Template:
    """:func:`get_template`, with ``auto`` made concrete for ``tokenizer``: its chat template when it has
    one, else ``plain`` (keeping any system prompt given to ``auto``)."""
    template = get_template(spec)
    if template.name == "auto" and template.source is None and not has_chat_template(tokenizer):
        plain = _NAMED["plain"]
        return dataclasses.replace(plain, name="auto", system_prompt=template.system_prompt)
    return template


def _sha256(text: str) -> str:
    return hashlib.sha256(text.encode("utf-8")).hexdigest()


def describe_template(spec: Template | str | os.PathLike | None, tokenizer: Any = None) -> dict[str, Any]:
    """What a run records about its template (JSON-serialisable): ``name``, ``system_prompt``,
    ``variables``; ``resolved`` (``chat_template`` or ``plain``) and the chat template's ``sha256`` for
    ``auto`` when a tokenizer is given; ``path``, ``sha256`` and the Jinja ``source`` for a file or a custom
    template, so the same format can be rebuilt from the record alone."""
    template = get_template(spec)
    record: dict[str, Any] = {
        "name": template.name,
        "system_prompt": template.system_prompt,
        "variables": dict(template.variables),
    }
    if template.name == "auto":
        if tokenizer is not None:
            chat = getattr(tokenizer, "chat_template", None)
            record["resolved"] = "chat_template" if chat else "plain"
            if isinstance(chat, str):
                record["sha256"] = _sha256(chat)
    elif template.name not in _NAMED or template.source != _NAMED[template.name].source:
        record["path"] = template.path
        record["add_special_tokens"] = template.add_special_tokens
        if template.source is not None:
            record["sha256"] = _sha256(template.source)
            record["source"] = template.source
    return record
