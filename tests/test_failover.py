"""Failover in the gateway, in process: a fake deployment whose replicas are lost before or during a stream.

The fake answers `resume` as a model replica does (tests/test_engine_resume.py proves the engine's side), so
these tests check the gateway's: the client sees one whole stream, usage counts what was delivered, spend is
settled once and the audit entry lists the failover; where no replica takes the request, the error says why.
"""

from __future__ import annotations

import json

from serving.api import failover
from tests.test_pipeline import make_client, run, sse_events

WORDS = ["The ", "quick ", "brown ", "fox ", "jumps."]
MSGS = [{"role": "user", "content": "x"}]


def chat_stream(client, **body):
    return client.post("/v1/chat/completions", json={"model": "fake-model", "messages": MSGS, "stream": True,
                                                      "stream_options": {"include_usage": True}, **body})


def streamed_text(text: str) -> tuple[str, dict, list]:
    events = sse_events(text)
    content = "".join(e["choices"][0]["delta"].get("content") or "" for e in events if e.get("choices"))
    choices = [e["choices"][0] for e in events if e.get("choices")]
    reasons = [c["finish_reason"] for c in choices if c["finish_reason"]]
    return content, events[-1].get("usage"), reasons


def test_a_replica_lost_mid_stream_is_invisible_to_the_client(tmp_path, monkeypatch):
    client, core, fake = make_client(lambda r: WORDS, tmp_path, monkeypatch, governance=True, faults=[2])

    async def go():
        return (await chat_stream(client, temperature=0.7)).text

    content, usage, reasons = streamed_text(run(go()))
    assert content == "".join(WORDS) and reasons == ["stop"]
    assert usage["completion_tokens"] == len(WORDS)  # delivered tokens, none counted twice
    first, second = fake.requests
    assert "resume" not in first and second["resume"] == {0: [0, 1]} and second["avoid"] == ["r1"]
    assert second["sampling"]["seed"] == 1234  # the seed the first replica reported: sampling continues
    assert second["request_id"] == first["request_id"]
    audit = [json.loads(line) for line in (tmp_path / "audit.jsonl").read_text().splitlines()]
    requests = [a for a in audit if a.get("event") == "request"]
    assert len(requests) == 1 and requests[0]["completion_tokens"] == len(WORDS)
    assert requests[0]["failovers"] == [{"when": "mid_stream", "cause": "the model replica stopped",
                                         "replica": "r1", "after_tokens": 2}]
    rows = core.governance.db.query("SELECT COUNT(*), SUM(completion_tokens) FROM usage")[0]
    assert tuple(rows) == (1, len(WORDS))  # charged once
    assert 'loraplex_failovers_total{model="fake-model",when="mid_stream"} 1.0' in core.metrics.render().decode()


def test_lost_or_full_before_the_first_token_goes_to_another_replica(tmp_path, monkeypatch):
    client, _, fake = make_client(lambda r: WORDS, tmp_path, monkeypatch, faults=[-1, "full", 0])

    async def go():
        whole = await client.post("/v1/chat/completions", json={"model": "fake-model", "messages": MSGS})
        return whole

    r = run(go())
    assert r.status_code == 200 and r.json()["choices"][0]["message"]["content"] == "".join(WORDS)
    # lost before accepting, then a full queue (avoid it), then lost right after accepting (resume with nothing)
    assert [q.get("avoid") for q in fake.requests] == [None, None, ["r2"], ["r3"]]
    assert fake.requests[3]["resume"] == {0: []}


def test_choices_that_finished_are_not_resumed(tmp_path, monkeypatch):
    client, _, fake = make_client(lambda r: WORDS, tmp_path, monkeypatch, faults=[4], stagger=True)

    async def go():
        return await client.post("/v1/completions", json={"model": "fake-model", "prompt": "x", "n": 3})

    body = run(go()).json()
    assert [c["text"] for c in body["choices"]] == ["".join(WORDS), "".join(WORDS[:-1]), "".join(WORDS)]
    assert fake.requests[1]["resume"] == {0: [0, 1, 2, 3], 2: [0, 1, 2, 3]}  # choice 1 had finished
    assert body["usage"]["completion_tokens"] == 3 * len(WORDS) - 1


def test_when_no_replica_takes_over_the_error_says_why(tmp_path, monkeypatch):
    monkeypatch.setattr(failover, "RETRY_DELAY_S", 0.01)
    client, _, fake = make_client(lambda r: WORDS, tmp_path, monkeypatch, faults=[2, -1, -1, -1, -1])
    client2, _, _ = make_client(lambda r: WORDS, tmp_path / "b", monkeypatch, faults=[-1] * 4)

    async def go():
        return (await chat_stream(client)).text, await client2.post(
            "/v1/chat/completions", json={"model": "fake-model", "messages": MSGS})

    streamed, refused = run(go())
    content, _, _ = streamed_text(streamed)
    events = sse_events(streamed)
    assert content == "The quick "  # what was delivered stays delivered
    err = events[-1]["error"]
    assert "after 2 tokens" in err["message"] and "no other replica" in err["message"]
    assert "Actor" not in err["message"] and events[-2]["usage"]["completion_tokens"] == 2
    assert len(fake.requests) == 1 + failover.FAILOVER_ATTEMPTS
    assert refused.status_code == 503 and refused.json()["error"]["code"] == "replica_unavailable"
    assert "before it started" in refused.json()["error"]["message"]
