"""Retrieval-augmented generation: collections of documents, chunked, embedded and indexed with FAISS.

  errors.py       RagError and its kinds (carry the HTTP status, the OpenAI error type, param and code)
  parsers.py      .txt / .md / .html (stdlib) / .pdf (pypdf, the `pdf` extra) -> plain text
  chunking.py     token-budget chunks with overlap that never cross a heading; char offsets into the text
  index.py        VectorIndex: exact (flat), IVF and HNSW over FAISS, exact search via kernels on CUDA;
                  atomic persistence (temp files + fsync + os.replace, a manifest naming the live generation)
  store.py        SQLite catalogue (collections, documents, chunks with their vectors) in <home>/rag/
  collections.py  CollectionService: create/list/delete collections, add/delete documents, query with filters
  grounding.py    retrieve_for_chat(): grounded prompt messages + `citations` for chat completions
  api.py          FastAPI APIRouter for /v1/collections..., OpenAI-style errors
  deployment.py   Ray Serve deployment hosting a CollectionService
  cli.py          `loraplex ingest COLLECTION PATH...`
"""
