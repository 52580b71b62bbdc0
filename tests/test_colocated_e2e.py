"""`colocate: true` on real Ray Serve: the default model's engine runs inside the gateway replica.

No model deployment exists (no `llm-` replica process); the official `openai` client gets the same greedy text
streamed and whole; an adapter loaded through the admin API serves and unloads; a client that leaves mid-stream
frees its engine slot (the running-requests gauge goes back to 0).
"""

from __future__ import annotations

import time

import httpx
import openai
import pytest

from tests.conftest import make_lora_adapter
from tests.serve_helpers import MODEL, Server, small_config
from tests.test_replicas_e2e import replica_pids

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    s = Server(tmp_path_factory.mktemp("colocated"), small_config({"colocate": True, "dtype": "float32"})).start()
    try:
        yield s
    finally:
        s.stop()


def _running(server: Server) -> float:
    for line in httpx.get(server.base + "/metrics", timeout=30).text.splitlines():
        if line.startswith("loraplex_num_requests_running") and f'model="{MODEL}"' in line:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("no running-requests gauge for the model in /metrics")


def test_the_model_runs_in_the_gateway_replica_and_answers_the_openai_client(server):
    assert replica_pids(server.home, "llm-") == []  # no model deployment: no gateway -> model hop
    assert len(replica_pids(server.home, "gateway")) == 1
    client = openai.OpenAI(base_url=server.base + "/v1", api_key="none")
    messages = [{"role": "user", "content": "Name three colours."}]
    whole = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=16, temperature=0)
    parts = [c.choices[0].delta.content or "" for c in client.chat.completions.create(
        model=MODEL, messages=messages, max_tokens=16, temperature=0, stream=True) if c.choices]
    assert whole.choices[0].message.content and "".join(parts) == whole.choices[0].message.content
    assert whole.usage.completion_tokens == 16 or whole.choices[0].finish_reason == "stop"
    assert [m.id for m in client.models.list().data] == [MODEL]


def test_an_adapter_loads_serves_and_unloads_through_the_api(server, default_model_path):
    folder = make_lora_adapter(default_model_path, server.home / "adapters" / "near", 4, seed=7, std=0.05,
                               targets=["q_proj", "v_proj"])
    r = httpx.post(server.base + "/v1/adapters", json={"name": "near", "source": str(folder)}, timeout=120)
    assert r.status_code == 200, r.text
    body = {"model": f"{MODEL}:near", "prompt": "Count to three:", "max_tokens": 4}
    assert httpx.post(server.base + "/v1/completions", json=body, timeout=60).status_code == 200
    assert httpx.delete(server.base + f"/v1/adapters/{MODEL}:near", timeout=60).status_code == 200
    gone = httpx.post(server.base + "/v1/completions", json=body, timeout=60)
    assert gone.status_code == 404 and gone.json()["error"]["code"] == "model_not_found"


def test_a_client_that_leaves_mid_stream_frees_its_engine_slot(server):
    body = {"model": MODEL, "prompt": "Count slowly:", "max_tokens": 600, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server.base + "/v1/completions", json=body, timeout=60) as r:
        seen = 0
        for line in r.iter_lines():
            seen += line.startswith("data: {")
            if seen >= 3:
                break
        assert _running(server) == 1
    deadline = time.monotonic() + 30
    while _running(server) != 0:
        assert time.monotonic() < deadline, "the abandoned request still runs in the engine"
        time.sleep(0.2)
