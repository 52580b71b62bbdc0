"""Prometheus counters of routing decisions, fallbacks and unavailable routes (exposed by the gateway's /metrics).

One RouterMetrics per registry (created on first use and shared), since a registry refuses a metric name twice;
tests pass their own CollectorRegistry.
"""

from __future__ import annotations

import threading

from prometheus_client import REGISTRY, CollectorRegistry, Counter

_lock = threading.Lock()
_by_registry: dict[int, tuple[CollectorRegistry, "RouterMetrics"]] = {}


class RouterMetrics:
    def __init__(self, registry: CollectorRegistry):
        self.registry = registry
        self.decisions = Counter(
            "loraplex_route_decisions",
            "Routing decisions, by route, policy and chosen model",
            ["route", "policy", "model"],
            registry=registry,
        )
        self.slo_unmet = Counter(
            "loraplex_route_slo_unmet",
            "SLO-bound decisions where no candidate was predicted to meet the SLO",
            ["route"],
            registry=registry,
        )
        self.fallbacks = Counter(
            "loraplex_route_fallbacks",
            "Candidates that failed a request and were passed over for the next, by reason",
            ["route", "model", "reason"],
            registry=registry,
        )
        self.served = Counter(
            "loraplex_route_served",
            "Requests answered through a route, by the model that answered",
            ["route", "model"],
            registry=registry,
        )
        self.unavailable = Counter(
            "loraplex_route_unavailable",
            "Requests answered 503 because no candidate of the route could serve them",
            ["route"],
            registry=registry,
        )

    @classmethod
    def for_registry(cls, registry: CollectorRegistry | None = None) -> RouterMetrics:
        registry = REGISTRY if registry is None else registry
        with _lock:
            hit = _by_registry.get(id(registry))
            if hit is None or hit[0] is not registry:
                hit = _by_registry[id(registry)] = (registry, cls(registry))
            return hit[1]
