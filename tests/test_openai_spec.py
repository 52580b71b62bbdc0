"""The OpenAI-spec validator itself (tests/openai_spec.py): it passes what the spec allows and fails, naming the
field, what it forbids, so a green conformance test (test_openai_conformance.py) means something.

Known-good bodies are the spec's own `x-oaiMeta` response examples (copied here: the examples are not schemas).
"""

from __future__ import annotations

import base64
import json

import pytest
from jsonschema import Draft202012Validator

from tests import openai_spec as spec

# the spec's example response of createChatCompletion ("Default"), verbatim
CHAT = {
    "id": "chatcmpl-B9MBs8CjcvOU2jLn4n570S5qMJKcT", "object": "chat.completion", "created": 1741569952,
    "model": "gpt-5.4",
    "choices": [{"index": 0, "message": {"role": "assistant", "content": "Hello! How can I assist you today?",
                                         "refusal": None, "annotations": []},
                 "logprobs": None, "finish_reason": "stop"}],
    "usage": {"prompt_tokens": 19, "completion_tokens": 10, "total_tokens": 29,
              "prompt_tokens_details": {"cached_tokens": 0, "audio_tokens": 0},
              "completion_tokens_details": {"reasoning_tokens": 0, "audio_tokens": 0,
                                            "accepted_prediction_tokens": 0, "rejected_prediction_tokens": 0}},
    "service_tier": "default",
}
# its streaming example's chunks (with the spec's "...." left out)
CHUNKS = [
    {"id": "chatcmpl-123", "object": "chat.completion.chunk", "created": 1694268190, "model": "gpt-4o-mini",
     "system_fingerprint": "fp_44709d6fcb",
     "choices": [{"index": 0, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                  "finish_reason": None}]},
    {"id": "chatcmpl-123", "object": "chat.completion.chunk", "created": 1694268190, "model": "gpt-4o-mini",
     "system_fingerprint": "fp_44709d6fcb",
     "choices": [{"index": 0, "delta": {}, "logprobs": None, "finish_reason": "stop"}]},
]


def sse(*events) -> str:
    return "".join(f"data: {e if isinstance(e, str) else json.dumps(e, ensure_ascii=False)}\n\n" for e in events)


def paths(component, instance, **kw) -> dict[str, str]:
    return dict(spec.problems(component, instance, **kw))


def with_(body: dict, path: str, value) -> dict:
    """A deep copy of `body` with the dotted `path` set to `value` (or removed, for value=DELETE)."""
    out = json.loads(json.dumps(body))
    *parents, last = [int(p) if p.isdigit() else p for p in path.split(".")]
    node = out
    for p in parents:
        node = node[p]
    if value is DELETE:
        del node[last]
    else:
        node[last] = value
    return out


DELETE = object()


def test_the_specs_own_examples_pass():
    spec.validate("CreateChatCompletionResponse", CHAT)
    for chunk in CHUNKS:
        spec.validate("CreateChatCompletionStreamResponse", chunk)
    spec.validate("ListModelsResponse", {"object": "list", "data": [
        {"id": "model-id-0", "object": "model", "created": 1686935002, "owned_by": "organization-owner"}]})
    spec.validate("CreateEmbeddingResponse", {"object": "list", "model": "text-embedding-ada-002",
                                              "data": [{"object": "embedding", "embedding": [0.0023, -0.0093],
                                                        "index": 0}],
                                              "usage": {"prompt_tokens": 8, "total_tokens": 8}})


def test_null_where_the_spec_says_string_fails_naming_the_field():
    bad = with_(CHAT, "system_fingerprint", None)
    with pytest.raises(spec.SpecViolation) as e:
        spec.validate("CreateChatCompletionResponse", bad)
    assert e.value.problems == [("$.system_fingerprint", "None is not of type 'string'")]
    assert "$.system_fingerprint" in str(e.value) and "CreateChatCompletionResponse" in str(e.value)


def test_a_missing_required_field_is_named_in_the_path():
    bad = with_(CHAT, "choices.0.message.refusal", DELETE)  # required, though it may be null
    assert paths("CreateChatCompletionResponse", bad) == {"$.choices[0].message.refusal":
                                                          "required by the spec, missing"}
    assert paths("CreateChatCompletionResponse", with_(CHAT, "created", DELETE)) == {
        "$.created": "required by the spec, missing"}


