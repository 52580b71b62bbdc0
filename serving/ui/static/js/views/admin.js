// Admin: keys (create, with the secret shown once; revoke), teams with limits and budgets, the PII policy,
// and the audit log with filters and CSV export. Every call is an admin route: a user key gets 403 from
// the server whatever this page shows.
import { action, api, clear, field, fmt, h, showSecretOnce, table } from "../core.js";

const list = (v) => v.split(",").map(s => s.trim()).filter(Boolean);

export async function render(el, params) {
  const tabs = h("div.tabs");
  const body = h("div");
  const views = { keys, teams, policy, audit };
  const tab = params.tab in views ? params.tab : "keys";
  for (const name of Object.keys(views)) {
    tabs.append(h("button" + (name === tab ? ".active" : ""), { type: "button", dataset: { tab: name },
      onclick: () => { location.hash = `#/admin?tab=${name}`; } }, name[0].toUpperCase() + name.slice(1)));
  }
  clear(el, tabs, body);
  await views[tab](body);
}

async function keys(el) {
  const inputs = {
    name: h("input", { id: "key-name", required: true }), team: h("input", { id: "key-team", value: "default" }),
    role: h("select", { id: "key-role" }, ["user", "trainer", "admin"].map(r => h("option", { value: r }, r))),
    models: h("input", { id: "key-models", placeholder: "* (all), or a,b*" }), adapters: h("input", { id: "key-adapters", placeholder: "*" }),
    routes: h("input", { id: "key-routes", placeholder: "*" }), collections: h("input", { id: "key-collections", placeholder: "*" }),
    rpm: h("input", { id: "key-rpm", type: "number", min: 1 }), tpm: h("input", { id: "key-tpm", type: "number", min: 1 }),
    max_parallel: h("input", { id: "key-parallel", type: "number", min: 1 }),
    budget: h("input", { id: "key-budget", type: "number", min: 0, step: "0.01" }),
    period: h("select", { id: "key-period" }, ["month", "day"].map(p => h("option", { value: p }, p))),
    expires: h("input", { id: "key-expires", type: "number", min: 1, placeholder: "never" }),
  };
  const create = h("button", { type: "button", id: "key-create" }, "Create key");
  const out = h("div", { id: "key-out" });
  const listing = h("div", { id: "key-list" });
  action(create, async () => {
    const i = inputs;
    const body = { name: i.name.value.trim(), team: i.team.value.trim() || "default", role: i.role.value,
      budget_period: i.period.value };
    for (const k of ["models", "adapters", "routes", "collections"]) if (i[k].value.trim()) body[k] = list(i[k].value);
    const limits = {};
    for (const k of ["rpm", "tpm", "max_parallel"]) if (i[k].value) limits[k] = Number(i[k].value);
    if (Object.keys(limits).length) body.limits = limits;
    if (i.budget.value) body.budget_usd = Number(i.budget.value);
    if (i.expires.value) body.expires_in_days = Number(i.expires.value);
    const made = await api("/v1/admin/keys", { method: "POST", body });
    i.name.value = "";
    showSecretOnce(out, made, null);
    await refresh();
  }, out);

  async function refresh() {
    const data = (await api("/v1/admin/keys")).data;
    const t = table(data.map(k => ({ ...k, allow_text: Object.entries(k.allow || {}).map(([a, v]) => `${a}: ${v.join(" ")}`).join("; "),
      limits_text: Object.entries(k.limits || {}).filter(([, v]) => v !== null).map(([a, v]) => `${a} ${v}`).join(", ") || "–",
      budget_text: k.budget_usd === null ? "–" : `${fmt.usd(k.budget_usd)} / ${k.budget_period}`,
      created: fmt.time(k.created_at), expires: fmt.time(k.expires_at) })), [
      { title: "id", field: "id" }, { title: "name", field: "name" }, { title: "team", field: "team" }, { title: "role", field: "role" },
      { title: "status", field: "status" }, { title: "allow", field: "allow_text" }, { title: "limits", field: "limits_text" },
      { title: "budget", field: "budget_text" }, { title: "created", field: "created" }, { title: "expires", field: "expires" },
      { title: "", field: "id", headerSort: false, formatter: (cell) => {
        const k = cell.getRow().getData();
        if (k.status !== "active") return "";
        const b = h("button.danger.small", { type: "button", dataset: { revoke: k.id } }, "Revoke");
        action(b, async () => {
          if (!confirm(`Revoke key ${k.id}? Requests with it fail from now on.`)) return;
          await api(`/v1/admin/keys/${encodeURIComponent(k.id)}`, { method: "DELETE" });
          await refresh();
        });
        return b;
      } }], { name: "keys" });
    clear(listing, t);
  }

  const i = inputs;
  clear(el, h("div.card", h("h2", "New key"), h("div.grid",
    field("Name", i.name), field("Team", i.team), field("Role", i.role),
    field("Models (globs)", i.models), field("Adapters (globs)", i.adapters), field("Routes (globs)", i.routes),
    field("Collections (globs)", i.collections), field("Requests per minute", i.rpm), field("Tokens per minute", i.tpm),
    field("Parallel requests", i.max_parallel), field("Budget (USD)", i.budget), field("Budget period", i.period),
    field("Expires in (days)", i.expires)), create, out), h("h2", "Keys"), listing);
  await refresh();
}

