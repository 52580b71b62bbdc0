"""The retriever as a Ray Serve deployment: one replica owning a CollectionService.

    handle = serve.run(build_retriever_app(), name="retriever", route_prefix=None)
    await handle.query.remote("docs", "question", k=4)
    app.include_router(build_router(handle))      # the gateway's collections API over the handle

One replica, because a replica keeps its indexes in memory; the store's seq makes another process's writes
(e.g. `loraplex ingest`) visible to it on the next call. Methods are sync: Ray Serve runs them in a
thread pool, and CollectionService is thread-safe.
"""

from __future__ import annotations

from ray import serve

from serving.rag.collections import CollectionService


@serve.deployment(num_replicas=1, max_ongoing_requests=64)
class Retriever:
    def __init__(self, home: str | None = None, device: str = "cpu"):
        self.service = CollectionService(home, device=device)

    def ready(self) -> dict:
        """Answers once the replica is up (the gateway polls it)."""
        return {"collections": len(self.service.list_collections())}

    def create_collection(self, name, embedding_model=None, index="flat", index_params=None, chunk_tokens=None,
                          chunk_overlap=None):
        return self.service.create_collection(name, embedding_model, index, index_params, chunk_tokens,
                                              chunk_overlap)

    def list_collections(self):
        return self.service.list_collections()

    def get_collection(self, name):
        return self.service.get_collection(name)

    def delete_collection(self, name):
        return self.service.delete_collection(name)

    def add_documents(self, name, documents):
        return self.service.add_documents(name, documents)

    def list_documents(self, name):
        return self.service.list_documents(name)

    def delete_document(self, name, doc_id):
        return self.service.delete_document(name, doc_id)

    def document_chunks(self, name, doc_id):
        return self.service.document_chunks(name, doc_id)

    def query(self, name, query=None, k=5, filter=None, embedding=None):
        return self.service.query(name, query, k=k, filter=filter, embedding=embedding)

    def embed(self, texts, model=None):
        """Embeddings from the replica's cached model (lets the gateway share it for /v1/embeddings)."""
        return self.service.embedder(model).embed(texts)


def build_retriever_app(home: str | None = None, device: str = "cpu", num_cpus: float = 0.5):
    """The bound deployment; device "cuda" also asks Ray for a GPU."""
    options = {"num_cpus": num_cpus}
    if device.startswith("cuda"):
        options["num_gpus"] = 0.1
    return Retriever.options(ray_actor_options=options).bind(None if home is None else str(home), device)
