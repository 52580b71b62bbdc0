"""Responses API items <-> chat messages (serving.api.response_items): conversions, the chat pipeline accepting
what they produce, and every refusal's `param`."""

from __future__ import annotations

import pytest

from serving.api.errors import APIError
from serving.api.protocol import ChatCompletionRequest
from serving.api.response_items import (
    chat_messages,
    chat_response_format,
    chat_tool_choice,
    chat_tools,
    normalize_input,
    output_items,
    response_status,
    response_usage,
    responses_error,
    responses_param,
)
from serving.api.response_store import ResponseStore, new_response_id
from serving.api.tools import parse_tool_request

WEATHER = {"type": "function", "name": "get_weather", "description": "Weather of a city",
           "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]},
           "strict": True}


def refused(fn, *args, **kwargs) -> APIError:
    with pytest.raises(APIError) as info:
        fn(*args, **kwargs)
    err = info.value
    assert err.status == 400 and err.type == "invalid_request_error"
    assert err.message.startswith(err.param), err.message  # the message names the field it is about
    return err


def chat_request(messages, **fields) -> ChatCompletionRequest:
    """The chat pipeline's own request model, checked as the gateway checks a chat request."""
    req = ChatCompletionRequest(model="m", messages=messages, **{k: v for k, v in fields.items() if v is not None})
    req.check()
    return req


# ---------------------------------------------------------------- input -> items
def test_string_input_is_one_user_message():
    [item] = normalize_input("Hello")
    assert item["type"] == "message" and item["role"] == "user" and item["status"] == "completed"
    assert item["id"].startswith("msg_") and len(item["id"]) == 4 + 48
    assert item["content"] == [{"type": "input_text", "text": "Hello"}]
    assert chat_messages([], [item]) == [{"role": "user", "content": "Hello"}]


def test_message_forms_normalise_to_text_parts():
    items = normalize_input([
        {"role": "developer", "content": "Be terse."},  # the short form
        {"type": "message", "role": "user", "content": [{"type": "input_text", "text": "a"},
                                                        {"type": "input_text", "text": "b"}]},
        {"type": "message", "role": "assistant", "content": "Sure.", "id": "msg_client", "status": "incomplete"},
        {"role": "user", "content": [{"type": "output_text", "text": "c"}]},
    ])
    assert [i["role"] for i in items] == ["developer", "user", "assistant", "user"]
    assert items[0]["content"] == [{"type": "input_text", "text": "Be terse."}]
    assert items[2]["content"] == [{"type": "output_text", "text": "Sure.", "annotations": []}]
    assert items[2]["id"] == "msg_client" and items[2]["status"] == "incomplete"  # a client's id and status kept
    assert items[3]["content"] == [{"type": "input_text", "text": "c"}]
    assert len({i["id"] for i in items}) == 4
    messages = chat_messages([], items)
    assert messages == [{"role": "system", "content": "Be terse."}, {"role": "user", "content": "a\nb"},
                        {"role": "assistant", "content": "Sure."}, {"role": "user", "content": "c"}]
    assert chat_request(messages).template_messages() == messages


