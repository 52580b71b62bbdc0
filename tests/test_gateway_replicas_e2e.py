"""Two gateway replicas on real Ray Serve (the proxy spreads requests over them), two model replicas.

Keys and spend are one state for both: a key made through one is served by the other, one budget holds across
both under concurrent requests, and a revocation through either refuses the key on both from the next request.
A SIGKILL of one gateway replica's process under 24 concurrent requests (the official openai client, which retries
a connection lost before the response) loses none: every answer equals the no-fault run's, each request is charged
once, the killed replica's budget reservations stop holding the budget once unrenewed, and Serve restarts the
replica, which serves again. While it restarts, 24 streams through the other gateway survive a model replica's
SIGKILL mid-generation with the no-fault text.
"""

from __future__ import annotations

import json
import os
import random
import signal
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import openai
import pytest

from tests.serve_helpers import MODEL, Server, small_config
from tests.test_replicas_e2e import audit_entries, replica_pids, run_streams, wait_for_replicas

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

PRICE_IN, PRICE_OUT = 100.0, 300.0  # USD per 1M tokens: every request's cost is visible
CONFIG = small_config({"num_replicas": 2, "dtype": "float32",
                       "price": {"input_per_1m": PRICE_IN, "output_per_1m": PRICE_OUT}},
                      server={"num_replicas": 2}, governance={"enabled": True, "reservation_ttl_s": 8})
TOPICS = ["rivers", "bread", "owls", "tides", "glass", "maps", "bees", "clocks", "salt", "kites", "moss", "bells",
          "ink", "wool", "ferns", "lamps", "caves", "rope", "figs", "snow", "tea", "coins", "wheels", "sails"]


def gateway_pids(home: Path) -> list[int]:
    return replica_pids(home, "gateway")


def wait_for_gateways(server: Server, n: int = 2, timeout: float = 180) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if len(gateway_pids(server.home)) == n and httpx.get(server.base + "/ready", timeout=10).status_code == 200:
            return
        time.sleep(0.5)
    raise AssertionError(f"{n} gateway replicas not running after {timeout}s: {server.tail()}")


def client(server, key, retries=0) -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base + "/v1", api_key=key, max_retries=retries, timeout=300)


def ask(c: openai.OpenAI, topic: str, max_tokens: int = 24) -> str:
    r = c.chat.completions.create(model=MODEL, temperature=0, max_tokens=max_tokens,
                                  messages=[{"role": "user", "content": f"Write two sentences about {topic}."}])
    return r.choices[0].message.content


def requests_of(server, key_id) -> list[dict]:
    return [a for a in audit_entries(server.home) if a.get("event") == "request" and a.get("key_id") == key_id
            and a.get("route") == "/v1/chat/completions"]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("gateways"), CONFIG).start()
    try:
        wait_for_gateways(s)
        out = s.cli("keys", "create", "--name", "root", "--role", "admin", "--json").stdout
        s.admin_key = json.loads(out.strip().splitlines()[-1])["key"]
        yield s
    finally:
        s.stop()


def make_key(server, **spec) -> tuple[str, str]:
    r = httpx.post(server.base + "/v1/admin/keys", json=spec, timeout=60,
                   headers={"Authorization": f"Bearer {server.admin_key}"})
    assert r.status_code == 201, r.text
    return r.json()["key"], r.json()["id"]


def test_one_budget_and_one_revocation_across_gateway_replicas(server):
    # a worst case of 40 prompt + 24 completion tokens is ~$0.011; $0.03 covers two or three such requests
    key, kid = make_key(server, name="spender", budget_usd=0.03, budget_period="day")
    c = client(server, key)
    with ThreadPoolExecutor(16) as pool:
        outcomes = list(pool.map(lambda t: _try(c, t), TOPICS[:16]))
    served = [o for o in outcomes if o == "ok"]
    refused = [o for o in outcomes if o != "ok"]
    assert served and refused and set(refused) == {"insufficient_quota"}, outcomes
    rows = requests_of(server, kid)
    assert {r["gateway"] for r in rows} and len({r["gateway"] for r in rows}) == 2, rows  # both gateways took some
    usage = httpx.get(server.base + "/v1/usage", params={"group_by": "key_id", "key_id": kid}, timeout=60,
                      headers={"Authorization": f"Bearer {server.admin_key}"}).json()
    assert usage["data"][0]["requests"] == len(served) and usage["total_cost_usd"] <= 0.03 + 1e-12
    assert abs(usage["total_cost_usd"] - sum(r["cost_usd"] for r in rows if r["status"] == 200)) < 1e-9

    other, oid = make_key(server, name="revokee")
    c = client(server, other)
    for t in TOPICS[:4]:
        assert ask(c, t, max_tokens=2) is not None
    assert httpx.delete(f"{server.base}/v1/admin/keys/{oid}", timeout=60,
                        headers={"Authorization": f"Bearer {server.admin_key}"}).status_code == 200
    for t in TOPICS[:16]:  # spread over both gateways by the proxy (16, so both are all but sure to get some)
        with pytest.raises(openai.AuthenticationError) as e:
            ask(c, t, max_tokens=2)
        assert e.value.code == "key_revoked"
    assert len({a.get("gateway") for a in audit_entries(server.home) if a.get("key_id") == oid
                and a.get("error") == "key_revoked"}) == 2


