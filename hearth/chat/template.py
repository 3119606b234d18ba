"""Render chat messages with a model's Jinja chat template, the way transformers' `apply_chat_template` does.

Templates come from model files, so they are untrusted: they run in Jinja's immutable sandbox, and each render has
limits the sandbox alone does not give. Jinja has no hook that runs per loop iteration, so `_Sandbox._parse` wraps the
iterable of every `{% for %}` in a call to `_Limits.guard`, which counts iterations and checks the render's deadline as
the template runs; every call and filter checks the deadline too; `*`, `**`, format widths and the width or count
arguments of str methods and filters (`center`, `slice`, ...) refuse results past the size limit; filters never run
while compiling (Jinja would fold them over constants, outside any limit); and the output is counted as it is
generated. A runaway template therefore stops itself inside its own thread and the render raises TemplateError;
nothing is left running.
"""

from __future__ import annotations

import functools
import json
import re
import time
from contextvars import ContextVar
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import jinja2
from jinja2 import nodes
from jinja2.ext import Extension, loopcontrols
from jinja2.sandbox import ImmutableSandboxedEnvironment

from hearth.tokenizer import Tokenizer

# For models that ship no template: ChatML (<|im_start|>role\ncontent<|im_end|>\n ...).
CHATML_TEMPLATE = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


# Per-render limits (ChatTemplate's defaults; a chat prompt is a few MB at most, and renders in milliseconds).
TIME_LIMIT_SECONDS = 2.0
MAX_OUTPUT_CHARS = 8 * 1024 * 1024  # also the largest string or list `*` may build
MAX_LOOP_ITERATIONS = 2_000_000  # over all loops of one render
MAX_POWER_BITS = 1 << 16  # `**` results larger than this many bits are refused


# The names a render supplies itself (variables and helpers), which callers' extra variables must not replace;
# `tokenizer` and `reasoning_effort` are parameters of ChatFormat.render, which passes the extras on.
RESERVED_TEMPLATE_NAMES = frozenset({"messages", "tools", "add_generation_prompt", "bos_token", "eos_token", "documents",
                                     "raise_exception", "strftime_now", "namespace", "tokenizer",
                                     "reasoning_effort"})  # fmt: skip


class TemplateError(ValueError):
    """A chat template failed: bad syntax, `raise_exception(...)`, a blocked attempt to leave the sandbox, or a
    render past its time, loop or output limit."""


@dataclass
class _Budget:
    """What one render may still spend; checked by the sandbox as the template runs."""

    deadline: float
    time_limit: float
    max_output_chars: int
    max_iterations: int
    iterations: int = 0

    def check_time(self) -> None:
        if time.monotonic() > self.deadline:
            raise TemplateError(f"chat template exceeded its time limit of {self.time_limit:g} s")

    def count_iteration(self) -> None:
        self.iterations += 1
        if self.iterations > self.max_iterations:
            raise TemplateError(f"chat template exceeded its limit of {self.max_iterations} loop iterations")
        self.check_time()


# the budget of the render running in this thread (each render sets and resets it; renders run in worker threads)
_BUDGET: ContextVar[_Budget | None] = ContextVar("hearth_template_budget", default=None)


class _Limits(Extension):
    """Holds `guard`, the wrapper `_Sandbox._parse` puts around every for-loop's iterable."""

    def guard(self, iterable: Any) -> Any:
        budget = _BUDGET.get()
        if budget is None:
            return iterable
        return _guarded(iterable, budget)


def _guarded(iterable: Any, budget: _Budget) -> Any:
    for item in iterable:
        budget.count_iteration()
        yield item


def _power_bits(base: Any, exponent: Any) -> int:
    """About how many bits `base ** exponent` needs (0 unless both are ints and the result can grow)."""
    if not isinstance(base, int) or not isinstance(exponent, int) or exponent <= 0 or abs(base) <= 1:
        return 0
    return base.bit_length() * exponent


def _size(value: Any) -> int | None:
    return len(value) if isinstance(value, (str, list, tuple)) else None


