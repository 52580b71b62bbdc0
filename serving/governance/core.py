"""Governance: the one object a gateway holds. Authenticates, authorises, rate-limits, reserves budget,
guards prompts and outputs, prices and records every request, and writes one audit entry per request."""

from __future__ import annotations

import fnmatch
import logging
import secrets
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterable, AsyncIterator, Callable, Mapping

from serving.governance.audit import AuditLog
from serving.governance.budgets import BudgetBook
from serving.governance.config import GovernanceConfig, Limits, TeamPolicy
from serving.governance.db import Database
from serving.governance.errors import AuthenticationError, GovernanceError, PermissionDenied, PIIBlocked
from serving.governance.keys import ANONYMOUS, PREFIX, KeyStore, Principal
from serving.governance.limits import Lease, RateLimiter
from serving.governance.pii import StreamGuard, redact
from serving.governance.spend import SpendCollector, UsageLedger
from serving.governance.teams import TeamStore

log = logging.getLogger("loraplex.governance")

ROLE_RANK = {"user": 0, "trainer": 1, "admin": 2}
# (method glob, path glob, least role); the first match wins, config route_roles come first.
BUILTIN_ROUTE_ROLES = [
    ("*", "/v1/admin/*", "admin"),
    ("GET", "/v1/adapters*", "user"),
    ("*", "/v1/adapters*", "admin"),  # load / unload
    ("*", "/v1/load_lora_adapter", "admin"),
    ("*", "/v1/unload_lora_adapter", "admin"),
    ("*", "/v1/fine_tuning/jobs/*/promote", "admin"),  # moves a registry alias that serving may load
    ("*", "/v1/fine_tuning*", "trainer"),
    ("*", "/v1/files*", "trainer"),
]
_CONTENT_KEYS = ("content", "text", "prompt", "input")
_LOOKUP = object()  # Governance.subjects: read the team's policy


def _redact_obj(obj: Any, kinds, found: set[str]) -> Any:
    """Redact the strings of an OpenAI prompt: a string, a list of strings, or messages with content parts."""
    if isinstance(obj, str):
        text, kinds_found = redact(obj, kinds)
        found.update(kinds_found)
        return text
    if isinstance(obj, list):
        return [_redact_obj(x, kinds, found) for x in obj]
    if isinstance(obj, dict):
        return {k: (_redact_obj(v, kinds, found) if k in _CONTENT_KEYS else v) for k, v in obj.items()}
    return obj


@dataclass
class RequestContext:
    """Per-HTTP-request state the middleware keeps in `request.state.governance`."""

    request_id: str
    method: str
    route: str
    start: float
    principal: Principal | None = None
    lease: Lease | None = None
    status: int | None = None
    error: str | None = None
    ticket: "Ticket | None" = None
    extra: dict[str, Any] = field(default_factory=dict)  # admin actions etc., merged into the audit entry


