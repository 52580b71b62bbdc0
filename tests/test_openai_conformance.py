"""Every 2xx body, every stream event and the 4xx error bodies of a real `loraplex serve` validated against
OpenAI's own published OpenAPI description (tests/openai_spec.py), endpoint by endpoint.

Raw httpx, not the `openai` SDK: the SDK builds its objects without validation (a null where the spec wants a
string, a missing required field pass unseen), so only the wire bytes tell. The component of each response is
the one the spec's paths name (response_component), and each test also checks the request was honoured (n
choices, logprobs, the named tool), so a body that conforms by saying nothing does not pass.

Where the spec is narrower than OpenAI's own API the test says so with `also_allow`, each with its evidence:
- completions streams: the spec gives their events no schema of their own, only CreateCompletionResponse, whose
  `finish_reason` is a non-null enum; OpenAI streams `finish_reason: null` until the end (the spec's own
  createCompletion "Streaming" example shows it), and ChatCompletionStreamOptions.include_usage (which
  CreateCompletionRequest.stream_options references) says "All other chunks will also include a `usage` field,
  but with a null value", which CreateCompletionResponse.usage (not nullable) does not allow;
- embeddings with encoding_format=base64: Embedding.embedding is `array of number` only, while
  CreateEmbeddingRequest.encoding_format documents base64 (the official SDK asks for base64 by default).
"""

from __future__ import annotations

import base64
import json

import httpx
import numpy as np
import pytest

from tests import openai_spec as spec
from tests.serve_helpers import MODEL, Server

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

EMB = "all-MiniLM-L6-v2"
CONFIG = f"""
models:
  - name: {MODEL}
    max_model_len: 1024
    kv_cache_memory: 128MiB
    max_num_seqs: 8
    ray_actor_options: {{num_cpus: 0}}
adapters:
  - {{name: demo, base: {MODEL}, source: {{DEMO}}}}
embeddings: {{ray_actor_options: {{num_cpus: 0}}}}
rag: {{enabled: false}}
fine_tuning: {{enabled: false}}
governance: {{open_access: true}}
"""
HI = [{"role": "user", "content": "Say hello."}]
# free strings are bounded (maxLength) so a tool call always fits in max_tokens, whatever the model writes
WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Get the weather of a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string", "maxLength": 20},
                                                    "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
                   "required": ["city", "unit"]}}}
PERSON = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 12},
                                          "age": {"type": "integer", "minimum": 0, "maximum": 150}},
          "required": ["name", "age"], "additionalProperties": False}

# the spec's gaps, explained in the module docstring
COMPLETION_STREAM = {"choices.*.finish_reason": {"type": "null"}, "usage": {"type": "null"}}
BASE64_EMBEDDING = {"data.*.embedding": {"type": "string", "contentEncoding": "base64"}}


@pytest.fixture(scope="module")
def server(tmp_path_factory, default_model_path):
    from tests.conftest import make_lora_adapter

    tmp = tmp_path_factory.mktemp("conformance")
    demo = make_lora_adapter(default_model_path, tmp / "demo", 4, seed=1, std=0.05, base_name=MODEL)
    srv = Server(tmp, CONFIG.replace("{DEMO}", str(demo)))
    try:
        yield srv.start()
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def http(server):
    with httpx.Client(base_url=server.base, timeout=300) as c:
        yield c


def body_of(r: httpx.Response, method: str, path: str, **kw) -> dict:
    """A 200 JSON answer, validated against the component the spec gives `method path`."""
    assert r.status_code == 200, r.text
    assert r.headers["content-type"].startswith("application/json"), r.headers["content-type"]
    body = r.json()
    spec.validate(spec.response_component(method, path), body, **kw)
    return body


def post(http, path: str, payload: dict, **kw) -> dict:
    return body_of(http.post("/v1" + path, json=payload), "post", path, **kw)


def stream(http, path: str, payload: dict, component: str, **kw) -> list[dict]:
    """A streamed answer's events, each validated, read in the chunks the server sent."""
    with http.stream("POST", "/v1" + path, json={**payload, "stream": True}) as r:
        assert r.status_code == 200, r.read().decode()
        assert r.headers["content-type"].startswith("text/event-stream"), r.headers["content-type"]
        chunks = list(r.iter_bytes())
    return spec.stream_events(component, chunks, done=True, **kw)


