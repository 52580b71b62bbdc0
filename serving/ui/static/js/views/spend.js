// Spend and adoption (FinOps), all from GET /v1/usage (a user key sees its own usage only; the server decides).
// Spend over time by team, key, model or adapter; budget burn-down with the projection to the period's end;
// cost per 1k requests and per 1M tokens; requests, tokens and active keys per team per day. Every table
// has a CSV export.
import { api, barTotals, chart, clear, color, field, fmt, h, role, session, table } from "../core.js";

const DAY = 86400;

function weekOf(day) {  // the ISO week's Monday, as YYYY-MM-DD
  const d = new Date(day + "T00:00:00Z");
  d.setUTCDate(d.getUTCDate() - ((d.getUTCDay() + 6) % 7));
  return d.toISOString().slice(0, 10);
}

function periodsOf(rows, grain) {
  return rows.map(r => ({ ...r, period: grain === "week" ? weekOf(r.day) : grain === "month" ? r.month : r.day }));
}

function stackedBars(rows, group, label) {
  const periods = [...new Set(rows.map(r => r.period))].sort();
  const groups = [...new Set(rows.map(r => r[group] || "(none)"))];
  const datasets = groups.map((g, i) => ({ label: g, backgroundColor: color(i), stack: "s",
    data: periods.map(p => rows.filter(r => r.period === p && (r[group] || "(none)") === g)
      .reduce((a, r) => a + (r.cost_usd || 0), 0)) }));
  return chart({ type: "bar", data: { labels: periods, datasets }, plugins: [barTotals(fmt.usd)],
    options: { scales: { x: { stacked: true }, y: { stacked: true, grace: "10%", title: { display: true, text: "USD" }, ticks: { callback: fmt.usd } } } } },
    { label });
}

function totalsBy(rows, group, names) {
  const out = {};
  for (const r of rows) {
    const k = r[group] || "(none)";
    const t = out[k] = out[k] || { [group]: k, requests: 0, prompt_tokens: 0, completion_tokens: 0, cost_usd: 0 };
    t.requests += r.requests; t.prompt_tokens += r.prompt_tokens || 0;
    t.completion_tokens += r.completion_tokens || 0; t.cost_usd += r.cost_usd || 0;
  }
  return Object.values(out).map(t => ({ ...t, name: names[t[group]] || "",
    cost_per_1k_requests: t.requests ? t.cost_usd / t.requests * 1000 : 0,
    cost_per_1m_tokens: (t.prompt_tokens + t.completion_tokens) ? t.cost_usd / (t.prompt_tokens + t.completion_tokens) * 1e6 : 0 }))
    .sort((a, b) => b.cost_usd - a.cost_usd);
}

const money = (cell) => fmt.usd(cell.getValue());

// Budget burn-down: cumulative spend this period against the budget, and the straight-line projection.
async function burnDown(subject, budget) {
  const [scope, value] = subject;
  const grain = budget.period === "day" ? "hour" : "day";
  const since = budget.starts_at;
  const q = new URLSearchParams({ group_by: grain, since: new Date(since * 1000).toISOString() });
  q.set(scope, value);
  const rows = (await api(`/v1/usage?${q}`)).data.sort((a, b) => a[grain].localeCompare(b[grain]));
  const step = grain === "hour" ? 3600 : DAY;
  const n = Math.round((budget.resets_at - since) / step);
  const labels = [], spent = [], projected = [];
  const now = Date.now() / 1000;
  const elapsed = Math.max(step, now - since);
  const rate = budget.spent_usd / elapsed;
  let acc = 0;
  for (let i = 0; i < n; i++) {
    const t = since + i * step;
    const key = new Date(t * 1000).toISOString().slice(0, grain === "hour" ? 13 : 10);
    labels.push(grain === "hour" ? key.slice(11) + "h" : key.slice(5));
    const row = rows.find(r => r[grain] === key);
    acc += row ? row.cost_usd || 0 : 0;
    spent.push(t <= now ? acc : null);
    projected.push(t + step >= now ? rate * (t + step - since) : null);
  }
  const projection = rate * (budget.resets_at - since);
  return {
    row: { scope, subject: value, period: budget.period, budget_usd: budget.budget_usd, spent_usd: budget.spent_usd,
      reserved_usd: budget.reserved_usd, remaining_usd: budget.remaining_usd, projected_usd: projection,
      resets_at: fmt.time(budget.resets_at), on_track: projection <= budget.budget_usd ? "yes" : "over budget" },
    chart: chart({ type: "line", data: { labels, datasets: [
      { label: "spent", data: spent, borderColor: color(0), backgroundColor: color(0), spanGaps: true },
      { label: "projection", data: projected, borderColor: color(4), borderDash: [6, 4], pointRadius: 0 },
      { label: "budget", data: labels.map(() => budget.budget_usd), borderColor: color(2), pointRadius: 0 }] },
      options: { scales: { y: { beginAtZero: true, title: { display: true, text: "USD" }, ticks: { callback: fmt.usd } } } } },
      { label: `budget burn-down of ${scope} ${value}`, height: 200 }),
  };
}

