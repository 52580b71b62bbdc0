// Boot, sign-in and the hash router (#/catalog, #/playground, ...). Views are modules with render(el, params).
import { ApiError, action, api, clear, errorBox, field, h, role, session, showSecretOnce } from "./core.js";
import * as admin from "./views/admin.js";
import * as catalog from "./views/catalog.js";
import * as collections from "./views/collections.js";
import * as finetune from "./views/finetune.js";
import * as ops from "./views/ops.js";
import * as playground from "./views/playground.js";
import * as spend from "./views/spend.js";

// name -> [title, module, least role to show the link]. The server checks the role again on every call.
const VIEWS = {
  catalog: ["Catalog", catalog, "user"],
  playground: ["Playground", playground, "user"],
  spend: ["Spend", spend, "user"],
  operations: ["Operations", ops, "user"],
  "fine-tuning": ["Fine-tuning", finetune, "trainer"],
  collections: ["Collections", collections, "user"],
  admin: ["Admin", admin, "admin"],
};
let current = null;  // the live view (its stop() ends timers)

async function whoami() {
  try {
    session.me = await api("/v1/me");
    session.me.governance = true;
  } catch (err) {
    if (err instanceof ApiError && err.status === 404) {  // governance off: no keys, nothing to sign in to
      session.me = { role: "admin", name: "anonymous", team: "-", anonymous: true, governance: false };
    } else throw err;
  }
}

function banner() {
  const b = document.getElementById("banner");
  const me = session.me;
  b.hidden = true;
  clear(b);
  if (!me || !me.anonymous) return;
  b.hidden = false;
  if (!me.governance) {
    b.append("Governance is off on this server: no keys, budgets or audit. Anyone who reaches it can use it.");
    return;
  }
  b.append(h("strong", "Open access: "), me.keys_exist
    ? "the server is configured with open_access, so requests need no key. "
    : "no API keys exist yet, so anyone who can reach this server can use it. ");
  if (!me.keys_exist) {
    const out = h("div");
    const btn = h("button", { type: "button", id: "first-key" }, "Create the first admin key");
    action(btn, async () => {
      const made = await api("/v1/admin/keys", { method: "POST", body: { name: "first-admin", team: "platform", role: "admin" } });
      showSecretOnce(out, made, async () => { session.key = made.key; await start(); });
    }, out);
    b.append(btn, out);
  }
}

function nav() {
  const n = document.getElementById("nav");
  clear(n, Object.entries(VIEWS).filter(([name, v]) => role(v[2]) && (name !== "admin" || session.me.governance))
    .map(([name, [title]]) => h("a", { href: `#/${name}`, dataset: { view: name } }, title)));
  const who = document.getElementById("who");
  const me = session.me;
  const out = h("button.small", { type: "button", id: "sign-out" }, "Sign out");
  out.addEventListener("click", () => { session.key = ""; start(); });
  clear(who, h("span.muted", `${me.name} · ${me.team} · ${me.role}`), session.key ? out : null);
}

function signInView(el, error) {
  const input = h("input", { type: "password", id: "api-key", autocomplete: "off", placeholder: "lpx-…", required: true });
  const go = h("button", { type: "submit", id: "sign-in" }, "Sign in");
  const out = h("div");
  const form = h("form.card.narrow", h("h1", "Sign in"),
    h("p.muted", "Use an API key. It stays in this browser tab's session and is sent only to this server."),
    field("API key", input), go, out);
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    session.key = input.value.trim();
    input.value = "";
    try { await start(); } catch (err) { session.key = ""; clear(out, errorBox(err)); }
  });
  if (error) out.append(errorBox(error));
  clear(el, form);
  input.focus();
}

async function route() {
  const el = document.getElementById("view");
  if (current && current.stop) current.stop();
  current = null;
  const [name, query] = (location.hash.replace(/^#\/?/, "") || "catalog").split("?");
  const params = Object.fromEntries(new URLSearchParams(query || ""));
  const entry = VIEWS[name] || VIEWS.catalog;
  for (const a of document.querySelectorAll("#nav a")) a.classList.toggle("active", a.dataset.view === name);
  document.getElementById("nav").classList.remove("open");
  clear(el, h("h1", entry[0]));
  const body = h("div");
  el.append(body);
  try {
    current = (await entry[1].render(body, params)) || null;
  } catch (err) {
    clear(body, errorBox(err));
  }
}

async function start() {
  const el = document.getElementById("view");
  try {
    await whoami();
  } catch (err) {
    session.me = null;
    clear(document.getElementById("nav"));
    clear(document.getElementById("who"));
    document.getElementById("banner").hidden = true;
    signInView(el, err instanceof ApiError && err.status === 401 && !session.key ? null : err);
    return;
  }
  banner();
  nav();
  await route();
}

window.addEventListener("hashchange", () => { if (session.me) route(); });
document.getElementById("menu").addEventListener("click", () => {
  const n = document.getElementById("nav");
  n.classList.toggle("open");
});
start();
