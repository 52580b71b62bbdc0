"""Request validation -> OpenAI errors, on a real FastAPI app with our models and error handlers (no server)."""

from __future__ import annotations

import pytest
from fastapi import FastAPI
from fastapi.testclient import TestClient

from serving.api.errors import APIError, install_error_handlers
from serving.api.protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest, split_model
from serving.api.wire import CompletionLogprobs, usage
from serving.engine import SamplingParams


@pytest.fixture(scope="module")
def http():
    app = FastAPI()
    install_error_handlers(app)

    @app.post("/chat")
    async def chat(body: ChatCompletionRequest):
        body.check()
        return {"sampling": body.to_sampling(), "messages": body.template_messages()}

    @app.post("/completions")
    async def completions(body: CompletionRequest):
        body.check()
        return {"sampling": body.to_sampling(), "prompts": body.prompts()}

    @app.post("/embeddings")
    async def embeddings(body: EmbeddingRequest):
        return {"texts": body.texts()}

    @app.get("/boom")
    async def boom():
        raise RuntimeError("internal detail")

    return TestClient(app, raise_server_exceptions=False)


MSG = [{"role": "user", "content": "hi"}]


def _error(r, status=400):
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}
    return body["error"]


@pytest.mark.parametrize("extra,param", [
    ({"temperature": 2.5}, "temperature"),
    ({"top_p": 0}, "top_p"),
    ({"n": 17}, "n"),
    ({"max_tokens": -1}, "max_tokens"),
    ({"max_completion_tokens": 0}, "max_completion_tokens"),
    ({"frequency_penalty": -3}, "frequency_penalty"),
    ({"top_logprobs": 21, "logprobs": True}, "top_logprobs"),
    ({"top_logprobs": 1}, "top_logprobs"),
    ({"stream_options": {"include_usage": True}}, "stream_options"),
    ({"stop": ["a", ""]}, "stop"),
    ({"tools": [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": 3}}}]},
     "tools[0].function.parameters"),
    # OpenAI's spec: a function's `name` is required, its `parameters` are not (none: no arguments)
    ({"tools": [{"type": "function", "function": {"parameters": {"type": "object"}}}]}, "tools[0].function.name"),
    ({"response_format": {"type": "json_schema"}}, "response_format.json_schema"),
    ({"functions": [{"name": "f"}]}, "functions"),
    ({"messages": [{"role": "user"}]}, "messages[0].content"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]},
     "messages[0].content[0].type"),
    ({"messages": [{"content": "x"}]}, "messages[0].role"),
    ({"model": None}, "model"),
    ({"seed": 2**64}, "seed"),
    ({"top_k": 2**40}, "top_k"),
])
def test_chat_field_errors_name_the_field(http, extra, param):
    body = {"model": "m", "messages": MSG, **extra}
    err = _error(http.post("/chat", json=body))
    assert err["param"] == param and err["type"] == "invalid_request_error"
    assert param.split("[")[0].split(".")[0] in err["message"] or err["code"] != "invalid_value"


def test_chat_maps_to_engine_sampling_params(http):
    body = {"model": "m", "messages": [{"role": "developer", "content": "be brief"},
                                       {"role": "user", "content": [{"type": "text", "text": "a"},
                                                                    {"type": "text", "text": "b"}]},
                                       {"role": "assistant", "content": None}],
            "max_tokens": 5, "max_completion_tokens": 7, "stop": "END", "logprobs": True, "top_logprobs": 2,
            "seed": 3, "temperature": 0, "some_future_field": {"x": 1}}
    r = http.post("/chat", json=body)
    assert r.status_code == 200, r.text
    out = r.json()
    s = out["sampling"]
    assert s["max_tokens"] == 7 and s["stop"] == ["END"] and s["logprobs"] == 2 and s["seed"] == 3
    assert out["messages"] == [{"role": "system", "content": "be brief"}, {"role": "user", "content": "a\nb"},
                               {"role": "assistant", "content": ""}]
    params = SamplingParams(**s).validate()  # the engine accepts what the protocol produces
    assert params.greedy and params.max_tokens == 7
    defaults = http.post("/chat", json={"model": "m", "messages": MSG}).json()["sampling"]
    p = SamplingParams(**defaults).validate()
    assert (p.temperature, p.top_p, p.n, p.max_tokens, p.logprobs) == (1.0, 1.0, 1, None, None)


