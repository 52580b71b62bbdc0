"""Paged decode attention in C on the CPU (lp_paged_decode_f32 / _bf16kv in kernels/csrc/cpu_kernels.c):
float32 queries over a float32 or bfloat16 KV cache.

The torch path (kernels.ref_attention) gathers each sequence's blocks into a padded copy before SDPA; on a
2-core CPU that copy was most of attention's time. The C kernel reads the blocks in place, once.
"""

from __future__ import annotations

import torch

from kernels import cpu_native, step_cache

KV_KERNELS = {torch.float32: "lp_paged_decode_f32", torch.bfloat16: "lp_paged_decode_bf16kv"}


def supports(q, k_cache, v_cache, block_tables, seq_lens) -> bool:
    """float32 CPU queries in the shared layout, and caches_supported()."""
    if not (q.stride(2) == 1 and q.stride(1) == q.shape[2] and q.dtype is torch.float32 and q.is_cpu):
        return False
    return caches_supported(q.shape[1], q.shape[2], k_cache, v_cache, block_tables, seq_lens)


def caches_supported(hq: int, d: int, k_cache, v_cache, block_tables, seq_lens) -> bool:
    """hq query heads of d over a float32 or bfloat16 cache, in the shared layout, within the kernel's fixed
    buffer sizes, block ids in range (once per step), auto dispatch, and the library built
    (serving.engine.fused_decode asks this directly: it has no query tensor yet)."""
    if not (k_cache.is_contiguous() and v_cache.is_contiguous()):
        return False
    if k_cache.dtype != v_cache.dtype or k_cache.dtype not in KV_KERNELS or not cpu_native.usable():
        return False
    if not (k_cache.is_cpu and v_cache.is_cpu):
        return False
    lim = cpu_native.limits()
    hkv, bs = k_cache.shape[2], k_cache.shape[1]
    if not (hq % hkv == 0 and hq <= lim["max_heads"] and d <= lim["max_dim"] and bs <= lim["max_block"]):
        return False
    return step_cache.cached("cpu_decode_tables", (block_tables, seq_lens),
                             lambda: _tables_in_range(block_tables, seq_lens, k_cache.shape[0], bs),
                             (k_cache.shape[0], bs))


def _tables_in_range(block_tables, seq_lens, num_blocks: int, block_size: int) -> bool:
    """The C kernel reads without bounds checks: every block it will read must exist (torch would raise)."""
    if seq_lens.numel() == 0:
        return True
    nblocks = (seq_lens.long() + block_size - 1) // block_size
    if int(nblocks.max()) > block_tables.shape[1] or int(seq_lens.min()) < 0:
        return False
    used = torch.arange(block_tables.shape[1])[None, :] < nblocks[:, None]
    ids = block_tables[used]
    return ids.numel() == 0 or (int(ids.min()) >= 0 and int(ids.max()) < num_blocks)


def c_tables(block_tables, seq_lens):
    """Block tables and sequence lengths as the C kernel reads them: int32, rows contiguous."""
    tables = block_tables if block_tables.dtype == torch.int32 and block_tables.stride(1) == 1 \
        else block_tables.to(torch.int32).contiguous()
    return tables, seq_lens.to(torch.int32).contiguous()


def paged_decode_attention(q, k_cache, v_cache, block_tables, seq_lens, scale):
    """As kernels.ref_attention.paged_decode_attention; callers check supports() first."""
    s, hq, d = q.shape
    out = torch.empty((s, hq, d), dtype=q.dtype)
    if s == 0:
        return out
    tables, lens = c_tables(block_tables, seq_lens)
    getattr(cpu_native.lib(), KV_KERNELS[k_cache.dtype])(
        q.data_ptr(), q.stride(0), k_cache.data_ptr(), v_cache.data_ptr(), tables.data_ptr(), tables.stride(0),
        lens.data_ptr(), out.data_ptr(), s, hq, k_cache.shape[2], d, k_cache.shape[1], float(scale),
        cpu_native.threads(s))
    return out
