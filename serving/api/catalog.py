"""GET /v1/catalog and GET /v1/operations: what the portal's catalog and operations views show, as JSON.

Both read the same numbers /metrics exports (the gateway's histograms and the engines' gauges) and filter
them by the caller's allow-lists, so a key sees live figures only for what it may use. Quantiles come from
the histogram buckets by linear interpolation inside the bucket, as Prometheus' histogram_quantile does.
"""

from __future__ import annotations

import logging
import time

from serving.api import governed
from serving.api.models import list_models

log = logging.getLogger("loraplex.catalog")
_LINEAGE_TTL_S = 30.0
_lineage_cache: dict[str, tuple[float, dict | None]] = {}


def histogram_quantile(buckets: list[tuple[float, float]], q: float) -> float | None:
    """`buckets`: (upper bound, cumulative count) sorted by bound, +Inf last. None when nothing was counted."""
    if not buckets or buckets[-1][1] <= 0:
        return None
    rank = q * buckets[-1][1]
    lower, below = 0.0, 0.0
    for bound, count in buckets:
        if count >= rank:
            if bound == float("inf"):
                return lower  # beyond the last finite bucket: its bound is what can be said
            span = count - below
            return lower + (bound - lower) * ((rank - below) / span if span else 1.0)
        lower, below = bound, count
    return lower


def _histograms(hist) -> dict[tuple[str, str], dict]:
    """(model, adapter) -> {"p50", "p99", "count", "mean"} in milliseconds, from a prometheus Histogram."""
    raw: dict[tuple[str, str], dict] = {}
    for metric in hist.collect():
        for s in metric.samples:
            key = (s.labels.get("model", ""), s.labels.get("adapter", ""))
            entry = raw.setdefault(key, {"buckets": [], "count": 0.0, "sum": 0.0})
            if s.name.endswith("_bucket"):
                entry["buckets"].append((float(s.labels["le"]), s.value))
            elif s.name.endswith("_count"):
                entry["count"] = s.value
            elif s.name.endswith("_sum"):
                entry["sum"] = s.value
    out = {}
    for key, e in raw.items():
        b = sorted(e["buckets"])
        p50, p99 = histogram_quantile(b, 0.5), histogram_quantile(b, 0.99)
        out[key] = {"count": int(e["count"]), "p50_ms": None if p50 is None else p50 * 1000,
                    "p99_ms": None if p99 is None else p99 * 1000,
                    "mean_ms": e["sum"] / e["count"] * 1000 if e["count"] else None}
    return out


def _requests(counter) -> dict[tuple[str, str], dict]:
    out: dict[tuple[str, str], dict] = {}
    for metric in counter.collect():
        for s in metric.samples:
            if not s.name.endswith("_total"):
                continue
            key = (s.labels.get("model", ""), s.labels.get("adapter", ""))
            e = out.setdefault(key, {"requests": 0, "errors": 0})
            e["requests"] += int(s.value)
            if not str(s.labels.get("status", "200")).startswith("2"):
                e["errors"] += int(s.value)
    return out


def _model_allowed(principal, model: str, adapter: str) -> bool:
    if principal is None:
        return True
    return governed.allows(principal, model, adapter) if adapter else principal.allows("models", model)