def test_invalid_json_and_internal_errors(http):
    err = _error(http.post("/chat", content=b"{nope", headers={"content-type": "application/json"}))
    assert "not valid JSON" in err["message"] and err["param"] is None
    err = _error(http.get("/boom"), 500)
    assert err["type"] == "server_error" and "internal detail" not in err["message"]
    err = _error(http.get("/nowhere"), 404)
    assert err["type"] == "not_found_error"


def test_completions_prompts_and_refusals(http):
    def prompts(p):
        r = http.post("/completions", json={"model": "m", "prompt": p})
        assert r.status_code == 200, r.text
        return r.json()["prompts"]

    assert prompts("hi") == ["hi"]
    assert prompts(["a", "b"]) == ["a", "b"]
    assert prompts([1, 2, 3]) == [[1, 2, 3]]
    assert prompts([[1, 2], [3]]) == [[1, 2], [3]]
    assert http.post("/completions", json={"model": "m", "prompt": "x"}).json()["sampling"]["max_tokens"] == 16
    for body, param in [({"suffix": "x"}, "suffix"), ({"best_of": 3}, "best_of"), ({"prompt": ""}, "prompt"),
                        ({"prompt": []}, "prompt"), ({"echo": True, "logprobs": 1}, "logprobs"),
                        ({"logprobs": 21}, "logprobs"), ({"prompt": [[1], []]}, "prompt")]:
        err = _error(http.post("/completions", json={"model": "m", "prompt": "x", **body}))
        assert err["param"] == param, (body, err)


def test_embedding_inputs(http):
    assert http.post("/embeddings", json={"model": "e", "input": "a"}).json()["texts"] == ["a"]
    assert http.post("/embeddings", json={"model": "e", "input": ["a", "b"]}).json()["texts"] == ["a", "b"]
    for inp in ([1, 2], [[1]], [], ["a", ""], 5):
        err = _error(http.post("/embeddings", json={"model": "e", "input": inp}))
        assert err["param"] == "input", (inp, err)
    err = _error(http.post("/embeddings", json={"model": "e", "input": "a", "encoding_format": "int8"}))
    assert err["param"] == "encoding_format"


def test_engine_errors_keep_status_param_and_code():
    from serving.engine.errors import ContextLengthExceededError, EngineOverloadedError, InvalidRequestError

    e = APIError.from_engine(ContextLengthExceededError("too long"))
    assert (e.status, e.code, e.param) == (400, "context_length_exceeded", "messages")
    e = APIError.from_engine(EngineOverloadedError("full", retry_after=2.4))
    r = e.response()
    assert r.status_code == 429 and r.headers["retry-after"] == "2" and e.type == "rate_limit_error"
    e = APIError.from_engine(InvalidRequestError("bad seed", param="seed"))
    assert (e.status, e.param) == (400, "seed")
    assert APIError.from_dict(e.to_dict()).body() == e.body()


