"""The portal's server side without a browser: the static files at /ui and their security headers, the JSON
views it reads (/v1/me, /v1/admin/teams, /v1/admin/policy, fine-tuning config checks), the latency quantiles
behind /v1/operations, and that the wheel would carry every file the page loads."""

import hashlib
import posixpath
import re
import zipfile
from pathlib import Path

import httpx
import numpy as np
import pytest
from fastapi import FastAPI
from prometheus_client import CollectorRegistry, Histogram

from serving.api.catalog import _histograms, histogram_quantile
from serving.router.sim import AppServer
from serving.ui import CSP, STATIC, mount
from training.api import config_errors

REPO = Path(__file__).resolve().parents[1]


@pytest.fixture(scope="module")
def ui():
    app = FastAPI()
    mount(app)
    with AppServer(app, "portal") as srv:
        with httpx.Client(base_url=f"http://127.0.0.1:{srv.port}", timeout=10) as http:
            yield http


def test_ui_files_are_served_with_a_strict_content_security_policy(ui):
    r = ui.get("/ui", follow_redirects=False)
    assert r.status_code == 307 and r.headers["location"] == "/ui/"
    page = ui.get("/ui/")
    assert page.status_code == 200 and "text/html" in page.headers["content-type"]
    assert page.headers["content-security-policy"] == CSP and "script-src 'self';" in CSP
    assert page.headers["x-frame-options"] == "DENY" and page.headers["x-content-type-options"] == "nosniff"
    assert "<script>" not in page.text  # no inline script: the policy would block it anyway
    js = ui.get("/ui/js/main.js")
    assert js.status_code == 200 and js.headers["content-type"].startswith("text/javascript")
    # a view's address is the app; a missing file is a 404 in OpenAI's error shape; no path leaves the folder
    assert ui.get("/ui/catalog").text == page.text
    missing = ui.get("/ui/js/nope.js")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    for path in ("/ui/../serving/ui/__init__.py", "/ui/%2e%2e/__init__.py", "/ui/..%2f__init__.py"):
        r = ui.get(path)
        assert "def mount" not in r.text, path


def test_every_module_and_asset_the_page_loads_exists_and_vendored_files_match_their_sums():
    html = (STATIC / "index.html").read_text()
    refs = re.findall(r'(?:src|href)="/ui/([^"]+)"', html)
    assert {"vendor/chart.umd.min.js", "vendor/tabulator.min.js", "js/main.js"} <= set(refs)
    todo, seen = ["js/main.js"], set()
    while todo:  # follow the ES module imports from main.js
        path = todo.pop()
        seen.add(path)
        src = (STATIC / path).read_text()
        for rel in re.findall(r'from "(\.{1,2}/[^"]+)"', src):
            target = posixpath.normpath(posixpath.join(posixpath.dirname(path), rel))
            assert (STATIC / target).is_file(), f"{path} imports missing {rel}"
            if target not in seen:
                todo.append(target)
    assert {"js/core.js", "js/views/admin.js", "js/views/playground.js", "js/views/finetune.js"} <= seen
    for line in (STATIC / "vendor" / "SHA256SUMS").read_text().splitlines():
        digest, name = line.split()
        assert hashlib.sha256((STATIC / "vendor" / name).read_bytes()).hexdigest() == digest, name


def test_the_page_never_assigns_html_built_from_data():
    """User text is set as text (textContent, text nodes, Tabulator's escaping plaintext formatter)."""
    for path in STATIC.joinpath("js").rglob("*.js"):
        src = path.read_text()
        for sink in ("innerHTML", "outerHTML", "insertAdjacentHTML", "document.write", "eval(", "new Function"):
            assert sink not in src, f"{path.name} uses {sink}"


def test_the_wheel_carries_the_portal(tmp_path):
    import subprocess
    import sys

    subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q", "-w",
                    str(tmp_path), str(REPO)], check=True, capture_output=True, timeout=300)
    wheel = next(tmp_path.glob("loraplex-*.whl"))
    names = set(zipfile.ZipFile(wheel).namelist())
    for path in STATIC.rglob("*"):
        if path.is_file():
            assert f"serving/ui/static/{path.relative_to(STATIC).as_posix()}" in names, path


def test_histogram_quantiles_fall_in_the_bucket_of_the_true_quantile():
    """Against numpy's quantile of the raw observations: the estimate lies within the true value's bucket."""
    rng = np.random.default_rng(0)
    buckets = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5)
    hist = Histogram("t", "t", ["model", "adapter"], buckets=buckets, registry=CollectorRegistry())
    values = rng.lognormal(mean=-3, sigma=1.0, size=5000)
    for v in values:
        hist.labels("m", "").observe(v)
    got = _histograms(hist)[("m", "")]
    assert got["count"] == 5000 and got["mean_ms"] == pytest.approx(values.mean() * 1000, rel=1e-9)
    edges = (0.0,) + buckets + (float("inf"),)
    for q, key in ((0.5, "p50_ms"), (0.99, "p99_ms")):
        true = float(np.quantile(values, q))
        i = next(i for i in range(1, len(edges)) if true <= edges[i])
        assert edges[i - 1] * 1000 <= got[key] <= edges[i] * 1000, (q, true, got[key])
    assert histogram_quantile([], 0.5) is None
    assert histogram_quantile([(0.1, 0.0), (float("inf"), 0.0)], 0.5) is None
    assert histogram_quantile([(0.1, 2.0), (1.0, 4.0), (float("inf"), 4.0)], 0.5) == pytest.approx(0.1)
    assert histogram_quantile([(0.1, 0.0), (1.0, 4.0), (float("inf"), 4.0)], 0.5) == pytest.approx(0.55)


def test_fine_tuning_config_check_names_the_key_path():
    ok = config_errors("base_model: smollm2-135m-instruct\nmax_steps: 3\n")
    assert ok == {"valid": True, "errors": [], "config": {"base_model": "smollm2-135m-instruct", "max_steps": 3}}
    bad = config_errors("lora_rr: 4\nlora_dropout: 2\ndatasets:\n  - {path: x.jsonl, type: chatty}\n")
    paths = {e["path"]: e["message"] for e in bad["errors"]}
    assert not bad["valid"] and paths["lora_rr"] == "unknown key" and "less than 1" in paths["lora_dropout"]
    assert "datasets.0.type" in paths and bad["config"] is None
    yaml_err = config_errors("lora_r: 8\n  bad: [\n")
    assert not yaml_err["valid"] and yaml_err["errors"][0]["path"] == "(yaml)"
    assert "line 2" in yaml_err["errors"][0]["message"]
    assert config_errors("- a list\n")["errors"][0]["path"] == "(config)"
