"""ASGI middleware: authenticates every protected route, checks its role, counts RPM and parallel requests,
and writes exactly one audit entry per request once its response (streamed body included) is done."""

from __future__ import annotations

import logging
import secrets
import time

from serving.governance.core import Governance, RequestContext
from serving.governance.errors import GovernanceError

log = logging.getLogger("loraplex.governance")


class GovernanceMiddleware:
    """Pure ASGI (not BaseHTTPMiddleware), so streaming responses pass through untouched."""

    def __init__(self, app, governance: Governance):
        self.app = app
        self.gov = governance

    def _protected(self, path: str) -> bool:
        return any(path == p or path.startswith(p.rstrip("/") + "/") for p in self.gov.config.protected_prefixes)

    async def __call__(self, scope, receive, send):
        if scope["type"] != "http" or not self.gov.config.enabled or not self._protected(scope["path"]):
            await self.app(scope, receive, send)
            return
        headers = {k.decode("latin-1").lower(): v.decode("latin-1") for k, v in scope.get("headers", [])}
        ctx = RequestContext(request_id="req-" + secrets.token_hex(8), method=scope["method"], route=scope["path"],
                             start=time.perf_counter())
        scope.setdefault("state", {})["governance"] = ctx
        try:
            ctx.principal = self.gov.authenticate(headers.get("authorization"))
            self.gov.authorize_route(ctx.principal, ctx.method, ctx.route)
            ctx.lease = self.gov.limiter.admit(self.gov.subjects(ctx.principal), count_request=True)
        except GovernanceError as exc:
            self.gov.count_rejection(exc, ctx)
            ctx.status = exc.status
            if ctx.principal is None and getattr(exc, "key_id", None):
                ctx.extra["key_id"] = exc.key_id
            await exc.response()(scope, receive, send)
            self._audit(ctx)
            return

        audited = False

        async def send_status(message):
            nonlocal audited
            if message["type"] == "http.response.start" and ctx.status is None:
                ctx.status = message["status"]
            elif message["type"] == "http.response.body" and not message.get("more_body") and not audited:
                audited = True  # durable before the client sees the response complete
                self._finish(ctx)
            await send(message)

        try:
            await self.app(scope, receive, send_status)
        except BaseException:
            if ctx.status is None:
                ctx.status = 500
            raise
        finally:
            if not audited:
                self._finish(ctx)

    def _finish(self, ctx: RequestContext) -> None:
        if ctx.ticket is not None and ctx.ticket.settled is None:
            ctx.ticket.abandon(ctx.status if ctx.status and ctx.status != 200 else 499)
        self.gov.limiter.release(ctx.lease)
        self._audit(ctx)

    def _audit(self, ctx: RequestContext) -> None:
        p = ctx.principal
        entry = {"event": "request", "request_id": ctx.request_id, "method": ctx.method, "route": ctx.route,
                 "key_id": p.key_id if p else None, "team": p.team if p else None, "role": p.role if p else None,
                 "status": ctx.status, "error": ctx.error,
                 "latency_ms": round((time.perf_counter() - ctx.start) * 1000, 3)}
        if ctx.ticket is not None and ctx.ticket.settled is not None:
            entry.update(ctx.ticket.settled)
        entry.update(ctx.extra)
        try:
            self.gov.write_audit(entry)
        except Exception:  # the response is gone already; never turn an audit failure into a crash loop
            log.exception("could not write the audit entry for %s", ctx.request_id)
