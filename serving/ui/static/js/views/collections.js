// Collections: create, upload documents (txt, md, html, pdf), see chunks, run a test query with scores,
// delete. The /v1/collections routes, as the SDKs use them.
import { action, api, clear, errorBox, field, fmt, h, table } from "../core.js";

export async function render(el, params) {
  const list = h("div");
  const detail = h("div", { id: "coll-detail" });
  const name = h("input", { id: "coll-name", placeholder: "docs" });
  const create = h("button", { type: "button", id: "coll-create" }, "Create");
  const createOut = h("div");
  action(create, async () => {
    await api("/v1/collections", { method: "POST", body: { name: name.value.trim() } });
    const made = name.value.trim();
    name.value = "";
    await refresh();
    await open(made);
  }, createOut);

  async function refresh() {
    const data = (await api("/v1/collections")).data;
    clear(list, table(data.map(c => ({ ...c, created: fmt.time(c.created_at) })), [
      { title: "name", field: "name" }, { title: "documents", field: "documents", hozAlign: "right" },
      { title: "chunks", field: "chunks", hozAlign: "right" }, { title: "embedding model", field: "embedding_model" },
      { title: "created", field: "created" }], { name: "collections", onRowClick: (row) => open(row.name) }));
  }

  async function open(coll, doc, chunk, notice) {
    const info = await api(`/v1/collections/${encodeURIComponent(coll)}`);
    const docs = (await api(`/v1/collections/${encodeURIComponent(coll)}/documents`)).data;
    const file = h("input", { type: "file", id: "coll-file", accept: ".txt,.md,.markdown,.html,.htm,.pdf", multiple: true });
    const upload = h("button", { type: "button", id: "coll-upload" }, "Upload");
    const upOut = h("div", notice ? h("p.ok", notice) : null);
    action(upload, async () => {
      if (!file.files.length) throw new Error("choose a file first");
      const form = new FormData();
      for (const f of file.files) form.append("files", f, f.name);
      const r = await api(`/v1/collections/${encodeURIComponent(coll)}/documents`, { method: "POST", form });
      await refresh();
      await open(coll, null, null, `Added ${(r.data || []).length} document(s).`);  // redrawn: the note goes in the new view
    }, upOut);
    const q = h("input", { id: "coll-query", placeholder: "a test query" });
    const ask = h("button", { type: "button", id: "coll-ask" }, "Query");
    const hits = h("div", { id: "coll-hits" });
    action(ask, async () => {
      const r = await api(`/v1/collections/${encodeURIComponent(coll)}/query`, { method: "POST", body: { query: q.value, k: 5 } });
      clear(hits, r.data.map(x => h("div.chunk", h("div.muted", `score ${x.score.toFixed(4)} · ${x.document_id} · chunk ${x.id}`), x.text)));
    }, hits);
    const del = h("button.danger", { type: "button", id: "coll-delete" }, "Delete collection");
    action(del, async () => {
      if (!confirm(`Delete collection ${coll} and its documents?`)) return;
      await api(`/v1/collections/${encodeURIComponent(coll)}`, { method: "DELETE" });
      clear(detail);
      await refresh();
    }, upOut);
    const chunks = h("div", { id: "coll-chunks" });
    async function showDoc(docId, highlight) {
      const r = await api(`/v1/collections/${encodeURIComponent(coll)}/chunks?document_id=${encodeURIComponent(docId)}`);
      clear(chunks, h("h2", `Chunks of ${docId}`), r.data.map(c => h("div.chunk" + (String(c.id) === String(highlight) ? ".hit" : ""),
        { id: `chunk-${c.id}` }, h("div.muted", `chunk ${c.id} · characters ${c.start}–${c.end}`), c.text)));
      const target = document.getElementById(`chunk-${highlight}`);
      if (target) target.scrollIntoView({ block: "center" });
    }
    const docTable = table(docs.map(d => ({ ...d, metadata_text: JSON.stringify(d.metadata), updated: fmt.time(d.updated_at) })), [
      { title: "document", field: "id" }, { title: "source", field: "source" }, { title: "chars", field: "chars", hozAlign: "right" },
      { title: "chunks", field: "chunks", hozAlign: "right" }, { title: "metadata", field: "metadata_text" },
      { title: "updated", field: "updated" }], { name: `documents-${coll}`, onRowClick: (d) => showDoc(d.id).catch(e => clear(chunks, errorBox(e))) });
    clear(detail, h("div.card", h("div.row", h("h2", `Collection ${coll}`), del),
      h("p.muted", `${info.documents} documents, ${info.chunks} chunks, ${info.embedding_model}`),
      h("div.row", field("Upload documents", file), upload), upOut,
      h("h2", "Documents"), docTable, chunks,
      h("h2", "Test query"), h("div.row", q, ask), hits));
    if (doc) await showDoc(doc, chunk);
  }

  clear(el, h("div.card.row", field("New collection", name), create, createOut), list, detail);
  await refresh();
  if (params.name) await open(params.name, params.doc, params.chunk);
}
