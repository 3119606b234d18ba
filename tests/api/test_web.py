"""The web chat page in a real browser: headless Debian chromium driven by Playwright, against `hearth serve`'s app on
SmolLM2 under uvicorn (one torch thread), and against a scripted server for reasoning output and API keys.
"""

from __future__ import annotations

import asyncio
import json
import os
import re
import socket
import threading
import time
from pathlib import Path

import httpx
import pytest
import torch

from hearth.api.app import STATIC_DIR, create_app
from hearth.chat.template import ChatTemplate
from hearth.config import EngineConfig
from hearth.engine.protocol import Delta, EngineStats, ModelInfo
from hearth.sampling_params import SamplingParams

playwright_api = pytest.importorskip("playwright.sync_api")

MODEL = "smollm2"
CHROMIUM = "/usr/bin/chromium"
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-background-networking", "--disable-component-update",
                 "--disable-sync", "--no-first-run"]  # fmt: skip
ARTIFACTS = Path(__file__).resolve().parents[2] / "test-artifacts"
TIMEOUT_MS = 30_000

pytestmark = [
    pytest.mark.slow,
    pytest.mark.serial,  # chromium's processes would compete with a parallel test for the two cores
    pytest.mark.skipif(not os.path.exists(CHROMIUM), reason="needs Debian's chromium (make test installs it)"),
]


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def serve(app) -> tuple[str, object, threading.Thread]:
    """Run `app` under uvicorn on a free loopback port in a daemon thread; returns (url, server, thread)."""
    import uvicorn

    port = free_port()
    uv = uvicorn.Server(uvicorn.Config(app, host="127.0.0.1", port=port, log_level="warning"))
    thread = threading.Thread(target=uv.run, daemon=True)
    thread.start()
    return f"http://127.0.0.1:{port}", uv, thread


def wait_until(check, timeout: float, what: str):
    deadline = time.time() + timeout
    while True:
        result = check()
        if result:
            return result
        assert time.time() < deadline, f"timed out waiting for {what}"
        time.sleep(0.05)


@pytest.fixture(scope="module")
def server():
    from hearth.cli.serve import build_app
    from hearth.loader.resolve import resolve_model

    num_threads = torch.get_num_threads()
    monkeypatch = pytest.MonkeyPatch()
    monkeypatch.setenv("HEARTH_NUM_THREADS", os.environ.get("HEARTH_NUM_THREADS", "1"))
    app, engine = build_app(resolve_model(MODEL), EngineConfig(max_model_len=1024, max_num_seqs=4))
    url, uv, thread = serve(app)

    def ready() -> bool:
        assert thread.is_alive(), "server died"
        try:
            return httpx.get(url + "/health", timeout=5).status_code == 200
        except httpx.TransportError:
            return False

    wait_until(ready, 240, "the server to load SmolLM2")
    yield url, engine
    uv.should_exit = True
    thread.join(timeout=15)
    monkeypatch.undo()
    torch.set_num_threads(num_threads)


@pytest.fixture(scope="module")
def browser():
    with playwright_api.sync_playwright() as p:
        b = p.chromium.launch(executable_path=CHROMIUM, args=CHROMIUM_ARGS)
        yield b
        b.close()


@pytest.fixture
def page(browser):
    """A fresh browser context per test: its own, empty localStorage."""
    context = browser.new_context(viewport={"width": 1100, "height": 720})
    context.set_default_timeout(TIMEOUT_MS)
    page = context.new_page()
    errors: list[str] = []
    page.on("pageerror", lambda e: errors.append(str(e)))
    page.errors = errors
    yield page
    context.close()
    assert not errors, errors


def open_page(page, url: str, max_tokens: int) -> None:
    page.goto(url + "/")
    page.wait_for_selector("#model option", state="attached")
    page.click("#settings-toggle")
    page.fill("#temperature", "0")
    page.fill("#max-tokens", str(max_tokens))
    page.click("#settings-toggle")


def send(page, text: str) -> None:
    page.fill("#prompt", text)
    page.press("#prompt", "Enter")


def last_answer(page):
    return page.locator(".message.assistant").last


def wait_idle(engine, timeout: float):
    def idle():
        stats = engine.stats
        return stats.num_running == 0 and stats.num_waiting == 0 and stats.kv_cache_usage == 0.0

    wait_until(idle, timeout, "the engine to free the request")


