"""A small OpenAI-shaped app wired with governance: the reference for the gateway and the tests' server.

Its "model" echoes the last user message (after prompt redaction), one word per token, streamed in
3-character pieces so personal data is split across chunks. Run: python -m serving.governance.example_app
"""

from __future__ import annotations

import json
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, Response, StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from serving.governance.api import install
from serving.governance.core import Governance
from serving.governance.errors import GovernanceError, PIIBlocked

MODELS = {"echo-small": None, "echo-large": None, "sql-lora": "echo-small"}  # name -> base (adapters)


class Message(BaseModel):
    role: str = Field(..., max_length=32)
    content: str = Field(..., max_length=20000)


class ChatRequest(BaseModel):
    model_config = ConfigDict(extra="allow")

    model: str = Field(..., max_length=200)
    messages: list[Message] = Field(..., min_length=1, max_length=64)
    max_tokens: int = Field(64, ge=1, le=4096)
    stream: bool = False


class AdapterRequest(BaseModel):
    name: str = Field(..., min_length=1, max_length=100, pattern=r"^[A-Za-z0-9._-]+$")
    base: str = Field("echo-small", max_length=200)


def count_tokens(text: str) -> int:
    return len(text.split())


def _error(status: int, message: str, code: str, param: str | None = None) -> JSONResponse:
    kind = {404: "not_found_error", 400: "invalid_request_error", 422: "invalid_request_error"}.get(status, "invalid_request_error")
    return JSONResponse({"error": {"message": message, "type": kind, "param": param, "code": code}}, status_code=status)


def create_app(gov: Governance, registry=None) -> FastAPI:
    app = FastAPI(title="loraplex governance example")
    install(app, gov)
    models = dict(MODELS)

    @app.exception_handler(RequestValidationError)
    async def _invalid(request: Request, exc: RequestValidationError):
        err = exc.errors()[0] if exc.errors() else {"loc": (), "msg": "invalid request"}
        param = ".".join(str(p) for p in err["loc"] if p != "body") or None
        return _error(400, f"{param}: {err['msg']}" if param else err["msg"], "invalid_request", param)

    @app.get("/health")
    def health() -> dict:
        return {"status": "ok"}

    @app.get("/metrics")
    def metrics() -> Response:
        from prometheus_client import CONTENT_TYPE_LATEST, REGISTRY, generate_latest

        return Response(generate_latest(registry or REGISTRY), media_type=CONTENT_TYPE_LATEST)

    @app.get("/v1/models")
    def list_models(request: Request) -> dict:
        p = request.state.governance.principal
        allowed = [m for m, base in models.items()
                   if ((p.allows("adapters", m) and p.allows("models", base)) if base else p.allows("models", m))]
        return {"object": "list", "data": [{"id": m, "object": "model", "owned_by": "loraplex"} for m in allowed]}

    @app.post("/v1/adapters", status_code=201)
    def load_adapter(body: AdapterRequest) -> Any:
        if body.base not in models or models[body.base] is not None:
            return _error(404, f"no base model {body.base!r}", "model_not_found", "base")
        models[body.name] = body.base
        return {"name": body.name, "base": body.base}

    @app.delete("/v1/adapters/{name}")
    def unload_adapter(name: str) -> Any:
        if models.get(name) is None:
            return _error(404, f"no adapter {name!r}", "adapter_not_found", "name")
        del models[name]
        return {"name": name, "deleted": True}

    @app.post("/v1/fine_tuning/jobs", status_code=202)
    def fine_tune(body: dict) -> dict:
        return {"object": "fine_tuning.job", "status": "queued", "request": sorted(body)}

    @app.post("/v1/chat/completions")
    async def chat(body: ChatRequest, request: Request) -> Any:
        if body.model not in models:
            return _error(404, f"the model {body.model!r} does not exist", "model_not_found", "model")
        base, adapter = (models[body.model], body.model) if models[body.model] else (body.model, None)
        messages = [m.model_dump() for m in body.messages]
        prompt_tokens = sum(count_tokens(m["content"]) for m in messages)
        ticket = gov.admit(request, route="/v1/chat/completions", model=base, adapter=adapter, prompt=messages,
                           prompt_tokens=prompt_tokens, max_tokens=body.max_tokens)
        words = ticket.prompt[-1]["content"].split()[: body.max_tokens]
        text = " ".join(words)
        created, cid = int(time.time()), "chatcmpl-" + ticket.request_id
        if not body.stream:
            try:
                out = ticket.check_output(text)
            except PIIBlocked:
                ticket.settle(prompt_tokens, len(words), status=400)
                raise
            ticket.settle(prompt_tokens, len(words), content={"prompt": ticket.prompt, "output": out})
            return {"id": cid, "object": "chat.completion", "created": created, "model": body.model,
                    "choices": [{"index": 0, "message": {"role": "assistant", "content": out},
                                 "finish_reason": "length" if len(words) == body.max_tokens else "stop"}],
                    "usage": {"prompt_tokens": prompt_tokens, "completion_tokens": len(words),
                              "total_tokens": prompt_tokens + len(words)}}

        async def pieces():
            for i in range(0, len(text), 3):
                ticket.completion_tokens = count_tokens(text[: i + 3])
                yield text[i:i + 3]

        async def sse():
            def chunk(delta: dict, finish: str | None = None) -> str:
                return "data: " + json.dumps({"id": cid, "object": "chat.completion.chunk", "created": created,
                                              "model": body.model, "choices": [{"index": 0, "delta": delta,
                                                                                "finish_reason": finish}]}) + "\n\n"
            yield chunk({"role": "assistant", "content": ""})
            try:
                async for safe in ticket.guard_output(pieces()):
                    yield chunk({"content": safe})
            except GovernanceError as exc:
                ticket.settle(prompt_tokens, ticket.completion_tokens, status=exc.status)
                yield "data: " + json.dumps(exc.body()) + "\n\n"
                return
            ticket.settle(prompt_tokens, len(words))
            yield chunk({}, "stop")
            yield "data: [DONE]\n\n"

        return StreamingResponse(sse(), media_type="text/event-stream")

    return app


if __name__ == "__main__":
    import uvicorn

    from serving.pricing import Price

    uvicorn.run(create_app(Governance(prices={m: Price(1.0, 2.0) for m in MODELS})), host="127.0.0.1", port=8077)
