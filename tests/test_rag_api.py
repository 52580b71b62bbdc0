"""The collections router on a real uvicorn server (127.0.0.1), exercised with httpx: JSON and multipart
ingestion, queries with filters, deletes, and OpenAI-style errors with the right statuses."""

from pathlib import Path

import httpx
import pytest
import torch
from fastapi import FastAPI

from serving.embeddings import Embedder
from serving.router.sim import AppServer
from serving.rag.api import build_router
from serving.rag.collections import CollectionService

HANDBOOK = Path(__file__).resolve().parents[1] / "serving" / "rag" / "data" / "handbook"


@pytest.fixture(scope="module")
def client(tmp_path_factory):
    threads = torch.get_num_threads()
    torch.set_num_threads(1)  # shared 2-core machine: OpenMP spinning slows small batches badly
    embedder = Embedder()
    service = CollectionService(tmp_path_factory.mktemp("rag-api"), embedder_factory=lambda name: embedder)
    app = FastAPI()
    app.include_router(build_router(lambda: service))  # lazy form, as a gateway would mount it
    with AppServer(app, "rag-api") as server, httpx.Client(base_url=server.url, timeout=60) as c:
        yield c
    torch.set_num_threads(threads)


def _assert_error(resp, status, param=None, code=None, message=None):
    assert resp.status_code == status, resp.text
    err = resp.json()["error"]
    assert set(err) == {"message", "type", "param", "code"}
    if param is not None:
        assert err["param"] == param
    if code is not None:
        assert err["code"] == code
    if message is not None:
        assert message in err["message"]
    return err


def test_collection_lifecycle(client):
    r = client.post("/collections", json={"name": "kb", "index": "hnsw", "chunk_tokens": 64})
    assert r.status_code == 200, r.text
    assert r.json()["index"] == "hnsw" and r.json()["embedding_model"] == "all-MiniLM-L6-v2"
    files = [("files", (p.name, p.read_bytes(), "application/octet-stream"))
             for p in sorted(HANDBOOK.iterdir()) if p.suffix in (".md", ".html")]
    r = client.post("/collections/kb/documents", files=files,
                    data={"metadata": '{"source": "handbook"}', "ids": ["eng", "exp", "it", "vac"]})
    assert r.status_code == 200, r.text
    assert [d["id"] for d in r.json()["data"]] == ["eng", "exp", "it", "vac"]
    r = client.post("/collections/kb/documents", json={"documents": [
        {"id": "note", "text": "The coffee machine on floor 3 is descaled every Friday.", "metadata": {"floor": 3}}]})
    assert r.json()["data"][0]["status"] == "created"
    listed = client.get("/collections").json()
    assert listed["object"] == "list" and listed["data"][0]["documents"] == 5
    r = client.post("/collections/kb/query", json={"query": "How do I connect to the VPN?", "k": 3})
    hits = r.json()["data"]
    assert hits[0]["document_id"] == "it" and "WireGuard" in hits[0]["text"]
    assert {"id", "document_id", "score", "text", "start", "end", "metadata"} <= set(hits[0])
    assert hits[0]["metadata"] == {"source": "handbook"}
    r = client.post("/collections/kb/query", json={"query": "machine cleaning", "k": 2, "filter": {"floor": 3}})
    assert [h["document_id"] for h in r.json()["data"]] == ["note"]
    docs = client.get("/collections/kb/documents").json()["data"]
    assert {d["id"] for d in docs} == {"eng", "exp", "it", "vac", "note"}
    assert client.delete("/collections/kb/documents/note").json()["deleted"] is True
    _assert_error(client.delete("/collections/kb/documents/note"), 404, code="document_not_found")
    assert client.get("/collections/kb").json()["documents"] == 4
    assert client.delete("/collections/kb").json() == {"object": "collection.deleted", "id": "kb", "deleted": True}
    _assert_error(client.get("/collections/kb"), 404, code="collection_not_found")


def test_base64_file_upload(client):
    import base64

    client.post("/collections", json={"name": "b64"})
    html = (HANDBOOK / "it-support.html").read_bytes()
    r = client.post("/collections/b64/documents", json={"documents": [
        {"file": {"name": "it.html", "data_base64": base64.b64encode(html).decode()}}]})
    assert r.json()["data"][0]["id"] == "it.html"
    hit = client.post("/collections/b64/query", json={"query": "laptop repair", "k": 1}).json()["data"][0]
    assert "<" not in hit["text"] and "laptop" in hit["text"].lower()


def test_errors(client):
    client.post("/collections", json={"name": "err"})
    client.post("/collections/err/documents", json={"documents": [{"id": "a", "text": "alpha beta"}]})
    _assert_error(client.post("/collections/missing/query", json={"query": "x"}), 404, "collection",
                  "collection_not_found", "collection 'missing' does not exist")
    _assert_error(client.post("/collections", json={"name": "err"}), 409, "name", "collection_exists")
    _assert_error(client.post("/collections", json={"index": "flat"}), 400, "name", "missing_field")
    _assert_error(client.post("/collections", json={"name": "x", "index": "lsh"}), 400, "index",
                  message="index must be one of flat, ivf, hnsw")
    _assert_error(client.post("/collections", json={"name": "x", "colour": 1}), 400, "colour", "unknown_field")
    _assert_error(client.post("/collections", content=b"{not json", headers={"content-type": "application/json"}),
                  400, code="invalid_json")
    _assert_error(client.post("/collections/err/documents", json={"documents": [{"text": ""}]}), 400,
                  "documents[0].text", "empty_document")
    _assert_error(client.post("/collections/err/documents", files=[("files", ("a.docx", b"PK", "x/y"))]), 400,
                  "files", "unsupported_file_type", ".docx")
    _assert_error(client.post("/collections/err/documents", files=[("files", ("a.txt", b"x", "text/plain"))],
                              data={"ids": ["a", "b"]}), 400, "ids")
    _assert_error(client.post("/collections/err/query", json={"query": "x", "k": 0}), 400, "k")
    _assert_error(client.post("/collections/err/query", json={"query": "x", "k": 1000}), 400, "k")
    _assert_error(client.post("/collections/err/query", json={"query": "x", "k": "3"}), 400, "k")
    _assert_error(client.post("/collections/err/query", json={"embedding": [0.5] * 10}), 400, "embedding",
                  "dimension_mismatch", "10 dimensions")
    _assert_error(client.post("/collections/err/query", json={"query": "x", "filter": {"a": {"$foo": 1}}}), 400,
                  "filter.a.$foo")
    _assert_error(client.post("/collections/err/query", json={}), 400, "query")
