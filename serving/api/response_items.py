"""OpenAI Responses API items <-> chat messages, so a Responses request runs on the chat pipeline.

Request side:
  * normalize_input(input):        `input` (a string or a list of items) -> normalised items, one per input
                                   entry, each with an `id` and `status`: what the store keeps and
                                   `GET /v1/responses/{id}/input_items` lists.
  * chat_messages(history, items, instructions): the conversation so far (ResponseStore.conversation) plus
                                   this turn's items -> chat `messages` (assistant `tool_calls`, `tool`
                                   messages), as ChatCompletionRequest.template_messages returns them.
  * chat_tools / chat_tool_choice / chat_response_format: Responses' flat `tools`, `tool_choice` and
                                   `text.format` -> the chat request's `tools`, `tool_choice`, `response_format`.
  * responses_error(err):          an APIError of the chat pipeline, its `param` renamed to the Responses field.
Result side:
  * output_items(content, tool_calls, finish_reason) -> Responses `output`;
    response_status(finish_reason) -> `status`, `incomplete_details`; response_usage(chat usage) -> `usage`.

Errors are APIError(400) whose `param` names the Responses field (`input[2].call_id`, `tools[0].name`,
`text.format.schema`) and whose message starts with it, as in serving.api.tools.
"""

from __future__ import annotations

import json
import re
import secrets
from typing import Any

from serving.api.errors import APIError
# the chat side's own rules (name pattern, JSON Schema check), so a tool is valid in both APIs or in neither
from serving.api.tools import _NAME, _kind, check_messages, parse_tool_request

MESSAGE_ROLES = ("user", "system", "developer", "assistant")
ITEM_STATUSES = ("in_progress", "completed", "incomplete")
TEXT_PARTS = ("input_text", "output_text")
MAX_ITEM_ID = 128
_ID_PREFIX = {"message": "msg_", "function_call": "fc_", "function_call_output": "fco_", "file_search_call": "fs_"}
_SCHEMA_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for text.format.name


def new_item_id(kind: str) -> str:
    """`msg_`, `fc_` or `fco_` and 48 hex digits, the shape of OpenAI's item ids."""
    return _ID_PREFIX[kind] + secrets.token_hex(24)


def _bad(param: str, message: str, code: str = "invalid_value") -> APIError:
    return APIError(400, f"{param} {message}", param=param, code=code)


def _string(value: Any, param: str, *, empty: bool = False) -> str:
    if not isinstance(value, str) or (not empty and not value):
        got = "an empty string" if value == "" else _kind(value)
        raise _bad(param, f"is required and must be a {'' if empty else 'non-empty '}string, got {got}")
    return value


# ---------------------------------------------------------------- input -> items
def _text_parts(content: Any, where: str, part_type: str) -> list[dict]:
    """A message's content (a string or a list of text parts) -> a list of `part_type` parts."""
    if isinstance(content, str):
        content = [{"type": part_type, "text": content}]
    if not isinstance(content, list):
        raise _bad(where, f"must be a string or an array of content parts, got {_kind(content)}")
    if not content:
        raise _bad(where, "must not be empty")
    parts = []
    for j, part in enumerate(content):
        at = f"{where}[{j}]"
        if not isinstance(part, dict):
            raise _bad(at, f"must be an object, got {_kind(part)}")
        kind = part.get("type")
        if kind not in TEXT_PARTS:
            raise _bad(f"{at}.type", f"is {json.dumps(kind)}: only text parts ({', '.join(TEXT_PARTS)}) are "
                       "supported; this model takes text only", "unsupported_content")
        text = _string(part.get("text"), f"{at}.text", empty=True)
        parts.append({"type": part_type, "text": text, "annotations": []} if part_type == "output_text"
                     else {"type": part_type, "text": text})
    return parts


def _item_id(item: dict, kind: str, where: str, seen: dict[str, int]) -> str:
    """The client's id (kept, so a replayed output item keeps its id) or a new one; unique within the input,
    since input_items pages by item id."""
    given = item.get("id")
    if given is None:
        return new_item_id(kind)
    if not isinstance(given, str) or not given or len(given) > MAX_ITEM_ID:
        raise _bad(f"{where}.id", f"must be a string of 1 to {MAX_ITEM_ID} characters, got {_kind(given)}")
    if given in seen:
        raise _bad(f"{where}.id", f"repeats {given!r}, already the id of input[{seen[given]}]")
    return given


