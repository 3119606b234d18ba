// Hearth's web chat: conversations in localStorage, answers streamed from /v1/chat/completions (SSE over fetch),
// reasoning_content in a collapsible block, tool calls as labelled blocks and JSON answers pretty-printed, a stop
// button that aborts the request (the server then frees it).
"use strict";

const $ = (id) => document.getElementById(id);
const STORE = { chats: "hearth.conversations", current: "hearth.current", settings: "hearth.settings" };

const load = (key, fallback) => {
  try {
    return JSON.parse(localStorage.getItem(key)) ?? fallback;
  } catch {
    return fallback;
  }
};
const save = (key, value) => localStorage.setItem(key, JSON.stringify(value));

const state = {
  // [{id, title, updated, messages: [{role, content, reasoning?, toolCalls?: [{name, arguments}], stats?, error?}]}]
  chats: load(STORE.chats, []),
  currentId: load(STORE.current, null),
  settings: { system: "", temperature: 0.7, maxTokens: 512, effort: "", apiKey: "", model: "",
              ...load(STORE.settings, {}) },
  models: [],  // cards from /v1/models
  controller: null,  // the AbortController of the answer in flight
};

const current = () => state.chats.find((c) => c.id === state.currentId);
const saveChats = () => {
  save(STORE.chats, state.chats);
  save(STORE.current, state.currentId);
};
const newId = () => Date.now().toString(36) + Math.random().toString(36).slice(2, 8);

// --- conversations -------------------------------------------------------------------------------------------------

function newChat() {
  const chat = { id: newId(), title: "New conversation", updated: Date.now(), messages: [] };
  state.chats.unshift(chat);
  state.currentId = chat.id;
  saveChats();
  renderAll();
  $("prompt").focus();
}

function selectChat(id) {
  if (state.controller) return;  // finish or stop the current answer first
  state.currentId = id;
  saveChats();
  renderAll();
}

function deleteChat(id) {
  const chat = state.chats.find((c) => c.id === id);
  if (!chat || !confirm(`Delete "${chat.title}"?`)) return;
  state.chats = state.chats.filter((c) => c.id !== id);
  if (state.currentId === id) state.currentId = state.chats[0]?.id ?? null;
  saveChats();
  renderAll();
}

function startRename(li, chat) {
  const input = document.createElement("input");
  input.value = chat.title;
  input.className = "rename";
  input.setAttribute("aria-label", "Conversation name");
  li.replaceChildren(input);
  input.focus();
  input.select();
  let done = false;
  const finish = (keep) => {
    if (done) return;
    done = true;
    const title = input.value.trim();
    if (keep && title) chat.title = title;
    saveChats();
    renderAll();
  };
  input.addEventListener("keydown", (e) => {
    if (e.key === "Enter") finish(true);
    if (e.key === "Escape") finish(false);
  });
  input.addEventListener("blur", () => finish(true));
}

function renderConversations() {
  const ul = $("conversations");
  ul.replaceChildren();
  for (const chat of state.chats) {
    const li = document.createElement("li");
    li.className = chat.id === state.currentId ? "active" : "";
    const open = button(chat.title, "open", () => selectChat(chat.id));
    if (chat.id === state.currentId) open.setAttribute("aria-current", "true");
    const rename = button("✎", "icon", () => startRename(li, chat), `Rename "${chat.title}"`);
    const remove = button("✕", "icon", () => deleteChat(chat.id), `Delete "${chat.title}"`);
    li.append(open, rename, remove);
    ul.append(li);
  }
}

function button(text, className, onClick, label) {
  const b = document.createElement("button");
  b.type = "button";
  b.className = className;
  b.textContent = text;
  if (label) {
    b.setAttribute("aria-label", label);
    b.title = label;
  }
  b.addEventListener("click", onClick);
  return b;
}

// --- messages ------------------------------------------------------------------------------------------------------

