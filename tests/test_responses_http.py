"""End to end: OpenAI's Responses API with the official `openai` SDK against a real `loraplex serve`.

Plain and streamed answers (the same text chat gives: one pipeline), `previous_response_id` over three turns
(charged with the whole history), function tools with a tool-output round trip, `text.format` json_schema,
`file_search` over our collections with citations, stored responses owned by the key's team (another team
gets 404), expiry, and errors named by field.
"""

from __future__ import annotations

import json
import time

import httpx
import jsonschema
import openai
import pytest

from tests.serve_helpers import MODEL, Server

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

TTL_S = 25
CONFIG = f"""
models:
  - name: {MODEL}
    max_model_len: 2048
    kv_cache_memory: 128MiB
    max_num_seqs: 8
    ray_actor_options: {{num_cpus: 0}}
embeddings: {{enabled: false}}
rag: {{enabled: true}}
fine_tuning: {{enabled: false}}
responses: {{ttl_s: {TTL_S}}}
"""
DOCS = [{"id": "festivals/zorblat.md", "text": "The Zorblat festival is held every year in the hill town of "
                                                "Quillmoor on the ninth of March."},
        {"id": "animals/glacier-fox.md", "text": "Glacier foxes of the Vellmark tundra sleep twenty hours a day."}]
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20}}, "required": ["city"]}
TOOLS = [{"type": "function", "name": "get_weather", "description": "Get the weather of a city",
          "parameters": WEATHER}]


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("responses"), CONFIG)
    try:
        srv.start()
        keys = {}
        for name, extra in [("admin", ["--role", "admin"]), ("alice", ["--team", "red"]),
                            ("bob", ["--team", "blue"]), ("carol", ["--team", "red"])]:
            keys[name] = json.loads(srv.cli("keys", "create", "--name", name, "--json", *extra).stdout
                                    .strip().splitlines()[-1])
        srv.keys = keys
        auth = {"Authorization": f"Bearer {keys['admin']['key']}"}
        assert httpx.post(srv.base + "/v1/collections", json={"name": "trivia"}, headers=auth,
                          timeout=60).status_code in (200, 201)
        assert httpx.post(srv.base + "/v1/collections/trivia/documents", json={"documents": DOCS}, headers=auth,
                          timeout=120).status_code in (200, 201)
        yield srv
    finally:
        srv.stop()


def client(server, who="alice") -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base + "/v1", api_key=server.keys[who]["key"], max_retries=0, timeout=120)


def test_plain_and_streamed_answers_equal_chat(server):
    c = client(server)
    chat = c.chat.completions.create(model=MODEL, messages=[{"role": "system", "content": "Be brief."},
                                                            {"role": "user", "content": "Name a color."}],
                                     max_tokens=12, temperature=0)
    r = c.responses.create(model=MODEL, instructions="Be brief.", input="Name a color.", max_output_tokens=12,
                           temperature=0)
    assert r.output_text == chat.choices[0].message.content  # the same pipeline, the same greedy answer
    assert r.usage.input_tokens == chat.usage.prompt_tokens and r.usage.output_tokens == chat.usage.completion_tokens
    assert r.status in ("completed", "incomplete") and r.id.startswith("resp_")
    events = list(c.responses.create(model=MODEL, instructions="Be brief.", input="Name a color.",
                                     max_output_tokens=12, temperature=0, stream=True))
    types = [e.type for e in events]
    assert types[:4] == ["response.created", "response.in_progress", "response.output_item.added",
                         "response.content_part.added"]
    assert types[-1] in ("response.completed", "response.incomplete")
    assert [e.sequence_number for e in events] == list(range(len(events)))
    text = "".join(e.delta for e in events if e.type == "response.output_text.delta")
    assert text == r.output_text == next(e.text for e in events if e.type == "response.output_text.done")
    assert events[-1].response.output_text == text
    truncated = c.responses.create(model=MODEL, input="Tell me a long story.", max_output_tokens=3)
    assert truncated.status == "incomplete" and truncated.incomplete_details.reason == "max_output_tokens"


def test_previous_response_id_over_three_turns_charges_the_whole_history(server):
    c = client(server)
    turns, prev = [], None
    for question in ("My name is Ada.", "What is two plus two?", "What is my name?"):
        r = c.responses.create(model=MODEL, input=question, previous_response_id=prev, max_output_tokens=16,
                               temperature=0)
        turns.append(r)
        prev = r.id
    inputs = [t.usage.input_tokens for t in turns]
    assert inputs[0] < inputs[1] < inputs[2]  # each turn sends every earlier turn again
    # the third turn's input is the first two turns' inputs and outputs plus its own question
    assert inputs[2] > turns[0].usage.input_tokens + turns[0].usage.output_tokens + turns[1].usage.output_tokens
    items = c.responses.input_items.list(turns[2].id)
    assert [i.type for i in items.data] == ["message"] and items.data[0].content[0].text == "What is my name?"
    usage = httpx.get(server.base + "/v1/usage", params={"group_by": "key_id"},
                      headers={"Authorization": f"Bearer {server.keys['admin']['key']}"}).json()
    row = next(r for r in usage["data"] if r["key_id"] == server.keys["alice"]["id"])
    assert row["prompt_tokens"] >= sum(inputs)  # governance counted every continued turn's full prompt