async def operations(core, http=None) -> dict:
    """Per model: replicas, queue, KV use, prefix-cache hit rate, adapter residency; per model and adapter:
    requests, errors, TTFT / inter-token / end-to-end latency p50 and p99 (ms), since the gateway started."""
    await core.refresh_stats()
    principal = governed.principal_of(http)
    m = core.metrics
    ttft, itl, e2e, reqs = _histograms(m.ttft), _histograms(m.itl), _histograms(m.e2e), _requests(m.requests)
    models = []
    for name, per in core.deployments.stats.items():
        if not _model_allowed(principal, name, ""):
            continue
        replicas = list(per.values())
        queries = sum(s.get("prefix_cache_queries") or 0 for s in replicas)
        hits = sum(s.get("prefix_cache_hits") or 0 for s in replicas)
        blocks = sum(s.get("kv_blocks_total") or 0 for s in replicas)
        free = sum(s.get("kv_blocks_free") or 0 for s in replicas)
        residency: dict[str, dict[str, int]] = {}
        for s in replicas:
            for a in s.get("adapters") or []:
                if _model_allowed(principal, name, a["name"]):
                    slot = residency.setdefault(a["name"], {"gpu": 0, "cpu": 0})
                    slot[a["state"]] = slot.get(a["state"], 0) + 1
        models.append({
            "model": name, "ready": name in core.deployments.ready, "replicas": len(replicas),
            "running": sum(s.get("num_running") or 0 for s in replicas),
            "waiting": sum(s.get("num_waiting") or 0 for s in replicas),
            "max_num_seqs": sum(s.get("max_num_seqs") or 0 for s in replicas),
            "kv_cache_usage": (blocks - free) / blocks if blocks else 0.0,
            "prefix_cache_hit_rate": hits / queries if queries else None,
            "preemptions": sum(s.get("num_preemptions") or 0 for s in replicas),
            "adapters": [{"name": k, **v} for k, v in sorted(residency.items())],
            "per_replica": [{"replica": r, "node": s.get("node"), "running": s.get("num_running"),
                             "waiting": s.get("num_waiting"), "kv_cache_usage": s.get("kv_usage")}
                            for r, s in sorted(per.items())],
        })
    keys = sorted(set(ttft) | set(reqs) | set(itl))
    latency = []
    for model, adapter in keys:
        if not _model_allowed(principal, model, adapter):
            continue
        latency.append({"model": model, "adapter": adapter or None, **reqs.get((model, adapter),
                                                                                {"requests": 0, "errors": 0}),
                        "ttft": ttft.get((model, adapter)), "itl": itl.get((model, adapter)),
                        "e2e": e2e.get((model, adapter))})
    return {"object": "operations", "time": time.time(), "models": models, "latency": latency}


async def catalog(core, http=None) -> dict:
    """Models, adapters and routes the caller may use, with context length, the price the gateway charges per
    1M tokens, live latency and queue figures, residency, and for registry adapters their MLflow lineage."""
    cards = (await list_models(core, http))["data"]
    ops = await operations(core, http)
    by_model = {m["model"]: m for m in ops["models"]}
    lat = {(row["model"], row["adapter"] or ""): row for row in ops["latency"]}
    out = []
    for card in cards:
        kind = card.get("type") or ("adapter" if card.get("parent") else "model")
        entry = {"id": card["id"], "kind": kind, "root": card.get("root"), "parent": card.get("parent"),
                 "max_model_len": card.get("max_model_len"), "aliases": card.get("aliases") or []}
        if kind == "route":
            entry.update(policy=card.get("policy"), candidates=card.get("candidates"))
        if kind == "embedding":
            entry["dim"] = card.get("dim")
        if kind in ("model", "adapter"):
            base = card.get("parent") or card["id"]
            adapter = card["id"].partition(":")[2] if card.get("parent") else ""
            price = core.config.price_of(base) if _configured(core, base) else None
            entry["price"] = {"input_per_1m": price.input_per_1m, "output_per_1m": price.output_per_1m} \
                if price is not None else None
            live = by_model.get(base, {})
            entry["live"] = {"replicas": live.get("replicas"), "running": live.get("running"),
                             "waiting": live.get("waiting"), "kv_cache_usage": live.get("kv_cache_usage"),
                             **_latency_figures(lat.get((base, adapter)))}
            if adapter:
                res = next((a for a in live.get("adapters", []) if a["name"] == adapter), None)
                entry["residency"] = res or {"gpu": 0, "cpu": 0}
                entry["lineage"] = lineage(card.get("root") or "")
        out.append(entry)
    return {"object": "list", "data": out}


def _configured(core, name: str) -> bool:
    return any(m.name == name for m in core.config.models)


def _latency_figures(row: dict | None) -> dict:
    row = row or {}
    return {"requests": row.get("requests", 0), "ttft_p50_ms": (row.get("ttft") or {}).get("p50_ms"),
            "ttft_p99_ms": (row.get("ttft") or {}).get("p99_ms"), "itl_p50_ms": (row.get("itl") or {}).get("p50_ms"),
            "itl_p99_ms": (row.get("itl") or {}).get("p99_ms")}


def lineage(source: str) -> dict | None:
    """MLflow lineage of a `models:/name@alias` or `models:/name/version` adapter source (cached briefly);
    None for folders and Hub ids, or when the registry cannot be read."""
    if not source.startswith("models:/"):
        return None
    hit = _lineage_cache.get(source)
    if hit is not None and time.monotonic() - hit[0] < _LINEAGE_TTL_S:
        return hit[1]
    try:
        from training.registry import adapter_lineage

        info = adapter_lineage(source)
    except Exception as exc:  # the catalog still lists the adapter; lineage says why it is missing
        log.warning("lineage of %s: %s", source, exc)
        info = {"error": f"the MLflow registry could not be read: {exc}"}
    _lineage_cache[source] = (time.monotonic(), info)
    return info
