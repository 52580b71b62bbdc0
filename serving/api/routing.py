"""The gateway's glue to serving.router: routes from the serve config, live engine stats, per-request
decisions with header/body overrides, and one stream per candidate that the router falls back across."""

from __future__ import annotations

import logging
import time

from serving.api.errors import APIError
from serving.api.streaming import cancel_stream

log = logging.getLogger("loraplex.gateway.routing")


def router_error(exc) -> APIError:
    """A serving.router RouterError as the gateway's OpenAI error (503 + Retry-After when all are down)."""
    return APIError(exc.status, exc.message, param=exc.param, code=exc.code, type=exc.type,
                    retry_after=getattr(exc, "retry_after", None))


class GatewayRouter:
    """Holds the Router; `deployments` (serving.api.deployments) are the handles, readiness and stats."""

    def __init__(self, deployments, config, registry=None):
        from serving.router import Router, SignalTracker

        self.deployments = deployments
        self.config = config
        self.router = Router(config.parsed_routes(), SignalTracker(), registry=registry)
        deployments.on_context.append(self.refresh_context)

    def has_route(self, name: str) -> bool:
        return self.router.has_route(name)

    @property
    def routes(self) -> dict:
        return self.router.routes

    def refresh_context(self, context: dict[str, int]) -> None:
        """Re-read routes once models report their real max_model_len (a config may leave it to the model)."""
        try:
            self.router.routes = dict(self.config.parsed_routes(context))
        except ValueError as exc:  # validated at start-up with unbounded contexts: should not happen
            log.warning("routes not refreshed: %s", exc)

    # ---- live signals -----------------------------------------------------------------------------------
    def observe_stats(self, name: str, replicas: list[dict]) -> None:
        """Engine stats the deployments polled (serving.api.deployments.poll_stats): the freshest replica's.
        A slow poll is skipped, never marks a deployment down (real failures show up on the request path and
        put it in cooldown)."""
        self.router.signals.observe_stats(name, max(replicas, key=lambda s: s.get("time", 0)))

    # ---- one request ------------------------------------------------------------------------------------
    def decide(self, body, headers, prompt_tokens: int, max_tokens: int | None):
        from serving.router import RouterError, parse_overrides

        fields = {"route_policy": body.route_policy, "route_slo_ms": body.route_slo_ms,
                  "route_min_quality": body.route_min_quality}
        try:
            ov = parse_overrides(headers or {}, fields)
            return self.router.decide(body.model, prompt_tokens, max_tokens, **ov.as_kwargs())
        except RouterError as exc:
            raise router_error(exc) from None

    def restrict(self, decision, allowed) -> None:
        """Keep the candidates `allowed(model)` accepts (a key's allow-lists); 403 when none is left."""
        keep = [c for c in decision.choices if allowed(c.model)]
        if not keep:
            raise APIError(403, f"this key may use none of the candidates of route `{decision.route}`: "
                                f"{', '.join(c.model for c in decision.choices)}", param="model",
                           code="model_not_allowed")
        decision.choices = keep

    async def open(self, decision, req: dict, opened_at: list, failovers: list | None = None):
        """Open the best candidate that accepts `req`; falls back on 429/5xx/not-ready before the first token.
        Returns (RoutedStream, its iterator of delta items, the accepted item)."""
        from serving.router import RouterError

        async def candidate(cand):
            base, adapter = self.deployments.resolve(cand.model, self.routes)
            opened_at[:] = [time.monotonic()]
            accepted, gen = await self.deployments.open(base, {**req, "adapter": adapter}, failovers)
            finished = False
            try:
                yield {**accepted, "base": base, "adapter": adapter}
                async for item in gen:
                    yield item
                finished = True
            finally:
                if not finished:
                    cancel_stream(gen)

        try:
            stream = await self.router.open_stream(decision, candidate)
        except RouterError as exc:
            raise router_error(exc) from None
        it = aiter(stream)
        accepted = await anext(it)
        return stream, it, accepted

    @staticmethod
    def response_headers(routed) -> dict[str, str]:
        """X-Routed-Model and X-Route-Decision of an answered routed request."""
        from serving.router import response_headers

        return response_headers(routed)

    def observe(self, answered, rec, opened_at: float) -> None:
        """A finished request's timings for its deployment's signals (routed or addressed directly)."""
        if rec.first_token_at is None:
            return
        now = time.monotonic()
        self.router.observe(answered, ttft_s=rec.first_token_at - opened_at, prompt_tokens=rec.prompt_tokens,
                            completion_tokens=rec.completion_tokens, e2e_s=now - opened_at,
                            queue_s=rec.queue_s or 0.0)

    def cards(self) -> list[dict]:
        """Routes listed in /v1/models, next to the models they route to."""
        out = []
        for name, r in self.router.routes.items():
            out.append({"id": name, "object": "model", "created": self.deployments.created,
                        "owned_by": "loraplex-router", "root": name,
                        "parent": None, "type": "route", "policy": r.policy,
                        "candidates": [c.model for c in r.candidates]})
        return out