def _status(item: dict, where: str) -> str:
    status = item.get("status")
    if status is None:
        return "completed"
    if status not in ITEM_STATUSES:
        raise _bad(f"{where}.status", f"must be one of {', '.join(ITEM_STATUSES)}, got {json.dumps(status)}")
    return status


def _normalize_item(i: int, item: Any, seen: dict[str, int]) -> dict:
    where = f"input[{i}]"
    if not isinstance(item, dict):
        raise _bad(where, f"must be an object, got {_kind(item)}")
    kind = item.get("type", "message" if "role" in item else None)  # {"role", "content"} is the short form
    if kind == "message":
        role = item.get("role")
        if role not in MESSAGE_ROLES:
            raise _bad(f"{where}.role", f"must be one of {', '.join(MESSAGE_ROLES)}, got {json.dumps(role)}")
        if "content" not in item:
            raise _bad(f"{where}.content", "is required")
        part_type = "output_text" if role == "assistant" else "input_text"
        content = _text_parts(item["content"], f"{where}.content", part_type)
        return {"type": "message", "id": _item_id(item, kind, where, seen), "status": _status(item, where),
                "role": role, "content": content}
    if kind == "function_call":
        call_id = _string(item.get("call_id"), f"{where}.call_id")
        name = item.get("name")
        if not isinstance(name, str) or not _NAME.match(name):
            raise _bad(f"{where}.name", f"must be 1 to 64 letters, digits, underscores or dashes, got "
                       f"{json.dumps(name) if isinstance(name, str) else _kind(name)}")
        arguments = item.get("arguments")
        if not isinstance(arguments, str):
            raise _bad(f"{where}.arguments", f"is required and must be a string holding JSON, got {_kind(arguments)}")
        return {"type": "function_call", "id": _item_id(item, kind, where, seen), "call_id": call_id,
                "name": name, "arguments": arguments, "status": _status(item, where)}
    if kind == "function_call_output":
        call_id = _string(item.get("call_id"), f"{where}.call_id")
        if "output" not in item:
            raise _bad(f"{where}.output", "is required")
        output = item["output"]
        if not isinstance(output, str):
            output = _text_parts(output, f"{where}.output", "input_text")
        return {"type": "function_call_output", "id": _item_id(item, kind, where, seen), "call_id": call_id,
                "output": output, "status": _status(item, where)}
    if kind is None:
        raise _bad(f"{where}.type", "is required (message, function_call or function_call_output), or give a "
                   "message as {\"role\": ..., \"content\": ...}")
    raise _bad(f"{where}.type", f"is {json.dumps(kind)}: only message, function_call and function_call_output "
               "items are supported by this server", "unsupported_value")


def normalize_input(input: Any) -> list[dict]:
    """A Responses request's `input` -> its items in the stored form: a string is one user message; every
    item gets an `id` (the client's, or a new `msg_`/`fc_`/`fco_` one) and a `status`, message content
    becomes a list of text parts (`input_text`, `output_text` for the assistant). One item per entry, in
    order, so item i is `input[i]` in errors."""
    if isinstance(input, str):
        if not input:
            raise _bad("input", "must not be empty")
        return [{"type": "message", "id": new_item_id("message"), "status": "completed", "role": "user",
                 "content": [{"type": "input_text", "text": input}]}]
    if not isinstance(input, list):
        raise _bad("input", f"is required and must be a string or an array of items, got {_kind(input)}")
    if not input:
        raise _bad("input", "must not be empty")
    seen: dict[str, int] = {}
    items = []
    for i, entry in enumerate(input):
        item = _normalize_item(i, entry, seen)
        seen[item["id"]] = i
        items.append(item)
    return items


# ---------------------------------------------------------------- items -> chat messages
def _text(parts: str | list[dict]) -> str:
    """Text parts joined as ChatCompletionRequest.template_messages joins chat content parts."""
    return parts if isinstance(parts, str) else "\n".join(p["text"] for p in parts)


