"""CollectionService and grounding with the real all-MiniLM-L6-v2: retrieval quality on the shipped handbook
corpus, re-ingestion, dedupe, persistence across a restart, concurrency, and clear errors for bad input."""

import threading
from pathlib import Path

import numpy as np
import pytest
import torch

from serving.embeddings import Embedder
from serving.rag.collections import CollectionService
from serving.rag.errors import (
    CollectionExistsError,
    CollectionNotFoundError,
    DocumentNotFoundError,
    InvalidInputError,
    UnsupportedFileTypeError,
)
from serving.rag.grounding import retrieve_for_chat

HANDBOOK = Path(__file__).resolve().parents[1] / "serving" / "rag" / "data" / "handbook"

# question -> (document id, a phrase the top chunk must contain)
QUESTIONS = {
    "How many vacation days do I get each year?": ("vacation.md", "27 days"),
    "How long is paid parental leave?": ("vacation.md", "16 weeks"),
    "When do I need a doctor's note when I'm sick?": ("vacation.md", "certificate"),
    "What is the maximum hotel price per night?": ("expenses.md", "180 euros"),
    "How do I get reimbursed for receipts?": ("expenses.md", "within 30 days"),
    "I forgot my password, how can I reset it?": ("it-support.html", "security questions"),
    "How do I set up the VPN to work from home?": ("it-support.html", "WireGuard"),
    "Where is the headquarters?": ("offices.txt", "Rotterdam"),
    "When is lunch served in the canteen?": ("offices.txt", "vegetarian lunch"),
    "How quickly must on-call engineers acknowledge a page?": ("engineering.md", "15 minutes"),
    "How many reviews does a pull request need before merging?": ("engineering.md", "approving review"),
    "On which days are production releases?": ("engineering.md", "Tuesday and Thursday"),
}


@pytest.fixture(scope="module")
def embedder():
    # One torch thread: on a shared 2-core machine OpenMP spinning makes small batches many times slower.
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield Embedder()
    torch.set_num_threads(threads)


def _service(home, embedder) -> CollectionService:
    return CollectionService(home, embedder_factory=lambda name: embedder)


def _handbook_docs():
    return [{"file": {"name": p.name, "data": p.read_bytes()}, "metadata": {"kind": p.suffix[1:]}}
            for p in sorted(HANDBOOK.iterdir())]


@pytest.fixture(scope="module")
def handbook(tmp_path_factory, embedder):
    home = tmp_path_factory.mktemp("rag-home")
    svc = _service(home, embedder)
    svc.create_collection("handbook", chunk_tokens=48, chunk_overlap=8)
    result = svc.add_documents("handbook", _handbook_docs())
    assert [r["status"] for r in result["data"]] == ["created"] * 5
    return home, svc


@pytest.mark.parametrize("index", ["flat", "hnsw"])
def test_right_chunk_comes_first(handbook, embedder, index):
    home, svc = handbook
    name = "handbook" if index == "flat" else "handbook-hnsw"
    if index != "flat":
        svc.create_collection(name, index="hnsw", index_params={"min_ann": 1}, chunk_tokens=48, chunk_overlap=8)
        svc.add_documents(name, _handbook_docs())
    assert svc.get_collection(name)["chunks"] > 15  # several chunks per document: the test is not trivial
    for question, (doc_id, phrase) in QUESTIONS.items():
        top = svc.query(name, question, k=3)["data"]
        assert top[0]["document_id"] == doc_id, (question, top[0])
        assert phrase in top[0]["text"], (question, top[0]["text"])
        assert top[0]["score"] >= top[1]["score"] >= top[2]["score"]
        # offsets point into the parsed document text, and scores are cosine similarities
        expected = embedder.embed([question])[0] @ embedder.embed(
            [top[0]["text"] if top[0]["text"].startswith("#") or not top[0]["heading"]
             else f"{top[0]['heading']}\n{top[0]['text']}"])[0]
        assert top[0]["score"] == pytest.approx(float(expected), abs=1e-4)


def test_offsets_and_metadata_filter(handbook):
    _, svc = handbook
    from serving.rag.parsers import parse_file

    hit = svc.query("handbook", "Where do I park my bicycle?", k=1)["data"][0]
    assert hit["document_id"] == "offices.txt" and hit["metadata"] == {"kind": "txt"}
    assert parse_file(HANDBOOK / "offices.txt")[hit["start"]:hit["end"]] == hit["text"]
    hits = svc.query("handbook", "How many vacation days do I get?", k=5, filter={"kind": "html"})["data"]
    assert hits and all(h["document_id"] == "it-support.html" for h in hits)
    assert svc.query("handbook", "vacation", k=5, filter={"kind": "pdf"})["data"] == []


