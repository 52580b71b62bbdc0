"""A model replica in the gateway's own process, behind the calls serving.api.deployments makes of a Ray Serve
handle (`options(stream=True).stream.remote(req)`, `await handle.<method>.remote()`, `broadcast`).

A model with `colocate: true` is served this way (serving.app.Gateway): the request skips the gateway -> model
replica hop and its first item's way back, two Ray calls (~9 ms of first-token time on 2 cores), and one process
fewer competes for the cores. Its stream runs in a task of its own, so cancelling it (the client left) aborts the
engine request wherever the reader is, as cancelling a Ray response generator does.
"""

from __future__ import annotations

import asyncio
import inspect

_END = object()


class StreamCancelled(Exception):
    """Read from a local stream after it was cancelled."""


class LocalStream:
    """An async iterator over a replica's stream generator, pumped by its own task; `cancel()` stops it."""

    def __init__(self, agen):
        self._queue: asyncio.Queue = asyncio.Queue()
        self._task = asyncio.ensure_future(self._pump(agen))
        self._cancelled = False

    async def _pump(self, agen) -> None:
        try:
            async for item in agen:
                self._queue.put_nowait(item)
            self._queue.put_nowait(_END)
        except asyncio.CancelledError:
            self._queue.put_nowait(StreamCancelled("the stream was cancelled"))
            raise
        except BaseException as exc:  # the replica's error reaches the reader, as Ray raises it at the caller
            self._queue.put_nowait(exc)
        finally:
            await agen.aclose()

    def __aiter__(self):
        return self

    async def __anext__(self):
        item = await self._queue.get()
        if item is _END:
            self._queue.put_nowait(_END)  # a later read ends too
            raise StopAsyncIteration
        if isinstance(item, BaseException):
            self._queue.put_nowait(item)
            raise item
        return item

    def cancel(self) -> None:
        if not self._cancelled:
            self._cancelled = True
            self._task.cancel()


class LocalCall:
    """`handle.<method>.remote(...)` in process: an async generator comes back as a LocalStream, a coroutine as
    itself, a plain value as an awaitable of it (what awaiting a Ray DeploymentResponse gives)."""

    def __init__(self, fn):
        self.fn = fn

    def remote(self, *args, **kwargs):
        out = self.fn(*args, **kwargs)
        if inspect.isasyncgen(out):
            return LocalStream(out)
        if inspect.isawaitable(out):
            return out
        return _value(out)


async def _value(value):
    return value


class LocalHandle:
    """The handle calls of a deployment, answered by `target` (a serving.app.ModelReplica) in this process."""

    def __init__(self, target):
        self.target = target

    def options(self, **_):
        return self

    def __getattr__(self, name: str) -> LocalCall:
        return LocalCall(getattr(self.target, name))

    def broadcast(self, method: str, *args):
        """Serve's handle.broadcast: this process holds one replica."""
        call = getattr(self, method)

        class _Results:
            async def results_async(self, timeout_s=None, return_exceptions=False):
                try:
                    return [await asyncio.wait_for(call.remote(*args), timeout_s)]
                except asyncio.TimeoutError:
                    raise
                except Exception as exc:
                    if return_exceptions:
                        return [exc]
                    raise

        return _Results()
