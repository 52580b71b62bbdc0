"""Perplexity of a text under a loaded engine: the quality check of a weight format (float32, bfloat16, int8,
int4) against float32, run through the engine's own forward and paged KV cache, in prefill chunks."""

from __future__ import annotations

import math

import torch


def prompt_logits(engine, ids: list[int], chunk: int = 256) -> torch.Tensor:
    """Logits [len(ids), vocab] at every position of `ids`, computed through the paged cache in prefill chunks
    of `chunk` tokens (the blocks are released after)."""
    from serving.engine.model import ForwardBatch

    bs = engine.config.block_size
    blocks = engine.allocator.allocate(-(-len(ids) // bs))
    rows = []
    try:
        table = torch.tensor([blocks], dtype=torch.int32)
        for start in range(0, len(ids), chunk):
            end = min(start + chunk, len(ids))
            n = end - start
            batch = ForwardBatch(
                input_ids=torch.tensor(ids[start:end]), positions=torch.arange(start, end),
                slot_mapping=torch.tensor([blocks[p // bs] * bs + p % bs for p in range(start, end)]),
                num_prefill_tokens=n, prefill_cu_seqlens=torch.tensor([0, n], dtype=torch.int32),
                prefill_block_tables=table, prefill_seq_lens=torch.tensor([end], dtype=torch.int32),
                decode_block_tables=table, decode_seq_lens=torch.tensor([end], dtype=torch.int32),
                logits_indices=torch.arange(n))
            with torch.inference_mode():
                rows.append(engine.model(batch, engine.kv_caches))
    finally:
        engine.allocator.release(blocks)
    return torch.cat(rows)


def perplexity(engine, text: str, max_tokens: int | None = None) -> dict:
    """{"perplexity", "tokens"}: exp of the mean next-token negative log-likelihood over `text`."""
    ids = engine.tokenizer(text, add_special_tokens=True)["input_ids"]
    ids = ids[: min(max_tokens or len(ids), engine.max_model_len)]
    logits = prompt_logits(engine, ids)[:-1].float()
    nll = torch.nn.functional.cross_entropy(logits, torch.tensor(ids[1:]), reduction="mean")
    return {"perplexity": math.exp(float(nll)), "tokens": len(ids) - 1}