def test_function_calls_and_outputs_become_tool_calls_and_tool_messages():
    items = normalize_input([
        {"role": "user", "content": "Weather in Paris and Oslo?"},
        {"type": "message", "role": "assistant", "content": "Checking."},
        {"type": "function_call", "call_id": "call_1", "name": "get_weather", "arguments": '{"city": "Paris"}'},
        {"type": "function_call", "call_id": "call_2", "name": "get_weather", "arguments": '{"city": "Oslo"}'},
        {"type": "function_call_output", "call_id": "call_1", "output": "18C"},
        {"type": "function_call_output", "call_id": "call_2", "output": [{"type": "input_text", "text": "9C"}]},
        {"type": "function_call", "call_id": "call_3", "name": "get_weather", "arguments": '{"city": "Rome"}'},
        {"type": "function_call_output", "call_id": "call_3", "output": "25C"},
    ])
    assert items[2]["id"].startswith("fc_") and items[4]["id"].startswith("fco_")
    assert items[5]["output"] == [{"type": "input_text", "text": "9C"}]
    messages = chat_messages([], items)
    call = lambda cid, city: {"id": cid, "type": "function",  # noqa: E731
                              "function": {"name": "get_weather", "arguments": f'{{"city": "{city}"}}'}}
    assert messages == [
        {"role": "user", "content": "Weather in Paris and Oslo?"},
        {"role": "assistant", "content": "Checking.", "tool_calls": [call("call_1", "Paris"), call("call_2", "Oslo")]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18C"},
        {"role": "tool", "tool_call_id": "call_2", "content": "9C"},
        {"role": "assistant", "content": "", "tool_calls": [call("call_3", "Rome")]},
        {"role": "tool", "tool_call_id": "call_3", "content": "25C"},
    ]
    tools = chat_tools([WEATHER])
    req = chat_request(messages, tools=tools, tool_choice=chat_tool_choice("auto", tools))
    assert req.template_messages() == messages and req.tool_request.tools == tools


def test_instructions_come_first_and_are_not_carried_into_the_next_turn(tmp_path):
    store = ResponseStore(tmp_path / "r.sqlite3")
    turn1 = normalize_input("What is 2+2?")
    messages = chat_messages([], turn1, instructions="Answer in French.")
    assert messages[0] == {"role": "system", "content": "Answer in French."}
    rid = new_response_id()
    store.put({"id": rid, "model": "m", "status": "completed", "instructions": "Answer in French.",
               "output": output_items("Quatre.")}, turn1, None)
    turn2 = normalize_input("And 3+3?")
    messages = chat_messages(store.conversation(rid, None), turn2, instructions="Answer in German.")
    assert messages == [{"role": "system", "content": "Answer in German."},
                        {"role": "user", "content": "What is 2+2?"}, {"role": "assistant", "content": "Quatre."},
                        {"role": "user", "content": "And 3+3?"}]
    assert chat_messages(store.conversation(rid, None), turn2)[0] == {"role": "user", "content": "What is 2+2?"}


def test_a_follow_up_answers_the_previous_responses_calls():
    history = normalize_input("Weather in Paris?") + output_items(None, [
        {"id": "call_9", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}}])
    turn = normalize_input([{"type": "function_call_output", "call_id": "call_9", "output": "18C"}])
    messages = chat_messages(history, turn)
    assert [m["role"] for m in messages] == ["user", "assistant", "tool"]
    assert messages[1]["tool_calls"][0]["id"] == "call_9" and messages[2]["tool_call_id"] == "call_9"
    err = refused(chat_messages, history, normalize_input("never mind"))  # the call is left unanswered
    assert err.param == "input" and err.code == "missing_tool_response" and "call_9" in err.message
    err = refused(chat_messages, history, [])  # ...also when nothing follows it
    assert err.param == "input" and "call_9" in err.message


def test_replayed_output_items_are_valid_input():
    out = output_items("Let me look.", [{"id": "call_a", "function": {"name": "f", "arguments": "{}"}}])
    replay = normalize_input([{"role": "user", "content": "hi"}, *out,
                              {"type": "function_call_output", "call_id": "call_a", "output": "ok"}])
    assert [i["id"] for i in replay[1:3]] == [o["id"] for o in out]  # ids of the earlier output kept
    assert chat_messages([], replay)[1] == {"role": "assistant", "content": "Let me look.", "tool_calls": [
        {"id": "call_a", "type": "function", "function": {"name": "f", "arguments": "{}"}}]}


