"""A real two-node Ray cluster on one machine: `ray start --head` and `ray start --address` (separate raylets),
with token auth (each node and `loraplex serve --address` present the cluster's token; a driver without it is
refused), one model replica per node (a custom resource each node has one of).

Replicas on both nodes serve; killing the worker node's raylet mid-generation fails its streams over to the head
node's replica, and every stream still ends with the no-fault text.
"""

from __future__ import annotations

import json
import os
import secrets
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from serving.router.sim import free_port
from tests.serve_helpers import MODEL, Server, small_config
from tests.test_replicas_e2e import run_streams, wait_for_replicas

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

RAY = str(Path(sys.executable).with_name("ray"))
TOKEN_ENV = {"RAY_AUTH_MODE": "token", "RAY_AUTH_TOKEN": secrets.token_hex(32)}
CONFIG = small_config(
    {"num_replicas": 2, "num_threads": 1, "dtype": "float32",  # exact against the no-fault run (test_replicas_e2e)
     "ray_actor_options": {"num_cpus": 0, "resources": {"replica_slot": 1}}},  # one replica per node
    # both nodes are on this machine: one proxy, one port; the gateway on the head
    server={"proxy_location": "HeadOnly", "ray_actor_options": {"num_cpus": 0, "resources": {"head_node": 0.01}}})
# Run in a child process, so this test process never becomes a Ray driver: which replica runs on which node, and
# the prompt tokens each has computed (Serve's handle.broadcast of the replicas' stats).
INSPECT = """
import json, sys, ray
from ray import serve
ray.init(address=sys.argv[1], logging_level="error", log_to_driver=False)
stats = serve.get_deployment_handle("llm-" + sys.argv[2], app_name="loraplex").broadcast("stats").results(timeout_s=60)
nodes = {n["NodeID"]: ("head" if "head_node" in n["Resources"] else "worker") for n in ray.nodes() if n["Alive"]}
print(json.dumps({s["replica"]: {"node": nodes.get(s["node"], "?"), "prompt_tokens": s["prompt_tokens_total"]}
                  for s in stats}))
"""


def replicas(address: str, within_s: float = 90) -> dict:
    """Every running replica's node and prompt tokens. Right after a node dies Serve may still list its replica
    (which then cannot answer) until Ray declares the node dead: ask again until every listed replica answers."""
    deadline = time.monotonic() + within_s
    while True:
        r = subprocess.run([sys.executable, "-c", INSPECT, address, MODEL], capture_output=True, text=True,
                           timeout=180, env={**os.environ, "RAY_ADDRESS": "", **TOKEN_ENV})
        if r.returncode == 0:
            return json.loads(r.stdout.strip().splitlines()[-1])
        assert time.monotonic() < deadline and "ActorUnavailableError" in r.stderr, r.stderr[-3000:]
        time.sleep(3)


def raylet_pids(manager_port: int) -> list[int]:
    pids = []
    for d in Path("/proc").iterdir():
        try:
            if d.name.isdigit() and (d / "comm").read_text().strip() == "raylet" \
                    and f"--node_manager_port={manager_port}".encode() in (d / "cmdline").read_bytes():
                pids.append(int(d.name))
        except OSError:
            continue
    return pids


@pytest.fixture(scope="module")
def cluster(tmp_path_factory):
    tmp = tmp_path_factory.mktemp("multinode")
    port, worker_port = free_port(), free_port()
    address = f"127.0.0.1:{port}"
    # token auth, as Ray 2.60's `ray start --head` turns on by default: every node and driver presents the token
    env = {**os.environ, "RAY_ADDRESS": "", **TOKEN_ENV}
    common = ["--num-cpus", "2", "--disable-usage-stats"]
    subprocess.run([RAY, "start", "--head", "--port", str(port), "--include-dashboard", "false",
                    "--resources", json.dumps({"replica_slot": 1, "head_node": 1}), *common],
                   check=True, capture_output=True, env=env, timeout=180)
    server = None
    try:
        subprocess.run([RAY, "start", "--address", address, "--node-manager-port", str(worker_port),
                        "--resources", json.dumps({"replica_slot": 1, "worker_node": 1}), *common],
                       check=True, capture_output=True, env=env, timeout=180)
        server = Server(tmp, CONFIG)
        server.env.update(RAY_ADDRESS=address, **TOKEN_ENV)  # `loraplex serve` joins the cluster with the token
        server.start(timeout=600)  # ready once one replica serves: wait for the other node's too
        wait_for_replicas(server, 2, local=False)
        yield server, address, worker_port
    finally:
        if server is not None:
            server.stop()
        subprocess.run([RAY, "stop", "--force"], capture_output=True, env=env, timeout=120)


def test_replicas_on_both_nodes_serve_and_the_worker_node_fails_over(cluster):
    server, address, worker_port = cluster
    placed = replicas(address)
    assert sorted(r["node"] for r in placed.values()) == ["head", "worker"], placed
    baseline, _ = run_streams(server)
    assert all(r["finish_reason"] and not r["errors"] for r in baseline)
    served = replicas(address)
    assert all(r["prompt_tokens"] > 0 for r in served.values()), served  # a request reached each node's replica

    pids = raylet_pids(worker_port)
    assert len(pids) == 1, pids
    killed = []

    def kill_worker(chunks: int) -> bool:
        if chunks >= 24 * 8 and not killed:
            os.kill(pids[0], signal.SIGKILL)
            killed.append(time.time())
        return False  # run_streams kills a replica when this says so; here the node went down instead

    results, _ = run_streams(server, kill_when=kill_worker)
    assert killed, "the worker node was not killed"
    for got, want in zip(results, baseline):
        assert not got["errors"], got["errors"]
        assert got["text"] == want["text"] and got["finish_reason"] == want["finish_reason"]
    after = replicas(address)
    assert [r["node"] for r in after.values()] == ["head"], after


def test_a_driver_without_the_clusters_token_is_refused(cluster, tmp_path):
    _, address, _ = cluster
    env = {k: v for k, v in os.environ.items() if not k.startswith("RAY_AUTH")}
    r = subprocess.run([sys.executable, "-c", f"import ray; ray.init(address={address!r}); print('joined')"],
                       capture_output=True, text=True, timeout=180,
                       env={**env, "RAY_ADDRESS": "", "RAY_AUTH_MODE": "token", "HOME": str(tmp_path)})
    assert r.returncode != 0 and "joined" not in r.stdout
    assert "token" in r.stderr.lower(), r.stderr[-2000:]
