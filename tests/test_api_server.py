"""End to end: the official `openai` client against a real `loraplex serve` process on 127.0.0.1.

One server (Ray Serve, local Ray) is started for the whole module: the default model, a second deployment of
it with a one-slot queue (for 429s), and the embedding model. Greedy outputs are checked against HF
transformers, embeddings against serving.embeddings.Embedder in this process.
"""

from __future__ import annotations

import asyncio
import functools
import json
import os
import re
import subprocess
import time

import httpx
import numpy as np
import openai
import pytest

from benchmarks.cli import LORAPLEX
from tests.serve_helpers import Server, fine_tune

pytestmark = [pytest.mark.slow, pytest.mark.timeout(900)]

MODEL = "smollm2-135m-instruct"
TINY = "smollm2-tiny-queue"
EMB = "all-MiniLM-L6-v2"

CONFIG = f"""
server: {{host: 127.0.0.1, port: 8000}}
models:
  - name: {MODEL}
    dtype: float32  # exact against HF transformers (logprobs, batching); bf16 is the CPU default
    max_model_len: 2048
    kv_cache_memory: 256MiB
    max_num_seqs: 32
    ray_actor_options: {{num_cpus: 0}}
  - name: {TINY}
    source: {MODEL}
    max_model_len: 1024
    kv_cache_memory: 64MiB
    max_num_seqs: 1
    max_waiting: 1
    enable_prefix_caching: false
    ray_actor_options: {{num_cpus: 0}}
adapters:
  - {{name: demo, base: {MODEL}, source: {{DEMO}}}}
embeddings: {{ray_actor_options: {{num_cpus: 0}}}}
rag: {{enabled: false}}
fine_tuning: {{enabled: true}}
governance: {{open_access: true}}   # this module tests the API, not keys (see test_gateway_governance)
"""


@pytest.fixture(scope="module")
def adapters(tmp_path_factory, default_model_path):
    """Two real PEFT adapters of the default model: `demo` (from the config, anywhere on disk) and `extra`
    (added through the API, so it must live under $LORAPLEX_HOME/adapters)."""
    import shutil
    import uuid

    from loraplex.paths import subdir
    from tests.conftest import make_lora_adapter

    demo = make_lora_adapter(default_model_path, tmp_path_factory.mktemp("demo"), 8, seed=1, std=0.05,
                             base_name=MODEL)
    extra_dir = subdir("adapters") / f"test-{uuid.uuid4().hex[:8]}"
    extra = make_lora_adapter(default_model_path, extra_dir, 4, seed=2, std=0.05, base_name=MODEL,
                              targets=["q_proj", "v_proj"])
    outside = make_lora_adapter(default_model_path, tmp_path_factory.mktemp("outside"), 4, seed=3, std=0.05,
                                base_name=MODEL)
    yield {"demo": demo, "extra": extra, "outside": outside}
    shutil.rmtree(extra_dir, ignore_errors=True)


