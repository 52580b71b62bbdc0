"""API keys: `lpx-<12 hex id><secret>`, stored as a salted SHA-256 (keys are 256-bit random, so no KDF needed)."""

from __future__ import annotations

import fnmatch
import hashlib
import hmac
import json
import re
import secrets
import time
from dataclasses import dataclass, field
from typing import Any

from serving.governance.config import Budget, Limits, Role
from serving.governance.db import Database

PREFIX = "lpx-"
ID_LEN = 12
ROLES = ("user", "trainer", "admin")
ALLOW_FIELDS = ("models", "adapters", "routes", "collections")
_KEY_RE = re.compile(r"^lpx-([0-9a-f]{12})[A-Za-z0-9_-]{32,}$")


@dataclass(frozen=True)
class Principal:
    """Who is calling: a key's identity and rights (never its secret)."""

    key_id: str
    name: str
    team: str
    role: Role
    allow: dict[str, list[str]] = field(default_factory=lambda: {f: ["*"] for f in ALLOW_FIELDS})
    limits: Limits = field(default_factory=Limits)
    budget: Budget | None = None
    expires_at: float | None = None
    anonymous: bool = False

    def allows(self, kind: str, value: str) -> bool:
        """Glob allow-list check; `kind` is one of models, adapters, routes, collections."""
        return any(fnmatch.fnmatchcase(value, pattern) for pattern in self.allow.get(kind, ["*"]))


# Open mode (no keys yet, or open_access): nothing is enforced, so the anonymous caller holds every role;
# otherwise `make serve` could not load adapters, start fine-tuning or create the first key over HTTP.
ANONYMOUS = Principal(key_id="anonymous", name="anonymous", team="anonymous", role="admin", anonymous=True)


@dataclass(frozen=True)
class KeyRecord:
    id: str
    name: str
    team: str
    role: str
    allow: dict[str, list[str]]
    limits: dict[str, Any]
    budget_usd: float | None
    budget_period: str | None
    created_at: float
    expires_at: float | None
    revoked_at: float | None

    @property
    def status(self) -> str:
        if self.revoked_at is not None:
            return "revoked"
        if self.expires_at is not None and self.expires_at <= time.time():
            return "expired"
        return "active"

    def public(self) -> dict[str, Any]:
        """What list/get endpoints show: everything but salt and hash."""
        return {
            "id": self.id, "name": self.name, "team": self.team, "role": self.role, "allow": self.allow,
            "limits": self.limits, "budget_usd": self.budget_usd, "budget_period": self.budget_period,
            "created_at": self.created_at, "expires_at": self.expires_at, "revoked_at": self.revoked_at,
            "status": self.status,
        }

    def principal(self) -> Principal:
        budget = Budget(amount_usd=self.budget_usd, period=self.budget_period or "month") \
            if self.budget_usd is not None else None
        return Principal(key_id=self.id, name=self.name, team=self.team, role=self.role,  # type: ignore[arg-type]
                         allow=self.allow, limits=Limits(**self.limits), budget=budget,
                         expires_at=self.expires_at)


def _hash(salt: bytes, key: str) -> bytes:
    return hashlib.sha256(salt + key.encode()).digest()


def _clean_list(name: str, values: list[str] | None) -> list[str]:
    if values is None:
        return ["*"]
    if isinstance(values, str):
        values = [v.strip() for v in values.split(",") if v.strip()]
    out = [str(v).strip() for v in values if str(v).strip()]
    if not out:
        raise ValueError(f"allow-list {name!r} is empty: give at least one pattern, or '*' for all")
    return out


class KeyStore:
    def __init__(self, db: Database):
        self.db = db

    def create(self, *, name: str, team: str = "default", role: str = "user",
               models: list[str] | None = None, adapters: list[str] | None = None,
               routes: list[str] | None = None, collections: list[str] | None = None,
               expires_at: float | None = None, limits: Limits | dict | None = None,
               budget_usd: float | None = None, budget_period: str = "month") -> tuple[str, KeyRecord]:
        """Returns (plain key, record). The plain key is shown once and never stored."""
        if role not in ROLES:
            raise ValueError(f"role must be one of {ROLES}, got {role!r}")
        if not name or not team:
            raise ValueError("name and team must be non-empty")
        if budget_period not in ("day", "month"):
            raise ValueError(f"budget_period must be 'day' or 'month', got {budget_period!r}")
        if budget_usd is not None and budget_usd < 0:
            raise ValueError("budget_usd must be >= 0")
        limits = Limits.model_validate(limits or {})
        allow = {"models": _clean_list("models", models), "adapters": _clean_list("adapters", adapters),
                 "routes": _clean_list("routes", routes), "collections": _clean_list("collections", collections)}
        key_id = secrets.token_hex(ID_LEN // 2)
        key = PREFIX + key_id + secrets.token_urlsafe(32)
        salt = secrets.token_bytes(16)
        now = time.time()
        with self.db.tx() as c:
            c.execute(
                "INSERT INTO api_keys (id, name, team, role, salt, hash, allow, limits, budget_usd, budget_period,"
                " created_at, expires_at) VALUES (?,?,?,?,?,?,?,?,?,?,?,?)",
                (key_id, name, team, role, salt, _hash(salt, key), json.dumps(allow),
                 json.dumps(limits.model_dump()), budget_usd, budget_period, now, expires_at))
        return key, self.get(key_id)  # type: ignore[return-value]

    def _record(self, row) -> KeyRecord:
        return KeyRecord(id=row["id"], name=row["name"], team=row["team"], role=row["role"],
                         allow=json.loads(row["allow"]), limits=json.loads(row["limits"]),
                         budget_usd=row["budget_usd"], budget_period=row["budget_period"],
                         created_at=row["created_at"], expires_at=row["expires_at"], revoked_at=row["revoked_at"])

    def get(self, key_id: str) -> KeyRecord | None:
        rows = self.db.query("SELECT * FROM api_keys WHERE id = ?", (key_id,))
        return self._record(rows[0]) if rows else None

    def list(self, *, team: str | None = None, include_inactive: bool = True) -> list[KeyRecord]:
        sql, args = "SELECT * FROM api_keys", []
        if team:
            sql, args = sql + " WHERE team = ?", [team]
        records = [self._record(r) for r in self.db.query(sql + " ORDER BY created_at", args)]
        return [r for r in records if include_inactive or r.status == "active"]

    def revoke(self, key_id: str) -> KeyRecord | None:
        """Idempotent; returns None for an unknown id."""
        with self.db.tx() as c:
            c.execute("UPDATE api_keys SET revoked_at = ? WHERE id = ? AND revoked_at IS NULL",
                      (time.time(), key_id))
        return self.get(key_id)

    def any_keys(self) -> bool:
        return bool(self.db.query("SELECT 1 FROM api_keys LIMIT 1"))

    def verify(self, key: str) -> tuple[str, KeyRecord | None]:
        """-> (outcome, record): outcome is ok, malformed, unknown, revoked or expired."""
        m = _KEY_RE.match(key or "")
        if not m:
            return "malformed", None
        rows = self.db.query("SELECT * FROM api_keys WHERE id = ?", (m.group(1),))
        if not rows or not hmac.compare_digest(_hash(rows[0]["salt"], key), rows[0]["hash"]):
            return "unknown", None
        record = self._record(rows[0])
        if record.status != "active":
            return record.status, record
        return "ok", record
