// The boards page: polls /v1/cluster and draws one row per node and a small plot per figure
// over the last minutes. Every value from the server goes in as text.
"use strict";

const SVG = "http://www.w3.org/2000/svg";
const FLAGS = { under_voltage: "under-voltage", freq_capped: "freq capped", throttled: "throttled",
  soft_temp_limit: "soft temp limit" };
const PLOTS = [
  ["prefill_tps", "Prefill", "tok/s"],
  ["decode_tps", "Decode", "tok/s"],
  ["sync_ms_per_token", "Sync", "ms/token"],
  ["kb_per_token", "Network", "KB/token"],
];
let pollMs = 2000;
let bucketSeconds = 5;

function fixed(value, digits, unit) {
  return value === null || value === undefined ? "n/a" : value.toFixed(digits) + (unit ? " " + unit : "");
}

function bytes(value) {
  if (value === null || value === undefined) return "n/a";
  return value >= 1 << 30 ? (value / (1 << 30)).toFixed(2) + " GB" : (value / (1 << 20)).toFixed(0) + " MB";
}

function flags(set) {
  if (!set) return el("span", { className: "muted", textContent: "n/a" });
  const on = Object.keys(FLAGS).filter((k) => set[k]).map((k) => FLAGS[k]);
  return el("span", { className: on.length ? "warn" : "ok", textContent: on.length ? on.join(", ") : "none" });
}

function row(node) {
  const f = node.figures || {};
  const t = node.throttling;
  const name = node.role === "root" ? "root (this server)" : node.address;
  const state = el("span", { className: "state " + node.status, textContent: node.status });
  if (node.error) state.title = node.error;
  const load = f.load1 === null || f.load1 === undefined ? "n/a"
    : f.load1.toFixed(2) + (f.cpus ? " / " + f.cpus + " cpus" : "");
  const free = f.mem_available_bytes === null || f.mem_available_bytes === undefined ? "n/a"
    : bytes(f.mem_available_bytes) + " of " + bytes(f.mem_total_bytes);
  const cells = [name, state, fixed(f.temperature_c, 1, "°C"), flags(t && t.now), flags(t && t.since_boot),
    fixed(f.cpu_mhz, 0, "MHz"), load, bytes(f.rss_bytes), free];
  const labels = ["Node", "State", "Temp", "Throttling now", "Since boot", "CPU clock", "Load", "Engine memory",
    "Memory free"];
  const tr = el("tr", { className: node.status });
  tr.dataset.address = node.address;
  cells.forEach((cell, i) => {
    const td = el("td", {}, cell);
    td.dataset.label = labels[i];
    tr.append(td);
  });
  return tr;
}

function plot(times, values, title, unit) {
  const w = 240, h = 60;
  const known = values.filter((v) => v !== null);
  const top = Math.max(...known, 0) || 1;
  const svg = document.createElementNS(SVG, "svg");
  svg.setAttribute("viewBox", `0 0 ${w} ${h}`);
  svg.setAttribute("role", "img");
  const n = Math.max(values.length - 1, 1);
  let path = "";
  let pen = false;
  values.forEach((v, i) => {
    if (v === null) { pen = false; return; }
    const x = (i / n) * w, y = h - 2 - (v / top) * (h - 4);
    path += (pen ? "L" : "M") + x.toFixed(1) + " " + y.toFixed(1) + " ";
    pen = true;
  });
  const axis = document.createElementNS(SVG, "path"); // zero, so an empty plot reads as one
  axis.setAttribute("d", `M0 ${h - 1} L${w} ${h - 1}`);
  axis.setAttribute("class", "axis");
  svg.append(axis);
  const line = document.createElementNS(SVG, "path");
  line.setAttribute("d", path.trim() || "M0 0");
  line.setAttribute("class", "line");
  svg.append(line);
  values.forEach((v, i) => { // a point between gaps has no line: a dot shows it
    if (v === null || (values[i - 1] ?? null) !== null || (values[i + 1] ?? null) !== null) return;
    const dot = document.createElementNS(SVG, "circle");
    dot.setAttribute("cx", ((i / n) * w).toFixed(1));
    dot.setAttribute("cy", (h - 2 - (v / top) * (h - 4)).toFixed(1));
    dot.setAttribute("r", "2");
    svg.append(dot);
  });
  const lastKnown = known.length ? known[known.length - 1] : null;
  const minutes = Math.round((times.length * bucketSeconds) / 60);
  return el("figure", { className: "plot" }, svg,
    el("figcaption", {}, el("strong", { textContent: title + " " }),
      fixed(lastKnown, lastKnown !== null && lastKnown < 10 ? 2 : 1, unit),
      el("span", { className: "muted", textContent: ` (max ${fixed(known.length ? top : null, 1)}, last ${minutes} min)` })));
}

function draw(body) {
  document.querySelector("#nodes tbody").replaceChildren(...body.nodes.map(row));
  const answering = body.nodes.filter((n) => n.status !== "down").length;
  $summary().textContent = `${body.model} · ${answering} of ${body.nodes.length} nodes answer · ` +
    (body.up ? "engine up" : "engine down: " + body.reason) + ` · ${body.generated_tokens_per_second.toFixed(1)} tok/s now`;
  const h = body.history;
  bucketSeconds = h.bucket_seconds;
  document.getElementById("plots").replaceChildren(...PLOTS.map(([key, title, unit]) => plot(h.t, h[key], title, unit)));
}

function $summary() { return document.getElementById("summary"); }

async function poll() {
  try {
    const response = await apiFetch("/v1/cluster");
    if (!response.ok) throw new Error(await errorText(response));
    const body = await response.json();
    pollMs = Math.max(1000, Math.min(10000, (body.poll_seconds || 2) * 1000));
    draw(body);
    document.getElementById("status").textContent = "Updated " + new Date().toLocaleTimeString();
  } catch (e) {
    document.getElementById("status").textContent = "The server did not answer: " + (e.message || e);
  }
  setTimeout(poll, pollMs);
}

poll();