def chat_messages(history: list[dict], items: list[dict], instructions: Any = None) -> list[dict]:
    """The chat messages of one Responses turn: `instructions` as the first system message (this turn only:
    they are not items, so the store never carries them into the next turn), then the earlier turns' items
    (`history`, from ResponseStore.conversation), then this turn's `items` (from normalize_input).

    Consecutive function_call items (and an assistant message just before them) become one assistant
    message with `tool_calls`; a function_call_output becomes a `tool` message. As in chat, every call must
    be answered before the next message and an output must answer a known call; errors about this turn name
    `input[i]`, errors about calls left open by the previous response name `input`."""
    if instructions is not None and not isinstance(instructions, str):
        raise _bad("instructions", f"must be a string, got {_kind(instructions)}")
    messages: list[dict] = [{"role": "system", "content": instructions}] if instructions else []
    known: dict[str, int | None] = {}  # call ids seen -> input index (None: an earlier turn's)
    open_calls: dict[str, int | None] = {}  # call ids awaiting an output -> input index
    tail_calls = False  # the last message is an assistant message that function_call items may join
    for n, item in enumerate([*history, *items]):
        i = n - len(history) if n >= len(history) else None  # index in this turn's input
        where = f"input[{i}]" if i is not None else "input"
        kind = item["type"]
        if kind == "file_search_call":  # an earlier turn's search: its sources grounded that turn only
            continue
        if kind != "function_call_output" and open_calls and not (kind == "function_call" and tail_calls):
            _unanswered(open_calls, where)
        if kind == "message":
            role = "system" if item["role"] == "developer" else item["role"]
            messages.append({"role": role, "content": _text(item["content"])})
            tail_calls = role == "assistant"
        elif kind == "function_call":
            cid = item["call_id"]
            if cid in known:
                first = known[cid]
                raise _bad(f"{where}.call_id", f"repeats the call id {cid!r} of "
                           + (f"input[{first}]" if first is not None else "a function call of an earlier turn"))
            known[cid] = open_calls[cid] = i
            call = {"id": cid, "type": "function", "function": {"name": item["name"], "arguments": item["arguments"]}}
            if tail_calls:
                messages[-1].setdefault("tool_calls", []).append(call)
            else:
                messages.append({"role": "assistant", "content": "", "tool_calls": [call]})
                tail_calls = True
        else:
            cid = item["call_id"]
            if cid not in known:
                raise _bad(f"{where}.call_id", f"is {cid!r}, which answers no function_call item of this "
                           "conversation", "unknown_tool_call_id")
            open_calls.pop(cid, None)
            messages.append({"role": "tool", "tool_call_id": cid, "content": _text(item["output"])})
            tail_calls = False
    if open_calls:
        _unanswered(open_calls, None)
    return check_messages(messages)  # the chat pipeline's own check; the checks above already cover it


def _unanswered(open_calls: dict[str, int | None], before: str | None) -> None:
    cid, i = next(iter(open_calls.items()))
    at = f" before {before}" if before else ""
    if i is None:
        raise _bad("input", f"has no function_call_output for the call {cid!r} of the previous response{at}: "
                   "every function call must be answered before the conversation goes on", "missing_tool_response")
    raise _bad(f"input[{i}].call_id", f"{cid!r} has no function_call_output{at}: every function call must be "
               "answered before the conversation goes on", "missing_tool_response")


# ---------------------------------------------------------------- tools, tool_choice, text.format
def chat_tools(tools: Any) -> list[dict] | None:
    """Responses function tools (`{"type": "function", "name", "description", "parameters", "strict"}`, flat)
    -> chat tools (`{"type": "function", "function": {...}}`); None for none. Other tool types (web search,
    MCP, ...) run at OpenAI, not in a model, so they are refused by name. The checks are the chat side's own
    (serving.api.tools), their params renamed to the flat form."""
    if tools is None:
        return None
    if not isinstance(tools, list):
        raise _bad("tools", f"must be an array of tools, got {_kind(tools)}")
    if not tools:
        return None  # Responses clients send [] for "no tools" (OpenAI accepts it)
    nested = []
    for i, tool in enumerate(tools):  # anything not a function tool is refused by the chat side's check
        if isinstance(tool, dict) and tool.get("type") == "function":
            if "function" in tool and "name" not in tool:
                raise _bad(f"tools[{i}].name", "is required: Responses tools are flat ({\"type\": \"function\", "
                           "\"name\": ..., \"parameters\": ...}), not nested under \"function\" as in chat")
            tool = {"type": "function", "function": {k: v for k, v in tool.items() if k != "type"}}
        nested.append(tool)
    try:
        return parse_tool_request(nested).tools
    except APIError as err:
        raise responses_error(err) from None