function renderMessages() {
  const chat = current();
  $("chat-title").textContent = chat ? chat.title : "New conversation";
  const box = $("messages");
  box.replaceChildren();
  if (!chat || !chat.messages.length) {
    const empty = document.createElement("p");
    empty.className = "empty";
    empty.textContent = "Ask anything. The model runs on this machine; nothing leaves it.";
    box.append(empty);
    return;
  }
  for (const message of chat.messages) box.append(messageView(message).root);
  box.scrollTop = box.scrollHeight;
}

// One message's DOM, with an `update()` that re-renders it from the message object (called as the answer streams).
function messageView(message) {
  const root = document.createElement("article");
  root.className = `message ${message.role}`;
  const who = document.createElement("h3");
  who.className = "who";
  who.textContent = message.role === "user" ? "You" : "Assistant";
  const reasoning = document.createElement("details");
  reasoning.className = "reasoning";
  const summary = document.createElement("summary");
  const thought = document.createElement("div");
  thought.className = "thought";
  reasoning.append(summary, thought);
  const body = document.createElement("div");
  body.className = "body";
  const stats = document.createElement("p");
  stats.className = "stats";
  root.append(who, reasoning, body, stats);

  const update = () => {
    reasoning.hidden = !message.reasoning;
    summary.textContent = message.thinking ? "Thinking…" : "Reasoning";
    if (message.reasoning) thought.textContent = message.reasoning;
    if (message.role === "user") body.textContent = message.content;
    else if (jsonAnswer(message.content)) body.replaceChildren(codeBlock("json", jsonAnswer(message.content)));
    else body.innerHTML = Markdown.render(message.content || "");
    for (const call of message.toolCalls || []) body.append(toolCallView(call));
    if (message.error) {
      const err = document.createElement("p");
      err.className = "error";
      err.setAttribute("role", "alert");
      err.textContent = message.error;
      body.append(err);
    }
    stats.textContent = message.stats ? statsText(message.stats) : "";
  };
  update();
  return { root, update, reasoning };
}

