"""CollectionService: the RAG service object behind the API, the Ray Serve deployment and `loraplex ingest`.

    svc = CollectionService()                      # data in <home>/rag/
    svc.create_collection("docs", index="hnsw")
    svc.add_documents("docs", [{"id": "faq", "text": "...", "metadata": {"lang": "en"}}])
    svc.query("docs", "how do I reset my password?", k=5, filter={"lang": "en"})

Writes are all-or-nothing per call: inputs are validated, parsed, chunked and embedded first, then one SQLite
transaction changes the catalogue, the index is updated and saved, and the transaction commits.
"""

from __future__ import annotations

import hashlib
import json
import shutil
import threading
from collections import defaultdict
from pathlib import Path
from typing import Any, Callable

import numpy as np

from serving.models import DEFAULT_EMBEDDING_MODEL
from serving.rag.chunking import chunk_text
from serving.rag.errors import DocumentNotFoundError, InvalidInputError, RagError
from serving.rag.filters import check_filter, matches
from serving.rag.index import IndexCorruptError, VectorIndex, check_params
from serving.rag.parsers import parse_bytes
from serving.rag.store import Store, check_doc_id, check_name

MAX_K = 100
MAX_DOCUMENT_CHARS = 20_000_000
MAX_QUERY_CHARS = 20_000


def _int_field(value, param: str, low: int, high: int) -> int:
    if not isinstance(value, int) or isinstance(value, bool) or not low <= value <= high:
        raise InvalidInputError(f"{param} must be an integer between {low} and {high}, got {value!r}", param=param)
    return value


