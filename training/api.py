"""OpenAI-compatible fine-tuning and files endpoints, as a FastAPI router the gateway mounts.

    app.include_router(build_router(JobManager(gateway_url="http://127.0.0.1:8000")))

Bodies are parsed by hand rather than by FastAPI's validation so that every client mistake comes back in
OpenAI's error shape {"error": {"message", "type", "param", "code"}} with a 4xx, never a 422 `detail`.
"""

from __future__ import annotations

import asyncio
import json

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, PlainTextResponse

from training.jobs import JobError, JobManager


def error_response(message: str, *, status: int = 400, param: str | None = None,
                   code: str | None = "invalid_request_error", type_: str = "invalid_request_error") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}}, status_code=status)


def _from_job_error(exc: JobError) -> JSONResponse:
    return error_response(exc.message, status=exc.status, param=exc.param, code=exc.code)


def _limit(request: Request) -> int | JSONResponse:
    raw = request.query_params.get("limit", "20")
    try:
        value = int(raw)
    except ValueError:
        return error_response(f"limit must be an integer, got {raw!r}", param="limit")
    if not 1 <= value <= 100:
        return error_response("limit must be between 1 and 100", param="limit")
    return value


def _parse_multipart(content_type: str, body: bytes) -> tuple[dict[str, str], dict[str, tuple[str, bytes]]]:
    """multipart/form-data with the stdlib email parser (no python-multipart dependency)."""
    from email.parser import BytesParser
    from email.policy import HTTP

    msg = BytesParser(policy=HTTP).parsebytes(b"Content-Type: " + content_type.encode() + b"\r\n\r\n" + body)
    fields: dict[str, str] = {}
    files: dict[str, tuple[str, bytes]] = {}
    if not msg.is_multipart():
        return fields, files
    for part in msg.iter_parts():
        name = part.get_param("name", header="content-disposition")
        if not name:
            continue
        payload = part.get_payload(decode=True) or b""
        filename = part.get_filename()
        if filename is not None:
            files[name] = (filename, payload)
        else:
            fields[name] = payload.decode("utf-8", errors="replace")
    return fields, files


def build_router(manager: JobManager | None = None) -> APIRouter:
    """The /v1/files and /v1/fine_tuning/jobs routes over one JobManager (created on first use if None)."""
    router = APIRouter()
    state: dict = {"manager": manager}

    def mgr() -> JobManager:
        if state["manager"] is None:
            state["manager"] = JobManager()
        return state["manager"]

    async def call(fn, *args):
        """Run a blocking manager call off the event loop; JobError -> OpenAI error."""
        try:
            return await asyncio.to_thread(fn, *args)
        except JobError as exc:
            return _from_job_error(exc)

    # ---------------------------------------------------------------- files
    @router.post("/v1/files")
    async def create_file(request: Request):
        ctype = request.headers.get("content-type", "")
        if not ctype.startswith("multipart/form-data"):
            return error_response("expected multipart/form-data with fields 'file' and 'purpose'", param="file")
        fields, files = _parse_multipart(ctype, await request.body())
        purpose = fields.get("purpose")
        if "file" not in files:
            return error_response("'file' is required (a multipart file)", param="file")
        if not purpose:
            return error_response("'purpose' is required", param="purpose")
        filename, content = files["file"]
        return await call(mgr().create_file, filename or "upload.jsonl", content, purpose)

    @router.get("/v1/files")
    async def list_files(request: Request):
        data = await call(mgr().list_files, request.query_params.get("purpose"))
        if isinstance(data, JSONResponse):
            return data
        return {"object": "list", "data": data, "has_more": False}

    @router.get("/v1/files/{file_id}")
    async def retrieve_file(file_id: str):
        return await call(mgr().get_file, file_id)

    @router.get("/v1/files/{file_id}/content")
    async def file_content(file_id: str):
        path = await call(mgr().file_path, file_id)
        if isinstance(path, JSONResponse):
            return path
        return PlainTextResponse(path.read_text(errors="replace"))

    @router.delete("/v1/files/{file_id}")
    async def delete_file(file_id: str):
        return await call(mgr().delete_file, file_id)

    # ---------------------------------------------------------------- jobs
    @router.post("/v1/fine_tuning/jobs")
    async def create_job(request: Request):
        try:
            body = json.loads(await request.body() or b"{}")
        except (json.JSONDecodeError, UnicodeDecodeError) as exc:
            return error_response(f"the request body is not valid JSON: {exc}")
        if not isinstance(body, dict):
            return error_response("the request body must be a JSON object")
        for key in ("model", "training_file", "suffix", "validation_file"):
            if body.get(key) is not None and not isinstance(body[key], str):
                return error_response(f"{key} must be a string", param=key)
        if body.get("hyperparameters") is not None and not isinstance(body["hyperparameters"], dict):
            return error_response("hyperparameters must be an object", param="hyperparameters")
        return await call(mgr().create_job, body)

    @router.get("/v1/fine_tuning/jobs")
    async def list_jobs(request: Request):
        limit = _limit(request)
        if isinstance(limit, JSONResponse):
            return limit
        res = await call(mgr().list_jobs, request.query_params.get("after"), limit)
        if isinstance(res, JSONResponse):
            return res
        data, has_more = res
        return {"object": "list", "data": data, "has_more": has_more}

    @router.get("/v1/fine_tuning/jobs/{job_id}")
    async def retrieve_job(job_id: str):
        return await call(mgr().get_job, job_id)

    @router.post("/v1/fine_tuning/jobs/{job_id}/cancel")
    async def cancel_job(job_id: str):
        return await call(mgr().cancel, job_id)

    @router.get("/v1/fine_tuning/jobs/{job_id}/events")
    async def job_events(job_id: str, request: Request):
        limit = _limit(request)
        if isinstance(limit, JSONResponse):
            return limit
        res = await call(mgr().events, job_id, request.query_params.get("after"), limit)
        if isinstance(res, JSONResponse):
            return res
        data, has_more = res
        return {"object": "list", "data": data, "has_more": has_more}

    return router


def make_app(manager: JobManager | None = None):
    """A standalone app with just these routes (tests; `uvicorn --factory training.api:make_app`)."""
    from fastapi import FastAPI

    app = FastAPI(title="loraplex fine-tuning")
    app.include_router(build_router(manager))
    return app
