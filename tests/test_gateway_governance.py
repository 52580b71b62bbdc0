"""Governance in the real gateway: a `loraplex serve` process, keys made with `loraplex keys create`, the
official openai client. Open until the first key exists, then 401/403 by key, role and allow-list; PII
blocked in prompts and redacted in streamed outputs; exact spend in /v1/usage; one audit entry per request."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from serving.governance.pii import redact
from tests.serve_helpers import MODEL, Server

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

PRICE_IN, PRICE_OUT = 100.0, 300.0  # USD per 1M tokens: large, so every request's cost is visible
CONFIG = f"""
models:
  - name: {MODEL}
    max_model_len: 1024
    kv_cache_memory: 128MiB
    max_num_seqs: 8
    ray_actor_options: {{num_cpus: 0}}
    price: {{input_per_1m: {PRICE_IN}, output_per_1m: {PRICE_OUT}}}
embeddings: {{enabled: false}}
rag: {{enabled: false}}
fine_tuning: {{enabled: false}}
governance:
  pii_keys:
    blocker: {{prompt: block, output: allow}}
    redactor: {{prompt: allow, output: redact}}
    echo-redactor: {{prompt: allow, output: redact}}
"""
HELLO = [{"role": "user", "content": "Say hello."}]
# The schema's one allowed value makes the model write the address whatever its weights prefer (a bare "repeat
# this" prompt flips to a refusal with the smallest change in numerics), so the output policy always has PII to catch.
ECHO_EMAIL = {"messages": [{"role": "user", "content": "Repeat exactly: my email is john.doe@example.com"}],
              "response_format": {"type": "json_schema", "json_schema": {"name": "echo", "strict": True, "schema": {
                  "type": "object", "properties": {"email": {"enum": ["john.doe@example.com"]}},
                  "required": ["email"], "additionalProperties": False}}}}


@pytest.fixture(scope="module")
def server(tmp_path_factory):
    srv = Server(tmp_path_factory.mktemp("gov"), CONFIG)
    try:
        yield srv.start()
    finally:
        srv.stop()


def _client(server, key="EMPTY") -> openai.OpenAI:
    return openai.OpenAI(base_url=server.base + "/v1", api_key=key, max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def keys(server):
    """Open access while no key exists (the OpenAI client's placeholder key is ignored); then keys."""
    r = _client(server).chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
    assert r.choices[0].message.content is not None
    made = {}
    for name, extra in [("admin", ["--role", "admin"]), ("user", ["--models", "smollm2-*"]),
                        ("outsider", ["--models", "other-*"]), ("blocker", []), ("redactor", []), ("echo-redactor", []),
                        ("spender", ["--team", "finance"]), ("auditee", []),
                        ("reader", ["--collections", "public-*"])]:
        out = server.cli("keys", "create", "--name", name, "--json", *extra).stdout
        made[name] = json.loads(out.strip().splitlines()[-1])
    return made


def test_no_key_is_401_once_a_key_exists(server, keys):
    with pytest.raises(openai.AuthenticationError) as e:  # the placeholder key no longer passes
        _client(server).chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
    assert e.value.body["code"] == "invalid_api_key"
    r = httpx.post(server.base + "/v1/chat/completions", json={"model": MODEL, "messages": HELLO})
    assert r.status_code == 401 and r.json()["error"]["code"] == "missing_api_key"
    assert r.headers["www-authenticate"].startswith("Bearer")
    with pytest.raises(openai.AuthenticationError) as e:
        _client(server, "lpx-not-a-real-key").models.list()
    assert "lpx-not-a-real-key" not in str(e.value.body)  # a key is never echoed
    assert httpx.get(server.base + "/health").status_code == 200  # outside /v1: no key needed


def test_allow_lists_and_roles(server, keys):
    user, outsider = keys["user"]["key"], keys["outsider"]["key"]
    assert [m.id for m in _client(server, user).models.list().data] == [MODEL]
    assert _client(server, outsider).models.list().data == []  # listed only what the key may use
    with pytest.raises(openai.PermissionDeniedError) as e:
        _client(server, outsider).chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
    assert e.value.body["code"] == "model_not_allowed" and e.value.body["param"] == "model"
    with pytest.raises(openai.PermissionDeniedError) as e:  # grounded chat: the collection allow-list
        _client(server, keys["reader"]["key"]).chat.completions.create(
            model=MODEL, messages=HELLO, max_tokens=2, extra_body={"retrieval": {"collection": "hr-salaries"}})
    assert e.value.body["code"] == "collection_not_allowed" and e.value.body["param"] == "retrieval.collection"
    # trainer and admin routes refuse a user key before any handler runs
    auth = {"Authorization": f"Bearer {user}"}
    r = httpx.post(server.base + "/v1/fine_tuning/jobs", json={"model": MODEL, "training_file": "x"}, headers=auth)
    assert r.status_code == 403 and r.json()["error"]["code"] == "insufficient_role"
    r = httpx.get(server.base + "/v1/admin/keys", headers=auth)
    assert r.status_code == 403 and r.json()["error"]["code"] == "insufficient_role"
    r = httpx.get(server.base + "/v1/admin/keys", headers={"Authorization": f"Bearer {keys['admin']['key']}"})
    assert r.status_code == 200 and {k["name"] for k in r.json()["data"]} >= {"admin", "user", "outsider"}


def test_pii_in_a_prompt_is_blocked_naming_the_kinds(server, keys):
    client = _client(server, keys["blocker"]["key"])
    with pytest.raises(openai.BadRequestError) as e:
        client.chat.completions.create(model=MODEL, max_tokens=2, messages=[
            {"role": "user", "content": "Card 4111 1111 1111 1111, mail jane@example.org"}])
    body = e.value.body
    assert body["code"] == "pii_detected" and body["pii_kinds"] == ["card", "email"]
    assert "4111" not in json.dumps(body) and "jane@" not in json.dumps(body)
    assert client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2).usage.completion_tokens >= 1


