// Playground: a streamed chat with any model, adapter or route this key may use, through POST
// /v1/chat/completions like any client. Each answer says which model served it and why, its TTFT, tokens
// and cost (the catalog's price per 1M tokens, which is what the gateway charges).
import { ApiError, api, clear, errorBox, field, fmt, h, stream } from "../core.js";

export async function render(el) {
  const models = (await api("/v1/catalog")).data.filter(m => m.kind !== "embedding");
  let collections = [];
  try { collections = (await api("/v1/collections")).data; } catch (_) { /* collections off or not allowed */ }
  const price = Object.fromEntries(models.map(m => [m.id, m.price]));

  const model = h("select", { id: "pg-model" }, models.map(m => h("option", { value: m.id }, `${m.id} (${m.kind})`)));
  const system = h("textarea", { id: "pg-system", placeholder: "You are a helpful assistant." });
  const temperature = h("input", { id: "pg-temperature", type: "number", min: 0, max: 2, step: 0.1, value: 0 });
  const maxTokens = h("input", { id: "pg-max-tokens", type: "number", min: 1, max: 4096, value: 64 });
  const collection = h("select", { id: "pg-collection" }, h("option", { value: "" }, "(none)"),
    collections.map(c => h("option", { value: c.name }, c.name)));
  const schema = h("textarea", { id: "pg-schema", placeholder: '{"type": "object", "properties": {...}}' });
  const tools = h("textarea", { id: "pg-tools", placeholder: '[{"type": "function", "function": {"name": ..., "parameters": {...}}}]' });
  const input = h("textarea", { id: "pg-input", placeholder: "Ask something…", rows: 3 });
  const send = h("button", { id: "pg-send", type: "submit" }, "Send");
  const reset = h("button.secondary", { type: "button" }, "New chat");
  const log = h("div.chat", { id: "pg-log" });
  const history = [];

  reset.addEventListener("click", () => { history.length = 0; clear(log); });
  const form = h("form", log, field("Message", input), h("div.row", send, reset));
  form.addEventListener("submit", async (ev) => {
    ev.preventDefault();
    const text = input.value.trim();
    if (!text) return;
    input.value = "";
    send.disabled = true;
    try { await ask(text); } finally { send.disabled = false; }
  });

  async function ask(text) {
    const body = { model: model.value, stream: true, stream_options: { include_usage: true },
      temperature: Number(temperature.value), max_tokens: Number(maxTokens.value),
      messages: [...(system.value.trim() ? [{ role: "system", content: system.value }] : []), ...history,
        { role: "user", content: text }] };
    if (collection.value) body.retrieval = { collection: collection.value, k: 3 };
    const out = h("div.msg.assistant");
    try {
      if (schema.value.trim()) body.response_format = { type: "json_schema", json_schema: { name: "answer", schema: JSON.parse(schema.value) } };
      if (tools.value.trim()) body.tools = JSON.parse(tools.value);
    } catch (err) {
      log.append(errorBox(`The schema or tools are not valid JSON: ${err.message}`));
      return;
    }
    log.append(h("div.msg.user", text), out);
    const answer = h("span.answer");
    const meta = h("div.meta");
    out.append(answer, meta);
    const t0 = performance.now();
    let ttft = null, usage = null, servedBy = null, citations = null, toolCalls = [], finish = null;
    let resp;
    try {
      resp = await stream("/v1/chat/completions", body, (chunk) => {
        servedBy = chunk.model || servedBy;
        if (chunk.usage) usage = chunk.usage;
        if (chunk.citations) citations = chunk.citations;
        for (const c of chunk.choices || []) {
          const d = c.delta || {};
          if (d.content) {
            if (ttft === null) ttft = performance.now() - t0;
            answer.append(d.content);  // text node: whatever the model says stays text
          }
          for (const tc of d.tool_calls || []) {
            if (ttft === null) ttft = performance.now() - t0;
            toolCalls[tc.index] = toolCalls[tc.index] || { name: "", arguments: "" };
            if (tc.function && tc.function.name) toolCalls[tc.index].name += tc.function.name;
            if (tc.function && tc.function.arguments) toolCalls[tc.index].arguments += tc.function.arguments;
          }
          if (c.finish_reason) finish = c.finish_reason;
        }
        log.scrollTop = log.scrollHeight;
      });
    } catch (err) {
      out.append(errorBox(err instanceof ApiError ? err : String(err)));
      return;
    }
    for (const tc of toolCalls.filter(Boolean)) out.insertBefore(h("pre.tool-call", `${tc.name}(${tc.arguments})`), meta);
    history.push({ role: "user", content: text }, { role: "assistant", content: answer.textContent });
    const routed = resp.headers.get("x-routed-model");
    const decision = resp.headers.get("x-route-decision");
    const p = price[routed || model.value] || price[model.value];
    const cost = usage && p ? (usage.prompt_tokens * p.input_per_1m + usage.completion_tokens * p.output_per_1m) / 1e6 : null;
    clear(meta,
      h("span.served", `model ${routed || servedBy || model.value}`), " · ",
      h("span.ttft", `TTFT ${fmt.ms(ttft)}`), " · ",
      h("span.tokens", usage ? `${usage.prompt_tokens} prompt + ${usage.completion_tokens} completion tokens` : "tokens –"), " · ",
      h("span.cost", `cost ${cost === null ? "–" : "$" + cost.toPrecision(4)}`),
      finish ? ` · finish ${finish}` : "",
      decision ? h("div.decision", `router: ${decision}`) : null);
    if (citations && citations.length) {
      out.append(h("div.cites", "Sources: ", citations.map(c => h("a", {
        href: `#/collections?name=${encodeURIComponent(collection.value)}&doc=${encodeURIComponent(c.document_id)}&chunk=${encodeURIComponent(c.chunk_id)}`,
        title: c.chunk }, `[${c.index}] ${c.document_id}`))));
    }
  }

  clear(el, h("div.cols",
    h("div.card", field("Model, adapter or route", model), field("System prompt", system),
      h("div.row", field("Temperature", temperature), field("Max tokens", maxTokens)),
      field("Retrieval collection", collection, "its top chunks go into the prompt; the answer cites them"),
      field("JSON schema (optional)", schema, "the answer is constrained to it"),
      field("Tools (optional)", tools, "OpenAI function tools, as JSON")),
    h("div.card", form)));
}
