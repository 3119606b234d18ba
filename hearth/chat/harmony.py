"""gpt-oss harmony format: render OpenAI-style chats to harmony text / token ids, and parse the model's output
incrementally into reasoning (analysis), content (final) and tool calls (commentary to=functions.x).

Reference: openai-harmony 0.0.8 (docs/models.md §1.8); tests check rendered ids against it. Rendering keeps special tokens
as their literal strings (`<|start|>`…); `render_ids` encodes the text between them with the model's tokenizer and
the special tokens by id, as harmony does. The parser reads detokenized text that keeps special tokens.
"""

from __future__ import annotations

import json
import re
from collections.abc import Callable
from typing import Any

from hearth.chat.reasoning import ANSWER, REASONING, UNDECIDED, ParsedDelta
from hearth.chat.tool_calls import ToolCall

SPECIAL_TOKENS = {
    "<|startoftext|>": 199998,
    "<|endoftext|>": 199999,
    "<|return|>": 200002,
    "<|constrain|>": 200003,
    "<|channel|>": 200005,
    "<|start|>": 200006,
    "<|end|>": 200007,
    "<|message|>": 200008,
    "<|call|>": 200012,
}
STOP_TOKEN_IDS = (200002, 200012)  # <|return|>, <|call|>: end of an assistant action
MODEL_IDENTITY = "You are ChatGPT, a large language model trained by OpenAI."
KNOWLEDGE_CUTOFF = "2024-06"
REASONING_EFFORTS = ("low", "medium", "high")
_SPECIAL_RE = re.compile("|".join(re.escape(t) for t in SPECIAL_TOKENS))


# ---------------------------------------------------------------------------------------------------- rendering


def _ts_type(schema: dict[str, Any], indent: int) -> str:
    """A JSON schema as harmony's TypeScript-like type (encoding.rs json_schema_to_typescript)."""
    if "oneOf" in schema or "anyOf" in schema:
        variants = schema.get("oneOf") or schema.get("anyOf")
        return "\n" + "".join(f"{' ' * indent} | {_ts_type(v, indent + 2)}\n" for v in variants)
    if "enum" in schema:
        return " | ".join(json.dumps(v) for v in schema["enum"])
    kind = schema.get("type")
    if isinstance(kind, list):
        return " | ".join(_ts_type({**schema, "type": k}, indent) for k in kind)
    if kind == "array":
        item = _ts_type(schema.get("items", {}), indent)
        return f"{item}[]"
    if kind == "object":
        props = schema.get("properties")
        if not props:
            return "object"
        required = set(schema.get("required", []))
        pad = " " * (indent + 4)
        lines = ["{"]
        for name, prop in props.items():
            if prop.get("description"):
                lines.append(f"{pad}// {prop['description']}")
            opt = "" if name in required else "?"
            default = f" // default: {_default(prop['default'])}" if "default" in prop else ""
            lines.append(f"{pad}{name}{opt}{_colon(_ts_type(prop, indent + 4))},{default}")
        lines.append(f"{pad}}}")
        return "\n".join(lines)
    return {"string": "string", "number": "number", "integer": "number", "boolean": "boolean", "null": "null"}.get(kind, "any")


def _colon(ts_type: str) -> str:
    return f":{ts_type}" if ts_type.startswith("\n") else f": {ts_type}"


def _default(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)


def _tool_params(schema: dict[str, Any]) -> str:
    """Top-level parameters: fields at column 0 (harmony's layout differs from nested objects)."""
    props = schema.get("properties") or {}
    required = set(schema.get("required", []))
    lines = ["{"]
    for name, prop in props.items():
        if prop.get("description"):
            lines.append(f"// {prop['description']}")
        opt = "" if name in required else "?"
        default = f" // default: {_default(prop['default'])}" if "default" in prop else ""
        lines.append(f"{name}{opt}{_colon(_ts_type(prop, 0))},{default}")
    lines.append("}")
    return "\n".join(lines)