def test_pii_in_a_streamed_output_is_redacted(server, keys):
    raw = _client(server, keys["user"]["key"]).chat.completions.create(
        model=MODEL, **ECHO_EMAIL, max_tokens=40, temperature=0).choices[0].message.content
    expected, kinds = redact(raw)
    assert kinds == ["email"], raw
    stream = _client(server, keys["echo-redactor"]["key"]).chat.completions.create(
        model=MODEL, **ECHO_EMAIL, max_tokens=40, temperature=0, stream=True)
    pieces = [c.choices[0].delta.content or "" for c in stream if c.choices]
    text = "".join(pieces)
    assert "john.doe@example.com" not in text and "@" not in text
    assert text == expected
    # completions too: the echoed prompt is part of the output the filter sees
    r = _client(server, keys["echo-redactor"]["key"]).completions.create(
        model=MODEL, prompt="Mail me at ann@example.com", max_tokens=2, echo=True)
    assert r.choices[0].text.startswith("Mail me at [EMAIL]") and "ann@" not in r.choices[0].text
    with pytest.raises(openai.BadRequestError) as e:  # logprobs would leak the tokens the filter hides
        _client(server, keys["echo-redactor"]["key"]).chat.completions.create(
            model=MODEL, messages=HELLO, max_tokens=2, logprobs=True)
    assert e.value.body["param"] == "logprobs"


def test_spend_is_recorded_at_the_model_price_and_visible_in_usage(server, keys):
    client = _client(server, keys["spender"]["key"])
    used = [client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=5).usage]
    stream = client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=3, stream=True,
                                            stream_options={"include_usage": True})
    used.append([c for c in stream][-1].usage)
    prompt, completion = sum(u.prompt_tokens for u in used), sum(u.completion_tokens for u in used)
    r = httpx.get(server.base + "/v1/usage", params={"group_by": "key_id,team,model"},
                  headers={"Authorization": f"Bearer {keys['spender']['key']}"})
    assert r.status_code == 200, r.text
    rows = r.json()["data"]
    assert len(rows) == 1, rows  # a user key sees its own usage only
    row = rows[0]
    assert (row["key_id"], row["team"], row["model"]) == (keys["spender"]["id"], "finance", MODEL)
    assert (row["requests"], row["prompt_tokens"], row["completion_tokens"]) == (2, prompt, completion)
    assert row["cost_usd"] == pytest.approx((prompt * PRICE_IN + completion * PRICE_OUT) / 1e6, rel=1e-9)
    assert row["cost_usd"] > 0


