"""Regression tests for requests that used to get a 500 (or a wrong 200), and for work that used to block the event
loop: template kwargs that collide with the template's own names or nest deeply, lone surrogates, tool_choice without
the tool, malformed Content-Length, a huge prompt's tokenization and a runaway chat template.
"""

from __future__ import annotations

import json
import socket
import threading
import time

import httpx
import pytest
from fastapi.testclient import TestClient
from test_api_fake import REPLY, FakeEngine, FakeTokenizer, make_app

from hearth.api.app import create_app
from hearth.api.errors import http_protocol
from hearth.chat.template import ChatTemplate, TemplateError, load_chat_template
from hearth.engine.protocol import EngineError

HI = [{"role": "user", "content": "Hi"}]
# seconds for /health while a heavy request is in flight: a liveness check, not a benchmark. Tokenized on the event
# loop, or with the GIL held, the 3.6 MB prompt stalls /health 1.3-2.3 s; 1 s leaves room for a busy machine
LIVENESS_BOUND = 1.0


def assert_error(r: httpx.Response, status: int = 400, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    error = r.json()["error"]
    assert set(error) == {"message", "type", "param", "code"} and error["message"]
    if param is not None:
        assert error["param"] == param, error
    return error


@pytest.fixture
def client():
    with TestClient(make_app(FakeEngine())) as c:
        yield c


@pytest.fixture(scope="module")
def real_tokenizer():
    from hearth.loader.resolve import embedded_model_path
    from hearth.tokenizer import load_tokenizer

    return load_tokenizer(embedded_model_path())


def post_raw(client: TestClient, path: str, text: str) -> httpx.Response:
    return client.post(path, content=text.encode("utf-8", "surrogatepass"), headers={"content-type": "application/json"})


# --- 500s that should be 400s ---------------------------------------------------------------------------------------


@pytest.mark.parametrize("name", ["messages", "tools", "add_generation_prompt", "reasoning_effort", "bos_token",
                                  "raise_exception", "namespace", "tokenizer"])  # fmt: skip
def test_chat_template_kwargs_colliding_with_the_templates_own_names_are_400(client, name):
    r = client.post("/v1/chat/completions", json={"messages": HI, "chat_template_kwargs": {name: 1}})
    error = assert_error(r, 400, f"chat_template_kwargs.{name}")
    assert repr(name) in error["message"]
    r = client.post("/v1/chat/completions", json={"messages": HI, "chat_template_kwargs": {"enable_thinking": False}})
    assert r.status_code == 200, r.text


@pytest.mark.parametrize("field", ["chat_template_kwargs", "tools"])
@pytest.mark.parametrize("kind", ["object", "array"])
def test_deeply_nested_values_are_400(client, field, kind):
    def nest(depth: int) -> object:
        value: object = 1
        for _ in range(depth):
            value = {"a": value} if kind == "object" else [value]
        return value

    def body(depth: int) -> dict:
        if field == "tools":
            return {
                "messages": HI,
                "tools": [{"type": "function", "function": {"name": "f", "parameters": {"x": nest(depth)}}}],
            }
        return {"messages": HI, "chat_template_kwargs": {"x": nest(depth)}}

    error = assert_error(client.post("/v1/chat/completions", json=body(500)))
    assert error["param"].startswith(field) and "nested more than 64 levels" in error["message"]
    assert client.post("/v1/chat/completions", json=body(20)).status_code == 200


@pytest.mark.parametrize(("path", "text", "param"), [
    ("/v1/chat/completions", '{"messages":[{"role":"user","content":"a\\ud800b"}]}', "messages[0].content"),
    ("/v1/chat/completions", '{"messages":[{"role":"user","content":[{"type":"text","text":"\\udfff"}]}]}',
     "messages[0].content[0].text"),
    ("/v1/chat/completions", '{"messages":[{"role":"user","content":"Hi"}],"chat_template_kwargs":{"\\ud800":1}}',
     "chat_template_kwargs.\\ud800"),
    ("/v1/completions", '{"prompt":"\\ud800"}', "prompt"),
    ("/v1/completions", '{"prompt":["ok","\\udbff"]}', "prompt[1]"),
    ("/v1/completions", '{"prompt":"Hi","stop":["\\ud800"]}', "stop[0]"),
])  # fmt: skip
def test_lone_surrogates_are_400(real_tokenizer, path, text, param):
    # the real tokenizer: it refuses such strings with a TypeError, which used to surface as a 500
    with TestClient(create_app(FakeEngine(), real_tokenizer, load_chat_template(real_tokenizer), "fake-model")) as c:
        error = assert_error(post_raw(c, path, text), 400, param)
        assert "surrogate" in error["message"]
        pair = post_raw(c, "/v1/chat/completions", '{"messages":[{"role":"user","content":"\\ud83d\\ude00"}]}')
        assert pair.status_code == 200, pair.text  # a surrogate pair is just an emoji


@pytest.mark.parametrize("text", ['{"messages":[{"role":"user","content":"Hi"}],"temperature":NaN}',
                                  '{"messages":[{"role":"user","content":"Hi"}],"top_p":Infinity}',
                                  '{"messages":[{"role":"user","content":"Hi"}],"chat_template_kwargs":{"x":-Infinity}}',
                                  '{"messages":[{"role":"user","content":"Hi"}],"presence_penalty":1e999}'])  # fmt: skip
def test_nan_and_infinity_are_400(client, text):
    error = assert_error(post_raw(client, "/v1/chat/completions", text))
    assert "finite" in error["message"]


@pytest.mark.parametrize("value", [2**64, 10**30, -(2**70)])
@pytest.mark.parametrize("field", ["max_tokens", "n", "top_k", "top_logprobs", "max_completion_tokens"])
def test_integers_beyond_64_bits_are_4xx(client, field, value):
    r = client.post("/v1/chat/completions", json={"messages": HI, field: value})
    if field == "top_k" and value > 0:  # a top_k past the vocabulary is allowed: it keeps every token
        assert r.status_code == 200, r.text
    else:
        assert_error(r)


def tools(*names: str) -> list[dict]:
    return [{"type": "function", "function": {"name": n, "parameters": {"type": "object"}}} for n in names]


def test_tool_choice_naming_a_tool_that_is_not_in_tools_is_400(client):
    body = {"messages": HI, "tools": tools("f"), "tool_choice": {"type": "function", "function": {"name": "g"}}}
    error = assert_error(client.post("/v1/chat/completions", json=body), 400, "tool_choice")
    assert "'g'" in error["message"]


@pytest.mark.parametrize("choice", ["required", {"type": "function", "function": {"name": "f"}}])
@pytest.mark.parametrize("given", [None, []])
def test_tool_choice_required_or_named_without_tools_is_400(client, choice, given):
    body = {"messages": HI, "tool_choice": choice} | ({} if given is None else {"tools": given})
    assert_error(client.post("/v1/chat/completions", json=body), 400, "tool_choice")


def test_a_named_tool_choice_offers_only_that_tool():
    source = "{% for t in tools or [] %}[{{ t.function.name }}]{% endfor %}{% for m in messages %}{{ m.content }}{% endfor %}"
    engine = FakeEngine()
    with TestClient(create_app(engine, FakeTokenizer(), ChatTemplate(source), "fake-model")) as c:
        body = {"messages": HI, "tools": tools("f", "g"), "tool_choice": {"type": "function", "function": {"name": "g"}}}
        assert c.post("/v1/chat/completions", json=body).status_code == 200
        assert c.post("/v1/chat/completions", json=body | {"tool_choice": "auto"}).status_code == 200
        assert c.post("/v1/chat/completions", json=body | {"tool_choice": "none"}).status_code == 200
    prompts = [FakeTokenizer().decode(ids) for ids, _, _ in engine.calls]
    assert prompts == ["[g]Hi", "[f][g]Hi", "Hi"]


def test_a_sampling_params_value_error_is_400_in_chat_and_completions(client, monkeypatch):
    import hearth.api.fanout as fanout

    def refuse(**kwargs):
        raise ValueError("seed must fit in 64 bits")

    monkeypatch.setattr(fanout, "SamplingParams", refuse)
    for path, body in (("/v1/chat/completions", {"messages": HI}), ("/v1/completions", {"prompt": "Hi"})):
        error = assert_error(client.post(path, json=body))
        assert error["message"] == "seed must fit in 64 bits"


@pytest.mark.parametrize("length", [b"abc", b"-1", b"+5", b" 5", b"1_0", b"0x10", b"5.0", b"\xd9\xa3", b""])
def test_malformed_content_length_is_400_in_the_error_shape(client, length):
    headers = [(b"content-length", length), (b"content-type", b"application/json")]
    r = client.post("/v1/completions", content=b'{"prompt":"Hi"}', headers=headers)
    assert assert_error(r)["code"] == "invalid_content_length"


def test_conflicting_content_lengths_are_400(client):
    body = b'{"prompt":"Hi"}'
    headers = [(b"content-length", str(len(body)).encode()), (b"content-length", b"3"),
               (b"content-type", b"application/json")]  # fmt: skip
    assert assert_error(client.post("/v1/completions", content=body, headers=headers))["code"] == "invalid_content_length"


def raw_http(port: int, request: bytes) -> tuple[int, dict[str, str], bytes]:
    with socket.create_connection(("127.0.0.1", port), timeout=10) as s:
        s.sendall(request)
        data = b""
        while chunk := s.recv(65536):
            data += chunk
    head, _, body = data.partition(b"\r\n\r\n")
    lines = head.decode("latin-1").split("\r\n")
    headers = dict(line.split(": ", 1) for line in lines[1:])
    return int(lines[0].split()[1]), {k.lower(): v for k, v in headers.items()}, body


@pytest.fixture
def uvicorn_port():
    import uvicorn

    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    server = uvicorn.Server(uvicorn.Config(make_app(FakeEngine()), host="127.0.0.1", port=port, log_level="critical",
                                           http=http_protocol()))  # fmt: skip
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 30
    while not server.started:
        assert time.time() < deadline and thread.is_alive()
        time.sleep(0.02)
    yield port
    server.should_exit = True
    thread.join(timeout=10)


@pytest.mark.parametrize("length", [b"abc", b"-1", b"5, 6", b"1e3"])
def test_malformed_content_length_over_http_gets_the_error_shape_not_plain_text(uvicorn_port, length):
    # uvicorn's HTTP parser refuses these before the app sees them; `hearth serve` gives it http_protocol()
    request = (b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
               b"Content-Length: " + length + b"\r\n\r\n{}")  # fmt: skip
    status, headers, body = raw_http(uvicorn_port, request)
    assert status == 400 and headers["content-type"] == "application/json"
    error = json.loads(body)["error"]
    assert error["type"] == "invalid_request_error" and error["message"].startswith("invalid HTTP request")
    ok = b'{"prompt":"Hi"}'
    request = (b"POST /v1/completions HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\nConnection: close"
               b"\r\nContent-Length: " + str(len(ok)).encode() + b"\r\n\r\n" + ok)  # fmt: skip
    status, _, body = raw_http(uvicorn_port, request)
    assert status == 200 and json.loads(body)["choices"][0]["text"] == REPLY


def test_too_many_prompts_times_n_is_400(client):
    r = client.post("/v1/completions", json={"prompt": ["Hi"] * 100, "n": 2})
    assert_error(r, 400, "prompt")
    assert client.post("/v1/completions", json={"prompt": ["Hi"] * 8, "n": 2}).status_code == 200


class VocabCheckingEngine(FakeEngine):
    """Refuses prompt token ids outside the vocabulary, as the real engine does."""

    def __init__(self, vocab: int) -> None:
        super().__init__()
        self.vocab = vocab

    async def generate(self, prompt_ids, params, request_id):
        if any(not 0 <= t < self.vocab for t in prompt_ids):
            raise EngineError(f"prompt token ids must be between 0 and {self.vocab - 1}", 400, "prompt")
        async for delta in super().generate(prompt_ids, params, request_id):
            yield delta


@pytest.mark.parametrize("ids", [[-1], [2**40], [1, 2**32 + 5]])
def test_echo_of_token_ids_outside_the_vocabulary_is_400(real_tokenizer, ids):
    # the ids used to be decoded for the echo before the engine checked them: the tokenizer's OverflowError was a 500
    engine = VocabCheckingEngine(real_tokenizer.vocab_size)
    with TestClient(create_app(engine, real_tokenizer, None, "fake-model")) as c:
        assert_error(c.post("/v1/completions", json={"prompt": ids, "echo": True}), 400, "prompt")


# --- limits of a chat template render -------------------------------------------------------------------------------

RUNAWAY = "{% for i in range(99999) %}{% for j in range(99999) %}{% endfor %}{% endfor %}{{ messages[0].content }}"


@pytest.mark.parametrize(("source", "limits", "reason"), [
    (RUNAWAY, {"max_loop_iterations": 100_000}, "limit of 100000 loop iterations"),
    ("{% for i in range(99999) %}{% for j in range(99999) %}{{ j }}{% endfor %}{% endfor %}",
     {"max_output_chars": 100_000}, "output exceeded its limit of 100000 characters"),
    ("{% for i in range(99999) %}{% set ns = namespace(s=range(99999)|join) %}{% endfor %}", {"time_limit": 0.5},
     "time limit of 0.5 s"),
    ("{% macro f(n) %}{% for i in range(99999) %}{{ f(n) }}{% endfor %}{% endmacro %}{{ f(0) }}", {}, "too deeply"),
    ("{% macro f(n) %}{{ f(n + 1) }}{% endmacro %}{{ f(0) }}", {}, "too deeply nested"),
    ("{{ 'x' * 10**9 }}", {}, "larger than its limit"),
    ("{{ [0] * 1000000000 }}", {}, "larger than its limit"),
    ("{{ 2 ** 100000000 }}", {}, "larger than 65536 bits"),
    ("{{ '%100000d' % 1 }}", {"max_output_chars": 1000}, "wider than its limit of 1000"),
    ("{{ '%*d' % (100000, 1) }}", {"max_output_chars": 1000}, "width or count of 100000"),
    ("{{ '{:>100000}'.format(1) }}", {"max_output_chars": 1000}, "wider than its limit of 1000"),
    ("{{ '{:>{w}}'.format(1, w=100000) }}", {"max_output_chars": 1000}, "width or count of 100000"),
    ("{{ '%100000d'|format(1) }}", {"max_output_chars": 1000}, "wider than its limit of 1000"),
    ("{{ 'x'.center(100000) }}", {"max_output_chars": 1000}, "width or count of 100000"),
    ("{{ 'x'.zfill(100000) }}", {"max_output_chars": 1000}, "width or count of 100000"),
    ("{{ 'x'|center(100000) }}", {"max_output_chars": 1000}, "width or count of 100000"),
    ("{{ [1]|slice(100000)|list }}", {"max_output_chars": 1000}, "width or count of 100000"),
])  # fmt: skip
def test_runaway_templates_stop_inside_the_render(source, limits, reason):
    # the other limits are far off (a minute), so the one named is the one that stops the render
    with pytest.raises(TemplateError, match=reason):
        ChatTemplate(source, **{"time_limit": 60.0, **limits}).render(HI)


def test_template_limits_leave_ordinary_loops_alone():
    source = ("{% for m in messages if m.role == 'user' %}{{ loop.index }}/{{ loop.length }}:{{ m.content }}"
              "{% if loop.last %}.{% endif %}{% else %}none{% endfor %}{% for k, v in {'a': 1}.items() %}{{ k }}{{ v }}"
              "{% endfor %}{% for x in [] %}{% else %}E{% endfor %}")  # fmt: skip
    messages = HI + [{"role": "assistant", "content": "Yo"}, {"role": "user", "content": "Bye"}]
    assert ChatTemplate(source).render(messages) == "1/2:Hi2/2:Bye.a1E"
    formats = (
        "{{ '%5d|%s' % (3, 'a') }} {{ '{} {}'.format(1, 10**20) }} {{ 'x'|center(5) }} {{ '%s'|format(10**20) }}"
        " {{ (10**20)|string }} {{ [1, 2, 3]|slice(2)|list }} {{ 7 % 3 }} {{ 'ab'|indent(2, first=true) }}"
    )
    assert ChatTemplate(formats).render(HI) == (
        "    3|a 1 100000000000000000000   x   100000000000000000000 100000000000000000000 [[1, 2], [3]] 1   ab"
    )
    limited = ChatTemplate("{% for i in range(10) %}{{ i }}{% endfor %}", max_loop_iterations=9)
    with pytest.raises(TemplateError, match="limit of 9 loop iterations"):
        limited.render(HI)
    with pytest.raises(TemplateError, match="output exceeded"):
        ChatTemplate("{% for i in range(10) %}{{ i }}{% endfor %}", max_output_chars=5).render(HI)


# --- the event loop stays free ----------------------------------------------------------------------------------------


def prep_threads() -> list[threading.Thread]:
    return [t for t in threading.enumerate() if t.name.startswith("hearth-prep")]


def thread_cpu(thread: threading.Thread) -> float:
    return time.clock_gettime(time.pthread_getcpuclockid(thread.ident))


def health_latencies_while(c: TestClient, send) -> tuple[list[float], httpx.Response]:
    """Sends a request in a thread and times /health until it is answered: (latencies while in flight, response)."""
    result: dict = {}
    worker = threading.Thread(target=lambda: result.setdefault("r", send()))
    worker.start()
    latencies = []
    while worker.is_alive():
        start = time.monotonic()
        r = c.get("/health")
        elapsed = time.monotonic() - start
        assert r.status_code == 200
        if worker.is_alive():
            latencies.append(elapsed)
        time.sleep(0.02)
    worker.join()
    return latencies, result["r"]


@pytest.mark.serial  # LIVENESS_BOUND holds on an otherwise idle machine, not beside a parallel test
@pytest.mark.parametrize("endpoint", ["completions", "chat"])
def test_a_huge_prompts_tokenization_leaves_health_answering(real_tokenizer, endpoint):
    text = "hello world, this is a test of tokenization. " * 80_000  # 3.6 MB, about 800,000 tokens
    app = create_app(FakeEngine(), real_tokenizer, load_chat_template(real_tokenizer), "fake-model",
                     max_body_bytes=8 * 1024 * 1024)  # fmt: skip
    with TestClient(app) as c:
        if endpoint == "chat":
            send = lambda: c.post("/v1/chat/completions", json={"messages": [{"role": "user", "content": text}]})  # noqa: E731
        else:
            send = lambda: c.post("/v1/completions", json={"prompt": text})  # noqa: E731
        latencies, r = health_latencies_while(c, send)
    assert r.json()["error"]["code"] == "context_length_exceeded"
    assert latencies, "the request finished before /health could be asked"
    assert max(latencies) < LIVENESS_BOUND, latencies


@pytest.mark.serial
def test_a_runaway_template_is_400_leaves_health_answering_and_stops_its_thread():
    engine = FakeEngine()
    with TestClient(create_app(engine, FakeTokenizer(), ChatTemplate(RUNAWAY), "fake-model")) as c:
        latencies, r = health_latencies_while(c, lambda: c.post("/v1/chat/completions", json={"messages": HI}))
        error = assert_error(r, 400, "messages")
        assert error["message"].startswith("chat template exceeded its")
        assert latencies and max(latencies) < LIVENESS_BOUND, latencies
        # the render stopped itself: no worker thread keeps burning CPU after the answer
        threads = prep_threads()
        assert threads
        before = [thread_cpu(t) for t in threads]
        time.sleep(0.5)
        after = [thread_cpu(t) for t in threads]
        assert max(b - a for a, b in zip(before, after, strict=True)) < 0.05
        assert c.post("/v1/completions", json={"prompt": "Hi"}).status_code == 200
    assert not engine.calls[:-1]  # only the plain completion reached the engine