def test_reingest_replaces_chunks_and_dedupes(tmp_path, embedder):
    svc = _service(tmp_path, embedder)
    svc.create_collection("c")
    r = svc.add_documents("c", [{"id": "a", "text": "The office cat is called Mittens."}])["data"]
    assert r == [{"id": "a", "status": "created", "chunks": 1}]
    assert svc.add_documents("c", [{"id": "a", "text": "The office cat is called Mittens."}])["data"][0][
        "status"] == "unchanged"
    dup = svc.add_documents("c", [{"id": "b", "text": "The office cat is called Mittens."}])["data"][0]
    assert dup["status"] == "duplicate" and dup["duplicate_of"] == "a"
    # same text, new metadata: no new chunks, the filter sees the new metadata at once
    meta = svc.add_documents("c", [{"id": "a", "text": "The office cat is called Mittens.",
                                    "metadata": {"pet": "cat"}}])["data"][0]
    assert meta == {"id": "a", "status": "updated", "chunks": 0}
    assert svc.query("c", "cat", k=1, filter={"pet": "cat"})["data"][0]["metadata"] == {"pet": "cat"}
    with pytest.raises(InvalidInputError, match="metadata is not JSON"):
        svc.add_documents("c", [{"id": "n", "text": "x", "metadata": {"s": {1, 2}}}])
    upd = svc.add_documents("c", [{"id": "a", "text": "The office dog is called Rex."}])["data"][0]
    assert upd["status"] == "updated"
    hits = svc.query("c", "what is the cat called?", k=5)["data"]
    assert [h["text"] for h in hits] == ["The office dog is called Rex."]  # old chunk gone
    assert svc.get_collection("c")["documents"] == 1
    svc.delete_document("c", "a")
    assert svc.query("c", "dog", k=3)["data"] == []


def test_persistence_across_restart(tmp_path, embedder):
    svc = _service(tmp_path, embedder)
    svc.create_collection("p", index="ivf", index_params={"min_ann": 1, "nlist": 1})
    svc.add_documents("p", [{"id": f"d{i}", "text": f"Fact number {i}: the {w} is blue."}
                            for i, w in enumerate(["sky", "sea", "car", "door"])])
    before = svc.query("p", "what colour is the sea?", k=4)
    svc.close()
    again = _service(tmp_path, embedder)  # a fresh process-equivalent: loads the saved index
    assert again.list_collections()[0]["chunks"] == 4
    after = again.query("p", "what colour is the sea?", k=4)
    assert [h["id"] for h in after["data"]] == [h["id"] for h in before["data"]]
    assert after["data"][0]["document_id"] == "d1"
    # a stale index file (written, never committed) is detected and rebuilt from the catalogue
    coll = again.store.get_collection("p")
    again._indexes.clear()
    from serving.rag.index import VectorIndex

    VectorIndex(coll["dim"]).save(again.store.index_dir(coll), seq=coll["seq"] + 7)
    assert len(again.query("p", "sky", k=4)["data"]) == 4


def test_two_services_share_a_data_dir(tmp_path, embedder):
    a, b = _service(tmp_path, embedder), _service(tmp_path, embedder)
    a.create_collection("s")
    a.add_documents("s", [{"id": "x", "text": "Alpha document about apples."}])
    assert b.query("s", "apples", k=2)["data"][0]["document_id"] == "x"
    b.add_documents("s", [{"id": "y", "text": "Beta document about bananas."}])
    assert a.query("s", "bananas", k=1)["data"][0]["document_id"] == "y"  # a notices b's write


