"""Torch reference top-k retrieval scoring (also the CPU production path): keys are scored in chunks and each
chunk's top-k is merged into a running top-k, so memory stays at [q, chunk] whatever n is."""

from __future__ import annotations

import torch

METRICS = ("ip", "cosine")
CHUNK = 65536  # keys per chunk at least; more while [q, chunk] fp32 scores stay under SCORE_BUDGET
SCORE_BUDGET = 1 << 25  # 128 MiB of fp32 scores at a time


def check_topk_args(queries: torch.Tensor, keys: torch.Tensor, k: int, metric: str) -> int:
    """Validates and returns the effective k (clamped to the number of keys)."""
    if metric not in METRICS:
        raise ValueError(f"topk_scores: metric must be one of {', '.join(METRICS)}, got {metric!r}")
    if queries.dim() != 2 or keys.dim() != 2 or queries.shape[1] != keys.shape[1]:
        raise ValueError(f"topk_scores: expected queries [q, d] and keys [n, d], got {tuple(queries.shape)} "
                         f"and {tuple(keys.shape)}")
    if int(k) < 1:
        raise ValueError(f"topk_scores: k must be at least 1, got {k}")
    return min(int(k), keys.shape[0])


def _normalise(x: torch.Tensor) -> torch.Tensor:
    return x / x.norm(dim=1, keepdim=True).clamp_min(1e-12)


def topk_scores(queries, keys, k, metric="ip", chunk: int | None = None):
    k = check_topk_args(queries, keys, k, metric)
    chunk = chunk or max(CHUNK, SCORE_BUDGET // max(1, queries.shape[0]))
    q = queries.float()
    if metric == "cosine":
        q = _normalise(q)
    best_s = torch.empty(q.shape[0], 0, device=q.device)
    best_i = torch.empty(q.shape[0], 0, dtype=torch.long, device=q.device)
    for start in range(0, keys.shape[0], chunk):
        kc = keys[start:start + chunk].float()
        if metric == "cosine":
            kc = _normalise(kc)
        s, i = torch.topk(q @ kc.t(), min(k, kc.shape[0]), dim=1)
        s, j = torch.topk(torch.cat([best_s, s], 1), min(k, best_s.shape[1] + s.shape[1]), dim=1)
        best_i = torch.gather(torch.cat([best_i, i + start], 1), 1, j)
        best_s = s
    return best_s, best_i
