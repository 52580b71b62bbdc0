"""POST /v1/responses and the stored-response routes: OpenAI's Responses API over the chat pipeline.

A Responses request becomes a chat request (serving.api.response_items translates items, tools, tool_choice and
`text.format`), runs the same pipeline stages as chat (routes, governance, retrieval, constraints), and its
result goes back out as Responses `output` items or the typed event stream. `store` (default true) keeps the
response in the data directory's database (serving.api.response_store), owned by the key's team;
`previous_response_id` continues from it, so every continued turn runs (and is charged) with its whole history.
`file_search` tools search our own collections (the `vector_store_ids` are collection names) through the
pipeline's grounding stage: the answer carries a `file_search_call` item and `file_citation` annotations.
"""

from __future__ import annotations

import asyncio
import json
import time
from typing import Any

from pydantic import Field

from serving.api import outputs
from serving.api.errors import APIError
from serving.api.outputs import ChoiceDelta, StreamFormat
from serving.api.protocol import ChatCompletionRequest, _Req
from serving.api import response_items as items_mod

MAX_FILE_SEARCH_RESULTS = 20


class ResponsesRequest(_Req):
    model: str
    input: Any = None
    instructions: str | None = None
    max_output_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    text: Any = None
    tools: Any = None
    tool_choice: Any = None
    parallel_tool_calls: bool | None = None
    metadata: dict[str, str] | None = None
    store: bool = True
    stream: bool = False
    previous_response_id: str | None = None
    user: str | None = None
    include: list[str] | None = None
    # known fields we cannot honour: refused by name rather than ignored
    background: bool | None = None
    reasoning: Any = None
    conversation: Any = None
    prompt: Any = None
    top_logprobs: int | None = None
    max_tool_calls: int | None = None

    def check(self) -> None:
        if self.background:
            raise _unsupported("background", "background responses are not supported: send it without")
        for name in ("reasoning", "conversation", "prompt", "top_logprobs", "max_tool_calls"):
            if getattr(self, name) not in (None, {}):
                raise _unsupported(name, f"'{name}' is not supported by this server")
        if self.metadata is not None and (len(self.metadata) > 16 or any(len(k) > 64 or len(str(v)) > 512
                                                                        for k, v in self.metadata.items())):
            raise APIError(400, "metadata: at most 16 keys of at most 64 characters, values of at most 512",
                           param="metadata", code="invalid_value")
        for inc in self.include or []:
            if inc not in ("file_search_call.results", "message.output_text.logprobs"):
                raise APIError(400, f"include: {inc!r} is not supported", param="include", code="invalid_value")


def _unsupported(param: str, message: str) -> APIError:
    return APIError(400, message, param=param, code="unsupported_parameter")


def _store(core):
    if core.store is None:
        from serving.api.response_store import ResponseStore

        spec = core.config.responses
        core.store = ResponseStore(spec.database_path(), ttl_s=spec.ttl_s)
    return core.store


def _owner(http):
    from serving.api.governed import principal_of
    from serving.api.response_store import owner_of

    return owner_of(principal_of(http))


def _split_tools(tools: Any) -> tuple[Any, dict | None, list[int]]:
    """(function tools for chat_tools, the file_search tool as a retrieval request or None, the request index
    of each function tool); a bad file_search tool names `tools[i]`."""
    if not isinstance(tools, list):
        return tools, None, []
    functions, positions, search = [], [], None
    for i, t in enumerate(tools):
        if not (isinstance(t, dict) and t.get("type") == "file_search"):
            functions.append(t)
            positions.append(i)
            continue
        ids = t.get("vector_store_ids")
        if not isinstance(ids, list) or len(ids) != 1 or not isinstance(ids[0], str) or not ids[0]:
            raise APIError(400, f"tools[{i}].vector_store_ids must name exactly one collection",
                           param=f"tools[{i}].vector_store_ids", code="invalid_value")
        k = t.get("max_num_results", 4)
        if not isinstance(k, int) or isinstance(k, bool) or not 1 <= k <= MAX_FILE_SEARCH_RESULTS:
            raise APIError(400, f"tools[{i}].max_num_results must be an integer from 1 to {MAX_FILE_SEARCH_RESULTS}",
                           param=f"tools[{i}].max_num_results", code="invalid_value")
        if search is not None:
            raise APIError(400, "at most one file_search tool", param=f"tools[{i}]", code="invalid_value")
        search = {"collection": ids[0], "k": k}
    return functions or None, search, positions


