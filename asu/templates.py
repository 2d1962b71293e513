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

A template that cannot be used is one :class:`TemplateError` (a ``ValueError``) naming the template (its
file) and, where there is one, the line: a file that is missing, empty or not UTF-8 and a Jinja syntax
error when the template is read (:func:`get_template`, so before anything else happens); an undefined name
or method, a ``raise_exception(...)`` the template calls, a name a user's file prints that no template is
given, and a conversation with no assistant answer in it when :func:`check_template` renders one row with
the tokenizer (the commands do, before the model is loaded), or wherever a row is rendered.
"""

from __future__ import annotations

import dataclasses
import hashlib
import os
import traceback
from collections.abc import Iterable
from dataclasses import dataclass, field
from typing import Any

__all__ = [
    "Template",
    "TemplateError",
    "answer_end",
    "check_template",
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


class TemplateError(ValueError):
    """A prompt template that cannot render a conversation; the message names the template and the line."""


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

    @property
    def label(self) -> str:
        """The template as a user names it in an error: its file, its name, or the tokenizer's."""
        if self.path is not None:
            return f"template file {self.path}"
        if self.name == "auto" and self.source is None:
            return "the tokenizer's chat template (--template auto)"
        return f"template {self.name!r}"

    def render(self, tokenizer: Any, question: str, answer: str | None = None) -> str:
        """The whole conversation as one string; without ``answer``, the generation prompt. A template that
        fails while rendering is a :class:`TemplateError` naming it and the line."""
        if self.source is None and not has_chat_template(tokenizer):
            raise ValueError(f"template {self.name!r} uses the tokenizer's chat template, and it has none")
        kwargs = dict(self.variables)
        if self.source is not None:
            kwargs["chat_template"] = self.source
        try:
            text = tokenizer.apply_chat_template(
                self.messages(question, answer),
                tokenize=False,
                add_generation_prompt=answer is None,
                **kwargs,
            )
        except Exception as e:
            raise _render_error(self, e) from None
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
            import difflib

            close = difflib.get_close_matches(spec, TEMPLATE_NAMES, n=1)
            hint = f" (did you mean {close[0]}?)" if close else ""
            raise ValueError(
                f"unknown template {spec!r}{hint}; choose one of {', '.join(TEMPLATE_NAMES)} or give a "
                ".jinja file"
            )
    else:
        raise TypeError(f"template must be a name, a path or a Template, got {type(spec).__name__}")
    if system_prompt is not _KEEP:
        if system_prompt is not None and not isinstance(system_prompt, str):
            raise TypeError(f"system_prompt must be a string or None, got {type(system_prompt).__name__}")
        template = dataclasses.replace(template, system_prompt=system_prompt)
    return template


def _from_file(path: str) -> Template:
    """The template in the Jinja file ``path``, read as UTF-8 and compiled (a syntax error names its line)."""
    from asu.sources import decode_utf8

    label = f"template file {path}"
    if os.path.isdir(path):
        raise TemplateError(f"{label} is a directory, expected a Jinja file")
    if not os.path.isfile(path):
        from asu.files import did_you_mean

        raise TemplateError(f"{label} does not exist{did_you_mean(path)}")
    try:
        with open(path, "rb") as f:
            data = f.read()
    except OSError as e:
        raise TemplateError(f"{label} cannot be read ({e.strerror or e})") from None
    source = decode_utf8(data, label)
    if not source.strip():
        raise TemplateError(f"{label} is empty")
    try:
        _environment().from_string(source)
    except Exception as e:  # jinja2's TemplateSyntaxError, with the line
        line = getattr(e, "lineno", None)
        where = f": line {line}" if line else ""
        raise TemplateError(
            f"{label}{where}: Jinja syntax error: {getattr(e, 'message', None) or e}"
        ) from None
    return Template("file", source, add_special_tokens=False, path=path)


# -- what is wrong with a template, in the user's terms ------------------------------------------------------


def _template_line(error: BaseException) -> int | None:
    """The template line a Jinja error was raised on (Jinja rewrites tracebacks to the template's lines)."""
    line = getattr(error, "lineno", None)
    frames = [f for f in traceback.extract_tb(error.__traceback__) if f.filename == "<template>"]
    return frames[-1].lineno if frames else line


def _render_error(template: Template, error: BaseException) -> BaseException:
    """The :class:`TemplateError` for an exception raised while ``template`` rendered, in the user's terms;
    an exception that did not come from the template itself is returned unchanged."""
    import jinja2

    line = _template_line(error)
    where = f"{template.label}: line {line}" if line else template.label
    message = getattr(error, "message", None) or str(error)
    if type(error) is jinja2.TemplateError:  # what the template's raise_exception(...) raises
        return TemplateError(f"{where}: the template stopped with raise_exception: {message}")
    if isinstance(error, jinja2.UndefinedError):
        return TemplateError(f"{where}: {message} (a name or method the template uses does not exist)")
    if isinstance(error, jinja2.TemplateSyntaxError):
        return TemplateError(f"{where}: Jinja syntax error: {message}")
    if isinstance(error, jinja2.TemplateError) or line is not None:
        return TemplateError(f"{where}: {type(error).__name__}: {message}")
    return error


