"""The router over real HTTP: simulated deployments (uvicorn on 127.0.0.1) behind a minimal gateway that
plugs the router in the way serving/api does, called with the official openai client and httpx."""

import json
import time

import httpx
import openai
import pytest
from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse
from prometheus_client import CollectorRegistry

from serving.router import (
    RouterError,
    Router,
    SignalTracker,
    StreamFailedAfterFirstChunk,
    parse_overrides,
    parse_routes,
    pop_route_fields,
    response_headers,
)
from serving.router.http import HttpDeployments
from serving.router.sim import AppServer, SimServer, SimSpec

SPECS = [
    SimSpec("small", ttft_base_s=0.005, prefill_tok_s=20_000, tpot_s=0.004, slots=4),
    SimSpec("mid", ttft_base_s=0.01, prefill_tok_s=10_000, tpot_s=0.008, slots=4),
    SimSpec("big", ttft_base_s=0.02, prefill_tok_s=5_000, tpot_s=0.016, slots=4),
]
PRICES = {"small": (0.1, 0.4, 0.5), "mid": (0.3, 1.2, 0.7), "big": (1.0, 4.0, 0.9)}


def make_gateway(router: Router, deployments: HttpDeployments) -> FastAPI:
    app = FastAPI()

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        try:
            overrides = parse_overrides(request.headers, body)
            pop_route_fields(body)
            prompt_tokens = sum(len(str(m.get("content", "")).split()) for m in body.get("messages", []))
            decision = router.decide(body["model"], prompt_tokens, body.get("max_tokens"), **overrides.as_kwargs())
            if not body.get("stream"):
                res = await router.run_with_fallback(decision, lambda cand: deployments.chat(cand, body))
                return JSONResponse(res.result, headers=response_headers(res))
            t0 = time.monotonic()
            stream = await router.open_stream(decision, lambda cand: deployments.stream(cand, body))

            async def sse():
                try:
                    async for chunk in stream:
                        yield f"data: {json.dumps(chunk)}\n\n"
                except StreamFailedAfterFirstChunk as exc:
                    yield f"data: {json.dumps(exc.body())}\n\n"
                    return
                router.observe(stream, ttft_s=stream.ttft_s, prompt_tokens=prompt_tokens,
                               completion_tokens=stream.chunks, e2e_s=time.monotonic() - t0)
                yield "data: [DONE]\n\n"

            return StreamingResponse(sse(), media_type="text/event-stream", headers=response_headers(stream))
        except RouterError as exc:
            return exc.response()  # serving.errors.ServiceError: the body, status and Retry-After

    return app


@pytest.fixture(scope="module")
def servers():
    opened = [SimServer(spec).__enter__() for spec in SPECS]
    yield {s.sim.spec.name: s for s in opened}
    for s in opened:
        s.__exit__(None, None, None)


class Gateway:
    def __init__(self, servers):
        routes = parse_routes({"auto": {"policy": "cheapest", "candidates": [
            {"model": n, "input_per_1m": i, "output_per_1m": o, "quality": q,
             "context_length": servers[n].sim.spec.context_length}
            for n, (i, o, q) in PRICES.items()]}})
        self.registry = CollectorRegistry()
        self.tracker = SignalTracker()
        self.router = Router(routes, self.tracker, registry=self.registry)
        self.client = httpx.AsyncClient(timeout=30)
        deployments = HttpDeployments(self.client, lambda cand: servers[cand.model].url)
        self.server = AppServer(make_gateway(self.router, deployments), "gateway").__enter__()
        self.url = self.server.url
        self.openai = openai.OpenAI(base_url=self.url, api_key="x", max_retries=0)


@pytest.fixture
def gw(servers):
    for s in servers.values():
        s.sim.fail, s.sim.requests = None, 0
        httpx.post(s.url.removesuffix("/v1") + "/control", json={"fail": None})
    g = Gateway(servers)
    yield g
    g.server.__exit__(None, None, None)


def control(servers, name, fail, drop_after=1):
    r = httpx.post(servers[name].url.removesuffix("/v1") + "/control", json={"fail": fail, "drop_after": drop_after})
    r.raise_for_status()


def ask(gw, headers=None, **kw):
    return gw.openai.chat.completions.with_raw_response.create(
        model="auto", messages=[{"role": "user", "content": "hello there " * 20}], max_tokens=8,
        extra_headers=headers or {}, **kw)


