"""Per-request routing overrides (headers or body fields) and the transparency response headers.

Request:  X-Route-Policy: cheapest|fastest|balanced|slo      (body: "route_policy")
          X-Latency-SLO-Ms: 2000  or  ttft=300,e2e=2000      (body: "route_slo_ms": number, string or object)
          X-Route-Min-Quality: 0.7                           (body: "route_min_quality")
A header wins over the body field. Response: X-Routed-Model, X-Route-Decision.
"""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Mapping

from pydantic import ValidationError

from serving.router.config import POLICIES, SLO
from serving.router.errors import RouteRequestError
from serving.router.policies import meets_slo

POLICY_HEADER = "X-Route-Policy"
SLO_HEADER = "X-Latency-SLO-Ms"
QUALITY_HEADER = "X-Route-Min-Quality"
ROUTED_MODEL_HEADER = "X-Routed-Model"
DECISION_HEADER = "X-Route-Decision"
BODY_FIELDS = {POLICY_HEADER: "route_policy", SLO_HEADER: "route_slo_ms", QUALITY_HEADER: "route_min_quality"}


@dataclass(frozen=True)
class RouteOverrides:
    policy: str | None = None
    slo: SLO | None = None
    quality_floor: float | None = None

    def as_kwargs(self) -> dict:
        """Keyword arguments for Router.decide."""
        return {"policy": self.policy, "slo_ms": self.slo, "quality_floor": self.quality_floor}


def _header(headers: Mapping[str, str], name: str) -> str | None:
    value = headers.get(name)
    if value is None and not hasattr(headers, "getlist"):  # a plain dict: match case-insensitively
        low = name.lower()
        value = next((v for k, v in headers.items() if k.lower() == low), None)
    return value


def parse_policy(value: Any, param: str) -> str:
    if not isinstance(value, str) or value.strip().lower() not in POLICIES:
        raise RouteRequestError(f"{param}: unknown route policy {value!r}; use one of {', '.join(POLICIES)}", param)
    return value.strip().lower()


def _ms(value: Any, param: str, what: str) -> float:
    if isinstance(value, bool):
        raise RouteRequestError(f"{param}: {what} must be a number of milliseconds, got {value!r}", param)
    try:
        ms = float(value)
    except (TypeError, ValueError):
        raise RouteRequestError(f"{param}: {what} must be a number of milliseconds, got {value!r}", param) from None
    if not math.isfinite(ms) or ms <= 0:
        raise RouteRequestError(f"{param}: {what} must be > 0 milliseconds, got {value!r}", param)
    return ms


def parse_slo(value: Any, param: str) -> SLO:
    """`2000` (end-to-end ms), `ttft=300,e2e=2000`, or (body) {"ttft_ms": 300, "e2e_ms": 2000}."""
    if isinstance(value, dict):
        try:
            return SLO(**value)
        except (ValidationError, TypeError) as exc:
            raise RouteRequestError(f"{param}: invalid SLO {value!r}: {exc}", param) from None
    if isinstance(value, str) and "=" in value:
        parts: dict[str, float] = {}
        for item in value.split(","):
            key, sep, raw = item.partition("=")
            key = key.strip().lower().removesuffix("_ms")
            if not sep or key not in ("ttft", "e2e") or key in parts:
                raise RouteRequestError(
                    f"{param}: cannot parse {value!r}; use e.g. 2000 or ttft=300,e2e=2000", param
                )
            parts[key] = _ms(raw.strip(), param, key)
        return SLO(ttft_ms=parts.get("ttft"), e2e_ms=parts.get("e2e"))
    return SLO(e2e_ms=_ms(value.strip() if isinstance(value, str) else value, param, "the SLO"))


def parse_quality(value: Any, param: str) -> float:
    try:
        q = float(value) if not isinstance(value, bool) else None
    except (TypeError, ValueError):
        q = None
    if q is None or not 0 <= q <= 1:
        raise RouteRequestError(f"{param}: quality floor must be a number in [0, 1], got {value!r}", param)
    return q


def parse_overrides(headers: Mapping[str, str] | None = None, body: Mapping[str, Any] | None = None) -> RouteOverrides:
    """Read the overrides; a bad value raises RouteRequestError (HTTP 400) naming the header or field."""
    headers = headers or {}
    body = body or {}
    parsers = {POLICY_HEADER: parse_policy, SLO_HEADER: parse_slo, QUALITY_HEADER: parse_quality}
    values = {}
    for header, parser in parsers.items():
        raw = _header(headers, header)
        if raw is not None:
            values[header] = parser(raw, header)
        elif body.get(BODY_FIELDS[header]) is not None:
            values[header] = parser(body[BODY_FIELDS[header]], BODY_FIELDS[header])
    return RouteOverrides(values.get(POLICY_HEADER), values.get(SLO_HEADER), values.get(QUALITY_HEADER))


def pop_route_fields(body: dict) -> dict:
    """Remove the routing fields from a request body before it is forwarded to a deployment."""
    for name in BODY_FIELDS.values():
        body.pop(name, None)
    return body


def response_headers(routed) -> dict[str, str]:
    """X-Routed-Model and X-Route-Decision for a RoutedResult or RoutedStream."""
    decision, choice = routed.decision, routed.choice
    p = choice.prediction
    parts = [
        f"route={decision.route}",
        f"policy={decision.policy}",
        f"model={choice.model}",
        f"predicted_ttft_ms={p.ttft_s * 1000:.0f}",
        f"predicted_latency_ms={p.e2e_s * 1000:.0f}",
        f"predicted_cost_usd={p.cost_usd:.6g}",
    ]
    if decision.slo is not None:
        parts.append(f"slo={'met' if meets_slo(p, decision.slo) else 'unmet'}")
    if routed.attempts:
        parts.append(f"fallbacks={len(routed.attempts)}")
    return {ROUTED_MODEL_HEADER: choice.model, DECISION_HEADER: "; ".join(parts)}
