"""Stored responses of OpenAI's Responses API (`store: true`) in SQLite: <home>/responses/responses.sqlite3.

A row per response (the object as returned, its owner, model, status, `previous_response_id`, created and
expiry times) and a row per input item of that turn. `conversation()` walks `previous_response_id` back to
the first turn, so the gateway can run a follow-up turn on the chat pipeline with the whole history.

Conventions of the project's other stores (serving.governance.db, serving.rag.store): WAL, one connection
per process behind a lock, writes in BEGIN IMMEDIATE transactions (serving.sqlite_tx) so the gateway
processes of one machine take turns writing, and a busy timeout instead of "database is locked" errors.

Owners: a response belongs to the caller's team (`owner_of`). A response of another owner, a deleted one and
an expired one are indistinguishable to the caller: all read as "not found", so ids cannot be probed.
"""

from __future__ import annotations

import contextlib
import json
import secrets
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any, Callable

from serving.api.errors import APIError
from serving.sqlite_tx import write_transaction

DEFAULT_TTL_S = 30 * 24 * 3600  # OpenAI keeps stored responses for 30 days
MAX_PAGE = 100  # OpenAI's `limit` range is 1..100
MAX_CHAIN = 10_000  # turns walked by conversation(): a guard against a corrupt (cyclic) chain, not a quota
OPEN_OWNER = ""  # the owner stored for "no owner" (governance off, open access); team names are never empty

_SCHEMA = """
CREATE TABLE IF NOT EXISTS responses (
  id TEXT PRIMARY KEY, owner TEXT NOT NULL, created_at REAL NOT NULL, expires_at REAL NOT NULL,
  model TEXT NOT NULL, status TEXT NOT NULL, previous_id TEXT, response TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS responses_expiry ON responses (expires_at);
CREATE TABLE IF NOT EXISTS response_input_items (
  response_id TEXT NOT NULL, position INTEGER NOT NULL, item_id TEXT NOT NULL, item TEXT NOT NULL,
  PRIMARY KEY (response_id, position));
"""


def new_response_id() -> str:
    """`resp_` and 48 hex digits, the shape of OpenAI's response ids."""
    return "resp_" + secrets.token_hex(24)


def owner_of(principal) -> str | None:
    """The owner of a caller's responses: its API key's team; None without governance (principal None) or
    for the anonymous caller of open access, so all open callers share one owner."""
    if principal is None or getattr(principal, "anonymous", False):
        return None
    return principal.team


class ResponseNotFoundError(APIError):
    """A response that is missing, expired, deleted or another owner's: the same error for all four."""

    def __init__(self, response_id: str, *, param: str | None = "response_id", status: int = 404,
                 code: str | None = None, message: str | None = None):
        super().__init__(status, message or f"Response with id '{response_id}' not found.", param=param, code=code)
        self.response_id = response_id


