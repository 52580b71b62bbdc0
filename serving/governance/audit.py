"""Append-only audit log: JSON lines, fsync'd, size-rotated (audit.jsonl -> .1 -> .2 ...), safe across processes."""

from __future__ import annotations

import fcntl
import json
import os
import threading
import time
from datetime import datetime, timezone
from pathlib import Path
from typing import Any, Iterator

FORBIDDEN_FIELDS = ("key", "api_key", "authorization", "secret")


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, timezone.utc).isoformat(timespec="milliseconds").replace("+00:00", "Z")


class AuditLog:
    def __init__(self, path: str | Path, *, max_bytes: int = 50 * 1024 * 1024, backups: int = 10,
                 fsync: bool = True):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self.max_bytes, self.backups, self.fsync = max_bytes, backups, fsync
        self._lock = threading.Lock()
        self._lockfile = self.path.with_name(self.path.name + ".lock")

    def _rotate(self) -> None:
        for i in range(self.backups - 1, 0, -1):
            src = self.path.with_name(f"{self.path.name}.{i}")
            if src.exists():
                os.replace(src, self.path.with_name(f"{self.path.name}.{i + 1}"))
        os.replace(self.path, self.path.with_name(f"{self.path.name}.1"))

    def write(self, entry: dict[str, Any]) -> dict[str, Any]:
        """Append one entry (adds `ts`/`time`); an flock serialises writers in other processes too."""
        for name in FORBIDDEN_FIELDS:
            if name in entry:
                raise ValueError(f"audit entries never hold {name!r}")
        entry = {"ts": time.time(), **entry}
        entry.setdefault("time", iso(entry["ts"]))
        line = (json.dumps(entry, separators=(",", ":"), default=str) + "\n").encode()
        with self._lock, open(self._lockfile, "a") as lock:
            fcntl.flock(lock, fcntl.LOCK_EX)
            try:
                if self.path.exists() and self.path.stat().st_size + len(line) > self.max_bytes:
                    self._rotate()
                fd = os.open(self.path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
                try:
                    os.write(fd, line)
                    if self.fsync:
                        os.fsync(fd)
                finally:
                    os.close(fd)
            finally:
                fcntl.flock(lock, fcntl.LOCK_UN)
        return entry

    def files(self) -> list[Path]:
        """Oldest first."""
        rotated = [self.path.with_name(f"{self.path.name}.{i}") for i in range(self.backups, 0, -1)]
        return [p for p in rotated + [self.path] if p.exists()]

    def entries(self) -> Iterator[dict[str, Any]]:
        for path in self.files():
            with open(path, encoding="utf-8") as f:
                for line in f:
                    line = line.strip()
                    if line:
                        try:
                            yield json.loads(line)
                        except json.JSONDecodeError:
                            continue  # a torn last line after a crash

    def query(self, *, since: float | None = None, until: float | None = None, key_id: str | None = None,
              team: str | None = None, model: str | None = None, route: str | None = None,
              status: int | None = None, event: str | None = None, limit: int | None = None) -> list[dict]:
        """Entries matching every given filter, oldest first; `limit` keeps the newest."""
        want = {"key_id": key_id, "team": team, "model": model, "route": route, "status": status, "event": event}
        out = []
        for e in self.entries():
            ts = e.get("ts", 0)
            if (since is not None and ts < since) or (until is not None and ts >= until):
                continue
            if any(v is not None and e.get(k) != v for k, v in want.items()):
                continue
            out.append(e)
        return out[-limit:] if limit else out