def render_tools(tools: list[dict[str, Any]]) -> str:
    """OpenAI `tools` (type function) → the `## functions` namespace of the developer message."""
    out = ["## functions\n\nnamespace functions {\n\n"]
    for tool in tools:
        fn = tool.get("function", tool)
        if fn.get("description"):
            out.append(f"// {fn['description']}\n")
        params = fn.get("parameters")
        if params and params.get("properties"):
            out.append(f"type {fn['name']} = (_: {_tool_params(params)}) => any;\n\n")
        else:
            out.append(f"type {fn['name']} = () => any;\n\n")
    out.append("} // namespace functions")
    return "".join(out)


def system_content(reasoning_effort: str = "medium", current_date: str | None = None, has_tools: bool = False,
                   knowledge_cutoff: str = KNOWLEDGE_CUTOFF, model_identity: str = MODEL_IDENTITY) -> str:  # fmt: skip
    if reasoning_effort not in REASONING_EFFORTS:
        raise ValueError(f"reasoning_effort must be one of {', '.join(REASONING_EFFORTS)}, got {reasoning_effort!r}")
    head = f"{model_identity}\nKnowledge cutoff: {knowledge_cutoff}"
    if current_date:
        head += f"\nCurrent date: {current_date}"
    channels = "# Valid channels: analysis, commentary, final. Channel must be included for every message."
    if has_tools:
        channels += "\nCalls to these tools must go to the commentary channel: 'functions'."
    return f"{head}\n\nReasoning: {reasoning_effort}\n\n{channels}"


def developer_content(instructions: str | None, tools: list[dict[str, Any]] | None) -> str | None:
    parts = []
    if instructions:
        parts.append(f"# Instructions\n\n{instructions}")
    if tools:
        parts.append(f"# Tools\n\n{render_tools(tools)}")
    return "\n\n".join(parts) if parts else None


def _text(content: Any) -> str:
    """OpenAI message content: a string or a list of {type: text, text} parts."""
    if content is None:
        return ""
    if isinstance(content, str):
        return content
    return "".join(p.get("text", "") for p in content if isinstance(p, dict))


def _message(header: str, body: str, end: str = "<|end|>") -> str:
    return f"<|start|>{header}<|message|>{body}{end}"


def render(messages: list[dict[str, Any]], *, tools: list[dict[str, Any]] | None = None,
           reasoning_effort: str = "medium", current_date: str | None = None, add_generation_prompt: bool = True,
           drop_reasoning: str = "harmony", knowledge_cutoff: str = KNOWLEDGE_CUTOFF,
           model_identity: str = MODEL_IDENTITY) -> str:  # fmt: skip
    """OpenAI chat messages → harmony text (special tokens as strings).

    `system` and `developer` messages become the developer instructions (harmony's system message is generated from
    the options). Assistant turns may carry `reasoning_content` (analysis), `content` (final) and `tool_calls`; `tool`
    messages are results from `functions.{name}` (name from the message or its tool_call_id).

    `drop_reasoning`: "harmony" (the default) drops every analysis message before the assistant's last final message
    and keeps those after it: earlier turns lose their reasoning, while the turn still in its tool loop (analysis, call,
    result, analysis, ...) keeps all of its own, as harmony's rules ask. "turns" drops the analysis of every turn that
    ended with a final message (a turn that ended in a call without a final keeps its own); "none" keeps all.
    """
    instructions = "\n\n".join(_text(m.get("content")) for m in messages if m.get("role") in ("system", "developer"))
    out = [_message("system", system_content(reasoning_effort, current_date, bool(tools), knowledge_cutoff,
                                             model_identity))]  # fmt: skip
    dev = developer_content(instructions or None, tools)
    if dev is not None:
        out.append(_message("developer", dev))

    # flatten into harmony messages: (kind, header, body, end); kind in user/analysis/final/call/tool
    flat: list[tuple[str, str, str, str]] = []
    call_names: dict[str, str] = {}
    for m in messages:
        role = m.get("role")
        if role == "user":
            flat.append(("user", "user", _text(m.get("content")), "<|end|>"))
        elif role == "assistant":
            reasoning = m.get("reasoning_content") or m.get("reasoning") or m.get("thinking")
            if reasoning:
                flat.append(("analysis", "assistant<|channel|>analysis", reasoning, "<|end|>"))
            for call in m.get("tool_calls") or []:
                fn = call.get("function", call)
                call_names[call.get("id", "")] = fn["name"]
                args = fn.get("arguments", "{}")
                args = args if isinstance(args, str) else json.dumps(args)
                header = f"assistant to=functions.{fn['name']}<|channel|>commentary <|constrain|>json"
                flat.append(("call", header, args, "<|call|>"))
            content = _text(m.get("content"))
            if content or not (reasoning or m.get("tool_calls")):
                flat.append(("final", "assistant<|channel|>final", content, "<|end|>"))
        elif role == "tool":
            name = m.get("name") or call_names.get(m.get("tool_call_id", ""), "tool")
            header = f"functions.{name} to=assistant<|channel|>commentary"
            flat.append(("tool", header, _text(m.get("content")), "<|end|>"))
    drop = _dropped(flat, drop_reasoning)
    out.extend(_message(header, body, end) for i, (_, header, body, end) in enumerate(flat) if i not in drop)
    if add_generation_prompt:
        out.append("<|start|>assistant")
    return "".join(out)