async def create(core, body: ResponsesRequest, http=None):
    """POST /v1/responses: a response object, or an SSE iterator of typed events."""
    body.check()
    owner = _owner(http)
    prev = body.previous_response_id
    items = items_mod.normalize_input(body.input)
    store = _store(core) if (body.store or prev) else None
    history = await asyncio.to_thread(store.conversation, prev, owner) if prev else []
    functions, search, positions = _split_tools(body.tools)
    try:
        messages = items_mod.chat_messages(history, items, body.instructions)
        tools = items_mod.chat_tools(functions)
        chat_body = ChatCompletionRequest(
            model=body.model, messages=messages, max_completion_tokens=body.max_output_tokens,
            temperature=body.temperature, top_p=body.top_p, tools=tools,
            tool_choice=items_mod.chat_tool_choice(body.tool_choice, tools),
            parallel_tool_calls=body.parallel_tool_calls, response_format=items_mod.chat_response_format(body.text),
            user=body.user, retrieval=search)
        from serving.api.chat import gen_request

        req = gen_request(chat_body, endpoint="responses", route="/v1/responses", stream=body.stream)
        g = await core.pipeline.start(req, http)
    except APIError as err:
        raise _renamed(items_mod.responses_error(err), positions) from None
    turn = Turn(core, body, g, items, owner, store, search)
    if body.stream:
        return outputs.stream(core.pipeline, g, ResponsesStream(turn))
    results = await outputs.collect(core.pipeline, g)
    response = turn.response(results[0].text, results[0].tool_calls, results[0].finish_reason)
    await turn.save(response)
    return response


def _renamed(err: APIError, positions: list[int]) -> APIError:
    """A `tools[k]` param of the function tools alone -> its index in the request's own tools list."""
    import re

    m = re.match(r"tools\[(\d+)\]", err.param or "")
    if not m or not positions or int(m.group(1)) >= len(positions):
        return err
    param = f"tools[{positions[int(m.group(1))]}]" + err.param[m.end():]
    return APIError(err.status, err.message.replace(err.param, param, 1), param=param, code=err.code,
                    type=err.type, retry_after=err.retry_after)


class Turn:
    """One Responses turn: builds its response object and output items, and stores it."""

    def __init__(self, core, body: ResponsesRequest, g, items: list[dict], owner, store, search):
        from serving.api.response_store import new_response_id

        self.core, self.body, self.g, self.items, self.owner, self.store = core, body, g, items, owner, store
        self.search = search
        self.id = new_response_id()
        self.created_at = int(time.time())

    def base(self, status: str) -> dict:
        b = self.body
        return {"id": self.id, "object": "response", "created_at": self.created_at, "status": status,
                "completed_at": None, "error": None, "incomplete_details": None, "instructions": b.instructions,
                "max_output_tokens": b.max_output_tokens, "model": self.g.model_name, "output": [],
                "parallel_tool_calls": b.parallel_tool_calls if b.parallel_tool_calls is not None else True,
                "previous_response_id": b.previous_response_id, "reasoning": {"effort": None, "summary": None},
                "store": b.store, "temperature": 1.0 if b.temperature is None else b.temperature,
                "text": {"format": (b.text or {}).get("format") or {"type": "text"}} if isinstance(b.text, dict)
                else {"format": {"type": "text"}},
                "tool_choice": b.tool_choice if b.tool_choice is not None else "auto",
                "tools": [_echo_tool(t) for t in b.tools or []], "top_p": 1.0 if b.top_p is None else b.top_p, "truncation": "disabled",
                "metadata": b.metadata or {}, **({"user": b.user} if b.user else {})}

    def search_item(self) -> dict | None:
        """The file_search_call output item (results only with include=["file_search_call.results"])."""
        if self.search is None:
            return None
        query = next((m["content"] for m in reversed(self.g.req.prompts[0]) if m.get("role") == "user"), "")
        results = None
        if "file_search_call.results" in (self.body.include or []):
            results = [{"file_id": c["document_id"], "filename": _filename(c), "text": c["chunk"],
                        "score": c["score"], "attributes": {}} for c in self.g.citations or []]
        return {"type": "file_search_call", "id": items_mod.new_item_id("file_search_call"),
                "status": "completed", "queries": [query], "results": results}

    def annotations(self, text: str) -> list[dict]:
        """file_citation annotations: the sources the text cites as [n], else every source it was grounded on
        (`index` is the file's place in the list of files, as OpenAI defines it)."""
        if self.search is None or not self.g.citations:
            return []
        cited = [c for c in self.g.citations if f"[{c['index']}]" in (text or "")] or self.g.citations
        files: list[dict] = []
        for c in cited:
            if all(f["file_id"] != c["document_id"] for f in files):
                files.append({"type": "file_citation", "file_id": c["document_id"], "filename": _filename(c),
                              "index": len(files)})
        return files

    def response(self, text: str | None, tool_calls: list, finish_reason: str) -> dict:
        status, incomplete = items_mod.response_status(finish_reason)
        out = items_mod.output_items(text, tool_calls, finish_reason)
        for item in out:
            if item["type"] == "message":
                item["content"][0]["annotations"] = self.annotations(text or "")
        search = self.search_item()
        if search is not None:
            out.insert(0, search)
        r = self.base(status)
        r.update(output=out, incomplete_details=incomplete, usage=items_mod.response_usage(outputs.usage_of(self.g)),
                 completed_at=int(time.time()) if status == "completed" else None)
        return r

    async def save(self, response: dict) -> None:
        if self.body.store:
            await asyncio.to_thread(self.store.put, response, self.items, self.owner, self.body.previous_response_id)