@pytest.mark.parametrize("input_, param, code", [
    (None, "input", "invalid_value"),
    ({"role": "user"}, "input", "invalid_value"),
    ("", "input", "invalid_value"),
    ([], "input", "invalid_value"),
    (["hi"], "input[0]", "invalid_value"),
    ([{"content": "no role, no type"}], "input[0].type", "invalid_value"),
    ([{"role": "user", "content": "ok"}, {"type": "reasoning", "summary": []}], "input[1].type", "unsupported_value"),
    ([{"type": "item_reference", "id": "msg_1"}], "input[0].type", "unsupported_value"),
    ([{"role": "tool", "content": "x"}], "input[0].role", "invalid_value"),
    ([{"type": "message", "role": "user"}], "input[0].content", "invalid_value"),
    ([{"role": "user", "content": 5}], "input[0].content", "invalid_value"),
    ([{"role": "user", "content": []}], "input[0].content", "invalid_value"),
    ([{"role": "user", "content": ["text"]}], "input[0].content[0]", "invalid_value"),
    ([{"role": "user", "content": [{"type": "input_text", "text": "look"},
                                   {"type": "input_image", "image_url": "https://x/y.png"}]}],
     "input[0].content[1].type", "unsupported_content"),
    ([{"role": "user", "content": [{"type": "input_text"}]}], "input[0].content[0].text", "invalid_value"),
    ([{"role": "user", "content": "a", "status": "done"}], "input[0].status", "invalid_value"),
    ([{"role": "user", "content": "a", "id": 7}], "input[0].id", "invalid_value"),
    ([{"role": "user", "content": "a", "id": "m1"}, {"role": "user", "content": "b", "id": "m1"}],
     "input[1].id", "invalid_value"),
    ([{"role": "user", "content": "a"}, {"role": "user", "content": "b"},
      {"type": "function_call", "name": "f", "arguments": "{}"}], "input[2].call_id", "invalid_value"),
    ([{"type": "function_call", "call_id": "", "name": "f", "arguments": "{}"}], "input[0].call_id",
     "invalid_value"),
    ([{"type": "function_call", "call_id": "c", "name": "bad name", "arguments": "{}"}], "input[0].name",
     "invalid_value"),
    ([{"type": "function_call", "call_id": "c", "name": "f", "arguments": {"x": 1}}], "input[0].arguments",
     "invalid_value"),
    ([{"type": "function_call_output", "output": "x"}], "input[0].call_id", "invalid_value"),
    ([{"type": "function_call_output", "call_id": "c"}], "input[0].output", "invalid_value"),
    ([{"type": "function_call_output", "call_id": "c", "output": [{"type": "input_file", "file_id": "f"}]}],
     "input[0].output[0].type", "unsupported_content"),
])
def test_bad_input_names_the_field(input_, param, code):
    err = refused(normalize_input, input_)
    assert (err.param, err.code) == (param, code)


