// Shared by every view: the signed-in key, API calls, DOM building (text only), tables, charts, formats.
//
// Rule: text from the server or the user is set with textContent (h() below) or rendered by Tabulator's
// plaintext formatter, which escapes it; nothing here assigns HTML built from data.

const KEY = "loraplex.key";

export const session = {
  get key() { return sessionStorage.getItem(KEY) || ""; },
  set key(v) { if (v) sessionStorage.setItem(KEY, v); else sessionStorage.removeItem(KEY); },
  me: null,  // GET /v1/me, or a stand-in when governance is off
};

export class ApiError extends Error {
  constructor(status, body) {
    const e = (body && body.error) || {};
    super(e.message || (typeof body === "string" && body) || `HTTP ${status}`);
    this.status = status; this.code = e.code; this.param = e.param;
  }
}

function headers(extra) {
  const out = { ...(extra || {}) };
  if (session.key) out.Authorization = "Bearer " + session.key;
  return out;
}

// fetch with the key; JSON bodies in and out; a 4xx/5xx becomes an ApiError carrying OpenAI's message.
export async function api(path, { method = "GET", body, form, raw = false } = {}) {
  const init = { method, headers: headers(body !== undefined ? { "Content-Type": "application/json" } : {}) };
  if (body !== undefined) init.body = JSON.stringify(body);
  if (form) init.body = form;
  const resp = await fetch(path, init);
  if (raw) return resp;
  const text = await resp.text();
  let data = text;
  try { data = text ? JSON.parse(text) : {}; } catch (_) { /* plain text */ }
  if (!resp.ok) throw new ApiError(resp.status, data);
  return data;
}

// Server-sent events of a streamed POST: calls onEvent(json) per data line; returns the Response.
export async function stream(path, body, onEvent) {
  const resp = await fetch(path, { method: "POST", body: JSON.stringify(body),
    headers: headers({ "Content-Type": "application/json", Accept: "text/event-stream" }) });
  if (!resp.ok) {
    let data = await resp.text();
    try { data = JSON.parse(data); } catch (_) { /* text */ }
    throw new ApiError(resp.status, data);
  }
  const reader = resp.body.getReader();
  const decoder = new TextDecoder();
  let buf = "";
  for (;;) {
    const { value, done } = await reader.read();
    if (done) break;
    buf += decoder.decode(value, { stream: true });
    let cut;
    while ((cut = buf.indexOf("\n\n")) >= 0) {
      const block = buf.slice(0, cut); buf = buf.slice(cut + 2);
      for (const line of block.split("\n")) {
        if (!line.startsWith("data:")) continue;
        const payload = line.slice(5).trim();
        if (payload === "[DONE]") return resp;
        onEvent(JSON.parse(payload));
      }
    }
  }
  return resp;
}

// h("div.card", {onclick}, "text", child...): an element; strings become text nodes, never HTML.
export function h(spec, attrs, ...children) {
  const [tag, ...classes] = spec.split(".");
  const el = document.createElement(tag || "div");
  if (classes.length) el.className = classes.join(" ");
  if (attrs && (typeof attrs !== "object" || attrs instanceof Node || Array.isArray(attrs))) {
    children.unshift(attrs); attrs = null;
  }
  for (const [k, v] of Object.entries(attrs || {})) {
    if (v === undefined || v === null || v === false) continue;
    if (k.startsWith("on")) el.addEventListener(k.slice(2), v);
    else if (k === "dataset") Object.assign(el.dataset, v);
    else if (k in el && k !== "list" && k !== "form") el[k] = v;
    else el.setAttribute(k, v === true ? "" : String(v));
  }
  append(el, children);
  return el;
}

function append(el, children) {
  for (const c of children.flat(Infinity)) {
    if (c === null || c === undefined || c === false) continue;
    el.append(c instanceof Node ? c : document.createTextNode(String(c)));
  }
}

export function clear(el, ...children) { el.replaceChildren(); append(el, children); return el; }

export function toast(message, kind = "info") {
  const t = document.getElementById("toast");
  const item = h("div." + kind, message);
  t.append(item);
  setTimeout(() => item.remove(), kind === "error" ? 8000 : 4000);
}

export function errorBox(err) {
  const msg = err instanceof ApiError ? `${err.message}${err.status ? ` (HTTP ${err.status})` : ""}` : String(err);
  return h("div.error", { role: "alert" }, msg);
}

// Run an async action from a button: disabled while it runs, errors shown next to it and as a toast.
export function action(button, fn, out) {
  button.addEventListener("click", async (ev) => {
    ev.preventDefault();
    button.disabled = true;
    try { await fn(); } catch (err) {
      if (out) clear(out, errorBox(err)); else toast(errorBox(err).textContent, "error");
    } finally { button.disabled = false; }
  });
  return button;
}

export function field(label, input, hint) {
  return h("label.field", h("span", label), input, hint ? h("small.muted", hint) : null);
}

export function copyButton(text) {
  const b = h("button.small", { type: "button" }, "Copy");
  b.addEventListener("click", async () => {
    try { await navigator.clipboard.writeText(text); b.textContent = "Copied"; } catch (_) { b.textContent = "Select and copy"; }
    setTimeout(() => { b.textContent = "Copy"; }, 1500);
  });
  return b;
}

