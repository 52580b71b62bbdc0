"""The gateway's request pipeline in process: a fake model deployment behind the real FastAPI app.

The fake handle answers as a model replica does (an accepted item, then delta items), so chat, completions and
responses run through the same stages, streaming and aggregate paths as in production, in milliseconds.
"""

from __future__ import annotations

import asyncio
import json

import httpx

from serving.api.testing import MODEL, FakeDeployment
from serving.config import parse_config


def make_client(script, tmp_path, monkeypatch, governance: bool = False, **fake_options):
    from serving.api.gateway import GatewayCore
    from serving.api.openai_routes import create_app

    monkeypatch.setenv("LORAPLEX_HOME", str(tmp_path))
    cfg = parse_config({"models": [{"name": MODEL, "source": "acme/fake", "price": {"input_per_1m": 1,
                                                                                     "output_per_1m": 2}}],
                        "embeddings": {"enabled": False}, "rag": {"enabled": False},
                        "governance": {"enabled": governance, "database": str(tmp_path / "gov.db"),
                                       "audit": {"path": str(tmp_path / "audit.jsonl")}}})
    fake = FakeDeployment(script, **fake_options)
    core = GatewayCore(cfg, {MODEL: fake})
    core.deployments.ready.add(MODEL)
    core.deployments.context[MODEL] = 512
    app = create_app(core)
    client = httpx.AsyncClient(transport=httpx.ASGITransport(app=app), base_url="http://test")
    return client, core, fake


def sse_events(text: str) -> list[dict]:
    return [json.loads(line[6:]) for line in text.splitlines() if line.startswith("data: {")]


def run(coro):
    return asyncio.run(coro)


def test_stages_follow_the_config(tmp_path, monkeypatch):
    from serving.api.pipeline import Admission, Grounding, NoGrounding

    _, core, _ = make_client(lambda r: ["x"], tmp_path, monkeypatch)
    kinds = [type(s) for s in core.pipeline.stages]
    assert Admission not in kinds and Grounding not in kinds and NoGrounding in kinds  # off = absent
    _, core, _ = make_client(lambda r: ["x"], tmp_path / "g", monkeypatch, governance=True)
    assert Admission in [type(s) for s in core.pipeline.stages]


def test_chat_completions_and_responses_share_one_pipeline(tmp_path, monkeypatch):
    client, core, fake = make_client(lambda r: ["Hel", "lo", "!"], tmp_path, monkeypatch)

    async def go():
        msgs = [{"role": "user", "content": "hi"}]
        chat = (await client.post("/v1/chat/completions", json={"model": MODEL, "messages": msgs})).json()
        comp = (await client.post("/v1/completions", json={"model": MODEL, "prompt": "hi", "n": 2})).json()
        resp = (await client.post("/v1/responses", json={"model": MODEL, "input": "hi", "store": False})).json()
        stream = (await client.post("/v1/chat/completions", json={"model": MODEL, "messages": msgs, "stream": True,
                                                                    "stream_options": {"include_usage": True}})).text
        rstream = (await client.post("/v1/responses", json={"model": MODEL, "input": "hi", "stream": True,
                                                             "store": False})).text
        return chat, comp, resp, stream, rstream

    chat, comp, resp, stream, rstream = run(go())
    assert chat["choices"][0]["message"]["content"] == "Hello!" and chat["system_fingerprint"] == "fp_fake"
    assert chat["usage"] == {"prompt_tokens": 7, "completion_tokens": 3, "total_tokens": 10}
    assert [c["text"] for c in comp["choices"]] == ["Hello!", "Hello!"] and comp["usage"]["completion_tokens"] == 6
    assert resp["output"][0]["content"][0]["text"] == "Hello!" and resp["usage"]["input_tokens"] == 7
    events = sse_events(stream)
    assert "".join(e["choices"][0]["delta"].get("content", "") for e in events if e["choices"]) == "Hello!"
    assert events[-1]["usage"]["completion_tokens"] == 3 and stream.rstrip().endswith("data: [DONE]")
    types = [e["type"] for e in sse_events(rstream)]
    assert types[:2] == ["response.created", "response.in_progress"] and types[-1] == "response.completed"
    assert [r["kind"] for r in fake.requests] == ["chat", "completion", "chat", "chat", "chat"]
    # Metrics count every endpoint through the same record.
    text = core.metrics.render().decode()
    for endpoint in ("chat", "completions", "responses"):
        assert f'endpoint="{endpoint}"' in text


