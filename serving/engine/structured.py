"""Structured-output specs: what `SamplingParams.structured` may hold, validated and put in canonical form.

A spec is a plain JSON-able dict (it pickles through Ray), one of:

  {"type": "json_schema", "schema": {...}}          output is JSON valid under the schema (see schema_check)
  {"type": "json_object"}                           output is any JSON object
  {"type": "regex", "pattern": "[a-z]+@[a-z]+"}     the whole output matches the regex
  {"type": "choice", "choices": ["yes", "no"]}      the output is exactly one of the strings
  {"type": "grammar", "grammar": "root ::= ...", "syntax": "ebnf"}   xgrammar's EBNF (root rule `root`),
                                                    or "syntax": "lark" (start rule `start`)
  {"type": "tool_calls", "mode": "auto" | "required",
   "tags": [{"begin": "<tool_call>\\n", "schema": {...}, "end": "\\n</tool_call>"}, ...],
   "triggers": ["<tool_call>"],                     auto: free text until a trigger, then that call is
                                                    constrained (default: each tag's begin)
   "parallel": true,                                false: at most (auto) or exactly (required) one call
   "separator": "\\n"}                              required: between calls (only calls, at least one)

Any dict in a spec may carry "param": the request field an error names (the API passes e.g.
"response_format.json_schema.schema" or "tools[2].function.parameters"); it is not part of the cache key.
JSON output, tool calls' included, is compact with ", " and ": " separators (free whitespace lets small models
pad forever).
"""

from __future__ import annotations

import json
import re

from serving.engine.errors import InvalidRequestError
from serving.engine.schema_check import check_schema

KINDS = ("json_schema", "json_object", "regex", "choice", "grammar", "tool_calls")
DEFAULT_PARAM = "structured"
MAX_REPEAT = 1000  # {n,m} bounds above this compile for seconds (xgrammar expands them)
_REPEAT = re.compile(r"\{\s*(\d+)\s*(?:,\s*(\d*)\s*)?\}")


def _fields(spec: dict, param: str, required: tuple[str, ...], optional: tuple[str, ...]) -> None:
    for k in required:
        if k not in spec:
            raise InvalidRequestError(f"a {spec['type']!r} spec needs {k!r}", param=param)
    extra = sorted(set(spec) - set(required) - set(optional) - {"type", "param"})
    if extra:
        raise InvalidRequestError(f"unknown field {extra[0]!r} in a {spec['type']!r} spec", param=param)


def _string(value, param: str, what: str, allow_empty: bool = False) -> str:
    if not isinstance(value, str) or (not value and not allow_empty):
        raise InvalidRequestError(f"{what} must be a{'' if allow_empty else ' non-empty'} string", param=param)
    return value


def _repeats(text: str, param: str) -> None:
    for m in _REPEAT.finditer(text):
        if max(int(m.group(1)), int(m.group(2) or 0)) > MAX_REPEAT:
            raise InvalidRequestError(f"repetition {m.group(0)} exceeds the limit of {MAX_REPEAT}", param=param)


