"""The gateway's composition root: the deployments, the policies that are on, and the one request pipeline.

    GatewayCore(config, llm_handles, embed_handle, routers, rag_handle)

builds serving.api.deployments.Deployments (handles, readiness, names, engine stats), the governance and router
glue when the config turns them on, and serving.api.pipeline.Pipeline over them. The endpoint modules
(serving.api.chat, .completions, .responses, .embeddings, .models) take the core; openai_routes mounts them.
"""

from __future__ import annotations

import asyncio
import logging

from serving.api import governed
from serving.api.deployments import Deployments
from serving.api.metrics import Metrics
from serving.api.pipeline import Pipeline

log = logging.getLogger("loraplex.gateway")


class GatewayCore:
    def __init__(self, config, llm_handles: dict, embed_handle=None, routers: list | None = None,
                 rag_handle=None):
        self.config = config
        self.deployments = Deployments(config, llm_handles, embed_handle, rag_handle)
        self.metrics = Metrics()
        self.extra_routers = routers or []
        self.governance = governed.build_governance(config, self.metrics.registry)
        self.routing = None
        if config.routes:
            from serving.api.routing import GatewayRouter

            self.routing = GatewayRouter(self.deployments, config, registry=self.metrics.registry)
        self.pipeline = Pipeline(self.deployments, self.metrics, self.governance, self.routing)
        self.store = None  # serving.api.response_store.ResponseStore, opened by the responses endpoint
        self._tasks: list[asyncio.Task] = []

    def start(self) -> None:
        """Wait for the deployments in the background; with routes, poll engine stats for the router too."""
        self._tasks += self.deployments.start()
        if self.routing is not None:
            self._tasks.append(asyncio.ensure_future(self.deployments.poll_stats(self.routing.observe_stats)))

    async def refresh_stats(self) -> None:
        """Fresh engine stats into the /metrics gauges (the router's poll keeps them fresh already)."""
        if self.routing is None:
            await self.deployments.refresh_stats()
        for name, per in self.deployments.stats.items():
            if per:
                self.metrics.set_engine_stats(name, list(per.values()))