def chat_stream(http, payload: dict) -> list[dict]:
    return stream(http, "/chat/completions", payload, spec.response_component("post", "/chat/completions",
                                                                               "text/event-stream"))


def chat(http, **kw) -> dict:
    return post(http, "/chat/completions", {"model": MODEL, "messages": HI, "max_tokens": 8, **kw})


# ---- chat completions -----------------------------------------------------------------------------

def test_chat_plain(http):
    body = chat(http)
    assert body["object"] == "chat.completion" and len(body["choices"]) == 1 and body["choices"][0]["message"]


def test_chat_logprobs_and_top_logprobs(http):
    body = chat(http, logprobs=True, top_logprobs=2, temperature=0)
    content = body["choices"][0]["logprobs"]["content"]
    assert content and all(len(t["top_logprobs"]) == 2 for t in content)


def test_chat_logprobs_bytes_combine_to_the_text(http):
    """ChatCompletionTokenLogprob.bytes: "Useful in instances where characters are represented by multiple tokens
    and their byte representations must be combined to generate the correct text representation". The output
    is forced (vLLM's structured_outputs choice) to an emoji, two tokens whose texts alone are U+FFFD."""
    forced = {"model": MODEL, "messages": HI, "max_tokens": 12, "logprobs": True, "top_logprobs": 1,
              "structured_outputs": {"choice": ["🙂 café"]}}
    body = post(http, "/chat/completions", forced)
    text = body["choices"][0]["message"]["content"]
    content = body["choices"][0]["logprobs"]["content"]
    assert text == "🙂 café" and "\ufffd" in content[0]["token"]
    assert bytes(b for t in content for b in t["bytes"]).decode() == text
    events = chat_stream(http, forced)
    streamed = [t for e in events for c in e["choices"] if c.get("logprobs") for t in c["logprobs"]["content"]]
    assert bytes(b for t in streamed for b in t["bytes"]).decode() == text


def test_chat_n2(http):
    body = chat(http, n=2, temperature=1, seed=3)
    assert [c["index"] for c in body["choices"]] == [0, 1]


def test_chat_named_tool_choice(http):
    body = chat(http, messages=[{"role": "user", "content": "What is the weather in Paris?"}], max_tokens=48,
                temperature=0, tools=[WEATHER], tool_choice={"type": "function", "function": {"name": "get_weather"}})
    calls = body["choices"][0]["message"]["tool_calls"]
    assert [c["function"]["name"] for c in calls] == ["get_weather"]
    json.loads(calls[0]["function"]["arguments"])


def test_chat_json_schema_response_format(http):
    body = chat(http, messages=[{"role": "user", "content": "Alice is 30. Give her name and age as JSON."}],
                max_tokens=40, temperature=0,
                response_format={"type": "json_schema", "json_schema": {"name": "person", "schema": PERSON,
                                                                        "strict": True}})
    assert set(json.loads(body["choices"][0]["message"]["content"])) == {"name", "age"}


def test_chat_stream(http):
    events = chat_stream(http, {"model": MODEL, "messages": HI, "max_tokens": 8})
    assert all("usage" not in e for e in events)
    assert events[-1]["choices"][0]["finish_reason"] in ("stop", "length")


def test_chat_stream_include_usage(http):
    events = chat_stream(http, {"model": MODEL, "messages": HI, "max_tokens": 8,
                                "stream_options": {"include_usage": True}})
    *rest, last = events
    assert last["choices"] == [] and last["usage"]["completion_tokens"] > 0
    assert all(e["usage"] is None for e in rest)  # ChatCompletionStreamOptions.include_usage: null elsewhere


def test_chat_stream_logprobs_n2(http):
    events = chat_stream(http, {"model": MODEL, "messages": HI, "max_tokens": 6, "n": 2, "logprobs": True,
                                "top_logprobs": 1, "seed": 1})
    indices = {c["index"] for e in events for c in e["choices"]}
    assert indices == {0, 1}
    assert any(c["logprobs"] and c["logprobs"]["content"] for e in events for c in e["choices"])


