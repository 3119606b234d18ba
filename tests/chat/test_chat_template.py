"""ChatTemplate against transformers' apply_chat_template (SmolLM2, Llama-3-style, Qwen2-style), and the sandbox."""

from __future__ import annotations

import os

import pytest

from hearth.chat.template import CHATML_TEMPLATE, ChatTemplate, TemplateError, load_chat_template
from hearth.loader.resolve import embedded_model_path
from hearth.tokenizer import Tokenizer, load_tokenizer

# Llama-3.1-like: date header, tools as indented JSON in the system turn, one tool call per assistant turn.
LLAMA3_STYLE = """{{- bos_token }}
{%- if not date_string is defined %}
    {%- set date_string = strftime_now("%d %b %Y") %}
{%- endif %}
{%- if messages[0]['role'] == 'system' %}
    {%- set system_message = messages[0]['content'] | trim %}
    {%- set messages = messages[1:] %}
{%- else %}
    {%- set system_message = "" %}
{%- endif %}
{{- "<|start_header_id|>system<|end_header_id|>\\n\\n" }}
{{- "Today Date: " + date_string + "\\n\\n" }}
{%- if tools is not none %}
    {{- "You can call these functions. Answer with JSON {\\"name\\": ..., \\"parameters\\": ...}.\\n\\n" }}
    {%- for t in tools %}
        {{- t | tojson(indent=4) }}
        {{- "\\n\\n" }}
    {%- endfor %}
{%- endif %}
{{- system_message }}
{{- "<|eot_id|>" }}
{%- for message in messages %}
    {%- if message.role not in ['user', 'assistant', 'tool'] %}
        {{- raise_exception('Unknown role: ' + message.role) }}
    {%- endif %}
    {%- if message.role == 'assistant' and message.tool_calls is defined %}
        {%- if message.tool_calls | length != 1 %}
            {{- raise_exception("Only one tool call per message is supported.") }}
        {%- endif %}
        {%- set call = message.tool_calls[0].function %}
        {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
        {{- '{"name": "' + call.name + '", "parameters": ' + call.arguments | tojson + '}<|eot_id|>' }}
    {%- elif message.role == 'tool' %}
        {{- "<|start_header_id|>ipython<|end_header_id|>\\n\\n" }}
        {%- if message.content is mapping %}{{ message.content | tojson }}{% else %}{{ message.content }}{% endif %}
        {{- "<|eot_id|>" }}
    {%- else %}
        {{- '<|start_header_id|>' + message.role + '<|end_header_id|>\\n\\n' + message.content | trim + '<|eot_id|>' }}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|start_header_id|>assistant<|end_header_id|>\\n\\n' }}
{%- endif %}
"""

# Qwen2.5-like: tools listed in <tools>, calls in <tool_call>, consecutive tool results grouped in one user turn,
# an optional empty think block, and a reasoning-effort line.
QWEN2_STYLE = """{%- if tools %}
    {{- '<|im_start|>system\\n' }}
    {%- if messages[0].role == 'system' %}{{- messages[0].content }}{%- else %}You are a helpful assistant.{%- endif %}
    {{- "\\n\\n# Tools\\n\\n<tools>" }}
    {%- for tool in tools %}
        {{- "\\n" }}{{- tool | tojson(sort_keys=true, separators=(',', ':')) }}
    {%- endfor %}
    {{- "\\n</tools>\\n\\nCall a function as <tool_call>{\\"name\\": ..., \\"arguments\\": ...}</tool_call>" }}
    {{- "<|im_end|>\\n" }}
{%- elif messages[0].role == 'system' %}
    {{- '<|im_start|>system\\n' + messages[0].content + '<|im_end|>\\n' }}
{%- else %}
    {{- '<|im_start|>system\\nYou are a helpful assistant.<|im_end|>\\n' }}
{%- endif %}
{%- if reasoning_effort is defined %}
    {{- '<|im_start|>system\\nReasoning: ' + reasoning_effort + '<|im_end|>\\n' }}
{%- endif %}
{%- set ns = namespace(num_tool_calls=0) %}
{%- for message in messages %}
    {%- if message.role == 'system' %}
        {%- continue %}
    {%- endif %}
    {%- if message.role == 'user' or (message.role == 'assistant' and not message.tool_calls) %}
        {{- '<|im_start|>' + message.role + '\\n' + message.content + '<|im_end|>\\n' }}
    {%- elif message.role == 'assistant' %}
        {{- '<|im_start|>assistant' }}
        {%- if message.content %}{{- '\\n' + message.content }}{%- endif %}
        {%- for tool_call in message.tool_calls %}
            {%- set ns.num_tool_calls = ns.num_tool_calls + 1 %}
            {%- set f = tool_call.function if tool_call.function is defined else tool_call %}
            {{- '\\n<tool_call>\\n{"name": "' + f.name + '", "arguments": ' + f.arguments | tojson }}
            {{- '}\\n</tool_call>' }}
        {%- endfor %}
        {{- '<|im_end|>\\n' }}
    {%- elif message.role == 'tool' %}
        {%- if loop.first or loop.previtem.role != 'tool' %}{{- '<|im_start|>user' }}{%- endif %}
        {{- '\\n<tool_response>\\n' + message.content + '\\n</tool_response>' }}
        {%- if loop.last or loop.nextitem.role != 'tool' %}{{- '<|im_end|>\\n' }}{%- endif %}
    {%- else %}
        {{- raise_exception('unexpected role ' + message.role) }}
    {%- endif %}
    {%- if ns.num_tool_calls > 3 %}
        {{- raise_exception('too many tool calls') }}
        {%- break %}
    {%- endif %}
{%- endfor %}
{%- if add_generation_prompt %}
    {{- '<|im_start|>assistant\\n' }}
    {%- if enable_thinking is defined and not enable_thinking %}{{- '<think>\\n\\n</think>\\n\\n' }}{%- endif %}
{%- endif %}"""

