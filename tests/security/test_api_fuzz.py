"""Property-based fuzzing of every HTTP endpoint: request bodies, raw JSON text, headers, paths and methods.

Whatever arrives, the server answers below 500, every 4xx has OpenAI's error shape, no request hangs, and a normal
request still succeeds after each batch (and every few hundred cases within one). Most cases run in-process against
an engine stub (httpx's ASGI transport, one event loop per test), over 10,000 in all; a small sample runs against the
real SmolLM2 engine behind uvicorn (marked slow). Hypothesis is derandomized, so a run is reproducible.
"""

from __future__ import annotations

import asyncio
import contextlib
import functools
import json
import re
import string
import sys
import threading
import time

import httpx
import pytest
from hypothesis import HealthCheck, assume, given, settings
from hypothesis import strategies as st
from test_api_fake import REPLY, FakeEngine, FakeTokenizer

from hearth.engine.protocol import EngineError

BODY_LIMIT = 256 * 1024
VOCAB = 0x110000
REQUEST_TIMEOUT = 20.0  # a liveness bound: a request still unanswered after this long counts as a hang
CHECK_EVERY = 250  # cases between two normal requests within a batch
SERVER_RECURSION_LIMIT = 1000  # Python's default, which uvicorn leaves alone
# cases per batch against the stub: over 10,000 in all (the small raw kinds stop early, once every combination has
# been tried: about 600 cases together)
N = {"chat": 2500, "completions": 2000, "raw": 1750, "raw-small": 250, "headers": 1750, "routes": 1750}

NORMAL_CHAT = {"model": "fake-model", "messages": [{"role": "user", "content": "Hi"}]}


def fuzz_settings(max_examples: int):
    return settings(max_examples=max_examples, deadline=None, derandomize=True, database=None, print_blob=True,
                    suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large,
                                           HealthCheck.large_base_example, HealthCheck.filter_too_much])  # fmt: skip


# --- the engine stub ------------------------------------------------------------------------------------------------


class StubTokenizer(FakeTokenizer):
    """FakeTokenizer whose decode, like a real tokenizer's, never yields a lone surrogate."""

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join("\ufffd" if 0xD800 <= i < 0xE000 else chr(i) if i > 2 else "" for i in ids)


class StubEngine(FakeEngine):
    """FakeEngine that refuses prompt token ids outside its vocabulary, as the real engine does."""

    async def generate(self, prompt_ids, params, request_id):
        if any(not 0 <= t < VOCAB for t in prompt_ids):
            raise EngineError(f"prompt token ids must be between 0 and {VOCAB - 1}", 400, "prompt")
        async for delta in super().generate(prompt_ids, params, request_id):
            yield delta


@contextlib.contextmanager
def server_recursion_limit():
    """About as many stack frames for the app as a server gives it. Hypothesis raises the recursion limit while a test
    runs, which would hide a RecursionError that the server (Python's default limit) answers with a 500."""
    depth, frame = 0, sys._getframe()
    while frame is not None:
        depth, frame = depth + 1, frame.f_back
    saved = sys.getrecursionlimit()
    sys.setrecursionlimit(depth + SERVER_RECURSION_LIMIT)
    try:
        yield
    finally:
        sys.setrecursionlimit(saved)


class Fuzzer:
    """The stub app, one event loop and an in-process client; counts cases and checks every answer."""

    def __init__(self) -> None:
        from hearth.chat.template import CHATML_TEMPLATE, ChatTemplate

        self.engine = StubEngine(max_model_len=2048)
        template = ChatTemplate(CHATML_TEMPLATE, "<s>", "</s>")
        from hearth.api.app import create_app

        self.app = create_app(self.engine, StubTokenizer(), template, "fake-model", max_body_bytes=BODY_LIMIT)
        self.runner = asyncio.Runner()
        transport = httpx.ASGITransport(app=self.app, raise_app_exceptions=False)
        self.client = httpx.AsyncClient(transport=transport, base_url="http://testserver")
        self.cases = 0

    def request(self, method: str, url: str, **kwargs) -> httpx.Response:
        start = time.monotonic()
        with server_recursion_limit():
            r = self.runner.run(asyncio.wait_for(self.client.request(method, url, **kwargs), REQUEST_TIMEOUT))
        elapsed = time.monotonic() - start
        assert elapsed < REQUEST_TIMEOUT, f"{method} {url} took {elapsed:.1f} s"
        self.cases += 1
        if self.cases % CHECK_EVERY == 0:
            self.assert_healthy()
        return r

    def assert_healthy(self) -> None:
        r = self.runner.run(asyncio.wait_for(self.client.post("/v1/chat/completions", json=NORMAL_CHAT), 20))
        assert r.status_code == 200, r.text
        assert r.json()["choices"][0]["message"]["content"] == REPLY
        r = self.runner.run(asyncio.wait_for(self.client.get("/health"), 20))
        assert r.status_code == 200 and r.json()["status"] == "ready"
        self.engine.calls.clear()  # the stub keeps every call; keep memory flat over thousands of cases

    def close(self) -> None:
        self.runner.run(self.client.aclose())
        self.runner.close()
        self.app.state.hearth.close()


