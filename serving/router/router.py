"""The Router: decide a ranked candidate list per request, then call candidates in order until one answers.

Transport-agnostic: the gateway passes `call(candidate)` (or a stream opener) that talks to a deployment and
raises a CandidateError (or an engine/httpx error `classify` understands) when that deployment fails.
"""

from __future__ import annotations

import inspect
import json
import logging
import time
from dataclasses import dataclass, field
from typing import Any, AsyncIterator, Awaitable, Callable, Iterable

from serving.router import policies
from serving.router.config import POLICIES, SLO, CandidateConfig, RouteConfig
from serving.router.errors import (
    CandidateContextOverflow,
    CandidateError,
    CandidateOverloaded,
    NoCandidateAvailable,
    RouteContextOverflow,
    RouteRequestError,
    StreamFailedAfterFirstChunk,
    UnknownRouteError,
    classify,
)
from serving.router.metrics import RouterMetrics
from serving.router.predict import Prediction, predict
from serving.router.signals import DeploymentSignals, SignalTracker

log = logging.getLogger("loraplex.router")


@dataclass(frozen=True)
class Choice:
    candidate: CandidateConfig
    prediction: Prediction
    reason: str

    @property
    def model(self) -> str:
        return self.candidate.model


@dataclass
class RouteDecision:
    route: str
    policy: str
    choices: list[Choice]  # best first; the rest are fallbacks, each tried at most once
    excluded: list[tuple[str, str]]  # (model, why it was not a candidate for this request)
    prompt_tokens: int
    max_tokens: int | None
    slo: SLO | None = None
    quality_floor: float | None = None
    slo_met: bool | None = None  # slo policy: whether the first choice is predicted to meet the SLO

    @property
    def primary(self) -> Choice:
        return self.choices[0]

    def to_log(self) -> dict:
        return {
            "route": self.route,
            "policy": self.policy,
            "chosen": self.primary.model,
            "prompt_tokens": self.prompt_tokens,
            "max_tokens": self.max_tokens,
            "slo": self.slo.model_dump(exclude_none=True) if self.slo else None,
            "slo_met": self.slo_met,
            "quality_floor": self.quality_floor,
            "ranked": [{**c.prediction.summary(), "reason": c.reason} for c in self.choices],
            "excluded": [{"model": m, "reason": r} for m, r in self.excluded],
        }


@dataclass(frozen=True)
class Attempt:
    model: str
    reason: str  # overloaded | context_overflow | server_error
    message: str


@dataclass
class RoutedResult:
    result: Any
    choice: Choice
    decision: RouteDecision
    attempts: list[Attempt] = field(default_factory=list)  # the candidates that failed before this one
    elapsed_s: float = 0.0

    @property
    def model(self) -> str:
        return self.choice.model


SignalsProvider = Callable[[str], DeploymentSignals]


