"""Request fields that constrain the output, mapped to the engine's structured-output spec.

OpenAI's `response_format` (`text`, `json_object`, `json_schema`) and vLLM's `structured_outputs` extension
(`choice`, `regex`, `grammar`, `json`, `json_object`) become one `SamplingParams.structured` dict (see
serving.engine.structured), whose `param` names the request field a later error is about. The engine checks
and compiles it in the replica before the stream starts, so a bad schema is a 400 naming
`response_format.json_schema.schema`, never an error inside a stream. Tool calls (serving.api.tools) become
a `tool_calls` spec in the replica, where the model's call format is known (`tool_grammar_spec`).
"""

from __future__ import annotations

import hashlib
import json
from typing import Any

from serving.api.errors import APIError

STRUCTURED_KEYS = ("json", "regex", "choice", "grammar", "json_object")


def _bad(param: str, message: str) -> APIError:
    return APIError(400, f"{param}: {message}", param=param, code="invalid_value")


def from_response_format(response_format: Any) -> dict | None:
    """OpenAI's response_format -> an engine spec (None for text)."""
    if response_format is None:
        return None
    if not isinstance(response_format, dict):
        raise _bad("response_format", "must be an object such as {\"type\": \"json_object\"}")
    kind = response_format.get("type", "text")
    if kind == "text":
        return None
    if kind == "json_object":
        # {"type": "json_object", "schema": {...}} is Together's/Fireworks' form (instructor < 1.4 sends it).
        schema = response_format.get("schema")
        if schema is None:
            return {"type": "json_object", "param": "response_format"}
        if not isinstance(schema, dict):
            raise _bad("response_format.schema", "must be a JSON Schema object")
        return {"type": "json_schema", "schema": schema, "param": "response_format.schema"}
    if kind != "json_schema":
        raise _bad("response_format.type", f"must be text, json_object or json_schema, got {kind!r}")
    js = response_format.get("json_schema")
    if not isinstance(js, dict):
        raise _bad("response_format.json_schema", "is required with type json_schema: "
                                                  "{\"name\": ..., \"schema\": {...}}")
    name = js.get("name")
    if not isinstance(name, str) or not name or len(name) > 64:
        raise _bad("response_format.json_schema.name", "must be a non-empty string of at most 64 characters")
    schema = js.get("schema", {})
    if not isinstance(schema, dict):
        raise _bad("response_format.json_schema.schema", "must be a JSON Schema object")
    if "strict" in js and not isinstance(js["strict"], bool | None):
        raise _bad("response_format.json_schema.strict", "must be true or false")
    return {"type": "json_schema", "schema": schema, "param": "response_format.json_schema.schema"}


def from_structured_outputs(value: Any) -> dict | None:
    """vLLM's `structured_outputs` ({"json"|"regex"|"choice"|"grammar"|"json_object": ...}) -> an engine spec."""
    if value is None:
        return None
    if not isinstance(value, dict):
        raise _bad("structured_outputs", f"must be an object with one of {', '.join(STRUCTURED_KEYS)}")
    given = [k for k in STRUCTURED_KEYS if value.get(k) not in (None, False)]
    unknown = sorted(k for k in value if k not in STRUCTURED_KEYS and k not in ("whitespace_pattern",))
    if unknown:
        raise _bad(f"structured_outputs.{unknown[0]}", f"is not supported (use one of {', '.join(STRUCTURED_KEYS)})")
    if len(given) != 1:
        raise _bad("structured_outputs", f"give exactly one of {', '.join(STRUCTURED_KEYS)}")
    key = given[0]
    v, param = value[key], f"structured_outputs.{key}"
    if key == "json":
        if isinstance(v, str):
            try:
                v = json.loads(v)
            except ValueError as exc:
                raise _bad(param, f"is not valid JSON: {exc}") from None
        if not isinstance(v, dict):
            raise _bad(param, "must be a JSON Schema object")
        return {"type": "json_schema", "schema": v, "param": param}
    if key == "json_object":
        return {"type": "json_object", "param": param}
    if key == "regex":
        return {"type": "regex", "pattern": v, "param": param}
    if key == "choice":
        return {"type": "choice", "choices": v, "param": param}
    syntax = "lark" if isinstance(v, str) and ("start:" in v or "%import" in v) else "ebnf"
    return {"type": "grammar", "grammar": v, "syntax": syntax, "param": param}


def request_spec(response_format: Any, structured_outputs: Any) -> dict | None:
    """The one constraint of a request; both fields at once is a 400."""
    a, b = from_response_format(response_format), from_structured_outputs(structured_outputs)
    if a is not None and b is not None:
        raise _bad("structured_outputs", "give either response_format or structured_outputs, not both")
    return a or b


def tool_grammar_spec(grammar, request) -> dict | None:
    """serving.api.tool_parsers.ToolGrammar of a serving.api.tools.ToolRequest -> the engine's `tool_calls`
    spec; each tag's errors name its tool's `tools[i].function.parameters`. A named tool_choice makes exactly
    one call (as vLLM and OpenAI do), whatever parallel_tool_calls says."""
    if grammar is None:
        return None
    tools = request.tools
    index = {t["function"]["name"]: i for i, t in enumerate(tools)}
    tags = [{"begin": t.begin, "schema": t.schema, "end": t.end,
             "param": f"tools[{index.get(t.tool, 0)}].function.parameters"} for t in grammar.tags]
    parallel = grammar.max_calls is None and request.choice.function is None
    spec = {"type": "tool_calls", "mode": grammar.mode, "tags": tags, "parallel": parallel, "param": "tools"}
    if grammar.mode == "auto":
        spec["triggers"] = list(grammar.triggers)
    else:
        spec["separator"] = grammar.separator
    return spec


def describe(spec: dict | None, tools: list[dict] | None) -> dict | None:
    """What the audit log records of a constrained request: the kind, a hash of the constraint, tool names;
    never its content."""
    if spec is None and not tools:
        return None
    out: dict = {}
    if spec is not None:
        body = {k: v for k, v in spec.items() if k != "param"}
        out["kind"] = spec["type"]
        out["hash"] = hashlib.sha256(json.dumps(body, sort_keys=True).encode()).hexdigest()[:16]
    if tools:
        out["tools"] = [t["function"]["name"] for t in tools]
    return out