def test_page_streams_an_answer(server, page):
    url, engine = server
    requests: list[str] = []
    page.on("request", lambda r: requests.append(r.url))
    open_page(page, url, max_tokens=24)
    assert page.locator("#model").input_value() == MODEL
    # Shift+Enter is a new line, not a send
    page.fill("#prompt", "one")
    page.press("#prompt", "Shift+Enter")
    page.type("#prompt", "two")
    assert page.input_value("#prompt") == "one\ntwo" and page.locator(".message").count() == 0
    # record every length the answer takes on its way, to see it stream in rather than arrive at once
    page.evaluate("""() => {
        window.answerLengths = new Set();
        new MutationObserver(() => {
            const body = [...document.querySelectorAll('.message.assistant .body')].pop();
            if (body) window.answerLengths.add(body.textContent.length);
        }).observe(document.getElementById('messages'), {childList: true, subtree: true, characterData: true});
    }""")
    # a long answer (24 tokens): a short one streams in a few milliseconds, which the page may paint in one or two frames
    question = "Tell me a story about a dragon."
    send(page, question)
    answer = last_answer(page)
    page.wait_for_function("document.querySelector('.message.assistant .stats')?.textContent.includes('tokens/s')")
    text = answer.locator(".body").inner_text()
    assert text.strip()
    assert len(page.evaluate("[...window.answerLengths].filter(n => n > 0)")) >= 3, "the answer did not stream"
    stats = answer.locator(".stats").inner_text()
    assert re.search(r"^\d+ tokens · [\d.]+ tokens/s · first token \d+ ms · (stop|length)$", stats), stats
    assert page.locator(".message.user .body").inner_text() == question
    assert page.locator("#chat-title").inner_text() == question
    assert page.locator("#send").is_visible() and not page.locator("#stop").is_visible()
    assert page.evaluate("document.activeElement.id") == "prompt"
    # a second turn sends the first one as history
    send(page, "And of Italy?")
    page.wait_for_function("document.querySelectorAll('.message.assistant .stats:not(:empty)').length === 2")
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "web-chat.png"))
    # every request the page made went to Hearth itself
    outside = [r for r in requests if not (r.startswith(url + "/") or r.startswith("data:"))]
    assert not outside and any(r.endswith("/v1/chat/completions") for r in requests), requests


def test_stop_frees_the_request(server, page):
    url, engine = server
    open_page(page, url, max_tokens=900)
    send(page, "Write a long story about a dragon who learns to bake bread. Make it very long and detailed.")
    page.wait_for_function("document.querySelector('.message.assistant .body')?.textContent.length > 0")
    assert page.locator("#stop").is_visible() and not page.locator("#send").is_visible()
    assert engine.stats.num_running == 1  # still generating: 900 tokens take far longer than this
    page.click("#stop")
    wait_idle(engine, timeout=5)
    stats = last_answer(page).locator(".stats")
    stats.filter(has_text="stopped").wait_for()
    assert re.search(r"tokens · .* · stopped$", stats.inner_text())
    assert page.locator("#send").is_visible() and not page.locator("#stop").is_visible()
    partial = last_answer(page).locator(".body").inner_text()
    time.sleep(0.3)
    assert last_answer(page).locator(".body").inner_text() == partial
    assert "hearth_num_requests_running 0.0" in httpx.get(url + "/metrics").text
    # Escape stops too
    send(page, "Now write another long story, about a cat who learns to sail.")
    page.wait_for_function("document.querySelectorAll('.message.assistant .body')[1]?.textContent.length > 0")
    page.keyboard.press("Escape")
    wait_idle(engine, timeout=5)
    last_answer(page).locator(".stats", has_text="stopped").wait_for()


def test_conversations_kept_renamed_deleted(server, page):
    url, engine = server
    open_page(page, url, max_tokens=4)
    send(page, "Hello there")
    page.wait_for_selector(".message.assistant .stats:not(:empty)")
    page.click("#new-chat")
    send(page, "Name a color")
    page.wait_for_selector(".message.assistant .stats:not(:empty)")
    page.reload()
    titles = page.locator("#conversations .open")
    titles.first.wait_for()
    assert titles.all_inner_texts() == ["Name a color", "Hello there"]
    assert page.locator(".message.user .body").inner_text() == "Name a color"  # the current one is reopened
    # the settings were kept too
    assert page.input_value("#max-tokens") == "4" and page.input_value("#temperature") == "0"
    page.click("#conversations .open >> text=Hello there")
    assert page.locator(".message.user .body").inner_text() == "Hello there"
    assert page.locator(".message.assistant .body").inner_text().strip()
    page.click("[aria-label='Rename \"Hello there\"']")
    page.fill("#conversations input.rename", "Greetings")
    page.press("#conversations input.rename", "Enter")
    assert page.locator("#chat-title").inner_text() == "Greetings"
    page.once("dialog", lambda d: d.accept())
    page.click("[aria-label='Delete \"Name a color\"']")
    page.reload()
    page.locator("#conversations .open").first.wait_for()
    assert page.locator("#conversations .open").all_inner_texts() == ["Greetings"]


# --- the app over a scripted engine: R1-style reasoning output, API keys required -----------------------------------

