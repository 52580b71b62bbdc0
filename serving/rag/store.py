"""The RAG catalogue in SQLite (<home>/rag/rag.sqlite3): collections, documents and chunks, vectors included.

SQLite is the source of truth; FAISS index files beside it are a cache that can always be rebuilt from the
chunk vectors. Each collection has a `seq` that every write bumps in the same transaction; a saved index
records the seq it reflects, so a stale or half-written index is detected and rebuilt (also across
processes: `loraplex ingest` and a running server share the files).
"""

from __future__ import annotations

import contextlib
import json
import re
import sqlite3
import threading
import time
import uuid
from pathlib import Path

import numpy as np

from serving.sqlite_tx import write_transaction
from serving.rag.errors import CollectionExistsError, CollectionNotFoundError, InvalidInputError

NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.-]{0,63}$")
DOC_ID_RE = re.compile(r"^[^\x00-\x1f]{1,512}$")

_SCHEMA = """
CREATE TABLE IF NOT EXISTS collections (
  name TEXT PRIMARY KEY, uid TEXT NOT NULL, embedding_model TEXT NOT NULL, dim INTEGER NOT NULL,
  index_kind TEXT NOT NULL, index_params TEXT NOT NULL, chunk_tokens INTEGER NOT NULL,
  chunk_overlap INTEGER NOT NULL, created_at INTEGER NOT NULL, seq INTEGER NOT NULL DEFAULT 0);
CREATE TABLE IF NOT EXISTS documents (
  collection TEXT NOT NULL, doc_id TEXT NOT NULL, content_hash TEXT NOT NULL, metadata TEXT NOT NULL,
  source TEXT, chars INTEGER NOT NULL, created_at INTEGER NOT NULL, updated_at INTEGER NOT NULL,
  PRIMARY KEY (collection, doc_id));
CREATE INDEX IF NOT EXISTS documents_hash ON documents (collection, content_hash);
CREATE TABLE IF NOT EXISTS chunks (
  id INTEGER PRIMARY KEY AUTOINCREMENT, collection TEXT NOT NULL, doc_id TEXT NOT NULL, position INTEGER NOT NULL,
  text TEXT NOT NULL, start INTEGER NOT NULL, end INTEGER NOT NULL, heading TEXT NOT NULL, vector BLOB NOT NULL);
CREATE INDEX IF NOT EXISTS chunks_doc ON chunks (collection, doc_id);
"""


def check_name(name) -> str:
    if not isinstance(name, str) or not NAME_RE.match(name):
        raise InvalidInputError(
            f"collection name must be 1-64 characters of letters, digits, '_', '-', '.', starting with a letter "
            f"or digit; got {name!r}", param="name")
    return name


def check_doc_id(doc_id, param: str = "id") -> str:
    if not isinstance(doc_id, str) or not DOC_ID_RE.match(doc_id):
        raise InvalidInputError(
            f"document id must be a string of 1-512 characters without control characters; got {doc_id!r}",
            param=param)
    return doc_id


def _collection_row(row: sqlite3.Row) -> dict:
    out = dict(row)
    out["index_params"] = json.loads(out["index_params"])
    return out