def test_one_audit_entry_per_request(server, keys):
    key = keys["auditee"]["key"]
    client = _client(server, key)
    client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2)
    list(client.chat.completions.create(model=MODEL, messages=HELLO, max_tokens=2, stream=True))
    with pytest.raises(openai.NotFoundError):
        client.chat.completions.create(model="no-such-model", messages=HELLO, max_tokens=2)
    client.models.list()
    r = httpx.get(server.base + "/v1/admin/audit", params={"key_id": keys["auditee"]["id"]},
                  headers={"Authorization": f"Bearer {keys['admin']['key']}"})
    assert r.status_code == 200, r.text
    entries = [e for e in r.json()["data"] if e.get("event") == "request"]
    got = [(e["method"], e["route"], e["status"]) for e in entries]
    assert got == [("POST", "/v1/chat/completions", 200), ("POST", "/v1/chat/completions", 200),
                   ("POST", "/v1/chat/completions", 404), ("GET", "/v1/models", 200)]
    served = entries[:2]
    assert all(e["model"] == MODEL and e["completion_tokens"] >= 1 and e["cost_usd"] > 0 for e in served)
    assert len({e["request_id"] for e in entries}) == 4


MAIL_SCHEMA = {"type": "object", "properties": {"to": {"type": "string"}, "subject": {"type": "string", "maxLength": 30}},
               "required": ["to", "subject"], "additionalProperties": False}
MAIL_TOOL = [{"type": "function", "function": {"name": "send_mail", "description": "Send an e-mail",
                                               "parameters": MAIL_SCHEMA}}]
MAIL_ME = [{"role": "user", "content": "Email john.doe@example.com: meeting moved."}]


def test_pii_in_json_answers_and_tool_arguments_is_redacted_keeping_the_json_valid(server, keys):
    """Redaction inside a constrained answer touches string values only, so the JSON still parses and validates;
    the audit entry says the request was constrained (schema hash, tool names), never what it said."""
    import jsonschema

    fmt = {"type": "json_schema", "json_schema": {"name": "mail", "schema": MAIL_SCHEMA}}
    named = {"type": "function", "function": {"name": "send_mail"}}
    raw = _client(server, keys["user"]["key"]).chat.completions.create(
        model=MODEL, messages=MAIL_ME, max_tokens=64, temperature=0, response_format=fmt).choices[0].message.content
    assert "john.doe@example.com" in raw, raw  # the model writes the address: the policy has something to catch
    red = _client(server, keys["redactor"]["key"])
    answer = red.chat.completions.create(model=MODEL, messages=MAIL_ME, max_tokens=64, temperature=0,
                                         response_format=fmt).choices[0].message.content
    jsonschema.validate(json.loads(answer), MAIL_SCHEMA)
    assert answer == redact(raw)[0] and "[EMAIL]" in json.loads(answer)["to"]
    streamed = "".join(c.choices[0].delta.content or "" for c in red.chat.completions.create(
        model=MODEL, messages=MAIL_ME, max_tokens=64, temperature=0, response_format=fmt, stream=True) if c.choices)
    assert streamed == answer
    call = red.chat.completions.create(model=MODEL, messages=MAIL_ME, max_tokens=64, temperature=0, tools=MAIL_TOOL,
                                       tool_choice=named).choices[0].message.tool_calls[0]
    args = json.loads(call.function.arguments)
    jsonschema.validate(args, MAIL_SCHEMA)
    assert "@" not in call.function.arguments
    pieces = [d.function.arguments or "" for c in red.chat.completions.create(
        model=MODEL, messages=MAIL_ME, max_tokens=64, temperature=0, tools=MAIL_TOOL, tool_choice=named, stream=True)
        for d in (c.choices[0].delta.tool_calls or [] if c.choices else [])]
    assert "".join(pieces) == call.function.arguments
    r = httpx.get(server.base + "/v1/admin/audit", params={"key_id": keys["redactor"]["id"]},
                  headers={"Authorization": f"Bearer {keys['admin']['key']}"})
    entries = [e for e in r.json()["data"] if e.get("event") == "request" and e.get("constrained")]
    kinds = [e["constrained"].get("kind") for e in entries]
    assert kinds.count("json_schema") == 2 and kinds.count("tool_calls") == 0
    tools = [e["constrained"] for e in entries if "tools" in e["constrained"]]
    assert len(tools) == 2 and all(t["tools"] == ["send_mail"] for t in tools)
    assert len({e["constrained"]["hash"] for e in entries if e["constrained"].get("kind") == "json_schema"}) == 1
    assert "john.doe" not in json.dumps(entries)