@pytest.fixture(scope="module")
def server(tmp_path_factory, adapters):
    """This module's server uses the session's own data dir: the `extra` adapter and the fine-tuning jobs live
    there."""
    from loraplex.paths import home

    srv = Server(tmp_path_factory.mktemp("serve"), CONFIG.replace("{DEMO}", adapters["demo"]), home=home())
    try:
        srv.start()
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base + "/v1", api_key="unused", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def reference():
    """HF transformers on the same converted folder: the independent reference for greedy decoding."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from serving.models import resolve_model

    path = resolve_model(MODEL)
    tok = AutoTokenizer.from_pretrained(path)
    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()

    class Ref:
        tokenizer = tok

        def chat_ids(self, messages):
            text = tok.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
            return tok(text, add_special_tokens=False)["input_ids"]

        @functools.lru_cache(maxsize=None)
        def _greedy(self, ids: tuple, n: int):
            with torch.no_grad():
                out = model.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False,
                                     pad_token_id=tok.eos_token_id)
            new = out[0, len(ids):].tolist()
            return new, tok.decode(new, skip_special_tokens=True)

        def greedy(self, ids, n):
            return self._greedy(tuple(ids), n)

        def first_logprobs(self, ids):
            with torch.no_grad():
                logits = model(torch.tensor([ids])).logits[0, -1]
            return torch.log_softmax(logits.float(), -1)

    return Ref()


def metric(text: str, name: str, **labels) -> float:
    total, found = 0.0, False
    for line in text.splitlines():
        if not line.startswith(name + "{") and not line.startswith(name + " "):
            continue
        if all(f'{k}="{v}"' in line for k, v in labels.items()):
            total += float(line.rsplit(" ", 1)[1])
            found = True
    assert found, f"{name} {labels} not in /metrics"
    return total


HELLO = [{"role": "user", "content": "What is the capital of France?"}]


# ---- readiness, models ------------------------------------------------------------------------------
def test_health_ready_and_not_ready_while_loading(server):
    assert httpx.get(server.base + "/health").json() == {"status": "ok"}
    r = httpx.get(server.base + "/ready")
    assert r.status_code == 200 and set(r.json()["models"]) == {MODEL, TINY, EMB}
    # While the models loaded, our gateway answered 503 in OpenAI's error shape.
    not_ready = [b for s, b in server.ready_answers if s == 503 and b and "error" in b]
    assert not_ready, server.ready_answers[:5]
    assert not_ready[0]["error"]["code"] == "not_ready"


def test_models_list_and_retrieve(client, adapters):
    ids = {m.id: m for m in client.models.list().data}
    assert {MODEL, TINY, EMB, f"{MODEL}:demo"} <= set(ids)
    assert ids[MODEL].object == "model" and ids[MODEL].owned_by == "loraplex"
    assert getattr(ids[MODEL], "parent", "missing") is None
    adapter = ids[f"{MODEL}:demo"]  # configured adapters are listed under their base model
    assert ids[MODEL].root == "HuggingFaceTB/SmolLM2-135M-Instruct"  # the base's repo id, as vLLM lists it
    assert adapter.parent == MODEL and adapter.root == adapters["demo"]  # an adapter's root: its source
    assert client.models.retrieve(f"{MODEL}:demo").parent == MODEL
    assert client.models.retrieve(TINY).id == TINY
    with pytest.raises(openai.NotFoundError) as e:
        client.models.retrieve("no-such-model")
    assert e.value.body["code"] == "model_not_found"


# ---- chat -------------------------------------------------------------------------------------------
def test_chat_greedy_matches_transformers(client, reference):
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=12, temperature=0)
    ids = reference.chat_ids(HELLO)
    new, text = reference.greedy(ids, 12)
    assert r.object == "chat.completion" and r.model == MODEL
    assert r.choices[0].message.role == "assistant"
    assert r.choices[0].message.content == text
    assert r.usage.prompt_tokens == len(ids)
    assert r.usage.completion_tokens == len(new)
    assert r.usage.total_tokens == len(ids) + len(new)
    eos = reference.tokenizer.eos_token_id
    assert r.choices[0].finish_reason == ("stop" if new[-1] == eos else "length")


def test_chat_stream_with_usage(client, reference):
    stream = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=12, temperature=0,
                                            stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    assert chunks[0].choices[0].delta.role == "assistant"
    content = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    _, text = reference.greedy(reference.chat_ids(HELLO), 12)
    assert content == text
    assert all(c.usage is None for c in chunks[:-1])
    last = chunks[-1]
    assert last.choices == [] and last.usage.completion_tokens > 0
    assert last.usage.prompt_tokens == len(reference.chat_ids(HELLO))
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes in (["length"], ["stop"])
    assert len({c.id for c in chunks}) == 1


def test_chat_stream_raw_sse_ends_with_done(server):
    body = {"model": MODEL, "messages": HELLO, "max_tokens": 4, "stream": True}
    with httpx.stream("POST", server.base + "/v1/chat/completions", json=body, timeout=60) as r:
        assert r.status_code == 200 and r.headers["content-type"].startswith("text/event-stream")
        lines = [ln for ln in r.iter_lines() if ln]
    assert all(ln.startswith("data: ") for ln in lines)
    assert lines[-1] == "data: [DONE]"
    assert json.loads(lines[-2][6:])["choices"][0]["finish_reason"] == "length"


def test_chat_n_seed_stop_and_max_completion_tokens(client, reference):
    kw = dict(model=MODEL, messages=[{"role": "user", "content": "Write a short poem about rain."}],
              max_completion_tokens=10, temperature=1.0, top_p=0.95, seed=1234)
    a = client.chat.completions.create(n=2, **kw)
    b = client.chat.completions.create(n=2, **kw)
    assert [c.index for c in a.choices] == [0, 1]
    assert [c.message.content for c in a.choices] == [c.message.content for c in b.choices]  # seeded
    assert a.usage.completion_tokens <= 20
    assert all(c.finish_reason in ("stop", "length") for c in a.choices)
    # stop: cut the greedy answer at a word it contains
    _, text = reference.greedy(reference.chat_ids(HELLO), 12)
    word = text.split()[2]
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=12, temperature=0, stop=[word],
                                       presence_penalty=0.0, frequency_penalty=0.0, user="tester")
    assert r.choices[0].finish_reason == "stop"
    assert r.choices[0].message.content == text[: text.index(word)]


def test_chat_logprobs_match_transformers(client, reference):
    r = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=3, temperature=0,
                                       logprobs=True, top_logprobs=3)
    content = r.choices[0].logprobs.content
    assert len(content) == r.usage.completion_tokens == 3
    assert all(len(t.top_logprobs) == 3 for t in content)
    ref = reference.first_logprobs(reference.chat_ids(HELLO))
    top = ref.topk(3)
    assert content[0].token == reference.tokenizer.decode([int(top.indices[0])])
    assert content[0].logprob == pytest.approx(float(top.values[0]), abs=2e-3)
    assert [t.logprob for t in content[0].top_logprobs] == pytest.approx(top.values.tolist(), abs=2e-3)
    assert content[0].bytes == list(content[0].token.encode())


# ---- completions ------------------------------------------------------------------------------------
def test_completions_list_prompt_echo_logprobs(client, reference):
    prompts = ["The capital of France is", "1, 2, 3, 4,"]
    r = client.completions.create(model=MODEL, prompt=prompts, max_tokens=5, temperature=0, logprobs=2)
    assert [c.index for c in r.choices] == [0, 1]
    for prompt, choice in zip(prompts, r.choices):
        ids = reference.tokenizer(prompt)["input_ids"]
        _, text = reference.greedy(ids, 5)
        assert choice.text == text
        lp = choice.logprobs
        assert "".join(lp.tokens) == choice.text
        assert len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
        assert lp.text_offset == [sum(len(t) for t in lp.tokens[:i]) for i in range(5)]
    prompt_total = sum(len(reference.tokenizer(p)["input_ids"]) for p in prompts)
    assert r.usage.prompt_tokens == prompt_total and r.usage.completion_tokens == 10

    e = client.completions.create(model=MODEL, prompt=prompts[0], max_tokens=3, temperature=0, echo=True)
    assert e.choices[0].text.startswith(prompts[0]) and len(e.choices[0].text) > len(prompts[0])

    ids = reference.tokenizer(prompts[0])["input_ids"]
    t = client.completions.create(model=MODEL, prompt=ids, max_tokens=5, temperature=0)
    assert t.choices[0].text == r.choices[0].text  # token-id prompts are the same prompt


def test_completions_stream(client):
    stream = client.completions.create(model=MODEL, prompt=["Once upon a time", "Hello"], max_tokens=4,
                                       temperature=0, stream=True, stream_options={"include_usage": True})
    chunks = list(stream)
    per = {0: "", 1: ""}
    for c in chunks:
        for ch in c.choices:
            per[ch.index] += ch.text
    assert per[0] and per[1]
    assert chunks[-1].usage.completion_tokens == 8


# ---- embeddings -------------------------------------------------------------------------------------
def test_embeddings_float_and_base64(server, client):
    from serving.embeddings import Embedder

    texts = ["The cat sat on the mat.", "Paris is the capital of France."]
    ref = Embedder()
    expect = ref.embed(texts)
    r = client.embeddings.create(model=EMB, input=texts)  # the client asks for base64 by default
    got = np.array([d.embedding for d in r.data])
    assert got.shape == (2, ref.dim)
    np.testing.assert_allclose(got, expect, atol=1e-5)
    assert r.usage.prompt_tokens == sum(ref.count_tokens(texts))
    f = client.embeddings.create(model=EMB, input=texts[0], encoding_format="float")
    np.testing.assert_allclose(np.array(f.data[0].embedding), expect[0], atol=1e-5)
    raw = httpx.post(server.base + "/v1/embeddings", json={"model": EMB, "input": "x", "encoding_format": "float"})
    assert isinstance(raw.json()["data"][0]["embedding"], list)


# ---- errors -----------------------------------------------------------------------------------------
def _err(exc_info):
    return exc_info.value.status_code, exc_info.value.body


@pytest.mark.parametrize("kwargs,param", [
    (dict(temperature=3.0), "temperature"),
    (dict(n=0), "n"),
    (dict(top_p=0.0), "top_p"),
    (dict(max_tokens=0), "max_tokens"),
    (dict(top_logprobs=30, logprobs=True), "top_logprobs"),
    (dict(top_logprobs=2), "top_logprobs"),
    (dict(stream_options={"include_usage": True}), "stream_options"),
    (dict(presence_penalty=5), "presence_penalty"),
    (dict(messages=[{"role": "wizard", "content": "x"}]), "messages[0].role"),
    (dict(messages=[]), "messages"),
    (dict(logit_bias={"1": 5}), "logit_bias"),
    (dict(seed=2**64), "seed"),
])
def test_chat_invalid_fields_are_400_naming_the_field(client, kwargs, param):
    args = dict(model=MODEL, messages=HELLO, max_tokens=2)
    args.update(kwargs)
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(**args)
    status, body = _err(e)
    assert status == 400 and body["param"] == param and body["type"] == "invalid_request_error"
    assert set(body) == {"message", "type", "param", "code"}


def test_error_shapes_and_statuses(server, client):
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model="no-such-model", messages=HELLO)
    assert e.value.body["param"] == "model"
    with pytest.raises(openai.NotFoundError) as e:
        client.chat.completions.create(model=f"{MODEL}:no-such-adapter", messages=HELLO)
    assert e.value.body["param"] == "model" and e.value.body["code"] == "model_not_found"
    with pytest.raises(openai.NotFoundError):
        client.completions.create(model="no-such-model", prompt="x")
    with pytest.raises(openai.NotFoundError):
        client.embeddings.create(model="no-such-model", input="x")
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=100_000)
    assert e.value.body["code"] == "context_length_exceeded" and e.value.body["param"] == "messages"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="x " * 3000, max_tokens=1)
    assert e.value.body["code"] == "context_length_exceeded" and e.value.body["param"] == "prompt"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt="def f(", suffix="return 1")
    assert e.value.body["param"] == "suffix"
    with pytest.raises(openai.BadRequestError) as e:
        client.completions.create(model=MODEL, prompt=[10**9], max_tokens=1)
    assert e.value.body["param"] == "prompt"
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model=EMB, input="x", encoding_format="int8")
    assert e.value.body["param"] == "encoding_format"
    with pytest.raises(openai.BadRequestError) as e:
        client.embeddings.create(model=EMB, input=["ok", ""])
    assert e.value.body["param"] == "input"
    # malformed bodies and unknown routes: never a 500
    r = httpx.post(server.base + "/v1/chat/completions", content=b"{not json",
                   headers={"content-type": "application/json"})
    assert r.status_code == 400 and "JSON" in r.json()["error"]["message"]
    r = httpx.post(server.base + "/v1/chat/completions", json={"messages": HELLO})
    assert r.status_code == 400 and r.json()["error"]["param"] == "model"
    r = httpx.get(server.base + "/v1/nothing-here")
    assert r.status_code == 404 and "error" in r.json()


def test_queue_full_is_429_with_retry_after(server):
    """TINY runs one request and queues one; a third concurrent request is refused with 429."""
    # 900 tokens: seconds of decoding even on a fast CPU, so the first is still running when the third arrives
    body = {"model": TINY, "messages": HELLO, "max_tokens": 900, "ignore_eos": True, "stream": True}
    streams, results = [], []

    async def run():
        async with httpx.AsyncClient(base_url=server.base, timeout=120) as http:
            async def long_one():
                async with http.stream("POST", "/v1/chat/completions", json=body) as r:
                    results.append(r.status_code)
                    async for _ in r.aiter_lines():
                        pass

            streams.append(asyncio.create_task(long_one()))
            while not results:  # the first is streaming
                await asyncio.sleep(0.05)
            streams.append(asyncio.create_task(long_one()))
            await asyncio.sleep(1.0)  # the second has reached the replica and waits
            r = await http.post("/v1/chat/completions", json={**body, "stream": False, "max_tokens": 2})
            for t in streams:
                t.cancel()
            await asyncio.gather(*streams, return_exceptions=True)
            return r

    r = asyncio.run(run())
    assert r.status_code == 429, r.text
    assert int(r.headers["retry-after"]) >= 1
    assert r.json()["error"]["type"] == "rate_limit_error" and r.json()["error"]["code"] == "queue_full"


# ---- concurrency and disconnects -----------------------------------------------------------------------
def test_32_concurrent_streaming_clients(server, reference):
    aclient = openai.AsyncOpenAI(base_url=server.base + "/v1", api_key="unused", max_retries=0, timeout=300)
    prompts = [f"Count from {i} to {i + 5}." for i in range(32)]

    async def one(p):
        stream = await aclient.chat.completions.create(
            model=MODEL, messages=[{"role": "user", "content": p}], max_tokens=8, temperature=0.8, seed=7,
            stream=True, stream_options={"include_usage": True})
        text, usage, finish = "", None, None
        async for c in stream:
            if c.choices:
                text += c.choices[0].delta.content or ""
                finish = c.choices[0].finish_reason or finish
            if c.usage:
                usage = c.usage
        return p, text, usage, finish

    async def all_():
        try:
            return await asyncio.gather(*(one(p) for p in prompts))
        finally:
            await aclient.close()

    results = asyncio.run(all_())
    assert len(results) == 32
    for p, text, usage, finish in results:
        assert usage is not None and finish in ("stop", "length")
        assert usage.prompt_tokens == len(reference.chat_ids([{"role": "user", "content": p}]))
        assert 1 <= usage.completion_tokens <= 8
        assert usage.total_tokens == usage.prompt_tokens + usage.completion_tokens
        if finish == "length":
            assert usage.completion_tokens == 8


def test_disconnect_aborts_and_frees_kv_blocks(server):
    def scrape():
        return httpx.get(server.base + "/metrics").text

    def wait_for(pred, timeout=30):
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            text = scrape()
            if pred(text):
                return text
            time.sleep(0.3)
        raise AssertionError(f"condition not reached; metrics:\n{text[-3000:]}")

    idle = lambda t: metric(t, "loraplex_num_requests_running", model=MODEL) == 0  # noqa: E731
    before = wait_for(idle)
    total = metric(before, "loraplex_kv_blocks_total", model=MODEL)
    aborted_before = _aborted(before)
    body = {"model": MODEL, "messages": [{"role": "user", "content": "Tell me a very long story. " * 20}],
            "max_tokens": 1500, "ignore_eos": True, "stream": True}
    with httpx.stream("POST", server.base + "/v1/chat/completions", json=body, timeout=60) as r:
        lines = r.iter_lines()
        got = [next(lines) for _ in range(6)]
        assert all(g == "" or g.startswith("data: ") for g in got)
        during = scrape()
        assert metric(during, "loraplex_num_requests_running", model=MODEL) == 1
        assert metric(during, "loraplex_kv_blocks_free", model=MODEL) < total
    # the client is gone: the request must be aborted and its blocks returned
    after = wait_for(lambda t: idle(t) and metric(t, "loraplex_kv_blocks_free", model=MODEL) == total)
    assert metric(after, "loraplex_kv_cache_usage_ratio", model=MODEL) == 0
    wait_for(lambda t: _aborted(t) == aborted_before + 1)


def _aborted(text: str) -> float:
    m = [ln for ln in text.splitlines() if ln.startswith("loraplex_requests_total") and 'status="499"' in ln
         and f'model="{MODEL}"' in ln]
    return sum(float(ln.rsplit(" ", 1)[1]) for ln in m)


def test_metrics_labelled_by_model(server):
    text = httpx.get(server.base + "/metrics").text
    for name in ("loraplex_time_to_first_token_seconds_count", "loraplex_inter_token_latency_seconds_count",
                 "loraplex_e2e_request_latency_seconds_count", "loraplex_prompt_tokens_total",
                 "loraplex_generation_tokens_total"):
        assert metric(text, name, model=MODEL, adapter="") > 0, name
    assert metric(text, "loraplex_requests_total", model=MODEL, status="200") >= 32
    assert metric(text, "loraplex_requests_total", model=MODEL, status="400") >= 1
    assert metric(text, "loraplex_requests_total", model=TINY, status="429") >= 1
    assert re.search(r'^loraplex_num_requests_waiting\{model="smollm2-135m-instruct"\} ', text, re.M)
    assert 0 <= metric(text, "loraplex_kv_cache_usage_ratio", model=MODEL) <= 1


def test_bench_against_the_running_server(server, tmp_path):
    """`loraplex bench` drives the chat endpoint with locust and writes the report folder."""
    out = tmp_path / "bench"
    r = subprocess.run([*LORAPLEX, "bench", "--users", "2", "--duration", "6",
                        "--host", server.base, "--model", MODEL, "--max-tokens", "8", "--out", str(out)],
                       capture_output=True, text=True, timeout=240)
    assert r.returncode == 0, r.stdout[-2000:] + r.stderr[-2000:]
    figures = json.loads(r.stdout.strip().splitlines()[-1])
    report = json.loads((out / "report.json").read_text())
    m = report["models"][MODEL]
    assert m["requests"] >= 2 and m["errors"] == 0 and figures["requests"] == m["requests"]
    assert 0 < m["ttft_ms_p50"] <= m["ttft_ms_p99"] and m["itl_ms_p50"] > 0 and m["throughput_tok_s"] > 0
    rows = [json.loads(x) for x in (out / "requests.jsonl").read_text().splitlines()]
    assert all(row["tokens"] <= 8 for row in rows) and len(rows) == m["requests"]
    for name in ("report.md", "latency.png", "throughput.png"):
        assert (out / name).stat().st_size > 0
    assert MODEL in (out / "report.md").read_text()


# ---- LoRA adapters --------------------------------------------------------------------------------------
def peft_greedy(adapter: str, ids: list[int], n: int) -> list[int]:
    """HF transformers + PEFT with the adapter merged: the independent reference."""
    import torch
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    from serving.models import resolve_model

    base = AutoModelForCausalLM.from_pretrained(resolve_model(MODEL), dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, adapter).merge_and_unload().eval()
    with torch.no_grad():
        out = merged.generate(torch.tensor([ids]), max_new_tokens=n, do_sample=False, pad_token_id=0)
    return out[0, len(ids):].tolist()


def test_adapter_by_base_colon_name_and_by_name_equals_peft(client, server, adapters, reference):
    messages = [{"role": "user", "content": "Name a fruit."}]
    ids = reference.chat_ids(messages)
    want = peft_greedy(adapters["demo"], ids, 12)
    want_text = reference.tokenizer.decode(want, skip_special_tokens=True)
    for model in (f"{MODEL}:demo", "demo"):
        r = client.chat.completions.create(model=model, messages=messages, max_tokens=12, temperature=0)
        assert r.choices[0].message.content == want_text, model
    base = client.chat.completions.create(model=MODEL, messages=messages, max_tokens=12, temperature=0)
    assert base.choices[0].message.content != want_text  # the adapter really changes the answer
    m = httpx.get(server.base + "/metrics").text
    assert metric(m, "loraplex_requests_total", model=MODEL, adapter="demo") >= 2
    assert metric(m, "loraplex_adapter_resident_replicas", model=MODEL, adapter="demo") == 1
    assert metric(m, "loraplex_adapter_load_seconds", model=MODEL, adapter="demo") > 0
    assert metric(m, "loraplex_adapter_engine_tokens", model=MODEL, adapter="demo") > 0


def test_adapter_admin_api_add_list_use_delete(client, server, adapters, reference):
    api = httpx.Client(base_url=server.base, timeout=120)
    r = api.post("/v1/adapters", json={"name": "extra", "source": adapters["extra"]})
    assert r.status_code == 200, r.text
    card = r.json()
    assert card["id"] == f"{MODEL}:extra" and card["rank"] == 4 and card["state"] in ("cpu", "gpu")
    listed = {a["name"]: a for a in api.get("/v1/adapters").json()["data"]}
    assert {"demo", "extra"} <= set(listed) and listed["demo"]["base"] == MODEL
    assert f"{MODEL}:extra" in {m.id for m in client.models.list().data}
    messages = [{"role": "user", "content": "Say hi."}]
    want = reference.tokenizer.decode(peft_greedy(adapters["extra"], reference.chat_ids(messages), 8),
                                      skip_special_tokens=True)
    first = client.chat.completions.create(model="extra", messages=messages, max_tokens=8, temperature=0)
    assert first.choices[0].message.content == want
    assert api.get("/v1/adapters/extra").json()["state"] == "gpu"  # it took a device slot to serve
    # A name in use, a path outside the adapter roots, and a folder that is not an adapter: clear errors.
    dup = api.post("/v1/adapters", json={"name": "extra", "source": adapters["extra"]})
    assert dup.status_code == 409 and dup.json()["error"]["code"] == "adapter_exists"
    out = api.post("/v1/adapters", json={"name": "outside", "source": adapters["outside"]})
    assert out.status_code == 400 and out.json()["error"]["code"] == "adapter_path_not_allowed"
    bad_dir = os.path.dirname(adapters["extra"])
    bad = api.post("/v1/adapters", json={"name": "broken", "source": bad_dir, "base": MODEL})
    assert bad.status_code == 400 and "adapter_config.json" in bad.json()["error"]["message"]
    missing = api.post("/v1/adapters", json={"name": "x"})
    assert missing.status_code == 400 and missing.json()["error"]["param"] == "source"
    # Unload, then the name is unknown; reload gives the same output as before.
    assert api.delete("/v1/adapters/extra").json()["deleted"] is True
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model=f"{MODEL}:extra", messages=messages, max_tokens=4)
    assert api.post("/v1/adapters", json={"name": "extra", "source": adapters["extra"]}).status_code == 200
    again = client.chat.completions.create(model="extra", messages=messages, max_tokens=8, temperature=0)
    assert again.choices[0].message.content == want
    assert api.delete(f"/v1/adapters/{MODEL}:extra").status_code == 200
    # The server kept serving the base model throughout.
    assert client.chat.completions.create(model=MODEL, messages=messages, max_tokens=2).choices


def test_fine_tuning_job_auto_deploys_its_adapter(client, server):
    """A job through OpenAI's fine-tuning API trains on the served base, registers in MLflow and, with
    auto_deploy, loads its adapter into this server, which then serves it by name."""
    rows = [{"messages": [{"role": "user", "content": f"Code word {i}?"},
                          {"role": "assistant", "content": f"The code word is zebra-{i}."}]} for i in range(6)]
    job = fine_tune(client, rows, "deploy", sequence_len=128)
    raw = httpx.get(f"{server.base}/v1/fine_tuning/jobs/{job.id}").json()
    assert raw["deployed"] is True, [e.message for e in client.fine_tuning.jobs.list_events(job.id).data]
    name = job.fine_tuned_model
    card = httpx.get(f"{server.base}/v1/adapters/{name}").json()
    assert card["base"] == MODEL and card["source"].startswith("models:/")
    r = client.chat.completions.create(model=name, messages=rows[0]["messages"][:1], max_tokens=4)
    assert r.model == name and r.usage.completion_tokens > 0
    assert httpx.delete(f"{server.base}/v1/adapters/{name}").status_code == 200
