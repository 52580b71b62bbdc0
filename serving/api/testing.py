"""A fake model deployment for in-process gateway tests and the gateway-overhead benchmark.

It answers as a model replica does (serving.api.backend: an accepted item, then delta items), through the same
methods Ray Serve handles have (`options(stream=True).stream.remote(req)`, `await ready.remote()`, ...), so the
real FastAPI app, pipeline and output paths run in milliseconds without Ray or a model.
"""

from __future__ import annotations

import asyncio
import time

from serving.api.local_model import LocalHandle, LocalCall
from serving.api.streaming import coalesce
from serving.api.tool_parsers import Hermes

MODEL = "fake-model"


class FakeDeployment(LocalHandle):
    """What serving.api.deployments needs of a Ray Serve handle. `script(req)` gives the texts to stream, one
    token each. `faults[k]` shapes the k-th call's replica: an int d loses it (Ray's ActorDiedError) after d deltas
    (-1: before it accepts), "full" makes it refuse with a full queue; later calls are healthy. A request with
    `resume` continues each choice after the tokens it names, as a model replica does. `stagger`: odd choices
    end a token earlier."""

    def __init__(self, script, fail_after: int | None = None, faults: list | None = None, stagger: bool = False):
        super().__init__(None)  # the calls below answer; LocalHandle streams and broadcasts them
        self.script, self.fail_after, self.stagger = script, fail_after, stagger
        self.faults = list(faults or [])
        self.requests: list[dict] = []
        self.stream = LocalCall(self._stream)
        self.ready = LocalCall(self._ready)
        self.models = LocalCall(self._models)
        self.stats = LocalCall(self._stats)

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
        from ray.exceptions import ActorDiedError

        call = len(self.requests)
        fault = self.faults[call - 1] if call <= len(self.faults) else None
        texts = self.script(req)
        if fault == -1:
            raise ActorDiedError()
        if fault == "full":
            yield {"kind": "error", "replica": f"r{call}", "error": {"status": 429, "message": "queue full",
                                                                     "type": "rate_limit_error", "code": "queue_full"}}
            return
        yield {"kind": "accepted", "request_id": req["request_id"], "prompt_tokens": 7, "prompt_text": "P",
               "system_fingerprint": "fp_fake", "tool_format": Hermes() if req.get("tools") else None,
               "seed": 1234 if req["sampling"].get("seed") is None else req["sampling"]["seed"], "replica": f"r{call}"}
        n = req["sampling"].get("n", 1)
        resume = req.get("resume")
        choices = sorted(resume) if resume else range(n)
        lengths = {i: len(texts) - (i % 2 if self.stagger else 0) for i in choices}
        start = {i: len(resume[i]) if resume else 0 for i in choices}
        for step, k in enumerate(range(min(start.values()), len(texts))):
            if self.fail_after is not None and k == self.fail_after:
                raise RuntimeError("replica gone")
            if isinstance(fault, int) and step == fault:
                raise ActorDiedError()
            out = [{"index": i, "text": texts[k], "token_ids": [k], "num_tokens": 1, "logprobs": None,
                    "finish_reason": "stop" if k == lengths[i] - 1 else None}
                   for i in choices if start[i] <= k < lengths[i]]
            yield {"kind": "delta", "finished": k == len(texts) - 1, "num_cached_tokens": 0, "choices": out}
            await asyncio.sleep(0)
