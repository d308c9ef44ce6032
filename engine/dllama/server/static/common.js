// What both pages share: the API key (asked once, kept in this browser) and a DOM helper.
// Text from the server or the model only ever becomes text nodes, never markup.
"use strict";

const KEY_STORE = "dllama.apiKey";
let keyPrompt = null; // the pending prompt: several calls that got 401 wait for the same one

function el(tag, props, ...children) {
  const node = document.createElement(tag);
  Object.assign(node, props || {});
  for (const child of children) {
    if (child !== null && child !== undefined) node.append(child); // strings become text nodes
  }
  return node;
}

function askKey(refused) {
  if (keyPrompt) return keyPrompt;
  const input = el("input", { id: "key-input", type: "password", autocomplete: "off", placeholder: "API key",
    required: true });
  const form = el("form", { method: "dialog" },
    el("p", { textContent: refused ? "The server refused that API key. Enter it again."
      : "This server needs an API key." }),
    input, el("button", { type: "submit", textContent: "Use key" }));
  const dialog = el("dialog", { id: "key-dialog" }, form);
  document.body.append(dialog);
  keyPrompt = new Promise((resolve) => {
    form.addEventListener("submit", () => {
      localStorage.setItem(KEY_STORE, input.value.trim());
      keyPrompt = null;
      dialog.remove();
      resolve();
    }, { once: true });
  });
  dialog.showModal();
  return keyPrompt;
}

// fetch with the key; a 401 asks for it (once for every call waiting) and tries again
async function apiFetch(path, options) {
  for (;;) {
    const key = localStorage.getItem(KEY_STORE);
    const headers = new Headers((options && options.headers) || {});
    if (key) headers.set("Authorization", "Bearer " + key);
    const response = await fetch(path, { ...options, headers });
    if (response.status !== 401) return response;
    await response.body?.cancel();
    localStorage.removeItem(KEY_STORE);
    await askKey(Boolean(key));
  }
}

// the message of an OpenAI-shaped error body, or the status line
async function errorText(response) {
  try {
    const body = await response.json();
    if (body && body.error && typeof body.error.message === "string") return body.error.message;
  } catch (e) { /* not JSON */ }
  return `${response.status} ${response.statusText}`;
}
