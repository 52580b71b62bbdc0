"""Token prices: the one place a request's cost in USD is computed (router, spend accounting, benchmarks).

A price is per 1M input (prompt) and per 1M output (completion) tokens, as API vendors quote them. A
self-hosted deployment is priced from what its accelerator costs per hour and the throughput measured on it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

TOKENS_PER_PRICE_UNIT = 1_000_000
SECONDS_PER_HOUR = 3600.0


def _non_negative(name: str, value: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)):
        raise ValueError(f"{name} must be a number, got {value!r}")
    if not math.isfinite(value) or value < 0:
        raise ValueError(f"{name} must be a finite number >= 0, got {value!r}")
    return float(value)


def _positive(name: str, value: float) -> float:
    value = _non_negative(name, value)
    if value == 0:
        raise ValueError(f"{name} must be > 0, got {value!r}")
    return value


@dataclass(frozen=True)
class Price:
    """USD per 1M input tokens and per 1M output tokens."""

    input_per_1m: float
    output_per_1m: float

    def __post_init__(self):
        object.__setattr__(self, "input_per_1m", _non_negative("input_per_1m", self.input_per_1m))
        object.__setattr__(self, "output_per_1m", _non_negative("output_per_1m", self.output_per_1m))

    @classmethod
    def from_gpu_hour(
        cls,
        usd_per_hour: float,
        *,
        input_tok_s: float,
        output_tok_s: float,
        utilization: float = 1.0,
    ) -> Price:
        """Per-token prices of a deployment that costs `usd_per_hour`, from its measured throughput.

        `input_tok_s` / `output_tok_s` are the deployment's aggregate prefill / decode throughput (all
        concurrent requests together, as a throughput benchmark measures it). Each phase is charged as if the
        accelerator spent its time on it alone; `utilization` (0..1] spreads idle time over the tokens served.
        """
        usd_per_hour = _non_negative("usd_per_hour", usd_per_hour)
        input_tok_s = _positive("input_tok_s", input_tok_s)
        output_tok_s = _positive("output_tok_s", output_tok_s)
        utilization = _positive("utilization", utilization)
        if utilization > 1:
            raise ValueError(f"utilization must be in (0, 1], got {utilization!r}")
        usd_per_s = usd_per_hour / SECONDS_PER_HOUR / utilization
        return cls(
            input_per_1m=usd_per_s / input_tok_s * TOKENS_PER_PRICE_UNIT,
            output_per_1m=usd_per_s / output_tok_s * TOKENS_PER_PRICE_UNIT,
        )

    def cost(self, prompt_tokens: int, completion_tokens: int) -> float:
        """USD for a request of `prompt_tokens` in and `completion_tokens` out."""
        if prompt_tokens < 0 or completion_tokens < 0:
            raise ValueError(
                f"token counts must be >= 0, got prompt_tokens={prompt_tokens}, "
                f"completion_tokens={completion_tokens}"
            )
        return (
            prompt_tokens * self.input_per_1m + completion_tokens * self.output_per_1m
        ) / TOKENS_PER_PRICE_UNIT

    def to_dict(self) -> dict:
        return {"input_per_1m": self.input_per_1m, "output_per_1m": self.output_per_1m}


FREE = Price(0.0, 0.0)
