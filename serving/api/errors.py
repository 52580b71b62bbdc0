"""The API layer's errors and the gateway's error handlers: any serving.errors.ServiceError (API, governance,
router, retrieval) answers as OpenAI's `{"error": {"message", "type", "param", "code"}}` with its status."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from serving.errors import ServiceError, error_type

log = logging.getLogger("loraplex.api")

class APIError(ServiceError):
    """An error of the API layer (serving.errors.ServiceError with the status first, as HTTP reads)."""

    def __init__(
        self,
        status: int,
        message: str,
        *,
        param: str | None = None,
        code: str | None = None,
        type: str | None = None,
        retry_after: float | None = None,
    ):
        super().__init__(message, status=status, type=type or error_type(status), param=param, code=code,
                         retry_after=retry_after)

    def to_dict(self) -> dict:
        """A picklable form, sent from a model deployment to the gateway."""
        return {
            "status": self.status,
            "message": self.message,
            "param": self.param,
            "code": self.code,
            "type": self.type,
            "retry_after": self.retry_after,
        }

    @classmethod
    def from_dict(cls, d: dict) -> "APIError":
        return cls(
            d["status"], d["message"], param=d.get("param"), code=d.get("code"), type=d.get("type"),
            retry_after=d.get("retry_after"),
        )

    @classmethod
    def from_engine(cls, exc: Exception) -> "APIError":
        """Map serving.engine errors (InvalidRequestError, ContextLengthExceededError, ...) to API errors."""
        status = getattr(exc, "status", 500)
        return cls(
            status,
            getattr(exc, "message", None) or str(exc),
            param=getattr(exc, "param", None),
            code=getattr(exc, "code", None),
            type=getattr(exc, "type", None),
            retry_after=getattr(exc, "retry_after", None),
        )


def not_found_model(model: str, known: list[str]) -> APIError:
    return APIError(
        404,
        f"The model `{model}` does not exist. Available models: {', '.join(known) or 'none'}.",
        param="model",
        code="model_not_found",
    )


_UNION_TAGS = {"str", "int", "float", "bool", "dict", "list", "none", "ContentPart", "StreamOptions"}


def field_path(loc: tuple | list) -> str:
    """('body', 'messages', 0, 'role') -> 'messages[0].role' (OpenAI's `param` style)."""
    parts = [p for p in loc if p not in ("body", "query", "path", "header")]
    out = ""
    for p in parts:
        if isinstance(p, int):
            out += f"[{p}]"
        elif "[" in str(p) or p in _UNION_TAGS or str(p).startswith(("function-", "tagged-union")):
            continue  # pydantic's union-member / validator markers, not fields
        else:
            out += f".{p}" if out else str(p)
    return out


def validation_error(errors: list[dict]) -> APIError:
    """The first pydantic error, as a 400 naming the field; the others are appended to the message."""
    if not errors:
        return APIError(400, "Invalid request.")
    first = errors[0]
    param = None if first.get("type") == "json_invalid" else (field_path(first.get("loc", ())) or None)
    msgs: list[str] = []
    for err in errors[:5]:
        where = field_path(err.get("loc", ()))
        msg = str(err.get("msg", "invalid value")).removeprefix("Value error, ")
        if err.get("type") == "missing":
            msg = "is required"
        elif err.get("type") == "json_invalid":
            msgs.append("the request body is not valid JSON")
            continue
        line = f"'{where}': {msg}" if where else msg
        if line not in msgs:
            msgs.append(line)
    return APIError(400, "Invalid request: " + "; ".join(msgs), param=param, code="invalid_value")


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(ServiceError)  # every area's errors (API, governance, router, retrieval)
    async def _service_error(_: Request, exc: ServiceError):
        return exc.response()

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError):
        return validation_error(list(exc.errors())).response()

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException):
        msg = exc.detail if isinstance(exc.detail, str) else "HTTP error"
        if exc.status_code == 404:
            msg = f"Unknown endpoint: {msg}" if msg != "Not Found" else "Unknown endpoint."
        return APIError(exc.status_code, msg).response()

    @app.exception_handler(Exception)
    async def _internal(_: Request, exc: Exception):
        log.exception("internal error")
        return APIError(500, f"Internal server error: {type(exc).__name__}", type="server_error").response()
