// The chat page: conversations kept in this browser's localStorage, replies streamed from
// /v1/chat/completions (SSE read from fetch, so the Stop button can abort it: the server frees
// the sequence slot when the connection closes), thinking folded apart from the answer.
"use strict";

const STORE = "dllama.conversations";
const SETTINGS = "dllama.settings";
const $ = (id) => document.getElementById(id);

let conversations = load(STORE, []);
let currentId = conversations.length ? conversations[0].id : null;
let running = null; // the AbortController of the reply being streamed

function load(name, fallback) {
  try {
    const value = JSON.parse(localStorage.getItem(name));
    return value === null ? fallback : value;
  } catch (e) {
    return fallback;
  }
}

function save() {
  localStorage.setItem(STORE, JSON.stringify(conversations));
}

function current() {
  let c = conversations.find((x) => x.id === currentId);
  if (!c) {
    c = { id: String(Date.now()) + Math.random().toString(16).slice(2, 8), title: "New chat", messages: [] };
    conversations.unshift(c);
    currentId = c.id;
  }
  return c;
}

function drawList() {
  const list = $("conversations");
  list.replaceChildren();
  for (const c of conversations) {
    const open = el("button", { type: "button", className: "title", textContent: c.title || "New chat" });
    open.addEventListener("click", () => { if (!running) { currentId = c.id; drawAll(); } });
    const drop = el("button", { type: "button", className: "drop", textContent: "×", title: "Delete" });
    drop.addEventListener("click", () => {
      if (running) return;
      conversations = conversations.filter((x) => x !== c);
      if (currentId === c.id) currentId = conversations.length ? conversations[0].id : null;
      save();
      drawAll();
    });
    list.append(el("li", { className: c.id === currentId ? "current" : "" }, open, drop));
  }
}

// one message: the user's as plain text, the assistant's as folded thinking + Markdown + figures
function drawMessage(m) {
  const box = el("article", { className: "message " + m.role });
  fillMessage(box, m);
  return box;
}

function fillMessage(box, m) {
  box.replaceChildren();
  if (m.role === "user") {
    box.append(el("div", { className: "text", textContent: m.content }));
    return;
  }
  if (m.reasoning) {
    const fold = el("details", { className: "thinking" },
      el("summary", { textContent: m.done ? "Thinking" : "Thinking…" }),
      el("div", { className: "text", textContent: m.reasoning }));
    box.append(fold);
  }
  const body = el("div", { className: "markdown" });
  body.append(renderMarkdown(m.content || ""));
  box.append(body);
  if (m.error) box.append(el("p", { className: "error", textContent: m.error }));
  if (m.figures) box.append(el("p", { className: "figures muted", textContent: m.figures }));
}

function drawAll() {
  drawList();
  const c = conversations.find((x) => x.id === currentId);
  const area = $("messages");
  area.replaceChildren(...(c ? c.messages.map(drawMessage) : []));
  area.scrollTop = area.scrollHeight;
}

function settings() {
  const number = (id) => Number($(id).value);
  const s = {
    temperature: number("temperature"), top_p: number("top-p"), max_tokens: Math.round(number("max-tokens")),
    thinking: $("thinking").checked,
  };
  localStorage.setItem(SETTINGS, JSON.stringify(s));
  return s;
}

function restoreSettings() {
  const s = load(SETTINGS, null);
  if (!s) return;
  $("temperature").value = s.temperature;
  $("top-p").value = s.top_p;
  $("max-tokens").value = s.max_tokens;
  $("thinking").checked = s.thinking;
}

// the data: lines of each server-sent event, as parsed JSON (or "[DONE]")
async function* events(response) {
  const reader = response.body.getReader();
  const decoder = new TextDecoder();
  let buffer = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) return;
    buffer += decoder.decode(value, { stream: true });
    let end;
    while ((end = buffer.indexOf("\n\n")) >= 0) {
      const block = buffer.slice(0, end);
      buffer = buffer.slice(end + 2);
      for (const line of block.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const data = line.slice(5).trim();
        yield data === "[DONE]" ? data : JSON.parse(data);
      }
    }
  }
}