def chat_tool_choice(tool_choice: Any, tools: list[dict] | None) -> str | dict | None:
    """Responses `tool_choice` ("auto" | "none" | "required" | {"type": "function", "name"}) -> chat form;
    `tools` is chat_tools()'s result, so a named function is checked against it."""
    names = [t["function"]["name"] for t in tools or []]
    if tool_choice is None:
        return None
    if isinstance(tool_choice, str):
        if tool_choice not in ("auto", "none", "required"):
            raise _bad("tool_choice", "must be \"auto\", \"none\", \"required\" or {\"type\": \"function\", "
                       f"\"name\": ...}}, got {json.dumps(tool_choice)}")
        if tool_choice == "required" and not names:
            raise _bad("tool_choice", "\"required\" needs tools: no tools were given")
        return tool_choice
    if not isinstance(tool_choice, dict):
        raise _bad("tool_choice", f"must be a string or an object, got {_kind(tool_choice)}")
    if tool_choice.get("type") != "function":
        raise _bad("tool_choice.type", f"must be \"function\" (this server runs function tools only), got "
                   f"{json.dumps(tool_choice.get('type'))}", "unsupported_value")
    name = tool_choice.get("name")
    if not isinstance(name, str):
        hint = " (flat in Responses, not under \"function\")" if "function" in tool_choice else ""
        raise _bad("tool_choice.name", f"is required and must be a string{hint}")
    if name not in names:
        listed = ", ".join(names) if names else "no tools were given"
        raise _bad("tool_choice.name", f"names {name!r}, which is not among the tools ({listed})")
    return {"type": "function", "function": {"name": name}}


def chat_response_format(text: Any) -> dict | None:
    """Responses `text` (`{"format": {"type": "text"} | {"type": "json_object"} | {"type": "json_schema",
    "name", "schema", "description"?, "strict"?}}`, flat) -> chat `response_format`; None for plain text.
    The schema is checked here so that a bad one names `text.format.schema`."""
    if text is None:
        return None
    if not isinstance(text, dict):
        raise _bad("text", f"must be an object such as {{\"format\": {{\"type\": \"text\"}}}}, got {_kind(text)}")
    fmt = text.get("format")
    if fmt is None:
        return None
    if not isinstance(fmt, dict):
        raise _bad("text.format", f"must be an object such as {{\"type\": \"json_object\"}}, got {_kind(fmt)}")
    kind = fmt.get("type")
    if kind == "text":
        return None
    if kind == "json_object":
        return {"type": "json_object"}
    if kind != "json_schema":
        raise _bad("text.format.type", f"must be text, json_object or json_schema, got {json.dumps(kind)}")
    name = fmt.get("name")
    if not isinstance(name, str) or not _SCHEMA_NAME.match(name):
        raise _bad("text.format.name", "is required with json_schema and must be 1 to 64 letters, digits, "
                   f"underscores or dashes, got {json.dumps(name) if isinstance(name, str) else _kind(name)}")
    if "schema" not in fmt:
        hint = " (flat in Responses, not under \"json_schema\")" if "json_schema" in fmt else ""
        raise _bad("text.format.schema", f"is required with json_schema{hint}")
    schema = fmt["schema"]
    if not isinstance(schema, dict):
        raise _bad("text.format.schema", f"must be a JSON Schema object, got {_kind(schema)}")
    _check_schema(schema)
    js: dict = {"name": name, "schema": schema}
    desc = fmt.get("description")
    if desc is not None:
        if not isinstance(desc, str):
            raise _bad("text.format.description", f"must be a string, got {_kind(desc)}")
        js["description"] = desc
    strict = fmt.get("strict")
    if strict is not None:
        if not isinstance(strict, bool):
            raise _bad("text.format.strict", f"must be a boolean, got {_kind(strict)}")
        js["strict"] = strict
    return {"type": "json_schema", "json_schema": js}


