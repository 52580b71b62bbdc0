"""Routing policies: each orders the eligible candidates' predictions, best first (the rest are fallbacks).

Ties keep the config's candidate order (sorts are stable), so a route's listing order is the last tie-break.
"""

from __future__ import annotations

from serving.router.config import SLO, Weights
from serving.router.predict import Prediction


def meets_slo(p: Prediction, slo: SLO) -> bool:
    """Inclusive: a prediction exactly at the objective meets it."""
    if slo.ttft_ms is not None and p.ttft_s * 1000 > slo.ttft_ms:
        return False
    if slo.e2e_ms is not None and p.e2e_s * 1000 > slo.e2e_ms:
        return False
    return True


def cheapest(preds: list[Prediction]) -> list[tuple[Prediction, str]]:
    ranked = sorted(preds, key=lambda p: (p.cost_usd, p.e2e_s))
    return [(p, f"cost ${p.cost_usd:.3g}") for p in ranked]


def fastest(preds: list[Prediction]) -> list[tuple[Prediction, str]]:
    ranked = sorted(preds, key=lambda p: (p.e2e_s, p.cost_usd))
    return [(p, f"e2e {p.e2e_s * 1000:.0f} ms") for p in ranked]


def _minmax(values: list[float]) -> list[float]:
    lo, hi = min(values), max(values)
    return [0.0 if hi == lo else (v - lo) / (hi - lo) for v in values]


def balanced_scores(preds: list[Prediction], weights: Weights) -> list[float]:
    """Lower is better: weighted sum of cost, latency and (1 - quality), each min-max scaled over candidates."""
    cost = _minmax([p.cost_usd for p in preds])
    lat = _minmax([p.e2e_s for p in preds])
    qual = _minmax([p.quality for p in preds])
    total = weights.cost + weights.latency + weights.quality
    return [
        (weights.cost * c + weights.latency * l + weights.quality * (1 - q)) / total
        for c, l, q in zip(cost, lat, qual)
    ]


def balanced(preds: list[Prediction], weights: Weights) -> list[tuple[Prediction, str]]:
    scores = balanced_scores(preds, weights)
    ranked = sorted(zip(preds, scores), key=lambda ps: (ps[1], ps[0].cost_usd, ps[0].e2e_s))
    return [(p, f"score {s:.3f}") for p, s in ranked]


def slo_bound(preds: list[Prediction], slo: SLO) -> list[tuple[Prediction, str]]:
    """Cheapest among candidates predicted to meet the SLO; then, as best effort, the rest fastest first."""
    meeting = [p for p in preds if meets_slo(p, slo)]
    missing = [p for p in preds if not meets_slo(p, slo)]
    out = [(p, f"meets SLO, cost ${p.cost_usd:.3g}") for p, _ in cheapest(meeting)]
    out += [(p, f"misses SLO (best effort), e2e {p.e2e_s * 1000:.0f} ms") for p, _ in fastest(missing)]
    return out


def order(
    policy: str, preds: list[Prediction], *, slo: SLO | None = None, weights: Weights | None = None
) -> list[tuple[Prediction, str]]:
    if not preds:
        return []
    if policy == "cheapest":
        return cheapest(preds)
    if policy == "fastest":
        return fastest(preds)
    if policy == "balanced":
        return balanced(preds, weights or Weights())
    if policy == "slo":
        if slo is None:
            raise ValueError("the slo policy needs an SLO")
        return slo_bound(preds, slo)
    raise ValueError(f"unknown policy {policy!r}")
