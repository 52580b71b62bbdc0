"""JSON Schema keywords the grammar engine enforces; any other keyword is refused by name and JSON path.

xgrammar (0.2.9) turns a schema into a grammar but silently drops what it cannot express. Each keyword
below was probed with a schema and an instance that breaks only that keyword (tests/test_engine_structured.py
re-runs the probes against the installed xgrammar, so an upgrade that changes this fails a test):

- enforced: type, enum, const, anyOf, allOf with one subschema, local $ref ("#/..."), $defs/definitions;
  minLength, maxLength, pattern, format (FORMATS); minimum, maximum, exclusiveMinimum, exclusiveMaximum,
  multipleOf on integers; items, prefixItems, minItems, maxItems, contains, unevaluatedItems; properties,
  required, additionalProperties, patternProperties, propertyNames, minProperties, maxProperties,
  unevaluatedProperties.
- dropped by xgrammar, so refused here: uniqueItems, minContains, maxContains, oneOf (treated as anyOf),
  allOf with several subschemas, not, if/then/else, dependentRequired, dependentSchemas, dependencies,
  multipleOf on non-integers, the content* keywords, formats outside FORMATS, min/maxLength beside pattern
  or format, keywords beside anyOf/allOf/$ref (only the combinator is applied), keywords beside enum/const
  (only the values are applied), string or number keywords without a "type" naming that type, and a
  required name missing from properties. Unknown keywords are refused too (an "x-" prefix marks an
  extension that is an annotation).
- over-constrained (outputs stay valid): patterns match the whole string, properties come in declared order,
  properties not declared are not generated when `properties` is given, numbers are written without exponents,
  strings with minLength/maxLength hold no escapes.

`check_schema` also rewrites what it can express exactly: enum/const values beside a "type" are filtered to
that type. It returns the schema with keys sorted (the order of `properties` kept: it is the output's order),
which is both what gets compiled and the cache key.
"""

from __future__ import annotations

import re

from serving.engine.errors import InvalidRequestError

ANNOTATIONS = frozenset({"title", "description", "default", "examples", "$comment", "deprecated", "readOnly",
                         "writeOnly"})
ROOT_ONLY = frozenset({"$schema", "$id"})
DEFS = frozenset({"$defs", "definitions"})
STRING_KEYWORDS = frozenset({"minLength", "maxLength", "pattern", "format"})
NUMBER_KEYWORDS = frozenset({"minimum", "maximum", "exclusiveMinimum", "exclusiveMaximum", "multipleOf"})
ARRAY_KEYWORDS = frozenset({"items", "prefixItems", "minItems", "maxItems", "contains", "unevaluatedItems",
                            "uniqueItems"})
OBJECT_KEYWORDS = frozenset({"properties", "required", "additionalProperties", "patternProperties", "propertyNames",
                             "minProperties", "maxProperties", "unevaluatedProperties"})
FORMATS = frozenset({"date", "time", "date-time", "duration", "email", "hostname", "ipv4", "ipv6", "uri",
                     "uri-reference", "uri-template", "uuid", "json-pointer", "relative-json-pointer"})
REFUSED = {
    "uniqueItems": "the grammar cannot keep array items distinct",
    "minContains": "the grammar cannot count matching items", "maxContains": "the grammar cannot count matching items",
    "oneOf": "the grammar cannot require exactly one branch to match; use anyOf if the branches exclude each other",
    "not": "the grammar cannot exclude a schema",
    "if": "conditional schemas are not supported", "then": "conditional schemas are not supported",
    "else": "conditional schemas are not supported",
    "dependentRequired": "dependencies between properties are not supported",
    "dependentSchemas": "dependencies between properties are not supported",
    "dependencies": "dependencies between properties are not supported",
    "contentEncoding": "content keywords are not enforced", "contentMediaType": "content keywords are not enforced",
    "contentSchema": "content keywords are not enforced",
    "$dynamicRef": "dynamic references are not supported", "$dynamicAnchor": "dynamic references are not supported",
    "$anchor": "anchors are not supported; use $ref to #/$defs/...", "$vocabulary": "vocabularies are not supported",
    "additionalItems": "use prefixItems and items (JSON Schema 2020-12)",
}
MAX_DEPTH = 64
_JSON_TYPES = {"string": str, "boolean": bool, "object": dict, "array": list, "null": type(None)}
_IDENT = re.compile(r"^[A-Za-z_$][A-Za-z0-9_$-]*$")