def test_wrong_types_and_enum_values_fail_naming_the_field():
    assert paths("CreateChatCompletionResponse", with_(CHAT, "created", "1741569952")) == {
        "$.created": "'1741569952' is not of type 'integer'"}
    got = paths("CreateChatCompletionResponse", with_(CHAT, "choices.0.finish_reason", "abort"))
    assert list(got) == ["$.choices[0].finish_reason"] and "'abort' is not one of" in got["$.choices[0].finish_reason"]
    got = paths("CreateChatCompletionResponse", with_(CHAT, "object", "chat.completion.chunk"))
    assert list(got) == ["$.object"]
    # inside an `anyOf: [string, null]`: both forms are named
    got = paths("CreateChatCompletionResponse", with_(CHAT, "choices.0.message.content", 42))
    assert got == {"$.choices[0].message.content": "matches none of the allowed forms: 42 is not of type 'string'; "
                                                   "42 is not of type 'null'"}


def test_nullable_is_json_schemas_null_and_nothing_more():
    chunk = with_(CHUNKS[0], "usage", None)  # `$ref: CompletionUsage` + `nullable: true`
    spec.validate("CreateChatCompletionStreamResponse", chunk)
    assert "$.usage.total_tokens" in paths("CreateChatCompletionStreamResponse",
                                           with_(CHUNKS[0], "usage", {"prompt_tokens": 1, "completion_tokens": 1}))
    # enum + nullable: null is allowed, another string still is not
    assert not paths("CreateChatCompletionStreamResponse", CHUNKS[0])  # finish_reason: null
    assert list(paths("CreateChatCompletionStreamResponse", with_(CHUNKS[0], "choices.0.finish_reason", "done"))) \
        == ["$.choices[0].finish_reason"]
    # a nullable object's own fields are still checked, and the error is inside it
    lp = {"content": [{"token": "a", "logprob": "high", "bytes": [97], "top_logprobs": []}]}
    got = paths("CreateChatCompletionStreamResponse", with_(CHUNKS[0], "choices.0.logprobs", lp))
    assert got == {"$.choices[0].logprobs.content[0].logprob": "'high' is not of type 'number'",
                   "$.choices[0].logprobs.refusal": "required by the spec, missing"}


def test_conversion_of_openapi_keywords():
    raw = {"Tagged": {"type": "object", "properties": {"type": {"type": "string", "enum": ["a"]}}}}
    s = spec._convert({"type": "string", "enum": ["x"], "nullable": True}, raw)
    v = Draft202012Validator(s)
    assert v.is_valid(None) and v.is_valid("x") and not v.is_valid("y")
    # a property *named* nullable / type is a property, not a keyword
    s = spec._convert({"type": "object", "properties": {"nullable": {"type": "boolean"}, "type": {"type": "string"}},
                       "required": ["nullable", "nullable"]}, raw)
    assert s == {"type": "object", "properties": {"nullable": {"type": "boolean"}, "type": {"type": "string"}},
                 "required": ["nullable"]}
    s = spec._convert({"type": "number", "minimum": 0, "exclusiveMinimum": True, "x-oaiMeta": {}}, raw)
    assert s == {"type": "number", "exclusiveMinimum": 0}
    assert spec._convert({"$ref": "#/components/schemas/Tagged", "nullable": True}, raw) == {
        "anyOf": [{"$ref": "#/components/schemas/Tagged"}, {"type": "null"}]}


def test_every_converted_component_is_valid_json_schema_2020_12():
    Draft202012Validator.check_schema({"$defs": {n: spec.schema(n) for n in spec.components()}})


def test_discriminated_unions_report_the_branch_of_the_tag():
    call = {"id": "call_1", "type": "function", "function": {"name": "f", "arguments": "{}"}}
    msg = dict(CHAT["choices"][0]["message"], tool_calls=[call])
    body = with_(CHAT, "choices.0.message", msg)
    spec.validate("CreateChatCompletionResponse", body)
    # a function call without arguments: named inside the function branch, not "valid under none of ..."
    assert paths("CreateChatCompletionResponse", with_(body, "choices.0.message.tool_calls.0.function",
                                                       {"name": "f"})) == {
        "$.choices[0].message.tool_calls[0].function.arguments": "required by the spec, missing"}
    got = paths("CreateChatCompletionResponse", with_(body, "choices.0.message.tool_calls.0.type", "tool"))
    assert list(got) == ["$.choices[0].message.tool_calls[0].type"] and "'custom', 'function'" in \
        got["$.choices[0].message.tool_calls[0].type"]
    # the Responses API's event union (53 members)
    assert paths("ResponseStreamEvent", {"type": "response.output_text.delta", "delta": 3, "item_id": "i",
                                         "output_index": 0, "content_index": 0, "sequence_number": 1,
                                         "logprobs": []}) == {"$.delta": "3 is not of type 'string'"}
    assert spec.event_types("ResponseStreamEvent")["response.output_text.delta"] == "ResponseTextDeltaEvent"
    assert all(spec.event_types("ResponseStreamEvent")[t] == c for t, c in spec.RESPONSES_API["events"].items())


