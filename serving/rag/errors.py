"""Errors of the RAG service. Each knows its HTTP status, OpenAI error type, offending param and code, so the
API turns it into {"error": {...}} without guessing; none of them is ever a 500."""

from __future__ import annotations

from serving.errors import ServiceError


class RagError(ServiceError):
    status = 400
    type = "invalid_request_error"

    def __init__(self, message: str, param: str | None = None, code: str | None = None):
        super().__init__(message, param=param, code=code)

    def __reduce__(self):  # picklable across Ray Serve replicas
        return (type(self), (self.message, self.param, self.code))


class InvalidInputError(RagError):
    """A malformed request: a bad field value, an empty document, k out of range, a dimension mismatch."""

    code = "invalid_value"


class UnsupportedFileTypeError(RagError):
    code = "unsupported_file_type"


class CollectionNotFoundError(RagError):
    status = 404
    type = "not_found_error"
    code = "collection_not_found"


class DocumentNotFoundError(RagError):
    status = 404
    type = "not_found_error"
    code = "document_not_found"


class CollectionExistsError(RagError):
    status = 409
    type = "conflict_error"
    code = "collection_exists"