def _key(path: str, key: str) -> str:
    return f"{path}.{key}" if _IDENT.match(key) else f"{path}[{key!r}]"


def _is_type(value, name: str) -> bool:
    if name in ("number", "integer"):
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            return False
        return name == "number" or float(value).is_integer()
    return isinstance(value, _JSON_TYPES[name]) and not (name != "boolean" and isinstance(value, bool))


class _Checker:
    def __init__(self, param: str):
        self.param = param

    def refuse(self, path: str, message: str):
        raise InvalidRequestError(f"{message} (at {path})", param=self.param)

    def schema(self, s, path: str, depth: int, root: bool = False, names: bool = False):
        if isinstance(s, bool):
            return s
        if not isinstance(s, dict):
            self.refuse(path, "a schema must be an object or a boolean")
        if depth > MAX_DEPTH:
            self.refuse(path, f"the schema is nested deeper than {MAX_DEPTH} levels")
        for k in s:
            if k in ANNOTATIONS or k.startswith("x-") or k in DEFS or (root and k in ROOT_ONLY):
                continue
            if k in REFUSED:
                if k == "uniqueItems" and s[k] is False:
                    continue
                self.refuse(_key(path, k), f"JSON Schema keyword {k!r} cannot be enforced: {REFUSED[k]}")
            if k not in ("type", "enum", "const", "anyOf", "allOf", "$ref") and k not in STRING_KEYWORDS \
                    and k not in NUMBER_KEYWORDS and k not in ARRAY_KEYWORDS and k not in OBJECT_KEYWORDS:
                self.refuse(_key(path, k), f"JSON Schema keyword {k!r} is not supported"
                            + (" here (only at the root)" if k in ROOT_ONLY else ""))
        types = s.get("type")
        types = [types] if isinstance(types, str) else list(types or ([] if not names else ["string"]))
        constraining = [k for k in s if k not in ANNOTATIONS and k not in DEFS and k not in ROOT_ONLY
                        and not k.startswith("x-") and not (k == "uniqueItems" and s[k] is False)]
        for combinator in ("anyOf", "allOf", "$ref"):
            if combinator in s:
                others = [k for k in constraining if k != combinator]
                if others:
                    self.refuse(_key(path, others[0]), f"keyword {others[0]!r} beside {combinator!r} is not "
                                f"enforced (only {combinator} is); move it into the {combinator} target")
        if "allOf" in s and (not isinstance(s["allOf"], list) or len(s["allOf"]) != 1):
            self.refuse(_key(path, "allOf"), "allOf with more than one subschema cannot be enforced; merge them")
        if "$ref" in s and not (isinstance(s["$ref"], str) and s["$ref"].startswith("#")):
            self.refuse(_key(path, "$ref"), "only local references (#/$defs/...) are supported")
        out = self.values(s, path, types, constraining)
        if out is not None:
            return out
        for k in constraining:
            if k in STRING_KEYWORDS and "string" not in types:
                self.refuse(_key(path, k), f"keyword {k!r} is only enforced together with \"type\": \"string\"")
            if k in NUMBER_KEYWORDS and not {"number", "integer"} & set(types):
                self.refuse(_key(path, k), f"keyword {k!r} is only enforced together with \"type\": "
                            "\"number\" or \"integer\"")
        if "format" in s and s["format"] not in FORMATS:
            self.refuse(_key(path, "format"), f"format {s['format']!r} cannot be enforced; supported: "
                        + ", ".join(sorted(FORMATS)))
        if ("pattern" in s or "format" in s) and ("minLength" in s or "maxLength" in s):
            k = "minLength" if "minLength" in s else "maxLength"
            self.refuse(_key(path, k), f"{k!r} beside pattern or format is not enforced; put the length in the pattern")
        if "pattern" in s and "format" in s:
            self.refuse(_key(path, "format"), "pattern and format together are not supported")
        if "multipleOf" in s and (types != ["integer"] or not _is_type(s["multipleOf"], "integer")):
            self.refuse(_key(path, "multipleOf"), "multipleOf is only enforced on \"type\": \"integer\" with an "
                        "integer divisor")
        if "required" in s and isinstance(s.get("properties"), dict):
            missing = [r for r in s["required"] if r not in s["properties"]]
            if missing:
                self.refuse(_key(path, "required"), f"required property {missing[0]!r} is not in properties")
        elif "required" in s and s["required"]:
            self.refuse(_key(path, "required"), "required needs the properties it names")
        out = {}
        for k in sorted(s):
            v, p = s[k], _key(path, k)
            if k == "properties" or k == "patternProperties" or k in DEFS:
                out[k] = {name: self.schema(sub, _key(p, name), depth + 1) for name, sub in v.items()}
                if k != "properties":
                    out[k] = dict(sorted(out[k].items()))
            elif k in ("anyOf", "allOf", "prefixItems"):
                out[k] = [self.schema(sub, f"{p}[{i}]", depth + 1) for i, sub in enumerate(v)]
            elif k in ("items", "additionalProperties", "propertyNames", "contains", "unevaluatedItems",
                       "unevaluatedProperties"):
                out[k] = self.schema(v, p, depth + 1, names=k == "propertyNames")  # property names are strings
            else:
                out[k] = v
        return out

    def values(self, s: dict, path: str, types: list[str], constraining: list[str]):
        """enum/const: only the values are compiled, so a "type" beside them is applied here by filtering."""
        if "enum" not in s and "const" not in s:
            return None
        if "enum" in s and "const" in s:
            self.refuse(_key(path, "const"), "enum and const together are not supported")
        kw = "enum" if "enum" in s else "const"
        others = [k for k in constraining if k not in (kw, "type")]
        if others:
            self.refuse(_key(path, others[0]), f"keyword {others[0]!r} beside {kw!r} is not enforced (only the "
                        f"{kw} values are); leave out the values it excludes instead")
        values = s["enum"] if kw == "enum" else [s["const"]]
        if types:
            values = [v for v in values if any(_is_type(v, t) for t in types)]
            if not values:
                self.refuse(_key(path, kw), f"no {kw} value has the type {'/'.join(types)}")
        out = {k: (dict(sorted((n, self.schema(d, _key(_key(path, k), n), 1)) for n, d in s[k].items()))
                   if k in DEFS else s[k]) for k in sorted(s) if k != "type" and k != kw}
        out["enum" if len(values) > 1 or kw == "enum" else "const"] = values if kw == "enum" else values[0]
        return dict(sorted(out.items()))