WEATHER_TOOL = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "Current weather in a city — «unicode» ok",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string"}, "unit": {"type": "string", "enum": ["c", "f"]}},
            "required": ["city"],
        },
    },
}
TIME_TOOL = {"type": "function", "function": {"name": "now", "description": "time", "parameters": {}}}

CONVERSATIONS = [
    [{"role": "user", "content": "Hi!"}],
    [{"role": "system", "content": "You are terse."}, {"role": "user", "content": "What is 2+2?"}],
    [
        {"role": "system", "content": "Be kind."},
        {"role": "user", "content": "Hello"},
        {"role": "assistant", "content": "Hi, how can I help?"},
        {"role": "user", "content": "Tell me a joke."},
    ],
    [
        {"role": "user", "content": "你好，世界 🌍"},
        {"role": "assistant", "content": "¡Hola! Ça va? مرحبا"},
        {"role": "user", "content": "  spaces and\nnewlines\t "},
    ],
    [{"role": "user", "content": "one"}, {"role": "assistant", "content": "two"}],
    [{"role": "system", "content": ""}, {"role": "user", "content": ""}],
]

TOOL_CONVERSATION = [
    {"role": "system", "content": "You help with weather."},
    {"role": "user", "content": "Weather in Zürich?"},
    {
        "role": "assistant",
        "content": None,  # dropped before rendering, as transformers does
        "tool_calls": [{"type": "function", "function": {"name": "get_weather", "arguments": {"city": "Zürich"}}}],
    },
    {"role": "tool", "content": "12°C, cloudy"},
    {"role": "user", "content": "Thanks"},
]


@pytest.fixture(scope="module")
def tok() -> Tokenizer:
    return load_tokenizer(embedded_model_path())


@pytest.fixture(scope="module")
def hf_tok(tmp_path_factory: pytest.TempPathFactory):
    transformers = pytest.importorskip("transformers")
    folder = tmp_path_factory.mktemp("smollm2")
    os.symlink(embedded_model_path(), folder / "model.gguf")
    return transformers.AutoTokenizer.from_pretrained(str(folder), gguf_file="model.gguf")


def reference(hf_tok, messages, source=None, **kwargs) -> str:
    return hf_tok.apply_chat_template(messages, chat_template=source, tokenize=False, **kwargs)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("messages", CONVERSATIONS)
def test_smollm2_template_matches_transformers(tok: Tokenizer, hf_tok, messages, add_generation_prompt) -> None:
    template = load_chat_template(tok)
    ours = template.render(messages, add_generation_prompt=add_generation_prompt)
    assert ours == reference(hf_tok, messages, add_generation_prompt=add_generation_prompt)


