"""The retriever on a real local Ray Serve instance, called through its handle and through the collections
router mounted over that handle on a real uvicorn server."""

import asyncio

import httpx
import pytest

from serving.router.sim import AppServer, free_port

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def handle(tmp_path_factory):
    import ray
    from ray import serve

    from serving.rag.deployment import build_retriever_app

    home = tmp_path_factory.mktemp("rag-ray")
    ray.init(num_cpus=2, include_dashboard=False, log_to_driver=False, ignore_reinit_error=True,
             runtime_env={"env_vars": {"OMP_NUM_THREADS": "1"}})
    serve.start(http_options={"host": "127.0.0.1", "port": free_port()})
    try:
        yield serve.run(build_retriever_app(home), name="rag-test", route_prefix=None, blocking=False)
    finally:
        serve.shutdown()
        ray.shutdown()


def test_retriever_deployment(handle):
    from serving.rag.api import as_rag_error
    from serving.rag.errors import CollectionNotFoundError

    assert handle.create_collection.remote("docs").result(timeout_s=120)["dim"] == 384
    added = handle.add_documents.remote("docs", [
        {"id": "tea", "text": "Green tea is brewed at 80 degrees for two minutes."},
        {"id": "bike", "text": "Bicycle tyres should be pumped to four bar."},
    ]).result(timeout_s=120)
    assert [d["status"] for d in added["data"]] == ["created", "created"]
    hits = handle.query.remote("docs", "how hot should the water be for tea?", k=2).result(timeout_s=60)["data"]
    assert hits[0]["document_id"] == "tea" and hits[0]["score"] > hits[1]["score"]
    with pytest.raises(Exception) as err:
        handle.query.remote("nope", "x").result(timeout_s=60)
    rag = as_rag_error(err.value)
    assert isinstance(rag, CollectionNotFoundError) and rag.param == "collection" and rag.status == 404


def test_router_over_the_handle(handle):
    from fastapi import FastAPI

    from serving.rag.api import build_router

    app = FastAPI()
    app.include_router(build_router(handle))
    with AppServer(app, "rag-router") as server:
        with httpx.Client(base_url=server.url, timeout=120) as c:
            r = c.post("/collections", json={"name": "web"})
            assert r.status_code == 200, r.text
            c.post("/collections/web/documents", json={"documents": [{"id": "a", "text": "Owls hunt at night."}]})
            hits = c.post("/collections/web/query", json={"query": "nocturnal birds", "k": 1}).json()["data"]
            assert hits[0]["document_id"] == "a"
            r = c.post("/collections/missing/query", json={"query": "x"})
            assert r.status_code == 404 and r.json()["error"]["code"] == "collection_not_found"
            r = c.post("/collections/web/query", json={"query": "x", "k": 0})
            assert r.status_code == 400 and r.json()["error"]["param"] == "k"
    # the handle stays usable after the server's event loop is gone
    assert handle.list_collections.remote().result(timeout_s=60)[0]["name"] in ("docs", "web")


def test_grounding_through_the_handle(handle):
    from serving.rag.errors import CollectionNotFoundError, InvalidInputError
    from serving.rag.grounding import aretrieve_for_chat

    handle.create_collection.remote("chat").result(timeout_s=120)
    handle.add_documents.remote("chat", [{"id": "moon", "text": "The Moon orbits the Earth every 27 days."},
                                         {"id": "sun", "text": "The Sun is a G-type main-sequence star."}]
                                ).result(timeout_s=120)
    messages = [{"role": "user", "content": "How long does the Moon take to orbit the Earth?"}]

    async def run(retrieval):
        return await aretrieve_for_chat(handle, retrieval, messages)

    grounded, citations = asyncio.run(run({"collection": "chat", "k": 1}))
    assert citations[0]["document_id"] == "moon" and "[1] (document: moon)" in grounded[0]["content"]
    with pytest.raises(CollectionNotFoundError) as err:
        asyncio.run(run({"collection": "none"}))
    assert err.value.param == "retrieval.collection"
    with pytest.raises(InvalidInputError) as err:
        asyncio.run(run({"collection": "chat", "filter": {"a": {"$bad": 1}}}))
    assert err.value.param == "retrieval.filter.a.$bad"
