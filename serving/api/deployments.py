"""The gateway's model deployments: handles, readiness, names, live engine stats, and opening replica streams.

One place knows which deployments exist and which have loaded, what every name of a base model is (API name,
repo id, aliases, adapters), and what each replica's engine reported last: /metrics and the router both read
these stats from here, polled once. Ray-agnostic apart from the handle calls
(`handle.options(stream=True).stream.remote(req)`, `await handle.<method>.remote()`), so a test can pass
plain objects with the same methods.
"""

from __future__ import annotations

import asyncio
import logging
import time

from serving.api.errors import APIError, not_found_model
from serving.api.protocol import split_model
from serving.api.failover import open_with_failover
from serving.api.streaming import cancel_stream

log = logging.getLogger("loraplex.gateway")
STATS_INTERVAL_S = 1.0  # the poll's period while a router reads the stats


class Deployments:
    def __init__(self, config, llm_handles: dict, embed_handle=None, rag_handle=None):
        self.config = config
        self.llm = dict(llm_handles)
        self.embed = embed_handle
        self.embed_name = config.embeddings.name if (embed_handle is not None and config.embeddings.enabled) else None
        self.embed_info: dict | None = None
        self.rag = rag_handle
        self.created = int(time.time())  # `created` of cards the gateway writes itself (OpenAI's Model.created)
        self.ready: set[str] = set()
        self.context: dict[str, int] = {}  # max_model_len each loaded model reported
        self.stats: dict[str, dict[str, dict]] = {name: {} for name in self.llm}  # model -> replica -> stats
        self.on_context = []  # callbacks(context) when a model reports its context length (routes)
        # every name of a base model (API name, repo id, aliases; lower-cased) -> its API name
        self.identities: dict[str, str] = {}
        for m in config.models:
            self.learn_names(m.name, m.identity().names())
        from serving.adapters import publish_registry, read_registry

        publish_registry()
        # adapter name -> base model, so `model: "<adapter>"` works without the base prefix
        self.adapter_bases = {a.name: a.base for a in config.adapters}
        for base, names in read_registry().items():
            if base in self.llm:
                self.adapter_bases.update({n: base for n in names})

    # ---- readiness ------------------------------------------------------------------------------
    def start(self) -> list[asyncio.Task]:
        """Wait (in the background) for each deployment's first replica to load its model."""
        tasks = [asyncio.ensure_future(self._wait_ready(name, h)) for name, h in self.llm.items()]
        if self.embed is not None:
            tasks.append(asyncio.ensure_future(self._wait_ready(self.embed_name, self.embed)))
        return tasks

    async def _wait_ready(self, name: str, handle) -> None:
        while True:
            try:
                info = await handle.ready.remote()
                if name == self.embed_name:
                    self.embed_info = info
                elif isinstance(info, dict) and info.get("max_model_len"):
                    self.context[name] = int(info["max_model_len"])
                    self.learn_names(name, [info.get("hf_id"), *(info.get("aliases") or [])])
                    for callback in self.on_context:
                        callback(self.context)
                self.ready.add(name)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a replica failing to start: keep waiting, Serve restarts it
                log.warning("model %s not ready yet: %s", name, exc)
                await asyncio.sleep(2.0)

    def all_names(self) -> list[str]:
        return list(self.llm) + ([self.embed_name] if self.embed_name else [])

    def check_ready(self, name: str) -> None:
        if name not in self.ready:
            raise APIError(503, f"The model `{name}` is still loading; try again shortly.",
                           code="model_not_ready", retry_after=5)

    async def readiness(self) -> dict:
        missing = [n for n in self.all_names() if n not in self.ready]
        if missing:
            raise APIError(503, f"Not ready: still loading {', '.join(missing)}.", code="not_ready",
                           retry_after=5)
        out = {"status": "ready", "models": self.all_names()}
        replicas = await asyncio.to_thread(self.running_replicas)
        if replicas:
            out["replicas"] = replicas
        return out

    def running_replicas(self) -> dict[str, int]:
        """Running replicas per model, as Serve's controller counts them ({} outside a Serve application)."""
        import ray

        if not ray.is_initialized():  # serve.status() would start a Ray instance
            return {}
        try:
            from ray import serve

            from serving.app import APP_NAME, deployment_name

            deps = serve.status().applications[APP_NAME].deployments
            return {m: int(deps[deployment_name(m)].replica_states.get("RUNNING", 0)) for m in self.llm
                    if deployment_name(m) in deps}
        except Exception:  # no Serve controller here (in-process tests): nothing to count
            return {}

    # ---- names ----------------------------------------------------------------------------------
    def learn_names(self, base: str, names) -> None:
        """Accept these names (a repo id, aliases) for `base` in requests; a name another model holds stays its."""
        for n in names:
            if n:
                self.identities.setdefault(n.lower(), base)

    def canonical(self, name: str) -> str | None:
        """The API name of the base model that `name` (its name, repo id or an alias) denotes, or None."""
        return name if name in self.llm else self.identities.get(name.lower())

    def split(self, model: str) -> tuple[str, str | None]:
        """'base:adapter', 'base' or a bare adapter name -> (base, adapter), without checks; the base may be
        given by any of its names (repo id in any letter case, alias)."""
        base, adapter = split_model(model)
        canon = self.canonical(base)
        if canon is not None:
            return canon, adapter
        if adapter is None and base in self.adapter_bases:
            return self.adapter_bases[base], base
        return base, adapter

    def resolve(self, model: str, routes=()) -> tuple[str, str | None]:
        base, adapter = self.split(model)
        if base not in self.llm:
            raise not_found_model(model, list(self.llm) + list(routes))
        self.check_ready(base)
        return base, adapter

    # ---- replica streams ------------------------------------------------------------------------
    async def open(self, base: str, req: dict, failovers: list | None = None):
        """Start a replica stream and wait for its first item: accepted (go on) or error (raise). The stream
        fails over to another replica when its own is lost (serving.api.failover); `failovers` records it."""
        handle = self.llm[base]
        return await open_with_failover(lambda r: handle.options(stream=True).stream.remote(r), base, req,
                                        failovers)

    async def open_many(self, base: str, reqs: list[dict], failovers: list | None = None):
        results = await asyncio.gather(*(self.open(base, r, failovers) for r in reqs), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            for r in results:
                if not isinstance(r, BaseException):
                    cancel_stream(r[1])
            raise errors[0]
        return results

    # ---- engine stats ---------------------------------------------------------------------------
    async def refresh_stats(self) -> None:
        """Read engine stats from every running replica of each loaded model (one broadcast per model)."""
        async def one(name):
            results = await self.broadcast(name, "stats", timeout_s=2.0)
            per = {}
            for s in results:
                if isinstance(s, BaseException):
                    continue
                s = dict(s)
                s.setdefault("max_num_seqs", self.config.model(name).max_num_seqs)  # slots per replica
                per[s.get("replica", "?")] = s
            if per or not results:
                self.stats[name] = per

        await asyncio.gather(*(one(n) for n in self.llm if n in self.ready))

    async def broadcast(self, base: str, method: str, *args, timeout_s: float = 60.0) -> list:
        """`method(*args)` on every running replica of `base` (Serve's handle.broadcast); a replica's exception
        is its result, and a timeout gives []."""
        try:
            resp = self.llm[base].broadcast(method, *args)
            return list(await resp.results_async(timeout_s=timeout_s, return_exceptions=True))
        except (TimeoutError, asyncio.TimeoutError):
            log.warning("%s.%s did not answer from every replica in %.0fs", base, method, timeout_s)
            return []

    async def poll_stats(self, on_stats) -> None:
        """Refresh the stats every STATS_INTERVAL_S and hand each model's replicas to `on_stats(name, list)`."""
        while True:
            await self.refresh_stats()
            for name, per in self.stats.items():
                if per:
                    on_stats(name, list(per.values()))
            await asyncio.sleep(STATS_INTERVAL_S)

    # ---- listings -------------------------------------------------------------------------------
    async def model_cards(self) -> list[dict]:
        """Models and their adapters (from the loaded replicas), still-loading models, the embedding model."""
        cards: list[dict] = []
        names = [n for n in self.llm if n in self.ready]
        results = await asyncio.gather(*(self.llm[n].models.remote() for n in names), return_exceptions=True)
        for name, res in zip(names, results):
            if isinstance(res, BaseException):
                log.warning("listing models of %s failed: %s", name, res)
                continue
            cards.extend(res)
        for name in self.llm:
            if name not in self.ready:  # still loading: listed, without details
                cards.append({"id": name, "object": "model", "created": self.created, "owned_by": "loraplex",
                              "root": name, "parent": None})
        if self.embed_name:
            cards.append({"id": self.embed_name, "object": "model", "created": self.created, "owned_by": "loraplex",
                          "root": self.embed_name, "parent": None, "type": "embedding",
                          "dim": (self.embed_info or {}).get("dim")})
        return cards