// ---- formats
export const fmt = {
  usd(v) {  // cents, or three significant digits below a cent (self-hosted tokens are cheap), never 1e-5
    if (v === null || v === undefined) return "–";
    const sign = v < 0 ? "-" : "", a = Math.abs(v);
    if (a === 0 || a >= 0.01) return sign + "$" + a.toFixed(2);
    return sign + "$" + a.toFixed(Math.min(12, 2 - Math.floor(Math.log10(a))));
  },
  ms(v) { return v === null || v === undefined ? "–" : `${v < 10 ? v.toFixed(1) : Math.round(v)} ms`; },
  pct(v) { return v === null || v === undefined ? "–" : `${(v * 100).toFixed(1)}%`; },
  int(v) { return v === null || v === undefined ? "–" : Math.round(v).toLocaleString("en-US"); },
  time(ts) { return ts ? new Date(ts * 1000).toISOString().replace("T", " ").slice(0, 19) + "Z" : "–"; },
  day(ts) { return new Date(ts * 1000).toISOString().slice(0, 10); },
};

// ---- tables: Tabulator, plaintext cells (escaped), sortable, with a CSV download button
export function table(rows, columns, { name = "table", height, layout = "fitDataStretch", onRowClick } = {}) {
  const box = h("div.table-wrap");
  const holder = h("div");
  const csv = h("button.small", { type: "button" }, "Export CSV");
  box.append(h("div.table-tools", csv), holder);
  const opts = { data: rows, layout, columns: columns.map(c => ({ headerSort: true, formatter: "plaintext", ...c })),
    placeholder: "Nothing yet", pagination: rows.length > 25, paginationSize: 25 };
  if (height) opts.height = height;
  const t = new Tabulator(holder, opts);
  // Built while detached (a view still awaiting data), it measured nothing: lay it out once it is shown.
  t.on("tableBuilt", () => {
    const fit = () => (holder.isConnected ? t.redraw(true) : requestAnimationFrame(fit));
    if (!holder.isConnected) requestAnimationFrame(fit);
  });
  if (onRowClick) t.on("rowClick", (e, row) => onRowClick(row.getData()));
  csv.addEventListener("click", () => t.download("csv", `${name}.csv`));
  box.tabulator = t;
  return box;
}

// ---- charts: Chart.js, labels and legends drawn on the canvas (never HTML)
const PALETTE = ["#2563eb", "#16a34a", "#dc2626", "#9333ea", "#ea580c", "#0891b2", "#ca8a04", "#db2777",
  "#4b5563", "#65a30d"];
export const color = (i) => PALETTE[i % PALETTE.length];

// Each stacked bar's total written above it, so a bar chart reads without hovering (skipped where it would
// not fit the bar's width).
export const barTotals = (format) => ({
  id: "barTotals",
  afterDatasetsDraw(c) {
    const metas = c.data.datasets.map((_, i) => c.getDatasetMeta(i)).filter(m => c.isDatasetVisible(m.index));
    const { ctx } = c;
    ctx.save();
    Object.assign(ctx, { font: "12px system-ui, sans-serif", fillStyle: "#111827", textAlign: "center", textBaseline: "bottom" });
    (c.data.labels || []).forEach((_, j) => {
      let total = 0, top = Infinity, bar = null;
      for (const m of metas) {
        total += Number(c.data.datasets[m.index].data[j]) || 0;
        if (m.data[j]) { bar = m.data[j]; top = Math.min(top, bar.y); }
      }
      const text = format(total);
      if (bar && total > 0 && ctx.measureText(text).width <= bar.width + 24) ctx.fillText(text, bar.x, top - 3);
    });
    ctx.restore();
  },
});

export function chart(config, { label = "chart", height = 260 } = {}) {
  const canvas = h("canvas", { role: "img", "aria-label": label });
  const box = h("div.chart", { style: `height:${height}px` }, canvas);
  const c = new Chart(canvas, { ...config, options: { responsive: true, maintainAspectRatio: false, animation: false,
    plugins: { legend: { position: "bottom" } }, ...(config.options || {}) } });
  box.chart = c;
  return box;
}

// The plain key is in the create response only: show it once, with a copy button; signing in with it is
// one click. It is never written anywhere else.
export function showSecretOnce(out, made, signIn) {  // signIn: an async callback, or null
  const secret = h("code.secret", made.key);
  const done = h("button", { type: "button" }, signIn ? "I saved it: sign in with it" : "I saved it");
  done.addEventListener("click", async () => {
    clear(out);
    if (signIn) await signIn();
  });
  clear(out, h("div.secret-box", { role: "dialog", "aria-label": "new key" },
    h("p", "Key ", h("strong", made.name), ` (${made.role}, team ${made.team}) was created. Copy it now: it is not shown again.`),
    h("div.row", secret, copyButton(made.key)), done));
}

export function role(min) {
  const rank = { user: 0, trainer: 1, admin: 2 };
  return session.me && rank[session.me.role] >= rank[min];
}