@pytest.fixture
def fuzzer():
    f = Fuzzer()
    yield f
    f.assert_healthy()  # after each batch, a normal request still succeeds
    f.close()


def assert_error_shape(r: httpx.Response) -> None:
    body = r.json()
    assert set(body) == {"error"}, body
    error = body["error"]
    assert set(error) == {"message", "type", "param", "code"}, error
    assert isinstance(error["message"], str) and error["message"], error
    assert isinstance(error["type"], str) and error["type"], error
    assert error["param"] is None or isinstance(error["param"], str), error
    assert error["code"] is None or isinstance(error["code"], str), error


def assert_sane(r: httpx.Response) -> None:
    assert r.status_code < 500, (r.status_code, r.text[:2000])
    if r.status_code >= 400 and r.request.method != "HEAD":
        assert r.headers["content-type"].startswith("application/json"), (r.status_code, r.headers, r.text[:500])
        assert_error_shape(r)


def assert_completion_sane(r: httpx.Response, stream: bool) -> None:
    assert_sane(r)
    if r.status_code == 200:
        if r.headers["content-type"].startswith("text/event-stream"):
            assert r.text.endswith("data: [DONE]\n\n"), r.text[-500:]
        else:
            assert not stream
            assert r.json()["choices"]


# --- strategies -----------------------------------------------------------------------------------------------------

ODD_STRINGS = ["", " ", "\x00", "\ud800", "a\udfffb", "\udbff\udfff", "\ud83d\ude00", "\u202e", "\ufeff", "\U0010ffff",
               "\ufffd", "𝔘𝔫𝔦", "<|im_start|>", "<|im_end|>", "</s>", "{{ 7*7 }}", "{% for x in y %}", "\r\n\t",
               "\\u0000", "null", "fake-model", "function", "text", "user", "x" * 5000]  # fmt: skip
HUGE_SIZES = [20_000, 100_000, 200_000, BODY_LIMIT + 1]
NUMBER_EXTREMES = [0, -0.0, 1, -1, 2**31, 2**53 + 1, 2**63 - 1, 2**63, 2**64, -(2**63) - 1, 10**30, -(10**30), 10**300,
                   5e-324, 2.2250738585072014e-308, 1e-300, 1e-12, 1e308, -1e308, 1.7976931348623157e308,
                   float("nan"), float("inf"), float("-inf"), True, False, 0.5, 2.0000001, 16, 17, 20, 21]  # fmt: skip
RESERVED = ["messages", "tools", "add_generation_prompt", "bos_token", "eos_token", "documents", "raise_exception",
            "namespace", "strftime_now", "tokenizer", "reasoning_effort", "enable_thinking", "self", "__class__"]  # fmt: skip

# characters worth trying (lone surrogates included), drawn from a list: cheaper than the whole of Unicode
ODD_CHARS = list("aZ0 _-.:/\\\"'{}[]<>|%") + ["\x00", "\x1f", "\x7f", "\x85", "\xa0", "\xe9", "\u0301", "\u200b",
                                              "\u2028", "\u202e", "\ud800", "\udbff", "\udc00", "\udfff", "\ue000",
                                              "\ufeff", "\ufffd", "\uffff", "\U0001f600", "\U0010ffff"]  # fmt: skip