def _echo_tool(tool: dict) -> dict:
    """A request's tool as the response lists it: a function tool with every field OpenAI's FunctionTool has."""
    if tool.get("type") != "function":
        return tool
    return {"type": "function", "name": tool.get("name"), "description": tool.get("description"),
            "parameters": tool.get("parameters") or {"type": "object", "properties": {}},
            "strict": tool.get("strict")}


def _filename(citation: dict) -> str:
    meta = citation.get("metadata") or {}
    return str(meta.get("filename") or meta.get("source") or meta.get("title") or citation["document_id"])


class ResponsesStream(StreamFormat):
    """The typed event stream: response.created, .in_progress, output items with their content parts and
    text / function-call argument deltas, then response.completed (or .incomplete, or .failed)."""

    def __init__(self, turn: Turn):
        self.turn = turn
        self.seq = 0
        self.output: list[dict] = []
        self.message: dict | None = None  # the open message item
        self.calls: dict[int, dict] = {}  # tool call index -> its open function_call item
        self.text = ""
        self.finish_reason = "stop"

    def _event(self, type_: str, **fields) -> str:
        data = {"type": type_, "sequence_number": self.seq, **fields}
        self.seq += 1
        return f"event: {type_}\ndata: {json.dumps(data, ensure_ascii=False, separators=(',', ':'))}\n\n"

    def start(self, g) -> list[str]:
        r = self.turn.base("in_progress")
        out = [self._event("response.created", response=r), self._event("response.in_progress", response=r)]
        search = self.turn.search_item()
        if search is not None:  # the search ran before generation: its item is complete from the start
            i = len(self.output)
            self.output.append(search)
            out += [self._event("response.output_item.added", output_index=i, item={**search, "status": "in_progress"}),
                    self._event("response.file_search_call.in_progress", output_index=i, item_id=search["id"]),
                    self._event("response.file_search_call.searching", output_index=i, item_id=search["id"]),
                    self._event("response.file_search_call.completed", output_index=i, item_id=search["id"]),
                    self._event("response.output_item.done", output_index=i, item=search)]
        return out

    def _open_message(self) -> list[str]:
        if self.message is not None:
            return []
        self.message = {"type": "message", "id": items_mod.new_item_id("message"), "status": "in_progress",
                        "role": "assistant", "content": []}
        self.output.append(self.message)
        i = len(self.output) - 1
        part = {"type": "output_text", "text": "", "annotations": [], "logprobs": []}
        return [self._event("response.output_item.added", output_index=i, item=self.message),
                self._event("response.content_part.added", item_id=self.message["id"], output_index=i,
                            content_index=0, part=part)]

    def _text(self, delta: str) -> list[str]:
        out = self._open_message()
        self.text += delta
        return out + [self._event("response.output_text.delta", item_id=self.message["id"],
                                  output_index=self.output.index(self.message), content_index=0, delta=delta,
                                  logprobs=[])]

    def _close_message(self, status: str) -> list[str]:
        if self.message is None or self.message["status"] != "in_progress":
            return []
        i = self.output.index(self.message)
        part = {"type": "output_text", "text": self.text, "annotations": self.turn.annotations(self.text),
                "logprobs": []}
        self.message.update(status=status, content=[part])
        return [self._event("response.output_text.done", item_id=self.message["id"], output_index=i,
                            content_index=0, text=self.text, logprobs=[]),
                self._event("response.content_part.done", item_id=self.message["id"], output_index=i,
                            content_index=0, part=part),
                self._event("response.output_item.done", output_index=i, item=self.message)]

    def _call(self, piece: dict) -> list[str]:
        out = []
        k = piece["index"]
        fn = piece.get("function") or {}
        if k not in self.calls:
            out += self._close_message("completed")
            item = {"type": "function_call", "id": items_mod.new_item_id("function_call"), "call_id": piece.get("id"),
                    "name": fn.get("name"), "arguments": "", "status": "in_progress"}
            self.calls[k] = item
            self.output.append(item)
            out.append(self._event("response.output_item.added", output_index=len(self.output) - 1, item=item))
        item = self.calls[k]
        if fn.get("arguments"):
            item["arguments"] += fn["arguments"]
            out.append(self._event("response.function_call_arguments.delta", item_id=item["id"],
                                   output_index=self.output.index(item), delta=fn["arguments"]))
        return out

    def deltas(self, g, item: dict, deltas: list[ChoiceDelta]) -> list[str]:
        out: list[str] = []
        for d in deltas:
            if d.pieces is None:
                if d.text:
                    out += self._text(d.text)
            else:
                for piece in d.pieces:
                    if "content" in piece:
                        out += self._text(piece["content"])
                    for call in piece.get("tool_calls", []):
                        out += self._call(call)
            if d.finish_reason is not None:
                self.finish_reason = d.finish_reason
        return out

    async def end(self, g, usage: dict) -> list[str]:
        status, incomplete = items_mod.response_status(self.finish_reason)
        out = self._close_message(status)
        if not self.output or all(i["type"] == "file_search_call" for i in self.output):
            out += self._open_message() + self._close_message(status)  # an empty answer is one empty message
        for item in self.calls.values():
            item["status"] = "completed"
            i = self.output.index(item)
            out += [self._event("response.function_call_arguments.done", item_id=item["id"], output_index=i,
                                name=item["name"], arguments=item["arguments"]),
                    self._event("response.output_item.done", output_index=i, item=item)]
        r = self.turn.base(status)
        r.update(output=self.output, incomplete_details=incomplete, usage=items_mod.response_usage(usage),
                 completed_at=int(time.time()) if status == "completed" else None)
        await self.turn.save(r)  # stored before the client hears it is done, so a GET right after finds it
        return out + [self._event("response.completed" if status == "completed" else "response.incomplete",
                                  response=r)]

    def fail(self, g, error: dict, usage: dict) -> list[str]:
        err = error.get("error", {})
        r = self.turn.base("failed")
        r.update(output=self.output, error={"code": err.get("code") or "server_error", "message": err.get("message")},
                 usage=items_mod.response_usage(usage))
        return [self._event("response.failed", response=r)]


async def retrieve(core, response_id: str, http=None) -> dict:
    return await asyncio.to_thread(_store(core).require, response_id, _owner(http))


async def delete(core, response_id: str, http=None) -> dict:
    from serving.api.response_store import ResponseNotFoundError

    if not await asyncio.to_thread(_store(core).delete, response_id, _owner(http)):
        raise ResponseNotFoundError(response_id)
    return {"id": response_id, "object": "response", "deleted": True}


async def input_items(core, response_id: str, http=None, after: str | None = None, before: str | None = None,
                      limit: int = 20, order: str = "desc") -> dict:
    return await asyncio.to_thread(_store(core).input_items, response_id, _owner(http), after=after, limit=limit,
                                   order=order, before=before)