def test_function_tools_round_trip(server):
    c = client(server)
    r = c.responses.create(model=MODEL, input="What is the weather in Paris?", tools=TOOLS, tool_choice="required",
                           parallel_tool_calls=False, max_output_tokens=40, temperature=0)
    calls = [o for o in r.output if o.type == "function_call"]
    assert len(calls) == 1 and calls[0].name == "get_weather" and calls[0].call_id.startswith("call_")
    jsonschema.validate(json.loads(calls[0].arguments), WEATHER)
    follow = c.responses.create(model=MODEL, previous_response_id=r.id, tools=TOOLS, max_output_tokens=20,
                                temperature=0, input=[{"type": "function_call_output", "call_id": calls[0].call_id,
                                                       "output": "18 degrees and sunny"}])
    assert follow.status in ("completed", "incomplete") and follow.output
    assert follow.usage.input_tokens > r.usage.input_tokens  # the call and its output reached the model
    events = list(c.responses.create(model=MODEL, input="What is the weather in Rome?", tools=TOOLS,
                                     tool_choice={"type": "function", "name": "get_weather"},
                                     max_output_tokens=40, temperature=0, stream=True))
    args = "".join(e.delta for e in events if e.type == "response.function_call_arguments.delta")
    done = next(e for e in events if e.type == "response.function_call_arguments.done")
    assert args == done.arguments and json.loads(args)["city"]
    assert events[-1].type == "response.completed"


def test_text_format_json_schema(server):
    schema = {"type": "object", "properties": {"name": {"type": "string"}, "age": {"type": "integer"}},
              "required": ["name", "age"], "additionalProperties": False}
    r = client(server).responses.create(model=MODEL, input="Alice is 30 years old. Extract her.",
                                        max_output_tokens=40, temperature=0,
                                        text={"format": {"type": "json_schema", "name": "person", "schema": schema}})
    data = json.loads(r.output_text)
    jsonschema.validate(data, schema)
    assert data["age"] == 30


def test_file_search_over_a_collection_cites_its_file(server):
    r = client(server).responses.create(
        model=MODEL, input="In which town is the Zorblat festival held?", max_output_tokens=24, temperature=0,
        tools=[{"type": "file_search", "vector_store_ids": ["trivia"], "max_num_results": 1}],
        include=["file_search_call.results"])
    assert r.output[0].type == "file_search_call" and r.output[0].status == "completed"
    assert r.output[0].results[0].file_id == "festivals/zorblat.md"
    message = next(o for o in r.output if o.type == "message")
    notes = message.content[0].annotations
    assert [(a.type, a.file_id, a.index) for a in notes] == [("file_citation", "festivals/zorblat.md", 0)]
    assert "Quillmoor" in r.output_text
    with pytest.raises(openai.NotFoundError):  # an unknown collection, as for grounded chat
        client(server).responses.create(model=MODEL, input="x", max_output_tokens=2,
                                        tools=[{"type": "file_search", "vector_store_ids": ["nope"]}])


def test_stored_responses_belong_to_the_team_and_expire(server):
    alice, bob, carol = client(server, "alice"), client(server, "bob"), client(server, "carol")
    r = alice.responses.create(model=MODEL, input="Secret plan: blue pancakes.", max_output_tokens=4)
    assert carol.responses.retrieve(r.id).id == r.id  # same team
    for call in (lambda: bob.responses.retrieve(r.id), lambda: bob.responses.input_items.list(r.id),
                 lambda: bob.responses.delete(r.id),
                 lambda: bob.responses.create(model=MODEL, input="go on", previous_response_id=r.id,
                                              max_output_tokens=2)):
        with pytest.raises((openai.NotFoundError, openai.BadRequestError)) as e:
            call()
        assert "pancakes" not in json.dumps(e.value.body)
    unstored = alice.responses.create(model=MODEL, input="Forget me.", max_output_tokens=2, store=False)
    with pytest.raises(openai.NotFoundError):
        alice.responses.retrieve(unstored.id)
    alice.responses.delete(r.id)
    with pytest.raises(openai.NotFoundError):
        alice.responses.retrieve(r.id)
    old = alice.responses.create(model=MODEL, input="Soon gone.", max_output_tokens=2)
    time.sleep(TTL_S + 1)
    with pytest.raises(openai.NotFoundError):
        alice.responses.retrieve(old.id)


def test_errors_name_the_field(server):
    c = client(server)
    cases = [({"background": True}, "background"),
             ({"input": [{"type": "message", "role": "user", "content": [{"type": "input_image"}]}]},
              "input[0].content[0].type"),
             ({"tools": [{"type": "file_search", "vector_store_ids": ["trivia"]},
                         {"type": "function", "name": "f", "parameters": {"type": "object", "properties": 3}}]},
              "tools[1].parameters"),
             ({"text": {"format": {"type": "json_schema", "name": "x", "schema": {"type": "objekt"}}}},
              "text.format.schema"),
             ({"previous_response_id": "resp_missing"}, "previous_response_id")]
    for extra, param in cases:
        body = {"model": MODEL, "input": "hi", "max_output_tokens": 2, **extra}
        r = httpx.post(server.base + "/v1/responses", json=body, timeout=60,
                       headers={"Authorization": f"Bearer {server.keys['alice']['key']}"})
        assert r.status_code in (400, 404) and set(r.json()) == {"error"}, r.text
        assert r.json()["error"]["param"] == param, (extra, r.json())
    assert c.responses.create(model=MODEL, input="still here?", max_output_tokens=2).output
