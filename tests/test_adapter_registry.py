"""The run-time adapter registry: a file per data dir, mirrored into the Ray cluster's key-value store so that
a replica on another machine (another $LORAPLEX_HOME) finds the adapters added through the API."""

from __future__ import annotations

import json
import os
import subprocess
import sys

from serving import adapters

# Two data dirs stand in for two machines; one Ray instance is their cluster.
SCRIPT = r"""
import json, os, sys
import ray
from serving import adapters
home_a, home_b = sys.argv[1], sys.argv[2]
out = {}
os.environ["LORAPLEX_HOME"] = home_a
json.dump({"m": {"old": "/adapters/old"}}, open(adapters._registry_file(), "w"))
ray.init(num_cpus=1, include_dashboard=False, logging_level="error", log_to_driver=False)
adapters.publish_registry()                       # a gateway starts: the cluster learns this machine's registry
adapters.record("m", "sql", "models:/sql@champion")
os.environ["LORAPLEX_HOME"] = home_b              # "another machine": its own, empty data dir
out["other_file"] = adapters._read_file()
out["other_sees"] = adapters.read_registry()
adapters.publish_registry()                       # a second gateway does not clobber the cluster's copy
out["after_second_publish"] = adapters.read_registry()
os.environ["LORAPLEX_HOME"] = home_a
adapters.record("m", "old", None)
os.environ["LORAPLEX_HOME"] = home_b
out["after_remove"] = adapters.read_registry()
os.environ["LORAPLEX_HOME"] = home_a
out["file_a"] = adapters._read_file()
print(json.dumps(out))
"""


def test_an_adapter_added_on_one_machine_is_seen_from_another_through_the_cluster(tmp_path):
    a, b = tmp_path / "a", tmp_path / "b"
    r = subprocess.run([sys.executable, "-c", SCRIPT, str(a), str(b)], capture_output=True, text=True, timeout=300,
                       env={**os.environ, "RAY_ADDRESS": ""})
    assert r.returncode == 0, r.stderr[-3000:]
    out = json.loads(r.stdout.strip().splitlines()[-1])
    both = {"m": {"old": "/adapters/old", "sql": "models:/sql@champion"}}
    assert out["other_file"] == {} and out["other_sees"] == both == out["after_second_publish"]
    assert out["after_remove"] == {"m": {"sql": "models:/sql@champion"}} == out["file_a"]  # file and cluster agree


def test_outside_ray_the_file_is_the_registry(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAPLEX_HOME", str(tmp_path))
    assert adapters.read_registry() == {}
    adapters.record("m", "x", "/a/x", force=True)
    adapters.publish_registry()  # no cluster: nothing to do
    assert adapters.read_registry() == {"m": {"x": {"source": "/a/x", "force": True}}}
    assert adapters.entry(adapters.read_registry()["m"]["x"]) == ("/a/x", True)
