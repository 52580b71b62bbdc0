"""End to end: structured outputs and tool calling on a real `loraplex serve`, with the clients people use.

The official `openai` SDK (response_format, `chat.completions.parse` with a pydantic model, tools, streamed
tool calls), LangChain's `ChatOpenAI` (`bind_tools`, `with_structured_output`) and `instructor` against the
default model. Outputs are checked with `jsonschema`; greedy constrained output is compared with HF
transformers run under xgrammar's own logits processor on the same prompt and schema; bad input must be a 400
naming the field, and the server keeps serving.
"""

from __future__ import annotations

import json
import re
import threading

import httpx
import jsonschema
import openai
import pydantic
import pytest

from tests.conftest import make_lora_adapter
from tests.serve_helpers import MODEL, Server, fine_tune

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

CONFIG = f"""
models:
  - name: {MODEL}
    dtype: float32  # batching changes no token only in float32
    max_model_len: 2048
    kv_cache_memory: 256MiB
    max_num_seqs: 16
    ray_actor_options: {{num_cpus: 0}}
adapters:
  - {{name: demo, base: {MODEL}, source: {{DEMO}}}}
embeddings: {{enabled: false}}
rag: {{enabled: false}}
fine_tuning: {{enabled: true}}
governance: {{open_access: true}}
"""
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 20},
                                          "age": {"type": "integer", "minimum": 0, "maximum": 150}},
          "required": ["name", "age"], "additionalProperties": False}
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                           "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"]}
TOOLS = [{"type": "function", "function": {"name": "get_weather", "description": "Get the weather of a city",
                                           "parameters": WEATHER}},
         {"type": "function", "function": {"name": "get_time", "description": "The local time in a city",
                                           "parameters": {"type": "object", "properties": {"city": {"type": "string"}},
                                                          "required": ["city"]}}}]
ALICE = [{"role": "user", "content": "Return a JSON object with the keys name and age for Alice, who is 30."}]
PARIS = [{"role": "user", "content": "What is the weather in Paris?"}]


@pytest.fixture(scope="module")
def server(tmp_path_factory, default_model_path):
    tmp = tmp_path_factory.mktemp("structured")
    demo = make_lora_adapter(default_model_path, tmp / "demo", 8, seed=1, std=0.05, base_name=MODEL)
    srv = Server(tmp, CONFIG.replace("{DEMO}", demo))
    try:
        yield srv.start()
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base + "/v1", api_key="unused", max_retries=0, timeout=300)


def test_greedy_json_schema_equals_hf_with_xgrammars_own_processor(client, default_model_path):
    from transformers import AutoTokenizer

    from serving.engine.loader import load_generation_eos
    from tests.test_engine_structured import hf_constrained

    tok = AutoTokenizer.from_pretrained(default_model_path)
    from transformers import AutoConfig

    eos = load_generation_eos(default_model_path, AutoConfig.from_pretrained(default_model_path), tok)
    for messages in (ALICE, [{"role": "user", "content": "Invent a person."}]):
        r = client.chat.completions.create(
            model=MODEL, messages=messages, max_tokens=48, temperature=0,
            response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON}})
        ids = tok(tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False),
                  add_special_tokens=False)["input_ids"]
        want = tok.decode(hf_constrained(default_model_path, ids, PERSON, 48, eos), skip_special_tokens=True)
        assert r.choices[0].message.content == want
        if r.choices[0].finish_reason == "stop":
            jsonschema.validate(json.loads(want), PERSON)
        assert isinstance(r.system_fingerprint, str)


def test_sdk_parse_with_a_pydantic_model(client):
    class City(pydantic.BaseModel):
        name: str
        country: str
        is_capital: bool

    r = client.chat.completions.parse(model=MODEL, messages=[{"role": "user", "content": "Describe Paris."}],
                                      response_format=City, max_tokens=200, temperature=0)
    assert r.choices[0].finish_reason == "stop"
    parsed = r.choices[0].message.parsed
    assert isinstance(parsed, City) and parsed.name


