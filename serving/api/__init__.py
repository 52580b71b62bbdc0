"""The OpenAI-compatible HTTP API: protocol models, errors, SSE streaming, metrics, the gateway's routes.

  protocol.py       request models (chat, completions, embeddings) -> engine sampling parameters
  errors.py         OpenAI error JSON and the FastAPI exception handlers
  backend.py        inside a model replica: template, tokenise, validate, stream engine deltas
  tools.py          tool calling: validate tools / tool_choice / tool history, call ids
  tool_prompt.py    chat prompts with tools (the model's template, or a Hermes-style fallback)
  tool_parsers.py   tool calls in model output (hermes, llama3_json, mistral) and their grammar descriptions
  gateway.py        inside the gateway: route, stream or aggregate, record metrics
  responses.py      response bodies and stream chunks
  streaming.py      SSE framing, merging several replica streams
  metrics.py        Prometheus metrics (/metrics)
  openai_routes.py  the FastAPI app
"""
