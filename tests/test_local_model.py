"""A colocated model (`colocate: true`): its replica in the gateway's process, behind the handle calls the gateway
makes (serving.api.local_model).

The stream runs in a task of its own: items arrive in order, a replica's error reaches the reader, and cancelling
the stream aborts the engine request (its slot is free again) wherever the reader is. The real default model behind
the real FastAPI app answers greedy completions token for token as HF transformers does.
"""

from __future__ import annotations

import asyncio
import json

import httpx
import pytest

from serving.api.local_model import LocalHandle, StreamCancelled
from serving.config import parse_config
from tests.serve_helpers import MODEL


class _Replica:
    def __init__(self):
        self.closed = []

    async def stream(self, req):
        try:
            for i in range(req["n"]):
                if i == req.get("fail_at"):
                    raise RuntimeError("the engine broke")
                yield i
                await asyncio.sleep(req.get("pause", 0))
        finally:
            self.closed.append(req["n"])

    async def stats(self):
        return {"replica": "here"}

    def broken(self):
        raise ValueError("no stats")


def test_a_local_stream_yields_in_order_and_passes_errors_on():
    async def go():
        handle = LocalHandle(_Replica())
        items = [i async for i in handle.options(stream=True).stream.remote({"n": 5})]
        gen = handle.options(stream=True).stream.remote({"n": 5, "fail_at": 2})
        got = [await gen.__anext__(), await gen.__anext__()]
        with pytest.raises(RuntimeError, match="the engine broke"):
            await gen.__anext__()
        return items, got, handle.target.closed

    items, got, closed = asyncio.run(go())
    assert items == [0, 1, 2, 3, 4] and got == [0, 1] and closed == [5, 5]


def test_cancelling_a_local_stream_closes_the_replica_generator_under_a_waiting_reader():
    async def go():
        handle = LocalHandle(_Replica())
        gen = handle.options(stream=True).stream.remote({"n": 1000, "pause": 0.01})
        assert await gen.__anext__() == 0
        reader = asyncio.ensure_future(gen.__anext__())  # blocked while the replica pauses
        await asyncio.sleep(0.001)
        gen.cancel()
        gen.cancel()  # twice is harmless
        with pytest.raises(StreamCancelled):
            while True:
                await reader
                reader = asyncio.ensure_future(gen.__anext__())
        await asyncio.sleep(0)
        return handle.target.closed

    assert asyncio.run(go()) == [1000]  # the generator's finally ran: the backend aborts its request there


def test_broadcast_answers_for_the_one_local_replica():
    async def go():
        handle = LocalHandle(_Replica())
        ok = await handle.broadcast("stats").results_async(timeout_s=5, return_exceptions=True)
        bad = await handle.broadcast("broken").results_async(timeout_s=5, return_exceptions=True)
        return ok, bad, await handle.stats.remote()

    ok, bad, direct = asyncio.run(go())
    assert ok == [{"replica": "here"}] and direct == {"replica": "here"}
    assert len(bad) == 1 and isinstance(bad[0], ValueError)


@pytest.fixture(scope="module")
def colocated(tmp_path_factory, default_model_path):
    """The default model (float32) as a ModelReplica in this process, behind the gateway's FastAPI app."""
    from serving.app import ModelReplica

    home = tmp_path_factory.mktemp("colocated")
    mp = pytest.MonkeyPatch()
    mp.setenv("LORAPLEX_HOME", str(home))
    cfg = parse_config({"models": [{"name": MODEL, "colocate": True, "dtype": "float32", "max_num_seqs": 4,
                                    "kv_cache_memory": "64MiB", "max_model_len": 512}],
                        "embeddings": {"enabled": False}, "rag": {"enabled": False},
                        "fine_tuning": {"enabled": False}, "governance": {"enabled": False}})
    replica = ModelReplica()
    asyncio.run(replica.load(cfg.models[0].model_dump(), {}, []))
    try:
        yield cfg, replica
    finally:
        replica.shutdown()
        mp.undo()


def _client(cfg, replica):
    from serving.api.gateway import GatewayCore
    from serving.api.openai_routes import create_app

    core = GatewayCore(cfg, {MODEL: LocalHandle(replica)})
    core.deployments.ready.add(MODEL)
    core.deployments.context[MODEL] = replica.backend.engine.max_model_len
    return httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(core)), base_url="http://test")


def test_the_colocated_default_model_answers_as_hf_transformers(colocated, default_model_path):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    cfg, replica = colocated
    prompt = "The capital of France is"
    tok = AutoTokenizer.from_pretrained(default_model_path)
    hf = AutoModelForCausalLM.from_pretrained(default_model_path, dtype=torch.float32)
    ids = tok(prompt, return_tensors="pt").input_ids
    want = tok.decode(hf.generate(ids, max_new_tokens=12, do_sample=False)[0, ids.shape[1]:])

    async def go():
        async with _client(cfg, replica) as client:
            body = {"model": MODEL, "prompt": prompt, "max_tokens": 12, "temperature": 0, "ignore_eos": True}
            whole = (await client.post("/v1/completions", json=body)).json()
            streamed = await client.post("/v1/completions", json={**body, "stream": True})
            return whole, streamed.text

    whole, sse = asyncio.run(go())
    events = [json.loads(line[6:]) for line in sse.splitlines() if line.startswith("data: {")]
    assert whole["choices"][0]["text"] == want and whole["usage"]["completion_tokens"] == 12
    assert "".join(c["text"] for e in events for c in e["choices"]) == want


def test_a_cancelled_colocated_stream_frees_its_engine_slot(colocated):
    cfg, replica = colocated

    async def go():
        handle = LocalHandle(replica)
        req = {"kind": "completion", "prompt": "Count slowly:", "request_id": "gone-early",
               "sampling": {"max_tokens": 400, "temperature": 0, "ignore_eos": True}}
        gen = handle.options(stream=True).stream.remote(req)
        seen = 0
        async for batch in gen:
            seen += sum(1 for item in batch if item["kind"] == "delta")
            if seen >= 2:
                break
        running = (await handle.stats.remote())["num_running"]
        gen.cancel()
        for _ in range(200):
            await asyncio.sleep(0.05)
            if (await handle.stats.remote())["num_running"] == 0:
                return running, True
        return running, False

    running, freed = asyncio.run(go())
    assert running == 1 and freed


def test_a_colocated_replica_outside_ray_never_starts_ray(colocated):
    import ray

    cfg, replica = colocated
    stats = asyncio.run(LocalHandle(replica).stats.remote())
    assert stats["node"] is None and not ray.is_initialized()  # a Ray started here would die with later tests
