"""Triton attention over a paged KV cache: decode (FlashDecoding split-KV) and varlen / paged prefill.

Same layouts and semantics as kernels/ref_attention.py. Softmax runs in fp32 with exp2 (scale folded with
log2(e)); P is cast to V's dtype before the second matmul, as the reference does.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from kernels.triton_launch import dot_precision, needs_int64

LOG2E = 1.4426950408889634
MAX_SPLITS = 64


def _check_head_dims(q: torch.Tensor, k: torch.Tensor, name: str) -> int:
    hq, hkv, d = q.shape[-2], k.shape[-2], q.shape[-1]
    if k.shape[-1] != d:
        raise ValueError(f"{name}: q head_dim {d} != kv head_dim {k.shape[-1]}")
    if k.dtype != q.dtype:
        raise ValueError(f"{name}: q is {q.dtype} but the keys/values are {k.dtype}")
    if hq % hkv:
        raise ValueError(f"{name}: num_q_heads {hq} is not a multiple of num_kv_heads {hkv}")
    if q.stride(-1) != 1 or k.stride(-1) != 1:
        raise ValueError(f"{name}: the head_dim axis must be contiguous")
    return hq // hkv


@triton.jit
def _decode_kernel(q_ptr, k_ptr, v_ptr, bt_ptr, lens_ptr, out_ptr, po_ptr, pm_ptr, pl_ptr, qk_scale,
                   stride_qs, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
                   stride_bts, stride_os, stride_oh, num_q_heads, max_splits,
                   BLOCK_SIZE: tl.constexpr, GROUP: tl.constexpr, BLOCK_G: tl.constexpr, HEAD_DIM: tl.constexpr,
                   BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, PARTITION: tl.constexpr, SPLIT: tl.constexpr,
                   OFF64: tl.constexpr, DOT_PREC: tl.constexpr):
    """PARTITION is a power of two: few compiled variants (as a runtime value it costs ~30% more registers)."""
    seq = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    seq_len = tl.load(lens_ptr + seq)
    start = split * PARTITION
    if start < seq_len:
        end = tl.minimum(start + PARTITION, seq_len)
        offs_g = tl.arange(0, BLOCK_G)
        offs_d = tl.arange(0, BLOCK_D)
        heads = kvh * GROUP + offs_g
        gmask = offs_g < GROUP
        dmask = offs_d < HEAD_DIM
        q = tl.load(q_ptr + seq * stride_qs + heads[:, None] * stride_qh + offs_d[None, :],
                    mask=gmask[:, None] & dmask[None, :], other=0.0)
        m_i = tl.full([BLOCK_G], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_G], tl.float32)
        acc = tl.zeros([BLOCK_G, BLOCK_D], tl.float32)
        for n0 in range(start, end, BLOCK_N):
            pos = n0 + tl.arange(0, BLOCK_N)
            nmask = pos < end
            blk = tl.load(bt_ptr + seq * stride_bts + pos // BLOCK_SIZE, mask=nmask, other=0)
            if OFF64:
                blk = blk.to(tl.int64)
            slot = pos % BLOCK_SIZE
            kv_mask = nmask[:, None] & dmask[None, :]
            # K and V share strides (checked by the wrapper): one offset tile serves both loads.
            kv_off = (blk * stride_kb + slot * stride_kt + kvh * stride_kh)[:, None] + offs_d[None, :]
            k = tl.load(k_ptr + kv_off, mask=kv_mask, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
            s = tl.where(nmask[None, :], s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            alpha = tl.exp2(m_i - m_new)
            p = tl.exp2(s - m_new[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_ptr + kv_off, mask=kv_mask, other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
            m_i = m_new
        omask = gmask[:, None] & dmask[None, :]
        if SPLIT:
            # Unnormalised partials; the reduce kernel merges splits by log-sum-exp.
            row = (seq * num_q_heads + heads) * max_splits + split
            tl.store(po_ptr + row[:, None] * BLOCK_D + offs_d[None, :], acc, mask=omask)
            tl.store(pm_ptr + row, m_i, mask=gmask)
            tl.store(pl_ptr + row, l_i, mask=gmask)
        else:
            out = acc / l_i[:, None]
            tl.store(out_ptr + seq * stride_os + heads[:, None] * stride_oh + offs_d[None, :],
                     out.to(out_ptr.dtype.element_ty), mask=omask)


@triton.jit
def _decode_reduce_kernel(po_ptr, pm_ptr, pl_ptr, lens_ptr, out_ptr, stride_os, stride_oh, num_q_heads, max_splits,
                          HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, PARTITION: tl.constexpr,
                          BLOCK_S: tl.constexpr):
    seq = tl.program_id(0)
    head = tl.program_id(1)
    seq_len = tl.load(lens_ptr + seq)
    nsplit = (seq_len + PARTITION - 1) // PARTITION
    offs_s = tl.arange(0, BLOCK_S)
    offs_d = tl.arange(0, BLOCK_D)
    smask = offs_s < nsplit
    row = (seq * num_q_heads + head) * max_splits + offs_s
    m = tl.load(pm_ptr + row, mask=smask, other=float("-inf"))
    l = tl.load(pl_ptr + row, mask=smask, other=0.0)
    w = tl.where(smask, tl.exp2(m - tl.max(m, 0)), 0.0)
    o = tl.load(po_ptr + row[:, None] * BLOCK_D + offs_d[None, :], mask=smask[:, None], other=0.0)
    out = tl.sum(o * w[:, None], 0) / tl.sum(w * l, 0)
    tl.store(out_ptr + seq * stride_os + head * stride_oh + offs_d, out.to(out_ptr.dtype.element_ty),
             mask=offs_d < HEAD_DIM)


def _num_sms(device: torch.device) -> int:
    return torch.cuda.get_device_properties(device).multi_processor_count if device.type == "cuda" else 1


def _partition(max_len: int, programs: int, device: torch.device, partition_size: int | None) -> int:
    """Keys per split, a power of two. Split only when (seqs x kv heads) leaves SMs idle and contexts are long
    enough to be worth a merge (on an H200, 4 splits of a 64 x 4k batch measured no faster than none), with at
    most MAX_SPLITS partials per head."""
    if partition_size is not None:
        partition = triton.next_power_of_2(max(16, int(partition_size)))
    else:
        want = triton.cdiv(2 * _num_sms(device), programs)
        partition = triton.next_power_of_2(max(256, triton.cdiv(max_len, want)))
    return max(partition, triton.next_power_of_2(triton.cdiv(max_len, MAX_SPLITS)))


def paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale, max_seq_len=None,
                           partition_size=None):
    """FlashDecoding: each (sequence, kv head, split) program covers all GQA query heads of that kv head over
    one partition of the context; with more than one split a second kernel merges partials by log-sum-exp.
    max_seq_len saves a device sync; partition_size forces the split (tests), else it follows the SM count."""
    group = _check_head_dims(q, k_cache, "paged_decode_attention")
    num_seqs, hq, d = q.shape
    block_size, hkv = k_cache.shape[1], k_cache.shape[2]
    out = torch.empty_like(q)
    if num_seqs == 0:
        return out
    max_len = int(seq_lens.max()) if max_seq_len is None else int(max_seq_len)
    block_d = max(16, triton.next_power_of_2(d))
    if v_cache.stride() != k_cache.stride() or v_cache.shape != k_cache.shape:
        raise ValueError("paged_decode_attention: k_cache and v_cache must have the same shape and strides")
    partition = _partition(max_len, num_seqs * hkv, q.device, partition_size)
    splits = max(1, triton.cdiv(max_len, partition))
    split = splits > 1
    if split:
        po = torch.empty(num_seqs * hq * splits, block_d, device=q.device, dtype=torch.float32)
        pm = torch.empty(num_seqs * hq * splits, device=q.device, dtype=torch.float32)
        pl = torch.empty_like(pm)
    else:
        po = pm = pl = out  # unused
    bt = block_tables if block_tables.dtype == torch.int32 else block_tables.to(torch.int32)
    lens = seq_lens if seq_lens.dtype == torch.int32 else seq_lens.to(torch.int32)
    # 32 keys per step at head_dim 128: 128 registers (4 programs per SM) on sm_90 with triton 3.9, 155 on 3.6.
    block_n = 16 if q.device.type != "cuda" else (64 if d <= 64 else 32)
    _decode_kernel[(num_seqs, hkv, splits)](
        q, k_cache, v_cache, bt, lens, out, po, pm, pl, float(scale) * LOG2E,
        q.stride(0), q.stride(1), k_cache.stride(0), k_cache.stride(1), k_cache.stride(2),
        v_cache.stride(0), v_cache.stride(1), v_cache.stride(2), bt.stride(0), out.stride(0), out.stride(1),
        hq, splits,
        BLOCK_SIZE=block_size, GROUP=group, BLOCK_G=max(16, triton.next_power_of_2(group)), HEAD_DIM=d,
        BLOCK_D=block_d, BLOCK_N=block_n, PARTITION=partition, SPLIT=split, OFF64=needs_int64(k_cache, v_cache),
        DOT_PREC=dot_precision(q.dtype),
        num_warps=4, num_stages=2)
    if split:
        _decode_reduce_kernel[(num_seqs, hq)](
            po, pm, pl, lens, out, out.stride(0), out.stride(1), hq, splits,
            HEAD_DIM=d, BLOCK_D=block_d, PARTITION=partition, BLOCK_S=max(2, triton.next_power_of_2(splits)),
            num_warps=4)
    return out


@triton.jit
def _prefill_kernel(q_ptr, k_ptr, v_ptr, out_ptr, cu_q_ptr, cu_k_ptr, lens_ptr, bt_ptr, qk_scale,
                    stride_qt, stride_qh, stride_kb, stride_kt, stride_kh, stride_vb, stride_vt, stride_vh,
                    stride_bts, stride_ot, stride_oh,
                    PAGED: tl.constexpr, CAUSAL: tl.constexpr, BLOCK_SIZE: tl.constexpr, GROUP: tl.constexpr,
                    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr,
                    OFF64: tl.constexpr, DOT_PREC: tl.constexpr):
    mt = tl.program_id(0)
    seq = tl.program_id(1)
    head = tl.program_id(2)
    q_start = tl.load(cu_q_ptr + seq)
    lq = tl.load(cu_q_ptr + seq + 1) - q_start
    if mt * BLOCK_M < lq:
        if PAGED:
            k_start = 0
            lk = tl.load(lens_ptr + seq)
        else:
            k_start = tl.load(cu_k_ptr + seq)
            lk = tl.load(cu_k_ptr + seq + 1) - k_start
        kvh = head // GROUP
        offs_m = mt * BLOCK_M + tl.arange(0, BLOCK_M)
        offs_d = tl.arange(0, BLOCK_D)
        mmask = offs_m < lq
        dmask = offs_d < HEAD_DIM
        q = tl.load(q_ptr + (q_start + offs_m).to(tl.int64)[:, None] * stride_qt + head * stride_qh
                    + offs_d[None, :], mask=mmask[:, None] & dmask[None, :], other=0.0)
        qpos = offs_m + (lk - lq)  # absolute position of each query in its sequence
        n_end = lk
        if CAUSAL:
            n_end = tl.minimum(lk, (mt + 1) * BLOCK_M + lk - lq)
        m_i = tl.full([BLOCK_M], float("-inf"), tl.float32)
        l_i = tl.zeros([BLOCK_M], tl.float32)
        acc = tl.zeros([BLOCK_M, BLOCK_D], tl.float32)
        for n0 in range(0, n_end, BLOCK_N):
            pos = n0 + tl.arange(0, BLOCK_N)
            nmask = pos < n_end
            if PAGED:
                blk = tl.load(bt_ptr + seq * stride_bts + pos // BLOCK_SIZE, mask=nmask, other=0)
                if OFF64:
                    blk = blk.to(tl.int64)
                k_off = blk * stride_kb + (pos % BLOCK_SIZE) * stride_kt
                v_off = blk * stride_vb + (pos % BLOCK_SIZE) * stride_vt
            else:
                row = k_start + pos
                if OFF64:
                    row = row.to(tl.int64)
                k_off = row * stride_kt
                v_off = row * stride_vt
            kv_mask = nmask[:, None] & dmask[None, :]
            k = tl.load(k_ptr + k_off[:, None] + kvh * stride_kh + offs_d[None, :], mask=kv_mask, other=0.0)
            s = tl.dot(q, tl.trans(k), input_precision=DOT_PREC) * qk_scale
            valid = nmask[None, :]
            if CAUSAL:
                valid = valid & (pos[None, :] <= qpos[:, None])
            s = tl.where(valid, s, float("-inf"))
            m_new = tl.maximum(m_i, tl.max(s, 1))
            m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)  # rows with nothing visible yet
            alpha = tl.exp2(m_i - m_safe)
            p = tl.exp2(s - m_safe[:, None])
            l_i = l_i * alpha + tl.sum(p, 1)
            v = tl.load(v_ptr + v_off[:, None] + kvh * stride_vh + offs_d[None, :], mask=kv_mask, other=0.0)
            acc = acc * alpha[:, None] + tl.dot(p.to(v.dtype), v, input_precision=DOT_PREC)
            m_i = m_new
        out = acc / l_i[:, None]
        tl.store(out_ptr + (q_start + offs_m).to(tl.int64)[:, None] * stride_ot + head * stride_oh + offs_d[None, :],
                 out.to(out_ptr.dtype.element_ty), mask=mmask[:, None] & dmask[None, :])


def _launch_prefill(q, k, v, out, cu_q, cu_k, lens, bt, scale, paged, causal, max_seqlen_q):
    group = _check_head_dims(q, k, "prefill_attention")
    num_seqs = cu_q.shape[0] - 1
    if num_seqs <= 0 or q.shape[0] == 0:
        return out
    d = q.shape[-1]
    if max_seqlen_q is None:
        max_seqlen_q = int((cu_q[1:] - cu_q[:-1]).max())
    on_gpu = q.device.type == "cuda"
    block_m = block_n = 64 if on_gpu else 16
    num_warps = 4 if d <= 64 else 8  # head_dim 128 at 4 warps spills registers on sm_90
    grid = (triton.cdiv(max(int(max_seqlen_q), 1), block_m), num_seqs, q.shape[1])
    if paged:
        strides_k = (k.stride(0), k.stride(1), k.stride(2))
        strides_v = (v.stride(0), v.stride(1), v.stride(2))
        block_size, stride_bts = k.shape[1], bt.stride(0)
    else:
        strides_k = (0, k.stride(0), k.stride(1))
        strides_v = (0, v.stride(0), v.stride(1))
        block_size, stride_bts = 1, 0
    _prefill_kernel[grid](
        q, k, v, out, cu_q, cu_k, lens, bt, float(scale) * LOG2E, q.stride(0), q.stride(1), *strides_k, *strides_v,
        stride_bts, out.stride(0), out.stride(1),
        PAGED=paged, CAUSAL=causal, BLOCK_SIZE=block_size, GROUP=group, HEAD_DIM=d,
        BLOCK_D=max(16, triton.next_power_of_2(d)), BLOCK_M=block_m, BLOCK_N=block_n, OFF64=needs_int64(k, v),
        DOT_PREC=dot_precision(q.dtype), num_warps=num_warps, num_stages=2)
    return out


def _i32(x: torch.Tensor) -> torch.Tensor:
    return x if x.dtype == torch.int32 else x.to(torch.int32)


def prefill_attention(q, k, v, cu_seqlens_q, cu_seqlens_k, scale, causal=True, max_seqlen_q=None):
    """Flash-attention over packed sequences: one program per (query tile, sequence, query head)."""
    cu_q, cu_k = _i32(cu_seqlens_q), _i32(cu_seqlens_k)
    return _launch_prefill(q, k, v, torch.empty_like(q), cu_q, cu_k, cu_q, cu_q, scale, False, bool(causal),
                           max_seqlen_q)


def paged_prefill_attention(q, k_cache, v_cache, block_tables, cu_seqlens_q, seq_lens, scale, max_seqlen_q=None):
    """The prefill kernel reading K/V through the block table (chunked prefill, prefix-cache hits)."""
    cu_q = _i32(cu_seqlens_q)
    return _launch_prefill(q, k_cache, v_cache, torch.empty_like(q), cu_q, cu_q, _i32(seq_lens),
                           _i32(block_tables), scale, True, True, max_seqlen_q)
