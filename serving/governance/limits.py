"""Sliding-window rate limits (requests and tokens per minute) and parallel-request caps, per key and per team.

Windows live in process memory: with several gateway replicas each enforces its own share. Budgets (money)
are in SQLite instead, because overspending them must be impossible across processes.
"""

from __future__ import annotations

import threading
import time
from collections import deque
from dataclasses import dataclass, field

from serving.governance.config import Limits
from serving.governance.errors import RateLimited

WINDOW_S = 60.0


@dataclass
class _Window:
    events: deque = field(default_factory=deque)  # [ts, tokens] lists, oldest first
    tokens: int = 0
    requests: int = 0
    inflight: int = 0

    def prune(self, now: float) -> None:
        while self.events and self.events[0][0] <= now - WINDOW_S:
            _, tokens, is_request = self.events.popleft()
            self.tokens -= tokens
            self.requests -= is_request


@dataclass
class Lease:
    """What one request holds: its request/token events and parallel slots, released by `release`."""

    subjects: list[tuple[str, Limits]]
    events: list[list] = field(default_factory=list)
    parallel: list[str] = field(default_factory=list)
    released: bool = False


class RateLimiter:
    def __init__(self, clock=time.monotonic):
        self._clock = clock
        self._lock = threading.Lock()
        self._windows: dict[str, _Window] = {}

    def _win(self, subject: str, now: float) -> _Window:
        w = self._windows.setdefault(subject, _Window())
        w.prune(now)
        return w

    def admit(self, subjects: list[tuple[str, Limits]], tokens: int = 0, count_request: bool = True) -> Lease:
        """Check every subject (e.g. `key:<id>`, `team:<name>`) and record the request, or raise 429.

        All-or-nothing: nothing is recorded unless every subject has room.
        """
        now = self._clock()
        lease = Lease(subjects)
        with self._lock:
            for subject, lim in subjects:
                w = self._win(subject, now)
                who = subject.replace(":", " ", 1)
                if count_request and lim.rpm is not None and w.requests + 1 > lim.rpm:
                    oldest = next(e[0] for e in w.events if e[2])
                    raise RateLimited(f"{who} is over its limit of {lim.rpm} requests per minute",
                                      code="rate_limit_exceeded", retry_after=oldest + WINDOW_S - now)
                if count_request and lim.max_parallel is not None and w.inflight + 1 > lim.max_parallel:
                    raise RateLimited(f"{who} already has {w.inflight} requests running (limit "
                                      f"{lim.max_parallel})", code="too_many_parallel_requests", retry_after=1.0)
                if tokens and lim.tpm is not None and w.tokens + tokens > lim.tpm:
                    if tokens > lim.tpm:
                        raise RateLimited(f"request needs up to {tokens} tokens but {who} may use {lim.tpm} "
                                          "tokens per minute; lower max_tokens", code="tokens_exceed_limit",
                                          retry_after=WINDOW_S)
                    freed, wait = 0, WINDOW_S
                    for ts, n, _ in w.events:
                        freed += n
                        if w.tokens - freed + tokens <= lim.tpm:
                            wait = ts + WINDOW_S - now
                            break
                    raise RateLimited(f"{who} is over its limit of {lim.tpm} tokens per minute",
                                      code="rate_limit_exceeded", retry_after=wait)
            for subject, lim in subjects:
                w = self._windows[subject]
                event = [now, tokens, int(count_request)]
                w.events.append(event)
                w.tokens += tokens
                w.requests += int(count_request)
                lease.events.append(event)
                if count_request:
                    w.inflight += 1
                    lease.parallel.append(subject)
        return lease

    def settle_tokens(self, lease: Lease, tokens: int) -> None:
        """Replace the estimate recorded at admission with the tokens actually used."""
        with self._lock:
            for (subject, _), event in zip(lease.subjects, lease.events):
                w = self._windows.get(subject)
                if w is not None and any(e is event for e in w.events):
                    w.tokens += tokens - event[1]
                event[1] = tokens

    def release(self, lease: Lease) -> None:
        with self._lock:
            if lease.released:
                return
            lease.released = True
            for subject in lease.parallel:
                w = self._windows.get(subject)
                if w is not None:
                    w.inflight -= 1

    def inflight(self, subject: str) -> int:
        with self._lock:
            w = self._windows.get(subject)
            return w.inflight if w else 0
