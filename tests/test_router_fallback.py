"""Router.run_with_fallback / open_stream with in-process candidates that fail in typed ways."""

import asyncio

import pytest
from prometheus_client import CollectorRegistry

from serving.engine.errors import ContextLengthExceededError, EngineOverloadedError, InvalidRequestError
from serving.router import (
    CandidateContextOverflow,
    CandidateOverloaded,
    CandidateServerError,
    NoCandidateAvailable,
    RouteContextOverflow,
    Router,
    SignalTracker,
    StreamFailedAfterFirstChunk,
    parse_routes,
    response_headers,
)

ROUTES = {
    "auto": {
        "policy": "cheapest",
        "candidates": [
            {"model": m, "input_per_1m": p, "output_per_1m": 4 * p, "quality": 0.5, "context_length": 8192,
             "expect": {"tpot_ms": 10}}
            for m, p in (("a", 0.1), ("b", 0.2), ("c", 0.3))
        ],
    }
}


def setup(clock=None):
    registry = CollectorRegistry()
    now = [0.0]
    tracker = SignalTracker(error_cooldown_s=3.0, clock=clock or (lambda: now[0]))
    return Router(parse_routes(ROUTES), tracker, registry=registry), tracker, registry, now


def run(coro):
    return asyncio.run(coro)


def test_falls_back_in_order_once_per_candidate_on_overload_and_server_error():
    router, tracker, registry, now = setup()
    calls = []

    async def call(cand):
        calls.append(cand.model)
        if cand.model == "a":
            raise CandidateOverloaded("busy", retry_after=2.0)
        if cand.model == "b":
            raise CandidateServerError("HTTP 500: boom")
        return {"answer": cand.model}

    decision = router.decide("auto", 100, 20)
    res = run(router.run_with_fallback(decision, call))
    assert res.result == {"answer": "c"} and res.model == "c"
    assert calls == ["a", "b", "c"]
    assert [(a.model, a.reason) for a in res.attempts] == [("a", "overloaded"), ("b", "server_error")]
    hdr = response_headers(res)
    assert hdr["X-Routed-Model"] == "c"
    assert "policy=cheapest" in hdr["X-Route-Decision"] and "fallbacks=2" in hdr["X-Route-Decision"]
    assert "predicted_latency_ms=" in hdr["X-Route-Decision"] and "predicted_cost_usd=" in hdr["X-Route-Decision"]
    v = registry.get_sample_value
    assert v("loraplex_route_fallbacks_total", {"route": "auto", "model": "a", "reason": "overloaded"}) == 1
    assert v("loraplex_route_fallbacks_total", {"route": "auto", "model": "b", "reason": "server_error"}) == 1
    assert v("loraplex_route_served_total", {"route": "auto", "model": "c"}) == 1
    # the failures put a and b in cooldown: the next decision goes straight to c, and they return later
    assert [c.model for c in router.decide("auto", 100, 20).choices] == ["c"]
    now[0] = 2.5
    assert [c.model for c in router.decide("auto", 100, 20).choices] == ["a", "c"]
    now[0] = 3.5
    assert [c.model for c in router.decide("auto", 100, 20).choices] == ["a", "b", "c"]
    assert all(tracker.get(m).inflight == 0 for m in "abc")


def test_engine_errors_are_understood_and_client_errors_are_not_retried():
    router, *_ = setup()
    calls = []

    async def call(cand):
        calls.append(cand.model)
        if cand.model == "a":
            raise EngineOverloadedError("queue full", retry_after=1.0)
        if cand.model == "b":
            raise ContextLengthExceededError("too long for b")
        return "ok"

    assert run(router.run_with_fallback(router.decide("auto", 10, 10), call)).model == "c"
    assert calls == ["a", "b", "c"]

    calls.clear()

    async def bad_request(cand):
        calls.append(cand.model)
        raise InvalidRequestError("temperature must be >= 0", param="temperature")

    decision = router.decide("auto", 10, 10)
    assert [c.model for c in decision.choices] == ["b", "c"]  # a is cooling down after its 429
    with pytest.raises(InvalidRequestError):
        run(router.run_with_fallback(decision, bad_request))
    assert calls == ["b"]  # the same request would fail on every model