def test_json_object_and_the_structured_outputs_extension(client):
    r = client.chat.completions.create(model=MODEL, messages=ALICE, max_tokens=60, temperature=0,
                                       response_format={"type": "json_object"})
    assert isinstance(json.loads(r.choices[0].message.content), dict) and r.choices[0].finish_reason == "stop"
    # Together's/Fireworks' {"type": "json_object", "schema": ...} (older instructor's JSON_SCHEMA mode) enforces it.
    r = client.chat.completions.create(model=MODEL, messages=ALICE, max_tokens=60, temperature=0,
                                       response_format={"type": "json_object", "schema": PERSON})
    jsonschema.validate(json.loads(r.choices[0].message.content), PERSON)
    choices = ["positive", "negative", "neutral"]
    for temperature in (0, 1):
        r = client.chat.completions.create(model=MODEL, max_tokens=10, temperature=temperature, seed=3,
                                           messages=[{"role": "user", "content": "I love it! Sentiment?"}],
                                           extra_body={"structured_outputs": {"choice": choices}})
        assert r.choices[0].message.content in choices
    c = client.completions.create(model=MODEL, prompt="The year the moon landing happened:", max_tokens=12,
                                  temperature=0, extra_body={"structured_outputs": {"regex": r" (19|20)\d\d"}})
    assert re.fullmatch(r" (19|20)\d\d", c.choices[0].text), c.choices[0].text
    g = client.chat.completions.create(model=MODEL, messages=[{"role": "user", "content": "Yes or no?"}], max_tokens=8,
                                       temperature=0, extra_body={"structured_outputs": {"grammar":
                                                                  'root ::= "yes" | "no" | "maybe"'}})
    assert g.choices[0].message.content in ("yes", "no", "maybe")


def _check_calls(calls, tools=TOOLS):
    schemas = {t["function"]["name"]: t["function"]["parameters"] for t in tools}
    for call in calls:
        assert call.id.startswith("call_") and call.type == "function"
        jsonschema.validate(json.loads(call.function.arguments), schemas[call.function.name])


def test_named_and_required_tool_calls_validate(client):
    named = {"type": "function", "function": {"name": "get_weather"}}
    r = client.chat.completions.create(model=MODEL, messages=PARIS, tools=TOOLS, tool_choice=named, max_tokens=60,
                                       temperature=0)
    choice = r.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    assert [c.function.name for c in choice.message.tool_calls] == ["get_weather"]
    _check_calls(choice.message.tool_calls)
    req = client.chat.completions.create(model=MODEL, messages=PARIS, tools=TOOLS, tool_choice="required",
                                         parallel_tool_calls=False, max_tokens=60, temperature=1, seed=5, n=2)
    for ch in req.choices:
        assert ch.finish_reason == "tool_calls" and len(ch.message.tool_calls) == 1
        _check_calls(ch.message.tool_calls)


def test_streamed_tool_calls_reassemble_into_the_same_call(client):
    named = {"type": "function", "function": {"name": "get_weather"}}
    whole = client.chat.completions.create(model=MODEL, messages=PARIS, tools=TOOLS, tool_choice=named,
                                           max_tokens=60, temperature=0).choices[0].message.tool_calls[0]
    calls: dict[int, dict] = {}
    reasons, firsts = [], []
    for chunk in client.chat.completions.create(model=MODEL, messages=PARIS, tools=TOOLS, tool_choice=named,
                                                max_tokens=60, temperature=0, stream=True):
        for ch in chunk.choices:
            reasons.append(ch.finish_reason)
            for d in ch.delta.tool_calls or []:
                if d.index not in calls:
                    firsts.append(d)
                    calls[d.index] = {"id": d.id, "name": d.function.name, "arguments": ""}
                calls[d.index]["arguments"] += d.function.arguments or ""
    assert all(f.id and f.function.name for f in firsts)  # id and name come first
    assert reasons[-1] == "tool_calls" and list(calls) == [0]
    assert calls[0]["name"] == whole.function.name and calls[0]["arguments"] == whole.function.arguments
    jsonschema.validate(json.loads(calls[0]["arguments"]), WEATHER)