class Router:
    """`Router(routes, signals)`: routes by name; signals is a SignalTracker (or any name -> DeploymentSignals
    callable; then cooldowns after failures are the caller's business)."""

    def __init__(
        self,
        routes: dict[str, RouteConfig] | Iterable[RouteConfig],
        signals: SignalTracker | SignalsProvider | None = None,
        *,
        registry=None,
        clock=time.monotonic,
    ):
        if isinstance(routes, dict):
            routes = list(routes.values())
        self.routes: dict[str, RouteConfig] = {r.name: r for r in routes}
        self.signals = signals if signals is not None else SignalTracker()
        self.metrics = RouterMetrics.for_registry(registry)
        self.clock = clock

    def has_route(self, name: str) -> bool:
        return name in self.routes

    def _signals(self, deployment: str) -> DeploymentSignals:
        get = getattr(self.signals, "get", None)
        return get(deployment) if get is not None else self.signals(deployment)

    def _tracker(self, method: str, *args, **kwargs) -> None:
        fn = getattr(self.signals, method, None)
        if fn is not None:
            fn(*args, **kwargs)

    # -- decision --------------------------------------------------------------------------------------------

    def decide(
        self,
        route_name: str,
        prompt_tokens: int,
        max_tokens: int | None = None,
        policy: str | None = None,
        slo_ms: SLO | float | None = None,
        quality_floor: float | None = None,
    ) -> RouteDecision:
        """Rank the route's candidates for this request. A given SLO without a policy means policy `slo`.

        Raises UnknownRouteError, RouteRequestError (bad override, quality floor above every candidate),
        RouteContextOverflow (fits no candidate) or NoCandidateAvailable (every fitting candidate is down).
        """
        route = self.routes.get(route_name)
        if route is None:
            raise UnknownRouteError(route_name, list(self.routes))
        if isinstance(prompt_tokens, bool) or not isinstance(prompt_tokens, int) or prompt_tokens < 0:
            raise RouteRequestError(f"prompt_tokens must be an integer >= 0, got {prompt_tokens!r}", "messages")
        if max_tokens is not None and (isinstance(max_tokens, bool) or not isinstance(max_tokens, int) or max_tokens < 1):
            raise RouteRequestError(f"max_tokens must be an integer >= 1, got {max_tokens!r}", "max_tokens")
        slo = SLO(e2e_ms=float(slo_ms)) if isinstance(slo_ms, (int, float)) else slo_ms
        if policy is None:
            policy = "slo" if slo is not None else route.policy
        if policy not in POLICIES:
            raise RouteRequestError(f"unknown route policy {policy!r}; use one of {', '.join(POLICIES)}", "route_policy")
        slo = slo or route.slo
        if policy == "slo" and slo is None:
            raise RouteRequestError(
                f"policy 'slo' needs an SLO: route {route_name!r} has none, send X-Latency-SLO-Ms", "X-Latency-SLO-Ms"
            )
        floors = [f for f in (route.quality_floor, quality_floor) if f is not None]
        floor = max(floors) if floors else None  # a request may raise the route's floor, never lower it

        eligible: list[Prediction] = []
        excluded: list[tuple[str, str]] = []
        by_model = {c.model: c for c in route.candidates}
        any_quality = any_fits = False
        retry_after: list[float] = []
        for cand in route.candidates:
            sig = self._signals(cand.deployment_name)
            pred = predict(cand, sig, prompt_tokens, max_tokens)
            if floor is not None and cand.quality < floor:
                excluded.append((cand.model, f"quality {cand.quality} < floor {floor}"))
                continue
            any_quality = True
            if not pred.fits_context:
                need = prompt_tokens + (max_tokens or 1)
                excluded.append((cand.model, f"context {need} > {cand.context_length} tokens"))
                continue
            any_fits = True
            if not pred.available:
                excluded.append((cand.model, f"down: {pred.down_reason or 'unavailable'}"))
                retry_after.append(sig.down_for_s)
                continue
            eligible.append(pred)

        if not eligible:
            if not any_quality:
                best = max(c.quality for c in route.candidates)
                raise RouteRequestError(
                    f"no candidate of route {route_name!r} has quality >= {floor} (best is {best})", "route_quality_floor"
                )
            if not any_fits:
                raise RouteContextOverflow(
                    f"{prompt_tokens} prompt tokens + max_tokens {max_tokens} fit no candidate of route "
                    f"{route_name!r} (largest context {max(c.context_length for c in route.candidates)})"
                )
            reasons = [f"{m}: {r}" for m, r in excluded]
            self.metrics.unavailable.labels(route_name).inc()
            log.warning(json.dumps({"event": "route_unavailable", "route": route_name, "excluded": reasons}))
            raise NoCandidateAvailable(route_name, reasons, retry_after=max(0.1, min(retry_after or [1.0])))

        ranked = policies.order(policy, eligible, slo=slo, weights=route.weights)
        choices = [Choice(by_model[p.model], p, why) for p, why in ranked]
        decision = RouteDecision(
            route=route_name,
            policy=policy,
            choices=choices,
            excluded=excluded,
            prompt_tokens=prompt_tokens,
            max_tokens=max_tokens,
            slo=slo if policy == "slo" else None,
            quality_floor=floor,
            slo_met=policies.meets_slo(choices[0].prediction, slo) if policy == "slo" else None,
        )
        self.metrics.decisions.labels(route_name, policy, decision.primary.model).inc()
        if decision.slo_met is False:
            self.metrics.slo_unmet.labels(route_name).inc()
        if log.isEnabledFor(logging.INFO):
            log.info(json.dumps({"event": "route_decision", **decision.to_log()}))
        return decision

    # -- fallback --------------------------------------------------------------------------------------------

    def _failed(self, decision: RouteDecision, choice: Choice, err: CandidateError, attempts: list[Attempt]) -> None:
        dep = choice.candidate.deployment_name
        if isinstance(err, CandidateOverloaded):
            self._tracker("mark_overloaded", dep, err.retry_after)
        elif not isinstance(err, CandidateContextOverflow):  # an overflow says nothing about the deployment
            self._tracker("mark_failed", dep, err.reason)
        attempts.append(Attempt(choice.model, err.reason, err.message))
        self.metrics.fallbacks.labels(decision.route, choice.model, err.reason).inc()
        log.warning(
            json.dumps({"event": "route_fallback", "route": decision.route, "model": choice.model,
                        "reason": err.reason, "message": err.message[:300]})
        )

    def _exhausted(self, decision: RouteDecision, attempts: list[Attempt]) -> Exception:
        if attempts and all(a.reason == "context_overflow" for a in attempts):
            return RouteContextOverflow(
                f"the request fits no candidate of route {decision.route!r}: "
                + "; ".join(f"{a.model}: {a.message}" for a in attempts)
            )
        self.metrics.unavailable.labels(decision.route).inc()
        retry = [getattr(self._signals(c.candidate.deployment_name), "down_for_s", 0.0) for c in decision.choices]
        return NoCandidateAvailable(
            decision.route,
            [f"{a.model}: {a.reason}: {a.message}" for a in attempts],
            retry_after=max(0.1, min([r for r in retry if r > 0] or [1.0])),
        )

    def _served(self, decision: RouteDecision, choice: Choice) -> None:
        self._tracker("mark_ok", choice.candidate.deployment_name)
        self.metrics.served.labels(decision.route, choice.model).inc()

    async def run_with_fallback(
        self, decision: RouteDecision, call: Callable[[CandidateConfig], Awaitable[Any]]
    ) -> RoutedResult:
        """Call candidates in decision order until one answers; each is tried at most once. A client error
        (one `classify` does not map to a CandidateError) is re-raised at once: another model would fail too."""
        attempts: list[Attempt] = []
        for choice in decision.choices:
            dep = choice.candidate.deployment_name
            self._tracker("begin", dep)
            started = self.clock()
            try:
                result = await call(choice.candidate)
            except Exception as exc:
                err = classify(exc)
                if err is None:
                    raise
                self._failed(decision, choice, err, attempts)
                continue
            finally:
                self._tracker("end", dep)
            self._served(decision, choice)
            return RoutedResult(result, choice, decision, attempts, self.clock() - started)
        raise self._exhausted(decision, attempts)

    async def open_stream(
        self,
        decision: RouteDecision,
        start: Callable[[CandidateConfig], AsyncIterator[Any] | Awaitable[AsyncIterator[Any]]],
    ) -> RoutedStream:
        """Open a stream on the first candidate that yields a first chunk; fall back only before that chunk.

        `start(candidate)` returns an async iterator of chunks (or an awaitable of one). The returned stream
        already holds the first chunk, so the gateway can set X-Routed-Model before sending any byte.
        """
        attempts: list[Attempt] = []
        for choice in decision.choices:
            dep = choice.candidate.deployment_name
            self._tracker("begin", dep)
            started = self.clock()
            it = None
            try:
                it = start(choice.candidate)
                if inspect.isawaitable(it):
                    it = await it
                it = aiter(it)
                try:
                    first = await anext(it)
                    empty = False
                except StopAsyncIteration:
                    first, empty = None, True
            except Exception as exc:
                self._tracker("end", dep)
                await _aclose(it)
                err = classify(exc)
                if err is None:
                    raise
                self._failed(decision, choice, err, attempts)
                continue
            except BaseException:
                self._tracker("end", dep)
                await _aclose(it)
                raise
            return RoutedStream(self, decision, choice, attempts, it, first, empty, self.clock() - started)
        raise self._exhausted(decision, attempts)

    def observe(
        self, answered: RoutedResult | RoutedStream | Choice | str, *, ttft_s: float, prompt_tokens: int,
        completion_tokens: int, e2e_s: float | None = None, queue_s: float = 0.0,
    ) -> None:
        """Feed a finished request's timings to the signals of the deployment that answered it (a routed
        result or stream, a Choice, or a model name; adapters count for their base model)."""
        choice = getattr(answered, "choice", answered)
        if isinstance(choice, Choice):
            dep = choice.candidate.deployment_name
        else:
            dep = str(choice).partition(":")[0]
        self._tracker("observe_request", dep, ttft_s=ttft_s, prompt_tokens=prompt_tokens,
                      completion_tokens=completion_tokens, e2e_s=e2e_s, queue_s=queue_s)