def _dropped(flat: list[tuple[str, str, str, str]], mode: str) -> set[int]:
    kinds = [k for k, *_ in flat]
    if mode == "none":
        return set()
    if mode == "harmony":
        finals = [i for i, k in enumerate(kinds) if k == "final"]
        return {i for i in range(finals[-1]) if kinds[i] == "analysis"} if finals else set()
    if mode == "turns":
        drop, pending = set(), []
        for i, k in enumerate(kinds):
            if k == "analysis":
                pending.append(i)
            elif k == "final":
                drop.update(pending)
                pending = []
            elif k == "user":
                pending = []
        return drop
    raise ValueError(f"drop_reasoning must be harmony, turns or none, got {mode!r}")


def split_special(text: str) -> list[str | int]:
    """Harmony text → pieces: plain text, or special-token ids."""
    pieces: list[str | int] = []
    pos = 0
    for m in _SPECIAL_RE.finditer(text):
        if m.start() > pos:
            pieces.append(text[pos : m.start()])
        pieces.append(SPECIAL_TOKENS[m.group()])
        pos = m.end()
    if pos < len(text):
        pieces.append(text[pos:])
    return pieces


def render_ids(messages: list[dict[str, Any]], encode: Callable[[str], list[int]], **options) -> list[int]:
    """`render()` as token ids: text runs through `encode` (no special tokens), special tokens by id."""
    ids: list[int] = []
    for piece in split_special(render(messages, **options)):
        if isinstance(piece, int):
            ids.append(piece)
        else:
            ids.extend(encode(piece))
    return ids


# ---------------------------------------------------------------------------------------------------- parsing


_STOPS = ("<|end|>", "<|return|>", "<|call|>")
MAX_HEADER_CHARS = 256  # a header longer than this is treated as malformed
# a header that never reached <|message|>: its known parts, for _recover
_LOOSE_HEADER = re.compile(r"(?:\s*assistant)?(?:\s*to=(?P<before>[\w.-]+))?\s*<\|channel\|>"
                           r"(?P<channel>analysis|commentary|final)(?![\w.=-])(?:\s*to=(?P<after>[\w.-]+))?\s*")  # fmt: skip
_LOOSE_CONSTRAIN = re.compile(r"(?:<\|constrain\|>)?\s*json(?!\w)\s*")
_ROLE_BEFORE_CHANNEL = re.compile(r"^\s*assistant(?=\s*<\|channel\|>)")


