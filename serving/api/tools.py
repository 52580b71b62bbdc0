"""OpenAI tool calling, request side: validate `tools`, `tool_choice`, `parallel_tool_calls` and the tool parts
of chat history (assistant `tool_calls`, `tool` messages), and make call ids.

Every error is an APIError(400) whose `param` names the field (`tools[2].function.parameters`) and whose message
starts with that field, so the same text reads well in an HTTP error and in a training-data error.

Where this plugs in (serving.api.protocol.ChatCompletionRequest):
  * check():             replace the "not supported" refusal of `tools` with
                         `self.tool_request = parse_tool_request(self.tools, self.tool_choice, self.parallel_tool_calls)`
                         (`functions` / `function_call`, OpenAI's deprecated form, stay refused).
  * ChatMessage:         add `tool_calls: list[dict] | None = None` and `tool_call_id: str | None = None`.
  * template_messages(): copy those two fields into each message dict when set, then
                         `return check_messages(out)`.
"""

from __future__ import annotations

import json
import re
import secrets
import string
from dataclasses import dataclass, field
from typing import Any, Literal

from serving.api.errors import APIError

MAX_TOOLS = 128  # OpenAI's limit
_NAME = re.compile(r"^[A-Za-z0-9_-]{1,64}$")  # OpenAI's rule for function names
_ALNUM = string.ascii_letters + string.digits
CHOICE_MODES = ("none", "auto", "required")


def new_call_id() -> str:
    """`call_` and 24 random letters/digits, the shape of OpenAI's ids."""
    return "call_" + "".join(secrets.choice(_ALNUM) for _ in range(24))


def _bad(param: str, message: str, code: str = "invalid_value") -> APIError:
    return APIError(400, f"{param} {message}", param=param, code=code)


@dataclass(frozen=True)
class ToolChoice:
    """`none` | `auto` | `required`; a named function is `required` with `function` set."""

    mode: Literal["none", "auto", "required"]
    function: str | None = None


@dataclass(frozen=True)
class ToolRequest:
    """A request's validated tools, normalised to `{"type": "function", "function": {name, description?,
    parameters, strict?}}` (parameters always present: omitted means no arguments, as OpenAI reads it)."""

    tools: list[dict]
    choice: ToolChoice
    parallel: bool = True
    by_name: dict[str, dict] = field(default_factory=dict, compare=False, repr=False)

    def prompt_tools(self) -> list[dict] | None:
        """The tools to show the model. None under `tool_choice: none`: a model that is not told about tools
        cannot call them, which is simpler to guarantee than telling it and then refusing its calls."""
        return None if self.choice.mode == "none" else self.tools

    def allowed(self) -> list[dict]:
        """The tools a call may name: only the chosen one for a named tool_choice."""
        if self.choice.function is not None:
            return [self.by_name[self.choice.function]]
        return self.tools


def _check_parameters(params: Any, where: str) -> dict:
    from jsonschema.exceptions import SchemaError
    from jsonschema.validators import Draft202012Validator, validator_for

    if not isinstance(params, dict):
        raise _bad(where, f"must be a JSON Schema object, got {_kind(params)}", "invalid_function_parameters")
    if "type" in params and params["type"] != "object":
        raise _bad(where, f"must be a JSON Schema of type \"object\", got type {json.dumps(params['type'])}",
                   "invalid_function_parameters")
    cls = validator_for(params, default=Draft202012Validator)  # honours "$schema"; 2020-12 otherwise
    try:
        cls.check_schema(params)
    except SchemaError as exc:
        at = "".join(f"[{p}]" if isinstance(p, int) else f".{p}" for p in exc.path)
        at = f" (at {at.lstrip('.')})" if at else ""
        raise _bad(where, f"is not a valid JSON Schema{at}: {exc.message}", "invalid_function_parameters") from None
    return params


def _kind(v: Any) -> str:
    return {dict: "an object", list: "an array", str: "a string", bool: "a boolean", type(None): "null"}.get(
        type(v), "a number")


