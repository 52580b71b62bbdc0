"""`loraplex prepare | chat | serve | bench` on the command line: user mistakes exit 2 with a clear message."""

from __future__ import annotations

import os
import socket
import subprocess

import pytest

from benchmarks.cli import LORAPLEX


def run(*args, stdin: str | None = None, timeout: int = 120):
    return subprocess.run([*LORAPLEX, *args], capture_output=True, text=True,
                          input=stdin, timeout=timeout)


def test_help_lists_our_commands():
    out = run("--help").stdout
    for cmd in ("prepare", "chat", "serve", "bench"):
        assert cmd in out


def test_serve_refuses_a_bad_config_before_starting_ray(tmp_path):
    cfg = tmp_path / "serve.yaml"
    cfg.write_text("models:\n  - name: m\n    max_waitng: 3\n")
    r = run("serve", "--config", str(cfg))
    assert r.returncode == 2
    assert f"loraplex: error: {cfg}: models[0].max_waitng: unknown key" in r.stderr
    assert "Ray" not in r.stdout  # it stopped before starting anything
    r = run("serve", "--config", str(tmp_path / "missing.yaml"))
    assert r.returncode == 2 and "no such config file" in r.stderr
    r = run("serve", "--port", "70000")
    assert r.returncode == 2 and "--port" in r.stderr
    cfg.write_text("server: {direct_ingress: true}\n")
    r = run("serve", "--config", str(cfg), "--address", "127.0.0.1:1")  # refused before it connects
    assert r.returncode == 2 and "server.direct_ingress needs the local Ray instance" in r.stderr
    r = run("serve", "--config", str(cfg), "--port", "0")
    assert r.returncode == 2 and "server.direct_ingress needs a fixed port" in r.stderr
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        r = run("serve", "--config", str(cfg), "--port", str(port))
    assert r.returncode == 2 and f"server.port: 127.0.0.1:{port} is in use" in r.stderr


@pytest.mark.parametrize("args,needle", [
    (["--users", "0"], "--users"),
    (["--duration", "0"], "--duration"),
    (["--host", "localhost:8000"], "--host must be a URL"),
    (["--max-tokens", "0"], "--max-tokens"),
])
def test_bench_refuses_bad_arguments(args, needle):
    r = run("bench", *args)
    assert r.returncode == 2 and needle in r.stderr


def test_prepare_reports_the_model_folders_and_builds_the_cpu_kernels():
    from kernels import cpu_native
    from serving.models import embedding_model_path, prepare_default_model

    r = run("prepare")
    assert r.returncode == 0, r.stderr
    assert str(prepare_default_model()) in r.stdout and str(embedding_model_path()) in r.stdout
    assert f"CPU kernels: {cpu_native.status()}" in r.stdout  # the same compiled library this process loads


@pytest.mark.slow
def test_chat_answers_in_the_terminal():
    r = run("chat", "--max-tokens", "4", "--temperature", "0", stdin="Say hello.\n/reset\n/exit\n", timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    assert "assistant" in r.stdout and "conversation cleared" in r.stdout


def test_serve_runs_each_replica_on_one_event_loop_unless_told_otherwise(monkeypatch):
    from serving.cli import ONE_LOOP_ENV, _one_loop_per_replica

    first, second = ONE_LOOP_ENV
    monkeypatch.delenv(first, raising=False)
    monkeypatch.setenv(second, "1")  # an operator's own choice stays
    _one_loop_per_replica()
    assert os.environ[first] == "0" and os.environ[second] == "1"
