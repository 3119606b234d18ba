"""Structured output: a request's `response_format`, strict function tools and forced tool calls → one engine Grammar.

`grammar_for` is the one place that conversion happens; every route that generates from a chat (chat completions, and
the routes built on its request model) passes its `response_format`, `tools` and `tool_choice` through it.

Where the constraint starts depends on the model's chat format, and only here is that known; the engine gets a
trigger (token ids) and a grammar:
- no reasoning: the whole output is constrained from its first token;
- `<think>` reasoning opened by the prompt: the trigger is `</think>`, so the thought stays free and the answer after
  it is constrained; where the prompt does not open it (the model may think first or answer at once), the grammar
  starts with an optional free `<think>…</think>` before the answer;
- harmony (gpt-oss): a plain response format triggers on the final channel's header (`<|channel|>final<|message|>`).
  When tools are involved, one Lark grammar covers the whole output instead: any number of free analysis messages,
  then the final answer or a call written `<|channel|>commentary to=functions.NAME <|constrain|>json<|message|>ARGS`.
Tool calls are forced in the format's own syntax: harmony's, DeepSeek V3's, or `<tool_call>` JSON (Hermes, Qwen,
SmolLM2; also for templates without a tool-call syntax, whose output is then parsed as Hermes). JSON inside a
grammar is written as json.dumps writes it (see engine/structured.py's JSON_STYLE).

Every schema is compiled on its own first, so that an unsupported one is a 400 naming its field and the keyword.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from hearth.api.errors import APIError
from hearth.api.protocol import ChatCompletionRequest, CompletionRequest, NamedToolChoice, Tool
from hearth.engine.structured import JSON_STYLE, GrammarError, check_grammar, json_schema_text
from hearth.sampling_params import Grammar

THINK_START, THINK_END = "<think>", "</think>"
HARMONY_FINAL = "<|channel|>final<|message|>"
ANY_OBJECT: dict[str, Any] = {"type": "object"}
HERMES_TOOLS = (None, "hermes")  # tool-call parsers whose syntax `<tool_call>` JSON is


@dataclass(slots=True)
class StructuredOutput:
    """What a request's structured-output fields ask of the engine and the output parser."""

    grammar: Grammar | None = None
    tool_parser: str | None = None  # the tool-call parser the forced syntax needs, when the chat format has none
    schemas: tuple[tuple[str, dict], ...] = ()  # (field, schema) the grammar embeds, each checked on its own


def answer_schema(response_format) -> dict | None:
    """The JSON Schema the answer must match (None: free text)."""
    if response_format is None or response_format.type == "text":
        return None
    if response_format.type == "json_object":
        return ANY_OBJECT
    schema = response_format.json_schema.json_schema
    return {} if schema is None else schema


def forced_tools(body: ChatCompletionRequest) -> list[Tool] | None:
    """The tools one of which must be called: all for "required", the named one for a named choice; else None."""
    choice = body.tool_choice
    if isinstance(choice, NamedToolChoice):
        return [t for t in body.tools or [] if t.function.name == choice.function.name]
    if choice == "required":
        return list(body.tools or [])
    return None


def _args_schema(tool: Tool, constrained: bool) -> dict:
    return (tool.function.parameters or {"type": "object", "properties": {}}) if constrained else ANY_OBJECT


def _lark_json(schema: dict) -> str:
    """A schema inlined in a Lark grammar, with the JSON style set inside it (inline JSON takes no options)."""
    own = schema.get("x-guidance")
    return "%json " + json.dumps({**schema, "x-guidance": {**(own if isinstance(own, dict) else {}), **JSON_STYLE}})


def _lark_str(text: str) -> str:
    return json.dumps(text, ensure_ascii=False)


class _Syntax:
    """Lark pieces for one tokenizer: special tokens by id (so a template's control tokens match as tokens)."""

    def __init__(self, tokenizer: Any) -> None:
        self.tokenizer = tokenizer

    def token(self, text: str) -> str:
        token_id = self.tokenizer.token_to_id(text) if hasattr(self.tokenizer, "token_to_id") else None
        return f"<[{token_id}]>" if token_id is not None else _lark_str(text)


def _hermes_calls(calls: list[tuple[str, dict]]) -> str:
    bodies = " | ".join(f'{_lark_str(json.dumps({"name": name})[:-1] + ", " + json.dumps("arguments") + ": ")} '
                        f'{_lark_json(schema)} "}}"' for name, schema in calls)  # fmt: skip
    return f'call: "<tool_call>\\n" ({bodies}) "\\n</tool_call>"'


def _deepseek_calls(syntax: _Syntax, calls: list[tuple[str, dict]]) -> str:
    tok = syntax.token
    bodies = " | ".join(f'{_lark_str(name)} "\\n```json\\n" {_lark_json(schema)} "\\n```"' for name, schema in calls)
    return (f'call: {tok("<｜tool▁calls▁begin｜>")} {tok("<｜tool▁call▁begin｜>")} "function" {tok("<｜tool▁sep｜>")} '
            f'({bodies}) {tok("<｜tool▁call▁end｜>")} {tok("<｜tool▁calls▁end｜>")}')  # fmt: skip


def _harmony_grammar(syntax: _Syntax, calls: list[tuple[str, dict]], answer: dict | None, forced: bool) -> str:
    tok = syntax.token
    channel, message = tok("<|channel|>"), tok("<|message|>")
    rules = [
        f'start: (analysis {tok("<|start|>")} "assistant")* answer',
        f'analysis: {channel} "analysis" {message} FREE {tok("<|end|>")}',
        "answer: call" if forced else "answer: call | final",
        f'final: {channel} "final" {message} ' + (_lark_json(answer) if answer is not None else "FREE"),
        "FREE: /(?s:.*)/",
    ]
    if calls:
        bodies = " | ".join(f'{_lark_str(name)} " " {tok("<|constrain|>")} "json" {message} {_lark_json(schema)}'
                            for name, schema in calls)  # fmt: skip
        rules.append(f'call: {channel} "commentary to=functions." ({bodies})')
    return "\n".join(rules)


