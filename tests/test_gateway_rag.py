"""Grounded chat in the real gateway: a chat completion with `"retrieval": {"collection", "k"}` on a
`loraplex serve` process (Retriever deployment, the default model, a LoRA adapter and a route). Citations
must name the document holding the fact; the retrieved chunk must be in the prompt the model saw, which is
checked exactly by re-tokenising the grounded messages with the model's own chat template."""

from __future__ import annotations

import json

import httpx
import openai
import pytest

from serving.rag.grounding import ground_messages
from tests.serve_helpers import MODEL, Server

pytestmark = [pytest.mark.slow, pytest.mark.timeout(600)]

CONFIG = """
models:
  - name: {model}
    max_model_len: 2048
    kv_cache_memory: 128MiB
    max_num_seqs: 8
    ray_actor_options: {{num_cpus: 0}}
adapters:
  - {{name: demo, base: {model}, source: {adapter}}}
embeddings: {{enabled: false}}
rag: {{enabled: true}}
fine_tuning: {{enabled: false}}
routes:
  grounded:
    policy: cheapest
    candidates:
      - {{model: "{model}:demo", quality: 0.5}}
"""
DOCS = [
    {"id": "festivals/zorblat.md", "text": "The Zorblat festival is held every year in the hill town of Quillmoor "
     "on the ninth of March. Visitors eat blue pancakes and race wooden goats down the main street."},
    {"id": "animals/glacier-fox.md", "text": "Glacier foxes of the Vellmark tundra sleep twenty hours a day "
     "during the polar winter and hunt lemmings under the snow in spring."},
]
QUESTION = [{"role": "user", "content": "In which town is the Zorblat festival held?"}]
RETRIEVAL = {"collection": "trivia", "k": 1}


@pytest.fixture(scope="module")
def server(tmp_path_factory, default_model_path):
    from tests.conftest import make_lora_adapter

    tmp = tmp_path_factory.mktemp("rag")
    adapter = make_lora_adapter(default_model_path, tmp / "demo", 4, seed=5, std=0.02, base_name=MODEL,
                                targets=["q_proj", "v_proj"])
    srv = Server(tmp, CONFIG.format(model=MODEL, adapter=adapter))
    try:
        srv.start()
        r = httpx.post(srv.base + "/v1/collections", json={"name": "trivia"}, timeout=60)
        assert r.status_code in (200, 201), r.text
        r = httpx.post(srv.base + "/v1/collections/trivia/documents", json={"documents": DOCS}, timeout=120)
        assert r.status_code in (200, 201), r.text
        yield srv
    finally:
        srv.stop()


@pytest.fixture(scope="module")
def client(server):
    return openai.OpenAI(base_url=server.base + "/v1", api_key="EMPTY", max_retries=0, timeout=120)


@pytest.fixture(scope="module")
def tokenizer(default_model_path):
    from transformers import AutoTokenizer

    return AutoTokenizer.from_pretrained(default_model_path)


def prompt_tokens(tokenizer, messages) -> int:
    text = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return len(tokenizer(text, add_special_tokens=False)["input_ids"])


def grounded_prompt_tokens(tokenizer, citations) -> int:
    """The prompt the gateway should have built from these citations (serving.rag.grounding's template)."""
    hits = [{"id": c["chunk_id"], "document_id": c["document_id"], "text": c["chunk"], "score": c["score"],
             "start": c["start"], "end": c["end"]} for c in citations]
    messages, _ = ground_messages(QUESTION, {"data": hits})
    return prompt_tokens(tokenizer, messages)