def _check_schema(schema: dict) -> None:
    from jsonschema.exceptions import SchemaError
    from jsonschema.validators import Draft202012Validator, validator_for

    try:
        validator_for(schema, default=Draft202012Validator).check_schema(schema)
    except SchemaError as exc:
        at = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in exc.path)
        at = f" (at {at.lstrip('.')})" if at else ""
        raise _bad("text.format.schema", f"is not a valid JSON Schema{at}: {exc.message}") from None


# ---------------------------------------------------------------- chat errors -> Responses fields
_RENAMES = [  # (chat param pattern, Responses param); first match wins
    (re.compile(r"^response_format\.json_schema\.schema"), "text.format.schema"),
    (re.compile(r"^response_format\.json_schema\.(name|strict|description)"), r"text.format.\1"),
    (re.compile(r"^response_format(\.type)?$"), "text.format"),
    (re.compile(r"^tools\[(\d+)\]\.function\.(\w+)"), r"tools[\1].\2"),
    (re.compile(r"^tool_choice\.function\.name"), "tool_choice.name"),
    (re.compile(r"^(max_tokens|max_completion_tokens)$"), "max_output_tokens"),
    (re.compile(r"^messages(\[\d+\].*)?$"), "input"),  # a chat message is not one input item: name the field
]


def responses_param(param: str | None) -> str | None:
    """A chat request's field name -> the Responses request's (`response_format.json_schema.schema` ->
    `text.format.schema`, `tools[1].function.parameters` -> `tools[1].parameters`, ...); others unchanged."""
    if param is None:
        return None
    for pattern, repl in _RENAMES:
        if pattern.search(param):
            return pattern.sub(repl, param, count=1)
    return param


def responses_error(err: APIError) -> APIError:
    """An APIError from the chat pipeline (request checks, a replica's engine) with its `param`, and the
    field named in its message, renamed to the Responses request's field."""
    param = responses_param(err.param)
    if param == err.param:
        return err
    message = err.message
    if not err.param.startswith("messages"):  # chat-message errors read "messages[3] ...": kept as written
        message = message.replace(err.param, param, 1)
    return APIError(err.status, message, param=param, code=err.code, type=err.type, retry_after=err.retry_after)


# ---------------------------------------------------------------- chat result -> output items
def response_status(finish_reason: str | None) -> tuple[str, dict | None]:
    """A chat finish reason -> the Responses `status` and `incomplete_details`: a length stop is
    `incomplete` with reason `max_output_tokens`, as OpenAI reports it."""
    if finish_reason == "length":
        return "incomplete", {"reason": "max_output_tokens"}
    return "completed", None


def output_items(content: str | None, tool_calls: list[dict] | None = None,
                 finish_reason: str | None = None) -> list[dict]:
    """A chat answer (its text, its `tool_calls` as `{"id", "function": {"name", "arguments"}}`) -> Responses
    `output`: a message item when there is text (or nothing else), then a function_call item per call (its
    `call_id` the chat call id, which the next turn's function_call_output answers)."""
    status = response_status(finish_reason)[0]
    out: list[dict] = []
    if content or not tool_calls:
        out.append({"type": "message", "id": new_item_id("message"), "status": status, "role": "assistant",
                    "content": [{"type": "output_text", "text": content or "", "annotations": [],
                                             "logprobs": []}]})
    for call in tool_calls or []:
        out.append({"type": "function_call", "id": new_item_id("function_call"), "call_id": call["id"],
                    "name": call["function"]["name"], "arguments": call["function"]["arguments"],
                    "status": "completed"})
    return out


def response_usage(usage: dict | None) -> dict | None:
    """Chat `usage` (prompt/completion tokens) -> Responses `usage` (input/output tokens, with details)."""
    if usage is None:
        return None
    prompt, completion = int(usage.get("prompt_tokens") or 0), int(usage.get("completion_tokens") or 0)
    cached = int((usage.get("prompt_tokens_details") or {}).get("cached_tokens") or 0)
    reasoning = int((usage.get("completion_tokens_details") or {}).get("reasoning_tokens") or 0)
    return {"input_tokens": prompt, "input_tokens_details": {"cached_tokens": cached},
            "output_tokens": completion, "output_tokens_details": {"reasoning_tokens": reasoning},
            "total_tokens": int(usage.get("total_tokens") or prompt + completion)}
