"""The collections API as a FastAPI APIRouter (the gateway mounts it): OpenAI-style errors, never a 500 for a
client mistake.

    POST   /v1/collections                          {"name", "embedding_model"?, "index"?, "index_params"?,
                                                     "chunk_tokens"?, "chunk_overlap"?}
    GET    /v1/collections                          GET/DELETE /v1/collections/{name}
    POST   /v1/collections/{name}/documents         JSON {"documents": [{"id"?, "text", "metadata"?}]}, or
                                                    multipart: files=..., ids=... (one per file), metadata=JSON
                                                    (an object for all files or a list, one per file)
    GET    /v1/collections/{name}/documents         DELETE /v1/collections/{name}/documents/{id}
    POST   /v1/collections/{name}/query             {"query" | "embedding", "k"?, "filter"?}

`service` is a CollectionService, a Ray Serve handle to the retriever deployment, or a zero-argument callable
returning either (resolved on each request, so the gateway can start the service later).
"""

from __future__ import annotations

import base64
import binascii
import functools
import json
import logging
from email.parser import BytesParser
from email.policy import HTTP

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from starlette.concurrency import run_in_threadpool

from serving.rag.errors import InvalidInputError, RagError

log = logging.getLogger(__name__)
MAX_BODY_BYTES = 64 * 1024 * 1024
_CREATE_FIELDS = {"name", "embedding_model", "index", "index_params", "chunk_tokens", "chunk_overlap"}
_QUERY_FIELDS = {"query", "embedding", "k", "filter"}


def as_rag_error(exc: BaseException) -> RagError | None:
    """The RagError inside `exc`, also when Ray wrapped it (RayTaskError carries it as .cause)."""
    for _ in range(5):  # Ray's wrapper is an instance of the cause's class without its fields: unwrap first
        cause = getattr(exc, "cause", None)
        if isinstance(cause, BaseException):
            exc = cause
            continue
        return exc if isinstance(exc, RagError) else None
    return None


def error_response(status: int, message: str, type_: str = "invalid_request_error", param=None, code=None):
    return JSONResponse({"error": {"message": message, "type": type_, "param": param, "code": code}},
                        status_code=status)


def _error(exc: RagError) -> JSONResponse:
    return exc.response()


async def _json_body(request: Request) -> dict:
    raw = await request.body()
    if len(raw) > MAX_BODY_BYTES:
        raise InvalidInputError(f"request body is larger than {MAX_BODY_BYTES} bytes", code="body_too_large")
    try:
        body = json.loads(raw or b"null")
    except ValueError as exc:
        raise InvalidInputError(f"request body is not valid JSON: {exc}", code="invalid_json") from None
    if not isinstance(body, dict):
        raise InvalidInputError("request body must be a JSON object", code="invalid_json")
    return body


def _check_fields(body: dict, allowed: set[str]) -> None:
    unknown = set(body) - allowed
    if unknown:
        raise InvalidInputError(f"unknown fields: {', '.join(sorted(unknown))} (allowed: {', '.join(sorted(allowed))})",
                                param=sorted(unknown)[0], code="unknown_field")


def _multipart_documents(content_type: str, raw: bytes) -> list[dict]:
    """files / ids / metadata form fields -> documents for CollectionService.add_documents."""
    msg = BytesParser(policy=HTTP).parsebytes(f"Content-Type: {content_type}\r\n\r\n".encode("latin-1") + raw)
    if not msg.is_multipart():
        raise InvalidInputError("malformed multipart body", param="files")
    files, ids, metadata = [], [], None
    for part in msg.iter_parts():
        field = part.get_param("name", header="content-disposition")
        data = part.get_payload(decode=True) or b""
        if field == "files" or (field is None and part.get_filename()):
            name = part.get_filename()
            if not name:
                raise InvalidInputError("every part in 'files' needs a filename", param="files")
            files.append({"name": name, "data": data})
        elif field == "ids":
            ids.append(data.decode("utf-8").strip())
        elif field == "metadata":
            try:
                metadata = json.loads(data.decode("utf-8"))
            except ValueError as exc:
                raise InvalidInputError(f"metadata is not valid JSON: {exc}", param="metadata") from None
        else:
            raise InvalidInputError(f"unknown form field {field!r} (use files, ids, metadata)", param=field)
    if not files:
        raise InvalidInputError("no files in the form (field 'files')", param="files")
    if ids and len(ids) != len(files):
        raise InvalidInputError(f"{len(ids)} ids for {len(files)} files", param="ids")
    if isinstance(metadata, list) and len(metadata) != len(files):
        raise InvalidInputError(f"{len(metadata)} metadata objects for {len(files)} files", param="metadata")
    if metadata is not None and not isinstance(metadata, (dict, list)):
        raise InvalidInputError("metadata must be a JSON object or a list of them", param="metadata")
    docs = []
    for i, f in enumerate(files):
        doc = {"file": f}
        if ids:
            doc["id"] = ids[i]
        meta = metadata[i] if isinstance(metadata, list) else metadata
        if meta is not None:
            doc["metadata"] = meta
        docs.append(doc)
    return docs


