"""Render chat messages with a model's Jinja chat template, the way transformers' `apply_chat_template` does.

Templates come from model files, so they are untrusted: they run in Jinja's immutable sandbox.
"""

from __future__ import annotations

import json
from datetime import datetime
from typing import Any

import jinja2
from jinja2.ext import loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from hearth.tokenizer import Tokenizer

# For models that ship no template: ChatML (<|im_start|>role\ncontent<|im_end|>\n ...).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class TemplateError(ValueError):
    """A chat template failed: bad syntax, `raise_exception(...)`, or a blocked attempt to leave the sandbox."""


class _Sandbox(ImmutableSandboxedEnvironment):
    def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
        # Jinja returns an Undefined that only fails when used further; fail at the first unsafe access instead
        raise jinja2.exceptions.SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} is blocked")


class _Namespace(jinja2.utils.Namespace):
    """`namespace(...)` that refuses underscore names, so templates cannot shadow or reach internals through it."""

    def __init__(*args: Any, **kwargs: Any) -> None:  # jinja's signature trick: `self` may be a key
        self, args = args[0], args[1:]
        attrs = dict(*args, **kwargs)
        for name in attrs:
            _check_name(name)
        jinja2.utils.Namespace.__init__(self, attrs)

    def __setitem__(self, name: str, value: Any) -> None:
        _check_name(name)
        jinja2.utils.Namespace.__setitem__(self, name, value)


def _check_name(name: Any) -> None:
    if isinstance(name, str) and name.startswith("_"):
        raise jinja2.exceptions.SecurityError(f"namespace attribute {name!r} is not allowed")


def _raise_exception(message: str) -> None:
    raise TemplateError(message)


def _strftime_now(fmt: str) -> str:
    return datetime.now().strftime(fmt)


def _tojson(value: Any, ensure_ascii: bool = False, indent: int | None = None, separators: Any = None,
            sort_keys: bool = False) -> str:  # fmt: skip
    # unlike Jinja's own filter: no HTML escaping, non-ASCII kept, and the json.dumps options exposed
    return json.dumps(value, ensure_ascii=ensure_ascii, indent=indent, separators=separators, sort_keys=sort_keys)


def _environment() -> jinja2.Environment:
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols])
    env.filters["tojson"] = _tojson
    env.globals.update(raise_exception=_raise_exception, strftime_now=_strftime_now, namespace=_Namespace)
    return env


def _plain(value: Any) -> Any:
    """Plain JSON-like data for the template: dicts (None values dropped, as transformers does), lists, scalars."""
    if hasattr(value, "model_dump"):  # pydantic messages
        value = value.model_dump()
    if isinstance(value, dict):
        return {str(k): _plain(v) for k, v in value.items() if v is not None}
    if isinstance(value, (list, tuple)):
        return [_plain(v) for v in value]
    if value is None or isinstance(value, (str, int, float, bool)):
        return value
    return str(value)


class ChatTemplate:
    """A compiled chat template; `render` turns messages (and tools) into the prompt text."""

    def __init__(self, source: str, bos_token: str = "", eos_token: str = "") -> None:
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateError as e:
            raise TemplateError(f"chat template does not compile: {e}") from e

    def render(self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None,
               **kwargs: Any) -> str:  # fmt: skip
        """The prompt text; extra kwargs (`enable_thinking`, `reasoning_effort`, ...) become template variables."""
        variables = {"bos_token": self.bos_token, "eos_token": self.eos_token, "documents": None, **_plain(kwargs)}
        try:
            return self._template.render(
                variables,
                messages=[_plain(m) for m in messages],
                tools=_plain(tools),
                add_generation_prompt=add_generation_prompt,
            )
        except TemplateError:
            raise
        except Exception as e:  # SecurityError, UndefinedError, a TypeError inside the template, ...
            raise TemplateError(f"chat template failed: {e}") from e


def load_chat_template(tokenizer: Tokenizer) -> ChatTemplate | None:
    """The model's own template, or None when it has none (callers may fall back to `CHATML_TEMPLATE`)."""
    if not tokenizer.chat_template:
        return None
    return ChatTemplate(tokenizer.chat_template, tokenizer.bos_token or "", tokenizer.eos_token or "")
