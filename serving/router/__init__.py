"""Per-request model routing: pick a route's candidate by cost, predicted latency and quality; fall back.

  config.py    RouteConfig / CandidateConfig (pydantic, extra="forbid"); parse_routes, load_routes
  signals.py   DeploymentSignals, SignalTracker (EWMA estimates from finished requests and stats polls)
  predict.py   predicted queue wait, TTFT, end-to-end latency and cost of one request on one candidate
  policies.py  cheapest, fastest, balanced, slo (cheapest meeting the SLO)
  router.py    Router.decide -> RouteDecision; run_with_fallback / open_stream (fallback before 1st chunk)
  headers.py   X-Route-Policy, X-Latency-SLO-Ms, X-Route-Min-Quality in; X-Routed-Model, X-Route-Decision out
  errors.py    typed errors with HTTP status (NoCandidateAvailable -> 503) and `classify` for call errors
  metrics.py   Prometheus counters (decisions, fallbacks, served, unavailable)
  sim.py       simulated deployments of known speed and price (tests, benchmarks/routing.py)
"""

from serving.router.config import POLICIES, SLO, CandidateConfig, RouteConfig, load_routes, parse_routes
from serving.router.errors import (
    CandidateContextOverflow,
    CandidateError,
    CandidateOverloaded,
    CandidateServerError,
    NoCandidateAvailable,
    RouteConfigError,
    RouteContextOverflow,
    RouteRequestError,
    RouterError,
    StreamFailedAfterFirstChunk,
    UnknownRouteError,
    classify,
)
from serving.router.headers import RouteOverrides, parse_overrides, pop_route_fields, response_headers
from serving.router.router import RouteDecision, RoutedResult, RoutedStream, Router
from serving.router.signals import DeploymentSignals, SignalTracker

__all__ = [
    "POLICIES", "SLO", "CandidateConfig", "RouteConfig", "load_routes", "parse_routes",
    "RouterError", "RouteConfigError", "RouteRequestError", "UnknownRouteError", "RouteContextOverflow",
    "CandidateError", "CandidateOverloaded", "CandidateContextOverflow", "CandidateServerError",
    "NoCandidateAvailable", "StreamFailedAfterFirstChunk", "classify",
    "RouteOverrides", "parse_overrides", "pop_route_fields", "response_headers",
    "Router", "RouteDecision", "RoutedResult", "RoutedStream",
    "DeploymentSignals", "SignalTracker",
]