def test_chat_stream_tool_calls(http):
    events = chat_stream(http, {"model": MODEL, "max_tokens": 48, "temperature": 0, "tools": [WEATHER],
                                "messages": [{"role": "user", "content": "What is the weather in Paris?"}],
                                "tool_choice": {"type": "function", "function": {"name": "get_weather"}}})
    pieces = [t for e in events for c in e["choices"] for t in c["delta"].get("tool_calls") or []]
    assert pieces and pieces[0]["function"]["name"] == "get_weather" and pieces[0]["id"]
    json.loads("".join(p["function"].get("arguments", "") for p in pieces))


def test_chat_stream_json_schema(http):
    events = chat_stream(http, {"model": MODEL, "max_tokens": 40, "temperature": 0,
                                "messages": [{"role": "user", "content": "Alice is 30. Give her name and age."}],
                                "response_format": {"type": "json_schema",
                                                    "json_schema": {"name": "person", "schema": PERSON}}})
    text = "".join(c["delta"].get("content") or "" for e in events for c in e["choices"])
    json.loads(text)


# ---- completions ------------------------------------------------------------------------------------

def completion(http, **kw) -> dict:
    return post(http, "/completions", {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 6, **kw})


def completion_stream(http, **kw) -> list[dict]:
    return stream(http, "/completions", {"model": MODEL, "prompt": "The capital of France is", "max_tokens": 6,
                                         **kw}, spec.response_component("post", "/completions"),
                  also_allow=COMPLETION_STREAM)


def test_completion_plain(http):
    body = completion(http)
    assert body["object"] == "text_completion" and body["choices"][0]["text"]


def test_completion_logprobs(http):
    body = completion(http, logprobs=2, temperature=0)
    lp = body["choices"][0]["logprobs"]
    assert len(lp["tokens"]) == len(lp["token_logprobs"]) == len(lp["top_logprobs"]) == len(lp["text_offset"]) > 0


def test_completion_echo(http):
    body = completion(http, echo=True, max_tokens=3)
    assert body["choices"][0]["text"].startswith("The capital of France is")


def test_completion_stream(http):
    events = completion_stream(http)
    assert events[-1]["choices"][0]["finish_reason"] in ("stop", "length")
    assert all("usage" not in e for e in events)


def test_completion_stream_include_usage_and_logprobs(http):
    events = completion_stream(http, logprobs=1, stream_options={"include_usage": True})
    *rest, last = events
    assert last["choices"] == [] and last["usage"]["total_tokens"] > 0
    assert all(e["usage"] is None for e in rest)
    assert any(c["logprobs"] and c["logprobs"]["tokens"] for e in rest for c in e["choices"])


def test_the_completion_stream_allowances_are_needed_and_narrow(http):
    """Without also_allow the stream fails exactly where the docstring says the spec is too narrow."""
    with http.stream("POST", "/v1/completions", json={"model": MODEL, "prompt": "Hi", "max_tokens": 3,
                                                      "stream": True, "stream_options": {"include_usage": True}}) as r:
        text = r.read().decode()
    with pytest.raises(spec.SpecViolation) as e:
        spec.stream_events("CreateCompletionResponse", text, done=True)
    assert {p.split(" ", 1)[1] for p, _ in e.value.problems} <= {"$.usage", "$.choices[0].finish_reason"}


# ---- embeddings --------------------------------------------------------------------------------------

def test_embeddings_float_and_base64(http):
    texts = ["hello", "world"]
    floats = post(http, "/embeddings", {"model": EMB, "input": texts})
    packed = post(http, "/embeddings", {"model": EMB, "input": texts, "encoding_format": "base64"},
                  also_allow=BASE64_EMBEDDING)
    with pytest.raises(spec.SpecViolation):  # the allowance is what lets base64 through, nothing else does
        spec.validate("CreateEmbeddingResponse", packed)
    for f, b in zip(floats["data"], packed["data"]):
        vec = np.frombuffer(base64.b64decode(b["embedding"]), dtype="<f4")
        np.testing.assert_allclose(vec, f["embedding"], rtol=1e-6)


# ---- models ------------------------------------------------------------------------------------------

def test_models_list_and_each_model(http):
    listed = body_of(http.get("/v1/models"), "get", "/models")
    ids = [m["id"] for m in listed["data"]]
    assert {MODEL, f"{MODEL}:demo", EMB} <= set(ids)  # a base, its adapter, the embedding model
    for mid in ids:
        one = body_of(http.get(f"/v1/models/{mid}"), "get", "/models/{model}")
        assert one["id"] == mid
    by_repo_id = body_of(http.get("/v1/models/HuggingFaceTB/SmolLM2-135M-Instruct"), "get", "/models/{model}")
    assert by_repo_id["id"] == MODEL