REASONING = "The user asks for a haiku. Count five, seven, five."
ANSWER = "# Haiku\n\nEmbers **glow** softly\n\n```python\nprint('warm')  # hearth\n```\n"
# R1-style: the generation prompt opens the thought, so the output starts inside it; the effort is rendered to be seen
TEMPLATE = ("{% for m in messages %}<|{{ m.role }}|>{{ m.content }}\n{% endfor %}"
            "{% if add_generation_prompt %}<|assistant|>effort={{ reasoning_effort | default('none') }}<think>\n"
            "{% endif %}")  # fmt: skip


class CharTokenizer:
    bos_token, eos_token, eos_token_ids, chat_template = "", "", [2], None

    def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return [ord(c) for c in text]

    def decode(self, ids: list[int], skip_special_tokens: bool = True) -> str:
        return "".join(map(chr, ids))


class ScriptedEngine:
    """Replies REASONING</think>ANSWER a few characters per token, slowly enough to be seen streaming."""

    def __init__(self) -> None:
        self.state = "ready"
        self.model_info = ModelInfo("scripted", 4096, "Qwen2ForCausalLM")
        self.stats = EngineStats()
        self.calls: list[tuple[str, SamplingParams]] = []

    async def generate(self, prompt_ids: list[int], params: SamplingParams, request_id: str):
        self.calls.append(("".join(map(chr, prompt_ids)), params))
        text = f"{REASONING}</think>\n\n{ANSWER}"
        pieces = [text[i : i + 4] for i in range(0, len(text), 4)]
        for k, piece in enumerate(pieces):
            await asyncio.sleep(0.02)
            last = k + 1 == len(pieces)
            yield Delta(request_id, [ord(piece[0])], piece, None, last, "stop" if last else None, len(prompt_ids),
                        0, k + 1)  # fmt: skip

    async def abort(self, request_id: str) -> None:
        pass


@pytest.fixture(scope="module")
def scripted(tmp_path_factory):
    from hearth.governance.keys import KeyStore, create_key

    home = str(tmp_path_factory.mktemp("hearth-home"))
    key, _ = create_key("web-test", home=home)
    engine = ScriptedEngine()
    # named like gpt-oss so the page offers reasoning effort (its cue when /v1/models cards carry no capabilities)
    app = create_app(engine, CharTokenizer(), ChatTemplate(TEMPLATE), "gpt-oss-scripted", keys=KeyStore(home),
                     require_key=True)  # fmt: skip
    url, uv, thread = serve(app)
    wait_until(lambda: _answers(url), 30, "the scripted server")
    yield url, key, engine
    uv.should_exit = True
    thread.join(timeout=15)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url + "/health", timeout=5).status_code == 200
    except httpx.TransportError:
        return False


def test_api_key_then_reasoning_block(scripted, page):
    url, key, engine = scripted
    page.goto(url + "/")
    # no key yet: /v1/models answers 401, so the settings open on the key field
    page.locator("#key-note").wait_for()
    assert page.locator("#settings").is_visible() and page.evaluate("document.activeElement.id") == "api-key"
    page.fill("#api-key", key)
    page.press("#api-key", "Tab")  # `change`: the page retries /v1/models with the key
    page.wait_for_selector("#model option[value='gpt-oss-scripted']", state="attached")
    assert page.locator("#effort-field").is_visible()
    page.select_option("#effort", "high")
    page.fill("#system", "Answer in verse.")
    send(page, "A haiku about a hearth, please")
    thinking = page.locator(".message.assistant details.reasoning")
    thinking.locator("summary", has_text="Thinking…").wait_for()
    assert thinking.get_attribute("open") is not None  # open while the thought streams
    page.locator(".message.assistant .stats", has_text="tokens/s").wait_for()
    assert thinking.locator(".thought").text_content() == REASONING
    assert thinking.locator("summary").inner_text() == "Reasoning"
    assert thinking.get_attribute("open") is None  # folded away once the answer began
    body = page.locator(".message.assistant .body")
    assert "Count five" not in body.inner_text()  # the thought is apart from the answer
    assert body.locator("h1").inner_text() == "Haiku" and body.locator("strong").inner_text() == "glow"
    assert body.locator("pre.code .tok-string").inner_text() == "'warm'"
    assert body.locator("pre.code .tok-comment").inner_text() == "# hearth"
    stats = page.locator(".message.assistant .stats").inner_text()
    assert re.search(r"^\d+ tokens · [\d.]+ tokens/s · first token \d+ ms · stop$", stats), stats
    thinking.locator("summary").click()
    assert thinking.locator(".thought").is_visible()
    ((prompt, params),) = engine.calls
    assert prompt == ("<|system|>Answer in verse.\n<|user|>A haiku about a hearth, please\n"
                      "<|assistant|>effort=high<think>\n")  # fmt: skip
    assert params.temperature == 0.7 and params.max_tokens == 512
    ARTIFACTS.mkdir(exist_ok=True)
    page.screenshot(path=str(ARTIFACTS / "web-chat-reasoning.png"))


