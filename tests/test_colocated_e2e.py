"""`colocate: true` with `server.direct_ingress: true` on real Ray Serve: the default model's engine runs inside
the gateway replica, which takes HTTP on the server's port itself.

No model deployment exists (no `llm-` replica process) and the port's listener is the gateway replica, not Serve's
proxy; the official `openai` client gets the same greedy text
streamed and whole; an adapter loaded through the admin API serves and unloads; a client that leaves mid-stream
frees its engine slot (the running-requests gauge goes back to 0).
"""

from __future__ import annotations

import os
import time
from pathlib import Path

import httpx
import openai
import pytest

from serving.cli import ONE_LOOP_ENV
from tests.conftest import make_lora_adapter
from tests.serve_helpers import MODEL, Server, small_config
from tests.test_replicas_e2e import replica_pids

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    config = small_config({"colocate": True, "dtype": "float32"}, server={"direct_ingress": True})
    s = Server(tmp_path_factory.mktemp("colocated"), config).start()
    try:
        yield s
    finally:
        s.stop()


def listener_pid(port: int) -> int | None:
    """The process listening on 127.0.0.1:`port` (from /proc: the socket's inode, then whose fd it is)."""
    inodes = set()
    for table in ("/proc/net/tcp", "/proc/net/tcp6"):
        for line in Path(table).read_text().splitlines()[1:]:
            f = line.split()
            if f[3] == "0A" and int(f[1].rsplit(":", 1)[1], 16) == port:  # 0A: LISTEN
                inodes.add(f"socket:[{f[9]}]")
    for d in Path("/proc").iterdir():
        if d.name.isdigit():
            try:
                if any(os.readlink(fd) in inodes for fd in (d / "fd").iterdir()):
                    return int(d.name)
            except OSError:
                continue
    return None


def _running(server: Server) -> float:
    for line in httpx.get(server.base + "/metrics", timeout=30).text.splitlines():
        if line.startswith("loraplex_num_requests_running") and f'model="{MODEL}"' in line:
            return float(line.rsplit(" ", 1)[1])
    raise AssertionError("no running-requests gauge for the model in /metrics")


def test_the_model_runs_in_the_gateway_replica_and_answers_the_openai_client(server):
    assert replica_pids(server.home, "llm-") == []  # no model deployment: no gateway -> model hop
    gateways = replica_pids(server.home, "gateway")
    assert len(gateways) == 1 and listener_pid(server.port) == gateways[0]  # direct ingress: no proxy in between
    environ = (Path("/proc") / str(gateways[0]) / "environ").read_bytes().split(b"\0")
    assert all(f"{k}={v}".encode() in environ for k, v in ONE_LOOP_ENV.items())  # one event loop per replica
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
