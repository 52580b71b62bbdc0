"""serving.api.streaming: the replica's coalesced lists and the gateway's flattening of them."""

import asyncio

import pytest

from serving.api.streaming import Batched, coalesce


def test_items_ready_together_travel_as_one_list():
    async def source(log):
        try:
            yield 1
            await asyncio.sleep(0.01)
            for i in (2, 3, 4):  # produced without a pause: one list
                yield i
            await asyncio.sleep(0.01)
            yield 5
        finally:
            log.append("closed")

    async def run():
        log = []
        batches = [b async for b in coalesce(source(log))]
        return batches, log

    batches, log = asyncio.run(run())
    assert batches == [[1], [2, 3, 4], [5]] and log == ["closed"]


def test_errors_reach_the_consumer_after_the_items_before_them():
    async def source():
        yield "a"
        raise RuntimeError("replica gone")

    async def run():
        got = []
        with pytest.raises(RuntimeError, match="replica gone"):
            async for b in coalesce(source()):
                got.append(b)
        return got

    assert asyncio.run(run()) == [["a"]]


def test_closing_early_closes_the_source_and_batched_flattens():
    async def source(log):
        try:
            for i in range(1000):
                yield i
                await asyncio.sleep(0)
        finally:
            log.append("closed")

    async def run():
        log = []
        gen = coalesce(source(log))
        flat = Batched(gen)
        first = [await anext(flat) for _ in range(3)]
        await gen.aclose()  # the gateway cancelled the call: the engine request must be aborted
        await asyncio.sleep(0)
        return first, log

    first, log = asyncio.run(run())
    assert first == [0, 1, 2] and log == ["closed"]