odd_text = st.text(st.sampled_from(ODD_CHARS), max_size=12)
texts = st.one_of(odd_text, st.sampled_from(ODD_STRINGS), st.text(string.printable, max_size=30),
                  st.sampled_from(HUGE_SIZES).map(lambda n: "y" * n))  # fmt: skip
numbers = st.one_of(st.integers(-3, 40), st.floats(-3, 3), st.sampled_from(NUMBER_EXTREMES), st.integers(),
                    st.floats())  # fmt: skip
scalars = st.one_of(st.none(), st.booleans(), numbers, texts)
json_values = st.recursive(scalars, lambda inner: st.lists(inner, max_size=4) | st.dictionaries(odd_text, inner, max_size=4),
                           max_leaves=6)  # fmt: skip


@functools.cache
def nest(depth: int, kind: str) -> object:
    value: object = 1
    for _ in range(depth):
        value = {"a": value} if kind == "dict" else [value]
    return value


deep_values = st.builds(nest, st.integers(1, 700), st.sampled_from(["dict", "list"]))
any_value = st.one_of(json_values, json_values, json_values, deep_values)


def maybe(valid, weight_valid: int = 3):
    """Mostly a plausible value, sometimes anything at all."""
    return st.one_of(*([valid] * weight_valid), any_value)


text_part = st.fixed_dictionaries({"type": maybe(st.sampled_from(["text", "image_url", "input_audio"])),
                                   "text": maybe(texts)})  # fmt: skip
content = st.one_of(texts, st.none(), st.lists(maybe(text_part), max_size=3), any_value)
message = st.fixed_dictionaries(
    {"role": maybe(st.sampled_from(["system", "developer", "user", "assistant", "tool", "function"]), 6)},
    optional={"content": maybe(content, 5), "name": maybe(texts), "tool_calls": any_value, "tool_call_id": texts,
              "reasoning_content": texts, "thinking": any_value},
)  # fmt: skip
messages = st.one_of(st.lists(message, min_size=1, max_size=4), st.lists(maybe(message), max_size=3), any_value)
tool_names = st.sampled_from(["f", "get_weather", "g", ""]) | odd_text
tool = st.fixed_dictionaries({"type": maybe(st.just("function")),
                              "function": maybe(st.fixed_dictionaries({"name": maybe(tool_names)},
                                                                      optional={"description": texts,
                                                                                "parameters": any_value,
                                                                                "strict": any_value}))})  # fmt: skip
tool_choice = st.one_of(st.sampled_from(["none", "auto", "required", "other"]),
                        st.fixed_dictionaries({"type": maybe(st.just("function")),
                                               "function": maybe(st.fixed_dictionaries({"name": maybe(tool_names)}))}),
                        any_value)  # fmt: skip
template_kwargs = st.one_of(st.dictionaries(st.sampled_from(RESERVED) | odd_text, any_value, max_size=3), any_value)
response_format = st.one_of(st.fixed_dictionaries({"type": maybe(st.sampled_from(["text", "json_object", "json_schema"]))},
                                                  optional={"json_schema": any_value}), any_value)  # fmt: skip
stop = st.one_of(texts, st.lists(texts, max_size=5), any_value)

SAMPLING_FIELDS = {
    "model": maybe(st.just("fake-model"), 5), "max_tokens": numbers, "temperature": numbers, "top_p": numbers,
    "top_k": numbers, "min_p": numbers, "seed": numbers, "stop": stop, "n": numbers, "presence_penalty": numbers,
    "frequency_penalty": numbers, "repetition_penalty": numbers, "stream": maybe(st.booleans()),
    "stream_options": maybe(st.fixed_dictionaries({}, optional={"include_usage": maybe(st.booleans())})),
    "user": maybe(texts), "ignore_eos": maybe(st.booleans()), "logit_bias": any_value, "metadata": any_value,
}  # fmt: skip
CHAT_FIELDS = {
    **SAMPLING_FIELDS, "max_completion_tokens": numbers, "logprobs": maybe(st.booleans()), "top_logprobs": numbers,
    "response_format": response_format, "tools": st.one_of(st.lists(tool, max_size=3), any_value),
    "tool_choice": tool_choice, "parallel_tool_calls": maybe(st.booleans()),
    "reasoning_effort": maybe(st.sampled_from(["none", "minimal", "low", "medium", "high"])),
    "chat_template_kwargs": template_kwargs,
}  # fmt: skip
token_ids = st.lists(st.one_of(st.integers(0, 0x10FFFF), st.sampled_from([-1, 2**32, 2**64, 10**30])), max_size=6)
COMPLETION_FIELDS = {**SAMPLING_FIELDS, "echo": maybe(st.booleans()), "logprobs": numbers, "suffix": maybe(texts)}
prompts = st.one_of(texts, st.lists(texts, max_size=4), token_ids, st.lists(token_ids, max_size=3),
                    st.lists(st.just("p"), min_size=100, max_size=200), any_value)  # fmt: skip


