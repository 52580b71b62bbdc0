"""HTTP surface: admin key management, usage reports and the audit query, as a FastAPI APIRouter."""

from __future__ import annotations

import time
from datetime import datetime, timezone
from typing import Any

from fastapi import APIRouter, FastAPI, Query, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel, ConfigDict, Field

from serving.governance.config import Limits, Period, Role, TeamPolicy
from serving.governance.core import ROLE_RANK, Governance
from serving.governance.errors import GovernanceError, PermissionDenied
from serving.governance.keys import Principal
from serving.governance.middleware import GovernanceMiddleware
from serving.governance.spend import GROUPS


class CreateKey(BaseModel):
    model_config = ConfigDict(extra="forbid")

    name: str = Field(..., min_length=1, max_length=200)
    team: str = Field("default", min_length=1, max_length=200)
    role: Role = "user"
    models: list[str] | None = None
    adapters: list[str] | None = None
    routes: list[str] | None = None
    collections: list[str] | None = None
    expires_at: datetime | None = None
    expires_in_days: float | None = Field(None, gt=0, le=36500)
    limits: Limits | None = None
    budget_usd: float | None = Field(None, ge=0, le=1e12)
    budget_period: Period = "month"


def parse_time(value: str | None, param: str) -> float | None:
    """ISO 8601 date/time (UTC unless it says otherwise) or a relative age such as 30m, 12h, 7d."""
    if value is None or value == "":
        return None
    v = value.strip()
    units = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 604800}
    if len(v) > 1 and v[-1] in units:
        try:
            return time.time() - float(v[:-1]) * units[v[-1]]
        except ValueError:
            pass
    try:
        t = datetime.fromisoformat(v.replace("Z", "+00:00"))
    except ValueError:
        raise GovernanceError(f"{param}: {value!r} is neither an ISO date/time nor an age like 7d",
                              code="invalid_time", param=param) from None
    if t.tzinfo is None:
        t = t.replace(tzinfo=timezone.utc)
    return t.timestamp()