def test_tool_calls_are_parsed_in_stream_and_whole(tmp_path, monkeypatch):
    call = '<tool_call>\n{"name": "f", "arguments": {"x": 1}}\n</tool_call>'
    client, _, fake = make_client(lambda r: [call[:9], call[9:30], call[30:]], tmp_path, monkeypatch)
    tools = [{"type": "function", "function": {"name": "f", "parameters": {"type": "object", "properties": {
        "x": {"type": "integer"}}}}}]
    body = {"model": MODEL, "messages": [{"role": "user", "content": "go"}], "tools": tools, "tool_choice": "required"}

    async def go():
        whole = (await client.post("/v1/chat/completions", json=body)).json()
        streamed = (await client.post("/v1/chat/completions", json={**body, "stream": True})).text
        return whole, streamed

    whole, streamed = run(go())
    msg = whole["choices"][0]["message"]
    assert whole["choices"][0]["finish_reason"] == "tool_calls" and msg["content"] is None
    assert msg["tool_calls"][0]["function"] == {"name": "f", "arguments": '{"x": 1}'}
    args = "".join(tc["function"].get("arguments", "") for e in sse_events(streamed) if e["choices"]
                   for tc in e["choices"][0]["delta"].get("tool_calls", []))
    assert args == '{"x": 1}'
    assert fake.requests[0]["tools"][0]["function"]["name"] == "f" and fake.requests[0]["tool_choice"] == "required"


def test_errors_come_before_the_stream_and_a_broken_stream_says_why(tmp_path, monkeypatch):
    client, core, _ = make_client(lambda r: ["a", "b", "c"], tmp_path, monkeypatch, fail_after=1)

    async def go():
        bad = await client.post("/v1/chat/completions", json={"model": "nope", "messages": [{"role": "user",
                                                                                             "content": "x"}]})
        unsupported = await client.post("/v1/responses", json={"model": MODEL, "input": "x", "background": True})
        broken = await client.post("/v1/chat/completions", json={"model": MODEL, "stream": True,
                                                                   "messages": [{"role": "user", "content": "x"}]})
        rbroken = await client.post("/v1/responses", json={"model": MODEL, "input": "x", "stream": True,
                                                            "store": False})
        return bad, unsupported, broken, rbroken

    bad, unsupported, broken, rbroken = run(go())
    assert bad.status_code == 404 and bad.json()["error"]["code"] == "model_not_found"
    assert unsupported.status_code == 400 and unsupported.json()["error"]["param"] == "background"
    events = sse_events(broken.text)
    assert events[-1]["error"]["message"] == "generation failed: replica gone"
    failed = sse_events(rbroken.text)[-1]
    assert failed["type"] == "response.failed" and failed["response"]["error"]["message"].endswith("replica gone")
    text = core.metrics.render().decode()
    assert any('model="nope"' in line and 'status="404"' in line for line in text.splitlines())


def test_governance_settles_once_with_the_exact_tokens(tmp_path, monkeypatch):
    client, core, _ = make_client(lambda r: ["one ", "two"], tmp_path, monkeypatch, governance=True)
    settled = []
    real = type(core.governance).admit

    def admit(self, *a, **kw):
        ticket = real(self, *a, **kw)
        orig = ticket.settle
        ticket.settle = lambda *x, **y: settled.append((x, y)) or orig(*x, **y)
        return ticket

    monkeypatch.setattr(type(core.governance), "admit", admit)

    async def go():
        r = await client.post("/v1/responses", json={"model": MODEL, "input": "hi", "store": False})
        s = await client.post("/v1/chat/completions", json={"model": MODEL, "stream": True,
                                                              "messages": [{"role": "user", "content": "x"}]})
        return r, s

    r, s = run(go())
    assert r.status_code == 200 and s.status_code == 200, (r.text, s.text)
    assert [(x[0], x[1]) for x, _ in settled] == [(7, 2), (7, 2)]
