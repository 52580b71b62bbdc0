// Operations: GET /v1/operations every few seconds (the numbers /metrics exports): TTFT and inter-token
// latency p50/p99, queues, KV-cache use, prefix-cache hit rate, adapter residency and replicas per deployment.
import { api, chart, clear, color, fmt, h, table } from "../core.js";

const REFRESH_MS = 3000;
const HISTORY = 60;  // points kept for the live charts (3 minutes)

export async function render(el) {
  const status = h("p.muted", { id: "ops-updated" });
  const models = h("div");
  const latency = h("div");
  const ttftChart = chart({ type: "line", data: { labels: [], datasets: [] },
    options: { scales: { y: { beginAtZero: true, title: { display: true, text: "ms" } } } } }, { label: "TTFT p50 over time", height: 220 });
  const queueChart = chart({ type: "line", data: { labels: [], datasets: [] },
    options: { scales: { y: { beginAtZero: true, title: { display: true, text: "requests" } } } } }, { label: "queue over time", height: 220 });
  clear(el, status, h("div.grid", h("div.card", h("strong", "TTFT p50 (ms)"), ttftChart),
    h("div.card", h("strong", "Running + waiting requests"), queueChart)),
    h("h2", "Deployments"), models, h("h2", "Latency by model and adapter (since the gateway started)"), latency);

  const modelTable = table([], [
    { title: "deployment", field: "model" }, { title: "ready", field: "ready" },
    { title: "replicas", field: "replicas", hozAlign: "right" }, { title: "running", field: "running", hozAlign: "right" },
    { title: "waiting", field: "waiting", hozAlign: "right" }, { title: "slots", field: "max_num_seqs", hozAlign: "right" },
    { title: "KV cache used", field: "kv_cache_usage", formatter: c => fmt.pct(c.getValue()), hozAlign: "right" },
    { title: "prefix hit rate", field: "prefix_cache_hit_rate", formatter: c => fmt.pct(c.getValue()), hozAlign: "right" },
    { title: "preemptions", field: "preemptions", hozAlign: "right" },
    { title: "adapters (device slot / host)", field: "adapter_text" }], { name: "deployments" });
  const latTable = table([], [
    { title: "model", field: "model" }, { title: "adapter", field: "adapter" },
    { title: "requests", field: "requests", hozAlign: "right" }, { title: "errors", field: "errors", hozAlign: "right" },
    ...["ttft", "itl", "e2e"].flatMap(k => [
      { title: `${k.toUpperCase()} p50`, field: `${k}_p50`, formatter: c => fmt.ms(c.getValue()), hozAlign: "right" },
      { title: `${k.toUpperCase()} p99`, field: `${k}_p99`, formatter: c => fmt.ms(c.getValue()), hozAlign: "right" }])],
  { name: "latency" });
  models.append(modelTable);
  latency.append(latTable);

  async function tick() {
    const ops = await api("/v1/operations");
    const rows = ops.models.map(m => ({ ...m, adapter_text: m.adapters.map(a => `${a.name} ${a.gpu}/${a.cpu}`).join(", ") || "–" }));
    modelTable.tabulator.replaceData(rows);
    latTable.tabulator.replaceData(ops.latency.map(r => ({ model: r.model, adapter: r.adapter || "(base)",
      requests: r.requests, errors: r.errors,
      ...Object.fromEntries(["ttft", "itl", "e2e"].flatMap(k => [[`${k}_p50`, r[k] && r[k].p50_ms], [`${k}_p99`, r[k] && r[k].p99_ms]])) })));
    const label = new Date(ops.time * 1000).toISOString().slice(11, 19);
    const base = Object.fromEntries(ops.latency.filter(r => !r.adapter).map(r => [r.model, r.ttft && r.ttft.p50_ms]));
    push(ttftChart.chart, label, Object.fromEntries(ops.models.map(m => [m.model, base[m.model] ?? null])));
    push(queueChart.chart, label, Object.fromEntries(ops.models.map(m => [m.model, m.running + m.waiting])));
    status.textContent = `Updated ${label} UTC; refreshes every ${REFRESH_MS / 1000} s.`;
  }

  function push(c, label, values) {
    c.data.labels.push(label);
    if (c.data.labels.length > HISTORY) c.data.labels.shift();
    for (const [name, v] of Object.entries(values)) {
      let ds = c.data.datasets.find(d => d.label === name);
      if (!ds) {
        const i = c.data.datasets.length;
        ds = { label: name, data: new Array(c.data.labels.length - 1).fill(null), borderColor: color(i), backgroundColor: color(i) };
        c.data.datasets.push(ds);
      }
      ds.data.push(v);
      if (ds.data.length > HISTORY) ds.data.shift();
    }
    c.update();
  }

  await tick();
  const timer = setInterval(() => tick().catch(err => { status.textContent = `Refresh failed: ${err.message}`; }), REFRESH_MS);
  return { stop() { clearInterval(timer); } };
}
