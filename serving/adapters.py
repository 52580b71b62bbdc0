"""Where served adapters come from: sources (local folders, MLflow URIs), allowed roots, the shared registry.

Adapters named in the serve config are loaded at start-up. Adapters added through `POST /v1/adapters` are
recorded in $LORAPLEX_HOME/adapters/registry.json (a restarted server finds them) and, inside a Ray cluster, in
the cluster's key-value store (Ray's GCS), so a replica on any node, also one started later, finds them: a
replica that meets an adapter it does not hold looks it up there and loads it. (The adapter's files must be
readable there too: an MLflow registry on a tracking server, or a folder on storage every node mounts.) Local
folders given through the API must lie inside the configured adapter roots (default: $LORAPLEX_HOME/adapters and
the local MLflow artifact store), so a client cannot make the server read arbitrary paths; config-file adapters
are the operator's choice and are not restricted.
"""

from __future__ import annotations

import json
import os
import tempfile
import threading
from pathlib import Path

from loraplex.paths import subdir
from serving.engine.errors import AdapterError

_lock = threading.Lock()


def default_roots() -> list[Path]:
    roots = [subdir("adapters")]
    try:
        from training.tracking import local_artifact_dir

        art = local_artifact_dir()
        if art:
            roots.append(art)
    except ImportError:  # training not installed: only the adapters folder
        pass
    return roots


def is_mlflow_uri(source: str) -> bool:
    return source.startswith(("models:/", "runs:/"))


def resolve_source(source: str, roots: list[str | Path] | None = None, check_roots: bool = True) -> Path:
    """A local PEFT folder for `source`: MLflow URIs are downloaded (cached); folders are checked against roots."""
    if not isinstance(source, str) or not source.strip():
        raise AdapterError("source must be a folder path or an MLflow URI", param="source")
    if is_mlflow_uri(source):
        try:
            from training.registry import resolve_adapter_uri

            return Path(resolve_adapter_uri(source))
        except AdapterError:
            raise
        except Exception as exc:  # unknown model/alias/run, unreachable tracking server
            raise AdapterError(f"cannot resolve {source!r} in MLflow: {exc}", param="source") from None
    path = Path(source).expanduser().resolve()
    if check_roots:
        allowed = [Path(r).expanduser().resolve() for r in (roots or default_roots())]
        if not any(path == r or r in path.parents for r in allowed):
            raise AdapterError(f"adapter path {source!r} is outside the allowed adapter roots "
                               f"({', '.join(str(r) for r in allowed)}); add a root in the serve config",
                               param="source", code="adapter_path_not_allowed")
    if not path.is_dir():
        raise AdapterError(f"adapter folder {source!r} does not exist", param="source")
    return path


def _registry_file() -> Path:
    return subdir("adapters") / "registry.json"


KV_KEY, KV_NAMESPACE = "adapter-registry", "loraplex"


def _cluster_kv():
    """Ray's cluster-wide key-value store when this process is part of a Ray cluster, else None."""
    try:
        import ray

        if not ray.is_initialized():
            return None
        from ray.experimental import internal_kv

        return internal_kv if internal_kv._internal_kv_initialized() else None
    except Exception:  # noqa: BLE001 - no Ray, or a Ray without the store: the file alone
        return None


def _read_file() -> dict[str, dict]:
    try:
        return json.loads(_registry_file().read_text())
    except (FileNotFoundError, json.JSONDecodeError):
        return {}


def read_registry() -> dict[str, dict]:
    """{base model: {adapter name: entry}} of adapters added at run time (the cluster's copy where there is
    one, else this machine's file); an entry is the source, or {"source", "force"} for one loaded with force."""
    kv = _cluster_kv()
    if kv is not None:
        raw = kv._internal_kv_get(KV_KEY, namespace=KV_NAMESPACE)
        if raw is not None:
            try:
                return json.loads(raw)
            except json.JSONDecodeError:
                pass
    return _read_file()


def publish_registry() -> None:
    """Give the cluster this machine's registry if it has none yet (a gateway starting on a new cluster)."""
    kv = _cluster_kv()
    if kv is not None and not kv._internal_kv_exists(KV_KEY, namespace=KV_NAMESPACE):
        kv._internal_kv_put(KV_KEY, json.dumps(_read_file()), overwrite=False, namespace=KV_NAMESPACE)


def _write_registry(data: dict) -> None:
    path = _registry_file()
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=".registry-")
    with os.fdopen(fd, "w") as f:
        json.dump(data, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)  # atomic: a crash leaves the old or the new registry, never half of one


def entry(value) -> tuple[str, bool]:
    """(source, force) of a registry entry."""
    if isinstance(value, dict):
        return str(value.get("source")), bool(value.get("force"))
    return str(value), False


def record(base: str, name: str, source: str | None, force: bool = False) -> None:
    """Add (source) or remove (None) a run-time adapter in the shared registry."""
    with _lock:
        data = read_registry()
        if source is None:
            data.get(base, {}).pop(name, None)
        else:
            data.setdefault(base, {})[name] = {"source": source, "force": True} if force else source
        _write_registry(data)
        kv = _cluster_kv()
        if kv is not None:
            kv._internal_kv_put(KV_KEY, json.dumps(data), overwrite=True, namespace=KV_NAMESPACE)
