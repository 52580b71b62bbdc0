"""Typed router errors. Each carries the HTTP status and OpenAI-style `type`/`code` the gateway answers with.

Candidate errors are what a gateway's `call(candidate)` raises (or what `classify` maps engine/httpx errors
to); they make the router try the next candidate. Route errors end the request.
"""

from __future__ import annotations

from serving.errors import ServiceError


class RouterError(ServiceError):
    status = 500
    type = "server_error"

    def __init__(self, message: str):
        super().__init__(message)


# -- configuration -------------------------------------------------------------------------------------------


class RouteConfigError(RouterError, ValueError):
    """An invalid routes config; the message names the route, candidate and field."""

    code = "route_config_error"


# -- client mistakes (400) ------------------------------------------------------------------------------------


class RouteRequestError(RouterError, ValueError):
    """A bad per-request routing override (header or body field); `param` names it."""

    status = 400
    type = "invalid_request_error"
    code = "invalid_route_override"

    def __init__(self, message: str, param: str | None = None):
        super().__init__(message)
        self.param = param


class UnknownRouteError(RouteRequestError):
    code = "model_not_found"
    status = 404

    def __init__(self, route: str, known: list[str]):
        super().__init__(f"unknown route {route!r}; routes: {', '.join(sorted(known)) or '(none)'}", "model")
        self.route = route


class RouteContextOverflow(RouteRequestError):
    """The request fits no candidate's context window."""

    code = "context_length_exceeded"

    def __init__(self, message: str):
        super().__init__(message, "messages")


# -- candidate failures: the router falls back to the next candidate ------------------------------------------


class CandidateError(RouterError):
    """One candidate failed in a way another candidate may not; `reason` labels metrics and logs."""

    reason = "error"


class CandidateOverloaded(CandidateError):
    status = 429
    type = "rate_limit_error"
    code = "overloaded"
    reason = "overloaded"

    def __init__(self, message: str = "deployment overloaded", retry_after: float = 1.0):
        super().__init__(message)
        self.retry_after = retry_after


class CandidateContextOverflow(CandidateError):
    status = 400
    type = "invalid_request_error"
    code = "context_length_exceeded"
    reason = "context_overflow"


class CandidateServerError(CandidateError):
    """A 5xx answer, a dropped connection or a timeout."""

    status = 502
    reason = "server_error"


# -- the route cannot answer -----------------------------------------------------------------------------------


class NoCandidateAvailable(RouterError):
    """Every candidate of the route is down, overloaded or failed this request: the gateway answers 503."""

    status = 503
    type = "server_error"
    code = "no_candidate_available"

    def __init__(self, route: str, reasons: list[str], retry_after: float = 1.0):
        detail = "; ".join(reasons) if reasons else "no candidates"
        super().__init__(f"route {route!r} has no available candidate: {detail}")
        self.route = route
        self.reasons = reasons
        self.retry_after = retry_after


class StreamFailedAfterFirstChunk(RouterError):
    """A stream broke after its first chunk reached the client; it is never retried elsewhere."""

    status = 502
    code = "stream_interrupted"


def classify(exc: BaseException) -> CandidateError | None:
    """Map a call's exception to a CandidateError (fall back) or None (a client error: re-raise as is).

    Understands our own CandidateError, the engine's typed errors, and httpx status/transport errors, so a
    gateway may let those propagate from `call(candidate)` unchanged.
    """
    if isinstance(exc, CandidateError):
        return exc
    try:  # the engine's errors (in-process deployments)
        from serving.engine.errors import ContextLengthExceededError, EngineError, EngineOverloadedError
    except ImportError:  # pragma: no cover - the engine package is part of this repo
        EngineError = ContextLengthExceededError = EngineOverloadedError = ()  # type: ignore[assignment]
    if EngineOverloadedError and isinstance(exc, EngineOverloadedError):
        return CandidateOverloaded(str(exc), getattr(exc, "retry_after", 1.0))
    if ContextLengthExceededError and isinstance(exc, ContextLengthExceededError):
        return CandidateContextOverflow(str(exc))
    if EngineError and isinstance(exc, EngineError):
        return CandidateServerError(str(exc)) if getattr(exc, "status", 500) >= 500 else None
    try:
        import httpx
    except ImportError:  # pragma: no cover
        httpx = None
    if httpx is not None and isinstance(exc, httpx.HTTPStatusError):
        return from_http_status(exc.response.status_code, _error_text(exc.response), exc.response.headers)
    if httpx is not None and isinstance(exc, (httpx.TransportError, httpx.TimeoutException)):
        return CandidateServerError(f"{type(exc).__name__}: {exc}")
    status = getattr(exc, "status", None)  # OpenAI-shaped API errors (serving.api.errors.APIError and alike)
    if isinstance(status, int) and not isinstance(status, bool):
        message = str(getattr(exc, "message", exc))
        if status == 429:
            return CandidateOverloaded(message, float(getattr(exc, "retry_after", None) or 1.0))
        if getattr(exc, "code", None) == "context_length_exceeded":
            return CandidateContextOverflow(message)
        return CandidateServerError(f"HTTP {status}: {message}") if status >= 500 else None
    if isinstance(exc, (ConnectionError, TimeoutError)) or type(exc).__module__.startswith("ray."):
        return CandidateServerError(f"{type(exc).__name__}: {exc}")  # a dead replica or a lost connection
    return None


def from_http_status(status: int, message: str, headers=None) -> CandidateError | None:
    """A deployment's HTTP error answer -> CandidateError, or None for a client error the caller re-raises."""
    if status == 429:
        retry = 1.0
        if headers is not None and headers.get("retry-after"):
            try:
                retry = float(headers.get("retry-after"))
            except ValueError:
                pass
        return CandidateOverloaded(message or "HTTP 429", retry)
    if status >= 500:
        return CandidateServerError(f"HTTP {status}: {message}")
    if status == 400 and "context_length_exceeded" in (message or ""):
        return CandidateContextOverflow(message)
    return None


def _error_text(response) -> str:
    try:
        return response.text[:500]
    except Exception:  # a streamed response whose body was not read
        return ""