// A whole answer that is a JSON object or array (a structured answer): pretty-printed, or null for anything else.
function jsonAnswer(text) {
  const trimmed = (text || "").trim();
  if (!/^[[{]/.test(trimmed)) return null;
  try {
    return JSON.stringify(JSON.parse(trimmed), null, 2);
  } catch {
    return null;  // not (yet) JSON: shown as Markdown
  }
}

function codeBlock(lang, text) {
  const pre = document.createElement("pre");
  pre.className = `code ${lang}`;
  const code = document.createElement("code");
  code.textContent = text;
  pre.append(code);
  return pre;
}

// A tool call the model made: its name, then its arguments pretty-printed (as sent when they are not JSON).
function toolCallView(call) {
  const box = document.createElement("div");
  box.className = "tool-call";
  const label = document.createElement("div");
  label.className = "tool-name";
  label.textContent = `Tool call: ${call.name}`;
  box.append(label, codeBlock("json", jsonAnswer(call.arguments) ?? call.arguments));
  return box;
}

function statsText(s) {
  const parts = [];
  if (s.tokens != null) parts.push(`${s.estimated ? "≈" : ""}${s.tokens} tokens`);
  if (s.tokensPerSecond != null) parts.push(`${s.tokensPerSecond.toFixed(1)} tokens/s`);
  if (s.ttft != null) parts.push(`first token ${(s.ttft * 1000).toFixed(0)} ms`);
  if (s.finish) parts.push(s.finish);
  return parts.join(" · ");
}

// --- the API -------------------------------------------------------------------------------------------------------

function headers() {
  const h = { "Content-Type": "application/json" };
  if (state.settings.apiKey) h.Authorization = `Bearer ${state.settings.apiKey}`;
  return h;
}

async function errorMessage(response) {
  try {
    const body = await response.json();
    return body.error?.message || JSON.stringify(body);
  } catch {
    return `${response.status} ${response.statusText}`;
  }
}

function needKey() {
  openSettings(true);
  $("key-note").hidden = false;
  $("api-key").focus();
}

async function loadModels() {
  const note = $("model-note");
  try {
    const response = await fetch("/v1/models", { headers: headers() });
    if (response.status === 401) {
      note.textContent = "API key needed";
      needKey();
      return;
    }
    if (!response.ok) throw new Error(await errorMessage(response));
    state.models = (await response.json()).data;
    note.textContent = "";
  } catch (e) {
    note.textContent = `Models unavailable: ${e.message}`;
    return;
  }
  const select = $("model");
  select.replaceChildren(...state.models.map((m) => new Option(m.id, m.id)));
  if (state.models.some((m) => m.id === state.settings.model)) select.value = state.settings.model;
  state.settings.model = select.value;
  showEffort();
}

// Reasoning effort is shown for models that take it: a card listing the capability, or gpt-oss by name.
function supportsEffort(card) {
  return Boolean(card && ((card.capabilities || []).includes("reasoning_effort") || /gpt-oss/i.test(card.id)));
}

function showEffort() {
  $("effort-field").hidden = !supportsEffort(state.models.find((m) => m.id === $("model").value));
}

// Yields the parsed JSON of each SSE `data:` event until [DONE].
async function* sseEvents(response) {
  const reader = response.body.pipeThrough(new TextDecoderStream()).getReader();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += value;
    let end;
    while ((end = buffer.search(/\r?\n\r?\n/)) >= 0) {
      const event = buffer.slice(0, end);
      buffer = buffer.slice(end).replace(/^\r?\n\r?\n/, "");
      const data = event.split(/\r?\n/).filter((l) => l.startsWith("data:")).map((l) => l.slice(5).trim()).join("\n");
      if (!data) continue;  // a comment (keep-alive)
      if (data === "[DONE]") return;
      yield JSON.parse(data);
    }
  }
}

function requestBody(chat) {
  const s = state.settings;
  const messages = [];
  if (s.system.trim()) messages.push({ role: "system", content: s.system });
  for (const m of chat.messages) {
    if (m.content) messages.push({ role: m.role, content: m.content });  // not failed or empty answers
  }
  const number = (v) => (String(v).trim() === "" || Number.isNaN(Number(v)) ? undefined : Number(v));
  const maxTokens = number(s.maxTokens);
  const body = {
    model: $("model").value || undefined,
    messages,
    stream: true,
    stream_options: { include_usage: true },
    temperature: number(s.temperature),
    max_tokens: maxTokens === undefined ? undefined : Math.max(1, Math.floor(maxTokens)),
  };
  if (!$("effort-field").hidden && s.effort) body.reasoning_effort = s.effort;
  return body;
}

async function send(text) {
  if (!current()) newChat();
  const chat = current();
  chat.messages.push({ role: "user", content: text });
  if (chat.title === "New conversation") chat.title = text.length > 40 ? `${text.slice(0, 40)}…` : text;
  const body = requestBody(chat);
  const answer = { role: "assistant", content: "", reasoning: "" };
  chat.messages.push(answer);
  chat.updated = Date.now();
  saveChats();
  renderAll();
  const view = messageView(answer);
  $("messages").lastElementChild.replaceWith(view.root);
  view.reasoning.open = true;

  const controller = new AbortController();
  state.controller = controller;
  setBusy(true);
  const started = performance.now();
  let firstToken = null;
  let numDeltas = 0;
  let usage = null;
  let finish = null;
  let pending = false;
  const redraw = () => {
    if (pending) return;
    pending = true;
    requestAnimationFrame(() => {
      pending = false;
      const box = $("messages");
      const atBottom = box.scrollHeight - box.scrollTop - box.clientHeight < 40;
      view.update();
      if (atBottom) box.scrollTop = box.scrollHeight;
    });
  };
  try {
    const response = await fetch("/v1/chat/completions", {
      method: "POST", headers: headers(), body: JSON.stringify(body), signal: controller.signal,
    });
    if (response.status === 401) needKey();
    if (!response.ok) throw new Error(await errorMessage(response));
    for await (const chunk of sseEvents(response)) {
      if (chunk.error) throw new Error(chunk.error.message);
      if (chunk.usage) usage = chunk.usage;
      const choice = chunk.choices?.[0];
      if (!choice) continue;
      const { content, reasoning_content: reasoning, tool_calls: calls } = choice.delta || {};
      if (content || reasoning || calls) {
        firstToken ??= performance.now();
        numDeltas++;
      }
      if (reasoning) {
        answer.reasoning += reasoning;
        answer.thinking = true;
      }
      if (content) {
        if (answer.thinking) view.reasoning.open = false;  // the answer began: fold the thought away
        answer.thinking = false;
        answer.content += content;
      }
      for (const call of calls || []) {  // streamed by index: the name first, the arguments in pieces
        answer.toolCalls ??= [];
        const slot = (answer.toolCalls[call.index ?? answer.toolCalls.length] ??= { name: "", arguments: "" });
        slot.name += call.function?.name || "";
        slot.arguments += call.function?.arguments || "";
        if (answer.thinking) view.reasoning.open = false;
        answer.thinking = false;
      }
      if (choice.finish_reason) finish = choice.finish_reason;
      redraw();
    }
  } catch (e) {
    if (e.name === "AbortError") finish = "stopped";
    else answer.error = e.message;
  } finally {
    const ended = performance.now();
    answer.thinking = false;
    if (firstToken !== null) {
      const tokens = usage ? usage.completion_tokens : numDeltas;
      const seconds = (ended - firstToken) / 1000;
      answer.stats = {
        tokens, estimated: !usage, ttft: (firstToken - started) / 1000, finish,
        tokensPerSecond: tokens > 1 && seconds > 0 ? (tokens - 1) / seconds : null,
      };
    } else if (finish) {
      answer.stats = { finish };
    }
    if (!answer.reasoning) delete answer.reasoning;
    state.controller = null;
    chat.updated = Date.now();
    saveChats();
    view.update();
    setBusy(false);
  }
}

function setBusy(busy) {
  $("send").hidden = busy;
  $("stop").hidden = !busy;
  $("messages").setAttribute("aria-busy", String(busy));
  document.body.classList.toggle("busy", busy);
  if (busy) $("stop").focus();
  else $("prompt").focus();
}

// --- settings ------------------------------------------------------------------------------------------------------

function openSettings(open) {
  $("settings").hidden = !open;
  $("settings-toggle").setAttribute("aria-expanded", String(open));
}

function bindSettings() {
  const fields = { system: "system", temperature: "temperature", "max-tokens": "maxTokens", effort: "effort",
                   "api-key": "apiKey" };
  for (const [id, key] of Object.entries(fields)) {
    $(id).value = state.settings[key];
    $(id).addEventListener("input", () => {
      state.settings[key] = $(id).value;
      save(STORE.settings, state.settings);
      if (key === "apiKey") $("key-note").hidden = true;
    });
  }
  $("api-key").addEventListener("change", () => {
    if (!state.models.length) loadModels();
  });
  $("model").addEventListener("change", () => {
    state.settings.model = $("model").value;
    save(STORE.settings, state.settings);
    showEffort();
  });
  $("settings").addEventListener("submit", (e) => e.preventDefault());
  $("settings-toggle").addEventListener("click", () => openSettings($("settings").hidden));
}

// --- wiring --------------------------------------------------------------------------------------------------------

function renderAll() {
  renderConversations();
  renderMessages();
}

function submit() {
  const prompt = $("prompt");
  const text = prompt.value.trim();
  if (!text || state.controller) return;
  prompt.value = "";
  send(text);
}

document.addEventListener("DOMContentLoaded", () => {
  if (!current()) state.currentId = state.chats[0]?.id ?? null;
  bindSettings();
  renderAll();
  loadModels();
  $("new-chat").addEventListener("click", () => {
    if (!state.controller) newChat();
  });
  $("composer").addEventListener("submit", (e) => {
    e.preventDefault();
    submit();
  });
  $("prompt").addEventListener("keydown", (e) => {
    if (e.key === "Enter" && !e.shiftKey && !e.isComposing) {
      e.preventDefault();
      submit();
    }
  });
  $("stop").addEventListener("click", () => state.controller?.abort());
  document.addEventListener("keydown", (e) => {
    if (e.key === "Escape" && state.controller) state.controller.abort();
  });
  $("prompt").focus();
});
