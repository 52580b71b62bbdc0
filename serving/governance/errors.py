"""Governance errors carry their HTTP status and OpenAI-shaped body; no secret or PII value ever goes in one."""

from __future__ import annotations

from typing import Any

from serving.errors import ServiceError


class GovernanceError(ServiceError):
    """A request refused by governance: 401, 403, 429 (with Retry-After) or 400 (PII blocked)."""

    status = 400
    type = "invalid_request_error"

    def __init__(self, message: str, *, code: str, param: str | None = None,
                 status: int | None = None, type: str | None = None, retry_after: float | None = None,
                 extra: dict[str, Any] | None = None):
        super().__init__(message, code=code, param=param, status=status, type=type, retry_after=retry_after,
                         extra=extra)


class AuthenticationError(GovernanceError):
    status = 401
    type = "authentication_error"


class PermissionDenied(GovernanceError):
    status = 403
    type = "permission_error"


class RateLimited(GovernanceError):
    status = 429
    type = "rate_limit_error"


class PIIBlocked(GovernanceError):
    """Personal data found under a `block` policy; the body lists the kinds found, never the values."""

    status = 400
    type = "invalid_request_error"

    def __init__(self, where: str, kinds: list[str]):
        super().__init__(
            f"the {where} contains personal or secret data that this key may not send: {', '.join(kinds)}",
            code="pii_detected", param="messages" if where == "prompt" else None,
            extra={"pii_kinds": kinds},
        )
        self.where = where
        self.kinds = kinds