def test_tool_results_in_the_history_and_tool_choice_none(client):
    first = client.chat.completions.create(model=MODEL, messages=PARIS, tools=TOOLS, max_tokens=60, temperature=0,
                                           tool_choice={"type": "function", "function": {"name": "get_weather"}})
    call = first.choices[0].message.tool_calls[0]
    history = PARIS + [first.choices[0].message.model_dump(exclude_none=True),
                       {"role": "tool", "tool_call_id": call.id, "content": "18 degrees and sunny"}]
    follow = client.chat.completions.create(model=MODEL, messages=history, tools=TOOLS, max_tokens=30, temperature=0)
    assert follow.usage.prompt_tokens > first.usage.prompt_tokens  # the call and its result reached the model
    assert follow.choices[0].finish_reason in ("stop", "length", "tool_calls")
    _check_calls(follow.choices[0].message.tool_calls or [])
    none = client.chat.completions.create(model=MODEL, messages=PARIS, tools=TOOLS, tool_choice="none",
                                          max_tokens=20, temperature=0)
    assert none.choices[0].message.tool_calls is None and none.choices[0].finish_reason != "tool_calls"
    plain = client.chat.completions.create(model=MODEL, messages=PARIS, max_tokens=20, temperature=0)
    assert none.choices[0].message.content == plain.choices[0].message.content  # none: as if no tools were sent


def test_constrained_unconstrained_base_and_adapter_requests_share_batches(client):
    jobs = []
    for i in range(12):
        model = MODEL if i % 2 else "demo"
        fmt = {"type": "json_schema", "json_schema": {"name": "p", "schema": PERSON}} if i % 3 else None
        messages = [{"role": "user", "content": f"Person number {i}: give name and age."}]
        jobs.append((model, fmt, messages))

    def run(job):
        model, fmt, messages = job
        kw = {"response_format": fmt} if fmt else {}
        return client.chat.completions.create(model=model, messages=messages, max_tokens=40, temperature=0, **kw)

    alone = [run(j) for j in jobs]
    together: list = [None] * len(jobs)
    threads = [threading.Thread(target=lambda k=k: together.__setitem__(k, run(jobs[k]))) for k in range(len(jobs))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for job, a, b in zip(jobs, alone, together):
        assert a.choices[0].message.content == b.choices[0].message.content  # batching changes nothing
        if job[1] is not None and a.choices[0].finish_reason == "stop":
            jsonschema.validate(json.loads(a.choices[0].message.content), PERSON)


BAD = [
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "objekt"}}}},
     "response_format.json_schema.schema", None),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x", "schema": {
        "type": "array", "items": {"type": "string"}, "uniqueItems": True}}}},
     "response_format.json_schema.schema", "uniqueItems"),
    ({"response_format": {"type": "xml"}}, "response_format.type", None),
    ({"response_format": {"type": "json_object", "schema": {"type": "objekt"}}}, "response_format.schema", None),
    ({"tools": [TOOLS[0], {"type": "function", "function": {"name": "f", "parameters": {"type": "object",
                                                                                       "properties": 5}}}]},
     "tools[1].function.parameters", None),
    ({"tools": [{"type": "function", "function": {"parameters": WEATHER}}]}, "tools[0].function.name", None),
    ({"tools": TOOLS, "tool_choice": {"type": "function", "function": {"name": "book_flight"}}},
     "tool_choice.function.name",
     "book_flight"),
    ({"extra_body": {"structured_outputs": {"grammar": 'root ::= ("a" | '}}}, "structured_outputs.grammar", None),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "big", "schema": {
        "type": "string", "enum": [f"value-{i:06d}" for i in range(8000)]}}}},
     "response_format.json_schema.schema", "limit"),
]


@pytest.mark.parametrize("kwargs,param,word", BAD)
def test_bad_constraints_are_400_naming_the_field(client, kwargs, param, word):
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=ALICE, max_tokens=5, **kwargs)
    body = e.value.body
    assert body["param"] == param, body
    if word:
        assert word in body["message"], body
    assert client.chat.completions.create(model=MODEL, messages=ALICE, max_tokens=2).choices  # still serving