# Values of the right type and mostly in range, including the kinds that used to reach a handler and fail there:
# template kwargs named like the template's own variables or nested hundreds deep, lone surrogates in text,
# tool_choice naming a missing tool, integers past 64 bits, subnormal floats, token ids outside the vocabulary.
ints_past_64_bits = st.sampled_from([2**63, 2**64, 10**30, 2**200])
valid_message = st.fixed_dictionaries(
    {"role": st.sampled_from(["system", "developer", "user", "assistant", "tool"])},
    optional={"content": st.one_of(texts, st.lists(st.fixed_dictionaries({"type": st.just("text"), "text": texts}),
                                                   min_size=1, max_size=2)),
              "name": odd_text, "tool_call_id": odd_text, "reasoning_content": odd_text, "thinking": any_value},
)  # fmt: skip
valid_function = st.fixed_dictionaries({"name": tool_names}, optional={
    "description": texts, "parameters": st.dictionaries(odd_text, any_value, max_size=2)})  # fmt: skip
valid_tool = st.fixed_dictionaries({"type": st.just("function"), "function": valid_function})
VALID_SAMPLING = {
    "model": st.just("fake-model"), "max_tokens": st.integers(1, 64) | ints_past_64_bits,
    "temperature": st.floats(0, 2) | st.sampled_from([5e-324, 1e-300, 2.0]), "top_p": st.floats(1e-9, 1) | st.just(5e-324),
    "top_k": st.integers(-1, 100) | ints_past_64_bits, "min_p": st.floats(0, 1), "seed": st.integers(),
    "stop": st.one_of(texts, st.lists(texts, max_size=4)), "n": st.integers(1, 16),
    "presence_penalty": st.floats(-2, 2), "frequency_penalty": st.floats(-2, 2),
    "repetition_penalty": st.floats(5e-324, 1e308) | st.sampled_from([5e-324, 1e308]), "stream": st.booleans(),
    "stream_options": st.fixed_dictionaries({"include_usage": st.booleans()}), "user": texts,
    "ignore_eos": st.booleans(),
}  # fmt: skip
VALID_CHAT = {
    **VALID_SAMPLING, "max_completion_tokens": st.integers(1, 64) | ints_past_64_bits, "logprobs": st.booleans(),
    "top_logprobs": st.integers(0, 20), "tools": st.lists(valid_tool, max_size=3),
    "tool_choice": st.one_of(st.sampled_from(["none", "auto", "required"]),
                             st.fixed_dictionaries({"type": st.just("function"),
                                                    "function": st.fixed_dictionaries({"name": tool_names})})),
    "reasoning_effort": st.sampled_from(["none", "minimal", "low", "medium", "high"]),
    "response_format": st.fixed_dictionaries({"type": st.sampled_from(["text", "json_object"])}),
    "chat_template_kwargs": st.dictionaries(st.sampled_from(RESERVED) | odd_text, any_value, min_size=1, max_size=3),
}  # fmt: skip
VALID_COMPLETION = {**VALID_SAMPLING, "echo": st.booleans(), "logprobs": st.integers(0, 20)}


@st.composite
def bodies(draw, valid: dict, wild: dict, required: dict):
    """An object with the required fields, a few other fields of the right type (hitting the handlers), and at most
    two wild fields (hitting validation); sometimes missing required fields, sometimes not an object at all."""
    shape = draw(st.integers(0, 11))
    if shape == 0:
        return draw(any_value)
    body = {name: draw(strategy) for name, strategy in required.items()} if shape > 1 else {}
    for name in draw(st.lists(st.sampled_from(sorted(valid)), max_size=4, unique=True)):
        body[name] = draw(valid[name])
    wild_names = draw(st.lists(st.sampled_from(sorted(wild)), max_size=2, unique=True)) if wild and shape > 6 else []
    for name in wild_names:
        body[name] = draw(wild[name])
    return body


