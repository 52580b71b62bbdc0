"""Fine-tuning jobs and training files, persisted under $LORAPLEX_HOME/fine_tuning.

    files/<file-id>/{meta.json, <filename>}
    jobs/<job-id>/{job.json, events.jsonl, config.yaml, runner.log, output/}

Each job runs `python -m training.jobs <job_dir>` in its own process group (or, with backend="ray", that
runner submits the training as a Ray task), so cancel is a SIGTERM and the API server never loads a model.
job.json is the single source of truth, updated under a file lock by both the manager and the runner.
"""

from __future__ import annotations

import fcntl
import json
import os
import secrets
import signal
import subprocess
import sys
import threading
import time
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from loraplex.paths import subdir

TERMINAL = ("succeeded", "failed", "cancelled")
DEFAULT_LR = 2e-4  # learning_rate_multiplier scales this
FILE_PURPOSES = ("fine-tune", "batch", "assistants", "user_data", "evals", "vision")


class JobError(ValueError):
    """A client mistake (OpenAI-style): message, param and code, with an HTTP status."""

    def __init__(self, message: str, *, param: str | None = None, code: str = "invalid_request_error",
                 status: int = 400):
        super().__init__(message)
        self.message, self.param, self.code, self.status = message, param, code, status


def _new_id(prefix: str) -> str:
    return f"{prefix}-{secrets.token_hex(12)}"


def _write_json(path: Path, data: dict) -> None:
    tmp = path.with_suffix(f".tmp{os.getpid()}")
    tmp.write_text(json.dumps(data, indent=2))
    os.replace(tmp, path)


@contextmanager
def _locked(job_dir: Path):
    with open(job_dir / "job.lock", "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            yield
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)


def update_job(job_dir: Path, **changes) -> dict:
    with _locked(job_dir):
        job = json.loads((job_dir / "job.json").read_text())
        if job["status"] in TERMINAL and changes.get("status") not in (None, job["status"]):
            return job  # a finished job never changes state again (e.g. cancel racing success)
        job.update(changes)
        _write_json(job_dir / "job.json", job)
        return job


def append_event(job_dir: Path, level: str, message: str, data: dict | None = None) -> None:
    event = {"id": _new_id("ftevent"), "object": "fine_tuning.job.event", "created_at": int(time.time()),
             "level": level, "message": message, "data": data or {},
             "type": "metrics" if data and "loss" in data and "step" in data else "message"}
    with open(job_dir / "events.jsonl", "a") as fh:
        fh.write(json.dumps(event) + "\n")


def detect_type(path: Path) -> str:
    """chat / completion / alpaca from the first record of a JSONL file."""
    from training.data import read_records

    for _, rec in read_records(str(path)):
        if "messages" in rec:
            return "chat"
        if "prompt" in rec and "completion" in rec:
            return "completion"
        if "instruction" in rec and "output" in rec:
            return "alpaca"
        raise JobError(f"{path.name}: records must have 'messages', 'prompt'/'completion' or "
                       "'instruction'/'output'", param="training_file", code="invalid_file_format")
    raise JobError(f"{path.name} has no examples", param="training_file", code="invalid_file_format")


