"""The Ray Serve application: a FastAPI gateway, one LLM deployment per base model, an embeddings deployment.

    app = build_app(load_config("configs/serve.yaml"))
    serve.run(app, name="loraplex", route_prefix="/")

Each LLMServer replica owns one AsyncEngine; the gateway streams its deltas through
`handle.options(stream=True)` so tokens reach the client as they are generated, never buffered whole.
"""

from __future__ import annotations

import logging
import os
import re

from ray import serve

from serving.config import ModelSpec, ServeConfig

APP_NAME = "loraplex"
log = logging.getLogger("loraplex.app")


def _replica_id() -> str:
    try:
        return serve.get_replica_context().replica_id.unique_id
    except Exception:  # outside Serve (direct use in a test)
        return "local"


def _node_id() -> str | None:
    """The Ray node this replica runs on (which machine answered, in per-replica stats)."""
    try:
        import ray

        if not ray.is_initialized():  # a colocated replica outside Ray (tests): get_runtime_context would start one
            return None
        return ray.get_runtime_context().get_node_id()
    except Exception:  # outside Ray
        return None


def _replica_cpus() -> int:
    """The CPUs this process may run on. Ray sets OMP_NUM_THREADS=1 in every actor (num_cpus 1 by default), so a
    replica's torch would otherwise decode on one core while the machine has more."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


class ModelReplica:
    """One base model's engine and its replica API; adapters are served through the same engine (lora_name).
    LLMServer is its Ray Serve deployment; a colocated model's replica lives in the gateway (serving.api.local_model).
    """

    async def load(self, spec: dict, adapters: dict[str, dict] | None = None,
                   adapter_roots: list[str] | None = None) -> None:
        from serving.api.backend import ModelBackend
        from serving.engine import EngineConfig
        from serving.engine.async_engine import AsyncEngine

        self.spec = ModelSpec.model_validate(spec)
        kwargs = self.spec.engine_kwargs()
        kwargs["num_threads"] = kwargs["num_threads"] or _replica_cpus()
        engine = AsyncEngine(EngineConfig(**kwargs))
        self.replica = _replica_id()
        self.backend = ModelBackend(engine, self.spec.name, tool_call_parser=self.spec.tool_call_parser,
                                    replica=self.replica)
        self.roots = list(adapter_roots or [])
        # Config adapters first (not restricted to the roots), then those added at run time (registry).
        from serving.adapters import entry, read_registry

        startup = [(n, a["source"], a.get("force", False), False) for n, a in (adapters or {}).items()]
        startup += [(n, *entry(e), True) for n, e in read_registry().get(self.spec.name, {}).items()
                    if n not in (adapters or {})]
        for name, source, force, check in startup:
            try:
                await self.backend.add_adapter(name, source, check_roots=check, roots=self.roots, force=force)
            except Exception as exc:  # one bad adapter must not take the model down
                log.error("adapter %s of %s failed to load: %s", name, self.spec.name, exc)
        log.info("model %s loaded on replica %s (max_model_len %d)", self.spec.name, self.replica,
                 engine.max_model_len)

    async def ready(self) -> dict:
        return {"model": self.spec.name, "max_model_len": self.backend.engine.max_model_len,
                "replica": self.replica, **self.backend.identity_info()}

    async def models(self) -> list[dict]:
        return self.backend.model_cards()

    async def stats(self) -> dict:
        s = self.backend.stats()
        s["replica"], s["node"] = self.replica, _node_id()
        return s

    def record_routing_stats(self) -> dict:
        """What serving.replica_choice reads of this replica (Serve polls it every ROUTING_STATS_PERIOD_S)."""
        s = self.backend.engine.stats()
        return {"queue": s.get("num_running", 0) + s.get("num_waiting", 0),
                "adapters": [a["name"] for a in s.get("adapters", ()) if a.get("state") == "gpu"]}

    async def stream(self, req: dict):
        """Streaming: lists of items (serving.api.streaming.coalesce), first the accepted/error item, then engine
        deltas (see serving.api.backend)."""
        from serving.api.streaming import coalesce

        async for batch in coalesce(self._items(req)):
            yield batch

    async def _items(self, req: dict):
        adapter = req.get("adapter")
        if adapter and adapter not in self.backend.adapters:
            await self._sync_adapter(adapter)
        async for item in self.backend.stream(req):
            yield item

    async def _sync_adapter(self, name: str) -> None:
        """Another replica added this adapter through the API: load it here too (see serving.adapters)."""
        from serving.adapters import entry, read_registry

        found = read_registry().get(self.spec.name, {}).get(name)
        if found is not None:
            source, force = entry(found)
            try:
                await self.backend.add_adapter(name, source, roots=self.roots, force=force)
            except Exception as exc:
                log.warning("adapter %s from the registry failed to load: %s", name, exc)

    async def add_adapter(self, name: str, source: str, force: bool = False) -> dict:
        """Admin API: {"ok": True, "adapter": card} or {"ok": False, "error": OpenAI error dict}."""
        from serving.api.errors import APIError

        try:
            card = await self.backend.add_adapter(name, source, roots=self.roots, force=force)
            return {"ok": True, "adapter": card}
        except APIError as err:
            return {"ok": False, "error": err.to_dict()}

    async def remove_adapter(self, name: str) -> dict:
        from serving.api.errors import APIError

        try:
            await self.backend.remove_adapter(name)
            return {"ok": True}
        except APIError as err:
            return {"ok": False, "error": err.to_dict()}

    async def adapters(self) -> list[dict]:
        return self.backend.adapter_cards()

    def check_health(self) -> None:
        thread = getattr(self.backend.engine, "_thread", None)
        if thread is not None and not thread.is_alive():
            raise RuntimeError(f"the engine loop thread of {self.spec.name} died")

    def shutdown(self) -> None:
        try:
            self.backend.engine.shutdown()
        except Exception:
            pass


@serve.deployment(max_ongoing_requests=1024, health_check_period_s=10)
class LLMServer(ModelReplica):
    """A model's Ray Serve deployment: one engine per replica, reached from the gateway through handles."""

    async def __init__(self, spec: dict, adapters: dict[str, dict] | None = None,
                       adapter_roots: list[str] | None = None):
        await self.load(spec, adapters, adapter_roots)

    def __del__(self):
        self.shutdown()