def governance_router(gov: Governance) -> APIRouter:
    router = APIRouter(tags=["governance"])

    def principal(request: Request, role: str = "user") -> Principal:
        ctx = getattr(request.state, "governance", None)
        p = ctx.principal if ctx is not None and ctx.principal else gov.authenticate(request.headers.get("authorization"))
        gov.authorize(p, role=role)
        return p

    def note(request: Request, **details: Any) -> None:
        ctx = getattr(request.state, "governance", None)
        if ctx is not None:
            ctx.extra.update(details)
        else:
            gov.admin_event(details.pop("action"), principal(request).key_id, **details)

    @router.post("/v1/admin/keys", status_code=201)
    def create_key(body: CreateKey, request: Request) -> dict:
        """Create a key; the plain key is in this response only."""
        principal(request, "admin")
        expires = body.expires_at.timestamp() if body.expires_at else None
        if body.expires_in_days:
            expires = time.time() + body.expires_in_days * 86400
        try:
            key, record = gov.keys.create(
                name=body.name, team=body.team, role=body.role, models=body.models, adapters=body.adapters,
                routes=body.routes, collections=body.collections, expires_at=expires, limits=body.limits,
                budget_usd=body.budget_usd, budget_period=body.budget_period)
        except ValueError as exc:
            raise GovernanceError(str(exc), code="invalid_key_spec") from None
        note(request, action="keys.create", target=record.id, target_team=record.team, target_role=record.role)
        return {"key": key, **record.public()}

    @router.get("/v1/admin/keys")
    def list_keys(request: Request, team: str | None = None, include_inactive: bool = True) -> dict:
        principal(request, "admin")
        data = []
        for r in gov.keys.list(team=team, include_inactive=include_inactive):
            budget = r.principal().budget
            data.append({**r.public(), "budget_status": gov.budgets.status(key_id=r.id, budget=budget)
                         if budget is not None else None})
        return {"object": "list", "data": data}

    @router.get("/v1/admin/keys/{key_id}")
    def get_key(key_id: str, request: Request) -> dict:
        principal(request, "admin")
        record = gov.keys.get(key_id)
        if record is None:
            raise GovernanceError(f"no API key with id {key_id!r}", code="key_not_found", status=404,
                                  type="not_found_error", param="key_id")
        return record.public()

    @router.delete("/v1/admin/keys/{key_id}")
    def revoke_key(key_id: str, request: Request) -> dict:
        principal(request, "admin")
        record = gov.keys.revoke(key_id)
        if record is None:
            raise GovernanceError(f"no API key with id {key_id!r}", code="key_not_found", status=404,
                                  type="not_found_error", param="key_id")
        note(request, action="keys.revoke", target=key_id)
        return record.public()

    @router.get("/v1/usage")
    def usage(request: Request, group_by: str = "team", since: str | None = None, until: str | None = None,
              key_id: str | None = None, team: str | None = None, model: str | None = None,
              adapter: str | None = None) -> dict:
        """Spend and tokens by any of key_id, team, model, adapter, route, hour, day, month. Non-admins see their key."""
        p = principal(request)
        groups = [g.strip() for g in group_by.split(",") if g.strip()]
        unknown = [g for g in groups if g not in GROUPS]
        if unknown:
            raise GovernanceError(f"group_by: unknown field(s) {unknown}; choose from {sorted(GROUPS)}",
                                  code="invalid_group_by", param="group_by")
        if ROLE_RANK[p.role] < ROLE_RANK["admin"]:
            if key_id not in (None, p.key_id) or team not in (None, p.team):
                raise PermissionDenied("only admins may see other keys' or teams' usage", code="usage_not_allowed")
            key_id = p.key_id
        t0, t1 = parse_time(since, "since"), parse_time(until, "until")
        rows = gov.ledger.usage(groups, since=t0, until=t1, key_id=key_id, team=team, model=model, adapter=adapter)
        out: dict[str, Any] = {"object": "usage", "group_by": groups, "since": t0, "until": t1, "data": rows,
                               "total_cost_usd": sum(r["cost_usd"] or 0 for r in rows)}
        if p.budget is not None and key_id == p.key_id:
            out["budget"] = gov.budgets.status(key_id=p.key_id, budget=p.budget)
        return out

    @router.get("/v1/me")
    def me(request: Request) -> dict:
        """Who this key is (never its secret): what the portal shows and which views it offers."""
        p = principal(request)
        out: dict[str, Any] = {"object": "principal", "key_id": p.key_id, "name": p.name, "team": p.team,
                               "role": p.role, "anonymous": p.anonymous, "allow": p.allow,
                               "expires_at": p.expires_at, "auth_required": gov.auth_required(),
                               "keys_exist": gov.keys.any_keys(), "budget": None}
        if p.budget is not None:
            out["budget"] = gov.budgets.status(key_id=p.key_id, budget=p.budget)
        return out

    def team_row(name: str, keys: list, overrides: dict) -> dict:
        policy = gov.teams.get(name)
        edit = overrides.get(name)
        budget = policy.budget if policy else None
        return {"name": name, "configured": name in gov.config.teams,
                "source": "api" if edit else ("config" if policy else "none"),
                "updated_at": edit["updated_at"] if edit else None, "updated_by": edit["updated_by"] if edit else None,
                "limits": (policy.limits if policy else Limits()).model_dump(),
                "budget": gov.budgets.status(team=name, budget=budget) if budget else None,
                "keys": sum(k.team == name for k in keys),
                "active_keys": sum(k.team == name and k.status == "active" for k in keys)}

    @router.get("/v1/admin/teams")
    def teams(request: Request) -> dict:
        """Teams of the config, of admins' edits and of the keys: limits, budget and its burn, key counts."""
        principal(request, "admin")
        keys = gov.keys.list(include_inactive=True)
        overrides = gov.teams.overrides()
        names = sorted(set(gov.config.teams) | set(overrides) | {k.team for k in keys})
        return {"object": "list", "data": [team_row(n, keys, overrides) for n in names]}

    @router.put("/v1/admin/teams/{name}")
    def set_team(name: str, body: TeamPolicy, request: Request) -> dict:
        """Set a team's limits and budget (replacing the config's for it) from its next request on."""
        actor = principal(request, "admin")
        try:
            gov.teams.put(name, body, actor.key_id)
        except ValueError as exc:
            raise GovernanceError(str(exc), code="invalid_team_name", param="name") from None
        note(request, action="teams.update", target_team=name, policy=body.model_dump(mode="json"))
        return team_row(name, gov.keys.list(include_inactive=True), gov.teams.overrides())

    @router.delete("/v1/admin/teams/{name}")
    def reset_team(name: str, request: Request) -> dict:
        """Drop an admin's edit: the team goes back to its config policy (or to none)."""
        principal(request, "admin")
        if not gov.teams.delete(name):
            raise GovernanceError(f"team {name!r} has no policy set over the API (config policies are changed "
                                  "in governance.teams)", code="team_not_found", status=404,
                                  type="not_found_error", param="name")
        note(request, action="teams.reset", target_team=name)
        return team_row(name, gov.keys.list(include_inactive=True), gov.teams.overrides())

    @router.get("/v1/admin/policy")
    def policy(request: Request) -> dict:
        """The PII policy in force: the default, per route glob and per key (read from the config)."""
        principal(request, "admin")
        cfg = gov.config
        return {"object": "policy", "pii": cfg.pii.model_dump(),
                "pii_routes": {k: v.model_dump() for k, v in cfg.pii_routes.items()},
                "pii_keys": {k: v.model_dump() for k, v in cfg.pii_keys.items()},
                "default_limits": cfg.default_limits.model_dump(), "log_content": cfg.audit.log_content}

    @router.get("/v1/admin/audit")
    def audit(request: Request, since: str | None = None, until: str | None = None, key_id: str | None = None,
              team: str | None = None, model: str | None = None, route: str | None = None,
              status: int | None = None, event: str | None = None,
              limit: int = Query(100, ge=1, le=10000)) -> dict:
        principal(request, "admin")
        rows = gov.audit.query(since=parse_time(since, "since"), until=parse_time(until, "until"), key_id=key_id,
                               team=team, model=model, route=route, status=status, event=event, limit=limit)
        return {"object": "list", "data": rows}

    return router


async def _handle(request: Request, exc: GovernanceError) -> JSONResponse:
    ctx = getattr(request.state, "governance", None)
    if ctx is not None:
        ctx.error = exc.code
    return exc.response()


def install(app: FastAPI, gov: Governance, *, routes: bool = True) -> None:
    """Wire governance into a FastAPI app: middleware, OpenAI-shaped error handler, admin/usage routes."""
    import logging

    for warning in gov.startup_warnings():
        logging.getLogger("loraplex.governance").warning(warning)
    app.add_exception_handler(GovernanceError, _handle)
    if routes:
        app.include_router(governance_router(gov))
    app.add_middleware(GovernanceMiddleware, governance=gov)
