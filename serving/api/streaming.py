"""Server-sent events and the merge of several replica streams (one per completions prompt)."""

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