def test_split_model_and_chunks():
    assert split_model("base") == ("base", None)
    assert split_model("base:sql") == ("base", "sql")
    assert split_model("base:") == ("base", None)
    conv = CompletionLogprobs()
    out = conv.convert([{"id": 1, "token": "He", "logprob": -0.5, "top": [(2, "A", -0.1)]},
                        {"id": 3, "token": "llo", "logprob": -1.0, "top": []}])
    assert out["text_offset"] == [0, 2] and out["top_logprobs"][0] == {"A": -0.1, "He": -0.5}
    import json
    from types import SimpleNamespace

    from serving.api.chat import ChatStream
    from serving.api.outputs import ChoiceDelta

    def event(s):
        assert s.startswith("data: ") and s.endswith("\n\n")
        return json.loads(s[6:])

    g = SimpleNamespace(model_name="m", fingerprint="fp_test", req=SimpleNamespace(n=2), tool_format=None,
                        citations=None)
    chunks = ChatStream(g, include_usage=True)
    assert event(chunks.start(g)[0])["choices"][1]["delta"] == {"role": "assistant", "content": ""}
    (last,) = chunks.deltas(g, {"finished": True}, [ChoiceDelta(0, "", None, None, "length")])
    last = event(last)
    assert last["choices"][0]["delta"] == {} and last["choices"][0]["finish_reason"] == "length"
    assert last["usage"] is None and last["system_fingerprint"] == "fp_test"
    end = chunks.end(g, usage(3, 4))
    assert event(end[0])["usage"] == {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}
    assert end[-1] == "data: [DONE]\n\n"


def test_logprobs_bytes_are_the_tokens_raw_bytes(default_model_path):
    """An emoji is two byte-level BPE tokens whose texts are U+FFFD; their `bytes` must still join to it
    (OpenAI's ChatCompletionTokenLogprob.bytes: combined, they give the text)."""
    from transformers import AutoTokenizer

    from serving.api.backend import TokenBytes, _logprobs_dict
    from serving.api.wire import chat_logprobs
    from serving.engine.outputs import TokenLogprob

    tok = AutoTokenizer.from_pretrained(default_model_path)
    ids = tok("🙂 café", add_special_tokens=False)["input_ids"]
    lps = [TokenLogprob(i, tok.decode([i]), -0.5, [(i, tok.decode([i]), -0.5)]) for i in ids]
    assert "\ufffd" in lps[0].token  # the premise: the first piece's text is not the emoji
    table = TokenBytes(tok).ready()
    content = chat_logprobs(_logprobs_dict(lps, table))["content"]
    assert bytes(b for t in content for b in t["bytes"]).decode() == "🙂 café"
    assert all(t["top_logprobs"][0]["bytes"] == t["bytes"] for t in content)
    assert table(10**9, "x") == [120]  # an id beyond the vocabulary: the text's bytes
    # without a table (an old replica), the text's bytes, as before
    assert chat_logprobs(_logprobs_dict(lps))["content"][0]["bytes"] == list(lps[0].token.encode())


def test_the_token_that_stops_an_answer_has_no_logprobs_entry():
    """EOS (or a stop_token_id) ends the answer outside its text: its logprob is dropped, so the logprobs are
    the content's tokens; a stop *string* or a length finish keeps every entry."""
    from serving.api.backend import delta_item
    from serving.engine.outputs import CompletionOutput, RequestOutput, TokenLogprob

    def item(reason, stop_reason):
        lps = [TokenLogprob(5, "Hi", -0.1), TokenLogprob(2, "<|im_end|>", -0.2)]
        out = RequestOutput("r", [1], [CompletionOutput(0, "Hi", [5, 2], lps, reason, stop_reason)], finished=True)
        return [lp["token"] for lp in delta_item(out)["choices"][0]["logprobs"]]

    assert item("stop", None) == ["Hi"]  # EOS
    assert item("stop", 2) == ["Hi"]  # a stop token id
    assert item("stop", "END") == ["Hi", "<|im_end|>"]
    assert item("length", None) == ["Hi", "<|im_end|>"]


def test_a_function_without_parameters_is_accepted(http):
    """OpenAI's FunctionObject: "Omitting `parameters` defines a function with an empty parameter list"."""
    r = http.post("/chat", json={"model": "m", "messages": MSG, "tools": [{"type": "function",
                                                                           "function": {"name": "f"}}]})
    assert r.status_code == 200, r.text
