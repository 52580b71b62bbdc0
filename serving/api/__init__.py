"""The OpenAI-compatible HTTP API: protocol models, errors, SSE streaming, metrics, the gateway's routes.

  protocol.py       request models (chat, completions, embeddings) -> engine sampling parameters
  errors.py         OpenAI error JSON and the FastAPI exception handlers
  backend.py        inside a model replica: template, tokenise, validate, stream engine deltas
  gateway.py        inside the gateway: route, stream or aggregate, record metrics
  responses.py      response bodies and stream chunks
  streaming.py      SSE framing, merging several replica streams
  metrics.py        Prometheus metrics (/metrics)
  openai_routes.py  the FastAPI app
"""
