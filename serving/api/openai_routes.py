"""The FastAPI app of the gateway: OpenAI endpoints, /health, /ready, /metrics."""

from __future__ import annotations

from fastapi import FastAPI
from fastapi.responses import JSONResponse, Response, StreamingResponse

from serving.api.errors import install_error_handlers
from serving.api.metrics import CONTENT_TYPE
from serving.api.protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from serving.api.streaming import SSE_HEADERS


def create_app(core) -> FastAPI:
    """`core` is a serving.api.gateway.GatewayCore; extra APIRouters (RAG, training) are mounted as given."""
    app = FastAPI(title="loraplex", description="OpenAI-compatible API", version="0.1.0")
    install_error_handlers(app)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        return await core.readiness()

    @app.get("/metrics")
    async def metrics():
        await core.refresh_stats()
        return Response(core.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def list_models():
        return await core.models()

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str):
        return await core.model(model_id)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest):
        result = await core.chat(body)
        if isinstance(result, dict):
            return JSONResponse(result)
        return StreamingResponse(result, media_type="text/event-stream", headers=SSE_HEADERS)

    @app.post("/v1/completions")
    async def completions(body: CompletionRequest):
        result = await core.completion(body)
        if isinstance(result, dict):
            return JSONResponse(result)
        return StreamingResponse(result, media_type="text/event-stream", headers=SSE_HEADERS)

    @app.post("/v1/embeddings")
    async def embeddings(body: EmbeddingRequest):
        return await core.embeddings(body)

    for router in core.extra_routers:
        app.include_router(router)
    return app