def _limit() -> int:
    budget = _BUDGET.get()
    return budget.max_output_chars if budget is not None else MAX_OUTPUT_CHARS


_PERCENT_SPEC = re.compile(r"%[-+ #0]*(?:\d+|\*)?(?:\.(?:\d+|\*))?")
_FORMAT_FIELD = re.compile(r"\{[^{}]*(?:\{[^{}]*\}[^{}]*)*\}")
_NESTED_FIELD = re.compile(r"\{[^{}]*\{")
_DIGITS = re.compile(r"\d+")


def _check_width(value: Any, limit: int) -> None:
    if isinstance(value, int) and abs(value) > limit:
        raise TemplateError(f"chat template asked for a width or count of {value}, over its limit of {limit}")


def _check_format(fmt: str, percent: bool, args: Any = ()) -> None:
    """Widths and precisions in a %- or {}-format string (and the arguments that may supply them) stay within the
    output limit, so `'%999999999d' % 1` or `'{:>999999999}'.format(1)` cannot allocate gigabytes."""
    limit = _limit()
    for spec in (_PERCENT_SPEC if percent else _FORMAT_FIELD).findall(fmt):
        for digits in _DIGITS.findall(spec):
            if len(digits) > 12 or int(digits) > limit:
                raise TemplateError(f"chat template formats a value wider than its limit of {limit} characters")
    if ("*" in fmt) if percent else _NESTED_FIELD.search(fmt):  # widths taken from the arguments
        for arg in args if isinstance(args, (tuple, list)) else (args,):
            _check_width(arg, limit)


_SIZED_FILTERS = frozenset({"center", "indent", "truncate", "wordwrap", "slice", "batch"})  # take widths or counts


def _bounded_filter(name: str, f: Any) -> Any:
    """A filter that checks the deadline, is never folded while compiling, and (for those that take a width or a
    count: `center(10**9)`, `slice(10**9)`) refuses one past the output limit."""
    skip = 2 if hasattr(f, "jinja_pass_arg") else 1  # the context or environment, then the value filtered

    @functools.wraps(f)
    def bounded(*args: Any, **kwargs: Any) -> Any:
        budget = _BUDGET.get()
        if budget is None:  # Jinja folding a filter over constants while compiling: leave it to the render
            raise nodes.Impossible()
        budget.check_time()
        if name == "format" and isinstance(args[skip - 1], str):
            _check_format(args[skip - 1], True, args[skip:])
        elif name in _SIZED_FILTERS:
            for arg in (*args[skip:], *kwargs.values()):
                _check_width(arg, budget.max_output_chars)
        return f(*args, **kwargs)

    return bounded


