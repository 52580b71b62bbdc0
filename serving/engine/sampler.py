"""Turn a step's logits into next tokens: penalties, temperature, top-k/top-p/min-p, seeded sampling, logprobs.

Rows are processed together where the operation is uniform; penalties and seeded draws go row by row since
each depends on that sequence's own history or generator. Logprobs are those of the model's raw distribution
(before temperature and truncation), as OpenAI and vLLM report them; for a structured-output row the
engine has already masked the logits to its grammar (grammar.py), so its logprobs are of the masked
distribution.
"""

from __future__ import annotations

import torch

from serving.engine.sequence import Sequence


def _apply_penalties(logits: torch.Tensor, seqs: list[Sequence]) -> None:
    for i, seq in enumerate(seqs):
        p = seq.params
        if p.repetition_penalty != 1.0:
            seen = torch.tensor(sorted(set(seq.token_ids)), dtype=torch.long, device=logits.device)
            vals = logits[i, seen]
            logits[i, seen] = torch.where(vals > 0, vals / p.repetition_penalty, vals * p.repetition_penalty)
        if (p.presence_penalty or p.frequency_penalty) and seq.num_output_tokens:
            out = torch.tensor(seq.output_token_ids, dtype=torch.long, device=logits.device)
            counts = torch.bincount(out, minlength=logits.shape[1]).to(logits.dtype)
            logits[i] -= p.frequency_penalty * counts + p.presence_penalty * (counts > 0).to(logits.dtype)


def _truncate(probs: torch.Tensor, seqs: list[Sequence]) -> torch.Tensor:
    """top-k, then top-p, then min-p, on probability rows (renormalised by the caller's draw)."""
    top_k = [s.params.top_k for s in seqs]
    if any(k > 0 for k in top_k):
        k = torch.tensor([k if k > 0 else probs.shape[1] for k in top_k], device=probs.device)
        sorted_p = probs.sort(dim=-1, descending=True).values
        kth = sorted_p.gather(1, (k - 1).clamp(max=probs.shape[1] - 1)[:, None])
        probs = probs.masked_fill(probs < kth, 0.0)
    top_p = torch.tensor([s.params.top_p for s in seqs], device=probs.device, dtype=probs.dtype)
    if bool((top_p < 1.0).any()):
        sorted_p, idx = probs.sort(dim=-1, descending=True)
        cum = sorted_p.cumsum(-1) / sorted_p.sum(-1, keepdim=True)
        remove = (cum - sorted_p / sorted_p.sum(-1, keepdim=True)) >= top_p[:, None]  # keep the token crossing p
        sorted_p = sorted_p.masked_fill(remove, 0.0)
        probs = torch.zeros_like(probs).scatter(1, idx, sorted_p)
    min_p = torch.tensor([s.params.min_p for s in seqs], device=probs.device, dtype=probs.dtype)
    if bool((min_p > 0).any()):
        threshold = probs.max(dim=-1, keepdim=True).values * min_p[:, None]
        probs = probs.masked_fill(probs < threshold, 0.0)
    return probs


def seed_for_step(seed: int, position: int) -> int:
    """The generator seed of the token at output `position` (splitmix64 of seed and position). Deriving it per
    step rather than carrying one generator's state means a request resumed on another replica, or recomputed
    after preemption, draws exactly the numbers the uninterrupted run would have."""
    x = (seed * 0x9E3779B97F4A7C15 + position + 1) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 30)) * 0xBF58476D1CE4E5B9) & 0xFFFFFFFFFFFFFFFF
    x = ((x ^ (x >> 27)) * 0x94D049BB133111EB) & 0xFFFFFFFFFFFFFFFF
    return (x ^ (x >> 31)) & 0x7FFFFFFFFFFFFFFF


def sample(logits: torch.Tensor, seqs: list[Sequence]) -> tuple[list[int], torch.Tensor | None]:
    """Returns the next token per row and the raw log-probabilities [rows, vocab] (float32), or None when no
    row asked for logprobs (the full-vocabulary log-softmax is then skipped)."""
    wants_logprobs = any(s.params.logprobs is not None for s in seqs)
    logprobs = torch.log_softmax(logits, dim=-1) if wants_logprobs else None
    work = logits
    if any(s.params.repetition_penalty != 1.0 or s.params.presence_penalty or s.params.frequency_penalty
           for s in seqs):
        work = logits.clone()
        _apply_penalties(work, seqs)
    greedy = [s.params.greedy for s in seqs]
    tokens = work.argmax(dim=-1).tolist()
    sampled_rows = [i for i, g in enumerate(greedy) if not g]
    if sampled_rows:
        rows = torch.tensor(sampled_rows, device=logits.device)
        sub = [seqs[i] for i in sampled_rows]
        temps = torch.tensor([s.params.temperature for s in sub], device=logits.device)
        probs = torch.softmax(work[rows] / temps[:, None], dim=-1)
        probs = _truncate(probs, sub)
        for j, i in enumerate(sampled_rows):
            seq = seqs[i]
            if seq.generator is not None and seq.seed is not None:
                seq.generator.manual_seed(seed_for_step(seq.seed, seq.num_output_tokens))
            tokens[i] = int(torch.multinomial(probs[j], 1, generator=seq.generator).item())
    return tokens, logprobs