def _check_tool(i: int, tool: Any) -> dict:
    where = f"tools[{i}]"
    if not isinstance(tool, dict):
        raise _bad(where, f"must be an object, got {_kind(tool)}")
    if tool.get("type") != "function":
        raise _bad(f"{where}.type", f"must be \"function\" (the only tool type this server runs), got "
                   f"{json.dumps(tool.get('type'))}", "unsupported_tool_type")
    fn = tool.get("function")
    if not isinstance(fn, dict):
        raise _bad(f"{where}.function", "is required and must be an object with a name")
    name = fn.get("name")
    if not isinstance(name, str) or not _NAME.match(name):
        raise _bad(f"{where}.function.name", "must be 1 to 64 letters, digits, underscores or dashes, got "
                   f"{json.dumps(name)}")
    out: dict = {"name": name}
    desc = fn.get("description")
    if desc is not None:
        if not isinstance(desc, str):
            raise _bad(f"{where}.function.description", f"must be a string, got {_kind(desc)}")
        out["description"] = desc
    params = fn.get("parameters")
    out["parameters"] = ({"type": "object", "properties": {}} if params is None
                         else _check_parameters(params, f"{where}.function.parameters"))
    strict = fn.get("strict")
    if strict is not None:
        if not isinstance(strict, bool):
            raise _bad(f"{where}.function.strict", f"must be a boolean, got {_kind(strict)}")
        out["strict"] = strict  # accepted; calls follow the schema under the grammar either way
    return {"type": "function", "function": out}


def parse_tool_choice(tool_choice: Any, names: list[str]) -> ToolChoice:
    if tool_choice is None:
        return ToolChoice("auto" if names else "none")  # OpenAI's defaults
    if isinstance(tool_choice, str):
        if tool_choice not in CHOICE_MODES:
            raise _bad("tool_choice", f"must be one of \"none\", \"auto\", \"required\" or "
                       f"{{\"type\": \"function\", \"function\": {{\"name\": ...}}}}, got {json.dumps(tool_choice)}")
        if tool_choice == "required" and not names:
            raise _bad("tool_choice", "\"required\" needs tools: no tools were given")
        return ToolChoice(tool_choice)
    if not isinstance(tool_choice, dict) or tool_choice.get("type") != "function":
        raise _bad("tool_choice", "must be \"none\", \"auto\", \"required\" or "
                   "{\"type\": \"function\", \"function\": {\"name\": ...}}")
    fn = tool_choice.get("function")
    name = fn.get("name") if isinstance(fn, dict) else None
    if not isinstance(name, str):
        raise _bad("tool_choice.function.name", "is required and must be a string")
    if name not in names:
        listed = ", ".join(names) if names else "no tools were given"
        raise _bad("tool_choice.function.name", f"names {name!r}, which is not among the tools ({listed})")
    return ToolChoice("required", name)


def parse_tool_request(tools: Any, tool_choice: Any = None, parallel_tool_calls: Any = None) -> ToolRequest | None:
    """Validate a chat request's tool fields; None when the request uses no tools (no `tools`, and
    `tool_choice` absent or "none"/"auto")."""
    if tools is not None and not isinstance(tools, list):
        raise _bad("tools", f"must be an array of tools, got {_kind(tools)}")
    if tools is not None and not tools:
        raise _bad("tools", "must not be empty (leave it out to call no tools)")
    if tools is not None and len(tools) > MAX_TOOLS:
        raise _bad("tools", f"has {len(tools)} tools; at most {MAX_TOOLS} are allowed")
    normal = [_check_tool(i, t) for i, t in enumerate(tools or [])]
    by_name: dict[str, dict] = {}
    for i, t in enumerate(normal):
        name = t["function"]["name"]
        if name in by_name:
            first = next(j for j, u in enumerate(normal) if u["function"]["name"] == name)
            raise _bad(f"tools[{i}].function.name", f"repeats {name!r}, already the name of tools[{first}]")
        by_name[name] = t
    if parallel_tool_calls is not None and not isinstance(parallel_tool_calls, bool):
        raise _bad("parallel_tool_calls", f"must be a boolean, got {_kind(parallel_tool_calls)}")
    choice = parse_tool_choice(tool_choice, list(by_name))
    if not normal:
        return None
    return ToolRequest(normal, choice, parallel_tool_calls is not False, by_name)