chat_bodies = bodies(VALID_CHAT, CHAT_FIELDS, {"messages": st.one_of(st.lists(valid_message, min_size=1, max_size=4),
                                                                     messages)})  # fmt: skip
completion_bodies = bodies(VALID_COMPLETION, COMPLETION_FIELDS, {"prompt": prompts})


def encode_body(body: object) -> bytes:
    """JSON as Python writes it: NaN/Infinity literals for those floats, \\uXXXX escapes for lone surrogates."""
    return json.dumps(body, ensure_ascii=True).encode()


def post_json(fuzzer: Fuzzer, path: str, body: object) -> httpx.Response:
    return fuzzer.request("POST", path, content=encode_body(body), headers={"content-type": "application/json"})


# --- structured bodies ----------------------------------------------------------------------------------------------


def test_chat_completions_bodies(fuzzer):
    @fuzz_settings(N["chat"])
    @given(body=chat_bodies)
    def case(body):
        r = post_json(fuzzer, "/v1/chat/completions", body)
        assert_completion_sane(r, isinstance(body, dict) and body.get("stream") is True)

    case()
    assert fuzzer.cases >= N["chat"]


def test_completions_bodies(fuzzer):
    @fuzz_settings(N["completions"])
    @given(body=completion_bodies)
    def case(body):
        r = post_json(fuzzer, "/v1/completions", body)
        assert_completion_sane(r, isinstance(body, dict) and body.get("stream") is True)

    case()
    assert fuzzer.cases >= N["completions"]


# --- raw JSON text --------------------------------------------------------------------------------------------------

RAW_NUMBERS = ["NaN", "-NaN", "Infinity", "-Infinity", "1e999", "-1e999", "1" * 5000, "-" + "9" * 4301, "1" * 4000,
               "4.9e-324", "1e-400", "-0", "0e0", "1E+2", "18446744073709551616", "00", "01", "1.", ".5", "+1", "0x10",
               "1_000", "true", "null", '"1"', "[]", "{}"]  # fmt: skip
RAW_STRINGS = ['"\\ud800"', '"a\\udfffb"', '"\\ud800\\ud800"', '"\\udbff\\udfff"', '"\\ud83d\\ude00"', '"\\u0000"',
               '"\\ud800\\u0041"', '"\\uDFFF"', '"\\u"', '"\\x41"', '"\t"', '"\\/"', '"\xff"', '"é"', '"\u2028"']  # fmt: skip
NUMBER_FIELDS = ["max_tokens", "temperature", "top_p", "top_k", "min_p", "seed", "n", "presence_penalty",
                 "frequency_penalty", "repetition_penalty", "top_logprobs", "logprobs", "max_completion_tokens"]  # fmt: skip


RAW_KINDS = ["number", "string", "key", "deep", "deep-field", "encoding", "wrapper", "mutate"]