@pytest.mark.parametrize("input_, param, code", [
    ([{"role": "user", "content": "hi"}, {"type": "function_call_output", "call_id": "nope", "output": "x"}],
     "input[1].call_id", "unknown_tool_call_id"),
    ([{"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
      {"role": "user", "content": "what now?"}], "input[0].call_id", "missing_tool_response"),
    ([{"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"}], "input[0].call_id",
     "missing_tool_response"),
    ([{"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
      {"type": "function_call", "call_id": "c1", "name": "g", "arguments": "{}"}], "input[1].call_id",
     "invalid_value"),
    ([{"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
      {"type": "function_call", "call_id": "c2", "name": "f", "arguments": "{}"},
      {"type": "function_call_output", "call_id": "c1", "output": "x"},
      {"type": "function_call", "call_id": "c3", "name": "f", "arguments": "{}"}], "input[1].call_id",
     "missing_tool_response"),
])
def test_bad_call_sequences_name_the_item(input_, param, code):
    err = refused(chat_messages, [], normalize_input(input_))
    assert (err.param, err.code) == (param, code)


def test_bad_instructions_and_calls_repeating_an_earlier_turn():
    assert refused(chat_messages, [], normalize_input("hi"), instructions=["x"]).param == "instructions"
    history = normalize_input([{"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"},
                               {"type": "function_call_output", "call_id": "c1", "output": "x"}])
    again = normalize_input([{"type": "function_call", "call_id": "c1", "name": "f", "arguments": "{}"}])
    err = refused(chat_messages, history, again)
    assert err.param == "input[0].call_id" and "earlier turn" in err.message


# ---------------------------------------------------------------- tools, tool_choice, text.format
def test_function_tools_become_chat_tools():
    tools = chat_tools([WEATHER, {"type": "function", "name": "now"}])
    assert tools == [
        {"type": "function", "function": {"name": "get_weather", "description": "Weather of a city",
                                          "parameters": WEATHER["parameters"], "strict": True}},
        {"type": "function", "function": {"name": "now", "parameters": {"type": "object", "properties": {}}}},
    ]
    assert parse_tool_request(tools).tools == tools  # the chat side accepts them as they are
    assert chat_tools(None) is None and chat_tools([]) is None


@pytest.mark.parametrize("tools, param, code", [
    ({"type": "function", "name": "f"}, "tools", "invalid_value"),
    (["f"], "tools[0]", "invalid_value"),
    ([{"type": "web_search_preview"}], "tools[0].type", "unsupported_tool_type"),
    ([WEATHER, {"type": "file_search", "vector_store_ids": ["vs"]}], "tools[1].type", "unsupported_tool_type"),
    ([{"type": "function", "function": {"name": "f"}}], "tools[0].name", "invalid_value"),
    ([{"type": "function", "name": "has space"}], "tools[0].name", "invalid_value"),
    ([WEATHER, dict(WEATHER)], "tools[1].name", "invalid_value"),
    ([{"type": "function", "name": "f", "description": 3}], "tools[0].description", "invalid_value"),
    ([{"type": "function", "name": "f", "parameters": {"type": "string"}}], "tools[0].parameters",
     "invalid_function_parameters"),
    ([{"type": "function", "name": "f", "parameters": {"type": "object", "properties": {"a": {"type": 5}}}}],
     "tools[0].parameters", "invalid_function_parameters"),
    ([{"type": "function", "name": "f", "strict": "yes"}], "tools[0].strict", "invalid_value"),
    ([{"type": "function", "name": f"f{i}"} for i in range(129)], "tools", "invalid_value"),
])
def test_bad_tools_name_the_field(tools, param, code):
    err = refused(chat_tools, tools)
    assert (err.param, err.code) == (param, code)


def test_tool_choice_becomes_chat_form():
    tools = chat_tools([WEATHER])
    for mode in ("auto", "none", "required"):
        assert chat_tool_choice(mode, tools) == mode
    named = chat_tool_choice({"type": "function", "name": "get_weather"}, tools)
    assert named == {"type": "function", "function": {"name": "get_weather"}}
    req = chat_request([{"role": "user", "content": "hi"}], tools=tools, tool_choice=named)
    assert req.tool_request.choice.function == "get_weather"
    assert chat_tool_choice(None, None) is None


@pytest.mark.parametrize("choice, tools, param, code", [
    ("sometimes", [WEATHER], "tool_choice", "invalid_value"),
    ("required", None, "tool_choice", "invalid_value"),
    (5, [WEATHER], "tool_choice", "invalid_value"),
    ({"type": "web_search_preview"}, [WEATHER], "tool_choice.type", "unsupported_value"),
    ({"type": "allowed_tools", "mode": "auto", "tools": []}, [WEATHER], "tool_choice.type", "unsupported_value"),
    ({"type": "function", "function": {"name": "get_weather"}}, [WEATHER], "tool_choice.name", "invalid_value"),
    ({"type": "function", "name": "other"}, [WEATHER], "tool_choice.name", "invalid_value"),
])
def test_bad_tool_choice_names_the_field(choice, tools, param, code):
    err = refused(chat_tool_choice, choice, chat_tools(tools))
    assert (err.param, err.code) == (param, code)


def test_text_format_becomes_response_format():
    assert chat_response_format(None) is None and chat_response_format({}) is None
    assert chat_response_format({"format": {"type": "text"}}) is None
    assert chat_response_format({"format": {"type": "json_object"}}) == {"type": "json_object"}
    schema = {"type": "object", "properties": {"answer": {"type": "integer"}}, "required": ["answer"]}
    rf = chat_response_format({"format": {"type": "json_schema", "name": "math", "schema": schema, "strict": True,
                                          "description": "an answer"}, "verbosity": "low"})
    assert rf == {"type": "json_schema", "json_schema": {"name": "math", "schema": schema, "strict": True,
                                                         "description": "an answer"}}
    req = chat_request([{"role": "user", "content": "2+2?"}], response_format=rf)
    assert req.structured["type"] == "json_schema" and req.structured["schema"] == schema


@pytest.mark.parametrize("text, param", [
    ("json", "text"),
    ({"format": "json_object"}, "text.format"),
    ({"format": {"type": "xml"}}, "text.format.type"),
    ({"format": {"type": "json_schema", "schema": {}}}, "text.format.name"),
    ({"format": {"type": "json_schema", "name": "a b", "schema": {}}}, "text.format.name"),
    ({"format": {"type": "json_schema", "name": "x"}}, "text.format.schema"),
    ({"format": {"type": "json_schema", "name": "x", "json_schema": {"schema": {}}}}, "text.format.schema"),
    ({"format": {"type": "json_schema", "name": "x", "schema": []}}, "text.format.schema"),
    ({"format": {"type": "json_schema", "name": "x", "schema": {"type": "object", "minProperties": -1}}},
     "text.format.schema"),
    ({"format": {"type": "json_schema", "name": "x", "schema": {}, "strict": 1}}, "text.format.strict"),
    ({"format": {"type": "json_schema", "name": "x", "schema": {}, "description": []}}, "text.format.description"),
])
def test_bad_text_format_names_the_field(text, param):
    assert refused(chat_response_format, text).param == param


def test_chat_errors_are_renamed_to_responses_fields():
    with pytest.raises(APIError) as info:  # an error the chat side raises about the converted tools
        parse_tool_request(chat_tools([WEATHER]), {"type": "function", "function": {"name": "nope"}})
    err = responses_error(info.value)
    assert err.param == "tool_choice.name" and err.message.startswith("tool_choice.name ")
    bad = APIError(400, "tools[1].function.parameters is not valid", param="tools[1].function.parameters")
    assert responses_error(bad).param == "tools[1].parameters"
    assert responses_error(bad).message == "tools[1].parameters is not valid"
    engine = APIError(400, "response_format.json_schema.schema: unsupported keyword 'not'",
                      param="response_format.json_schema.schema", code="invalid_value")
    assert (responses_error(engine).param, responses_error(engine).code) == ("text.format.schema", "invalid_value")
    assert responses_param("max_completion_tokens") == "max_output_tokens"
    assert responses_param("messages[3].content") == "input"
    assert responses_param("temperature") == "temperature" and responses_param(None) is None
    same = APIError(400, "temperature must be <= 2", param="temperature")
    assert responses_error(same) is same


# ---------------------------------------------------------------- results -> output items, usage
def test_output_items_from_a_chat_answer():
    [msg] = output_items("Hello!")
    assert msg == {"type": "message", "id": msg["id"], "status": "completed", "role": "assistant",
                   "content": [{"type": "output_text", "text": "Hello!", "annotations": [],
                                "logprobs": []}]}
    assert msg["id"].startswith("msg_")
    calls = [{"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}},
             {"id": "call_2", "type": "function", "function": {"name": "now", "arguments": "{}"}}]
    out = output_items("", calls)
    assert [o["type"] for o in out] == ["function_call", "function_call"]  # no empty message beside calls
    assert out[0] == {"type": "function_call", "id": out[0]["id"], "call_id": "call_1", "name": "get_weather",
                      "arguments": '{"city":"Oslo"}', "status": "completed"}
    assert out[0]["id"].startswith("fc_") and out[0]["id"] != out[1]["id"]
    assert [o["type"] for o in output_items("Let me check.", calls)] == ["message", "function_call", "function_call"]
    [empty] = output_items(None)
    assert empty["content"][0]["text"] == ""
    [cut] = output_items("A long ans", finish_reason="length")
    assert cut["status"] == "incomplete"
    assert response_status("length") == ("incomplete", {"reason": "max_output_tokens"})
    assert response_status("stop") == ("completed", None) and response_status("tool_calls") == ("completed", None)


def test_usage_in_responses_form():
    u = response_usage({"prompt_tokens": 120, "completion_tokens": 30, "total_tokens": 150,
                        "prompt_tokens_details": {"cached_tokens": 64}})
    assert u == {"input_tokens": 120, "input_tokens_details": {"cached_tokens": 64}, "output_tokens": 30,
                 "output_tokens_details": {"reasoning_tokens": 0}, "total_tokens": 150}
    assert response_usage({"prompt_tokens": 5, "completion_tokens": 2})["total_tokens"] == 7
    assert response_usage(None) is None


def test_an_earlier_file_search_call_is_not_replayed():
    from serving.api.response_items import chat_messages, new_item_id

    history = [{"type": "message", "id": "msg_1", "status": "completed", "role": "user",
                "content": [{"type": "input_text", "text": "Where is the festival?"}]},
               {"type": "file_search_call", "id": new_item_id("file_search_call"), "status": "completed",
                "queries": ["festival"], "results": None},
               {"type": "message", "id": "msg_2", "status": "completed", "role": "assistant",
                "content": [{"type": "output_text", "text": "In Quillmoor [1].", "annotations": []}]}]
    items = [{"type": "message", "id": "msg_3", "status": "completed", "role": "user",
              "content": [{"type": "input_text", "text": "When?"}]}]
    assert [m["role"] for m in chat_messages(history, items)] == ["user", "assistant", "user"]
    assert new_item_id("file_search_call").startswith("fs_")