@serve.deployment(max_ongoing_requests=64)
class EmbeddingServer:
    """Sentence embeddings (default all-MiniLM-L6-v2); a forward pass runs in a thread, off the event loop."""

    def __init__(self, source: str | None = None, name: str | None = None):
        from serving.embeddings import Embedder

        self.embedder = Embedder(source)
        self.name = name or self.embedder.name

    async def ready(self) -> dict:
        return {"model": self.name, "dim": self.embedder.dim}

    async def embed(self, texts: list[str]):
        import asyncio

        def work():
            return self.embedder.embed(texts), int(sum(self.embedder.count_tokens(texts)))

        return await asyncio.get_running_loop().run_in_executor(None, work)


@serve.deployment
@serve.ingress()
class Gateway:
    """The HTTP ingress: OpenAI routes, /health, /ready, /metrics. Holds handles to the model deployments."""

    async def __init__(self, config: dict, llm_handles: dict, embed_handle=None, rag_handle=None,
                       colocated: dict[str, tuple] | None = None):
        from serving.api.gateway import GatewayCore
        from serving.api.local_model import LocalHandle
        from serving.config import ServeConfig

        cfg = ServeConfig.model_validate(config)
        from serving.api.adapter_routes import build_router as adapter_router

        self.local: list[ModelReplica] = []
        llm_handles = dict(llm_handles)
        for name, args in (colocated or {}).items():  # models whose engine runs here (`colocate: true`)
            replica = ModelReplica()
            await replica.load(*args)
            self.local.append(replica)
            llm_handles[name] = LocalHandle(replica)
        self.core = GatewayCore(cfg, llm_handles, embed_handle, routers=_optional_routers(cfg, rag_handle),
                                rag_handle=rag_handle)
        self.core.extra_routers.append(adapter_router(self.core))
        if self.core.governance is not None:
            self.core.governance.instance = _replica_id()
        self.core.start()

    def __serve_build_asgi_app__(self):
        from serving.api.openai_routes import create_app

        return create_app(self.core)

    def check_health(self) -> None:
        for replica in self.local:
            replica.check_health()

    def __del__(self):
        for replica in getattr(self, "local", ()):
            replica.shutdown()


