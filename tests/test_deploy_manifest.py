"""deploy/rayservice.yaml stays in step with the code: its serve config validates and its import path builds."""

from __future__ import annotations

import importlib
from pathlib import Path

import yaml

from serving.config import parse_config

MANIFEST = Path(__file__).resolve().parent.parent / "deploy" / "rayservice.yaml"


def test_the_kuberay_manifest_holds_a_valid_serve_config_and_import_path(tmp_path):
    docs = {d["kind"]: d for d in yaml.safe_load_all(MANIFEST.read_text())}
    cfg = parse_config(yaml.safe_load(docs["ConfigMap"]["data"]["serve.yaml"]))
    model = cfg.models[0]
    assert model.ray_actor_options.num_gpus == 1 and model.autoscaling.max_replicas >= 2
    serve_cfg = yaml.safe_load(docs["RayService"]["spec"]["serveConfigV2"])
    app = serve_cfg["applications"][0]
    module, _, name = app["import_path"].partition(":")
    builder = getattr(importlib.import_module(module), name)
    config = tmp_path / "serve.yaml"
    config.write_text(docs["ConfigMap"]["data"]["serve.yaml"])
    assert builder({"config": str(config)}) is not None  # the bound application Serve would deploy
    assert app["args"]["config"].startswith("/etc/loraplex/")
    workers = docs["RayService"]["spec"]["rayClusterConfig"]["workerGroupSpecs"]
    assert workers[0]["template"]["spec"]["containers"][0]["resources"]["limits"]["nvidia.com/gpu"] == "1"
