"""GovernanceConfig: open access, database, limits, team budgets, PII policies and audit settings (strict)."""

from __future__ import annotations

import fnmatch
from pathlib import Path
from typing import Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

Role = Literal["user", "trainer", "admin"]
Period = Literal["day", "month"]
PIIAction = Literal["allow", "redact", "block"]
PII_KINDS = ("email", "phone", "card", "iban", "national_id", "secret")


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Limits(_Strict):
    """Requests and tokens per minute, parallel requests; None means unlimited."""

    rpm: int | None = Field(None, ge=1)
    tpm: int | None = Field(None, ge=1)
    max_parallel: int | None = Field(None, ge=1)


class Budget(_Strict):
    amount_usd: float = Field(..., ge=0)
    period: Period = "month"


class TeamPolicy(_Strict):
    limits: Limits = Limits()
    budget: Budget | None = None


class PIIPolicy(_Strict):
    """What to do with personal data found in prompts and in outputs; `kinds` narrows the detectors."""

    prompt: PIIAction = "allow"
    output: PIIAction = "allow"
    kinds: list[str] = Field(default_factory=lambda: list(PII_KINDS))

    @field_validator("kinds")
    @classmethod
    def _known(cls, kinds: list[str]) -> list[str]:
        unknown = [k for k in kinds if k not in PII_KINDS]
        if unknown:
            raise ValueError(f"unknown PII kind(s) {unknown}; known: {list(PII_KINDS)}")
        return kinds


class ModelPrice(_Strict):
    """Either per-1M-token prices, or a GPU-hour price with the throughput measured on it (self-hosted)."""

    input_per_1m: float | None = Field(None, ge=0)
    output_per_1m: float | None = Field(None, ge=0)
    gpu_hour_usd: float | None = Field(None, ge=0)
    input_tok_s: float | None = Field(None, gt=0)
    output_tok_s: float | None = Field(None, gt=0)
    utilization: float = Field(1.0, gt=0, le=1)

    @model_validator(mode="after")
    def _one(self):
        per_token = (self.input_per_1m, self.output_per_1m)
        gpu = (self.gpu_hour_usd, self.input_tok_s, self.output_tok_s)
        if any(v is not None for v in gpu):
            if any(v is not None for v in per_token):
                raise ValueError("give either input_per_1m/output_per_1m or gpu_hour_usd/input_tok_s/output_tok_s")
            if None in gpu:
                raise ValueError("a GPU-hour price needs gpu_hour_usd, input_tok_s and output_tok_s (measured)")
        elif None in per_token:
            raise ValueError("give input_per_1m and output_per_1m, or gpu_hour_usd with measured throughput")
        return self

    def price(self):
        from serving.pricing import Price

        if self.gpu_hour_usd is not None:
            return Price.from_gpu_hour(self.gpu_hour_usd, input_tok_s=self.input_tok_s,
                                       output_tok_s=self.output_tok_s, utilization=self.utilization)
        return Price(self.input_per_1m, self.output_per_1m)


class RouteRole(_Strict):
    """The least role a route needs (globs), on top of the built-in admin/trainer routes."""

    path: str
    method: str = "*"
    role: Role


class AuditConfig(_Strict):
    path: str | None = None  # default: <data dir>/audit/audit.jsonl
    max_bytes: int = Field(50 * 1024 * 1024, ge=1024)
    backups: int = Field(10, ge=1)
    fsync: bool = True
    log_content: bool = False  # store prompts/outputs (after redaction) in the audit log


class GovernanceConfig(_Strict):
    enabled: bool = True
    open_access: bool = False  # serve /v1 without keys even when keys exist (a warning at start)
    database: str | None = None  # SQLite path or sqlite:///URL; default <data dir>/governance.db
    protected_prefixes: list[str] = Field(default_factory=lambda: ["/v1"])
    default_limits: Limits = Limits()  # per key, unless the key carries its own
    teams: dict[str, TeamPolicy] = Field(default_factory=dict)
    pii: PIIPolicy = PIIPolicy()
    pii_routes: dict[str, PIIPolicy] = Field(default_factory=dict)  # route glob -> policy
    pii_keys: dict[str, PIIPolicy] = Field(default_factory=dict)  # key id or key name -> policy
    audit: AuditConfig = AuditConfig()
    prices: dict[str, ModelPrice] = Field(default_factory=dict)  # model -> price, if the gateway passes none
    route_roles: list[RouteRole] = Field(default_factory=list)
    # a reservation its gateway stops renewing (the process died) stops counting after this; live ones renew
    reservation_ttl_s: float = Field(120.0, gt=0)
    stream_holdback_chars: int = Field(64, ge=8)

    def database_path(self) -> Path:
        from loraplex.paths import home

        db = self.database
        if not db:
            return home() / "governance.db"
        if db.startswith("sqlite:///"):
            return Path(db[len("sqlite:///"):]).expanduser()
        if "://" in db:
            raise ValueError(f"governance.database: only SQLite paths or sqlite:/// URLs are supported, got {db!r}")
        return Path(db).expanduser()

    def audit_path(self) -> Path:
        from loraplex.paths import home

        return Path(self.audit.path).expanduser() if self.audit.path else home() / "audit" / "audit.jsonl"

    def pii_policy(self, route: str, key_id: str | None = None, key_name: str | None = None) -> PIIPolicy:
        """Key beats route beats default; route patterns are globs (`/v1/chat/*`)."""
        for ident in (key_id, key_name):
            if ident and ident in self.pii_keys:
                return self.pii_keys[ident]
        for pattern, policy in self.pii_routes.items():
            if fnmatch.fnmatchcase(route, pattern):
                return policy
        return self.pii


def load_config(source: str | Path | dict | None) -> GovernanceConfig:
    """A YAML file or dict, the settings either at top level or under a `governance:` key."""
    import yaml
    from pydantic import ValidationError

    if source is None:
        return GovernanceConfig()
    if isinstance(source, dict):
        data = source
    else:
        path = Path(source)
        if not path.exists():
            raise FileNotFoundError(f"governance config not found: {path}")
        data = yaml.safe_load(path.read_text()) or {}
    if isinstance(data, dict) and "governance" in data:
        data = data["governance"] or {}
    try:
        return GovernanceConfig.model_validate(data)
    except ValidationError as exc:
        first = exc.errors()[0]
        field = ".".join(str(p) for p in first["loc"])
        raise ValueError(f"governance config: {field}: {first['msg']}") from exc
