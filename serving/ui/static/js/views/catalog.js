// Catalog: the models, adapters and routes this key may use (GET /v1/catalog), with what a team needs to choose.
import { api, clear, copyButton, fmt, h } from "../core.js";

function snippets(id) {
  const base = `${location.origin}/v1`;
  const py = `from openai import OpenAI\n\nclient = OpenAI(base_url="${base}", api_key="<your key>")\n` +
    `r = client.chat.completions.create(\n    model="${id}",\n    messages=[{"role": "user", "content": "Hello"}],\n)\n` +
    `print(r.choices[0].message.content)`;
  const curl = `curl ${base}/chat/completions \\\n  -H "Authorization: Bearer $LORAPLEX_API_KEY" \\\n` +
    `  -H "Content-Type: application/json" \\\n  -d '${JSON.stringify({ model: id, messages: [{ role: "user", content: "Hello" }] })}'`;
  return h("details", h("summary", "Use it"),
    h("div.row", h("strong", "Python (openai)"), copyButton(py)), h("pre", py),
    h("div.row", h("strong", "curl"), copyButton(curl)), h("pre", curl));
}

function kv(pairs) {
  return h("dl.kv", pairs.filter(p => p).map(([k, v]) => [h("dt", k), h("dd", v)]));
}

function card(m) {
  const live = m.live || {};
  const pairs = [
    m.kind === "adapter" ? ["base", m.parent] : null,
    m.kind === "model" || m.kind === "adapter" ? ["context", m.max_model_len ? `${fmt.int(m.max_model_len)} tokens` : "–"] : null,
    m.price ? ["price / 1M tokens", `${fmt.usd(m.price.input_per_1m)} in · ${fmt.usd(m.price.output_per_1m)} out`] : null,
    m.live ? ["TTFT p50 / p99", `${fmt.ms(live.ttft_p50_ms)} / ${fmt.ms(live.ttft_p99_ms)}`] : null,
    m.live ? ["inter-token p50 / p99", `${fmt.ms(live.itl_p50_ms)} / ${fmt.ms(live.itl_p99_ms)}`] : null,
    m.live ? ["queue", `${fmt.int(live.running)} running · ${fmt.int(live.waiting)} waiting on ${fmt.int(live.replicas)} replica(s)`] : null,
    m.residency ? ["residency", `${m.residency.gpu} replica(s) in a device slot · ${m.residency.cpu} in host memory`] : null,
    m.kind === "route" ? ["policy", m.policy] : null,
    m.kind === "route" ? ["candidates", (m.candidates || []).join(", ")] : null,
    m.kind === "embedding" ? ["dimensions", String(m.dim)] : null,
    m.aliases && m.aliases.length ? ["aliases", m.aliases.join(", ")] : null,
    m.kind === "model" ? ["weights", m.root] : null,
    m.kind === "adapter" ? ["source", m.root] : null,
  ];
  const lin = m.lineage;
  const lineage = lin ? (lin.error ? h("p.error", lin.error) : h("div", h("h2", "Lineage (MLflow)"), kv([
    ["registered model", `${lin.registered_model} v${lin.version}`],
    ["aliases", (lin.aliases || []).join(", ") || "–"],
    ["registered by", `${lin.registered_by || "–"} at ${fmt.time(lin.registered_at)}`],
    ["run", lin.run_id || "–"], ["base", lin.base_model || "–"], ["dataset", lin.dataset || "–"],
    ...Object.entries(lin.metrics || {}).map(([k, v]) => [k, typeof v === "number" ? v.toFixed(4) : String(v)]),
  ]))) : null;
  return h("div.card", { dataset: { model: m.id } },
    h("div.row", h("strong", m.id), h("span.badge", m.kind)),
    kv(pairs), lineage, m.kind !== "embedding" ? snippets(m.id) : null);
}

export async function render(el) {
  const data = (await api("/v1/catalog")).data;
  const order = { model: 0, adapter: 1, route: 2, embedding: 3 };
  data.sort((a, b) => order[a.kind] - order[b.kind] || a.id.localeCompare(b.id));
  clear(el, data.length ? h("div.grid", data.map(card)) : h("p.muted", "This key may use no model yet."));
}
