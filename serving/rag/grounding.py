"""Grounded chat: retrieve chunks for a chat completion's `"retrieval"` field, put them into the prompt with a
citation template, and build the `citations` list returned with the answer.

Synchronous use (a local CollectionService):
    messages, citations = retrieve_for_chat(service, body["retrieval"], body["messages"])
Asynchronous use (the gateway; `retriever` is the Ray Serve handle of deployment.Retriever, or a service):
    messages, citations = await aretrieve_for_chat(retriever, body["retrieval"], body["messages"])
Both raise RagError subclasses (InvalidInputError 400, CollectionNotFoundError 404) with .status, .message,
.param and .code for the OpenAI error body.
"""

from __future__ import annotations

from serving.rag.errors import CollectionNotFoundError, InvalidInputError
from serving.rag.filters import check_filter

DEFAULT_K = 4
MAX_K = 20  # chunks in one prompt; more would crowd the context window
DEFAULT_TEMPLATE = (
    "Answer the user's question using the numbered sources below. Cite every source you use with its number in "
    "square brackets, like [1]. If the sources do not contain the answer, say that you do not know.\n\n"
    "Sources:\n{sources}"
)
SOURCE_TEMPLATE = "[{n}] (document: {document_id})\n{text}"
_FIELDS = {"collection", "k", "filter", "query", "template"}


def _message_text(content) -> str:
    """A message's text: a string, or the text parts of an OpenAI content-part list."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return ""


def retrieval_request(retrieval, messages, max_k: int = MAX_K) -> dict:
    """Validate the `retrieval` field: {"collection": str, "k": int = 4, "filter": {...}?, "query": str?,
    "template": str?}. The query defaults to the last user message."""
    if not isinstance(retrieval, dict):
        raise InvalidInputError("retrieval must be an object like {\"collection\": \"docs\", \"k\": 4}",
                                param="retrieval")
    unknown = set(retrieval) - _FIELDS
    if unknown:
        raise InvalidInputError(f"retrieval has unknown fields: {', '.join(sorted(unknown))} "
                                f"(allowed: {', '.join(sorted(_FIELDS))})", param="retrieval")
    collection = retrieval.get("collection")
    if not isinstance(collection, str) or not collection:
        raise InvalidInputError("retrieval.collection must be a collection name", param="retrieval.collection")
    k = retrieval.get("k", DEFAULT_K)
    if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= max_k:
        raise InvalidInputError(f"retrieval.k must be an integer between 1 and {max_k}, got {k!r}",
                                param="retrieval.k")
    flt = retrieval.get("filter")
    check_filter(flt, "retrieval.filter")
    template = retrieval.get("template", DEFAULT_TEMPLATE)
    if not isinstance(template, str) or "{sources}" not in template:
        raise InvalidInputError("retrieval.template must be a string containing '{sources}'",
                                param="retrieval.template")
    query = retrieval.get("query")
    if query is None:
        if not isinstance(messages, list):
            raise InvalidInputError("messages must be a list", param="messages")
        users = [m for m in messages if isinstance(m, dict) and m.get("role") == "user"]
        query = _message_text(users[-1].get("content")) if users else ""
        if not query.strip():
            raise InvalidInputError("retrieval needs a user message with text (or retrieval.query)",
                                    param="messages")
    elif not isinstance(query, str) or not query.strip():
        raise InvalidInputError("retrieval.query must be a non-empty string", param="retrieval.query")
    return {"collection": collection, "query": query, "k": k, "filter": flt, "template": template}


def make_citations(hits: list[dict]) -> list[dict]:
    """The `citations` list: one entry per retrieved chunk, numbered as in the prompt."""
    return [
        {"index": n, "document_id": h["document_id"], "chunk_id": h["id"], "chunk": h["text"],
         "score": h["score"], "start": h["start"], "end": h["end"], "metadata": h.get("metadata", {})}
        for n, h in enumerate(hits, start=1)
    ]


def ground_messages(messages: list, query_result: dict, template: str = DEFAULT_TEMPLATE) -> tuple[list, list]:
    """(messages with the sources in the system prompt, citations). The sources are appended to an existing
    leading system message, else a system message is prepended: many chat templates accept only one."""
    hits = query_result.get("data", [])
    sources = "\n\n".join(SOURCE_TEMPLATE.format(n=n, document_id=h["document_id"], text=h["text"].strip())
                          for n, h in enumerate(hits, start=1)) or "(no sources found)"
    grounding = template.replace("{sources}", sources)
    out = [dict(m) for m in messages]
    if out and out[0].get("role") == "system":
        first = _message_text(out[0].get("content"))
        out[0]["content"] = f"{first}\n\n{grounding}" if first.strip() else grounding
    else:
        out.insert(0, {"role": "system", "content": grounding})
    return out, make_citations(hits)


async def aretrieve_for_chat(retriever, retrieval, messages) -> tuple[list, list]:
    """retrieve_for_chat for async callers: `retriever` is a Ray Serve handle (awaited) or a CollectionService
    (run in a worker thread). Errors wrapped by Ray are unwrapped to the RagError raised in the replica."""
    import asyncio

    req = retrieval_request(retrieval, messages)
    try:
        if hasattr(retriever.query, "remote"):
            result = await retriever.query.remote(req["collection"], req["query"], k=req["k"], filter=req["filter"])
        else:
            result = await asyncio.to_thread(retriever.query, req["collection"], req["query"], k=req["k"],
                                             filter=req["filter"])
    except Exception as exc:
        from serving.rag.api import as_rag_error

        rag = as_rag_error(exc)
        if isinstance(rag, CollectionNotFoundError):
            raise CollectionNotFoundError(rag.message, param="retrieval.collection") from None
        if rag is not None:
            raise type(rag)(rag.message, param=rag.param and f"retrieval.{rag.param}", code=rag.code) from None
        raise
    return ground_messages(messages, result, req["template"])


def retrieve_for_chat(service, retrieval, messages) -> tuple[list, list]:
    """Validate `retrieval`, query `service` (a CollectionService) and ground `messages`.

    Raises InvalidInputError (400) for a malformed field, CollectionNotFoundError (404) for an unknown
    collection; both carry `param` and `code` for the OpenAI-style error body (`exc.body()`, `exc.status`).
    """
    req = retrieval_request(retrieval, messages, max_k=min(MAX_K, getattr(service, "max_k", MAX_K)))
    try:
        result = service.query(req["collection"], req["query"], k=req["k"], filter=req["filter"])
    except CollectionNotFoundError as exc:
        raise CollectionNotFoundError(exc.message, param="retrieval.collection") from None
    return ground_messages(messages, result, req["template"])
