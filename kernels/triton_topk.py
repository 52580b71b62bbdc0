"""Triton fused retrieval scoring in two passes; the full [q, n] score matrix never reaches memory.

1. One kernel scores every [queries x keys] tile (tl.dot, fp32 accumulation) and keeps only each query's best
   score per tile of BLOCK_N keys: [q, n / BLOCK_N] maxima, ~1/128 of the scores.
2. Each query's k best tiles by that maximum hold all of its top-k keys: a key outside them scores at most its
   tile's maximum, below k distinct keys (the k chosen tiles' maxima). A second kernel rescores just those
   tiles' keys in fp32 and torch.topk picks the k best of k x BLOCK_N candidates.
So the keys are read once at GEMM speed and no per-tile sort runs. Large k (k x BLOCK_N near n) takes the dense
path instead: the same kernel writes every score and torch.topk selects, as torch.topk(q @ k.T) would.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.ref_topk import check_topk_args
from kernels.triton_launch import dot_precision, needs_int64

SCORE_BUDGET = 1 << 26  # fp32 tile maxima / dense scores held at once; queries are chunked to stay under it


@triton.jit
def _scores_kernel(q_ptr, k_ptr, qinv_ptr, kinv_ptr, out_ptr, nq, n, dim, stride_q, stride_k, stride_out,
                   COSINE: tl.constexpr, TILE_MAX: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                   BLOCK_D: tl.constexpr, OFF64: tl.constexpr, DOT_PREC: tl.constexpr):
    """TILE_MAX: out[q, tile] = max score of the tile's keys; else out[q, key] = every score. Cosine scales by
    precomputed inverse norms (norms in-kernel would need an fp32 copy of each tile: register spills)."""
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    mmask = offs_m < nq
    nmask = offs_n < n
    offs_d = tl.arange(0, BLOCK_D)
    rows_q = offs_m.to(tl.int64) if OFF64 else offs_m  # 32-bit offset tiles take half the registers
    rows_k = offs_n.to(tl.int64) if OFF64 else offs_n
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    for d0 in range(0, dim, BLOCK_D):
        dmask = (d0 + offs_d) < dim
        q = tl.load(q_ptr + rows_q[:, None] * stride_q + (d0 + offs_d)[None, :],
                    mask=mmask[:, None] & dmask[None, :], other=0.0)
        k = tl.load(k_ptr + rows_k[None, :] * stride_k + (d0 + offs_d)[:, None],
                    mask=nmask[None, :] & dmask[:, None], other=0.0)
        acc += tl.dot(q, k, input_precision=DOT_PREC)
    if COSINE:
        acc *= tl.load(qinv_ptr + offs_m, mask=mmask, other=0.0)[:, None] * \
            tl.load(kinv_ptr + offs_n, mask=nmask, other=0.0)[None, :]
    acc = tl.where(nmask[None, :], acc, float("-inf"))
    if TILE_MAX:
        tl.store(out_ptr + offs_m.to(tl.int64) * stride_out + pid_n, tl.max(acc, 1), mask=mmask)
    else:
        tl.store(out_ptr + offs_m.to(tl.int64)[:, None] * stride_out + offs_n[None, :], acc,
                 mask=mmask[:, None] & nmask[None, :])


@triton.jit
def _rescore_kernel(q_ptr, k_ptr, qinv_ptr, kinv_ptr, tiles_ptr, out_s_ptr, out_i_ptr, n, dim, stride_q, stride_k,
                    stride_tiles, stride_out, COSINE: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr,
                    OFF64: tl.constexpr):
    """Program (query, j): fp32 scores of every key in the query's j-th chosen tile (-inf past n)."""
    qi = tl.program_id(0)
    j = tl.program_id(1)
    tile = tl.load(tiles_ptr + qi * stride_tiles + j)
    offs_n = tile * BLOCK_N + tl.arange(0, BLOCK_N)
    nmask = offs_n < n
    offs_d = tl.arange(0, BLOCK_D)
    rows = offs_n.to(tl.int64) if OFF64 else offs_n
    acc = tl.zeros([BLOCK_N], tl.float32)
    for d0 in range(0, dim, BLOCK_D):
        dmask = (d0 + offs_d) < dim
        q = tl.load(q_ptr + qi.to(tl.int64) * stride_q + d0 + offs_d, mask=dmask, other=0.0)
        k = tl.load(k_ptr + rows[:, None] * stride_k + (d0 + offs_d)[None, :], mask=nmask[:, None] & dmask[None, :],
                    other=0.0)
        acc += tl.sum(k.to(tl.float32) * q.to(tl.float32)[None, :], 1)
    if COSINE:
        acc *= tl.load(qinv_ptr + qi) * tl.load(kinv_ptr + offs_n, mask=nmask, other=0.0)
    out = qi.to(tl.int64) * stride_out + j * BLOCK_N + tl.arange(0, BLOCK_N)
    tl.store(out_s_ptr + out, tl.where(nmask, acc, float("-inf")))
    tl.store(out_i_ptr + out, offs_n)