def test_every_model_has_a_creation_time(http):
    listed = http.get("/v1/models").json()["data"]
    assert {m["id"]: m["created"] for m in listed if m["created"] < 1_600_000_000} == {}


def test_an_adapters_answers_conform_too(http):
    chat(http, model=f"{MODEL}:demo")
    completion(http, model=f"{MODEL}:demo")


# ---- responses ---------------------------------------------------------------------------------------

def responses_stream(http, payload: dict) -> list[dict]:
    with http.stream("POST", "/v1/responses", json={**payload, "stream": True}) as r:
        assert r.status_code == 200, r.read().decode()
        chunks = list(r.iter_bytes())
    return spec.stream_events(spec.RESPONSES_API["stream"], chunks, done=False)


def test_responses_bodies_and_events(http):
    plain = post(http, "/responses", {"model": MODEL, "input": "Say hello.", "max_output_tokens": 8})
    spec.validate(spec.RESPONSES_API["body"], http.get(f"/v1/responses/{plain['id']}").json())
    items = http.get(f"/v1/responses/{plain['id']}/input_items").json()
    spec.validate(spec.response_component("get", "/responses/{response_id}/input_items"), items)
    tool = {"type": "function", **WEATHER["function"]}
    post(http, "/responses", {"model": MODEL, "input": "Weather in Paris?", "tools": [tool],
                              "tool_choice": "required", "max_output_tokens": 40})
    post(http, "/responses", {"model": MODEL, "input": "Alice is 30.", "max_output_tokens": 40,
                              "text": {"format": {"type": "json_schema", "name": "p", "schema": PERSON}}})
    events = responses_stream(http, {"model": MODEL, "input": "Say hello.", "max_output_tokens": 8})
    assert events[0]["type"] == "response.created" and events[-1]["type"] in ("response.completed",
                                                                              "response.incomplete")
    calls = responses_stream(http, {"model": MODEL, "input": "Weather in Paris?", "tools": [tool],
                                    "tool_choice": {"type": "function", "name": "get_weather"},
                                    "max_output_tokens": 40})
    assert "response.function_call_arguments.done" in {e["type"] for e in calls}
    assert http.delete(f"/v1/responses/{plain['id']}").status_code == 200  # the spec gives no body schema


# ---- errors ------------------------------------------------------------------------------------------

ERRORS = [
    ("POST", "/v1/chat/completions", {"model": "no-such-model", "messages": HI}, 404, "model"),
    ("POST", "/v1/chat/completions", {"model": MODEL}, 400, "messages"),
    ("POST", "/v1/chat/completions", {"model": MODEL, "messages": HI, "top_logprobs": 2}, 400, "top_logprobs"),
    ("POST", "/v1/chat/completions", {"model": MODEL, "messages": HI, "n": 99}, 400, "n"),
    ("POST", "/v1/chat/completions", b"{not json", 400, None),
    ("POST", "/v1/completions", {"model": MODEL, "prompt": "x", "suffix": "y"}, 400, "suffix"),
    ("POST", "/v1/embeddings", {"model": "no-such-model", "input": "x"}, 404, "model"),
    ("GET", "/v1/models/no-such-model", None, 404, None),
    ("GET", "/v1/no-such-endpoint", None, 404, None),
    ("GET", "/v1/chat/completions", None, 405, None),
]


@pytest.mark.parametrize("method,path,payload,status,param", ERRORS,
                         ids=[f"{m} {p} {s}" for m, p, _, s, _ in ERRORS])
def test_error_bodies(http, method, path, payload, status, param):
    if isinstance(payload, bytes):
        r = http.request(method, path, content=payload, headers={"content-type": "application/json"})
    else:
        r = http.request(method, path, json=payload)
    assert r.status_code == status, r.text
    assert r.headers["content-type"].startswith("application/json")
    body = r.json()
    spec.validate(spec.ERROR, body)
    assert body["error"]["message"]
    if param is not None:
        assert body["error"]["param"] == param, body
