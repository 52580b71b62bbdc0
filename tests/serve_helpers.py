"""A real `loraplex serve` process for end-to-end tests: a given config, its own data dir, a free port.

The data dir ($LORAPLEX_HOME) is a fresh temporary folder, so keys, spend, audit, collections and adapters
of one test module never meet another's or the user's; the converted default model is linked into it
rather than converted again.
"""

from __future__ import annotations

import os
import signal
import subprocess
import time
from pathlib import Path

import httpx

from benchmarks.cli import LORAPLEX
from serving.router.sim import free_port

MODEL = "smollm2-135m-instruct"


def small_config(model: dict, server: dict | None = None, **sections) -> str:
    """A serve config of the default model alone, with a small KV cache, and embeddings, collections,
    fine-tuning and governance off: `model` adds the model's keys, `server` a server section, `sections`
    replace top-level sections (e.g. governance={"enabled": True})."""
    import yaml

    cfg = {"models": [{"name": MODEL, "max_num_seqs": 16, "kv_cache_memory": "128MiB", "max_model_len": 1024,
                       **model}],
           "embeddings": {"enabled": False}, "rag": {"enabled": False}, "fine_tuning": {"enabled": False},
           "governance": {"enabled": False}, **sections}
    if server is not None:
        cfg["server"] = server
    return yaml.safe_dump(cfg, sort_keys=False)


def make_home(tmp: Path) -> Path:
    """A data dir whose models/ links the already converted default model."""
    from serving.models import prepare_default_model

    home = tmp / "home"
    (home / "models").mkdir(parents=True)
    (home / "models" / MODEL).symlink_to(prepare_default_model(), target_is_directory=True)
    return home


class Server:
    def __init__(self, tmp: Path, config: str, home: Path | None = None):
        self.home = home or make_home(tmp)
        self.env = {**os.environ, "RAY_ADDRESS": "", "PYTHONUNBUFFERED": "1", "LORAPLEX_HOME": str(self.home)}
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        self.config = tmp / "serve.yaml"
        self.config.write_text(config)
        self.log = open(tmp / "serve.log", "w")
        self.proc: subprocess.Popen | None = None
        self.ready_answers: list[tuple[int, dict | None]] = []  # what /ready said while starting

    def cli(self, *args: str) -> subprocess.CompletedProcess:
        """`loraplex <args>` against this server's data dir (e.g. `keys create`)."""
        r = subprocess.run([*LORAPLEX, *args], env=self.env, capture_output=True, text=True, timeout=120)
        assert r.returncode == 0, r.stderr + r.stdout
        return r

    def start(self, timeout: float = 300, bind_retries: int = 2) -> "Server":
        """Start and wait for /ready; a port taken between choosing it and binding it gets a new port."""
        try:
            return self._start(timeout)
        except RuntimeError as e:
            if bind_retries <= 0 or not ("Failed to bind to address" in str(e) or "is in use" in str(e)):
                raise
        self.port = free_port()
        self.base = f"http://127.0.0.1:{self.port}"
        return self.start(timeout, bind_retries - 1)

    def _start(self, timeout: float) -> "Server":
        self.proc = subprocess.Popen(
            [*LORAPLEX, "serve", "--config", str(self.config), "--port", str(self.port)],
            stdout=self.log, stderr=subprocess.STDOUT, start_new_session=True, env=self.env)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise RuntimeError(f"loraplex serve exited with {self.proc.returncode}: {self.tail()}")
            try:
                r = httpx.get(self.base + "/ready", timeout=5)
                body = r.json() if r.headers.get("content-type", "").startswith("application/json") else None
                self.ready_answers.append((r.status_code, body))
                if r.status_code == 200:
                    return self
            except httpx.HTTPError:
                pass
            time.sleep(0.3)
        raise RuntimeError(f"server not ready in {timeout}s: {self.tail()}")

    def tail(self, n: int = 4000) -> str:
        self.log.flush()
        return open(self.log.name).read()[-n:]

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.send_signal(signal.SIGINT)
            try:
                self.proc.wait(timeout=60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(timeout=10)
        self.log.close()


def fine_tune(client, rows: list[dict], suffix: str, sequence_len: int):
    """Upload `rows` as a JSONL file, run a tiny auto-deployed fine-tune of the served base through OpenAI's
    fine-tuning API, wait for it, and return the finished job (it must have succeeded)."""
    import json

    f = client.files.create(file=(f"{suffix}.jsonl", "".join(json.dumps(r) + "\n" for r in rows).encode()),
                            purpose="fine-tune")
    small = {"max_steps": 2, "num_sample_generations": 0, "lora_r": 4, "lora_target_modules": ["q_proj", "v_proj"],
             "sequence_len": sequence_len}
    job = client.fine_tuning.jobs.create(model=MODEL, training_file=f.id, suffix=suffix,
                                         extra_body={"config": small, "auto_deploy": True})
    deadline = time.time() + 600
    while (job := client.fine_tuning.jobs.retrieve(job.id)).status not in ("succeeded", "failed", "cancelled"):
        assert time.time() < deadline, "the fine-tuning job did not finish"
        time.sleep(2)
    assert job.status == "succeeded", job.error
    return job
