"""Errors the engine raises for a client's mistake (mapped to OpenAI 4xx errors by the API) or for load."""

from __future__ import annotations


class EngineError(Exception):
    """Base of engine errors that carry an OpenAI-style error code."""

    status = 500
    code: str | None = None
    type = "server_error"


class InvalidRequestError(EngineError, ValueError):
    """A request the engine will not run; `param` names the offending field (OpenAI's `param`)."""

    status = 400
    type = "invalid_request_error"

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code


class ContextLengthExceededError(InvalidRequestError):
    def __init__(self, message: str, param: str = "messages"):
        super().__init__(message, param=param, code="context_length_exceeded")


class ModelLoadError(EngineError, ValueError):
    """A model that cannot be loaded: missing path, unsupported architecture, bad config."""

    status = 400
    type = "invalid_request_error"
    code = "model_load_error"


class EngineOverloadedError(EngineError):
    """The waiting queue is full: the API answers 429 with Retry-After."""

    status = 429
    type = "rate_limit_error"
    code = "queue_full"

    def __init__(self, message: str, retry_after: float = 1.0):
        super().__init__(message)
        self.message = message
        self.retry_after = retry_after


class AdapterError(InvalidRequestError):
    """A LoRA adapter that cannot be loaded or is not known."""

    def __init__(self, message: str, param: str | None = "model", code: str | None = "adapter_error"):
        super().__init__(message, param=param, code=code)


class AdapterNotFoundError(AdapterError):
    """A request names an adapter this model has not loaded (HTTP 404, like an unknown model)."""

    status = 404

    def __init__(self, message: str):
        super().__init__(message, param="model", code="model_not_found")