def _holdback(text: str) -> int:
    """Length of the longest suffix of `text` that could start a special token."""
    for n in range(min(len(text), max(map(len, SPECIAL_TOKENS)) - 1), 0, -1):
        suffix = text[-n:]
        if any(tok.startswith(suffix) for tok in SPECIAL_TOKENS):
            return n
    return 0


class HarmonyParser:
    """Incremental parser of one assistant completion: `feed(text) -> ParsedDelta`, then `finish() -> ParsedDelta`.

    The completion starts inside a header (the prompt ended with `<|start|>assistant`). Analysis text streams out as
    reasoning, final (and commentary without a recipient, a "preamble") as content; a message with a recipient is a
    tool call, emitted whole when it ends. Any split of the same text gives the same concatenated result. Output
    garbled by sampling degrades, never raises: an unknown channel (`<|channel|>fnal`) or a header without one is
    content; a header that never reaches `<|message|>` (a stop token first, or MAX_HEADER_CHARS of text) goes on in
    the channel it names, or as content; text outside any message, and output with no markup at all, is content.
    """

    def __init__(self, call_id_prefix: str = "call_"):
        self._buf = ""
        self._state = "header"
        self._kind = "content"  # where content of the current message goes: reasoning | content | tool
        self._recipient = ""
        self._tool_args: list[str] = []
        self._num_calls = 0
        self._call_id_prefix = call_id_prefix
        self.finished = False  # saw <|return|> or <|call|>

    def feed(self, text: str) -> ParsedDelta:
        delta = ParsedDelta()
        self._buf += text
        self._run(delta, final=False)
        return delta

    @property
    def phase(self) -> str:
        """Reasoning inside an analysis message; undecided in a header or between messages (the next header says)."""
        if self.finished:
            return ANSWER
        if self._state == "content":
            return REASONING if self._kind == "reasoning" else ANSWER
        return UNDECIDED

    def finish(self) -> ParsedDelta:
        delta = ParsedDelta()
        self._run(delta, final=True)
        if self._state == "header" and self._buf:
            self._recover()
            self._emit(delta, _SPECIAL_RE.sub("", self._buf))
            self._end_message(delta)
        elif self._state == "content":
            self._emit(delta, self._buf)
            self._end_message(delta)
        elif self._state == "between" and self._buf:
            delta.content += _SPECIAL_RE.sub("", self._buf)
        self._buf = ""
        return delta

    # -- internals
    def _emit(self, delta: ParsedDelta, text: str) -> None:
        if not text:
            return
        if self._kind == "reasoning":
            delta.reasoning += text
        elif self._kind == "tool":
            self._tool_args.append(text)
        else:
            delta.content += text

    def _end_message(self, delta: ParsedDelta) -> None:
        if self._kind == "tool":
            name = self._recipient.removeprefix("functions.")
            delta.tool_calls.append(ToolCall(name, "".join(self._tool_args), id=f"{self._call_id_prefix}{self._num_calls}"))
            self._num_calls += 1
        self._tool_args = []
        self._kind, self._recipient = "content", ""

    def _run(self, delta: ParsedDelta, final: bool) -> None:
        while self._buf:
            if self.finished:
                self._buf = ""  # nothing after <|return|> / <|call|> belongs to this completion
                return
            if self._state == "header":
                if not self._header(delta, final):
                    return
            elif self._state == "content":
                if not self._content(delta, final):
                    return
            else:  # between messages: expect <|start|> (or a bare <|channel|>, a header missing its start)
                hits = [j for j in (self._buf.find("<|start|>"), self._buf.find("<|channel|>")) if j >= 0]
                if not hits:
                    if final:
                        return
                    stray = self._buf[: len(self._buf) - _holdback(self._buf)]
                    delta.content += _SPECIAL_RE.sub("", stray)
                    self._buf = self._buf[len(stray) :]
                    return
                i = min(hits)
                delta.content += _SPECIAL_RE.sub("", self._buf[:i])
                skip = len("<|start|>") if self._buf.startswith("<|start|>", i) else 0
                self._buf = self._buf[i + skip :]
                self._state = "header"

    def _recover(self) -> None:
        """A header that never reached its `<|message|>` (a stop token came first, or too much text): the message
        goes on without it. When the header opens with a channel name, the header's words are dropped and the text
        goes where they say: `<|channel|>final Paris.` is the answer "Paris.", `<|channel|>commentary
        to=functions.f json{...}` a call of f; otherwise all of it is content."""
        self._state, self._kind, self._recipient = "content", "content", ""
        m = _LOOSE_HEADER.match(self._buf)
        if m is None:
            self._buf = _ROLE_BEFORE_CHANNEL.sub("", self._buf, count=1)
            return
        self._buf = self._buf[m.end() :]
        recipient = m.group("before") or m.group("after") or ""
        if recipient and recipient != "all":
            self._kind, self._recipient = "tool", recipient
            constrain = _LOOSE_CONSTRAIN.match(self._buf)
            if constrain:
                self._buf = self._buf[constrain.end() :]
        elif m.group("channel") == "analysis":
            self._kind = "reasoning"

    def _header(self, delta: ParsedDelta, final: bool) -> bool:
        """Consume one header if complete; returns whether progress was made."""
        i = self._buf.find("<|message|>")
        stop = min((j for j in (self._buf.find(s) for s in (*_STOPS, "<|start|>")) if j >= 0), default=-1)
        if stop >= 0 and (i < 0 or stop < i) and stop <= MAX_HEADER_CHARS:
            self._recover()  # a stop token inside a header: malformed
            return True
        if i < 0 or i > MAX_HEADER_CHARS:
            if i > MAX_HEADER_CHARS or len(self._buf) > MAX_HEADER_CHARS + len("<|message|>"):
                self._recover()  # not a header
                return True
            return False
        self._parse_header(self._buf[:i])
        self._buf = self._buf[i + len("<|message|>") :]
        self._state = "content"
        return True

    def _parse_header(self, header: str) -> None:
        channel = ""
        m = re.search(r"<\|channel\|>([^\s<]*)", header)
        if m:
            channel = m.group(1)
            header = header[: m.start()] + header[m.end() :]
        header = header.replace("<|constrain|>", " <|constrain|>").strip()
        parts = header.split()
        if parts and parts[0] in ("assistant", "system", "developer", "user"):
            parts = parts[1:]
        recipient = ""
        if parts and parts[-1].startswith("to="):
            recipient = parts[-1][3:]
        else:
            for p in parts:
                if p.startswith("to="):
                    recipient = p[3:]
        self._recipient = recipient
        if recipient and recipient != "all":
            self._kind = "tool"
        elif channel == "analysis":
            self._kind = "reasoning"
        else:
            self._kind = "content"  # final, commentary preamble, or no/unknown channel

    def _content(self, delta: ParsedDelta, final: bool) -> bool:
        hits = [(j, s) for s in (*_STOPS, "<|start|>") if (j := self._buf.find(s)) >= 0]
        if hits:
            j, stop = min(hits)
            self._emit(delta, _SPECIAL_RE.sub("", self._buf[:j]))
            self._end_message(delta)
            self._buf = self._buf[j + len(stop) :]
            if stop in ("<|return|>", "<|call|>"):
                self.finished = True
            self._state = "header" if stop == "<|start|>" else "between"
            return True
        keep = 0 if final else _holdback(self._buf)
        text = self._buf[: len(self._buf) - keep]
        clean = _SPECIAL_RE.sub("", text)
        self._emit(delta, clean)
        self._buf = self._buf[len(text) :]
        return False


def parse(text: str) -> ParsedDelta:
    """Whole-output parse: `feed(text)` then `finish()`, the one code path shared with streaming."""
    parser = HarmonyParser()
    result = parser.feed(text)
    result.extend(parser.finish())
    return result