def test_policies_choose_and_headers_tell(gw, servers):
    raw = ask(gw)
    assert raw.headers["X-Routed-Model"] == "small"
    assert "policy=cheapest" in raw.headers["X-Route-Decision"]
    completion = raw.parse()
    assert completion.model == "small" and completion.usage.completion_tokens == 8
    raw = ask(gw, {"X-Route-Min-Quality": "0.8"})
    assert raw.headers["X-Routed-Model"] == "big"
    raw = ask(gw, {"X-Route-Policy": "balanced", "X-Latency-SLO-Ms": "5000"})  # an explicit policy wins
    assert "policy=balanced" in raw.headers["X-Route-Decision"]
    raw = ask(gw, {"X-Latency-SLO-Ms": "ttft=2000,e2e=5000"})
    assert raw.headers["X-Routed-Model"] == "small" and "slo=met" in raw.headers["X-Route-Decision"]


def test_fallback_over_http_on_429_and_500(gw, servers):
    control(servers, "small", 429)
    control(servers, "mid", 500)
    raw = ask(gw)
    assert raw.headers["X-Routed-Model"] == "big" and "fallbacks=2" in raw.headers["X-Route-Decision"]
    assert [servers[n].sim.requests for n in ("small", "mid", "big")] == [1, 1, 1]
    v = gw.registry.get_sample_value
    assert v("loraplex_route_fallbacks_total", {"route": "auto", "model": "small", "reason": "overloaded"}) == 1
    assert v("loraplex_route_fallbacks_total", {"route": "auto", "model": "mid", "reason": "server_error"}) == 1
    # both are cooling down now: the next request goes straight to big
    ask(gw)
    assert [servers[n].sim.requests for n in ("small", "mid", "big")] == [1, 1, 2]


def test_every_candidate_down_is_a_clear_503(gw, servers):
    for name in servers:
        control(servers, name, 500)
    with pytest.raises(openai.InternalServerError) as info:
        ask(gw)
    assert info.value.status_code == 503
    assert info.value.body["code"] == "no_candidate_available"
    assert "route 'auto' has no available candidate" in info.value.body["message"]
    assert gw.registry.get_sample_value("loraplex_route_unavailable_total", {"route": "auto"}) == 1


def test_bad_override_is_a_400_naming_the_header(gw):
    with pytest.raises(openai.BadRequestError) as info:
        ask(gw, {"X-Latency-SLO-Ms": "soon"})
    assert info.value.body["param"] == "X-Latency-SLO-Ms"
    with pytest.raises(openai.BadRequestError) as info:
        ask(gw, extra_body={"route_policy": "random"})
    assert info.value.body["param"] == "route_policy"


def _stream(gw, headers=None):
    body = {"model": "auto", "messages": [{"role": "user", "content": "hi " * 50}], "max_tokens": 6, "stream": True}
    with httpx.stream("POST", gw.url + "/chat/completions", json=body, headers=headers or {}, timeout=30) as r:
        events = [json.loads(line[5:]) for line in r.iter_lines() if line.startswith("data:") and "[DONE]" not in line]
        return r.headers, events


def test_stream_falls_back_before_the_first_chunk(gw, servers):
    control(servers, "small", 429)
    headers, events = _stream(gw)
    assert headers["x-routed-model"] == "mid" and len(events) == 6
    assert all(e["model"] == "mid" for e in events)


def test_stream_broken_after_first_chunk_is_not_sent_twice(gw, servers):
    control(servers, "small", "drop", drop_after=2)
    headers, events = _stream(gw)
    assert headers["x-routed-model"] == "small"
    assert [e.get("model") for e in events[:2]] == ["small", "small"]
    assert events[-1]["error"]["code"] == "stream_interrupted" and len(events) == 3
    assert servers["mid"].sim.requests == 0 and servers["big"].sim.requests == 0


def test_streamed_requests_teach_the_tracker_the_deployments_speed(gw, servers):
    for _ in range(6):
        _stream(gw, {"X-Route-Policy": "cheapest"})
    s = gw.tracker.get("small")
    spec = servers["small"].sim.spec
    assert s.samples == 6 and s.inflight == 0
    assert spec.tpot_s * 0.9 <= s.tpot_s <= spec.tpot_s + 0.05  # sleeps set the floor; HTTP adds a little
    assert s.ttft_s >= spec.ttft_base_s + 50 / spec.prefill_tok_s
