"""Routes config: a route name lists candidate models/adapters with price, quality, context length, priors.

    routes:
      auto:
        policy: balanced                 # cheapest | fastest | balanced | slo
        quality_floor: 0.5               # optional: candidates below it are never chosen
        slo: {ttft_ms: 800, e2e_ms: 5000}
        weights: {cost: 1, latency: 1, quality: 1}   # for balanced
        candidates:
          - model: smollm2-135m-instruct  # the name sent to the deployment (a model or an adapter)
            deployment: smollm2           # whose live signals apply (default: the model, or the base of
                                          # a 'base:adapter' name: adapters share their base's engine)
            input_per_1m: 0.02            # USD per 1M prompt tokens ...
            output_per_1m: 0.08           # ... and per 1M completion tokens
            quality: 0.4
            context_length: 8192
          - model: big
            gpu_hour_usd: 2.5             # or a GPU-hour price with the throughput measured on it
            input_tok_s: 20000
            output_tok_s: 1500
            quality: 0.8
            context_length: 32768
            expect: {ttft_ms: 300, tpot_ms: 40}   # latency priors used until measurements arrive
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from serving.pricing import Price
from serving.router.errors import RouteConfigError

POLICIES = ("cheapest", "fastest", "balanced", "slo")
Policy = Literal["cheapest", "fastest", "balanced", "slo"]


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", frozen=True)


class SLO(_Strict):
    """Latency objectives in milliseconds; either may be absent (then it is not checked)."""

    ttft_ms: float | None = Field(default=None, gt=0)
    e2e_ms: float | None = Field(default=None, gt=0)

    @model_validator(mode="after")
    def _one_needed(self):
        if self.ttft_ms is None and self.e2e_ms is None:
            raise ValueError("an SLO needs ttft_ms, e2e_ms or both")
        return self


class Expect(_Strict):
    """Latency priors for a candidate, used until its deployment reports measurements."""

    ttft_ms: float | None = Field(default=None, gt=0)
    tpot_ms: float | None = Field(default=None, gt=0)
    prefill_tok_s: float | None = Field(default=None, gt=0)


class Weights(_Strict):
    """Weights of the balanced policy's score (each term normalised to 0..1 across candidates)."""

    cost: float = Field(default=1.0, ge=0)
    latency: float = Field(default=1.0, ge=0)
    quality: float = Field(default=1.0, ge=0)

    @model_validator(mode="after")
    def _not_all_zero(self):
        if self.cost + self.latency + self.quality == 0:
            raise ValueError("at least one balanced weight must be > 0")
        return self


class CandidateConfig(_Strict):
    model: str = Field(min_length=1)
    deployment: str | None = None
    input_per_1m: float | None = Field(default=None, ge=0)
    output_per_1m: float | None = Field(default=None, ge=0)
    gpu_hour_usd: float | None = Field(default=None, ge=0)
    input_tok_s: float | None = Field(default=None, gt=0)
    output_tok_s: float | None = Field(default=None, gt=0)
    utilization: float = Field(default=1.0, gt=0, le=1)
    quality: float = Field(ge=0, le=1)
    context_length: int = Field(gt=0)
    expect: Expect = Expect()

    @field_validator("input_per_1m", "output_per_1m", "gpu_hour_usd", "input_tok_s", "output_tok_s")
    @classmethod
    def _finite(cls, v):
        if v is not None and not math.isfinite(v):
            raise ValueError("must be finite")
        return v

    @model_validator(mode="after")
    def _one_price(self):
        per_token = (self.input_per_1m, self.output_per_1m)
        gpu = (self.gpu_hour_usd, self.input_tok_s, self.output_tok_s)
        if any(v is not None for v in per_token) and any(v is not None for v in gpu):
            raise ValueError("give either input_per_1m/output_per_1m or gpu_hour_usd/input_tok_s/output_tok_s")
        if any(v is not None for v in gpu):
            missing = [n for n, v in zip(("gpu_hour_usd", "input_tok_s", "output_tok_s"), gpu) if v is None]
            if missing:
                raise ValueError(f"a GPU-hour price needs {', '.join(missing)} (measured throughput)")
        elif None in per_token:
            missing = [n for n, v in zip(("input_per_1m", "output_per_1m"), per_token) if v is None]
            raise ValueError(f"missing price: {', '.join(missing)} (or gpu_hour_usd with measured throughput)")
        return self

    @property
    def deployment_name(self) -> str:
        """Whose signals apply: `deployment`, else the base of a 'base:adapter' name (adapters share it)."""
        return self.deployment or self.model.partition(":")[0]

    @property
    def price(self) -> Price:
        if self.gpu_hour_usd is not None:
            return Price.from_gpu_hour(
                self.gpu_hour_usd,
                input_tok_s=self.input_tok_s,
                output_tok_s=self.output_tok_s,
                utilization=self.utilization,
            )
        return Price(self.input_per_1m, self.output_per_1m)