def test_all_candidates_failing_is_a_503_and_all_overflowing_is_a_400():
    router, tracker, registry, _ = setup()
    calls = []

    async def down(cand):
        calls.append(cand.model)
        raise CandidateServerError(f"{cand.model} is down")

    with pytest.raises(NoCandidateAvailable) as info:
        run(router.run_with_fallback(router.decide("auto", 10, 10), down))
    assert calls == ["a", "b", "c"]  # each exactly once
    assert info.value.status == 503 and info.value.body()["error"]["code"] == "no_candidate_available"
    assert "a: server_error" in info.value.message and "c: server_error" in info.value.message
    assert registry.get_sample_value("loraplex_route_unavailable_total", {"route": "auto"}) == 1
    with pytest.raises(NoCandidateAvailable):  # now all are in cooldown: refused before any call
        router.decide("auto", 10, 10)

    router, *_ = setup()

    async def overflow(cand):
        raise CandidateContextOverflow(f"prompt too long for {cand.model}")

    with pytest.raises(RouteContextOverflow) as info:
        run(router.run_with_fallback(router.decide("auto", 10, 10), overflow))
    assert info.value.status == 400
    assert [c.model for c in router.decide("auto", 10, 10).choices] == ["a", "b", "c"]  # no cooldown


async def _chunks(model, n, fail_at=None, exc=None):
    for i in range(n):
        if i == fail_at:
            raise exc
        await asyncio.sleep(0)
        yield f"{model}-{i}"


def test_stream_falls_back_only_before_the_first_chunk():
    router, tracker, registry, _ = setup()
    opened = []

    def start(cand):
        opened.append(cand.model)
        if cand.model == "a":  # fails before sending anything
            return _chunks("a", 3, fail_at=0, exc=CandidateOverloaded("busy"))
        return _chunks(cand.model, 3)

    async def consume():
        stream = await router.open_stream(router.decide("auto", 10, 10), start)
        assert stream.model == "b" and response_headers(stream)["X-Routed-Model"] == "b"
        return [c async for c in stream]

    assert run(consume()) == ["b-0", "b-1", "b-2"]
    assert opened == ["a", "b"]
    assert registry.get_sample_value("loraplex_route_served_total", {"route": "auto", "model": "b"}) == 1


def test_stream_failure_after_first_chunk_is_never_retried_elsewhere():
    router, tracker, registry, now = setup()
    opened = []

    def start(cand):
        opened.append(cand.model)
        return _chunks(cand.model, 5, fail_at=2, exc=CandidateServerError("connection dropped"))

    async def consume():
        stream = await router.open_stream(router.decide("auto", 10, 10), start)
        got = []
        with pytest.raises(StreamFailedAfterFirstChunk, match="a failed after 2 chunk"):
            async for c in stream:
                got.append(c)
        return got

    assert run(consume()) == ["a-0", "a-1"]
    assert opened == ["a"]  # no second model started: the client already had part of an answer
    assert registry.get_sample_value("loraplex_route_fallbacks_total", {"route": "auto", "model": "a",
                                                                       "reason": "server_error"}) is None
    assert tracker.get("a").inflight == 0 and not tracker.get("a").available  # but a is in cooldown


def test_stream_closed_early_by_the_client_releases_the_deployment():
    router, tracker, *_ = setup()
    closed = []

    async def gen(cand):
        try:
            for i in range(100):
                yield i
        finally:
            closed.append(cand.model)

    async def consume():
        stream = await router.open_stream(router.decide("auto", 10, 10), gen)
        assert tracker.get("a").inflight == 1
        async for c in stream:
            if c == 3:
                break
        await stream.aclose()

    run(consume())
    assert closed == ["a"] and tracker.get("a").inflight == 0


def test_awaitable_stream_openers_and_empty_streams():
    router, *_ = setup()

    async def opener(cand):
        if cand.model == "a":
            raise CandidateServerError("cannot connect")
        return _chunks(cand.model, 0)

    async def consume():
        stream = await router.open_stream(router.decide("auto", 10, 10), opener)
        return stream.model, [c async for c in stream]

    assert run(consume()) == ("b", [])


def test_api_shaped_and_connection_errors_are_classified():
    from serving.api.errors import APIError
    from serving.router import classify

    assert isinstance(classify(APIError(429, "busy", retry_after=3)), CandidateOverloaded)
    assert classify(APIError(429, "busy", retry_after=3)).retry_after == 3
    assert isinstance(classify(APIError(400, "long", code="context_length_exceeded")), CandidateContextOverflow)
    assert isinstance(classify(APIError(503, "loading", code="model_not_ready")), CandidateServerError)
    assert classify(APIError(400, "bad temperature", param="temperature")) is None
    assert isinstance(classify(ConnectionResetError("gone")), CandidateServerError)
    assert classify(ValueError("a bug")) is None
