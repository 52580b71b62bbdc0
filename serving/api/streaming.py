"""Server-sent events, the merge of several replica streams (one per completions prompt), and the coalescing of
a replica's items into lists between the model replica and the gateway.

Why coalesce: every item a Ray Serve streaming call yields is one object sent between actors; with 32 streams
decoding, that was a Ray message per token per stream, on the same 2 cores the engine needs. The replica sends
whatever items are ready as one list (one message per stream per step when the gateway keeps up, more tokens per
message when it falls behind), and the gateway flattens them again (Batched), so nothing else changes.
"""

from __future__ import annotations

import asyncio
import json


def sse(obj: dict) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False, separators=(',', ':'))}\n\n"


SSE_DONE = "data: [DONE]\n\n"
SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


def cancel_stream(gen) -> None:
    """Cancel a Ray Serve response generator (propagates to the replica, which aborts the request)."""
    cancel = getattr(gen, "cancel", None)
    if cancel is not None:
        try:
            cancel()
        except Exception:
            pass


async def close_stream(gen) -> None:
    """Stop a stream the gateway reads no further: a Ray response generator is cancelled, an async
    generator (a routed stream) closed, which cancels what it wraps."""
    if getattr(gen, "cancel", None) is not None:
        cancel_stream(gen)
        return
    close = getattr(gen, "aclose", None)
    if close is not None:
        try:
            await close()
        except Exception:
            pass


async def merge_streams(gens: list):
    """Yield (stream index, item) from several async iterators as items arrive; cancel all on exit."""
    if len(gens) == 1:  # the common case: no tasks, no queue
        async for item in gens[0]:
            yield 0, item
        return
    queue: asyncio.Queue = asyncio.Queue()
    done = object()

    async def pump(i, gen):
        try:
            async for item in gen:
                await queue.put((i, item))
        except BaseException as exc:  # noqa: BLE001 - forwarded to the consumer
            await queue.put((i, exc))
            return
        await queue.put((i, done))

    tasks = [asyncio.ensure_future(pump(i, g)) for i, g in enumerate(gens)]
    try:
        remaining = len(gens)
        while remaining:
            i, item = await queue.get()
            if item is done:
                remaining -= 1
            elif isinstance(item, BaseException):
                raise item
            else:
                yield i, item
    finally:
        for t in tasks:
            t.cancel()


class _End:
    def __init__(self, exc: BaseException | None = None):
        self.exc = exc


async def coalesce(items):
    """Yield lists of the items of async iterator `items`: each list holds every item ready when it is sent.
    Closing this generator (the gateway cancelled the call) cancels the pump, which closes `items`."""
    queue: asyncio.Queue = asyncio.Queue()

    async def pump():
        try:
            async for item in items:
                queue.put_nowait(item)
        except BaseException as exc:  # noqa: BLE001 - forwarded to the consumer
            queue.put_nowait(_End(exc))
            return
        queue.put_nowait(_End())

    task = asyncio.ensure_future(pump())
    try:
        while True:
            batch = [await queue.get()]
            while not queue.empty():
                batch.append(queue.get_nowait())
            end = batch.pop() if isinstance(batch[-1], _End) else None
            if batch:
                yield batch
            if end is not None:
                if end.exc is not None:
                    raise end.exc
                return
    finally:
        if not task.done():
            task.cancel()
            try:
                await task
            except BaseException:  # noqa: BLE001 - the cancellation we asked for
                pass


class Batched:
    """The gateway's side of coalesce(): iterate a replica's lists as single items; cancel() cancels the call."""

    def __init__(self, gen):
        self.gen, self.pending = gen, []

    def __aiter__(self):
        return self

    async def __anext__(self):
        while not self.pending:
            self.pending = list(await self.gen.__anext__())
        return self.pending.pop(0)

    def cancel(self) -> None:
        cancel_stream(self.gen)
