"""POST /v1/embeddings: the embedding deployment (not priced: only the key's model allow-list applies)."""

from __future__ import annotations

import base64
import time

import numpy as np

from serving.api import governed
from serving.api.errors import APIError, not_found_model
from serving.api.metrics import Metrics
from serving.api.protocol import EmbeddingRequest


async def handle(core, body: EmbeddingRequest, http=None) -> dict:
    deps = core.deployments
    if deps.embed is None or body.model != deps.embed_name:
        raise not_found_model(body.model, [deps.embed_name] if deps.embed_name else [])
    principal = governed.principal_of(http)
    if principal is not None:
        core.governance.authorize(principal, model=deps.embed_name)
    deps.check_ready(deps.embed_name)
    texts = body.texts()
    limit = deps.config.embeddings.max_inputs
    if len(texts) > limit:
        raise APIError(400, f"input has {len(texts)} strings; at most {limit} are allowed.", param="input",
                       code="invalid_value")
    dim = (deps.embed_info or {}).get("dim")
    if body.dimensions is not None and body.dimensions != dim:
        raise APIError(400, f"dimensions must be {dim} for `{deps.embed_name}` (it cannot be shortened).",
                       param="dimensions", code="invalid_value")
    t0 = time.monotonic()
    lab = Metrics.labels(deps.embed_name, None)
    vecs, tokens = await deps.embed.embed.remote(texts)
    vecs = np.asarray(vecs, dtype=np.float32)
    data = []
    for i, v in enumerate(vecs):
        emb = base64.b64encode(v.astype("<f4").tobytes()).decode("ascii") if body.encoding_format == "base64" \
            else v.tolist()
        data.append({"object": "embedding", "index": i, "embedding": emb})
    core.metrics.embedding_tokens.labels(deps.embed_name).inc(tokens)
    core.metrics.e2e.labels(**lab).observe(time.monotonic() - t0)
    core.metrics.requests.labels(**lab, endpoint="embeddings", status="200").inc()
    return {"object": "list", "data": data, "model": deps.embed_name,
            "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}
