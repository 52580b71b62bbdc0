"""Simulated deployments of known speed: an OpenAI-shaped chat server that answers after a modelled delay.

Each has `slots` concurrent requests (more wait in a queue, beyond `max_waiting` they get 429), a prompt
prefill speed and a time per output token. Failure modes (429, 500, drop mid-stream) are set per server,
so router tests and benchmarks drive real HTTP. Prompt tokens are whitespace words of the messages.
"""

from __future__ import annotations

import asyncio
import json
import socket
import threading
import time
import uuid
from dataclasses import dataclass

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, StreamingResponse


@dataclass
class SimSpec:
    name: str
    ttft_base_s: float = 0.01
    prefill_tok_s: float = 10000.0
    tpot_s: float = 0.005
    slots: int = 4
    max_waiting: int = 64
    context_length: int = 4096


class SimDeployment:
    """The queueing model; `fail` is None, 429, 500 or "drop" (close the stream after `drop_after` chunks)."""

    def __init__(self, spec: SimSpec):
        self.spec = spec
        self.fail: int | str | None = None
        self.drop_after = 1
        self.num_running = 0
        self.num_waiting = 0
        self.served = 0
        self.requests = 0  # every request that reached it, failed ones included
        self._sem: asyncio.Semaphore | None = None

    def stats(self) -> dict:
        return {
            "num_running": self.num_running,
            "num_waiting": self.num_waiting,
            "kv_usage": self.num_running / self.spec.slots,
            "max_num_seqs": self.spec.slots,
        }

    def full(self) -> bool:
        return self.num_running >= self.spec.slots and self.num_waiting >= self.spec.max_waiting

    async def tokens(self, prompt_tokens: int, max_tokens: int):
        """Yield output token indices at the modelled pace; queue for a slot first."""
        if self._sem is None:
            self._sem = asyncio.Semaphore(self.spec.slots)
        if self.full():
            raise OverflowError("queue full")
        self.num_waiting += 1
        try:
            await self._sem.acquire()
        finally:
            self.num_waiting -= 1
        self.num_running += 1
        try:
            await asyncio.sleep(self.spec.ttft_base_s + prompt_tokens / self.spec.prefill_tok_s)
            for i in range(max_tokens):
                if i:
                    await asyncio.sleep(self.spec.tpot_s)
                yield i
        finally:
            self.num_running -= 1
            self._sem.release()


def _error(status: int, message: str, code: str, headers=None) -> JSONResponse:
    etype = "rate_limit_error" if status == 429 else ("invalid_request_error" if status < 500 else "server_error")
    return JSONResponse(
        {"error": {"message": message, "type": etype, "param": None, "code": code}}, status, headers=headers
    )


def make_app(sim: SimDeployment) -> FastAPI:
    app = FastAPI()

    @app.get("/stats")
    async def stats():
        return sim.stats()

    @app.post("/control")
    async def control(request: Request):
        body = await request.json()
        sim.fail = body.get("fail")
        sim.drop_after = int(body.get("drop_after", 1))
        return {"fail": sim.fail}

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        body = await request.json()
        sim.requests += 1
        prompt = " ".join(str(m.get("content", "")) for m in body.get("messages", []))
        n_prompt = len(prompt.split())
        n_out = int(body.get("max_tokens") or 16)
        if sim.fail == 429:
            return _error(429, f"{sim.spec.name} overloaded", "queue_full", {"Retry-After": "1"})
        if sim.fail == 500:
            return _error(500, f"{sim.spec.name} crashed", "internal_error")
        if n_prompt + n_out > sim.spec.context_length:
            return _error(400, f"{n_prompt + n_out} tokens > {sim.spec.context_length}", "context_length_exceeded")
        if sim.full():
            return _error(429, f"{sim.spec.name} queue full", "queue_full", {"Retry-After": "1"})
        rid, created, model = f"chatcmpl-{uuid.uuid4().hex[:12]}", int(time.time()), body.get("model")
        usage = {"prompt_tokens": n_prompt, "completion_tokens": n_out, "total_tokens": n_prompt + n_out}

        if not body.get("stream"):
            try:
                async for _ in sim.tokens(n_prompt, n_out):
                    pass
            except OverflowError:
                return _error(429, f"{sim.spec.name} queue full", "queue_full", {"Retry-After": "1"})
            sim.served += 1
            return {
                "id": rid, "object": "chat.completion", "created": created, "model": model,
                "choices": [{"index": 0, "message": {"role": "assistant", "content": " ".join(["tok"] * n_out)},
                             "finish_reason": "length"}],
                "usage": usage,
            }

        async def events():
            sent = 0
            async for _ in sim.tokens(n_prompt, n_out):
                if sim.fail == "drop" and sent >= sim.drop_after:
                    raise ConnectionResetError("simulated drop mid-stream")  # the server aborts the response
                chunk = {"id": rid, "object": "chat.completion.chunk", "created": created, "model": model,
                         "choices": [{"index": 0, "delta": {"content": "tok "}, "finish_reason": None}]}
                sent += 1
                yield f"data: {json.dumps(chunk)}\n\n"
            sim.served += 1
            yield "data: [DONE]\n\n"

        return StreamingResponse(events(), media_type="text/event-stream")

    return app


def free_port() -> int:
    """A free port below the kernel's ephemeral range (32768+) and above Ray's worker ports (10002-19999): a port
    the kernel hands out for port 0 can be taken by Ray's own sockets before a server started later binds it."""
    import random

    for _ in range(200):
        port = random.randint(20000, 32000)
        with socket.socket() as s:
            try:
                s.bind(("127.0.0.1", port))
            except OSError:
                continue
            return port
    raise RuntimeError("no free port in 20000-32000")


class AppServer:
    """An ASGI app served by uvicorn on 127.0.0.1 in a background thread: `with AppServer(app) as s:`."""

    def __init__(self, app, name: str = "app"):
        import uvicorn

        self.name = name
        self.port = free_port()
        config = uvicorn.Config(app, host="127.0.0.1", port=self.port, log_level="warning", lifespan="off")
        self.server = uvicorn.Server(config)
        self.thread = threading.Thread(target=self.server.run, daemon=True)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/v1"

    def __enter__(self):
        self.thread.start()
        deadline = time.monotonic() + 20
        while not self.server.started:
            if time.monotonic() > deadline or not self.thread.is_alive():
                raise RuntimeError(f"server {self.name} did not start")
            time.sleep(0.02)
        return self

    def __exit__(self, *exc) -> None:
        self.server.should_exit = True
        self.thread.join(timeout=10)


class SimServer(AppServer):
    """A SimDeployment over HTTP: `with SimServer(spec) as s: s.url, s.sim`."""

    def __init__(self, spec: SimSpec):
        self.sim = SimDeployment(spec)
        super().__init__(make_app(self.sim), spec.name)