def _environment() -> Any:
    """A Jinja environment that parses and renders as transformers' chat templates do (sandboxed, blocks
    trimmed, loop controls, ``raise_exception``, ``tojson``, the ``{% generation %}`` tag), used to check a
    user's template file; the conversations themselves are rendered by the tokenizer."""
    import json
    from datetime import datetime

    import jinja2
    from jinja2.ext import Extension, loopcontrols
    from jinja2.sandbox import ImmutableSandboxedEnvironment

    class Generation(Extension):
        """``{% generation %}...{% endgeneration %}``: transformers marks the assistant's tokens with it."""

        tags = {"generation"}

        def parse(self, parser: Any) -> Any:
            lineno = next(parser.stream).lineno
            body = parser.parse_statements(("name:endgeneration",), drop_needle=True)
            return jinja2.nodes.CallBlock(self.call_method("_body"), [], [], body).set_lineno(lineno)

        def _body(self, caller: Any) -> str:
            return caller()

    def raise_exception(message: str) -> None:
        raise jinja2.TemplateError(message)

    class Printed(jinja2.Undefined):
        """Undefined as Jinja's default (false, empty when iterated) except when printed: a name a
        template writes into the text that no template is given is a typo (``{{ bos }}``), not a choice."""

        __slots__ = ()

        def __str__(self) -> str:
            self._fail_with_undefined_error()

    env = ImmutableSandboxedEnvironment(
        trim_blocks=True, lstrip_blocks=True, extensions=[Generation, loopcontrols], undefined=Printed
    )
    env.filters["tojson"] = lambda x, ensure_ascii=False, indent=None, separators=None, sort_keys=False: (
        json.dumps(x, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)
    )
    env.globals["raise_exception"] = raise_exception
    env.globals["strftime_now"] = lambda fmt: datetime.now().strftime(fmt)
    return env


def _first_qa_row(rows: Iterable[Any] | None) -> tuple[str, str] | None:
    """The question and answer of the first QA row of ``rows`` (a placeholder pair when ``rows`` is None;
    None when no row is a QA row: raw-text rows never meet the template)."""
    if rows is None:
        return "What is the capital of France?", "Paris."
    for row in rows:
        if (
            isinstance(row, dict)
            and isinstance(row.get("question"), str)
            and isinstance(row.get("answer"), str)
        ):
            return row["question"], row["answer"]
    return None


def check_template(
    spec: Template | str | os.PathLike | None, tokenizer: Any, rows: Iterable[Any] | None = None
) -> Template:
    """The template resolved for ``tokenizer`` after rendering one conversation with it (the first QA row of
    ``rows``; a placeholder without ``rows``; nothing to render when no row is a QA row): every way it cannot
    be used is a :class:`TemplateError` naming it (see the module docstring), before a model is loaded or
    anything is written. Returns the resolved template."""
    template = resolve_template(spec, tokenizer)
    pair = _first_qa_row(rows)
    if pair is None:
        return template
    question, answer = pair
    if template.path is not None:
        # A user's file: render it strictly once (a printed name no template is given is an error).
        special = dict(getattr(tokenizer, "special_tokens_map", None) or {})
        variables = {**special, "tools": None, "documents": None, **template.variables}
        try:
            _environment().from_string(template.source).render(
                messages=template.messages(question, answer), add_generation_prompt=False, **variables
            )
        except Exception as e:
            raise _render_error(template, e) from None
    full = template.render(tokenizer, question, answer)
    prompt = template.render(tokenizer, question)
    answer_end(template, full, prompt, answer, question)
    return template


def answer_end(template: Template, full: str, prompt: str, answer: str, question: str) -> int:
    """Where the answer's content ends in the conversation ``full`` the template rendered, after its
    generation prompt ``prompt``; a :class:`TemplateError` naming the template when the prompt does not start
    the conversation or the answer is not in it (a template that writes no assistant message)."""
    if not full.startswith(prompt):
        raise TemplateError(
            f"{template.label}: its generation prompt is not the start of the rendered conversation, so no "
            f"prompt can match what the model was trained on (question {question[:60]!r})"
        )
    # Chat templates may trim the content (Llama 3: ``content | trim``).
    for content in (answer, answer.strip()):
        at = full.find(content, len(prompt))
        if at >= 0:
            return at + len(content)
    raise TemplateError(
        f"{template.label} renders no assistant answer: the answer does not appear in the rendered "
        f"conversation after the generation prompt (question {question[:60]!r})"
    )


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