def _try(c, topic) -> str:
    try:
        ask(c, topic)
        return "ok"
    except openai.RateLimitError as e:
        return e.code


def test_killing_a_gateway_replica_loses_no_request(server):
    wait_for_gateways(server)
    key, kid = make_key(server, name="chaos", budget_usd=100)
    retrying = client(server, key, retries=3)
    with ThreadPoolExecutor(24) as pool:
        baseline = list(pool.map(lambda t: ask(retrying, t), TOPICS))
    charged_before = len([r for r in requests_of(server, kid) if r["status"] == 200])
    assert charged_before == len(TOPICS)

    killed: list[int] = []
    started = threading.Event()

    def one(topic):
        started.set()
        return ask(retrying, topic)

    with ThreadPoolExecutor(24) as pool:
        futures = [pool.submit(one, t) for t in TOPICS]
        started.wait(30)
        time.sleep(random.uniform(0.3, 1.5))  # mid-flight: some requests are generating on each gateway
        pid = random.choice(gateway_pids(server.home))
        os.kill(pid, signal.SIGKILL)
        killed.append(pid)
        answers = [f.result() for f in futures]
    assert answers == baseline
    served = [r for r in requests_of(server, kid) if r["status"] == 200][charged_before:]
    assert len(served) == len(TOPICS)  # each request charged once: a cut attempt wrote no ledger row
    usage = httpx.get(server.base + "/v1/usage", params={"group_by": "key_id", "key_id": kid}, timeout=60,
                      headers={"Authorization": f"Bearer {server.admin_key}"}).json()
    assert usage["data"][0]["requests"] == 2 * len(TOPICS)
    deadline = time.monotonic() + 60  # the killed gateway's reservations stop counting once unrenewed (8 s)
    while True:
        keys = httpx.get(server.base + "/v1/admin/keys", timeout=60,
                         headers={"Authorization": f"Bearer {server.admin_key}"}).json()["data"]
        status = next(k["budget_status"] for k in keys if k["id"] == kid)
        if status["reserved_usd"] == 0:
            break
        assert time.monotonic() < deadline, status
        time.sleep(1)
    assert status["spent_usd"] == pytest.approx(usage["total_cost_usd"])

    seen = {r["gateway"] for r in requests_of(server, kid)}
    wait_for_gateways(server)  # Serve replaced the killed replica: a new process, which serves once it is up
    assert killed[0] not in gateway_pids(server.home)
    deadline = time.monotonic() + 120
    while not {r["gateway"] for r in requests_of(server, kid)} - seen:
        assert time.monotonic() < deadline, "the restarted gateway replica never served"
        with ThreadPoolExecutor(8) as pool:
            assert list(pool.map(lambda t: ask(retrying, t), TOPICS[:8])) == baseline[:8]
        time.sleep(1)


def test_a_model_replica_killed_while_a_gateway_replica_restarts_loses_no_stream(server):
    """A gateway replica is killed; while Serve restarts it, 24 streams run through the other one and a model
    replica is killed mid-generation: every stream fails over and ends with the no-fault text."""
    wait_for_gateways(server)
    wait_for_replicas(server, 2)
    key, _ = make_key(server, name="streams")
    auth = {"Authorization": f"Bearer {key}"}
    baseline, _ = run_streams(server, headers=auth)
    assert all(r["finish_reason"] and not r["errors"] for r in baseline)
    os.kill(random.choice(gateway_pids(server.home)), signal.SIGKILL)
    time.sleep(1)  # Serve notices the dead gateway replica and starts another (it takes seconds to serve)
    results, killed = run_streams(server, kill_when=lambda n: n >= 24 * 8, headers=auth)
    assert killed, "the model replica was not killed"
    for got, want in zip(results, baseline):
        assert not got["errors"], got["errors"]
        assert got["text"] == want["text"] and got["finish_reason"] == want["finish_reason"]
