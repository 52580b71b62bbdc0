"""Prometheus metrics served at /metrics, labelled by model and adapter.

Request-level figures (latencies, tokens, statuses) are recorded in the gateway, which sees every streamed
chunk; engine gauges (running, waiting, KV usage) are read from each model deployment at scrape time.
"""

from __future__ import annotations

from prometheus_client import CollectorRegistry, disable_created_metrics, Counter, Gauge, Histogram, generate_latest
from prometheus_client.exposition import CONTENT_TYPE_LATEST

_LAT = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80)
_ITL = (0.001, 0.0025, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.15, 0.2, 0.3, 0.5, 1, 2.5)
_E2E = (0.1, 0.25, 0.5, 1, 2.5, 5, 10, 20, 40, 80, 160, 320)

CONTENT_TYPE = CONTENT_TYPE_LATEST
disable_created_metrics()  # no *_created series: they double the output and nobody graphs them


class Metrics:
    def __init__(self):
        self.registry = r = CollectorRegistry()
        ma = ["model", "adapter"]
        self.requests = Counter("loraplex_requests", "Finished API requests by endpoint and HTTP status",
                                ma + ["endpoint", "status"], registry=r)
        self.ttft = Histogram("loraplex_time_to_first_token_seconds", "Time to first token", ma,
                              buckets=_LAT, registry=r)
        self.itl = Histogram("loraplex_inter_token_latency_seconds", "Time between output tokens", ma,
                             buckets=_ITL, registry=r)
        self.e2e = Histogram("loraplex_e2e_request_latency_seconds", "End-to-end request latency", ma,
                             buckets=_E2E, registry=r)
        self.queue = Histogram("loraplex_request_queue_time_seconds", "Time a request waited before it ran",
                               ma, buckets=_LAT, registry=r)
        self.prompt_tokens = Counter("loraplex_prompt_tokens", "Prompt tokens processed", ma, registry=r)
        self.generation_tokens = Counter("loraplex_generation_tokens", "Tokens generated", ma, registry=r)
        self.in_flight = Gauge("loraplex_requests_in_flight", "Requests the gateway is serving now", ma,
                               registry=r)
        self.running = Gauge("loraplex_num_requests_running", "Requests running in the engines", ["model"],
                             registry=r)
        self.waiting = Gauge("loraplex_num_requests_waiting", "Requests waiting in the engines' queues",
                             ["model"], registry=r)
        self.kv_usage = Gauge("loraplex_kv_cache_usage_ratio", "Fraction of KV-cache blocks in use (0..1)",
                              ["model"], registry=r)
        self.kv_total = Gauge("loraplex_kv_blocks_total", "KV-cache blocks", ["model"], registry=r)
        self.kv_free = Gauge("loraplex_kv_blocks_free", "Free KV-cache blocks", ["model"], registry=r)
        self.replicas = Gauge("loraplex_model_replicas_reporting", "Replicas whose stats were read",
                              ["model"], registry=r)
        self.adapter_resident = Gauge("loraplex_adapter_resident_replicas",
                                      "Replicas holding the adapter, by residency (gpu: in a device slot, "
                                      "cpu: in host memory)", ["model", "adapter", "state"], registry=r)
        self._resident_keys: dict[str, set] = {}
        self.adapter_load = Gauge("loraplex_adapter_load_seconds", "Time the adapter took to load",
                                  ["model", "adapter"], registry=r)
        self.adapter_tokens = Gauge("loraplex_adapter_engine_tokens", "Tokens the engines computed with the "
                                    "adapter (prompt and generated), summed over replicas", ["model", "adapter"],
                                    registry=r)
        self.failovers = Counter("loraplex_failovers", "Requests moved to another replica when theirs was lost or "
                                 "full (when: before_first_token, mid_stream)", ["model", "when"], registry=r)
        self.embedding_tokens = Counter("loraplex_embedding_input_tokens", "Tokens embedded", ["model"],
                                        registry=r)

    @staticmethod
    def labels(model: str, adapter: str | None) -> dict:
        return {"model": model, "adapter": adapter or ""}

    def set_engine_stats(self, model: str, stats: list[dict]) -> None:
        """Sum the stats of a model's replicas (one dict each) into the gauges."""
        def total(key):
            return sum(float(s.get(key) or 0) for s in stats)

        self.running.labels(model).set(total("num_running"))
        self.waiting.labels(model).set(total("num_waiting"))
        blocks, free = total("kv_blocks_total"), total("kv_blocks_free")
        self.kv_total.labels(model).set(blocks)
        self.kv_free.labels(model).set(free)
        self.kv_usage.labels(model).set((blocks - free) / blocks if blocks else 0.0)
        self.replicas.labels(model).set(len(stats))
        per: dict[tuple[str, str], float] = {}
        for s in stats:
            for a in s.get("adapters") or []:
                key = (a["name"], a["state"])
                per[key] = per.get(key, 0) + 1
                if a.get("load_time_s") is not None:
                    self.adapter_load.labels(model, a["name"]).set(a["load_time_s"])
        for name, state in self._resident_keys.get(model, set()) - set(per):
            self.adapter_resident.remove(model, name, state)  # moved or unloaded since the last scrape
        self._resident_keys[model] = set(per)
        for (name, state), n in per.items():
            self.adapter_resident.labels(model, name, state).set(n)
        for name in {a["name"] for s in stats for a in (s.get("adapters") or [])}:
            self.adapter_tokens.labels(model, name).set(
                sum(a.get("tokens", 0) for s in stats for a in (s.get("adapters") or []) if a["name"] == name))

    def render(self) -> bytes:
        return generate_latest(self.registry)