def check_schema(schema, param: str) -> dict | bool:
    """Validate `schema` as JSON Schema (jsonschema's check_schema, under its $schema or 2020-12) and refuse
    keywords the grammar engine would not enforce; returns the schema to compile (see the module docstring).
    Errors are InvalidRequestError with `param`, the message naming the keyword's JSON path."""
    import jsonschema

    if not isinstance(schema, (dict, bool)):
        raise InvalidRequestError(f"the schema must be a JSON object, got {type(schema).__name__}", param=param)
    cls = jsonschema.validators.validator_for(schema, default=jsonschema.Draft202012Validator) \
        if isinstance(schema, dict) else jsonschema.Draft202012Validator
    try:
        cls.check_schema(schema)
    except jsonschema.SchemaError as exc:
        where = "$" + "".join(f"[{p}]" if isinstance(p, int) else _key("", str(p)) for p in exc.path)
        raise InvalidRequestError(f"not a valid JSON Schema: {exc.message} (at {where})", param=param) from None
    except RecursionError:
        raise InvalidRequestError(f"the schema is nested deeper than {MAX_DEPTH} levels", param=param) from None
    if schema is False:
        raise InvalidRequestError("the schema `false` accepts nothing", param=param)
    return _Checker(param).schema(schema, "$", 0, root=True)