@pytest.mark.parametrize("add_generation_prompt", [True, False])
@pytest.mark.parametrize("tools", [None, [WEATHER_TOOL, TIME_TOOL]])
@pytest.mark.parametrize("messages", [CONVERSATIONS[1], CONVERSATIONS[2], CONVERSATIONS[3], TOOL_CONVERSATION])
def test_llama3_style_matches_transformers(tok: Tokenizer, hf_tok, messages, tools, add_generation_prompt) -> None:
    template = ChatTemplate(LLAMA3_STYLE, tok.bos_token, tok.eos_token)
    ours = template.render(messages, add_generation_prompt=add_generation_prompt, tools=tools)
    theirs = reference(hf_tok, messages, LLAMA3_STYLE, add_generation_prompt=add_generation_prompt, tools=tools)
    assert ours == theirs
    assert "Today Date: " in ours and ours.startswith("<|im_start|>")


@pytest.mark.parametrize("kwargs", [{}, {"enable_thinking": False}, {"enable_thinking": True, "reasoning_effort": "high"}])
@pytest.mark.parametrize("tools", [None, [WEATHER_TOOL, TIME_TOOL]])
@pytest.mark.parametrize("messages", [CONVERSATIONS[0], CONVERSATIONS[2], TOOL_CONVERSATION])
def test_qwen2_style_matches_transformers(tok: Tokenizer, hf_tok, messages, tools, kwargs) -> None:
    template = ChatTemplate(QWEN2_STYLE, tok.bos_token, tok.eos_token)
    ours = template.render(messages, tools=tools, **kwargs)
    assert ours == reference(hf_tok, messages, QWEN2_STYLE, add_generation_prompt=True, tools=tools, **kwargs)


def test_tool_rendering_details() -> None:
    out = ChatTemplate(QWEN2_STYLE).render(TOOL_CONVERSATION, tools=[WEATHER_TOOL])
    assert '{"function":{"description":"Current weather in a city — «unicode» ok"' in out  # sort_keys, separators
    assert '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Zürich"}}\n</tool_call>' in out
    assert "<|im_start|>user\n<tool_response>\n12°C, cloudy\n</tool_response><|im_end|>" in out
    llama = ChatTemplate(LLAMA3_STYLE).render(TOOL_CONVERSATION, tools=[TIME_TOOL])
    assert '{\n    "type": "function",\n    "function": {\n        "name": "now"' in llama  # indent=4


def test_raise_exception_becomes_template_error() -> None:
    with pytest.raises(TemplateError, match="Unknown role: robot"):
        ChatTemplate(LLAMA3_STYLE).render([{"role": "robot", "content": "beep"}])
    calls = [{"function": {"name": "now", "arguments": {}}}] * 4
    with pytest.raises(TemplateError, match="too many tool calls"):
        ChatTemplate(QWEN2_STYLE).render([{"role": "assistant", "content": "", "tool_calls": calls}])
    assert isinstance(TemplateError("x"), ValueError)


def test_chatml_fallback(tok: Tokenizer) -> None:
    out = ChatTemplate(CHATML_TEMPLATE).render([{"role": "user", "content": "hi"}])
    assert out == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"
    assert load_chat_template(Tokenizer(tok.backend, chat_template=None)) is None


def test_syntax_error_is_template_error() -> None:
    with pytest.raises(TemplateError, match="compile"):
        ChatTemplate("{% for m in messages %}")


@pytest.mark.parametrize(
    "source",
    [
        "{{ ''.__class__.__mro__ }}",
        "{{ ''.__class__ }}",
        "{{ cycler.__init__.__globals__.os }}",
        "{{ joiner.__init__.__globals__ }}",
        "{{ namespace.__init__ }}",
        "{{ raise_exception.__globals__ }}",
        "{{ messages.__class__.__base__.__subclasses__() }}",
        "{{ (messages|attr('__class__')) }}",
        "{{ 'x'.upper.__self__ }}",
        "{% set ns = namespace(_x=1) %}",
        "{% set ns = namespace() %}{% set ns.__class__ = 1 %}",
        "{{ messages.append(1) }}",
        "{{ messages[0].update({'role': 'x'}) }}",
        "{{ lipsum.__globals__['os'].system('echo pwned') }}",
    ],
)
def test_sandbox_blocks_python_internals(source: str) -> None:
    with pytest.raises(TemplateError):
        ChatTemplate(source).render([{"role": "user", "content": "hi"}])