async function teams(el) {
  const i = {
    name: h("input", { id: "team-name", required: true, list: "team-names" }),
    rpm: h("input", { id: "team-rpm", type: "number", min: 1 }), tpm: h("input", { id: "team-tpm", type: "number", min: 1 }),
    max_parallel: h("input", { id: "team-parallel", type: "number", min: 1 }),
    budget: h("input", { id: "team-budget", type: "number", min: 0, step: "0.01" }),
    period: h("select", { id: "team-period" }, ["month", "day"].map(p => h("option", { value: p }, p))),
  };
  const names = h("datalist", { id: "team-names" });
  const save = h("button", { type: "button", id: "team-save" }, "Save team policy");
  const reset = h("button.secondary", { type: "button", id: "team-reset" }, "Reset to config");
  const out = h("div", { id: "team-out" });
  const listing = h("div", { id: "team-list" });
  let rows = [];

  function edit(t) {  // fill the form with a team's policy in force
    i.name.value = t.name;
    for (const k of ["rpm", "tpm", "max_parallel"]) i[k].value = t.limits[k] ?? "";
    i.budget.value = t.budget ? t.budget.budget_usd : "";
    i.period.value = t.budget ? t.budget.period : "month";
  }
  const teamPath = () => `/v1/admin/teams/${encodeURIComponent(i.name.value.trim())}`;
  action(save, async () => {
    const limits = {};
    for (const k of ["rpm", "tpm", "max_parallel"]) if (i[k].value) limits[k] = Number(i[k].value);
    const body = { limits, budget: i.budget.value ? { amount_usd: Number(i.budget.value), period: i.period.value } : null };
    const t = await api(teamPath(), { method: "PUT", body });
    clear(out, h("p.ok", `Saved: team ${t.name} now follows this policy on every gateway replica.`));
    await refresh();
  }, out);
  action(reset, async () => {
    const t = await api(teamPath(), { method: "DELETE" });
    clear(out, h("p.ok", `Team ${t.name} is back to ${t.source === "config" ? "its config policy" : "no team policy"}.`));
    edit(t);
    await refresh();
  }, out);

  async function refresh() {
    rows = (await api("/v1/admin/teams")).data;
    clear(names, ...rows.map(t => h("option", { value: t.name })));
    clear(listing, table(rows.map(t => ({ ...t, limits_text: Object.entries(t.limits).filter(([, v]) => v !== null).map(([a, v]) => `${a} ${v}`).join(", ") || "–",
      budget_text: t.budget ? `${fmt.usd(t.budget.spent_usd)} of ${fmt.usd(t.budget.budget_usd)} / ${t.budget.period}` : "–",
      remaining: t.budget ? t.budget.remaining_usd : null,
      source_text: t.source === "api" ? `set by ${t.updated_by} ${fmt.time(t.updated_at)}` : t.source })), [
      { title: "team", field: "name" }, { title: "policy from", field: "source_text" }, { title: "keys", field: "keys", hozAlign: "right" },
      { title: "active keys", field: "active_keys", hozAlign: "right" }, { title: "limits", field: "limits_text" },
      { title: "budget", field: "budget_text" }, { title: "remaining", field: "remaining", formatter: c => fmt.usd(c.getValue()) },
      { title: "", field: "name", headerSort: false, formatter: (cell) => {
        const t = cell.getRow().getData();
        return action(h("button.small", { type: "button", dataset: { editTeam: t.name } }, "Edit"), async () => edit(t));
      } }],
    { name: "teams" }));
  }

  clear(el, h("div.card", h("h2", "Team policy"),
    h("p.muted", "Limits and budget for every key of a team together. Saving replaces the config's policy (governance.teams) for that team; reset returns to it."),
    h("div.grid", field("Team", i.name), field("Requests per minute", i.rpm), field("Tokens per minute", i.tpm),
      field("Parallel requests", i.max_parallel), field("Budget (USD)", i.budget, "empty: no team budget"), field("Budget period", i.period)),
    names, h("div.row", save, reset), out), h("h2", "Teams"), listing);
  await refresh();
}

