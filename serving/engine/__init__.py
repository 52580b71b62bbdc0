"""loraplex's generation engine: continuous batching over a paged KV cache, for the Llama family.

Layering (after nano-vllm / vLLM v1):
  config.py        EngineConfig
  sampling.py      SamplingParams (validated per request)
  outputs.py       RequestOutput / CompletionOutput deltas streamed to callers
  errors.py        client errors (InvalidRequestError, ContextLengthExceededError), EngineOverloadedError
  loader.py        model folder / dummy weights -> our model; architecture checks
  model.py         the Llama-family forward over packed tokens (Llama, Mistral, Qwen2, Qwen3)
  kv_cache.py      block allocator with prefix caching (hash chain of full blocks)
  scheduler.py     continuous batching, chunked prefill under a token budget, preemption by recompute
  sampler.py       logits processors and sampling (temperature, top-p/k, min-p, penalties, seeds, logprobs)
  structured.py    structured-output specs (SamplingParams.structured): kinds, validation, canonical form
  schema_check.py  the JSON Schema keywords the grammar engine enforces; others refused by JSON path
  grammar.py       xgrammar: compiled-grammar LRU, a matcher per sequence, each step's masks applied together
  detokenizer.py   incremental detokenisation that never splits a multi-byte character; stop strings
  llm_engine.py    LLMEngine: synchronous add_request / step / generate
  async_engine.py  AsyncEngine: the step loop in a background thread, async streams per request

Public API used by the server:
  engine = AsyncEngine(EngineConfig(model="smollm2-135m-instruct"))
  engine.tokenizer, engine.max_model_len, engine.name
  engine.check_request(prompt_token_ids, params)          # raises InvalidRequestError before any work
  async for out in engine.generate(prompt, params, request_id=..., lora_name=None): ...
      # prompt: str or list[int]; yields RequestOutput deltas; breaking out / cancelling aborts
  await engine.abort(request_id)
  engine.stats() -> dict: num_running, num_waiting, kv_blocks_total, kv_blocks_free, kv_usage,
                          prefix_cache_hits, prefix_cache_queries, ...
  engine.shutdown()
"""

from serving.engine.config import EngineConfig
from serving.engine.errors import (
    ContextLengthExceededError,
    EngineError,
    EngineOverloadedError,
    InvalidRequestError,
    ModelLoadError,
)
from serving.engine.outputs import CompletionOutput, RequestOutput, TokenLogprob
from serving.engine.sampling import SamplingParams

__all__ = [
    "EngineConfig",
    "SamplingParams",
    "RequestOutput",
    "CompletionOutput",
    "TokenLogprob",
    "EngineError",
    "InvalidRequestError",
    "ContextLengthExceededError",
    "EngineOverloadedError",
    "ModelLoadError",
]