def test_grounded_answer_cites_the_right_document(client, tokenizer):
    r = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=16, temperature=0,
                                       extra_body={"retrieval": RETRIEVAL})
    cites = r.model_extra["citations"]
    assert [c["document_id"] for c in cites] == ["festivals/zorblat.md"]
    assert cites[0]["index"] == 1 and "Quillmoor" in cites[0]["chunk"] and cites[0]["score"] > 0
    # the chunk went into the prompt: the replica counted exactly the grounded messages' tokens
    plain = prompt_tokens(tokenizer, QUESTION)
    assert r.usage.prompt_tokens == grounded_prompt_tokens(tokenizer, cites)
    assert r.usage.prompt_tokens > plain + len(tokenizer(cites[0]["chunk"])["input_ids"])
    # more sources, more prompt: k=2 brings the other document too, ranked below
    r2 = client.chat.completions.create(model=MODEL, messages=QUESTION, max_tokens=1,
                                        extra_body={"retrieval": {**RETRIEVAL, "k": 2}})
    cites2 = r2.model_extra["citations"]
    assert [c["document_id"] for c in cites2] == ["festivals/zorblat.md", "animals/glacier-fox.md"]
    assert cites2[0]["score"] >= cites2[1]["score"]
    assert r2.usage.prompt_tokens == grounded_prompt_tokens(tokenizer, cites2) > r.usage.prompt_tokens


def test_streamed_citations_come_in_the_final_chunk(server, tokenizer):
    body = {"model": MODEL, "messages": QUESTION, "max_tokens": 6, "stream": True, "retrieval": RETRIEVAL}
    with httpx.stream("POST", server.base + "/v1/chat/completions", json=body, timeout=120) as r:
        assert r.status_code == 200
        lines = [ln for ln in r.iter_lines() if ln]
    assert lines[-1] == "data: [DONE]"
    chunks = [json.loads(ln[6:]) for ln in lines[:-1]]
    assert all("citations" not in c for c in chunks[:-1])
    assert [c["document_id"] for c in chunks[-1]["citations"]] == ["festivals/zorblat.md"]
    assert chunks[-1]["choices"][0]["finish_reason"] in ("length", "stop")
    # with usage: the usage chunk is the final one and carries them, with the grounded prompt's size
    body["stream_options"] = {"include_usage": True}
    with httpx.stream("POST", server.base + "/v1/chat/completions", json=body, timeout=120) as r:
        last = [json.loads(ln[6:]) for ln in r.iter_lines() if ln.startswith("data: {")][-1]
    assert last["choices"] == [] and last["citations"][0]["document_id"] == "festivals/zorblat.md"
    assert last["usage"]["prompt_tokens"] == grounded_prompt_tokens(tokenizer, last["citations"])


def test_grounding_works_with_an_adapter_and_a_route(client, tokenizer):
    r = client.chat.completions.create(model=f"{MODEL}:demo", messages=QUESTION, max_tokens=4,
                                       extra_body={"retrieval": RETRIEVAL})
    assert r.model_extra["citations"][0]["document_id"] == "festivals/zorblat.md"
    assert r.usage.prompt_tokens == grounded_prompt_tokens(tokenizer, r.model_extra["citations"])
    raw = client.chat.completions.with_raw_response.create(model="grounded", messages=QUESTION, max_tokens=4,
                                                           extra_body={"retrieval": RETRIEVAL})
    assert raw.headers["x-routed-model"] == f"{MODEL}:demo"
    r = raw.parse()
    assert r.model == f"{MODEL}:demo" and r.model_extra["citations"][0]["document_id"] == "festivals/zorblat.md"


@pytest.mark.parametrize("retrieval,status,param", [
    ({"collection": "no-such-collection"}, 404, "retrieval.collection"),
    ({"collection": "trivia", "k": 0}, 400, "retrieval.k"),
    ({"collection": "trivia", "k": "three"}, 400, "retrieval.k"),
    ({"collection": "trivia", "top": 3}, 400, "retrieval"),
    ({"collection": ""}, 400, "retrieval.collection"),
    ("trivia", 400, "retrieval"),
    ({"collection": "trivia", "filter": {"lang": {"$regex": "x"}}}, 400, "retrieval.filter.lang.$regex"),
])
def test_bad_retrieval_names_the_field(server, retrieval, status, param):
    r = httpx.post(server.base + "/v1/chat/completions", timeout=60,
                   json={"model": MODEL, "messages": QUESTION, "max_tokens": 2, "retrieval": retrieval})
    assert r.status_code == status, r.text
    err = r.json()["error"]
    assert err["param"] == param, err