@st.composite
def raw_bodies(draw, kind: str | None = None, short: bool = False) -> bytes:
    """'path\nbody' of one kind (any but "mutate" when None). With `short`, bodies that parse ask for at most 2 new
    tokens (for the real model)."""
    chat = draw(st.booleans())
    base = "messages" if chat else "prompt"
    if kind is None:
        kind = draw(st.sampled_from(RAW_KINDS[:-1]))
    if kind == "number":
        field = draw(st.sampled_from(NUMBER_FIELDS))
        value = draw(st.sampled_from(RAW_NUMBERS))
        body = '{"messages":[{"role":"user","content":"Hi"}]' if chat else '{"prompt":"Hi"'
        text = body + f',"{field}":{value}}}'
    elif kind == "string":
        value = draw(st.sampled_from(RAW_STRINGS))
        where = draw(st.sampled_from(["content", "model", "stop", "user", "name", "prompt"]))
        if where == "content" and chat:
            text = '{"messages":[{"role":"user","content":' + value + "}]}"
        elif where == "name" and chat:
            text = '{"messages":[{"role":"user","content":"Hi","name":' + value + "}]}"
        elif where == "prompt" and not chat:
            text = '{"prompt":[' + value + ',"x"]}'
        else:
            first = '"messages":[{"role":"user","content":"Hi"}]' if chat else '"prompt":"Hi"'
            text = "{" + f'{first},"{where}":{value}' + "}"
    elif kind == "key":
        value = draw(st.sampled_from(RAW_STRINGS))
        if chat:
            text = '{"messages":[{"role":"user","content":"Hi"}],"chat_template_kwargs":{' + value + ":1}}"
        else:
            text = '{"prompt":"Hi",' + value + ":1}"
    elif kind == "deep":
        depth = draw(st.sampled_from([10, 63, 64, 65, 500, 999, 1000, 1001, 5000, 50_000]))
        opener, closer = draw(st.sampled_from([("[", "]"), ('{"a":', "}")]))
        text = opener * depth + "1" + closer * depth
        if draw(st.booleans()):
            text = opener * depth  # unclosed
    elif kind == "deep-field":
        depth = draw(st.sampled_from([63, 64, 65, 500, 900]))
        field = draw(st.sampled_from(["chat_template_kwargs", "tools", "logit_bias", "stop", "response_format"]))
        inner = '{"x":' * depth + "1" + "}" * depth
        first = '"messages":[{"role":"user","content":"Hi"}]' if chat else '"prompt":"Hi"'
        text = "{" + f'{first},"{field}":{inner}' + "}"
    elif kind == "mutate":
        doc = encode_body(draw(chat_bodies if chat else completion_bodies)).decode()
        cut = draw(st.integers(0, len(doc)))
        op = draw(st.sampled_from(["truncate", "insert", "delete", "duplicate-key"]))
        if op == "truncate":
            text = doc[:cut]
        elif op == "insert":
            text = doc[:cut] + draw(st.sampled_from([",", "}", "]", '"', "\\", "\\ud800", ":", "NaN", "\x00"])) + doc[cut:]
        elif op == "delete":
            text = doc[:cut] + doc[cut + 1 :]
        else:
            text = doc[:-1] + f',"{base}":null}}' if doc.startswith("{") and len(doc) > 2 else doc
    elif kind == "encoding":
        doc = '{"messages":[{"role":"user","content":"Hé"}]}' if chat else '{"prompt":"Hé"}'
        codec = draw(st.sampled_from(["utf-16", "utf-16-le", "utf-32", "utf-8-sig", "latin-1", "cp1252"]))
        raw = doc.encode(codec) + (b"\xff\xfe" if draw(st.booleans()) else b"")
        return ("/v1/chat/completions" if chat else "/v1/completions").encode() + b"\n" + raw
    else:
        doc = '{"messages":[{"role":"user","content":"Hi"}]}' if chat else '{"prompt":"Hi"}'
        text = draw(st.sampled_from(["", " ", "null", "[]", "0", '""', doc + doc, doc + "x", "\ufeff" + doc, " " + doc,
                                     doc[:-1] + ",}", "[" + doc + "]", doc.replace(":", "=")]))  # fmt: skip
    if short and text.startswith("{"):
        text = '{"max_tokens":2,' + text[1:]
    return (("/v1/chat/completions" if chat else "/v1/completions") + "\n" + text).encode("utf-8", "surrogatepass")


@pytest.mark.parametrize("kind", RAW_KINDS)
def test_raw_json_bodies(fuzzer, kind):
    # one batch per kind: Hypothesis would otherwise spend most cases on the kind with the most choices ("mutate");
    # the small kinds run out of new cases (every combination tried) before max_examples
    @fuzz_settings(N["raw"] if kind == "mutate" else N["raw-small"])
    @given(raw=raw_bodies(kind))
    def case(raw):
        path, _, body = raw.partition(b"\n")
        r = fuzzer.request("POST", path.decode(), content=body, headers={"content-type": "application/json"})
        assert_completion_sane(r, False)

    case()
    assert fuzzer.cases >= (N["raw"] if kind == "mutate" else min(N["raw-small"], 24))


# --- headers --------------------------------------------------------------------------------------------------------

CONTENT_LENGTHS = [b"abc", b"-1", b"+5", b" 5", b"5 ", b"1_0", b"0x10", b"1e3", b"5.0", b"99999999999999999999999", b"",
                   b"5, 5", b"\xd9\xa3", b"\xef\xbc\x95", b"0", b"1", str(BODY_LIMIT + 1).encode(), b"1" * 400]  # fmt: skip