class RouteConfig(_Strict):
    name: str = Field(min_length=1)
    candidates: list[CandidateConfig] = Field(min_length=1)
    policy: Policy = "balanced"
    quality_floor: float | None = Field(default=None, ge=0, le=1)
    slo: SLO | None = None
    weights: Weights = Weights()

    @model_validator(mode="after")
    def _check(self):
        names = [c.model for c in self.candidates]
        dupes = sorted({n for n in names if names.count(n) > 1})
        if dupes:
            raise ValueError(f"candidate models listed twice: {', '.join(dupes)}")
        if self.policy == "slo" and self.slo is None:
            raise ValueError("policy 'slo' needs an slo: {ttft_ms: ..., e2e_ms: ...}")
        if self.quality_floor is not None and all(c.quality < self.quality_floor for c in self.candidates):
            best = max(c.quality for c in self.candidates)
            raise ValueError(f"quality_floor {self.quality_floor} excludes every candidate (best {best})")
        return self


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        out += f"[{part}]" if isinstance(part, int) else (f".{part}" if out else str(part))
    return out


def _format(exc: ValidationError, prefix: str) -> str:
    lines = []
    for err in exc.errors():
        where = _loc(tuple(err["loc"]))
        msg = err["msg"].removeprefix("Value error, ")
        if err["type"] == "extra_forbidden":
            msg = "unknown field"
        lines.append(f"{prefix}{'.' + where if where else ''}: {msg}")
    return "; ".join(lines)


def parse_route(name: str, data: Any) -> RouteConfig:
    if not isinstance(data, dict):
        raise RouteConfigError(f"routes.{name}: must be a mapping, got {type(data).__name__}")
    if "name" in data and data["name"] != name:
        raise RouteConfigError(f"routes.{name}.name: {data['name']!r} differs from its key {name!r}")
    try:
        return RouteConfig(**{**data, "name": name})
    except ValidationError as exc:
        raise RouteConfigError(_format(exc, f"routes.{name}")) from None


_PRICE_KEYS = ("input_per_1m", "output_per_1m", "gpu_hour_usd", "input_tok_s", "output_tok_s", "utilization")


def _with_model_defaults(name: str, data: Any, models: dict[str, dict]) -> Any:
    """Fill each candidate's missing price / context_length from the served model it names."""
    if not isinstance(data, dict) or not isinstance(data.get("candidates"), list):
        return data
    out = []
    for i, cand in enumerate(data["candidates"]):
        if isinstance(cand, dict) and isinstance(cand.get("model"), str):
            model = cand["model"]
            known = models.get(model) or models.get(model.partition(":")[0])
            if known is None:
                raise RouteConfigError(
                    f"routes.{name}.candidates[{i}].model: {model!r} is not a served model or adapter "
                    f"(served: {', '.join(sorted(models)) or 'none'})"
                )
            fill = {k: v for k, v in known.items() if k not in cand and v is not None}
            if any(k in cand for k in _PRICE_KEYS):  # the candidate prices itself: take no price from the model
                fill = {k: v for k, v in fill.items() if k not in _PRICE_KEYS}
            cand = {**fill, **cand}
        out.append(cand)
    return {**data, "candidates": out}


def parse_routes(data: Any, models: dict[str, dict] | None = None) -> dict[str, RouteConfig]:
    """`{"routes": {name: route}}` or `{name: route}` -> {name: RouteConfig}, with errors naming the field.

    `models` (served model name -> e.g. {"input_per_1m", "output_per_1m", "context_length"}), when given,
    rejects candidates that name no served model and fills their missing price and context length.
    """
    if isinstance(data, dict) and set(data) == {"routes"}:
        data = data["routes"]
    if not isinstance(data, dict) or not data:
        raise RouteConfigError("routes: expected a non-empty mapping of route name -> route")
    routes = {}
    for name, route in data.items():
        if models is not None:
            route = _with_model_defaults(str(name), route, models)
        routes[str(name)] = parse_route(str(name), route)
    if models is not None:
        clash = sorted(set(routes) & set(models))
        if clash:
            raise RouteConfigError(f"routes: {', '.join(clash)} is both a route and a served model name")
    return routes


def load_routes(path: str | Path) -> dict[str, RouteConfig]:
    """Read a YAML (or JSON) routes file."""
    import yaml

    path = Path(path)
    try:
        data = yaml.safe_load(path.read_text())
    except FileNotFoundError:
        raise RouteConfigError(f"routes file {path} does not exist") from None
    except yaml.YAMLError as exc:
        raise RouteConfigError(f"{path}: not valid YAML: {exc}") from None
    try:
        return parse_routes(data)
    except RouteConfigError as exc:
        raise RouteConfigError(f"{path}: {exc.message}") from None