class Ticket:
    """One admitted model request: call `settle` exactly once (or use it as a context manager)."""

    def __init__(self, gov: "Governance", principal: Principal, *, route: str, model: str, adapter: str | None,
                 price, prompt_tokens: int, max_tokens: int, reservation: str | None, reserved_usd: float,
                 team_budget, lease: Lease | None, owns_lease: bool, ctx: RequestContext | None, prompt: Any,
                 guardrails: list[dict], output_action: str, output_kinds: list[str], request_id: str):
        self.gov, self.principal, self.route, self.model, self.adapter = gov, principal, route, model, adapter
        self.price, self.est_prompt_tokens, self.max_tokens = price, prompt_tokens, max_tokens
        self.reservation, self.reserved_usd, self.team_budget = reservation, reserved_usd, team_budget
        self.lease, self.owns_lease, self.ctx = lease, owns_lease, ctx
        self.prompt = prompt  # the prompt to run: redacted under a `redact` policy
        self.guardrails = guardrails
        self.output_action, self.output_kinds = output_action, output_kinds
        self.request_id = request_id
        self.completion_tokens = 0  # the gateway may count as it streams; used if the client goes away
        self.constraint: dict | None = None  # a constrained request's kind, schema hash, tool names (never content)
        self.failovers: list = []  # replicas lost and replaced during the request (serving.api.failover)
        self.settled: dict[str, Any] | None = None
        self._guards: list[StreamGuard] = []
        self._start = time.perf_counter()

    def confirm_prompt(self, prompt_tokens: int) -> None:
        """The replica counted the prompt (chat template included): reserve the difference if admission's
        estimate was short (or a route fell back to a dearer model), so a budget can never be overspent; 429
        insufficient_quota, uncharged, if it cannot hold it."""
        prompt_tokens = max(int(prompt_tokens), self.est_prompt_tokens)
        extra = self.price.cost(prompt_tokens, self.max_tokens) - self.reserved_usd
        if extra > 1e-12 and self.reservation is not None:
            try:
                self.gov.budgets.top_up(self.reservation, key_id=self.principal.key_id, team=self.principal.team,
                                        extra_usd=extra, key_budget=self.principal.budget,
                                        team_budget=self.team_budget)
            except GovernanceError as exc:  # refused as at admission: no ledger row, nothing held
                self.refuse(exc)
                raise
            self.reserved_usd += extra
        self.est_prompt_tokens = prompt_tokens

    def refuse(self, exc: GovernanceError) -> None:
        """End an admitted request that governance refuses before anything was sent: free its reservation and
        limiter hold without charging it (as a refusal at admission)."""
        if self.settled is not None:
            return
        self.gov.budgets.release(self.reservation)
        self._free_lease(0)
        self.gov.count_rejection(exc, self.ctx)
        self.settled = {"model": self.model, "adapter": self.adapter, "prompt_tokens": 0, "completion_tokens": 0,
                        "cost_usd": 0.0, "reserved_usd": self.reserved_usd, "guardrails": self.guardrails}
        if self.ctx is None:
            self._audit(exc.status, error=exc.code)

    def _free_lease(self, tokens: int) -> None:
        """Count the tokens against the rate limits and give back the parallel slot this ticket holds."""
        if self.lease is not None:
            self.gov.limiter.settle_tokens(self.lease, tokens)
            if self.owns_lease:
                self.gov.limiter.release(self.lease)

    def _audit(self, status: int, **extra) -> None:
        """The request's audit entry, for a request no middleware wraps (it writes its own otherwise)."""
        p = self.principal
        self.gov.write_audit({"event": "request", "request_id": self.request_id, "key_id": p.key_id, "team": p.team,
                              "role": p.role, "route": self.route, "status": status, **extra, **self.settled})

    # --- outputs -------------------------------------------------------------------------------------------
    def output_guard(self) -> StreamGuard:
        """A fresh StreamGuard for one output stream (one per choice)."""
        guard = StreamGuard(self.output_action, self.output_kinds, holdback=self.gov.config.stream_holdback_chars)
        self._guards.append(guard)
        return guard

    async def guard_output(self, stream: AsyncIterable[str]) -> AsyncIterator[str]:
        """Pass text deltas through the output policy; raises PIIBlocked mid-stream under `block`."""
        guard = self.output_guard()
        async for chunk in stream:
            try:
                safe = guard.feed(chunk)
            except PIIBlocked:
                self._note_output(guard, "block")
                raise
            if safe:
                yield safe
        tail = guard.flush()
        self._note_output(guard, self.output_action)
        if tail:
            yield tail

    def check_output(self, text: str) -> str:
        """The non-streaming form: the whole output text, redacted or refused."""
        guard = self.output_guard()
        try:
            out = guard.feed(text) + guard.flush()
        except PIIBlocked:
            self._note_output(guard, "block")
            raise
        self._note_output(guard, self.output_action)
        return out

    def _note_output(self, guard: StreamGuard, action: str) -> None:
        if guard.found:
            self.guardrails.append({"where": "output", "action": action, "kinds": sorted(guard.found)})

    # --- settlement ----------------------------------------------------------------------------------------
    def settle(self, prompt_tokens: int, completion_tokens: int, *, status: int = 200,
               latency_s: float | None = None, content: dict[str, Any] | None = None) -> dict[str, Any]:
        """Price the tokens, write the ledger row and drop the reservation (one transaction), free the
        limiter, and write (or hand the middleware) the audit entry. Idempotent: later calls are ignored."""
        if self.settled is not None:
            return self.settled
        gov, p = self.gov, self.principal
        prompt_tokens, completion_tokens = max(0, int(prompt_tokens)), max(0, int(completion_tokens))
        cost = self.price.cost(prompt_tokens, completion_tokens)
        try:
            gov.budgets.settle(self.reservation, key_id=p.key_id, team=p.team, model=self.model,
                               adapter=self.adapter, route=self.route, prompt_tokens=prompt_tokens,
                               completion_tokens=completion_tokens, cost_usd=cost, status=status,
                               request_id=self.request_id)
        finally:
            self._free_lease(prompt_tokens + completion_tokens)
        latency = latency_s if latency_s is not None else time.perf_counter() - self._start
        self.settled = {"model": self.model, "adapter": self.adapter, "prompt_tokens": prompt_tokens,
                        "completion_tokens": completion_tokens, "cost_usd": cost, "reserved_usd": self.reserved_usd,
                        "guardrails": self.guardrails, "model_latency_ms": round(latency * 1000, 3)}
        if self.constraint is not None:
            self.settled["constrained"] = self.constraint
        if self.failovers:  # replicas lost mid-request and replaced (serving.api.failover): charged once
            self.settled["failovers"] = list(self.failovers)
        if content is not None and gov.config.audit.log_content:
            self.settled["content"] = content
        if self.ctx is None:  # no middleware around this request: write the audit entry here
            self._audit(status, latency_ms=round(latency * 1000, 3))
        elif status != 200 and self.ctx.status is None:
            self.ctx.status = status
        return self.settled

    def abandon(self, status: int = 499) -> None:
        """The client went away or the handler failed before settling: charge what is known."""
        if self.settled is None:
            self.settle(self.est_prompt_tokens, self.completion_tokens, status=status)

    def __enter__(self) -> "Ticket":
        return self

    def __exit__(self, exc_type, exc, tb) -> None:
        if exc is not None:
            self.abandon(getattr(exc, "status", 500))

    async def __aenter__(self) -> "Ticket":
        return self

    async def __aexit__(self, exc_type, exc, tb) -> None:
        self.__exit__(exc_type, exc, tb)