async function policy(el) {
  const p = await api("/v1/admin/policy");
  const rows = [{ scope: "default", match: "*", ...p.pii }];
  for (const [m, v] of Object.entries(p.pii_routes)) rows.push({ scope: "route", match: m, ...v });
  for (const [m, v] of Object.entries(p.pii_keys)) rows.push({ scope: "key", match: m, ...v });
  clear(el, h("p.muted", "PII handling in prompts and outputs (governance.pii, pii_routes, pii_keys): a key's policy beats a route's, which beats the default."),
    table(rows.map(r => ({ ...r, kinds: r.kinds.join(", ") })), [
      { title: "scope", field: "scope" }, { title: "match", field: "match" }, { title: "prompt", field: "prompt" },
      { title: "output", field: "output" }, { title: "kinds", field: "kinds" }], { name: "pii-policy" }),
    h("p", `Prompts and outputs are ${p.log_content ? "" : "not "}stored in the audit log.`));
}

async function audit(el) {
  const f = {
    key_id: h("input", { id: "audit-key" }), team: h("input", { id: "audit-team" }), model: h("input", { id: "audit-model" }),
    status: h("input", { id: "audit-status", type: "number" }), since: h("input", { id: "audit-since", placeholder: "24h, 7d or an ISO time", value: "7d" }),
    until: h("input", { id: "audit-until", placeholder: "ISO time" }),
  };
  const go = h("button", { type: "button", id: "audit-search" }, "Search");
  const out = h("div", { id: "audit-out" });
  action(go, async () => {
    const q = new URLSearchParams({ limit: "1000" });
    for (const [k, input] of Object.entries(f)) if (input.value.trim()) q.set(k, input.value.trim());
    const data = (await api(`/v1/admin/audit?${q}`)).data.reverse();  // newest first
    clear(out, table(data.map(r => ({ ...r, when: fmt.time(r.ts || r.time), cost: r.cost_usd })), [
      { title: "time", field: "when" }, { title: "event", field: "event" }, { title: "request", field: "request_id" },
      { title: "key", field: "key_id" }, { title: "team", field: "team" }, { title: "route", field: "route" },
      { title: "model", field: "model" }, { title: "adapter", field: "adapter" }, { title: "status", field: "status", hozAlign: "right" },
      { title: "tokens in", field: "prompt_tokens", hozAlign: "right" }, { title: "tokens out", field: "completion_tokens", hozAlign: "right" },
      { title: "cost", field: "cost", formatter: c => c.getValue() == null ? "–" : fmt.usd(c.getValue()) },
      { title: "latency ms", field: "latency_ms", hozAlign: "right" }, { title: "error", field: "error" },
      { title: "failovers", field: "failovers" }], { name: "audit" }));
  }, out);
  clear(el, h("div.card", h("div.grid", field("Key id", f.key_id), field("Team", f.team), field("Model", f.model),
    field("HTTP status", f.status), field("Since", f.since), field("Until", f.until)), go), out);
  go.click();
}