export async function render(el) {
  const admin = role("admin");
  const group = h("select", { id: "spend-group" }, ["team", "key_id", "model", "adapter"].map(g => h("option", { value: g }, g)));
  const grain = h("select", { id: "spend-grain" }, ["day", "week", "month"].map(g => h("option", { value: g }, g)));
  const since = h("select", { id: "spend-since" }, [["7d", "7 days"], ["30d", "30 days"], ["90d", "90 days"], ["365d", "a year"]]
    .map(([v, t]) => h("option", { value: v, selected: v === "30d" }, t)));
  const out = h("div");
  let names = {};
  let keys = [];
  if (admin && session.me.governance) {
    keys = (await api("/v1/admin/keys")).data;
    names = Object.fromEntries(keys.map(k => [k.id, k.name]));
  }

  async function draw() {
    const g = group.value;
    const by = grain.value === "month" ? "month" : "day";
    const rows = periodsOf((await api(`/v1/usage?group_by=${g},${by}&since=${since.value}`)).data, grain.value);
    const totals = totalsBy(rows, g, names);
    const sum = totals.reduce((a, t) => a + t.cost_usd, 0);
    const reqs = totals.reduce((a, t) => a + t.requests, 0);
    const toks = totals.reduce((a, t) => a + t.prompt_tokens + t.completion_tokens, 0);
    const adoption = (await api(`/v1/usage?group_by=team,day,key_id&since=${since.value}`)).data;
    const perTeamDay = {};
    for (const r of adoption) {
      const k = `${r.team}|${r.day}`;
      const t = perTeamDay[k] = perTeamDay[k] || { team: r.team, day: r.day, requests: 0, tokens: 0, active_keys: 0, cost_usd: 0 };
      t.requests += r.requests; t.tokens += (r.prompt_tokens || 0) + (r.completion_tokens || 0);
      t.active_keys += 1; t.cost_usd += r.cost_usd || 0;
    }
    const adoptRows = Object.values(perTeamDay).sort((a, b) => a.day.localeCompare(b.day) || a.team.localeCompare(b.team));
    const days = [...new Set(adoptRows.map(r => r.day))];
    const teams = [...new Set(adoptRows.map(r => r.team))];
    const budgetPart = await budgets();
    clear(out,
      h("div.card.row", { id: "spend-totals" },
        h("div.stat", h("b", { id: "spend-total" }, fmt.usd(sum)), h("span.muted", "spend")),
        h("div.stat", h("b", fmt.int(reqs)), h("span.muted", "requests")),
        h("div.stat", h("b", fmt.int(toks)), h("span.muted", "tokens")),
        h("div.stat", h("b", fmt.usd(reqs ? sum / reqs * 1000 : 0)), h("span.muted", "per 1k requests")),
        h("div.stat", h("b", fmt.usd(toks ? sum / toks * 1e6 : 0)), h("span.muted", "per 1M tokens"))),
      h("h2", `Spend by ${g} per ${grain.value}`),
      rows.length ? stackedBars(rows, g, `spend by ${g}`) : h("p.muted", "No usage in this window yet."),
      table(totals, [
        { title: g, field: g }, ...(g === "key_id" && admin ? [{ title: "key name", field: "name" }] : []),
        { title: "requests", field: "requests", hozAlign: "right" },
        { title: "prompt tokens", field: "prompt_tokens", hozAlign: "right" },
        { title: "completion tokens", field: "completion_tokens", hozAlign: "right" },
        { title: "cost", field: "cost_usd", formatter: money, hozAlign: "right" },
        { title: "per 1k requests", field: "cost_per_1k_requests", formatter: money, hozAlign: "right" },
        { title: "per 1M tokens", field: "cost_per_1m_tokens", formatter: money, hozAlign: "right" }],
      { name: `spend-by-${g}` }),
      h("h2", "Adoption: requests per team per day"),
      adoptRows.length ? chart({ type: "line", data: { labels: days, datasets: teams.map((t, i) => ({ label: t,
        borderColor: color(i), backgroundColor: color(i),
        data: days.map(d => (adoptRows.find(r => r.team === t && r.day === d) || { requests: 0 }).requests) })) } },
      { label: "requests per team per day", height: 220 }) : null,
      table(adoptRows, [{ title: "day", field: "day" }, { title: "team", field: "team" },
        { title: "requests", field: "requests", hozAlign: "right" }, { title: "tokens", field: "tokens", hozAlign: "right" },
        { title: "active keys", field: "active_keys", hozAlign: "right" },
        { title: "cost", field: "cost_usd", formatter: money, hozAlign: "right" }], { name: "adoption" }),
      budgetPart);
  }

  async function budgets() {
    const subjects = [];
    if (admin && session.me.governance) {
      for (const t of (await api("/v1/admin/teams")).data) if (t.budget) subjects.push([["team", t.name], t.budget]);
      for (const k of keys.filter(k => k.budget_status && k.status === "active")) subjects.push([["key_id", k.id], k.budget_status]);
    } else if (session.me.budget) subjects.push([["key_id", session.me.key_id], session.me.budget]);
    if (!subjects.length) return h("div", h("h2", "Budgets"), h("p.muted", "No team or key has a budget."));
    const parts = await Promise.all(subjects.slice(0, 12).map(([s, b]) => burnDown(s, b)));
    return h("div", h("h2", "Budget burn-down"),
      table(parts.map(p => p.row), [{ title: "scope", field: "scope" }, { title: "subject", field: "subject" },
        { title: "period", field: "period" }, { title: "budget", field: "budget_usd", formatter: money },
        { title: "spent", field: "spent_usd", formatter: money }, { title: "reserved", field: "reserved_usd", formatter: money },
        { title: "remaining", field: "remaining_usd", formatter: money },
        { title: "projected at period end", field: "projected_usd", formatter: money },
        { title: "on track", field: "on_track" }, { title: "resets", field: "resets_at" }], { name: "budgets" }),
      h("div.grid", parts.map(p => h("div.card", h("strong", `${p.row.scope} ${p.row.subject}`), p.chart))));
  }

  for (const s of [group, grain, since]) s.addEventListener("change", () => draw().catch(e => clear(out, String(e))));
  clear(el, h("div.card.row", field("Group by", group), field("Per", grain), field("Window", since)), out);
  await draw();
}
