"""Routing in the real gateway: `model: "auto"` on a `loraplex serve` process with two deployments of the
default model at different prices, each with one running slot and a one-request queue, so a full queue (429)
and a fallback can be made on purpose. Driven by the openai client and raw httpx for the headers."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from tests.serve_helpers import MODEL, Server

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

ONE_SLOT = """    source: {model}
    max_model_len: 4096
    kv_cache_memory: 256MiB
    max_num_seqs: 1
    max_waiting: 1
    enable_prefix_caching: false
    ray_actor_options: {{num_cpus: 0}}"""
CONFIG = f"""
models:
  - name: cheap
{ONE_SLOT.format(model=MODEL)}
    price: {{input_per_1m: 0.1, output_per_1m: 0.2}}
  - name: pricey
{ONE_SLOT.format(model=MODEL)}
    price: {{input_per_1m: 1.0, output_per_1m: 2.0}}
embeddings: {{enabled: false}}
rag: {{enabled: false}}
fine_tuning: {{enabled: false}}
routes:
  auto:
    policy: cheapest
    candidates:
      - {{model: cheap, quality: 0.4}}
      - {{model: pricey, quality: 0.8}}
"""
HELLO = [{"role": "user", "content": "Say hello."}]
# long enough to outlast the whole scenario on a fast CPU (600 tokens ended before it did: bf16 at ~150 tok/s)
LONG = {"messages": [{"role": "user", "content": "Count from one to one thousand."}], "max_tokens": 4000,
        "ignore_eos": True, "stream": True}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("router"), CONFIG)
    try:
        yield srv.start()
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base + "/v1", api_key="EMPTY", max_retries=0, timeout=120)


def decision(headers) -> dict:
    return dict(part.split("=", 1) for part in headers["x-route-decision"].split("; "))


def test_routes_are_listed_as_models(client):
    cards = {m.id: m for m in client.models.list().data}
    assert {"cheap", "pricey", "auto"} <= set(cards)
    auto = cards["auto"]
    assert auto.owned_by == "loraplex-router" and auto.candidates == ["cheap", "pricey"]
    assert client.models.retrieve("auto").policy == "cheapest"


def test_auto_picks_by_policy_with_transparency_headers(client):
    raw = client.chat.completions.with_raw_response.create(model="auto", messages=HELLO, max_tokens=3)
    r = raw.parse()
    assert raw.headers["x-routed-model"] == "cheap" and r.model == "cheap"
    d = decision(raw.headers)
    assert (d["route"], d["policy"], d["model"]) == ("auto", "cheapest", "cheap") and "fallbacks" not in d
    assert float(d["predicted_cost_usd"]) > 0 and r.usage.completion_tokens >= 1
    # a request may raise the quality floor: only `pricey` qualifies
    raw = client.chat.completions.with_raw_response.create(
        model="auto", messages=HELLO, max_tokens=3, extra_headers={"X-Route-Min-Quality": "0.6"})
    assert raw.headers["x-routed-model"] == "pricey"
    # the same through body fields, streamed: the headers come before the first byte
    with client.chat.completions.with_streaming_response.create(
            model="auto", messages=HELLO, max_tokens=3, stream=True,
            extra_body={"route_policy": "fastest", "route_min_quality": 0.6}) as resp:
        assert resp.headers["x-routed-model"] == "pricey" and decision(resp.headers)["policy"] == "fastest"
        chunks = [json.loads(line[6:]) for line in resp.iter_lines() if line.startswith("data: {")]
    assert chunks and all(c["model"] == "pricey" for c in chunks)


def test_bad_overrides_are_400_naming_them(client):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="auto", messages=HELLO, max_tokens=2,
                                       extra_headers={"X-Route-Policy": "random"})
    assert e.value.body["param"] == "X-Route-Policy" and "cheapest" in e.value.body["message"]
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="auto", messages=HELLO, max_tokens=2, extra_body={"route_slo_ms": -5})
    assert e.value.body["param"] == "route_slo_ms"
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model="auto", messages=HELLO, max_tokens=2,
                                       extra_headers={"X-Route-Min-Quality": "0.99"})
    assert e.value.body["param"] == "route_quality_floor"
    with pytest.raises(openai.BadRequestError) as e:  # routes are a chat feature
        client.completions.create(model="auto", prompt="Hi", max_tokens=2)
    assert e.value.body["param"] == "model"


async def _running(http: httpx.AsyncClient, model: str, stack: list):
    """A long streamed request that runs on `model` (its first event has arrived); closed at the end."""
    cm = http.stream("POST", "/v1/chat/completions", json={"model": model, **LONG})
    resp = await cm.__aenter__()
    stack.append(cm)
    assert resp.status_code == 200, await resp.aread()
    lines = resp.aiter_lines()
    stack.append(lines)  # held: a collected line iterator would close the response (and abort the request)
    while not (await anext(lines)).startswith("data:"):
        pass
    return resp


async def _engine_shows(http: httpx.AsyncClient, deployment: str, running: int, waiting: int) -> None:
    """Wait until the engine's own stats (the /metrics gauges) show this load."""
    want = {f'loraplex_num_requests_running{{model="{deployment}"}}': running,
            f'loraplex_num_requests_waiting{{model="{deployment}"}}': waiting}
    for _ in range(300):
        text = (await http.get("/metrics")).text
        got = {ln.rsplit(" ", 1)[0]: float(ln.rsplit(" ", 1)[1]) for ln in text.splitlines() if ln.startswith("loraplex_num")}
        if all(got.get(k) == v for k, v in want.items()):
            return
        await asyncio.sleep(0.1)
    raise AssertionError(f"{deployment} never showed {want}: {got}")