async def _aclose(it) -> None:
    close = getattr(it, "aclose", None)
    if close is not None:
        try:
            await close()
        except Exception:
            pass


class RoutedStream:
    """An open stream on the chosen candidate: iterate it once. A failure after the first chunk raises
    StreamFailedAfterFirstChunk and is never retried elsewhere (the client already has part of an answer)."""

    def __init__(self, router, decision, choice, attempts, it, first, empty, ttft_s):
        self.router, self.decision, self.choice, self.attempts = router, decision, choice, attempts
        self._it, self._first, self._empty = it, first, empty
        self.ttft_s = ttft_s  # seconds from opening this candidate's stream to its first chunk
        self.chunks = 0
        self._closed = False

    @property
    def model(self) -> str:
        return self.choice.model

    def __aiter__(self):
        return self._iterate()

    async def _iterate(self):
        try:
            if self._empty:
                self._finish(ok=True)
                return
            self.chunks = 1
            yield self._first
            while True:
                try:
                    chunk = await anext(self._it)
                except StopAsyncIteration:
                    break
                except Exception as exc:
                    err = classify(exc)
                    if err is not None and not isinstance(err, CandidateContextOverflow):
                        self.router._tracker("mark_failed", self.choice.candidate.deployment_name, err.reason)
                    self._finish(ok=False)
                    raise StreamFailedAfterFirstChunk(
                        f"{self.model} failed after {self.chunks} chunk(s): {exc}"
                    ) from exc
                self.chunks += 1
                yield chunk
            self._finish(ok=True)
        finally:
            if not self._closed:  # the consumer stopped early (client went away)
                self._finish(ok=None)
                await _aclose(self._it)

    def _finish(self, ok: bool | None) -> None:
        if self._closed:
            return
        self._closed = True
        self.router._tracker("end", self.choice.candidate.deployment_name)
        if ok:
            self.router._served(self.decision, self.choice)

    async def aclose(self) -> None:
        if not self._closed:
            self._finish(ok=None)
            await _aclose(self._it)