PriceSource = Mapping[str, Any] | Callable[[str], Any] | None


class Governance:
    def __init__(self, config: GovernanceConfig | None = None, *, prices: PriceSource = None,
                 registry=None):
        """`prices`: model name -> serving.pricing.Price (a mapping or a function returning None if unknown);
        config.prices fills the gaps. `registry`: a prometheus CollectorRegistry for the spend totals."""
        self.config = config or GovernanceConfig()
        self.db = Database(self.config.database_path())
        self.keys = KeyStore(self.db)
        self.teams = TeamStore(self.db, self.config)
        self.ledger = UsageLedger(self.db)
        self.budgets = BudgetBook(self.db, self.config.reservation_ttl_s)
        self.limiter = RateLimiter()
        a = self.config.audit
        self.audit = AuditLog(self.config.audit_path(), max_bytes=a.max_bytes, backups=a.backups, fsync=a.fsync)
        self._prices = prices
        self.instance: str | None = None  # the gateway replica holding this object: audit entries name it
        self._config_prices = {name: p.price() for name, p in self.config.prices.items()}
        self.rejections = None
        if registry is not None:
            from prometheus_client import Counter

            registry.register(SpendCollector(self.ledger))
            self.rejections = Counter("loraplex_governance_rejections", "Requests refused by governance",
                                      ["code"], registry=registry)

    # --- start-up ------------------------------------------------------------------------------------------
    def startup_warnings(self) -> list[str]:
        warnings = []
        if self.config.open_access:
            warnings.append("governance.open_access is on: /v1 routes are served without API keys")
        elif not self.keys.any_keys():
            warnings.append("no API keys exist yet, so /v1 is open; create one with `loraplex keys create "
                            "--name admin --role admin` and every /v1 route will need a key")
        return warnings

    def check_prices(self, models: list[str]) -> None:
        """Fail fast at start-up if a served model has no price (self-hosted ones are never free by default)."""
        missing = [m for m in models if self.price_for(m) is None]
        free = [m for m in models if m not in missing and self.price_for(m).cost(10**6, 10**6) == 0]
        if free:
            log.warning("model(s) %s are priced at $0: their spend will not count against budgets", free)
        if missing:
            raise ValueError(f"no price for model(s) {missing}: set governance.prices.<model> with "
                             "input_per_1m/output_per_1m, or gpu_hour_usd with measured input_tok_s/output_tok_s")

    def price_for(self, model: str, adapter: str | None = None):
        """An adapter's price if it has one, else its base model's."""
        for name in ([adapter] if adapter else []) + [model]:
            price = None
            if callable(self._prices):
                price = self._prices(name)
            elif self._prices is not None:
                price = self._prices.get(name)
            price = price or self._config_prices.get(name)
            if price is not None:
                return price
        return None

    # --- authentication and authorisation ------------------------------------------------------------------
    def auth_required(self) -> bool:
        return not self.config.open_access and self.keys.any_keys()

    def authenticate(self, authorization: str | None) -> Principal:
        """`Authorization: Bearer <key>` -> Principal, or 401. Never echoes the key."""
        token = None
        if authorization:
            scheme, _, value = authorization.strip().partition(" ")
            if scheme.lower() != "bearer" or not value.strip():
                raise AuthenticationError("the Authorization header must be 'Bearer <API key>'",
                                          code="invalid_authorization_header")
            token = value.strip()
        required = self.auth_required()
        if token is None or (not required and not token.startswith(PREFIX)):
            if required:
                raise AuthenticationError("an API key is required: send 'Authorization: Bearer <key>'",
                                          code="missing_api_key")
            return ANONYMOUS  # open: placeholder keys such as the OpenAI client's "EMPTY" are ignored
        outcome, record = self.keys.verify(token)
        if outcome == "ok":
            return record.principal()
        if outcome in ("revoked", "expired"):
            exc = AuthenticationError(f"API key {record.id} has {'been revoked' if outcome == 'revoked' else 'expired'}",
                                      code=f"key_{outcome}")
            exc.key_id = record.id  # type: ignore[attr-defined]  (the id is not secret; the audit names it)
            raise exc
        raise AuthenticationError("incorrect API key provided", code="invalid_api_key")

    def required_role(self, method: str, path: str) -> str:
        rules = [(r.method, r.path, r.role) for r in self.config.route_roles] + BUILTIN_ROUTE_ROLES
        for m, p, role in rules:
            if fnmatch.fnmatchcase(method.upper(), m.upper()) and fnmatch.fnmatchcase(path, p):
                return role
        return "user"

    def authorize_route(self, principal: Principal, method: str, path: str) -> None:
        role = self.required_role(method, path)
        if ROLE_RANK[principal.role] < ROLE_RANK[role]:
            raise PermissionDenied(f"{method} {path} needs the {role} role; key {principal.key_id} has "
                                   f"{principal.role}", code="insufficient_role")
        if not principal.allows("routes", path):
            raise PermissionDenied(f"key {principal.key_id} may not use {path}", code="route_not_allowed")

    def authorize(self, principal: Principal, *, model: str | None = None, adapter: str | None = None,
                  collection: str | None = None, route: str | None = None, role: str | None = None) -> None:
        """403 unless the key's allow-lists (globs) cover each given resource and its role suffices."""
        if role is not None and ROLE_RANK[principal.role] < ROLE_RANK[role]:
            raise PermissionDenied(f"this needs the {role} role; key {principal.key_id} has {principal.role}",
                                   code="insufficient_role")
        for kind, value, param in (("models", model, "model"), ("adapters", adapter, "model"),
                                   ("collections", collection, "collection"), ("routes", route, None)):
            if value is not None and not principal.allows(kind, value):
                raise PermissionDenied(f"key {principal.key_id} may not use {kind[:-1]} {value!r}",
                                       code=f"{kind[:-1]}_not_allowed", param=param)

    def subjects(self, principal: Principal, team: TeamPolicy | None | object = _LOOKUP) -> list[tuple[str, Limits]]:
        """The rate-limit subjects of a request; `team`: the team's policy when the caller has read it already."""
        key_limits = principal.limits if principal.limits != Limits() else self.config.default_limits
        team = self.teams.get(principal.team) if team is _LOOKUP else team
        return [(f"key:{principal.key_id}", key_limits), (f"team:{principal.team}", team.limits if team else Limits())]

    # --- the request path ----------------------------------------------------------------------------------
    def admit(self, who, *, route: str, model: str, adapter: str | None = None, prompt: Any = None,
              prompt_tokens: int, max_tokens: int) -> Ticket:
        """Allow-lists, prompt PII policy, tokens-per-minute and budget reservation for one model request.

        `who`: the starlette Request (inside the middleware) or a Principal. `prompt_tokens` is the prompt's
        token count and `max_tokens` the completion cap: the budget reserves their worst-case cost.
        """
        ctx: RequestContext | None = None
        if isinstance(who, Principal):
            principal = who
        else:
            ctx = getattr(who.state, "governance", None)
            principal = ctx.principal if ctx and ctx.principal else self.authenticate(who.headers.get("authorization"))
        try:
            return self._admit(principal, ctx, route, model, adapter, prompt, int(prompt_tokens), int(max_tokens))
        except GovernanceError as exc:
            self.count_rejection(exc, ctx)
            if ctx is None:
                self.write_audit({"event": "request", "key_id": principal.key_id, "team": principal.team,
                                  "role": principal.role, "route": route, "model": model, "adapter": adapter,
                                  "status": exc.status, "error": exc.code, "guardrails": getattr(exc, "guardrails", [])})
            raise

    def _admit(self, principal, ctx, route, model, adapter, prompt, prompt_tokens, max_tokens) -> Ticket:
        self.authorize(principal, model=model, adapter=adapter)
        policy = self.config.pii_policy(route, principal.key_id, principal.name)
        guardrails: list[dict] = []
        if prompt is not None and policy.prompt != "allow":
            found: set[str] = set()
            redacted = _redact_obj(prompt, policy.kinds, found)
            if found:
                guardrails.append({"where": "prompt", "action": policy.prompt, "kinds": sorted(found)})
                if ctx is not None:
                    ctx.extra["guardrails"] = guardrails
                if policy.prompt == "block":
                    exc = PIIBlocked("prompt", sorted(found))
                    exc.guardrails = guardrails  # type: ignore[attr-defined]
                    raise exc
                prompt = redacted
        price = self.price_for(model, adapter)
        if price is None:
            raise GovernanceError(f"no price is configured for model {model!r}; refusing to serve it unpriced",
                                  code="model_unpriced", status=500, type="server_error")
        if prompt_tokens < 0 or max_tokens < 0:
            raise GovernanceError("token counts must be >= 0", code="invalid_tokens")
        team = self.teams.get(principal.team)
        subjects = self.subjects(principal, team)
        owns = ctx is None or ctx.lease is None
        lease = self.limiter.admit(subjects, tokens=prompt_tokens + max_tokens, count_request=owns)
        try:
            reserved = price.cost(prompt_tokens, max_tokens)
            team_budget = team.budget if team else None
            reservation = self.budgets.reserve(key_id=principal.key_id, team=principal.team, amount_usd=reserved,
                                               key_budget=principal.budget, team_budget=team_budget)
        except BaseException:
            self.limiter.settle_tokens(lease, 0)
            if owns:
                self.limiter.release(lease)
            raise
        ticket = Ticket(self, principal, route=route, model=model, adapter=adapter, price=price,
                        prompt_tokens=prompt_tokens, max_tokens=max_tokens, reservation=reservation,
                        reserved_usd=reserved, team_budget=team_budget, lease=lease, owns_lease=owns, ctx=ctx,
                        prompt=prompt,
                        guardrails=guardrails, output_action=policy.output, output_kinds=policy.kinds,
                        request_id=ctx.request_id if ctx else "req-" + secrets.token_hex(8))
        if ctx is not None:
            ctx.ticket = ticket
        return ticket

    # --- records -------------------------------------------------------------------------------------------
    def count_rejection(self, exc: GovernanceError, ctx: RequestContext | None = None) -> None:
        if ctx is not None:
            ctx.error = exc.code
        if self.rejections is not None:
            self.rejections.labels(exc.code).inc()

    def write_audit(self, entry: dict[str, Any]) -> dict[str, Any]:
        return self.audit.write({k: v for k, v in {**entry, "gateway": self.instance}.items() if v is not None})

    def admin_event(self, action: str, actor: str, **details) -> None:
        """An admin action from outside HTTP (the CLI)."""
        self.write_audit({"event": "admin", "action": action, "key_id": actor, **details})