class JobManager:
    """Files and jobs on disk; starts at most max_concurrent runner processes, the rest wait queued."""

    def __init__(self, root: str | Path | None = None, *, backend: str = "subprocess", max_concurrent: int = 1,
                 gateway_url: str | None = None, ray_num_gpus: float | None = None):
        self.root = Path(root) if root else subdir("fine_tuning")
        self.files_dir = self.root / "files"
        self.jobs_dir = self.root / "jobs"
        self.files_dir.mkdir(parents=True, exist_ok=True)
        self.jobs_dir.mkdir(parents=True, exist_ok=True)
        if backend not in ("subprocess", "ray"):
            raise ValueError("backend must be subprocess or ray")
        self.backend, self.max_concurrent = backend, max_concurrent
        self.gateway_url = gateway_url or os.environ.get("LORAPLEX_GATEWAY_URL")
        self.ray_num_gpus = ray_num_gpus
        self._procs: dict[str, subprocess.Popen] = {}
        self._lock = threading.Lock()
        self._recover()

    # ------------------------------------------------------------ files
    def create_file(self, filename: str, content: bytes, purpose: str) -> dict:
        if purpose not in FILE_PURPOSES:
            raise JobError(f"purpose must be one of {list(FILE_PURPOSES)}", param="purpose")
        name = Path(filename or "upload.jsonl").name
        if purpose == "fine-tune":
            self._check_training_bytes(name, content)
        fid = _new_id("file")
        folder = self.files_dir / fid
        folder.mkdir()
        (folder / name).write_bytes(content)
        meta = {"id": fid, "object": "file", "bytes": len(content), "created_at": int(time.time()),
                "filename": name, "purpose": purpose, "status": "processed", "expires_at": None,
                "status_details": None}
        _write_json(folder / "meta.json", meta)
        return meta

    @staticmethod
    def _check_training_bytes(name: str, content: bytes) -> None:
        if not name.endswith((".jsonl", ".json", ".csv")):
            raise JobError(f"{name}: fine-tune files must be .jsonl (or .json/.csv)", param="file",
                           code="invalid_file_format")
        if name.endswith(".jsonl"):
            try:
                text = content.decode("utf-8")
            except UnicodeDecodeError:
                raise JobError(f"{name} is not UTF-8 text", param="file", code="invalid_file_format") from None
            n = 0
            for lineno, line in enumerate(text.splitlines(), 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise JobError(f"{name}:{lineno}: invalid JSON ({exc.msg})", param="file",
                                   code="invalid_file_format") from None
                if not isinstance(rec, dict):
                    raise JobError(f"{name}:{lineno}: expected a JSON object", param="file",
                                   code="invalid_file_format")
                n += 1
            if n == 0:
                raise JobError(f"{name} has no examples", param="file", code="invalid_file_format")

    def get_file(self, fid: str) -> dict:
        meta = self.files_dir / Path(fid).name / "meta.json"
        if not meta.exists():
            raise JobError(f"No such file: {fid}", param="file_id", code="file_not_found", status=404)
        return json.loads(meta.read_text())

    def file_path(self, fid: str) -> Path:
        meta = self.get_file(fid)
        return self.files_dir / meta["id"] / meta["filename"]

    def list_files(self, purpose: str | None = None) -> list[dict]:
        out = [json.loads(m.read_text()) for m in self.files_dir.glob("*/meta.json")]
        out = [f for f in out if purpose is None or f["purpose"] == purpose]
        return sorted(out, key=lambda f: (f["created_at"], f["id"]), reverse=True)

    def delete_file(self, fid: str) -> dict:
        import shutil

        meta = self.get_file(fid)
        shutil.rmtree(self.files_dir / meta["id"])
        return {"id": meta["id"], "object": "file", "deleted": True}

    # ------------------------------------------------------------ jobs
    def _resolve_dataset(self, ref: str, param: str) -> Path:
        if ref.startswith("file-"):
            try:
                return self.file_path(ref)
            except JobError as exc:
                raise JobError(f"{param}: {exc.message}", param=param, code=exc.code, status=exc.status) from None
        p = Path(ref).expanduser()
        if not p.exists():
            raise JobError(f"{param}: {ref!r} is neither an uploaded file id nor an existing path", param=param,
                           code="file_not_found", status=404 if param in ("training_file", "validation_file") else 400)
        return p

    def build_config(self, body: dict, job_id: str, job_dir: Path) -> tuple[dict, dict]:
        """(config dict, hyperparameters as reported) from an OpenAI-shaped request plus our `config`."""
        from training.config import ConfigError, validate_config

        cfg: dict[str, Any] = dict(body.get("config") or {})
        if not isinstance(body.get("config", {}), dict):
            raise JobError("config must be an object", param="config")
        if body.get("model"):
            cfg.setdefault("base_model", body["model"])
        if "base_model" not in cfg:
            raise JobError("model is required", param="model")
        for spec in cfg.get("datasets") or []:
            if isinstance(spec, dict) and isinstance(spec.get("path"), str):
                spec["path"] = str(self._resolve_dataset(spec["path"], "config.datasets"))
        if body.get("training_file"):
            path = self._resolve_dataset(body["training_file"], "training_file")
            if not cfg.get("datasets"):
                cfg["datasets"] = [{"path": str(path), "type": detect_type(path)}]
        if not cfg.get("datasets"):
            raise JobError("training_file is required", param="training_file")
        if body.get("validation_file"):
            path = self._resolve_dataset(body["validation_file"], "validation_file")
            cfg["eval_datasets"] = [{"path": str(path), "type": detect_type(path)}]
            cfg.pop("val_set_size", None)
        hp = dict(body.get("hyperparameters") or {})
        method = body.get("method") or {}
        if isinstance(method, dict) and method.get("type", "supervised") == "supervised":
            hp.update((method.get("supervised") or {}).get("hyperparameters") or {})
        if hp.get("n_epochs", "auto") != "auto":
            cfg["num_epochs"] = hp["n_epochs"]
            cfg.pop("max_steps", None)
        if hp.get("batch_size", "auto") != "auto":
            cfg["micro_batch_size"] = hp["batch_size"]
        if hp.get("learning_rate_multiplier", "auto") != "auto":
            mult = hp["learning_rate_multiplier"]
            if not isinstance(mult, (int, float)) or mult <= 0:
                raise JobError("learning_rate_multiplier must be a positive number",
                               param="hyperparameters.learning_rate_multiplier")
            cfg["learning_rate"] = DEFAULT_LR * mult
        if body.get("seed") is not None:
            cfg["seed"] = body["seed"]
        suffix = body.get("suffix")
        cfg.setdefault("register_as", f"{suffix or 'ft'}-{job_id.split('-', 1)[1][:8]}")
        cfg.setdefault("mlflow_experiment", "fine-tuning-jobs")
        cfg["output_dir"] = str(job_dir / "output")
        try:
            validated = validate_config(cfg, source="config")
        except ConfigError as exc:
            raise JobError(str(exc), param="config") from None
        from training.trainer import TrainingError, check_environment

        try:
            check_environment(validated)
        except TrainingError as exc:
            raise JobError(str(exc), param="config.adapter") from None
        reported = {"n_epochs": hp.get("n_epochs", "auto"), "batch_size": validated.micro_batch_size,
                    "learning_rate_multiplier": validated.learning_rate / DEFAULT_LR}
        return validated.model_dump(mode="json"), reported

    def create_job(self, body: dict) -> dict:
        if not isinstance(body, dict):
            raise JobError("the request body must be a JSON object")
        job_id = _new_id("ftjob")
        job_dir = self.jobs_dir / job_id
        job_dir.mkdir()
        try:
            cfg, hp = self.build_config(body, job_id, job_dir)
        except BaseException:
            import shutil

            shutil.rmtree(job_dir, ignore_errors=True)
            raise
        import yaml

        (job_dir / "config.yaml").write_text(yaml.safe_dump(cfg, sort_keys=False))
        job = {
            "id": job_id, "object": "fine_tuning.job", "created_at": int(time.time()), "finished_at": None,
            "model": cfg["base_model"], "fine_tuned_model": None, "organization_id": "loraplex",
            "result_files": [], "status": "queued", "trained_tokens": None,
            "training_file": body.get("training_file") or cfg["datasets"][0]["path"],
            "validation_file": body.get("validation_file"), "hyperparameters": hp, "error": None,
            "seed": cfg["seed"], "estimated_finish": None, "integrations": [], "metadata": body.get("metadata"),
            "method": {"type": "supervised", "supervised": {"hyperparameters": hp}},
            # loraplex extensions
            "suffix": body.get("suffix"), "auto_deploy": bool(body.get("auto_deploy")), "backend": self.backend,
            "gateway_url": self.gateway_url, "ray_num_gpus": self.ray_num_gpus, "mlflow_run_id": None,
            "model_uri": None, "adapter_dir": None, "deployed": None, "pid": None, "cancel_requested": False,
        }
        _write_json(job_dir / "job.json", job)
        append_event(job_dir, "info", f"Created fine-tuning job: {job_id}")
        self._schedule()
        return self.get_job(job_id)

    def _job_dir(self, job_id: str) -> Path:
        d = self.jobs_dir / Path(job_id).name
        if not (d / "job.json").exists():
            raise JobError(f"No such fine-tuning job: {job_id}", param="fine_tuning_job_id", code="model_not_found",
                           status=404)
        return d

    def get_job(self, job_id: str) -> dict:
        return public_job(json.loads((self._job_dir(job_id) / "job.json").read_text()))

    def job_config(self, job_id: str) -> str:
        """The job's training config as YAML, less what each job sets itself (datasets, output_dir, the
        registered name), to start a new job from."""
        import yaml

        cfg = yaml.safe_load((self._job_dir(job_id) / "config.yaml").read_text()) or {}
        for key in ("datasets", "eval_datasets", "output_dir", "register_as"):
            cfg.pop(key, None)
        return yaml.safe_dump(cfg, sort_keys=False)

    def list_jobs(self, after: str | None = None, limit: int = 20) -> tuple[list[dict], bool]:
        jobs = [json.loads(p.read_text()) for p in self.jobs_dir.glob("*/job.json")]
        jobs.sort(key=lambda j: (j["created_at"], j["id"]), reverse=True)
        if after:
            ids = [j["id"] for j in jobs]
            jobs = jobs[ids.index(after) + 1:] if after in ids else []
        return [public_job(j) for j in jobs[:limit]], len(jobs) > limit

    def events(self, job_id: str, after: str | None = None, limit: int = 20) -> tuple[list[dict], bool]:
        """Newest first, as OpenAI returns them; `after` is an event id (page towards older events)."""
        path = self._job_dir(job_id) / "events.jsonl"
        lines = path.read_text().splitlines() if path.exists() else []
        events = [json.loads(line) for line in lines if line.strip()][::-1]
        if after:
            ids = [e["id"] for e in events]
            events = events[ids.index(after) + 1:] if after in ids else []
        return events[:limit], len(events) > limit

    def cancel(self, job_id: str) -> dict:
        job_dir = self._job_dir(job_id)
        job = json.loads((job_dir / "job.json").read_text())
        if job["status"] in TERMINAL:
            raise JobError(f"Job {job_id} is already {job['status']} and cannot be cancelled",
                           param="fine_tuning_job_id", code="invalid_state")
        update_job(job_dir, cancel_requested=True)
        with self._lock:
            proc = self._procs.get(job_id)
        if proc is None or proc.poll() is not None:
            job = update_job(job_dir, status="cancelled", finished_at=int(time.time()))
        else:
            try:
                os.killpg(proc.pid, signal.SIGTERM)  # the runner stops after the current step
            except ProcessLookupError:
                pass
            job = update_job(job_dir, status="cancelled", finished_at=int(time.time()))
        append_event(job_dir, "info", "Fine-tuning job cancelled")
        return public_job(job)

    def wait(self, job_id: str, timeout: float = 600) -> dict:
        deadline = time.time() + timeout
        while time.time() < deadline:
            job = self.get_job(job_id)
            with self._lock:
                proc = self._procs.get(job_id)
            if job["status"] in TERMINAL and (proc is None or proc.poll() is not None):
                return job
            time.sleep(0.5)
        raise TimeoutError(f"job {job_id} did not finish in {timeout}s")

    def shutdown(self, timeout: float = 30) -> None:
        """Stop running jobs (SIGTERM, then SIGKILL after timeout)."""
        with self._lock:
            procs = list(self._procs.items())
        for job_id, proc in procs:
            if proc.poll() is None:
                try:
                    self.cancel(job_id)
                except JobError:
                    pass
        for _, proc in procs:
            try:
                proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(proc.pid, signal.SIGKILL)

    # ------------------------------------------------------------ running
    def _recover(self) -> None:
        """Jobs left running by a previous server process are marked failed; queued ones are started."""
        for p in self.jobs_dir.glob("*/job.json"):
            job = json.loads(p.read_text())
            if job["status"] == "running" and not _alive(job.get("pid")):
                update_job(p.parent, status="failed", finished_at=int(time.time()),
                           error={"code": "server_restarted", "message": "the job's runner exited unexpectedly",
                                  "param": None})
        self._schedule()

    def _schedule(self) -> None:
        with self._lock:
            running = sum(1 for p in self._procs.values() if p.poll() is None)
            queued = sorted((json.loads(p.read_text()) for p in self.jobs_dir.glob("*/job.json")),
                            key=lambda j: j["created_at"])
            for job in queued:
                if running >= self.max_concurrent:
                    break
                if job["status"] != "queued" or job["id"] in self._procs:
                    continue
                self._start(job["id"])
                running += 1

    def _start(self, job_id: str) -> None:
        job_dir = self.jobs_dir / job_id
        log = open(job_dir / "runner.log", "ab")
        env = dict(os.environ)
        root = str(Path(__file__).resolve().parents[1])
        env["PYTHONPATH"] = root + (os.pathsep + env["PYTHONPATH"] if env.get("PYTHONPATH") else "")
        proc = subprocess.Popen([sys.executable, "-m", "training.jobs", str(job_dir)], stdout=log,
                                stderr=subprocess.STDOUT, start_new_session=True, env=env, cwd=root)
        log.close()
        self._procs[job_id] = proc
        update_job(job_dir, status="running", pid=proc.pid)
        threading.Thread(target=self._reap, args=(job_id, proc), daemon=True).start()

    def _reap(self, job_id: str, proc: subprocess.Popen) -> None:
        code = proc.wait()
        job_dir = self.jobs_dir / job_id
        job = json.loads((job_dir / "job.json").read_text())
        if job["status"] not in TERMINAL:
            if job.get("cancel_requested"):
                update_job(job_dir, status="cancelled", finished_at=int(time.time()))
            else:
                tail = _tail(job_dir / "runner.log")
                update_job(job_dir, status="failed", finished_at=int(time.time()),
                           error={"code": "runner_exited", "param": None,
                                  "message": f"the training process exited with status {code}: {tail}"})
                append_event(job_dir, "error", f"training process exited with status {code}")
        self._schedule()


def _alive(pid: int | None) -> bool:
    if not pid:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def _tail(path: Path, n: int = 400) -> str:
    try:
        return path.read_text(errors="replace")[-n:].strip()
    except OSError:
        return ""


_PRIVATE = ("backend", "gateway_url", "ray_num_gpus", "pid", "cancel_requested")


def public_job(job: dict) -> dict:
    return {k: v for k, v in job.items() if k not in _PRIVATE}


# ---------------------------------------------------------------- the runner process
def deploy_adapter(gateway_url: str, name: str, source: str, base: str | None = None, timeout: float = 60) -> dict:
    """Ask the gateway to load the adapter into serving: POST /v1/adapters {"name", "source", "base"}; the
    base is the job's model, so the gateway need not guess it when it serves several models."""
    import httpx

    body = {"name": name, "source": source, **({"base": base} if base else {})}
    resp = httpx.post(gateway_url.rstrip("/") + "/v1/adapters", json=body, timeout=timeout,
                      headers=_auth_headers())
    if resp.status_code >= 400:
        raise RuntimeError(f"POST /v1/adapters answered HTTP {resp.status_code}: {resp.text[:300]}")
    return resp.json() if resp.content else {}


def _auth_headers() -> dict:
    key = os.environ.get("LORAPLEX_API_KEY")
    return {"Authorization": f"Bearer {key}"} if key else {}


def run_job(job_dir: Path) -> int:
    """Body of the runner process: train, record the result, optionally deploy."""
    from training.config import load_config
    from training.trainer import TrainingInterrupted

    job = json.loads((job_dir / "job.json").read_text())

    def on_event(level: str, message: str, data: dict) -> None:
        append_event(job_dir, level, message, data)
        if "run_id" in data and data["run_id"]:
            update_job(job_dir, mlflow_run_id=data["run_id"])

    try:
        cfg = load_config(job_dir / "config.yaml")
        append_event(job_dir, "info", "Fine-tuning job started")
        if job.get("backend") == "ray":
            from training.ray_task import run_on_ray

            result = run_on_ray(cfg, num_gpus=job.get("ray_num_gpus"), events_dir=str(job_dir))
        else:
            from training.trainer import train

            result = train(cfg, on_event=on_event, progress=False).to_dict()
    except TrainingInterrupted:
        update_job(job_dir, status="cancelled", finished_at=int(time.time()))
        append_event(job_dir, "info", "Training stopped: the job was cancelled")
        return 0
    except Exception as exc:  # noqa: BLE001 - every failure is recorded on the job, with its message
        update_job(job_dir, status="failed", finished_at=int(time.time()),
                   error={"code": type(exc).__name__, "message": str(exc), "param": None})
        append_event(job_dir, "error", f"Fine-tuning job failed: {exc}")
        return 1
    name = result.get("registered_name") or cfg.register_as
    update_job(job_dir, mlflow_run_id=result["run_id"], model_uri=result.get("model_uri"),
               adapter_dir=result["adapter_dir"], trained_tokens=result["tokens"])
    if job.get("auto_deploy"):
        source = result.get("model_uri") or result["adapter_dir"]
        gateway = job.get("gateway_url")
        if not gateway:
            update_job(job_dir, deployed=False)
            append_event(job_dir, "warn", "auto_deploy: no gateway URL is configured (LORAPLEX_GATEWAY_URL)")
        else:
            try:
                deploy_adapter(gateway, name, source, base=job.get("model"))
                update_job(job_dir, deployed=True)
                append_event(job_dir, "info", f"Adapter {name} deployed to {gateway} from {source}")
            except Exception as exc:  # noqa: BLE001 - the training succeeded; deployment is reported
                update_job(job_dir, deployed=False)
                append_event(job_dir, "warn", f"auto_deploy of {name} to {gateway} failed: {exc}")
    update_job(job_dir, status="succeeded", fine_tuned_model=name, finished_at=int(time.time()))
    append_event(job_dir, "info", "The job has successfully completed")
    return 0


if __name__ == "__main__":
    sys.exit(run_job(Path(sys.argv[1])))