# ---------------------------------------------------------------- history
def _check_call(where: str, call: Any) -> dict:
    if not isinstance(call, dict):
        raise _bad(where, f"must be an object, got {_kind(call)}")
    cid = call.get("id")
    if not isinstance(cid, str) or not cid:
        raise _bad(f"{where}.id", "is required and must be a non-empty string")
    if call.get("type", "function") != "function":
        raise _bad(f"{where}.type", f"must be \"function\", got {json.dumps(call.get('type'))}")
    fn = call.get("function")
    if not isinstance(fn, dict):
        raise _bad(f"{where}.function", "is required and must be an object with name and arguments")
    if not isinstance(fn.get("name"), str) or not fn["name"]:
        raise _bad(f"{where}.function.name", "is required and must be a non-empty string")
    args = fn.get("arguments")
    if not isinstance(args, str):
        raise _bad(f"{where}.function.arguments", f"must be a string holding JSON, got {_kind(args)}")
    return {"id": cid, "type": "function", "function": {"name": fn["name"], "arguments": args}}


def check_messages(messages: list[dict], *, require_responses: bool = True) -> list[dict]:
    """Check the tool parts of chat history; returns the messages with `tool_calls` normalised.

    Assistant messages may carry `tool_calls` (content may then be empty); `tool` messages need a string
    `tool_call_id` answering a call of an earlier assistant message. `require_responses` (serving: True, as
    OpenAI) also demands that every call be answered before the next non-tool message; training data turns it
    off, so a conversation may end on the assistant's calls.
    """
    out: list[dict] = []
    open_ids: dict[str, int] = {}  # call ids awaiting a tool message -> the assistant message's index
    known: set[str] = set()
    for i, m in enumerate(messages):
        role = m.get("role")
        if role != "tool" and open_ids and require_responses:
            missing = ", ".join(open_ids)
            j = next(iter(open_ids.values()))
            raise _bad(f"messages[{j}].tool_calls", f"must each be answered by a tool message before "
                       f"messages[{i}]; no answer for: {missing}", "missing_tool_response")
        if role != "tool":
            open_ids.clear()
        msg = dict(m)
        calls = m.get("tool_calls")
        if calls is not None:
            if role != "assistant":
                raise _bad(f"messages[{i}].tool_calls", f"is only allowed on assistant messages, not {role!r}")
            if not isinstance(calls, list):
                raise _bad(f"messages[{i}].tool_calls", f"must be an array, got {_kind(calls)}")
            norm = [_check_call(f"messages[{i}].tool_calls[{j}]", c) for j, c in enumerate(calls)]
            for j, c in enumerate(norm):
                if c["id"] in known:
                    raise _bad(f"messages[{i}].tool_calls[{j}].id", f"repeats the id {c['id']!r} of an earlier call")
                known.add(c["id"])
                open_ids[c["id"]] = i
            if norm:
                msg["tool_calls"] = norm
            else:
                msg.pop("tool_calls")  # [] means no calls, as OpenAI reads it
        if role == "tool":
            cid = m.get("tool_call_id")
            if not isinstance(cid, str) or not cid:
                raise _bad(f"messages[{i}].tool_call_id", "is required on tool messages and must be a string")
            if cid not in known:
                raise _bad(f"messages[{i}].tool_call_id", f"is {cid!r}, which answers no tool call of an earlier "
                           "assistant message", "unknown_tool_call_id")
            if not isinstance(m.get("content"), str):
                raise _bad(f"messages[{i}].content", "is required on tool messages and must be text")
            open_ids.pop(cid, None)
        elif m.get("tool_call_id") is not None:
            raise _bad(f"messages[{i}].tool_call_id", f"is only allowed on tool messages, not {role!r}")
        out.append(msg)
    if open_ids and require_responses:
        j = next(iter(open_ids.values()))
        raise _bad(f"messages[{j}].tool_calls", "must each be answered by a tool message; no answer for: "
                   + ", ".join(open_ids), "missing_tool_response")
    return out