CONTENT_TYPES = [b"application/json", b"application/json; charset=utf-8", b"application/json; charset=utf-16",
                 b"text/plain", b"", b"multipart/form-data; boundary=x", b"application/x-www-form-urlencoded",
                 b"application/vnd.api+json", b"json", b"application/json;;;", b"application/", b"\xff\xfe",
                 b"APPLICATION/JSON", b"application/json, text/plain", b"*/*"]  # fmt: skip


@st.composite
def header_cases(draw):
    chat = draw(st.booleans())
    body = encode_body(NORMAL_CHAT if chat else {"model": "fake-model", "prompt": "Hi"})
    if draw(st.integers(0, 3)) == 0:
        body = draw(st.sampled_from([b"", b"{", b"null", b"\x00" * 10, body * 2]))
    headers: list[tuple[bytes, bytes]] = []
    for _ in range(draw(st.integers(0, 2))):
        length = draw(st.one_of(st.sampled_from(CONTENT_LENGTHS),
                                st.integers(-5, 5).map(lambda d: str(max(0, len(body) + d)).encode())))  # fmt: skip
        headers.append((b"content-length", length))
    for _ in range(draw(st.integers(0, 2))):
        headers.append((b"content-type", draw(st.sampled_from(CONTENT_TYPES))))
    if draw(st.booleans()):
        name = draw(st.sampled_from([b"transfer-encoding", b"content-encoding", b"expect", b"authorization", b"accept",
                                     b"x-forwarded-for", b"host"]))  # fmt: skip
        value = draw(st.sampled_from([b"chunked", b"gzip", b"100-continue", b"Bearer \xff", b"x" * 4000, b"",
                                      b"identity, chunked"]))  # fmt: skip
        headers.append((name, value))
    return ("/v1/chat/completions" if chat else "/v1/completions"), body, headers


def test_malformed_headers(fuzzer):
    @fuzz_settings(N["headers"])
    @given(case=header_cases())
    def case(case):
        path, body, headers = case
        r = fuzzer.request("POST", path, content=body, headers=headers)
        assert_completion_sane(r, False)
        lengths = {v for k, v in headers if k == b"content-length"}
        if lengths and (len(lengths) > 1 or not re.fullmatch(rb"[0-9]+", next(iter(lengths)))):
            assert r.status_code == 400 and r.json()["error"]["code"] == "invalid_content_length", r.text

    case()
    assert fuzzer.cases >= N["headers"]


# --- GET routes, odd paths and queries, other methods ---------------------------------------------------------------

SEGMENTS = ["", "v1", "models", "fake-model", "other-model", "health", "metrics", "static", "chat", "completions",
            "..", ".", "%2e%2e", "%2E%2e%2f", "%00", "%ED%A0%80", "%FF", "%", "%zz", "index.html", "docs",
            "openapi.json", "redoc", "..%2f..%2fetc%2fpasswd", "%C0%AE%C0%AE", "\u202e", "𝔘", "a" * 3000,
            "fake-model%2Fx", "v1%2Fmodels", ";", "@", "~", "*"]  # fmt: skip
query_text = st.lists(st.sampled_from(list("ab=&%;+/?[]") + ["%00", "%ED%A0%80", "\u00e9", "x" * 100]), max_size=12).map(
    "".join
)


@st.composite
def route_cases(draw):
    prefix = draw(st.sampled_from(["", "/v1", "/v1/models", "/static", "/health"]))
    segments = draw(st.lists(st.one_of(st.sampled_from(SEGMENTS), st.text(string.ascii_letters + "-_.~", max_size=8)),
                             max_size=4))  # fmt: skip
    path = prefix + "/" + "/".join(segments)
    if draw(st.booleans()):
        path += "?" + draw(query_text)
    method = draw(st.sampled_from(["GET"] * 6 + ["HEAD", "POST", "PUT", "DELETE", "OPTIONS", "PATCH"]))
    return method, path


def test_get_routes_odd_paths_and_queries(fuzzer):
    @fuzz_settings(N["routes"])
    @given(case=route_cases())
    def case(case):
        method, path = case
        try:
            r = fuzzer.request(method, path)
        except httpx.InvalidURL:  # the client refuses to send it (a control character, say): nothing to test
            assume(False)
        assert_sane(r)

    case()
    assert fuzzer.cases >= N["routes"]