# Pass 1 on a GPU: the dot's depth step and pipelining picked once per (dim, query tile) by timing.
_GPU_CONFIGS = [triton.Config({"BLOCK_D": bd}, num_warps=w, num_stages=s)
                for bd, w, s in ((32, 8, 2), (32, 8, 3), (32, 8, 4), (64, 8, 3), (64, 8, 4), (32, 4, 4))]
_scores_tuned = triton.autotune(_GPU_CONFIGS, key=["dim", "BLOCK_M", "COSINE"])(_scores_kernel)


def _inverse_norms(x: torch.Tensor) -> torch.Tensor:
    """1 / max(||row||, 1e-12) in fp32, without an fp32 copy of x."""
    return torch.linalg.vector_norm(x, dim=1, dtype=torch.float32).clamp_min(1e-12).reciprocal()


def _scores(queries, keys, qinv, kinv, out, tile_max, block_m, block_n):
    nq, dim = queries.shape
    grid = (triton.cdiv(nq, block_m), triton.cdiv(keys.shape[0], block_n))
    args = (queries, keys, qinv, kinv, out, nq, keys.shape[0], dim, queries.stride(0), keys.stride(0),
            out.stride(0))
    meta = dict(COSINE=qinv is not None, TILE_MAX=tile_max, BLOCK_M=block_m, BLOCK_N=block_n,
                OFF64=needs_int64(queries, keys),
                DOT_PREC=dot_precision(queries.dtype))
    if queries.device.type == "cuda":
        _scores_tuned[grid](*args, **meta)
    else:  # the interpreter: one fixed configuration
        _scores_kernel[grid](*args, **meta, BLOCK_D=32, num_warps=4)


def topk_scores(queries, keys, k, metric="ip"):
    """(scores [q, k] fp32, ids [q, k] int64), best first. k clamps to n; keys must fit int32 ids."""
    k = check_topk_args(queries, keys, k, metric)
    if queries.dtype != keys.dtype:
        raise ValueError(f"topk_scores: queries are {queries.dtype} but keys are {keys.dtype}")
    if queries.stride(1) != 1 or keys.stride(1) != 1:
        raise ValueError("topk_scores: queries and keys must be contiguous along d")
    nq, dim = queries.shape
    n = keys.shape[0]
    if n >= 2**31:
        raise ValueError(f"topk_scores: at most 2**31-1 keys, got {n}")
    on_gpu = queries.device.type == "cuda"
    cosine = metric == "cosine"
    qinv_all, kinv = (_inverse_norms(queries), _inverse_norms(keys)) if cosine else (None, None)
    # One query tile covers up to 64 queries so each key is read once for typical retrieval batches.
    block_m = min(64, max(16, triton.next_power_of_2(nq))) if on_gpu else 16
    block_n = 128 if on_gpu else 64
    tiles = triton.cdiv(n, block_n)
    chosen = min(k, tiles)
    two_pass = 4 * chosen * block_n <= n
    width = tiles if two_pass else n
    chunk = max(block_m, SCORE_BUDGET // width // block_m * block_m)
    out_s = torch.empty(nq, k, device=queries.device, dtype=torch.float32)
    out_i = torch.empty(nq, k, device=queries.device, dtype=torch.int64)
    for q0 in range(0, nq, chunk):
        qc = queries[q0:q0 + chunk]
        qinv = qinv_all[q0:q0 + chunk] if cosine else None
        scores = torch.empty(qc.shape[0], width, device=qc.device, dtype=torch.float32)
        _scores(qc, keys, qinv, kinv, scores, two_pass, block_m, block_n)
        if not two_pass:
            s, i = torch.topk(scores, k, dim=1)
            out_s[q0:q0 + chunk], out_i[q0:q0 + chunk] = s, i
            continue
        best_tiles = torch.topk(scores, chosen, dim=1).indices.to(torch.int32)
        cand_s = torch.empty(qc.shape[0], chosen * block_n, device=qc.device, dtype=torch.float32)
        cand_i = torch.empty(qc.shape[0], chosen * block_n, device=qc.device, dtype=torch.int32)
        _rescore_kernel[(qc.shape[0], chosen)](qc, keys, qinv, kinv, best_tiles, cand_s, cand_i, n, dim,
                                               qc.stride(0), keys.stride(0), best_tiles.stride(0), cand_s.stride(0),
                                               COSINE=cosine, BLOCK_N=block_n, BLOCK_D=32,
                                               OFF64=needs_int64(qc, keys), num_warps=4)
        s, j = torch.topk(cand_s, k, dim=1)
        out_s[q0:q0 + chunk] = s
        out_i[q0:q0 + chunk] = torch.gather(cand_i, 1, j).long()
    return out_s, out_i
