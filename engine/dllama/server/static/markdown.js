// A small Markdown subset drawn as DOM nodes: fenced code, headings, lists, quotes, paragraphs,
// `code`, **bold**, *italic* and http(s) links. Model text is only ever set as textContent:
// no HTML it writes is parsed, so none runs.
"use strict";

const INLINE = /(`[^`\n]+`)|(\*\*[^*\n]+\*\*)|(\*[^*\s][^*\n]*\*)|(\[[^\]\n]+\]\([^)\s]+\))/g;

function inline(text) {
  const out = [];
  let at = 0;
  for (const m of text.matchAll(INLINE)) {
    if (m.index > at) out.push(text.slice(at, m.index));
    const t = m[0];
    if (m[1]) out.push(el("code", { textContent: t.slice(1, -1) }));
    else if (m[2]) out.push(el("strong", { textContent: t.slice(2, -2) }));
    else if (m[3]) out.push(el("em", { textContent: t.slice(1, -1) }));
    else out.push(link(t));
    at = m.index + t.length;
  }
  if (at < text.length) out.push(text.slice(at));
  return out;
}

function link(source) {
  const close = source.indexOf("](");
  const label = source.slice(1, close);
  const target = source.slice(close + 2, -1);
  let url;
  try { url = new URL(target); } catch (e) { return source; }
  if (url.protocol !== "http:" && url.protocol !== "https:") return source;
  return el("a", { href: url.href, textContent: label, rel: "noopener noreferrer nofollow", target: "_blank" });
}

function renderMarkdown(text) {
  const root = document.createDocumentFragment();
  const lines = text.split("\n");
  let i = 0;
  let para = [];
  const flush = () => {
    if (para.length) root.append(el("p", {}, ...inline(para.join("\n"))));
    para = [];
  };
  while (i < lines.length) {
    const line = lines[i];
    const fence = line.match(/^\s*```\s*([\w+-]*)/);
    const heading = line.match(/^(#{1,6})\s+(.*)$/);
    const item = line.match(/^\s*([-*+]|\d+[.)])\s+(.*)$/);
    if (fence) {
      flush();
      const body = [];
      for (i++; i < lines.length && !/^\s*```\s*$/.test(lines[i]); i++) body.push(lines[i]);
      i++; // the closing fence (or the end: a block still streaming)
      const code = el("code", { textContent: body.join("\n") });
      if (fence[1]) code.dataset.lang = fence[1];
      root.append(el("pre", {}, code));
      continue;
    }
    if (heading) {
      flush();
      root.append(el("h" + Math.min(6, heading[1].length + 2), {}, ...inline(heading[2])));
    } else if (item) {
      flush();
      const ordered = /\d/.test(item[1]);
      const list = el(ordered ? "ol" : "ul");
      for (; i < lines.length; i++) {
        const m = lines[i].match(/^\s*([-*+]|\d+[.)])\s+(.*)$/);
        if (!m || /\d/.test(m[1]) !== ordered) break;
        list.append(el("li", {}, ...inline(m[2])));
      }
      root.append(list);
      continue;
    } else if (line.startsWith(">")) {
      flush();
      const quoted = [];
      for (; i < lines.length && lines[i].startsWith(">"); i++) quoted.push(lines[i].replace(/^>\s?/, ""));
      root.append(el("blockquote", {}, ...inline(quoted.join("\n"))));
      continue;
    } else if (line.trim() === "") {
      flush();
    } else {
      para.push(line);
    }
    i++;
  }
  flush();
  return root;
}