def _trigger(tokenizer: Any, fmt: Any) -> tuple[int, ...]:
    if fmt is None:
        return ()
    if fmt.harmony:
        return tuple(tokenizer.encode(HARMONY_FINAL, add_special_tokens=False))
    if fmt.reasoning_parser == "think" and fmt.starts_in_reasoning:
        return tuple(tokenizer.encode(THINK_END, add_special_tokens=False))
    return ()


def _may_think(fmt: Any) -> bool:
    """A `<think>` format whose prompt does not open the thought: the model may think first, or answer at once."""
    return fmt is not None and not fmt.harmony and fmt.reasoning_parser == "think" and not fmt.starts_in_reasoning


def _with_answer(syntax: _Syntax, answer_rules: str, fmt: Any, tokenizer: Any) -> Grammar:
    """The grammar whose rule `answer` is what the model must answer. Where the model may open a thought itself, an
    optional free thought comes first (no trigger could tell whether one comes); otherwise the trigger, if any."""
    if not _may_think(fmt):
        return Grammar("lark", f"start: answer\n{answer_rules}", _trigger(tokenizer, fmt))
    thought = [
        "start: thought? answer",
        f"thought: {syntax.token(THINK_START)} THOUGHT {syntax.token(THINK_END)} WS?",
        "THOUGHT: /(?s:.*)/ & ~/(?s:.*<\\/think>.*)/",
        "WS: /[ \\t\\r\\n]+/",
    ]
    return Grammar("lark", "\n".join([*thought, answer_rules]))


def grammar_for(request: ChatCompletionRequest | CompletionRequest, fmt: Any, tokenizer: Any) -> StructuredOutput:
    """The engine grammar a request asks for (StructuredOutput.grammar None: nothing to constrain). `fmt` is the
    model's ChatFormat (None for completions, whose prompt is raw text: constrained from the first token)."""
    answer = answer_schema(getattr(request, "response_format", None))
    schemas: list[tuple[str, dict]] = []
    if answer is not None:
        schemas.append(("response_format.json_schema.schema" if answer is not ANY_OBJECT else "response_format", answer))
    tools, forced = [], None
    if isinstance(request, ChatCompletionRequest) and request.tool_choice != "none":
        tools, forced = request.tools or [], forced_tools(request)
    strict = any(t.function.strict for t in tools)
    if forced is None and not strict:  # tools, if any, are free: only the answer is constrained
        if answer is None:
            return StructuredOutput()
        if _may_think(fmt):
            return StructuredOutput(_with_answer(_Syntax(tokenizer), f"answer: {_lark_json(answer)}", fmt, tokenizer),
                                    schemas=tuple(schemas))  # fmt: skip
        grammar = Grammar("json_schema", json_schema_text(answer), _trigger(tokenizer, fmt))
        return StructuredOutput(grammar, schemas=tuple(schemas))
    callable_tools = forced if forced is not None else tools
    calls = []
    for i, tool in enumerate(tools):
        if tool not in callable_tools:
            continue
        schema = _args_schema(tool, constrained=forced is not None or bool(tool.function.strict))
        if schema is not ANY_OBJECT:
            schemas.append((f"tools[{i}].function.parameters", schema))
        calls.append((tool.function.name, schema))
    syntax = _Syntax(tokenizer)
    if fmt is not None and fmt.harmony:
        lark = _harmony_grammar(syntax, calls, answer, forced is not None)
        return StructuredOutput(Grammar("lark", lark), schemas=tuple(schemas))
    tool_parser = fmt.tool_parser if fmt is not None else None
    if tool_parser == "deepseek_v3":
        call_rule = _deepseek_calls(syntax, calls)
    elif tool_parser in HERMES_TOOLS:
        call_rule = _hermes_calls(calls)
    else:
        raise APIError(f"forced or strict tool calls are not supported for the {tool_parser!r} tool-call format", 400,
                       "tool_choice")  # fmt: skip
    if forced is not None:
        answer_rule = "answer: call"
    elif answer is not None:
        answer_rule = f"answer: {_lark_json(answer)} | call"
    elif tool_parser == "deepseek_v3":  # free text (which cannot hold the special tokens that open calls), or a call
        answer_rule = "answer: TEXT | call\nTEXT: /(?s:.*)/"
    else:  # free text that does not open a call (a call must go through the call rule), or a call
        answer_rule = "answer: TEXT | call\nTEXT: /(?s:.*)/ & ~/(?s:.*<tool_call>.*)/"
    grammar = _with_answer(syntax, f"{answer_rule}\n{call_rule}", fmt, tokenizer)
    return StructuredOutput(grammar, tool_parser="hermes" if tool_parser is None else None, schemas=tuple(schemas))


def check_structured(tokenizer: Any, out: StructuredOutput) -> None:
    """Compile each embedded schema alone (a 400 naming its field), then the grammar. Runs in a worker thread."""
    if out.grammar is None:
        return
    for param, schema in out.schemas:
        try:
            check_grammar(tokenizer, Grammar("json_schema", json_schema_text(schema)))
        except GrammarError as e:
            raise APIError(f"{param} is not supported: {e}", 400, param) from None
    try:
        check_grammar(tokenizer, out.grammar)
    except GrammarError as e:
        raise APIError(f"the structured output grammar cannot be built: {e}", 400, "response_format") from None