def test_also_allow_accepts_only_the_named_alternative_at_the_named_path():
    vec = base64.b64encode(b"\0" * 8).decode()
    body = {"object": "list", "model": "m", "data": [{"object": "embedding", "embedding": vec, "index": 0}],
            "usage": {"prompt_tokens": 1, "total_tokens": 1}}
    assert list(paths("CreateEmbeddingResponse", body)) == ["$.data[0].embedding"]
    b64 = {"data.*.embedding": {"type": "string"}}
    spec.validate("CreateEmbeddingResponse", body, also_allow=b64)
    assert list(paths("CreateEmbeddingResponse", with_(body, "data.0.embedding", 7), also_allow=b64)) == \
        ["$.data[0].embedding"]
    assert list(paths("CreateEmbeddingResponse", with_(body, "data.0.index", "0"), also_allow=b64)) == \
        ["$.data[0].index"]


def test_stream_events_validates_each_event_and_the_framing():
    good = sse(*CHUNKS, "[DONE]")
    assert spec.stream_events("CreateChatCompletionStreamResponse", good, done=True) == CHUNKS
    # the same bytes in chunks that split a UTF-8 character and a line
    accented = with_(CHUNKS[0], "choices.0.delta.content", "é")
    raw = sse(accented, "[DONE]").encode()
    cut = raw.index("é".encode()) + 1
    assert spec.stream_events("CreateChatCompletionStreamResponse", [raw[:cut], raw[cut:]], done=True) == [accented]

    def fails(text, **kw) -> dict:
        with pytest.raises(spec.SpecViolation) as e:
            spec.stream_events("CreateChatCompletionStreamResponse", text, **kw)
        return dict(e.value.problems)

    assert fails(sse(CHUNKS[0], with_(CHUNKS[1], "system_fingerprint", None), "[DONE]"), done=True) == {
        "event[1] $.system_fingerprint": "None is not of type 'string'"}
    assert fails(sse(*CHUNKS), done=True) == {"end of stream": "no data: [DONE]"}
    assert fails(sse(CHUNKS[0], "[DONE]", CHUNKS[1])) == {"event[2]": "an event after data: [DONE]"}
    assert "not closed by a blank line" in fails(sse(CHUNKS[0]) + "data: [DONE]\n")["end of stream"]
    assert "not JSON" in fails(sse("{oops", "[DONE]"))["event[0]"]
    assert fails(sse(*CHUNKS, "[DONE]"), done=False) == {"end of stream": "data: [DONE] where the API sends none"}
    named = "event: response.created\n" + sse({"type": "response.in_progress"})
    assert "event name 'response.created' but payload type 'response.in_progress'" in \
        fails(named)["event[0]"]


def test_component_names_come_from_the_specs_paths():
    assert spec.response_component("post", "/chat/completions") == spec.CHAT["body"]
    assert spec.response_component("post", "/chat/completions", "text/event-stream") == spec.CHAT["stream"]
    assert spec.response_component("post", "/completions") == spec.COMPLETIONS["body"]
    assert spec.response_component("post", "/embeddings") == spec.EMBEDDINGS["body"]
    assert spec.response_component("get", "/models") == spec.MODELS["list"]
    assert spec.response_component("get", "/models/{model}") == spec.MODELS["one"]
    assert spec.response_component("post", "/responses") == spec.RESPONSES_API["body"]
    assert spec.response_component("post", "/responses", "text/event-stream") == spec.RESPONSES_API["stream"]
    with pytest.raises(KeyError, match="CreateChatCompletionResponse"):
        spec.schema("CreateChatCompletionResponses")  # a typo suggests the real name
    assert spec.spec_info()["version"]  # the upstream date, shown in every SpecViolation