class Store:
    """Thread-safe: one connection guarded by a lock; writes are BEGIN IMMEDIATE transactions."""

    def __init__(self, root: Path):
        self.root = Path(root)
        self.root.mkdir(parents=True, exist_ok=True)
        self.path = self.root / "rag.sqlite3"
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None, timeout=60)
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=FULL")
        self._conn.executescript(_SCHEMA)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    def index_dir(self, collection: dict) -> Path:
        return self.root / "indexes" / collection["uid"]

    def transaction(self):
        """An exclusive write transaction (other processes wait); commits on success, rolls back on error."""
        return write_transaction(self._conn, self._lock)

    @contextlib.contextmanager
    def reading(self):
        """The connection, for several consistent-enough reads under this process's lock."""
        with self._lock:
            yield self._conn

    def _query(self, sql: str, args=()) -> list[sqlite3.Row]:
        with self._lock:
            return self._conn.execute(sql, args).fetchall()

    # ---- collections ---------------------------------------------------------------------------------
    def create_collection(self, name: str, embedding_model: str, dim: int, index_kind: str, index_params: dict,
                          chunk_tokens: int, chunk_overlap: int) -> dict:
        with self.transaction() as conn:
            if conn.execute("SELECT 1 FROM collections WHERE name=?", (name,)).fetchone():
                raise CollectionExistsError(f"collection {name!r} already exists", param="name")
            conn.execute(
                "INSERT INTO collections (name, uid, embedding_model, dim, index_kind, index_params, chunk_tokens,"
                " chunk_overlap, created_at) VALUES (?,?,?,?,?,?,?,?,?)",
                (name, uuid.uuid4().hex, embedding_model, dim, index_kind, json.dumps(index_params), chunk_tokens,
                 chunk_overlap, int(time.time())))
        return self.get_collection(name)

    def get_collection(self, name: str) -> dict:
        rows = self._query("SELECT * FROM collections WHERE name=?", (name,))
        if not rows:
            raise CollectionNotFoundError(f"collection {name!r} does not exist", param="collection")
        return _collection_row(rows[0])

    def list_collections(self) -> list[dict]:
        rows = self._query(
            "SELECT c.*, (SELECT COUNT(*) FROM documents d WHERE d.collection=c.name) AS documents,"
            " (SELECT COUNT(*) FROM chunks k WHERE k.collection=c.name) AS chunks FROM collections c ORDER BY name")
        return [_collection_row(r) for r in rows]

    def counts(self, name: str) -> tuple[int, int]:
        docs = self._query("SELECT COUNT(*) FROM documents WHERE collection=?", (name,))[0][0]
        chunks = self._query("SELECT COUNT(*) FROM chunks WHERE collection=?", (name,))[0][0]
        return docs, chunks

    def delete_collection(self, name: str) -> dict:
        with self.transaction() as conn:
            row = conn.execute("SELECT * FROM collections WHERE name=?", (name,)).fetchone()
            if row is None:
                raise CollectionNotFoundError(f"collection {name!r} does not exist", param="collection")
            for table in ("chunks", "documents"):
                conn.execute(f"DELETE FROM {table} WHERE collection=?", (name,))
            conn.execute("DELETE FROM collections WHERE name=?", (name,))
        return _collection_row(row)

    def seq(self, name: str) -> int:
        rows = self._query("SELECT seq FROM collections WHERE name=?", (name,))
        if not rows:
            raise CollectionNotFoundError(f"collection {name!r} does not exist", param="collection")
        return rows[0][0]

    # ---- documents and chunks (inside transaction(), conn passed in) ---------------------------------
    @staticmethod
    def bump_seq(conn, name: str) -> int:
        conn.execute("UPDATE collections SET seq = seq + 1 WHERE name=?", (name,))
        return conn.execute("SELECT seq FROM collections WHERE name=?", (name,)).fetchone()[0]

    @staticmethod
    def get_document(conn, name: str, doc_id: str) -> sqlite3.Row | None:
        return conn.execute("SELECT * FROM documents WHERE collection=? AND doc_id=?", (name, doc_id)).fetchone()

    @staticmethod
    def find_by_hash(conn, name: str, content_hash: str) -> str | None:
        row = conn.execute("SELECT doc_id FROM documents WHERE collection=? AND content_hash=? LIMIT 1",
                           (name, content_hash)).fetchone()
        return row[0] if row else None

    @staticmethod
    def delete_document(conn, name: str, doc_id: str) -> list[int]:
        """Delete a document and its chunks; returns the removed chunk ids."""
        ids = [r[0] for r in conn.execute("SELECT id FROM chunks WHERE collection=? AND doc_id=?", (name, doc_id))]
        conn.execute("DELETE FROM chunks WHERE collection=? AND doc_id=?", (name, doc_id))
        conn.execute("DELETE FROM documents WHERE collection=? AND doc_id=?", (name, doc_id))
        return ids

    @staticmethod
    def insert_document(conn, name: str, doc_id: str, content_hash: str, metadata: dict, source: str | None,
                        chars: int, created_at: int | None = None) -> None:
        now = int(time.time())
        conn.execute(
            "INSERT INTO documents (collection, doc_id, content_hash, metadata, source, chars, created_at, updated_at)"
            " VALUES (?,?,?,?,?,?,?,?)",
            (name, doc_id, content_hash, json.dumps(metadata), source, chars, created_at or now, now))

    @staticmethod
    def update_metadata(conn, name: str, doc_id: str, metadata: dict) -> None:
        conn.execute("UPDATE documents SET metadata=?, updated_at=? WHERE collection=? AND doc_id=?",
                     (json.dumps(metadata), int(time.time()), name, doc_id))

    @staticmethod
    def insert_chunks(conn, name: str, doc_id: str, chunks, vectors: np.ndarray) -> list[int]:
        ids = []
        for pos, (chunk, vec) in enumerate(zip(chunks, vectors)):
            cur = conn.execute(
                "INSERT INTO chunks (collection, doc_id, position, text, start, end, heading, vector)"
                " VALUES (?,?,?,?,?,?,?,?)",
                (name, doc_id, pos, chunk.text, chunk.start, chunk.end, chunk.heading,
                 np.asarray(vec, dtype=np.float32).tobytes()))
            ids.append(cur.lastrowid)
        return ids

    # ---- reads ---------------------------------------------------------------------------------------
    def documents(self, name: str) -> list[dict]:
        rows = self._query(
            "SELECT d.doc_id, d.metadata, d.source, d.chars, d.content_hash, d.created_at, d.updated_at,"
            " (SELECT COUNT(*) FROM chunks k WHERE k.collection=d.collection AND k.doc_id=d.doc_id) AS chunks"
            " FROM documents d WHERE d.collection=? ORDER BY d.doc_id", (name,))
        return [{**dict(r), "metadata": json.loads(r["metadata"])} for r in rows]

    def chunk_ids_for_documents(self, name: str, doc_ids: list[str]) -> list[int]:
        out = []
        for start in range(0, len(doc_ids), 500):
            part = doc_ids[start:start + 500]
            out += [r[0] for r in self._query(
                f"SELECT id FROM chunks WHERE collection=? AND doc_id IN ({','.join('?' * len(part))})",
                (name, *part))]
        return out

    def chunks(self, ids: list[int]) -> dict[int, dict]:
        out = {}
        for start in range(0, len(ids), 500):
            part = ids[start:start + 500]
            for r in self._query(
                    "SELECT id, doc_id, position, text, start, end, heading FROM chunks"
                    f" WHERE id IN ({','.join('?' * len(part))})", tuple(part)):
                out[r["id"]] = dict(r)
        return out

    def vectors(self, name: str, dim: int) -> tuple[np.ndarray, np.ndarray]:
        rows = self._query("SELECT id, vector FROM chunks WHERE collection=? ORDER BY id", (name,))
        ids = np.array([r[0] for r in rows], dtype=np.int64)
        vecs = np.frombuffer(b"".join(r[1] for r in rows), dtype=np.float32).reshape(len(rows), dim)
        return ids, vecs.copy()
