// Fine-tuning: upload a JSONL file (the server validates it line by line before any job exists), write or
// pick a config (validated as you type: errors name the key path), launch a job, watch its loss and events
// live, compare its eval with the champion's and, for admins, promote it and load it into serving.
import { action, api, chart, clear, color, errorBox, field, fmt, h, role, table } from "../core.js";

const POLL_MS = 2000;

export async function render(el, params) {
  let timer = null;
  const models = (await api("/v1/catalog")).data.filter(m => m.kind === "model");
  const file = h("input", { type: "file", id: "ft-file", accept: ".jsonl,.json,.csv" });
  const upload = h("button", { type: "button", id: "ft-upload" }, "Upload");
  const upOut = h("div", { id: "ft-upload-out" });
  const fileSel = h("select", { id: "ft-training-file" });
  const model = h("select", { id: "ft-model" }, models.map(m => h("option", { value: m.id }, m.id)));
  const suffix = h("input", { id: "ft-suffix", placeholder: "support", value: "portal" });
  const editor = h("textarea", { id: "ft-config", rows: 14, spellcheck: false });
  const check = h("div", { id: "ft-config-check" });
  const launch = h("button", { type: "button", id: "ft-launch" }, "Launch job");
  const launchOut = h("div");
  const jobs = h("div");
  const detail = h("div", { id: "ft-job" });
  let parsed = null;

  async function files() {
    const data = (await api("/v1/files?purpose=fine-tune")).data;
    const keep = fileSel.value;
    clear(fileSel, data.map(f => h("option", { value: f.id }, `${f.filename} (${f.id})`)));
    if (keep) fileSel.value = keep;
  }

  action(upload, async () => {
    if (!file.files.length) throw new Error("choose a JSONL file first");
    const form = new FormData();
    form.append("purpose", "fine-tune");
    form.append("file", file.files[0], file.files[0].name);
    const made = await api("/v1/files", { method: "POST", form });
    await files();
    fileSel.value = made.id;
    clear(upOut, h("p.ok", `${made.filename}: ${fmt.int(made.bytes)} bytes, checked and stored as ${made.id}.`));
  }, upOut);

  let pending = null;
  async function validate() {
    const r = await api("/v1/fine_tuning/validate", { method: "POST", body: { config: editor.value } });
    parsed = r.valid ? r.config : null;
    launch.disabled = !r.valid;
    clear(check, r.valid ? h("p.ok", "Config is valid.") :
      h("ul.error", r.errors.map(e => h("li", h("code", e.path), ": ", e.message))));
  }
  editor.addEventListener("input", () => { clearTimeout(pending); pending = setTimeout(() => validate().catch(e => clear(check, errorBox(e))), 250); });

  // Start from: the template, or the config of an earlier job (to run it again with changes).
  const pick = h("select", { id: "ft-pick" }, h("option", { value: "" }, "the template"));
  async function template() {
    const path = pick.value ? `/v1/fine_tuning/jobs/${encodeURIComponent(pick.value)}/config`
      : `/v1/fine_tuning/template?model=${encodeURIComponent(model.value)}`;
    editor.value = (await api(path)).config;
    await validate();
  }
  pick.addEventListener("change", () => template().catch(e => clear(check, errorBox(e))));

  action(launch, async () => {
    if (!fileSel.value) throw new Error("upload or choose a training file first");
    if (!parsed) throw new Error("fix the config first");
    const job = await api("/v1/fine_tuning/jobs", { method: "POST",
      body: { model: model.value, training_file: fileSel.value, suffix: suffix.value || undefined, config: parsed } });
    await list();
    location.hash = `#/fine-tuning?job=${encodeURIComponent(job.id)}`;
  }, launchOut);

  async function list() {
    const data = (await api("/v1/fine_tuning/jobs?limit=50")).data;
    const keep = pick.value;
    clear(pick, h("option", { value: "" }, "the template"), data.map(j => h("option", { value: j.id }, `job ${j.id} (${j.status})`)));
    pick.value = keep;
    clear(jobs, table(data.map(j => ({ ...j, created: fmt.time(j.created_at) })), [
      { title: "job", field: "id" }, { title: "status", field: "status" }, { title: "base", field: "model" },
      { title: "adapter", field: "fine_tuned_model" }, { title: "created", field: "created" }],
    { name: "fine-tuning-jobs", onRowClick: (j) => { location.hash = `#/fine-tuning?job=${encodeURIComponent(j.id)}`; } }));
  }

  async function events(id) {
    let out = [], after = null;
    for (let page = 0; page < 20; page++) {
      const r = await api(`/v1/fine_tuning/jobs/${encodeURIComponent(id)}/events?limit=100${after ? `&after=${encodeURIComponent(after)}` : ""}`);
      out = out.concat(r.data);
      if (!r.has_more || !r.data.length) break;
      after = r.data[r.data.length - 1].id;
    }
    return out;
  }

  async function show(id) {
    const loss = chart({ type: "line", data: { labels: [], datasets: [
      { label: "train loss", data: [], borderColor: color(0), backgroundColor: color(0) },
      { label: "eval loss", data: [], borderColor: color(2), backgroundColor: color(2), showLine: false, pointRadius: 5 }] },
    options: { scales: { x: { title: { display: true, text: "step" } }, y: { title: { display: true, text: "loss" } } } } },
    { label: "loss curve", height: 240 });
    loss.id = "ft-loss";
    const head = h("div");
    const log = h("div", { id: "ft-events" });
    const compare = h("div", { id: "ft-compare" });
    const cancel = h("button.danger", { type: "button", id: "ft-cancel" }, "Cancel job");
    action(cancel, async () => { await api(`/v1/fine_tuning/jobs/${encodeURIComponent(id)}/cancel`, { method: "POST" }); }, head);
    clear(detail, h("div.card", head, loss, compare, h("h2", "Events"), log));
    let compared = false;
    async function poll() {
      const job = await api(`/v1/fine_tuning/jobs/${encodeURIComponent(id)}`);
      const evs = (await events(id)).reverse();  // oldest first
      const pts = evs.filter(e => e.data && typeof e.data.loss === "number" && typeof e.data.step === "number");
      const evals = evs.filter(e => e.data && typeof e.data.eval_loss === "number");
      const steps = [...new Set(pts.map(e => e.data.step).concat(evals.map(e => e.data.step)))].sort((a, b) => a - b);
      const c = loss.chart;
      c.data.labels = steps;
      c.data.datasets[0].data = steps.map(s => { const e = pts.find(p => p.data.step === s); return e ? e.data.loss : null; });
      c.data.datasets[1].data = steps.map(s => { const e = evals.find(p => p.data.step === s); return e ? e.data.eval_loss : null; });
      c.data.datasets[0].spanGaps = true;
      c.update();
      const running = ["queued", "running", "validating_files"].includes(job.status);
      clear(head, h("div.row", h("h2", `Job ${job.id}`), h("span.badge", { id: "ft-status" }, job.status), running ? cancel : null),
        h("dl.kv", [["base", job.model], ["adapter", job.fine_tuned_model || "–"], ["trained tokens", fmt.int(job.trained_tokens)],
          ["registered", job.model_uri || "–"], ["MLflow run", job.mlflow_run_id || "–"], ["finished", fmt.time(job.finished_at)]]
          .map(([k, v]) => [h("dt", k), h("dd", v)])),
        job.error ? errorBox(job.error.message || JSON.stringify(job.error)) : null);
      clear(log, evs.slice(-40).reverse().map(e => h("div.muted", `${fmt.time(e.created_at)} ${e.level}: `, h("span", e.message))));
      if (job.status === "succeeded" && !compared) { compared = true; await evaluation(job, compare); }
      if (!running) { clearInterval(timer); timer = null; }
    }
    await poll();
    if (!timer) timer = setInterval(() => poll().catch(e => clear(head, errorBox(e))), POLL_MS);
  }

  async function evaluation(job, out) {
    const ev = await api(`/v1/fine_tuning/jobs/${encodeURIComponent(job.id)}/evaluation`);
    const names = [...new Set([...Object.keys(ev.candidate.metrics), ...Object.keys((ev.champion || {}).metrics || {})])]
      .filter(k => k.startsWith("eval_") || k === "loss").sort();
    const rows = names.map(k => ({ metric: k, candidate: ev.candidate.metrics[k], champion: ev.champion ? ev.champion.metrics[k] : null }));
    const alias = h("input", { id: "ft-alias", value: "champion" });
    const promote = h("button", { type: "button", id: "ft-promote" }, "Promote and load into serving");
    const pOut = h("div", { id: "ft-promote-out" });
    action(promote, async () => {
      const p = await api(`/v1/fine_tuning/jobs/${encodeURIComponent(job.id)}/promote`, { method: "POST", body: { alias: alias.value } });
      const loaded = await api("/v1/adapters", { method: "POST", body: { name: p.registered_model, source: p.model_uri, base: p.base_model } });
      clear(pOut, h("p.ok", `${p.model_uri} → version ${p.version}; serving it as ${loaded.id || p.registered_model}.`));
    }, pOut);
    clear(out, h("h2", `Evaluation: ${ev.registered_model} v${ev.candidate.version} against ${ev.champion ? "champion v" + ev.champion.version : "no champion yet"}`),
      table(rows, [{ title: "metric", field: "metric" },
        { title: "this job", field: "candidate", formatter: c => c.getValue() == null ? "–" : c.getValue().toFixed(4) },
        { title: "champion", field: "champion", formatter: c => c.getValue() == null ? "–" : c.getValue().toFixed(4) }], { name: "evaluation" }),
      role("admin") ? h("div.row", field("Alias", alias), promote) : h("p.muted", "An admin can promote this adapter."), pOut);
  }

  model.addEventListener("change", () => template().catch(e => clear(check, errorBox(e))));
  clear(el, h("div.cols",
    h("div.card", h("h2", "1. Training data"), field("JSONL file (chat, alpaca or completion records)", file), upload, upOut,
      field("Training file", fileSel), h("h2", "2. Job"), field("Base model", model), field("Name suffix", suffix),
      launch, launchOut),
    h("div.card", h("div.row", h("h2", "Config"), field("Start from", pick)), editor, check)),
    h("h2", "Jobs"), jobs, detail);
  await Promise.all([files(), list(), template()]);
  if (params.job) await show(params.job);
  return { stop() { if (timer) clearInterval(timer); } };
}