def test_unsupported_keyword_names_its_json_path(server):
    schema = {"type": "object", "properties": {"tags": {"type": "array", "items": {"type": "string"},
                                                        "uniqueItems": True}}}
    r = httpx.post(server.base + "/v1/chat/completions", timeout=60, json={
        "model": MODEL, "messages": ALICE, "response_format": {"type": "json_schema",
                                                               "json_schema": {"name": "t", "schema": schema}}})
    assert r.status_code == 400
    assert "$.properties.tags.uniqueItems" in r.json()["error"]["message"]


def test_langchain_bind_tools_and_with_structured_output(server):
    from langchain_openai import ChatOpenAI

    llm = ChatOpenAI(base_url=server.base + "/v1", api_key="unused", model=MODEL, temperature=0, max_tokens=80,
                     max_retries=0)

    class GetWeather(pydantic.BaseModel):
        """Get the weather of a city"""

        city: str
        unit: str

    msg = llm.bind_tools([GetWeather], tool_choice="GetWeather").invoke("What is the weather in Paris?")
    assert [c["name"] for c in msg.tool_calls] == ["GetWeather"] and isinstance(msg.tool_calls[0]["args"]["city"], str)

    class Person(pydantic.BaseModel):
        name: str
        age: int

    person = llm.with_structured_output(Person, method="json_schema").invoke(ALICE[0]["content"])
    assert isinstance(person, Person) and person.age == 30


def test_instructor_extracts_a_typed_record(server):
    import instructor

    class Person(pydantic.BaseModel):
        name: str
        age: int

    for mode in (instructor.Mode.TOOLS, instructor.Mode.JSON_SCHEMA):
        client = instructor.from_openai(openai.OpenAI(base_url=server.base + "/v1", api_key="unused",
                                                      max_retries=0), mode=mode)
        person = client.chat.completions.create(model=MODEL, response_model=Person, max_tokens=60, temperature=0,
                                                messages=[{"role": "user", "content": "Alice is 30 years old."}],
                                                max_retries=0)
        assert isinstance(person, Person) and person.age == 30, mode


def test_a_fine_tune_on_tool_use_serves_tool_calls(client, server):
    """OpenAI's fine-tuning format with tools: the job trains on the same rendering serving uses, registers
    the adapter in MLflow, auto-deploys it, and the adapter answers with tools."""
    lookup = {"type": "function", "function": {"name": "lookup_order", "description": "Find an order",
                                               "parameters": {"type": "object", "required": ["order_id"],
                                                              "properties": {"order_id": {"type": "string"}}}}}
    rows = []
    for i in range(6):
        call = {"id": f"call_{i}", "type": "function",
                "function": {"name": "lookup_order", "arguments": json.dumps({"order_id": f"A-{i}"})}}
        rows.append({"tools": [lookup], "messages": [
            {"role": "user", "content": f"Where is my order A-{i}?"},
            {"role": "assistant", "content": None, "tool_calls": [call]},
            {"role": "tool", "tool_call_id": f"call_{i}", "content": "shipped"},
            {"role": "assistant", "content": f"Order A-{i} has shipped."}]})
    job = fine_tune(client, rows, "tools", sequence_len=512)
    card = httpx.get(f"{server.base}/v1/adapters/{job.fine_tuned_model}").json()
    assert card["source"].startswith("models:/") and card["declared_base"] == "HuggingFaceTB/SmolLM2-135M-Instruct"
    r = client.chat.completions.create(model=job.fine_tuned_model, tools=[lookup], tool_choice="required",
                                       parallel_tool_calls=False, max_tokens=40, temperature=0,
                                       messages=[{"role": "user", "content": "Where is my order A-7?"}])
    assert r.model == job.fine_tuned_model and r.choices[0].finish_reason == "tool_calls"
    _check_calls(r.choices[0].message.tool_calls, [lookup])