def _dumps(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _owner(owner: str | None) -> str:
    if owner is None:
        return OPEN_OWNER
    if not isinstance(owner, str) or not owner:
        raise ValueError(f"owner must be a non-empty string or None, got {owner!r}")
    return owner


class ResponseStore:
    """Thread-safe (one connection behind a lock) and safe across processes (WAL, BEGIN IMMEDIATE writes).

    `clock` returns the time in seconds (time.time by default); tests inject one to expire responses."""

    def __init__(self, path: str | Path | None = None, *, ttl_s: float = DEFAULT_TTL_S,
                 clock: Callable[[], float] = time.time):
        if path is None:
            from loraplex.paths import subdir

            path = subdir("responses") / "responses.sqlite3"
        if not ttl_s > 0:
            raise ValueError(f"ttl_s must be positive, got {ttl_s!r}")
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.ttl_s = float(ttl_s)
        self._clock = clock
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=30.0)
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")  # WAL + NORMAL: a crash may lose the last commit, never corrupt
        self._conn.execute("PRAGMA busy_timeout=30000")
        with write_transaction(self._conn, self._lock) as conn:
            for stmt in filter(str.strip, _SCHEMA.split(";")):
                conn.execute(stmt)

    def close(self) -> None:
        with self._lock:
            self._conn.close()

    @contextlib.contextmanager
    def _snapshot(self):
        """The connection inside a read transaction: several SELECTs see one state of the database, even while
        another process commits (WAL readers keep their snapshot until the transaction ends)."""
        with self._lock:
            self._conn.execute("BEGIN")
            try:
                yield self._conn
            finally:
                self._conn.execute("COMMIT")

    def _query(self, sql: str, args: tuple | list = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._conn.execute(sql, args).fetchall()

    def _row(self, response_id: str, owner: str | None, columns: str = "*") -> sqlite3.Row | None:
        rows = self._query(f"SELECT {columns} FROM responses WHERE id=? AND owner=? AND expires_at>?",
                           (response_id, _owner(owner), self._clock()))
        return rows[0] if rows else None

    # ---- writes ----------------------------------------------------------------------------------------
    def put(self, response: dict, input_items: list[dict], owner: str | None,
            previous_id: str | None = None) -> float:
        """Store a response (its `id`, `model`, `status` and `created_at` are read from it) and the input items
        of its turn, in one transaction; returns its expiry time. An id that is already stored is a ValueError.

        `previous_id` is recorded as given, not checked: the gateway read that response moments earlier
        (conversation()), and refusing to store a finished answer because its predecessor expired meanwhile
        would lose it; a broken link shows up, as a clear error, when a later turn walks the chain."""
        if not isinstance(response, dict) or not isinstance(response.get("id"), str) \
                or not response["id"].startswith("resp_"):
            raise ValueError("response must be a dict whose id starts with 'resp_'")
        if not isinstance(response.get("model"), str):
            raise ValueError("response must name its model")
        ids = [item.get("id") if isinstance(item, dict) else None for item in input_items]
        if any(not isinstance(i, str) or not i for i in ids) or len(set(ids)) != len(ids):
            raise ValueError("input_items must be normalised items with unique ids "
                             "(serving.api.response_items.normalize_input)")
        now = self._clock()
        created = float(response.get("created_at") or now)
        expires = now + self.ttl_s
        try:
            with write_transaction(self._conn, self._lock) as conn:
                conn.execute(
                    "INSERT INTO responses (id, owner, created_at, expires_at, model, status, previous_id, response)"
                    " VALUES (?,?,?,?,?,?,?,?)",
                    (response["id"], _owner(owner), created, expires, response["model"],
                     str(response.get("status") or "completed"), previous_id, _dumps(response)))
                conn.executemany(
                    "INSERT INTO response_input_items (response_id, position, item_id, item) VALUES (?,?,?,?)",
                    [(response["id"], pos, item["id"], _dumps(item)) for pos, item in enumerate(input_items)])
        except sqlite3.IntegrityError:
            raise ValueError(f"response {response['id']!r} is already stored") from None
        return expires

    def delete(self, response_id: str, owner: str | None) -> bool:
        """Delete a response and its input items; False when there is none this owner may see. Later turns
        that chained onto it can then no longer rebuild their conversation (as with OpenAI)."""
        with write_transaction(self._conn, self._lock) as conn:
            row = conn.execute("SELECT 1 FROM responses WHERE id=? AND owner=? AND expires_at>?",
                               (response_id, _owner(owner), self._clock())).fetchone()
            if row is None:
                return False
            conn.execute("DELETE FROM response_input_items WHERE response_id=?", (response_id,))
            conn.execute("DELETE FROM responses WHERE id=?", (response_id,))
        return True

    def purge_expired(self) -> int:
        """Delete every expired response and its items; returns how many responses went. Reads already treat
        expired rows as absent, so this only reclaims space (run it now and then, e.g. at start-up)."""
        with write_transaction(self._conn, self._lock) as conn:
            now = self._clock()
            conn.execute("DELETE FROM response_input_items WHERE response_id IN "
                         "(SELECT id FROM responses WHERE expires_at<=?)", (now,))
            return conn.execute("DELETE FROM responses WHERE expires_at<=?", (now,)).rowcount

    # ---- reads -----------------------------------------------------------------------------------------
    def get(self, response_id: str, owner: str | None) -> dict | None:
        """The response object as it was returned, or None (missing, expired, deleted or another owner's)."""
        row = self._row(response_id, owner, "response")
        return json.loads(row["response"]) if row else None

    def require(self, response_id: str, owner: str | None) -> dict:
        """get(), raising ResponseNotFoundError (404) instead of returning None."""
        response = self.get(response_id, owner)
        if response is None:
            raise ResponseNotFoundError(response_id)
        return response

    def input_items(self, response_id: str, owner: str | None, after: str | None = None, limit: int = 20,
                    order: str = "desc", before: str | None = None) -> dict:
        """One page of a response's input items in OpenAI's list shape: `{"object": "list", "data", "first_id",
        "last_id", "has_more"}`. `order` is by position in the input ("desc": the last item first, OpenAI's
        default); `after`/`before` are item ids of this response. Raises ResponseNotFoundError (404) for a
        response the owner cannot see and APIError(400) naming `limit`, `order`, `after` or `before`."""
        if isinstance(limit, bool) or not isinstance(limit, int) or not 1 <= limit <= MAX_PAGE:
            raise APIError(400, f"limit must be an integer from 1 to {MAX_PAGE}, got {limit!r}", param="limit",
                           code="invalid_value")
        if order not in ("asc", "desc"):
            raise APIError(400, f"order must be 'asc' or 'desc', got {order!r}", param="order", code="invalid_value")
        with self._snapshot() as conn:
            if self._row(response_id, owner, "id") is None:
                raise ResponseNotFoundError(response_id)
            rows = conn.execute("SELECT position, item_id, item FROM response_input_items "
                                      "WHERE response_id=? ORDER BY position", (response_id,)).fetchall()
        positions = {r["item_id"]: r["position"] for r in rows}
        lo, hi = -1, len(rows)  # exclusive bounds on position
        for name, cursor in (("after", after), ("before", before)):
            if cursor is None:
                continue
            if cursor not in positions:
                raise APIError(400, f"{name} is {cursor!r}, which is not an input item of response "
                               f"'{response_id}'", param=name, code="invalid_value")
            pos = positions[cursor]
            if (name == "after") == (order == "asc"):
                lo = max(lo, pos)
            else:
                hi = min(hi, pos)
        window = [r for r in rows if lo < r["position"] < hi]
        if order == "desc":
            window.reverse()
        if before is not None and after is None:
            page, has_more = window[-limit:], len(window) > limit  # the page just before the cursor
        else:
            page, has_more = window[:limit], len(window) > limit
        data = [json.loads(r["item"]) for r in page]
        return {"object": "list", "data": data, "first_id": data[0]["id"] if data else None,
                "last_id": data[-1]["id"] if data else None, "has_more": has_more}

    def conversation(self, response_id: str, owner: str | None) -> list[dict]:
        """Every item of the conversation that ends with `response_id`, oldest first: each turn's input items
        then its output items, from the first turn (the one without `previous_response_id`) on. `instructions`
        are not items, so they are not carried over (as OpenAI specifies).

        Raises ResponseNotFoundError as a 400 naming `previous_response_id` (this is what a follow-up request
        sends): code `previous_response_not_found` when `response_id` itself cannot be seen, and the same code
        with a message naming the broken link when an earlier turn was deleted or has expired."""
        now, own = self._clock(), _owner(owner)
        with self._snapshot() as conn:
            chain = conn.execute(
                "WITH RECURSIVE chain(id, previous_id, depth) AS ("
                " SELECT id, previous_id, 0 FROM responses WHERE id=? AND owner=? AND expires_at>?"
                " UNION ALL SELECT r.id, r.previous_id, c.depth + 1 FROM responses r JOIN chain c"
                " ON r.id = c.previous_id AND r.owner=? AND r.expires_at>? WHERE c.depth < ?)"
                " SELECT id, previous_id FROM chain ORDER BY depth DESC",
                (response_id, own, now, own, now, MAX_CHAIN)).fetchall()
            if not chain:
                raise ResponseNotFoundError(
                    response_id, status=400, param="previous_response_id", code="previous_response_not_found",
                    message=f"Previous response with id '{response_id}' not found.")
            first = chain[0]
            if first["previous_id"] is not None:
                if len(chain) > MAX_CHAIN:
                    raise RuntimeError(f"the conversation of {response_id!r} is longer than {MAX_CHAIN} turns "
                                       "or its chain loops")
                raise ResponseNotFoundError(
                    response_id, status=400, param="previous_response_id", code="previous_response_not_found",
                    message=f"The conversation of previous response '{response_id}' cannot be rebuilt: its earlier "
                            f"response '{first['previous_id']}' (the previous response of '{first['id']}') was "
                            "not found; it may have been deleted or have expired.")
            ids = [r["id"] for r in chain]
            marks = ",".join("?" * len(ids))
            responses = {r["id"]: json.loads(r["response"]) for r in conn.execute(
                f"SELECT id, response FROM responses WHERE id IN ({marks})", ids)}
            inputs: dict[str, list[dict]] = {i: [] for i in ids}
            for r in conn.execute(f"SELECT response_id, item FROM response_input_items WHERE response_id "
                                        f"IN ({marks}) ORDER BY response_id, position", ids):
                inputs[r["response_id"]].append(json.loads(r["item"]))
        items: list[dict] = []
        for rid in ids:
            items.extend(inputs[rid])
            items.extend(responses[rid].get("output") or [])
        return items
