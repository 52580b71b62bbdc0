"""A fake model deployment for in-process gateway tests and the gateway-overhead benchmark.

It answers as a model replica does (serving.api.backend: an accepted item, then delta items), through the same
methods Ray Serve handles have (`options(stream=True).stream.remote(req)`, `await ready.remote()`, ...), so the
real FastAPI app, pipeline and output paths run in milliseconds without Ray or a model.
"""

from __future__ import annotations

import asyncio
import time

from serving.api.streaming import coalesce
from serving.api.tool_parsers import Hermes

MODEL = "fake-model"


class _Call:
    def __init__(self, fn):
        self.fn = fn

    def remote(self, *args, **kwargs):
        return self.fn(*args, **kwargs)


class FakeDeployment:
    """What serving.api.deployments needs of a Ray Serve handle. `script(req)` gives the texts to stream."""

    def __init__(self, script, fail_after: int | None = None):
        self.script, self.fail_after = script, fail_after
        self.requests: list[dict] = []
        self.stream = _Call(self._stream)
        self.ready = _Call(self._ready)
        self.models = _Call(self._models)
        self.stats = _Call(self._stats)

    def options(self, **_):
        return self

    async def _ready(self):
        return {"model": MODEL, "max_model_len": 512, "replica": "r1", "hf_id": "acme/fake", "aliases": []}

    async def _models(self):
        return [{"id": MODEL, "object": "model", "created": 0, "owned_by": "loraplex", "root": "acme/fake",
                 "parent": None}]

    async def _stats(self):
        return {"replica": "r1", "num_running": 0, "num_waiting": 0, "time": time.time()}

    def _stream(self, req):
        self.requests.append(req)
        return coalesce(self._gen(req))  # lists of items, as serving.app.LLMServer.stream sends them

    async def _gen(self, req):
        texts = self.script(req)
        yield {"kind": "accepted", "request_id": req["request_id"], "prompt_tokens": 7, "prompt_text": "P",
               "system_fingerprint": "fp_fake", "tool_format": Hermes() if req.get("tools") else None}
        n = req["sampling"].get("n", 1)
        for k, piece in enumerate(texts):
            if self.fail_after is not None and k == self.fail_after:
                raise RuntimeError("replica gone")
            last = k == len(texts) - 1
            yield {"kind": "delta", "finished": last, "num_cached_tokens": 0,
                   "choices": [{"index": i, "text": piece, "num_tokens": 1, "logprobs": None,
                                "finish_reason": "stop" if last else None} for i in range(n)]}
            await asyncio.sleep(0)