def test_concurrent_ingestion_and_queries(tmp_path, embedder):
    svc = _service(tmp_path, embedder)
    svc.create_collection("cc")
    svc.add_documents("cc", [{"id": "seed", "text": "Seed document about gardening and tomatoes."}])
    errors = []

    def writer(t):
        try:
            for i in range(4):
                svc.add_documents("cc", [{"id": f"w{t}-{i}", "text": f"Writer {t} note {i} about topic {t * 10 + i}."}])
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    def reader():
        try:
            for _ in range(8):
                hits = svc.query("cc", "gardening tomatoes", k=3)["data"]
                assert hits[0]["document_id"] == "seed"
        except Exception as exc:  # noqa: BLE001
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=(t,)) for t in range(3)] + [
        threading.Thread(target=reader) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    info = svc.get_collection("cc")
    assert info["documents"] == 13 and info["chunks"] == 13
    assert len(svc._index(svc.store.get_collection("cc"))) == 13
    ids = {h["document_id"] for h in svc.query("cc", "writer note", k=20)["data"]}
    assert len(ids) == 13


def test_bad_input_errors(tmp_path, embedder):
    svc = _service(tmp_path, embedder)
    svc.create_collection("e")
    svc.add_documents("e", [{"id": "ok", "text": "hello there"}])
    cases = [
        (lambda: svc.query("nope", "x"), CollectionNotFoundError, "collection 'nope' does not exist", "collection"),
        (lambda: svc.add_documents("e", [{"id": "z", "text": "  \n"}]), InvalidInputError, "is empty",
         "documents[0].text"),
        (lambda: svc.add_documents("e", [{"file": {"name": "x.docx", "data": b"PK"}}]), UnsupportedFileTypeError,
         "unsupported file type '.docx'", "files"),
        (lambda: svc.query("e", "x", k=0), InvalidInputError, "k must be an integer between 1 and 100", "k"),
        (lambda: svc.query("e", "x", k=101), InvalidInputError, "between 1 and 100", "k"),
        (lambda: svc.query("e", embedding=[0.1] * 12), InvalidInputError, "dimension mismatch.*12 dimensions.*384",
         "embedding"),
        (lambda: svc.query("e", "x", filter={"a": {"$regex": "."}}), InvalidInputError, "unknown filter operator",
         "filter.a.$regex"),
        (lambda: svc.create_collection("e"), CollectionExistsError, "already exists", "name"),
        (lambda: svc.create_collection("bad name!"), InvalidInputError, "collection name", "name"),
        (lambda: svc.create_collection("t", chunk_tokens=400), InvalidInputError, "chunk_tokens", "chunk_tokens"),
        (lambda: svc.delete_document("e", "missing"), DocumentNotFoundError, "does not exist", "document_id"),
        (lambda: svc.add_documents("e", [{"text": "a", "colour": 1}]), InvalidInputError, "unknown fields: colour",
         "documents[0]"),
    ]
    for call, exc_type, message, param in cases:
        with pytest.raises(exc_type, match=message) as err:
            call()
        assert err.value.param == param
    # a failed request changed nothing
    assert svc.get_collection("e")["documents"] == 1
    real = CollectionService(tmp_path / "real")  # the default factory: real model loading, unknown model
    with pytest.raises(InvalidInputError, match="cannot load embedding model './missing-folder'") as err:
        real.create_collection("x", embedding_model="./missing-folder")
    assert err.value.param == "embedding_model"


def test_embedding_query_matches_text_query(handbook, embedder):
    _, svc = handbook
    q = "What is the maximum hotel price per night?"
    by_text = svc.query("handbook", q, k=3)["data"]
    by_vec = svc.query("handbook", embedding=embedder.embed([q])[0].tolist(), k=3)["data"]
    assert [h["id"] for h in by_text] == [h["id"] for h in by_vec]
    np.testing.assert_allclose([h["score"] for h in by_text], [h["score"] for h in by_vec], atol=1e-5)


def test_grounded_chat_messages_and_citations(handbook):
    _, svc = handbook
    messages = [{"role": "system", "content": "You are the Northwind HR bot."},
                {"role": "user", "content": "How long is paid parental leave?"}]
    grounded, citations = retrieve_for_chat(svc, {"collection": "handbook", "k": 2}, messages)
    assert len(citations) == 2 and citations[0]["index"] == 1
    assert citations[0]["document_id"] == "vacation.md" and "16 weeks" in citations[0]["chunk"]
    assert grounded[0]["role"] == "system" and grounded[0]["content"].startswith("You are the Northwind HR bot.")
    assert "[1] (document: vacation.md)" in grounded[0]["content"] and "16 weeks" in grounded[0]["content"]
    assert grounded[1:] == messages[1:] and messages[0]["content"] == "You are the Northwind HR bot."
    # no system message: one is prepended; content-part lists are understood
    parts = [{"role": "user", "content": [{"type": "text", "text": "Where is the headquarters?"}]}]
    grounded, citations = retrieve_for_chat(svc, {"collection": "handbook", "k": 1}, parts)
    assert grounded[0]["role"] == "system" and citations[0]["document_id"] == "offices.txt"
    for bad, param in [({"k": 2}, "retrieval.collection"), ({"collection": "handbook", "k": 0}, "retrieval.k"),
                       ({"collection": "handbook", "k": 50}, "retrieval.k"), ("handbook", "retrieval"),
                       ({"collection": "handbook", "top": 1}, "retrieval"),
                       ({"collection": "handbook", "template": "no placeholder"}, "retrieval.template")]:
        with pytest.raises(InvalidInputError) as err:
            retrieve_for_chat(svc, bad, messages)
        assert err.value.param == param
    with pytest.raises(CollectionNotFoundError) as err:
        retrieve_for_chat(svc, {"collection": "nope"}, messages)
    assert err.value.param == "retrieval.collection" and err.value.status == 404
    with pytest.raises(InvalidInputError, match="user message"):
        retrieve_for_chat(svc, {"collection": "handbook"}, [{"role": "system", "content": "x"}])


def test_async_grounding_with_a_local_service(handbook):
    import asyncio

    from serving.rag.grounding import aretrieve_for_chat

    _, svc = handbook
    messages = [{"role": "user", "content": "Which VPN client do I install?"}]
    grounded, citations = asyncio.run(aretrieve_for_chat(svc, {"collection": "handbook", "k": 2}, messages))
    assert citations[0]["document_id"] == "it-support.html" and grounded[-1] == messages[-1]
    with pytest.raises(CollectionNotFoundError) as err:
        asyncio.run(aretrieve_for_chat(svc, {"collection": "nope"}, messages))
    assert err.value.param == "retrieval.collection"