class _Sandbox(ImmutableSandboxedEnvironment):
    intercepted_binops = frozenset(["*", "**", "%"])

    def unsafe_undefined(self, obj: Any, attribute: str) -> jinja2.Undefined:
        # Jinja returns an Undefined that only fails when used further; fail at the first unsafe access instead
        raise jinja2.exceptions.SecurityError(f"access to attribute {attribute!r} of {type(obj).__name__!r} is blocked")

    def _parse(self, source: str, name: str | None, filename: str | None) -> nodes.Template:
        tree = super()._parse(source, name, filename)
        for loop in tree.find_all(nodes.For):
            guard = nodes.ExtensionAttribute(_Limits.identifier, "guard", lineno=loop.lineno)
            loop.iter = nodes.Call(guard, [loop.iter], [], None, None, lineno=loop.lineno)
        return tree

    def call(__self, __context: Any, __obj: Any, *args: Any, **kwargs: Any) -> Any:  # noqa: N805 (Jinja's signature)
        budget = _BUDGET.get()
        if budget is not None:
            budget.check_time()
            if isinstance(getattr(__obj, "__self__", None), str):  # str methods: center, ljust, zfill, expandtabs, ...
                for arg in (*args, *kwargs.values()):
                    _check_width(arg, budget.max_output_chars)
        return super().call(__context, __obj, *args, **kwargs)

    def wrap_str_format(self, value: Any) -> Any:
        fmt = getattr(value, "__self__", None)
        wrapped = super().wrap_str_format(value)
        if not isinstance(fmt, str) or wrapped is None:
            return wrapped
        _check_format(fmt, False)

        @functools.wraps(wrapped)
        def checked(*args: Any, **kwargs: Any) -> Any:
            _check_format(fmt, False, (*args, *kwargs.values()))
            return wrapped(*args, **kwargs)

        return checked

    def call_binop(self, context: Any, operator: str, left: Any, right: Any) -> Any:
        limit = _limit()
        if operator == "%" and isinstance(left, str):
            _check_format(left, True, right)
        elif operator == "*":
            for seq, times in ((left, right), (right, left)):
                size = _size(seq)
                if size is not None and isinstance(times, int) and size * times > limit:
                    raise TemplateError(f"chat template built a value larger than its limit of {limit} items")
        elif operator == "**" and _power_bits(left, right) > MAX_POWER_BITS:
            raise TemplateError(f"chat template computed a number larger than {MAX_POWER_BITS} bits")
        return super().call_binop(context, operator, left, right)


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
    env = _Sandbox(trim_blocks=True, lstrip_blocks=True, extensions=[loopcontrols, _Limits])
    env.filters["tojson"] = _tojson
    env.filters.update({name: _bounded_filter(name, f) for name, f in env.filters.items()})
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
    """A compiled chat template; `render` turns messages (and tools) into the prompt text, within a time limit, a
    loop-iteration limit and an output-size limit."""

    def __init__(self, source: str, bos_token: str = "", eos_token: str = "", *,
                 time_limit: float = TIME_LIMIT_SECONDS, max_output_chars: int = MAX_OUTPUT_CHARS,
                 max_loop_iterations: int = MAX_LOOP_ITERATIONS) -> None:  # fmt: skip
        self.source = source
        self.bos_token = bos_token
        self.eos_token = eos_token
        self.time_limit = time_limit
        self.max_output_chars = max_output_chars
        self.max_loop_iterations = max_loop_iterations
        try:
            self._template = _environment().from_string(source)
        except jinja2.TemplateError as e:
            raise TemplateError(f"chat template does not compile: {e}") from e

    def render(self, messages: list[dict], add_generation_prompt: bool = True, tools: list[dict] | None = None,
               **kwargs: Any) -> str:  # fmt: skip
        """The prompt text; extra kwargs (`enable_thinking`, `reasoning_effort`, ...) become template variables."""
        budget = _Budget(time.monotonic() + self.time_limit, self.time_limit, self.max_output_chars,
                         self.max_loop_iterations)  # fmt: skip
        token = _BUDGET.set(budget)
        try:
            variables = {"bos_token": self.bos_token, "eos_token": self.eos_token, "documents": None,
                         **_plain(kwargs)}  # fmt: skip
            variables.update(messages=[_plain(m) for m in messages], tools=_plain(tools),
                             add_generation_prompt=add_generation_prompt)  # fmt: skip
            out: list[str] = []
            size = 0
            for chunk in self._template.generate(variables):
                size += len(chunk)
                if size > self.max_output_chars:
                    raise TemplateError(f"chat template output exceeded its limit of {self.max_output_chars} characters")
                out.append(chunk)
                budget.check_time()
            return "".join(out)
        except TemplateError:
            raise
        except RecursionError as e:
            raise TemplateError("chat template failed: too deeply nested (data, macros or recursive loops)") from e
        except Exception as e:  # SecurityError, UndefinedError, a TypeError inside the template, MemoryError, ...
            raise TemplateError(f"chat template failed: {e}") from e
        finally:
            _BUDGET.reset(token)


def load_chat_template(tokenizer: Tokenizer) -> ChatTemplate | None:
    """The model's own template, or None when it has none (callers may fall back to `CHATML_TEMPLATE`)."""
    if not tokenizer.chat_template:
        return None
    return ChatTemplate(tokenizer.chat_template, tokenizer.bos_token or "", tokenizer.eos_token or "")