# --- the real model -------------------------------------------------------------------------------------------------


def clamp_for_real_model(body: object) -> object:
    """Keep generation short on a CPU: at most 2 new tokens and one choice, where the body would ask for more. Seeds
    and temperatures are kept in the range the engine samples with (SamplingParams checks those ranges, and its own
    tests cover them); every other field stays as generated."""
    if isinstance(body, dict):
        body = dict(body)
        if body.get("model") == "fake-model":
            body["model"] = "smollm2"
        if isinstance(body.get("seed"), int) and not isinstance(body.get("seed"), bool):
            body["seed"] = body["seed"] % 2**32
        if isinstance(body.get("temperature"), (int, float)) and 0 < body["temperature"] < 0.01:
            body["temperature"] = 0.01
        for name in ("max_tokens", "max_completion_tokens"):
            if isinstance(body.get(name), int) and not isinstance(body.get(name), bool) and body[name] > 2:
                body[name] = 2
        body.setdefault("max_tokens", 2)
        if isinstance(body.get("n"), int) and not isinstance(body.get("n"), bool) and body["n"] > 1:
            body["n"] = 1
        if isinstance(body.get("prompt"), list) and len(body["prompt"]) > 2:
            body["prompt"] = body["prompt"][:2]
    return body


@pytest.fixture(scope="module")
def real_server():
    import os
    import socket

    import torch
    import uvicorn

    from hearth.api.errors import http_protocol
    from hearth.cli.serve import build_app
    from hearth.config import EngineConfig
    from hearth.loader.resolve import resolve_model

    num_threads = torch.get_num_threads()
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setenv("HEARTH_NUM_THREADS", os.environ.get("HEARTH_NUM_THREADS", "1"))
    app, engine = build_app(resolve_model("smollm2"), EngineConfig(max_model_len=512, max_num_seqs=4),
                            max_body_bytes=BODY_LIMIT)  # fmt: skip
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning",
                                           http=http_protocol()))  # fmt: skip
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    url = f"http://127.0.0.1:{port}"
    deadline = time.time() + 240
    with httpx.Client(base_url=url, timeout=60) as client:
        while True:
            assert time.time() < deadline and thread.is_alive(), "server did not become ready"
            try:
                if client.get("/health").status_code == 200:
                    break
            except httpx.TransportError:
                pass
            time.sleep(0.2)
        yield client
    server.should_exit = True
    thread.join(timeout=15)
    monkeypatch.undo()
    torch.set_num_threads(num_threads)


def assert_real_model_healthy(client: httpx.Client) -> None:
    r = client.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": "Hi"}], "max_tokens": 2})
    assert r.status_code == 200, r.text
    assert client.get("/health").status_code == 200


plain_chats = bodies(VALID_CHAT, {}, {"messages": st.lists(st.fixed_dictionaries({
    "role": st.sampled_from(["system", "user", "assistant"]), "content": st.text(string.printable, max_size=40)}),
    min_size=1, max_size=3)})  # fmt: skip
real_model_cases = st.one_of(st.tuples(st.just("/v1/chat/completions"), chat_bodies.map(clamp_for_real_model)),
                             st.tuples(st.just("/v1/chat/completions"), plain_chats.map(clamp_for_real_model)),
                             st.tuples(st.just("/v1/completions"), completion_bodies.map(clamp_for_real_model)),
                             raw_bodies(short=True))  # fmt: skip


@pytest.mark.slow
def test_real_model_sample(real_server):
    """50 generated cases (chat and completions bodies, raw JSON texts) against SmolLM2 behind uvicorn."""
    count = 0

    @fuzz_settings(50)
    @given(case=real_model_cases)
    def case(case):
        nonlocal count
        count += 1
        if isinstance(case, bytes):
            path, _, content = case.partition(b"\n")
            path = path.decode()
        else:
            path, content = case[0], encode_body(case[1])
        r = real_server.post(path, content=content, headers={"content-type": "application/json"})
        assert_completion_sane(r, False)
        if count % 25 == 0:
            assert_real_model_healthy(real_server)

    case()
    assert count >= 50
    assert_real_model_healthy(real_server)