def _optional_routers(cfg: ServeConfig, rag_handle) -> list:
    """APIRouters of other areas: collections (RAG) over the Retriever deployment, and fine-tuning jobs."""
    routers = []
    if rag_handle is not None:
        from serving.rag.api import build_router

        routers.append(build_router(rag_handle))
    if cfg.fine_tuning.enabled and _installed("training.api"):
        from training.api import build_router
        from training.jobs import JobManager

        url = f"http://{cfg.server.host if cfg.server.host != '0.0.0.0' else '127.0.0.1'}:{cfg.server.port}"
        routers.append(build_router(JobManager(gateway_url=url)))
    return routers


def _installed(module: str) -> bool:
    import importlib.util

    try:
        return importlib.util.find_spec(module) is not None
    except ModuleNotFoundError:
        return False


def deployment_name(model: str) -> str:
    return "llm-" + re.sub(r"[^A-Za-z0-9_.-]", "-", model)


def _scaling(spec: ModelSpec) -> dict:
    if spec.autoscaling is not None:
        a = spec.autoscaling.model_dump(exclude_none=True)
        return {"autoscaling_config": a}
    return {"num_replicas": spec.num_replicas}


def _replica_choice(spec: ModelSpec):
    from ray.serve.config import RequestRouterConfig

    from serving.replica_choice import ROUTING_STATS_PERIOD_S, ReplicaChoice

    return RequestRouterConfig(request_router_class=ReplicaChoice, request_router_kwargs={
        "policy": spec.replica_choice}, request_routing_stats_period_s=ROUTING_STATS_PERIOD_S)


def build_app(config: ServeConfig):
    """The bound Ray Serve application for a validated config."""
    llm, colocated = {}, {}
    for spec in config.models:
        adapters = {a.name: {"source": a.source, "force": a.force} for a in config.adapters_for(spec.name)}
        if spec.colocate:
            colocated[spec.name] = (spec.model_dump(), adapters, config.adapter_roots)
            continue
        llm[spec.name] = LLMServer.options(
            name=deployment_name(spec.name),
            ray_actor_options=spec.ray_actor_options.to_ray(),
            max_ongoing_requests=spec.max_num_seqs + spec.max_waiting + 8,
            request_router_config=_replica_choice(spec),
            **_scaling(spec),
        ).bind(spec.model_dump(), adapters, config.adapter_roots)
    embed = None
    if config.embeddings.enabled:
        e = config.embeddings
        embed = EmbeddingServer.options(
            name="embeddings", num_replicas=e.num_replicas, ray_actor_options=e.ray_actor_options.to_ray(),
        ).bind(e.source, e.name)
    rag = None
    if config.rag.enabled and _installed("serving.rag.deployment"):
        from serving.rag.deployment import Retriever

        rag = Retriever.options(name="retriever", ray_actor_options=config.rag.ray_actor_options.to_ray()).bind()
    s = config.server
    return Gateway.options(
        name="gateway", num_replicas=s.num_replicas, ray_actor_options=_gateway_actor_options(config),
        max_ongoing_requests=4096,
    ).bind(_with_data_paths(config), llm, embed, rag, colocated)


def _gateway_actor_options(config: ServeConfig) -> dict:
    """The server's actor options, with each colocated model's on top (the engine's CPUs, GPUs, memory)."""
    options = config.server.ray_actor_options.to_ray()
    for spec in config.models:
        if spec.colocate:
            options.update(spec.ray_actor_options.to_ray())
    return options


def from_args(args: dict):
    """Ray Serve's application builder, for `serve run serving.app:from_args config=...` and a KubeRay RayService
    (deploy/rayservice.yaml): args {"config": path to a serve.yaml}; errors name the key, as `loraplex serve`'s."""
    from serving.config import ConfigError, load_config

    config = load_config(args.get("config"))
    if config.server.direct_ingress:  # `loraplex serve` sets it up; here Serve's own settings decide
        raise ConfigError("server.direct_ingress applies to `loraplex serve`; under `serve run` or a RayService, "
                          "set RAY_SERVE_ENABLE_DIRECT_INGRESS=1 (and its port range) on the nodes instead")
    return build_app(config)


def _with_data_paths(config: ServeConfig) -> dict:
    """The config for the gateway, its governance database, audit log and stored responses pinned to this
    process's data dir (a replica on another node must not fall back to its own $LORAPLEX_HOME)."""
    data = config.model_dump()
    gov = config.governance
    data["governance"]["database"] = str(gov.database_path())
    data["governance"]["audit"]["path"] = str(gov.audit_path())
    data["responses"]["database"] = config.responses.database_path()
    return data
