"""The one error vocabulary of the gateway: every area's errors (API, governance, routing, retrieval) are
ServiceErrors, which carry an HTTP status, OpenAI's error `type`, `param` and `code`, an optional Retry-After
and extra fields, and turn themselves into OpenAI's error JSON the same way. Areas keep their own subclasses
(with their own constructors and defaults); the gateway answers any of them with one handler.
"""

from __future__ import annotations

from typing import Any

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    409: "conflict_error",
    413: "invalid_request_error",
    422: "invalid_request_error",
    429: "rate_limit_error",
    503: "service_unavailable_error",
}


def error_type(status: int) -> str:
    return _TYPES.get(status, "server_error" if status >= 500 else "invalid_request_error")


class ServiceError(Exception):
    """An error answered as `{"error": {"message", "type", "param", "code", ...extra}}` with its status."""

    status: int = 500
    type: str = "server_error"
    code: str | None = None
    param: str | None = None
    retry_after: float | None = None
    extra: dict[str, Any] = {}

    def __init__(self, message: str, *, status: int | None = None, type: str | None = None,
                 param: str | None = None, code: str | None = None, retry_after: float | None = None,
                 extra: dict[str, Any] | None = None):
        super().__init__(message)
        self.message = message
        if status is not None:
            self.status = status
            if type is None and "type" not in vars(self.__class__):
                type = error_type(status)
        if type is not None:
            self.type = type
        if param is not None:
            self.param = param
        if code is not None:
            self.code = code
        if retry_after is not None:
            self.retry_after = retry_after
        self.extra = dict(extra or {})

    def body(self) -> dict:
        err = {"message": self.message, "type": self.type, "param": self.param, "code": self.code}
        err.update(self.extra)
        return {"error": err}

    def headers(self) -> dict[str, str]:
        headers = {}
        if self.retry_after is not None:
            headers["Retry-After"] = str(max(1, int(round(self.retry_after))))
        if self.status == 401:
            headers["WWW-Authenticate"] = 'Bearer realm="loraplex"'
        return headers

    def response(self):
        from fastapi.responses import JSONResponse

        return JSONResponse(self.body(), status_code=self.status, headers=self.headers())
