"""Adapter sources -> a local PEFT folder, for serving, eval and merge.

    resolve_adapter_uri("models:/acme@champion")   # MLflow registry alias
    resolve_adapter_uri("models:/acme/3")          # registry version
    resolve_adapter_uri("runs:/<run_id>/adapter")  # a run's artifact
    resolve_adapter_uri("/path/to/adapter")        # a folder with adapter_config.json

Registry downloads are cached under $LORAPLEX_HOME/adapters/mlflow/<name>/<version> (versions are immutable).
"""

from __future__ import annotations

import json
import os
import re
import shutil
import tempfile
from pathlib import Path

from loraplex.paths import subdir
from training.tracking import client, tracking_uri

_MODELS = re.compile(r"^models:/(?P<name>[^/@]+)(?:@(?P<alias>[^/]+)|/(?P<version>\d+))/?$")
_RUNS = re.compile(r"^runs:/(?P<run>[0-9a-zA-Z]+)/(?P<path>.+)$")


class AdapterNotFoundError(ValueError):
    """An adapter source that does not resolve to a PEFT adapter folder."""


def is_adapter_uri(source: str) -> bool:
    return source.startswith(("models:/", "runs:/")) or (Path(source).expanduser() / "adapter_config.json").is_file()


def _check_folder(path: Path, source: str) -> Path:
    if not (path / "adapter_config.json").is_file():
        raise AdapterNotFoundError(f"{source!r} is not a PEFT adapter (no adapter_config.json in {path})")
    return path


def _download(artifact_uri: str, target: Path, uri: str) -> Path:
    """Download into a temp folder, then rename into place (safe against concurrent resolvers)."""
    import mlflow

    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=f".{target.name}-", dir=target.parent))
    try:
        got = Path(mlflow.artifacts.download_artifacts(artifact_uri=artifact_uri, dst_path=str(tmp), tracking_uri=uri))
        try:
            os.replace(got, target)
        except OSError:
            if not target.exists():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def resolve_adapter_uri(source: str, uri: str | None = None) -> Path:
    """Return a local folder holding adapter_config.json + adapter weights for `source`."""
    from mlflow.exceptions import MlflowException

    uri = uri or tracking_uri()
    m = _MODELS.match(source)
    if m:
        c = client(uri)
        name = m["name"]
        try:
            mv = (c.get_model_version_by_alias(name, m["alias"]) if m["alias"]
                  else c.get_model_version(name, m["version"]))
        except MlflowException as exc:
            raise AdapterNotFoundError(f"{source!r} is not in the MLflow registry at {uri}: {exc.message}") from None
        target = subdir("adapters") / "mlflow" / name / str(mv.version)
        return _check_folder(_download(mv.source, target, uri), source)
    m = _RUNS.match(source)
    if m:
        c = client(uri)
        try:
            run = c.get_run(m["run"])
        except MlflowException as exc:
            raise AdapterNotFoundError(f"{source!r}: no such run at {uri}: {exc.message}") from None
        artifact = run.info.artifact_uri.rstrip("/") + "/" + m["path"].strip("/")
        target = subdir("adapters") / "runs" / m["run"] / m["path"].strip("/").replace("/", "_")
        try:
            return _check_folder(_download(artifact, target, uri), source)
        except MlflowException as exc:
            raise AdapterNotFoundError(f"{source!r}: {exc.message}") from None
    path = Path(source).expanduser()
    if not path.exists():
        raise AdapterNotFoundError(f"adapter {source!r} does not exist (use a folder, models:/name@alias, "
                                   "models:/name/version or runs:/<run_id>/adapter)")
    return _check_folder(path.resolve(), source)


def adapter_base_model(folder: str | Path) -> str | None:
    """base_model_name_or_path from a PEFT folder (our served name, an HF id or a folder)."""
    cfg = json.loads((Path(folder) / "adapter_config.json").read_text())
    return cfg.get("base_model_name_or_path")


def adapter_lineage(source: str, uri: str | None = None) -> dict | None:
    """Where a registry adapter came from: version, aliases, who registered it and when, its run, base model,
    datasets and final metrics. None for sources that are not `models:/...`."""
    m = _MODELS.match(source)
    if not m:
        return None
    uri = uri or tracking_uri()
    c = client(uri)
    name = m["name"]
    mv = c.get_model_version_by_alias(name, m["alias"]) if m["alias"] else c.get_model_version(name, m["version"])
    out = {"registered_model": name, "version": str(mv.version), "aliases": sorted(mv.aliases or []),
           "registered_by": mv.user_id or None, "registered_at": (mv.creation_timestamp or 0) / 1000 or None,
           "run_id": mv.run_id, "base_model": None, "dataset": None, "dataset_hash": None, "metrics": {}}
    if mv.run_id:
        run = c.get_run(mv.run_id)
        tags, params = run.data.tags, run.data.params
        out["base_model"] = tags.get("base_model") or params.get("base_model")
        out["dataset_hash"] = tags.get("dataset_hash")
        out["dataset"] = _dataset_names(params.get("datasets"))
        out["experiment_id"] = run.info.experiment_id
        out["registered_by"] = out["registered_by"] or tags.get("mlflow.user")
        out["metrics"] = {k: v for k, v in run.data.metrics.items()
                          if k.startswith("eval_") or k == "loss"}
    return out


def _dataset_names(param: str | None) -> str | None:
    """The `datasets` run param (a JSON list of {path, type}) as the file names, comma-separated."""
    if not param:
        return None
    try:
        specs = json.loads(param)
        return ", ".join(Path(d["path"]).name for d in specs if isinstance(d, dict) and d.get("path")) or None
    except (ValueError, TypeError, KeyError):
        return param