class CollectionService:
    """Thread-safe. One instance per process owns the in-memory indexes; other processes sharing the data
    directory are noticed through the store's per-collection seq (their writes trigger a reload here)."""

    def __init__(self, home: str | Path | None = None, device: str = "cpu",
                 embedder_factory: Callable[[str], Any] | None = None, max_k: int = MAX_K):
        from loraplex.paths import subdir

        root = Path(home) / "rag" if home is not None else subdir("rag")
        self.store = Store(root)
        self.device = device
        self.max_k = max_k
        self._embedder_factory = embedder_factory
        self._embedders: dict[str, Any] = {}
        self._embedders_lock = threading.Lock()
        self._indexes: dict[str, tuple[str, int, VectorIndex]] = {}  # name -> (uid, seq, index)
        self._locks: dict[str, threading.RLock] = defaultdict(threading.RLock)
        self._locks_lock = threading.Lock()
        self._metadata: dict[str, tuple[int, dict[str, dict]]] = {}  # name -> (seq, doc_id -> metadata)

    def close(self) -> None:
        self.store.close()

    # ---- helpers -------------------------------------------------------------------------------------
    def _lock(self, name: str) -> threading.RLock:
        with self._locks_lock:
            return self._locks[name]

    def embedder(self, model: str | None = None):
        """The (cached) embedder for `model`; the default all-MiniLM-L6-v2 when None."""
        model = model or DEFAULT_EMBEDDING_MODEL
        with self._embedders_lock:
            if model not in self._embedders:
                try:
                    if self._embedder_factory is not None:
                        self._embedders[model] = self._embedder_factory(model)
                    else:
                        from serving.embeddings import Embedder

                        self._embedders[model] = Embedder(model, device=self.device)
                except RagError:
                    raise
                except Exception as exc:  # unknown model, unreachable hub, not a text encoder
                    raise InvalidInputError(f"cannot load embedding model {model!r}: {exc}",
                                            param="embedding_model", code="model_not_found") from None
            return self._embedders[model]

    def _describe(self, coll: dict, counts: tuple[int, int] | None = None) -> dict:
        docs, chunks = counts if counts is not None else self.store.counts(coll["name"])
        return {
            "object": "collection", "name": coll["name"], "embedding_model": coll["embedding_model"],
            "dim": coll["dim"], "index": coll["index_kind"], "index_params": coll["index_params"],
            "chunk_tokens": coll["chunk_tokens"], "chunk_overlap": coll["chunk_overlap"],
            "created_at": coll["created_at"], "documents": docs, "chunks": chunks,
        }

    def _index(self, coll: dict) -> VectorIndex:
        """The collection's index, current with the store: cached, else loaded from disk, else rebuilt."""
        name, seq = coll["name"], self.store.seq(coll["name"])
        cached = self._indexes.get(name)
        if cached and cached[0] == coll["uid"] and cached[1] == seq:
            return cached[2]
        folder = self.store.index_dir(coll)
        index = None
        if VectorIndex.saved_seq(folder) == seq:
            try:
                index, _ = VectorIndex.load(folder, device=self.device)
                if index.dim != coll["dim"]:
                    index = None
            except (IndexCorruptError, OSError, ValueError, RuntimeError):
                index = None
        if index is None:  # missing, stale or corrupt: rebuild from the vectors in SQLite
            index = VectorIndex(coll["dim"], coll["index_kind"], coll["index_params"], device=self.device)
            ids, vecs = self.store.vectors(name, coll["dim"])
            index.add(ids, vecs)
            index.save(folder, seq)
        self._indexes[name] = (coll["uid"], seq, index)
        return index

    def _doc_metadata(self, name: str) -> dict[str, dict]:
        seq = self.store.seq(name)
        cached = self._metadata.get(name)
        if cached is None or cached[0] != seq:
            cached = (seq, {d["doc_id"]: d["metadata"] for d in self.store.documents(name)})
            self._metadata[name] = cached
        return cached[1]

    # ---- collections ---------------------------------------------------------------------------------
    def create_collection(self, name: str, embedding_model: str | None = None, index: str = "flat",
                          index_params: dict | None = None, chunk_tokens: int | None = None,
                          chunk_overlap: int | None = None) -> dict:
        check_name(name)
        if embedding_model is not None and (not isinstance(embedding_model, str) or not embedding_model.strip()):
            raise InvalidInputError("embedding_model must be a non-empty string", param="embedding_model")
        if index_params is not None and not isinstance(index_params, dict):
            raise InvalidInputError("index_params must be an object", param="index_params")
        params = check_params(index, index_params)
        model = embedding_model or DEFAULT_EMBEDDING_MODEL
        embedder = self.embedder(model)
        limit = embedder.max_tokens - 2  # [CLS] and [SEP]
        chunk_tokens = _int_field(200 if chunk_tokens is None else chunk_tokens, "chunk_tokens", 8, limit)
        overlap = _int_field(min(40, chunk_tokens // 5) if chunk_overlap is None else chunk_overlap,
                             "chunk_overlap", 0, chunk_tokens // 2)
        coll = self.store.create_collection(name, model, embedder.dim, index, params, chunk_tokens, overlap)
        return self._describe(coll, (0, 0))

    def get_collection(self, name: str) -> dict:
        return self._describe(self.store.get_collection(name))

    def list_collections(self) -> list[dict]:
        return [self._describe(c, (c["documents"], c["chunks"])) for c in self.store.list_collections()]

    def delete_collection(self, name: str) -> dict:
        with self._lock(name):
            coll = self.store.delete_collection(name)
            self._indexes.pop(name, None)
            self._metadata.pop(name, None)
            shutil.rmtree(self.store.index_dir(coll), ignore_errors=True)
        return {"object": "collection.deleted", "id": name, "deleted": True}

    # ---- documents -----------------------------------------------------------------------------------
    def _prepare(self, coll: dict, documents: list) -> list[dict]:
        """Validate and parse every document before anything is written."""
        if not isinstance(documents, list) or not documents:
            raise InvalidInputError("documents must be a non-empty list", param="documents")
        out, seen = [], set()
        for i, doc in enumerate(documents):
            where = f"documents[{i}]"
            if not isinstance(doc, dict):
                raise InvalidInputError(f"{where} must be an object", param=where)
            unknown = set(doc) - {"id", "text", "file", "metadata", "source"}
            if unknown:
                raise InvalidInputError(f"{where} has unknown fields: {', '.join(sorted(unknown))}", param=where)
            if ("text" in doc) == ("file" in doc):
                raise InvalidInputError(f"{where} needs exactly one of 'text' or 'file'", param=where)
            source = doc.get("source")
            if "file" in doc:
                f = doc["file"]
                if not isinstance(f, dict) or not isinstance(f.get("name"), str) or not isinstance(
                        f.get("data"), (bytes, bytearray)):
                    raise InvalidInputError(f"{where}.file must be {{'name': str, 'data': bytes}}", param=where)
                text = parse_bytes(f["name"], bytes(f["data"]))
                source = source or f["name"]
                default_id = f["name"]
            else:
                text = doc["text"]
                if not isinstance(text, str):
                    raise InvalidInputError(f"{where}.text must be a string", param=f"{where}.text")
                default_id = None
            if not text.strip():
                raise InvalidInputError(f"{where} is empty (no text to index)", param=f"{where}.text",
                                        code="empty_document")
            if len(text) > MAX_DOCUMENT_CHARS:
                raise InvalidInputError(f"{where} has {len(text)} characters; the limit is {MAX_DOCUMENT_CHARS}",
                                        param=f"{where}.text")
            content_hash = hashlib.sha256(text.encode("utf-8")).hexdigest()
            doc_id = check_doc_id(doc.get("id") or default_id or f"doc-{content_hash[:16]}", f"{where}.id")
            if doc_id in seen:
                raise InvalidInputError(f"{where}.id {doc_id!r} appears twice in this request", param=f"{where}.id")
            seen.add(doc_id)
            metadata = doc.get("metadata") or {}
            if not isinstance(metadata, dict) or not all(isinstance(k, str) for k in metadata):
                raise InvalidInputError(f"{where}.metadata must be an object with string keys",
                                        param=f"{where}.metadata")
            try:
                json.dumps(metadata, allow_nan=False)
            except (TypeError, ValueError) as exc:
                raise InvalidInputError(f"{where}.metadata is not JSON: {exc}", param=f"{where}.metadata") from None
            if source is not None and not isinstance(source, str):
                raise InvalidInputError(f"{where}.source must be a string", param=f"{where}.source")
            out.append({"id": doc_id, "text": text, "hash": content_hash, "metadata": metadata, "source": source})
        return out

    def _skip_reason(self, conn, name: str, doc: dict, taken: dict[str, str]) -> tuple[str, str | None] | None:
        old = self.store.get_document(conn, name, doc["id"])
        if old is not None and old["content_hash"] == doc["hash"]:
            # Same text: nothing to re-embed; only the metadata may have changed.
            return ("unchanged" if json.loads(old["metadata"]) == doc["metadata"] else "metadata", None)
        other = taken.get(doc["hash"]) or self.store.find_by_hash(conn, name, doc["hash"])
        if other is not None and other != doc["id"]:
            return "duplicate", other
        return None

    def add_documents(self, name: str, documents: list, progress: Callable[[int], None] | None = None) -> dict:
        """Add or replace documents. Per document status: created, updated (its old chunks replaced, or only
        its metadata when the text is the same), unchanged (same id, text and metadata) or duplicate (same text
        as another document: not indexed)."""
        coll = self.store.get_collection(name)
        docs = self._prepare(coll, documents)
        embedder = self.embedder(coll["embedding_model"])
        if embedder.dim != coll["dim"]:
            raise InvalidInputError(
                f"embedding dimension mismatch: model {coll['embedding_model']!r} gives {embedder.dim}, collection "
                f"{name!r} holds {coll['dim']}", param="embedding_model", code="dimension_mismatch")
        # Skip obvious no-ops before the expensive part (re-checked inside the transaction).
        with self.store.reading() as conn:
            pre = {d["id"]: self._skip_reason(conn, name, d, {}) for d in docs}
        for doc in docs:
            if pre[doc["id"]] is not None:
                doc["chunks"], doc["vectors"] = [], np.zeros((0, coll["dim"]), np.float32)
                continue
            doc["chunks"] = chunk_text(doc["text"], coll["chunk_tokens"], coll["chunk_overlap"],
                                       embedder.token_spans)
            texts = [c.text if not c.heading or c.text.startswith("#") else f"{c.heading}\n{c.text}"
                     for c in doc["chunks"]]
            doc["vectors"] = embedder.embed(texts)
            if progress:
                progress(len(texts))
        results = []
        with self._lock(name):
            index = None
            try:
                with self.store.transaction() as conn:
                    coll = self.store.get_collection(name)  # may have been deleted meanwhile
                    index = self._index(coll)
                    taken: dict[str, str] = {}
                    removed: list[int] = []
                    added_ids: list[int] = []
                    added_vecs: list[np.ndarray] = []
                    metadata_changed = False
                    for doc in docs:
                        skip = self._skip_reason(conn, name, doc, taken)
                        if skip is not None and skip[0] == "metadata":
                            self.store.update_metadata(conn, name, doc["id"], doc["metadata"])
                            metadata_changed = True
                            results.append({"id": doc["id"], "status": "updated", "chunks": 0})
                            continue
                        if skip is not None:
                            results.append({"id": doc["id"], "status": skip[0], "chunks": 0,
                                            **({"duplicate_of": skip[1]} if skip[1] else {})})
                            continue
                        if not doc["chunks"]:  # skipped before, changed since: cannot embed inside the lock
                            raise InvalidInputError(f"document {doc['id']!r} changed during ingestion; retry",
                                                    param="documents", code="conflict")
                        old = self.store.get_document(conn, name, doc["id"])
                        if old is not None:
                            removed += self.store.delete_document(conn, name, doc["id"])
                        self.store.insert_document(conn, name, doc["id"], doc["hash"], doc["metadata"],
                                                   doc["source"], len(doc["text"]),
                                                   old["created_at"] if old is not None else None)
                        added_ids += self.store.insert_chunks(conn, name, doc["id"], doc["chunks"], doc["vectors"])
                        added_vecs.append(doc["vectors"])
                        taken[doc["hash"]] = doc["id"]
                        results.append({"id": doc["id"], "status": "updated" if old is not None else "created",
                                        "chunks": len(doc["chunks"])})
                    if removed or added_ids or metadata_changed:
                        seq = self.store.bump_seq(conn, name)
                        index.remove(removed)
                        index.add(added_ids, np.concatenate(added_vecs) if added_vecs else
                                  np.zeros((0, coll["dim"]), np.float32))
                        index.save(self.store.index_dir(coll), seq)
                        self._indexes[name] = (coll["uid"], seq, index)
            except BaseException:
                self._indexes.pop(name, None)  # the in-memory index may hold uncommitted changes
                raise
        return {"object": "list", "collection": name, "data": results}

    def delete_document(self, name: str, doc_id: str) -> dict:
        check_doc_id(doc_id, "document_id")
        with self._lock(name):
            try:
                with self.store.transaction() as conn:
                    coll = self.store.get_collection(name)
                    if self.store.get_document(conn, name, doc_id) is None:
                        raise DocumentNotFoundError(f"document {doc_id!r} does not exist in collection {name!r}",
                                                    param="document_id")
                    index = self._index(coll)
                    removed = self.store.delete_document(conn, name, doc_id)
                    seq = self.store.bump_seq(conn, name)
                    index.remove(removed)
                    index.save(self.store.index_dir(coll), seq)
                    self._indexes[name] = (coll["uid"], seq, index)
            except RagError:
                raise
            except BaseException:
                self._indexes.pop(name, None)
                raise
        return {"object": "document.deleted", "id": doc_id, "deleted": True, "chunks": len(removed)}

    def list_documents(self, name: str) -> dict:
        self.store.get_collection(name)
        docs = self.store.documents(name)
        return {"object": "list", "collection": name, "data": [
            {"object": "document", "id": d["doc_id"], "metadata": d["metadata"], "source": d["source"],
             "chars": d["chars"], "chunks": d["chunks"], "content_hash": d["content_hash"],
             "created_at": d["created_at"], "updated_at": d["updated_at"]} for d in docs]}

    def document_chunks(self, name: str, doc_id: str) -> dict:
        """A document's chunks in order: id (what citations name as chunk_id), text and character span."""
        check_doc_id(doc_id, "document_id")
        self.store.get_collection(name)
        with self.store.reading() as conn:
            if self.store.get_document(conn, name, doc_id) is None:
                raise DocumentNotFoundError(f"document {doc_id!r} does not exist in collection {name!r}",
                                            param="document_id")
        ids = self.store.chunk_ids_for_documents(name, [doc_id])
        rows = sorted(self.store.chunks(ids).values(), key=lambda r: r["position"])
        return {"object": "list", "collection": name, "document_id": doc_id, "data": [
            {"object": "chunk", "id": r["id"], "position": r["position"], "text": r["text"], "start": r["start"],
             "end": r["end"], "heading": r["heading"]} for r in rows]}

    # ---- query ---------------------------------------------------------------------------------------
    def query(self, name: str, query: str | None = None, k: int = 5, filter: dict | None = None,
              embedding: list[float] | None = None) -> dict:
        """Top-k chunks by cosine similarity (scores are inner products of unit vectors)."""
        coll = self.store.get_collection(name)
        k = _int_field(k, "k", 1, self.max_k)
        check_filter(filter)
        if (query is None) == (embedding is None):
            raise InvalidInputError("give exactly one of 'query' (text) or 'embedding'", param="query")
        if query is not None:
            if not isinstance(query, str) or not query.strip():
                raise InvalidInputError("query must be a non-empty string", param="query")
            if len(query) > MAX_QUERY_CHARS:
                raise InvalidInputError(f"query is longer than {MAX_QUERY_CHARS} characters", param="query")
            vec = self.embedder(coll["embedding_model"]).embed([query])
        else:
            if not isinstance(embedding, list) or not all(
                    isinstance(x, (int, float)) and not isinstance(x, bool) for x in embedding):
                raise InvalidInputError("embedding must be a list of numbers", param="embedding")
            vec = np.asarray(embedding, dtype=np.float32)[None, :]
        if vec.shape[1] != coll["dim"]:
            raise InvalidInputError(
                f"embedding dimension mismatch: the query embedding has {vec.shape[1]} dimensions, collection "
                f"{name!r} ({coll['embedding_model']}) uses {coll['dim']}", param="embedding",
                code="dimension_mismatch")
        with self._lock(name):
            index = self._index(coll)
            metadata = self._doc_metadata(name)
            allowed = None
            if filter:
                docs = [d for d, meta in metadata.items() if matches(meta, filter)]
                allowed = self.store.chunk_ids_for_documents(name, docs)
            scores, ids = index.search(vec, k, allowed_ids=allowed)
            hits = [(int(i), float(s)) for i, s in zip(ids[0], scores[0]) if i >= 0]
            rows = self.store.chunks([i for i, _ in hits])
        data = []
        for chunk_id, score in hits:
            row = rows.get(chunk_id)
            if row is None:
                continue
            data.append({
                "object": "collection.chunk", "id": chunk_id, "document_id": row["doc_id"], "score": score,
                "text": row["text"], "start": row["start"], "end": row["end"], "heading": row["heading"],
                "position": row["position"], "metadata": metadata.get(row["doc_id"], {}),
            })
        return {"object": "list", "collection": name, "model": coll["embedding_model"], "data": data}
