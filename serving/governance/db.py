"""One SQLite database for keys, team policies, the usage ledger and budget reservations (WAL, shared by processes)."""

from __future__ import annotations

import sqlite3
import threading
from pathlib import Path

from serving.sqlite_tx import write_transaction

SCHEMA = """
CREATE TABLE IF NOT EXISTS api_keys (
    id TEXT PRIMARY KEY,
    name TEXT NOT NULL,
    team TEXT NOT NULL,
    role TEXT NOT NULL,
    salt BLOB NOT NULL,
    hash BLOB NOT NULL,
    allow TEXT NOT NULL,
    limits TEXT NOT NULL,
    budget_usd REAL,
    budget_period TEXT,
    created_at REAL NOT NULL,
    expires_at REAL,
    revoked_at REAL
);
CREATE TABLE IF NOT EXISTS usage (
    id INTEGER PRIMARY KEY AUTOINCREMENT,
    ts REAL NOT NULL,
    request_id TEXT,
    key_id TEXT NOT NULL,
    team TEXT NOT NULL,
    model TEXT NOT NULL,
    adapter TEXT NOT NULL DEFAULT '',
    route TEXT NOT NULL DEFAULT '',
    prompt_tokens INTEGER NOT NULL,
    completion_tokens INTEGER NOT NULL,
    cost_usd REAL NOT NULL,
    status INTEGER NOT NULL
);
CREATE INDEX IF NOT EXISTS usage_key_ts ON usage(key_id, ts);
CREATE INDEX IF NOT EXISTS usage_team_ts ON usage(team, ts);
CREATE INDEX IF NOT EXISTS usage_ts ON usage(ts);
CREATE TABLE IF NOT EXISTS usage_totals (
    key_id TEXT NOT NULL, team TEXT NOT NULL, model TEXT NOT NULL, adapter TEXT NOT NULL,
    requests INTEGER NOT NULL, prompt_tokens INTEGER NOT NULL, completion_tokens INTEGER NOT NULL,
    cost_usd REAL NOT NULL,
    PRIMARY KEY (key_id, team, model, adapter)
);
CREATE TABLE IF NOT EXISTS period_spend (
    scope TEXT NOT NULL, subject TEXT NOT NULL, period TEXT NOT NULL, start REAL NOT NULL, cost_usd REAL NOT NULL,
    PRIMARY KEY (scope, subject, period, start)
);
CREATE TABLE IF NOT EXISTS teams (
    name TEXT PRIMARY KEY,
    policy TEXT NOT NULL,
    updated_at REAL NOT NULL,
    updated_by TEXT NOT NULL
);
CREATE TABLE IF NOT EXISTS reservations (
    id TEXT PRIMARY KEY,
    key_id TEXT NOT NULL,
    team TEXT NOT NULL,
    amount_usd REAL NOT NULL,
    created_at REAL NOT NULL,
    owner TEXT NOT NULL DEFAULT '',
    touched_at REAL
);
"""

MIGRATIONS = [("owner", "TEXT NOT NULL DEFAULT ''"), ("touched_at", "REAL")]


class Database:
    """A serialised connection: one lock per process, BEGIN IMMEDIATE for cross-process atomicity."""

    def __init__(self, path: str | Path):
        self.path = Path(path)
        if str(path) != ":memory:":
            self.path.parent.mkdir(parents=True, exist_ok=True)
        self._lock = threading.RLock()
        self._conn = sqlite3.connect(str(path), check_same_thread=False, isolation_level=None, timeout=30.0)
        self._conn.row_factory = sqlite3.Row
        self._conn.execute("PRAGMA journal_mode=WAL")
        self._conn.execute("PRAGMA synchronous=NORMAL")
        self._conn.execute("PRAGMA busy_timeout=30000")
        with self._lock:
            self._conn.executescript(SCHEMA)
            have = {r["name"] for r in self._conn.execute("PRAGMA table_info(reservations)")}
            for column, decl in MIGRATIONS:  # columns added since a database was made
                if column not in have:
                    self._conn.execute(f"ALTER TABLE reservations ADD COLUMN {column} {decl}")

    def tx(self):
        """A write transaction: other writers (threads or processes) wait until it commits."""
        return write_transaction(self._conn, self._lock)

    def query(self, sql: str, args: tuple | list = ()) -> list[sqlite3.Row]:
        with self._lock:
            return self._conn.execute(sql, args).fetchall()

    def close(self) -> None:
        with self._lock:
            self._conn.close()