def normalize(spec, max_bytes: int) -> tuple[str, dict, dict]:
    """Validate a spec; returns (cache key, normalized spec, params). The key is the sorted-key JSON of the
    normalized spec, except that a schema's `properties` keep their order (it is the order of the output's
    keys); params are the request fields later (compile) errors name: base, schema, tags (one per tag)."""
    base = spec.get("param", DEFAULT_PARAM) if isinstance(spec, dict) else DEFAULT_PARAM
    if not isinstance(base, str) or not base:
        raise InvalidRequestError("param must be a non-empty string", param=DEFAULT_PARAM)
    if not isinstance(spec, dict) or spec.get("type") not in KINDS:
        got = spec.get("type") if isinstance(spec, dict) else type(spec).__name__
        raise InvalidRequestError(f"structured output type must be one of {', '.join(KINDS)}, got {got!r}",
                                  param=base)
    try:
        size = len(json.dumps(spec, ensure_ascii=False).encode())
    except (TypeError, ValueError, RecursionError) as exc:
        raise InvalidRequestError(f"the structured output spec is not plain JSON: {exc}", param=base) from None
    if size > max_bytes:
        raise InvalidRequestError(f"the structured output spec is {size} bytes, over the limit of {max_bytes}",
                                  param=base)
    kind = spec["type"]
    out: dict = {"type": kind}
    params = {"base": base, "schema": base if "param" in spec else f"{base}.schema", "tags": []}
    if kind == "json_schema":
        _fields(spec, base, ("schema",), ())
        out["schema"] = check_schema(spec["schema"], params["schema"])
    elif kind == "json_object":
        _fields(spec, base, (), ())
    elif kind == "regex":
        _fields(spec, base, ("pattern",), ())
        out["pattern"] = _string(spec["pattern"], base, "pattern")
        _repeats(out["pattern"], base)
    elif kind == "choice":
        _fields(spec, base, ("choices",), ())
        choices = spec["choices"]
        if not isinstance(choices, list) or not choices:
            raise InvalidRequestError("choices must be a non-empty list of strings", param=base)
        out["choices"] = sorted({_string(c, base, "each choice", allow_empty=True) for c in choices})
    elif kind == "grammar":
        _fields(spec, base, ("grammar",), ("syntax",))
        out["grammar"] = _string(spec["grammar"], base, "grammar")
        out["syntax"] = spec.get("syntax", "ebnf")
        if out["syntax"] not in ("ebnf", "lark"):
            raise InvalidRequestError(f"syntax must be ebnf or lark, got {out['syntax']!r}", param=base)
        _repeats(out["grammar"], base)
    else:
        out.update(_tool_calls(spec, base, params["tags"]))
    return json.dumps(out, ensure_ascii=False, separators=(",", ":")), out, params


def _tool_calls(spec: dict, base: str, tag_params: list[str]) -> dict:
    _fields(spec, base, ("mode", "tags"), ("triggers", "parallel", "separator"))
    mode = spec["mode"]
    if mode not in ("auto", "required"):
        raise InvalidRequestError(f"tool call mode must be auto or required, got {mode!r}", param=base)
    tags = spec["tags"]
    if not isinstance(tags, list) or not tags:
        raise InvalidRequestError("tags must be a non-empty list", param=base)
    out_tags = []
    for i, tag in enumerate(tags):
        where = f"{base}.tags[{i}]"
        if not isinstance(tag, dict):
            raise InvalidRequestError("each tag must be an object with begin, schema and end", param=where)
        tag_param = tag["param"] if isinstance(tag.get("param"), str) and tag["param"] else f"{where}.schema"
        tag_params.append(tag_param)
        missing = [k for k in ("begin", "schema", "end") if k not in tag]
        extra = sorted(set(tag) - {"begin", "schema", "end", "param"})
        if missing or extra:
            raise InvalidRequestError(f"tag field {(missing or extra)[0]!r} is {'missing' if missing else 'unknown'}",
                                      param=where)
        out_tags.append({"begin": _string(tag["begin"], f"{where}.begin", "begin"),
                         "end": _string(tag["end"], f"{where}.end", "end"),
                         "schema": check_schema(tag["schema"], tag_param)})
    parallel = spec.get("parallel", True)
    if not isinstance(parallel, bool):
        raise InvalidRequestError("parallel must be true or false", param=f"{base}.parallel")
    out = {"mode": mode, "parallel": parallel, "tags": out_tags}
    if mode == "auto":
        triggers = spec.get("triggers")
        if triggers is None:
            triggers = [t["begin"] for t in out_tags]
        if not isinstance(triggers, list) or not triggers:
            raise InvalidRequestError("triggers must be a non-empty list of strings", param=f"{base}.triggers")
        triggers = sorted({_string(t, f"{base}.triggers", "each trigger") for t in triggers})
        for i, tag in enumerate(out_tags):
            hits = [t for t in triggers if tag["begin"].startswith(t)]
            if len(hits) != 1:
                raise InvalidRequestError(
                    f"tag {i}'s begin {tag['begin']!r} must start with exactly one trigger, "
                    f"{'but none does' if not hits else 'but ' + ' and '.join(map(repr, hits)) + ' do'}",
                    param=f"{base}.triggers")
        out["triggers"] = triggers
    else:
        if "triggers" in spec:
            raise InvalidRequestError("triggers apply to mode auto only", param=f"{base}.triggers")
        out["separator"] = _string(spec.get("separator", "\n"), f"{base}.separator", "separator", allow_empty=True)
    return out