def test_markdown_escapes_html(scripted, page):
    url, _, _ = scripted
    page.goto(url + "/")
    html = page.evaluate("""() => Markdown.render([
        '<img src=x onerror=alert(1)> *it* `<b>code</b>`',
        '[bad](javascript:alert(1)) [good](/docs)',
        '- one', '  - nested', '2. two',
    ].join('\\n'))""")
    assert "<img" not in html and "&lt;img src=x onerror=alert(1)&gt;" in html
    assert "<em>it</em>" in html and "<code>&lt;b&gt;code&lt;/b&gt;</code>" in html
    assert "javascript:" not in html.replace("[bad](javascript:alert(1))", "") and 'href="/docs"' in html
    assert "<ul><li>one<ul><li>nested</li></ul></li></ul>" in html and '<ol start="2"><li>two</li></ol>' in html


def test_assets_need_no_key_and_reference_no_outside_host(scripted):
    url, _, _ = scripted
    assert httpx.get(url + "/v1/models").status_code == 401
    index = httpx.get(url + "/").text
    assets = re.findall(r'(?:src|href)="([^"]+)"', index)
    assert sorted(assets) == ["#prompt", "/static/app.js", "/static/markdown.js", "/static/style.css", "data:,"]
    served = {}
    for name in assets:
        if name.startswith("/static/"):
            r = httpx.get(url + name)  # no key: the page must load before it can ask for one
            assert r.status_code == 200, name
            served[name] = r.text
    assert {p.name for p in STATIC_DIR.iterdir()} == {"index.html"} | {n.rsplit("/", 1)[1] for n in served}
    for name, text in {"/": index, **served}.items():
        assert not re.search(r"[a-z]+://", text, re.IGNORECASE), name  # no absolute URL of any scheme
        assert not re.search(r"""(?:src|href|action)=["']?//|url\(\s*["']?//|@import""", text), name


def test_tool_calls_and_json_answers_are_shown(scripted, page):
    """The answer stream is replaced by a canned one (the route is intercepted): a thought, then two tool calls whose
    arguments arrive in pieces; then an answer that is JSON. Both are shown as they are, pretty-printed."""
    url, key, _ = scripted
    chunks = [{"reasoning_content": "Look it up."},
              {"tool_calls": [{"index": 0, "id": "c0", "type": "function",
                               "function": {"name": "get_weather", "arguments": '{"location": '}}]},
              {"tool_calls": [{"index": 0, "function": {"arguments": '"Oslo", "days": [1, 2]}'}}]},
              {"tool_calls": [{"index": 1, "id": "c1", "type": "function",
                               "function": {"name": "get_time", "arguments": "not json"}}]}]  # fmt: skip
    streams = [chunks, [{"content": '{"city": "Oslo", '}, {"content": '"sunny": true}'}]]

    def fulfill(route):
        deltas = streams.pop(0)
        events = [{"choices": [{"index": 0, "delta": d, "finish_reason": None}]} for d in deltas]
        events.append({"choices": [{"index": 0, "delta": {}, "finish_reason": "tool_calls" if streams else "stop"}]})
        body = "".join(f"data: {json.dumps(e)}\n\n" for e in events) + "data: [DONE]\n\n"
        route.fulfill(status=200, headers={"content-type": "text/event-stream"}, body=body)

    page.route("**/v1/chat/completions", fulfill)
    page.goto(url + "/")
    page.locator("#key-note").wait_for()
    page.fill("#api-key", key)
    page.press("#api-key", "Tab")
    page.wait_for_selector("#model option[value='gpt-oss-scripted']", state="attached")
    send(page, "Weather in Oslo?")
    calls = last_answer(page).locator(".tool-call")
    calls.nth(1).wait_for()
    assert calls.locator(".tool-name").all_inner_texts() == ["Tool call: get_weather", "Tool call: get_time"]
    assert calls.nth(0).locator("pre code").inner_text() == json.dumps({"location": "Oslo", "days": [1, 2]}, indent=2)
    assert calls.nth(1).locator("pre code").inner_text() == "not json"
    assert last_answer(page).locator("details.reasoning .thought").text_content() == "Look it up."
    page.locator(".message.assistant .stats", has_text="tool_calls").wait_for()
    send(page, "As JSON, please")
    code = page.locator(".message.assistant").nth(1).locator(".body pre.code.json code")
    code.wait_for()
    assert code.inner_text() == json.dumps({"city": "Oslo", "sunny": True}, indent=2)
    page.reload()  # kept in the conversation: shown the same after a reload
    page.locator(".message.assistant .tool-call").nth(1).wait_for()
