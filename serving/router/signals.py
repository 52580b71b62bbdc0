"""Live signals per deployment: load from stats polls, latency estimates from finished requests.

The gateway feeds a SignalTracker from two sources:
  observe_stats(name, engine.stats())        periodic polls: num_running, num_waiting, kv_usage, max_num_seqs,
                                             optionally the deployment's own ttft_s / tpot_s / prefill_tok_s
  observe_request(name, ttft_s=..., ...)     every finished request: its TTFT, time per output token, tokens
and the router reads `get(name) -> DeploymentSignals` snapshots. Failures put a deployment in a cooldown.
Not thread-safe: one tracker per event loop (one per gateway replica).
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, field


class Ewma:
    """Exponentially weighted moving average; the first sample initialises it."""

    def __init__(self, alpha: float = 0.2):
        if not 0 < alpha <= 1:
            raise ValueError(f"alpha must be in (0, 1], got {alpha}")
        self.alpha = alpha
        self.value: float | None = None
        self.count = 0

    def update(self, x: float) -> float:
        self.value = x if self.value is None else self.value + self.alpha * (x - self.value)
        self.count += 1
        return self.value


class EwmaLine:
    """Exponentially weighted least-squares fit y = a + b*x (TTFT = overhead + prompt_tokens / prefill speed).

    Weighted sums forget old samples at rate alpha; with too little spread in x the fit is through the
    origin's ratio (b = mean y / mean x, a = 0), so a few equal-length prompts still give a speed.
    """

    def __init__(self, alpha: float = 0.2):
        self.alpha = alpha
        self.w = self.sx = self.sy = self.sxx = self.sxy = 0.0
        self.count = 0

    def update(self, x: float, y: float) -> None:
        keep = 1 - self.alpha if self.count else 0.0
        self.w = keep * self.w + 1
        self.sx = keep * self.sx + x
        self.sy = keep * self.sy + y
        self.sxx = keep * self.sxx + x * x
        self.sxy = keep * self.sxy + x * y
        self.count += 1

    def fit(self) -> tuple[float, float] | None:
        """(intercept, slope) with intercept >= 0 and slope > 0, or None before any sample with x > 0."""
        if self.count == 0 or self.sx <= 0:
            return None
        mx, my = self.sx / self.w, self.sy / self.w
        var = self.sxx / self.w - mx * mx
        if var > (0.05 * mx) ** 2:  # enough spread in prompt lengths for a slope
            b = (self.sxy / self.w - mx * my) / var
            a = my - b * mx
            if b > 0 and a >= 0:
                return a, b
        return 0.0, max(my, 1e-9) / mx


@dataclass
class DeploymentSignals:
    """A snapshot of one deployment, as the predictor reads it. None = not measured yet."""

    name: str
    num_running: int = 0
    num_waiting: int = 0
    kv_usage: float = 0.0
    max_num_seqs: int | None = None  # its concurrency limit, when it reports one
    inflight: int = 0  # requests this gateway has open to it (fresher than the last poll)
    ttft_s: float | None = None  # moving average of observed TTFT (all prompt lengths)
    ttft_base_s: float | None = None  # fixed part of TTFT (fit intercept)
    prefill_tok_s: float | None = None  # prompt tokens per second of one request's prefill
    tpot_s: float | None = None  # seconds per output token after the first
    service_s: float | None = None  # moving average of a request's whole duration (for queue wait)
    completion_tokens: float | None = None  # moving average of completion lengths
    available: bool = True
    down_reason: str | None = None
    down_for_s: float = 0.0  # seconds of cooldown left
    samples: int = 0  # finished requests observed
    stats_age_s: float | None = None  # seconds since the last stats poll


@dataclass
class _State:
    name: str
    alpha: float
    ttft: Ewma = None
    ttft_line: EwmaLine = None
    tpot: Ewma = None
    service: Ewma = None
    completion: Ewma = None
    stats: dict = field(default_factory=dict)
    stats_at: float | None = None
    inflight: int = 0
    down_until: float = 0.0
    down_reason: str | None = None

    def __post_init__(self):
        self.ttft, self.tpot = Ewma(self.alpha), Ewma(self.alpha)
        self.service, self.completion = Ewma(self.alpha), Ewma(self.alpha)
        self.ttft_line = EwmaLine(self.alpha)


def _num(stats: dict, key: str, kind=float):
    v = stats.get(key)
    if v is None or isinstance(v, bool):
        return None
    try:
        v = kind(v)
    except (TypeError, ValueError):
        return None
    return v if math.isfinite(v) and v >= 0 else None


class SignalTracker:
    """Per-deployment moving estimates and cooldowns; `get(name)` is the router's signals provider."""

    def __init__(self, alpha: float = 0.2, error_cooldown_s: float = 2.0, clock=time.monotonic):
        self.alpha = alpha
        self.error_cooldown_s = error_cooldown_s
        self.clock = clock
        self._states: dict[str, _State] = {}

    def _state(self, name: str) -> _State:
        st = self._states.get(name)
        if st is None:
            st = self._states[name] = _State(name, self.alpha)
        return st

    def names(self) -> list[str]:
        return sorted(self._states)

    # -- inputs ----------------------------------------------------------------------------------------------

    def observe_stats(self, name: str, stats: dict) -> None:
        """A stats poll (the engine's `stats()` dict); unknown keys are ignored, bad values skipped."""
        st = self._state(name)
        st.stats = dict(stats)
        st.stats_at = self.clock()

    def observe_request(
        self,
        name: str,
        *,
        ttft_s: float,
        prompt_tokens: int,
        completion_tokens: int,
        e2e_s: float | None = None,
        tpot_s: float | None = None,
        queue_s: float = 0.0,
    ) -> None:
        """A finished request. `tpot_s` defaults to (e2e - ttft) / (completion_tokens - 1); `queue_s`, when
        known, is taken out of TTFT so the queue is not counted twice (it is predicted from live load)."""
        st = self._state(name)
        ttft_s = max(0.0, float(ttft_s))
        st.ttft.update(ttft_s)
        if prompt_tokens > 0:
            st.ttft_line.update(float(prompt_tokens), max(ttft_s - queue_s, 0.0))
        if tpot_s is None and e2e_s is not None and completion_tokens > 1:
            tpot_s = max(0.0, e2e_s - ttft_s) / (completion_tokens - 1)
        if tpot_s is not None:
            st.tpot.update(max(0.0, float(tpot_s)))
        if e2e_s is not None:
            st.service.update(max(0.0, float(e2e_s) - queue_s))
        st.completion.update(float(max(0, completion_tokens)))

    def begin(self, name: str) -> None:
        self._state(name).inflight += 1

    def end(self, name: str) -> None:
        st = self._state(name)
        st.inflight = max(0, st.inflight - 1)

    def mark_overloaded(self, name: str, retry_after: float = 1.0) -> None:
        self._cooldown(name, max(0.0, retry_after), "overloaded (429)")

    def mark_failed(self, name: str, reason: str = "server error", cooldown_s: float | None = None) -> None:
        self._cooldown(name, self.error_cooldown_s if cooldown_s is None else cooldown_s, reason)

    def mark_ok(self, name: str) -> None:
        st = self._state(name)
        st.down_until, st.down_reason = 0.0, None

    def _cooldown(self, name: str, seconds: float, reason: str) -> None:
        st = self._state(name)
        st.down_until = max(st.down_until, self.clock() + seconds)
        st.down_reason = reason

    # -- output ----------------------------------------------------------------------------------------------

    def get(self, name: str) -> DeploymentSignals:
        st = self._state(name)
        now = self.clock()
        s = st.stats
        fit = st.ttft_line.fit()
        reported_prefill = _num(s, "prefill_tok_s")
        reported_prefill = reported_prefill if reported_prefill else None
        down_for = max(0.0, st.down_until - now)
        healthy = s.get("healthy", True) is not False
        return DeploymentSignals(
            name=name,
            num_running=_num(s, "num_running", int) or 0,
            num_waiting=_num(s, "num_waiting", int) or 0,
            kv_usage=min(1.0, _num(s, "kv_usage") or 0.0),
            max_num_seqs=_num(s, "max_num_seqs", int) or None,
            inflight=st.inflight,
            ttft_s=st.ttft.value if st.ttft.value is not None else _num(s, "ttft_s"),
            ttft_base_s=fit[0] if fit else None,
            prefill_tok_s=(1.0 / fit[1]) if fit else reported_prefill,
            tpot_s=st.tpot.value if st.tpot.value is not None else _num(s, "tpot_s"),
            service_s=st.service.value,
            completion_tokens=st.completion.value,
            available=down_for == 0 and healthy,
            down_reason=st.down_reason if down_for > 0 else (None if healthy else "reported unhealthy"),
            down_for_s=down_for,
            samples=st.ttft.count,
            stats_age_s=None if st.stats_at is None else now - st.stats_at,
        )

    __call__ = get


async def poll_stats(tracker: SignalTracker, fetchers: dict, interval_s: float = 0.5, stop=None) -> None:
    """Poll each deployment's stats every `interval_s` until `stop` (an asyncio.Event) is set.

    `fetchers` maps a deployment name to an async function returning its stats dict (e.g. a Ray Serve
    handle's `stats.remote()`); a failing poll marks the deployment down for the tracker's error cooldown.
    """
    import asyncio

    async def one(name, fetch):
        try:
            tracker.observe_stats(name, await asyncio.wait_for(fetch(), timeout=max(interval_s, 1.0)))
        except Exception as exc:  # an unreachable deployment is down until a later poll or request succeeds
            tracker.mark_failed(name, f"stats poll failed: {type(exc).__name__}")
        else:
            st = tracker._state(name)
            if st.down_reason and st.down_reason.startswith("stats poll failed"):
                tracker.mark_ok(name)

    while stop is None or not stop.is_set():
        await asyncio.gather(*(one(n, f) for n, f in fetchers.items()))
        if stop is None:
            await asyncio.sleep(interval_s)
        else:
            try:
                await asyncio.wait_for(stop.wait(), timeout=interval_s)
            except asyncio.TimeoutError:
                pass
