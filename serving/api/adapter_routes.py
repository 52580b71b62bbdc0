"""Admin API for LoRA adapters, without restarting: POST/GET /v1/adapters, GET/DELETE /v1/adapters/{name}.

The gateway forwards to the base model's deployment, which resolves the source (local folder inside the
adapter roots, or an MLflow URI such as models:/support-bot@champion) and loads it off the request path;
success is recorded in the shared registry (serving.adapters) for the model's other replicas and restarts.
"""

from __future__ import annotations

import json
from pathlib import Path

from fastapi import APIRouter, Request

from serving.api.errors import APIError


def _base_from_adapter_config(source: str) -> str | None:
    try:
        return json.loads((Path(source).expanduser() / "adapter_config.json").read_text()).get("base_model_name_or_path")
    except (OSError, ValueError):
        return None


def build_router(core) -> APIRouter:
    """`core` is the GatewayCore; its deployments hold the handles, names and the adapter index."""
    router = APIRouter()
    deps = core.deployments

    def pick_base(body: dict, name: str) -> str:
        base = body.get("base") or body.get("model")
        if base is None:
            if len(deps.llm) == 1:
                return next(iter(deps.llm))
            declared = deps.canonical(_base_from_adapter_config(body["source"]) or "")
            if declared is not None:
                return declared
            raise APIError(400, f"say which base model adapter {name!r} is for: 'base' is one of "
                                f"{', '.join(deps.llm)}", param="base", code="missing_base")
        if not isinstance(base, str) or deps.canonical(base) is None:
            raise APIError(404, f"The model `{base}` does not exist.", param="base", code="model_not_found")
        return deps.canonical(base)

    @router.post("/v1/adapters")
    async def add_adapter(request: Request):
        from serving.adapters import record
        from serving.api.failover import replica_lost

        try:
            body = await request.json()
        except ValueError:
            raise APIError(400, "the body must be JSON: {\"name\": ..., \"source\": ...}", code="invalid_json")
        if not isinstance(body, dict):
            raise APIError(400, "the body must be a JSON object", code="invalid_request")
        for key in ("name", "source"):
            if not isinstance(body.get(key), str) or not body[key].strip():
                raise APIError(400, f"'{key}' is required and must be a non-empty string", param=key,
                               code="missing_field")
        name, source, force = body["name"], body["source"], body.get("force", False)
        if not isinstance(force, bool):
            raise APIError(400, "'force' must be true or false", param="force", code="invalid_type")
        if ":" in name or "/" in name or len(name) > 128:
            raise APIError(400, f"{name!r} is not a usable adapter name (no ':' or '/', at most 128 characters)",
                           param="name", code="invalid_value")
        base = pick_base(body, name)
        if deps.canonical(name) is not None or (name in deps.adapter_bases and deps.adapter_bases[name] != base):
            raise APIError(409, f"the name {name!r} is already in use", param="name", code="adapter_exists")
        deps.check_ready(base)
        # every running replica loads it before the answer (so no request for it 404s on another replica);
        # the registry then gives it to replicas that start later (restarts, autoscaling). A replica lost during
        # the call does not fail it: Serve replaces it, and the replacement loads the adapter from the registry.
        results = await deps.broadcast(base, "add_adapter", name, source, force)
        results = [r for r in results if not (isinstance(r, BaseException) and replica_lost(r))] or results
        if results and all(isinstance(r, dict) and _exists(r) for r in results):
            raise APIError.from_dict(results[0]["error"])  # loaded everywhere already: the name is in use
        loaded = [r for r in results if isinstance(r, dict) and (r["ok"] or _exists(r))]
        if not results or len(loaded) < len(results):
            await deps.broadcast(base, "remove_adapter", name)  # all or nothing
            bad = next((r for r in results if r not in loaded), None)
            if isinstance(bad, dict):
                raise APIError.from_dict(bad["error"])
            why = (replica_lost(bad) or str(bad)) if bad is not None else "no replica answered"
            raise APIError(503, f"not every replica of `{base}` could load the adapter ({why}); "
                                "nothing was loaded", type="server_error", code="adapter_not_loaded", retry_after=5)
        record(base, name, source, force)
        deps.adapter_bases[name] = base
        cards = [r["adapter"] for r in loaded if r["ok"]] or await deps.llm[base].adapters.remote()
        return next(c for c in cards if c["name"] == name)

    @router.get("/v1/adapters")
    async def list_adapters():
        cards = []
        for base, handle in deps.llm.items():
            if base in deps.ready:
                cards.extend(await handle.adapters.remote())
        return {"object": "list", "data": cards}

    @router.get("/v1/adapters/{name}")
    async def get_adapter(name: str):
        for card in (await list_adapters())["data"]:
            if card["name"] == name or card["id"] == name:
                return card
        raise APIError(404, f"no adapter named {name!r}", param="name", code="adapter_not_found")

    @router.delete("/v1/adapters/{name}")
    async def delete_adapter(name: str):
        from serving.adapters import read_registry, record

        base, _, adapter = name.rpartition(":")
        adapter = adapter or name
        base = base or deps.adapter_bases.get(adapter)
        if base not in deps.llm:
            raise APIError(404, f"no adapter named {name!r}", param="name", code="adapter_not_found")
        results = [r for r in await deps.broadcast(base, "remove_adapter", adapter) if isinstance(r, dict)]
        stale = adapter in read_registry().get(base, {})  # recorded, but no replica could load it (files gone)
        if not any(r["ok"] for r in results) and not stale:
            raise APIError.from_dict(results[0]["error"]) if results else APIError(
                503, f"no replica of `{base}` answered", type="server_error", retry_after=5)
        record(base, adapter, None)
        deps.adapter_bases.pop(adapter, None)
        return {"id": f"{base}:{adapter}", "object": "adapter", "deleted": True}

    return router


def _exists(result: dict) -> bool:
    """A replica that already holds the adapter (it loaded it from the registry on demand): loaded there."""
    return not result["ok"] and result["error"].get("code") == "adapter_exists"