async def _queued(http: httpx.AsyncClient, deployment: str, tasks: list) -> None:
    """A long request that waits in `deployment`'s engine queue (no answer starts before it runs). The
    engine's queue count lags a step behind, so a refusal right after the running one started is retried."""
    await _engine_shows(http, deployment, 1, 0)
    for _ in range(20):
        task = asyncio.ensure_future(http.post("/v1/chat/completions", json={"model": deployment, **LONG}))
        done, _ = await asyncio.wait([task], timeout=1.0)
        if not done:  # no answer yet: it waits behind the running one
            tasks.append(task)
            await _engine_shows(http, deployment, 1, 1)
            await asyncio.sleep(1.5)  # the router polls engine stats every second
            return
        assert task.result().status_code == 429, task.result().text
    raise AssertionError(f"could not queue a request on {deployment}")


async def _chat(http, headers=None, model="auto"):
    return await http.post("/v1/chat/completions", headers=headers or {},
                           json={"model": model, "messages": HELLO, "max_tokens": 2})


# a fresh connection per request: a pooled one idle for the proxy's keep-alive timeout can be closed just as it is
# reused ("Server disconnected without sending a response", seen once here under CI load)
FRESH = httpx.Limits(max_keepalive_connections=0)


def test_load_fallback_and_all_down(server):
    async def scenario():
        stack: list = []
        tasks: list = []
        async with httpx.AsyncClient(base_url=server.base, timeout=120, limits=FRESH) as http:
            try:
                # fill `cheap`: one request running, one queued (its limit)
                resp = await _running(http, "auto", stack)
                assert resp.headers["x-routed-model"] == "cheap", resp.headers["x-route-decision"]
                await _queued(http, "cheap", tasks)
                # fastest sees the load on `cheap` and picks the idle one
                r = await _chat(http, {"X-Route-Policy": "fastest"})
                assert r.status_code == 200 and r.headers["x-routed-model"] == "pricey", r.text
                # cheapest tries `cheap` first: its queue is full (429), so it falls back before any token
                r = await _chat(http)
                assert r.status_code == 200, r.text
                assert r.headers["x-routed-model"] == "pricey" and r.json()["model"] == "pricey"
                assert decision(r.headers)["fallbacks"] == "1", r.headers["x-route-decision"]
                # the same request straight to `cheap` is refused: the fallback was real
                r = await _chat(http, model="cheap")
                assert r.status_code == 429 and r.json()["error"]["code"] == "queue_full"
                # fill `pricey` too: every candidate is down -> 503 with Retry-After
                await _running(http, "pricey", stack)
                await _queued(http, "pricey", tasks)
                r = await _chat(http)
                assert r.status_code == 503, r.text
                assert r.json()["error"]["code"] == "no_candidate_available"
                assert int(r.headers["retry-after"]) >= 1
            finally:  # closing the connections aborts the long requests
                for t in tasks:
                    t.cancel()
                await asyncio.gather(*tasks, return_exceptions=True)
                for cm in reversed(stack):
                    await (cm.aclose() if hasattr(cm, "aclose") else cm.__aexit__(None, None, None))
        # once the queues drain, the route answers again
        for _ in range(120):
            async with httpx.AsyncClient(base_url=server.base, timeout=120, limits=FRESH) as http:
                r = await _chat(http)
            if r.status_code == 200:
                return r
            await asyncio.sleep(0.5)
        raise AssertionError(f"the route did not recover: {r.status_code} {r.text}")

    r = asyncio.run(scenario())
    assert r.headers["x-routed-model"] in ("cheap", "pricey")