def _json_documents(body: dict) -> list:
    _check_fields(body, {"documents"})
    docs = body.get("documents")
    if not isinstance(docs, list):
        raise InvalidInputError("documents must be a list", param="documents")
    out = []
    for i, doc in enumerate(docs):
        if isinstance(doc, dict) and "file" in doc:  # {"file": {"name": "a.pdf", "data_base64": "..."}}
            f = doc["file"]
            if not isinstance(f, dict) or not isinstance(f.get("name"), str) or not isinstance(
                    f.get("data_base64"), str):
                raise InvalidInputError(f"documents[{i}].file must be {{\"name\": str, \"data_base64\": str}}",
                                        param=f"documents[{i}].file")
            try:
                data = base64.b64decode(f["data_base64"], validate=True)
            except (binascii.Error, ValueError):
                raise InvalidInputError(f"documents[{i}].file.data_base64 is not valid base64",
                                        param=f"documents[{i}].file.data_base64") from None
            doc = {**doc, "file": {"name": f["name"], "data": data}}
        out.append(doc)
    return out


def build_router(service, prefix: str = "/v1") -> APIRouter:
    """The collections router; mount with app.include_router(build_router(service))."""
    router = APIRouter(prefix=prefix, tags=["collections"])
    lazy = callable(service) and not hasattr(service, "query")

    async def call(method: str, *args, **kwargs):
        svc = service() if lazy else service
        fn = getattr(svc, method)
        if hasattr(fn, "remote"):  # a Ray Serve DeploymentHandle
            return await fn.remote(*args, **kwargs)
        return await run_in_threadpool(functools.partial(fn, *args, **kwargs))

    def endpoint(func):
        @functools.wraps(func)
        async def wrapper(*args, **kwargs):
            try:
                return await func(*args, **kwargs)
            except Exception as exc:  # noqa: BLE001 - every client mistake becomes an OpenAI-style error
                rag = as_rag_error(exc)
                if rag is not None:
                    return _error(rag)
                log.exception("collections API: internal error")
                return error_response(500, f"internal error: {type(exc).__name__}", "server_error")

        return wrapper

    @router.post("/collections")
    @endpoint
    async def create_collection(request: Request):
        body = await _json_body(request)
        _check_fields(body, _CREATE_FIELDS)
        if "name" not in body:
            raise InvalidInputError("name is required", param="name", code="missing_field")
        return JSONResponse(await call("create_collection", body["name"], body.get("embedding_model"),
                                       body.get("index", "flat"), body.get("index_params"),
                                       body.get("chunk_tokens"), body.get("chunk_overlap")))

    @router.get("/collections")
    @endpoint
    async def list_collections():
        return {"object": "list", "data": await call("list_collections")}

    @router.get("/collections/{name}")
    @endpoint
    async def get_collection(name: str):
        return await call("get_collection", name)

    @router.delete("/collections/{name}")
    @endpoint
    async def delete_collection(name: str):
        return await call("delete_collection", name)

    @router.post("/collections/{name}/documents")
    @endpoint
    async def add_documents(name: str, request: Request):
        ctype = request.headers.get("content-type", "")
        if ctype.startswith("multipart/form-data"):
            raw = await request.body()
            if len(raw) > MAX_BODY_BYTES:
                raise InvalidInputError(f"upload is larger than {MAX_BODY_BYTES} bytes", code="body_too_large")
            docs = _multipart_documents(ctype, raw)
        else:
            docs = _json_documents(await _json_body(request))
        return await call("add_documents", name, docs)

    @router.get("/collections/{name}/documents")
    @endpoint
    async def list_documents(name: str):
        return await call("list_documents", name)

    @router.get("/collections/{name}/chunks")
    @endpoint
    async def document_chunks(name: str, document_id: str = ""):
        """A document's chunks (document_id is a query parameter: ids may contain '/')."""
        return await call("document_chunks", name, document_id)

    @router.delete("/collections/{name}/documents/{doc_id:path}")
    @endpoint
    async def delete_document(name: str, doc_id: str):
        return await call("delete_document", name, doc_id)

    @router.post("/collections/{name}/query")
    @endpoint
    async def query(name: str, request: Request):
        body = await _json_body(request)
        _check_fields(body, _QUERY_FIELDS)
        return await call("query", name, body.get("query"), k=body.get("k", 5), filter=body.get("filter"),
                          embedding=body.get("embedding"))

    return router
