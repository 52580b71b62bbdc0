"""Triton fused retrieval scoring: each program scores a [queries x keys] tile and keeps only the tile's top-k,
so the full [q, n] score matrix never reaches memory; torch.topk then merges the per-tile candidates.

Per-tile selection packs (score, key id) into one int64 (an order-preserving integer image of the fp32 score
in the high half, the id in the low half) because tl.topk returns values, not indices.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.ref_topk import check_topk_args

CANDIDATE_BUDGET = 1 << 26  # candidate (score, id) pairs held at once; queries are chunked to stay under it


@triton.jit
def _topk_tile_kernel(q_ptr, k_ptr, out_s_ptr, out_i_ptr, nq, n, dim, stride_q, stride_k, stride_out,
                      COSINE: tl.constexpr, SELECT: tl.constexpr, KK: tl.constexpr, BLOCK_M: tl.constexpr,
                      BLOCK_N: tl.constexpr, BLOCK_D: tl.constexpr, DOT_PREC: tl.constexpr):
    pid_m = tl.program_id(0)
    pid_n = tl.program_id(1)
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    mmask = offs_m < nq
    nmask = offs_n < n
    acc = tl.zeros([BLOCK_M, BLOCK_N], tl.float32)
    qn = tl.zeros([BLOCK_M], tl.float32)
    kn = tl.zeros([BLOCK_N], tl.float32)
    for d0 in range(0, dim, BLOCK_D):
        dmask = (d0 + offs_d) < dim
        q = tl.load(q_ptr + offs_m.to(tl.int64)[:, None] * stride_q + (d0 + offs_d)[None, :],
                    mask=mmask[:, None] & dmask[None, :], other=0.0)
        k = tl.load(k_ptr + offs_n.to(tl.int64)[:, None] * stride_k + (d0 + offs_d)[None, :],
                    mask=nmask[:, None] & dmask[None, :], other=0.0)
        acc += tl.dot(q, tl.trans(k), input_precision=DOT_PREC)
        if COSINE:
            qf = q.to(tl.float32)
            kf = k.to(tl.float32)
            qn += tl.sum(qf * qf, 1)
            kn += tl.sum(kf * kf, 1)
    if COSINE:
        acc = acc / (tl.maximum(tl.sqrt(qn), 1e-12)[:, None] * tl.maximum(tl.sqrt(kn), 1e-12)[None, :])
    acc = tl.where(nmask[None, :], acc, float("-inf"))
    if SELECT:
        bits = acc.to(tl.int32, bitcast=True)
        key = tl.where(bits >= 0, bits, bits ^ 0x7FFFFFFF)  # signed-int order == float order
        packed = (key.to(tl.int64) << 32) | offs_n.to(tl.int64)[None, :]
        top = tl.topk(packed, KK, dim=1)  # [BLOCK_M, KK], best first
        hi = (top >> 32).to(tl.int32)
        scores = tl.where(hi >= 0, hi, hi ^ 0x7FFFFFFF).to(tl.float32, bitcast=True)
        ids = (top & 0x7FFFFFFF).to(tl.int32)
        offs_c = pid_n * KK + tl.arange(0, KK)
        ptrs = offs_m.to(tl.int64)[:, None] * stride_out + offs_c[None, :]
        tl.store(out_s_ptr + ptrs, scores, mask=mmask[:, None])
        tl.store(out_i_ptr + ptrs, ids, mask=mmask[:, None])
    else:
        ptrs = offs_m.to(tl.int64)[:, None] * stride_out + offs_n[None, :]
        tl.store(out_s_ptr + ptrs, acc, mask=mmask[:, None])
        tl.store(out_i_ptr + ptrs, tl.broadcast_to(offs_n[None, :], [BLOCK_M, BLOCK_N]), mask=mmask[:, None])


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
    # One query tile covers up to 64 queries so each key is read once for typical retrieval batches.
    block_m = min(64, max(16, triton.next_power_of_2(nq))) if on_gpu else 16
    block_n = 128 if on_gpu else 64
    block_d = 32  # 64 spills registers on sm_90 at a 64x128 tile (see tests/test_kernels_compile.py)
    kk = triton.next_power_of_2(k)
    select = kk < block_n
    width = kk if select else block_n
    tiles = triton.cdiv(n, block_n)
    chunk = max(block_m, CANDIDATE_BUDGET // (tiles * width) // block_m * block_m)
    out_s = torch.empty(nq, k, device=queries.device, dtype=torch.float32)
    out_i = torch.empty(nq, k, device=queries.device, dtype=torch.int64)
    for q0 in range(0, nq, chunk):
        qc = queries[q0:q0 + chunk]
        cand_s = torch.empty(qc.shape[0], tiles * width, device=qc.device, dtype=torch.float32)
        cand_i = torch.empty(qc.shape[0], tiles * width, device=qc.device, dtype=torch.int32)
        grid = (triton.cdiv(qc.shape[0], block_m), tiles)
        _topk_tile_kernel[grid](qc, keys, cand_s, cand_i, qc.shape[0], n, dim, qc.stride(0), keys.stride(0),
                                cand_s.stride(0), COSINE=metric == "cosine", SELECT=select, KK=kk,
                                BLOCK_M=block_m, BLOCK_N=block_n, BLOCK_D=block_d,
                                DOT_PREC="ieee" if queries.dtype == torch.float32 else "tf32",
                                num_warps=8 if on_gpu else 4)
        s, j = torch.topk(cand_s, k, dim=1)
        out_s[q0:q0 + chunk] = s
        out_i[q0:q0 + chunk] = torch.gather(cand_i, 1, j).long()
    return out_s, out_i
