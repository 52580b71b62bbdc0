"""Failover: a request outlives the loss of its model replica.

Before the first token, a replica that died, became unreachable or refused with a full queue is replaced by
another (the request names the replicas to avoid; serving.replica_choice honours it). After tokens were sent, the
request resumes on another replica from its prompt plus the tokens already delivered (`resume`, see
serving.engine.LLMEngine.add_request) and the seed the first replica reported, so greedy and seeded output continue
exactly where they stopped and the client sees one uninterrupted stream. Usage counts what was delivered; spend is
settled once, at the request's end; the audit entry lists each failover. A lone replica is waited for while Serve
restarts it, up to FAILOVER_WAIT_S; past that, or past FAILOVER_ATTEMPTS losses, the request fails in words.
"""

from __future__ import annotations

import asyncio
import logging
import time

from serving.api.errors import APIError
from serving.api.streaming import Batched, cancel_stream

log = logging.getLogger("loraplex.gateway")
FAILOVER_ATTEMPTS = 3  # replica losses one request survives
FAILOVER_WAIT_S = 60.0  # how long a request waits for a replica to take it over (Serve restarts a lone one)
RETRY_DELAY_S = 0.25  # the pause before asking again, doubled per attempt


def replica_lost(exc: BaseException) -> str | None:
    """Why `exc` says the replica (not the request) failed, in words; None for any other error."""
    try:
        from ray.exceptions import ActorUnavailableError, RayActorError
    except ImportError:  # pragma: no cover - ray is a dependency
        return None
    if isinstance(exc, ActorUnavailableError):
        return "the model replica became unreachable"
    if isinstance(exc, RayActorError):  # ActorDiedError and its kin
        return "the model replica stopped"
    return None


class ReplicaUnavailable(APIError):
    """No replica could take a request over (503 before the stream starts, an in-band error after)."""

    def __init__(self, model: str, cause: str, delivered: int):
        where = "before it started" if not delivered else f"after {delivered} tokens"
        super().__init__(503, f"{cause[0].upper()}{cause[1:]} {where}, and no other replica of `{model}` could take "
                              "the request over; try again shortly.", type="server_error",
                         code="replica_unavailable", retry_after=5)


async def open_with_failover(start, base: str, req: dict, failovers: list | None = None):
    """(accepted item, FailoverStream) from `start(req)`, which returns a raw replica stream; `failovers`
    collects what happened to the request."""
    failovers = failovers if failovers is not None else []
    first, gen = await _accepted(start, base, req, failovers)
    return first, FailoverStream(start, base, req, first, gen, failovers)


async def _accepted(start, base: str, req: dict, failovers: list):
    """(accepted item, replica stream), asking another replica when one is lost or has a full queue before it
    accepts."""
    avoid: list[str] = list(req.get("avoid") or [])
    deadline = time.monotonic() + FAILOVER_WAIT_S
    while True:
        try:
            first, gen = await _first(start, {**req, "avoid": avoid} if avoid else req, deadline)
        except _Retry as r:
            if len(failovers) >= FAILOVER_ATTEMPTS or time.monotonic() >= deadline:
                raise r.final(base) from None
            failovers.append({"when": "before_first_token", "cause": r.cause, "replica": r.replica})
            attempt = sum(f["when"] == "before_first_token" for f in failovers)
            if r.replica:
                avoid.append(r.replica)
            log.warning("request %s: %s before it was accepted; asking another replica", req.get("request_id"),
                        r.cause)
            await asyncio.sleep(min(RETRY_DELAY_S * 2 ** (attempt - 1), max(0.0, deadline - time.monotonic())))
            continue
        return first, gen


class _Retry(Exception):
    def __init__(self, cause: str, replica: str | None = None, error: APIError | None = None,
                 overloaded: bool = False):
        self.cause, self.replica, self.error, self.overloaded = cause, replica, error, overloaded

    def final(self, base: str) -> APIError:
        if self.error is not None:
            return self.error
        if self.overloaded:
            return APIError(429, f"The model `{base}` is overloaded; retry later.", code="queue_full", retry_after=1)
        return ReplicaUnavailable(base, self.cause, 0)


async def _first(start, req: dict, deadline: float):
    """Open one replica stream and read its first item (accepted or error); lost or full replicas -> _Retry."""
    from ray.serve.exceptions import BackPressureError

    gen = Batched(start(req))
    try:
        first = await asyncio.wait_for(gen.__anext__(), timeout=max(0.1, deadline - time.monotonic()))
    except BackPressureError:
        raise _Retry("every replica's queue is full", overloaded=True) from None
    except asyncio.TimeoutError:
        cancel_stream(gen)
        raise _Retry("no replica answered in time") from None
    except StopAsyncIteration:
        raise APIError(500, "the model deployment ended the stream early", type="server_error") from None
    except BaseException as exc:
        cancel_stream(gen)
        cause = replica_lost(exc)
        if cause is None:
            raise
        raise _Retry(cause) from None
    if first["kind"] == "error":
        err = APIError.from_dict(first["error"])
        if err.code == "queue_full":  # this replica's engine queue is full: another may have room
            raise _Retry("the replica's queue is full", first.get("replica"), err)
        raise err
    return first, gen


class FailoverStream:
    """A replica stream that resumes on another replica when its own is lost mid-generation."""

    def __init__(self, start, base: str, req: dict, accepted: dict, gen, failovers: list):
        self.start, self.base, self.req, self.gen, self.failovers = start, base, req, gen, failovers
        self.replica = accepted.get("replica")
        self.seed = accepted.get("seed")
        n = int((req.get("sampling") or {}).get("n") or 1)
        self.outputs: dict[int, list[int]] = {i: [] for i in range(n)}  # choice -> token ids delivered
        self.done: set[int] = set()

    def __aiter__(self):
        return self

    async def __anext__(self) -> dict:
        while True:
            if len(self.done) == len(self.outputs):
                raise StopAsyncIteration
            try:
                item = await self.gen.__anext__()
            except Exception as exc:  # StopAsyncIteration too: replica_lost() is None for it, so it ends the loop
                cause = replica_lost(exc)
                if cause is None:
                    raise
                await self._resume(cause)
                continue
            for c in item.get("choices", ()):
                self.outputs[c["index"]].extend(c.get("token_ids") or ())
                if c["finish_reason"] is not None:
                    self.done.add(c["index"])
            return item

    def delivered(self) -> int:
        return sum(len(t) for t in self.outputs.values())

    async def _resume(self, cause: str) -> None:
        delivered = self.delivered()
        if len(self.failovers) >= FAILOVER_ATTEMPTS:  # the budget is per request, whatever the losses were
            raise ReplicaUnavailable(self.base, cause, delivered)
        log.warning("request %s: %s after %d tokens; resuming on another replica", self.req.get("request_id"),
                    cause, delivered)
        self.failovers.append({"when": "mid_stream", "cause": cause, "replica": self.replica,
                               "after_tokens": delivered})
        sampling = dict(self.req.get("sampling") or {})
        if self.seed is not None:
            sampling["seed"] = self.seed
        resume = {**self.req, "sampling": sampling, "avoid": [r for r in [self.replica] if r],
                  "resume": {i: list(t) for i, t in self.outputs.items() if i not in self.done}}
        try:
            accepted, self.gen = await _accepted(self.start, self.base, resume, self.failovers)
        except ReplicaUnavailable:  # said of this request: lost after `delivered` tokens, not before it started
            raise ReplicaUnavailable(self.base, cause, delivered) from None
        self.replica = accepted.get("replica")

    def cancel(self) -> None:
        cancel_stream(self.gen)
