"""The FastAPI app of the gateway: the endpoint modules mounted on OpenAI's paths, /health, /ready, /metrics,
the portal's JSON views (/v1/catalog, /v1/operations) and the portal itself at /ui."""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.responses import JSONResponse, Response, StreamingResponse

from serving.api import catalog, chat, completions, embeddings, models, responses
from serving.api.errors import install_error_handlers
from serving.api.metrics import CONTENT_TYPE
from serving.api.protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest
from serving.api.streaming import SSE_HEADERS


def create_app(core) -> FastAPI:
    """`core` is a serving.api.gateway.GatewayCore; extra APIRouters (RAG, training) are mounted as given."""
    app = FastAPI(title="loraplex", description="OpenAI-compatible API", version="0.1.0")
    install_error_handlers(app)
    if core.governance is not None:  # keys, roles, limits, audit on /v1; /v1/usage and /v1/admin/* routes
        from serving.governance import install

        install(app, core.governance)

    @app.get("/health")
    async def health():
        return {"status": "ok"}

    @app.get("/ready")
    async def ready():
        return await core.deployments.readiness()

    @app.get("/metrics")
    async def metrics():
        await core.refresh_stats()
        return Response(core.metrics.render(), media_type=CONTENT_TYPE)

    @app.get("/v1/models")
    async def list_models(request: Request):
        return await models.list_models(core, request)

    @app.get("/v1/models/{model_id:path}")
    async def get_model(model_id: str, request: Request):
        return await models.get_model(core, model_id, request)

    @app.get("/v1/catalog")
    async def get_catalog(request: Request):
        return await catalog.catalog(core, request)

    @app.get("/v1/operations")
    async def get_operations(request: Request):
        return await catalog.operations(core, request)

    @app.post("/v1/chat/completions")
    async def chat_completions(body: ChatCompletionRequest, request: Request):
        result, headers = await chat.handle(core.pipeline, body, request)
        return _answer(result, headers)

    @app.post("/v1/completions")
    async def text_completions(body: CompletionRequest, request: Request):
        return _answer(await completions.handle(core.pipeline, body, request), {})

    @app.post("/v1/responses")
    async def create_response(body: responses.ResponsesRequest, request: Request):
        return _answer(await responses.create(core, body, request), {})

    @app.get("/v1/responses/{response_id}")
    async def get_response(response_id: str, request: Request):
        return await responses.retrieve(core, response_id, request)

    @app.delete("/v1/responses/{response_id}")
    async def delete_response(response_id: str, request: Request):
        return await responses.delete(core, response_id, request)

    @app.get("/v1/responses/{response_id}/input_items")
    async def list_input_items(response_id: str, request: Request, after: str | None = None,
                               before: str | None = None, limit: int = 20, order: str = "desc"):
        return await responses.input_items(core, response_id, request, after=after, before=before, limit=limit,
                                           order=order)

    @app.post("/v1/embeddings")
    async def create_embeddings(body: EmbeddingRequest, request: Request):
        return await embeddings.handle(core, body, request)

    for router in core.extra_routers:
        app.include_router(router)
    from serving.ui import mount

    mount(app)  # the portal at /ui: static files; every call it makes goes to the routes above
    return app


def _answer(result, headers: dict):
    """A whole body as JSON, or an SSE iterator as a streaming response."""
    if isinstance(result, dict):
        return JSONResponse(result, headers=headers)
    return StreamingResponse(result, media_type="text/event-stream", headers={**SSE_HEADERS, **headers})