async function send(text) {
  const c = current();
  if (!c.messages.length) c.title = text.slice(0, 40);
  c.messages.push({ role: "user", content: text });
  const reply = { role: "assistant", content: "", reasoning: "", done: false };
  const history = c.messages.map((m) => ({ role: m.role, content: m.content }));
  c.messages.push(reply);
  save();
  drawAll();
  const box = $("messages").lastElementChild;
  const s = settings();
  running = new AbortController();
  busy(true);
  const started = performance.now();
  let first = null;
  let last = null;
  let pieces = 0;
  let usage = null;
  let finish = null;
  try {
    const response = await apiFetch("/v1/chat/completions", {
      method: "POST",
      headers: { "Content-Type": "application/json" },
      body: JSON.stringify({
        messages: history, stream: true, stream_options: { include_usage: true },
        temperature: s.temperature, top_p: s.top_p, max_tokens: s.max_tokens,
        chat_template_kwargs: { enable_thinking: s.thinking },
      }),
      signal: running.signal,
    });
    if (!response.ok) throw new Error(await errorText(response));
    for await (const event of events(response)) {
      if (event === "[DONE]") break;
      if (event.error) throw new Error(event.error.message || "the server failed");
      if (event.usage) usage = event.usage;
      const choice = event.choices && event.choices[0];
      if (!choice) continue;
      if (choice.finish_reason) finish = choice.finish_reason;
      const delta = choice.delta || {};
      if (delta.reasoning_content || delta.content) {
        first = first || performance.now();
        last = performance.now();
        pieces++;
        reply.reasoning += delta.reasoning_content || "";
        reply.content += delta.content || "";
        fillMessage(box, reply);
        $("messages").scrollTop = $("messages").scrollHeight;
      }
    }
  } catch (e) {
    reply.error = e.name === "AbortError" ? "Stopped." : String(e.message || e);
  } finally {
    running = null;
    busy(false);
  }
  const tokens = usage ? usage.completion_tokens : pieces;
  const seconds = first && last > first ? (last - first) / 1000 : 0;
  const rate = seconds > 0 && tokens > 1 ? ((tokens - 1) / seconds).toFixed(1) + " tok/s" : "";
  const wait = first ? ((first - started) / 1000).toFixed(2) + " s to first token" : "";
  reply.figures = [tokens + " tokens", rate, wait, finish || ""].filter(Boolean).join(" · ");
  reply.done = true;
  save();
  fillMessage(box, reply);
}

function busy(on) {
  $("send").hidden = on;
  $("stop").hidden = !on;
  $("status").textContent = on ? "Generating…" : "";
}

async function showModel() {
  try {
    const response = await apiFetch("/v1/models");
    if (!response.ok) throw new Error(await errorText(response));
    const body = await response.json();
    $("model").textContent = body.data && body.data[0] ? body.data[0].id : "";
  } catch (e) {
    $("status").textContent = "The server did not answer: " + (e.message || e);
  }
}

function start() {
  restoreSettings();
  $("composer").addEventListener("submit", (event) => {
    event.preventDefault();
    const text = $("prompt").value.trim();
    if (!text || running) return;
    $("prompt").value = "";
    send(text);
  });
  $("prompt").addEventListener("keydown", (event) => {
    if (event.key === "Enter" && !event.shiftKey) {
      event.preventDefault();
      $("composer").requestSubmit();
    }
  });
  $("stop").addEventListener("click", () => running && running.abort());
  $("new-chat").addEventListener("click", () => {
    if (running) return;
    currentId = null;
    current();
    save();
    drawAll();
  });
  $("toggle-list").addEventListener("click", () => document.body.classList.toggle("list-open"));
  drawAll();
  showModel();
}

start();
