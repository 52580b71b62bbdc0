"""MLflow tracking for training runs: an embedded SQLite store by default, a server via MLFLOW_TRACKING_URI.

Everything goes through an explicit MlflowClient and run id (no fluent global state), so a resumed run
logs into the same MLflow run and a jobs server can track several runs at once.
"""

from __future__ import annotations

import os
import subprocess
import time
from pathlib import Path
from urllib.parse import urlparse

from loraplex.paths import subdir


class TrackingError(RuntimeError):
    """The tracking server is unreachable or a registry operation failed."""


def tracking_uri() -> str:
    """$MLFLOW_TRACKING_URI, else sqlite:///<home>/mlflow/mlflow.db."""
    uri = os.environ.get("MLFLOW_TRACKING_URI")
    if uri:
        return uri
    return f"sqlite:///{subdir('mlflow') / 'mlflow.db'}"


def _local_artifact_root(uri: str) -> str | None:
    """For a local sqlite store, artifacts live beside the db (MLflow's default would be ./mlruns in the cwd)."""
    parsed = urlparse(uri)
    if parsed.scheme == "sqlite":
        db = Path(uri[len("sqlite:///"):])
        return (db.parent / "artifacts").resolve().as_uri()
    return None


_READY: set[str] = set()


def local_artifact_dir(uri: str | None = None) -> Path | None:
    """The artifact folder of a local SQLite store (a plain path, for serving's allowed adapter roots)."""
    uri = uri or tracking_uri()
    return Path(uri[len("sqlite:///"):]).parent.resolve() / "artifacts" if uri.startswith("sqlite:///") else None


def _init_sqlite(uri: str) -> None:
    """Create/migrate the SQLite store under a file lock: concurrent first runs would race on the schema."""
    import fcntl

    if uri in _READY:
        return
    db = Path(uri[len("sqlite:///"):])
    db.parent.mkdir(parents=True, exist_ok=True)
    with open(db.with_name(db.name + ".lock"), "a+") as fh:
        fcntl.flock(fh, fcntl.LOCK_EX)
        try:
            client(uri).search_experiments(max_results=1)
        finally:
            fcntl.flock(fh, fcntl.LOCK_UN)
    _READY.add(uri)


def check_reachable(uri: str | None = None, timeout: float = 5.0) -> str:
    """Fail fast (before any model loads) when an HTTP tracking server does not answer its /health."""
    uri = uri or tracking_uri()
    if urlparse(uri).scheme not in ("http", "https"):
        if uri.startswith("sqlite:///"):
            _init_sqlite(uri)
        return uri
    import httpx

    try:
        resp = httpx.get(uri.rstrip("/") + "/health", timeout=timeout)
    except httpx.HTTPError as exc:
        raise TrackingError(f"MLflow tracking server {uri} is unreachable ({exc}); check MLFLOW_TRACKING_URI, "
                            "or unset it to use the embedded store") from None
    if resp.status_code != 200:
        raise TrackingError(f"MLflow tracking server {uri} answered /health with HTTP {resp.status_code}")
    return uri


def client(uri: str | None = None):
    from mlflow import MlflowClient

    uri = uri or tracking_uri()
    return MlflowClient(tracking_uri=uri, registry_uri=uri)


def code_version() -> str:
    """loraplex's version plus the git commit of the working tree, when there is one."""
    from importlib.metadata import PackageNotFoundError, version

    try:
        v = version("loraplex")
    except PackageNotFoundError:
        v = "unknown"
    try:
        sha = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True, timeout=5,
                             cwd=Path(__file__).resolve().parent).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        sha = ""
    return f"{v}+g{sha}" if sha else v


class RunTracker:
    """One MLflow run: params, metrics, tags, artifacts, and adapter registration."""

    def __init__(self, experiment: str, *, run_id: str | None = None, run_name: str | None = None,
                 uri: str | None = None):
        self.uri = check_reachable(uri)
        self.client = client(self.uri)
        if run_id:
            self.run_id = run_id
            self.client.update_run(run_id, status="RUNNING")
        else:
            exp = self.client.get_experiment_by_name(experiment)
            if exp is None:
                exp_id = self.client.create_experiment(experiment, artifact_location=_local_artifact_root(self.uri))
            else:
                exp_id = exp.experiment_id
            self.run_id = self.client.create_run(exp_id, run_name=run_name).info.run_id

    def log_params(self, params: dict[str, str]) -> None:
        from mlflow.entities import Param

        existing = self.client.get_run(self.run_id).data.params
        todo = [Param(k, str(v)[:6000]) for k, v in params.items() if k not in existing]
        for i in range(0, len(todo), 100):
            self.client.log_batch(self.run_id, params=todo[i: i + 100])

    def set_tags(self, tags: dict[str, str]) -> None:
        from mlflow.entities import RunTag

        self.client.log_batch(self.run_id, tags=[RunTag(k, str(v)) for k, v in tags.items()])

    def log_metrics(self, metrics: dict[str, float], step: int) -> None:
        from mlflow.entities import Metric

        ts = int(time.time() * 1000)
        self.client.log_batch(self.run_id, metrics=[Metric(k, float(v), ts, step) for k, v in metrics.items()])

    def log_artifacts(self, folder: str | Path, artifact_path: str) -> None:
        self.client.log_artifacts(self.run_id, str(folder), artifact_path)

    def log_artifact(self, file: str | Path, artifact_path: str | None = None) -> None:
        self.client.log_artifact(self.run_id, str(file), artifact_path)

    def artifact_uri(self, path: str) -> str:
        return self.client.get_run(self.run_id).info.artifact_uri.rstrip("/") + "/" + path

    def end(self, status: str = "FINISHED") -> None:
        self.client.set_terminated(self.run_id, status=status)

    def register_adapter(self, name: str, alias: str | None, tags: dict[str, str]) -> str:
        """Register the logged `adapter` artifact as a new version of `name` (and point alias at it).

        Any failure deletes what this call created (the version, and the registered model if it was new),
        so no half-registered model is left behind. Returns the version.
        """
        from mlflow.exceptions import MlflowException

        created_model, version = False, None
        try:
            try:
                self.client.get_registered_model(name)
            except MlflowException:
                self.client.create_registered_model(name, description="LoRA adapter trained by loraplex")
                created_model = True
            mv = self.client.create_model_version(name, source=self.artifact_uri("adapter"), run_id=self.run_id,
                                                  tags=tags)
            version = mv.version
            if alias:
                self.client.set_registered_model_alias(name, alias, version)
            return str(version)
        except Exception as exc:
            if version is not None:
                _quietly(self.client.delete_model_version, name, version)
            if created_model:
                _quietly(self.client.delete_registered_model, name)
            raise TrackingError(f"registering the adapter as {name!r} failed: {exc}") from exc


def _quietly(fn, *args) -> None:
    try:
        fn(*args)
    except Exception:  # noqa: BLE001 - best-effort cleanup after an error that is already being raised
        pass
