"""Paged decode / varlen prefill / paged prefill attention: Triton (CPU interpreter, or CUDA) against the torch
reference, and the reference against torch's scaled_dot_product_attention run sequence by sequence."""

import pytest
import torch
import torch.nn.functional as F

from kernels import ref_attention as ref
from kernels.testing import TOLERANCES, case_id, cases, triton_module

CASES = cases()
DEV = CASES[0][0]  # where the Triton kernels run: the interpreter on the CPU, else CUDA


@pytest.fixture(scope="module")
def tri():
    return triton_module("attention")


def _sdpa(q, k, v, scale, causal_offset=None):
    """q [Lq, Hq, D], k/v [Lk, Hkv, D] -> [Lq, Hq, D] in fp32; causal_offset = Lk - Lq (queries are last)."""
    g = q.shape[1] // k.shape[1]
    k = k.repeat_interleave(g, dim=1)
    v = v.repeat_interleave(g, dim=1)
    mask = None
    if causal_offset is not None:
        mask = torch.arange(k.shape[0])[None, :] <= torch.arange(q.shape[0])[:, None] + causal_offset
    out = F.scaled_dot_product_attention(q.transpose(0, 1).float(), k.transpose(0, 1).float(),
                                         v.transpose(0, 1).float(), attn_mask=mask, scale=scale)
    return out.transpose(0, 1)


def _paged_cache(lens, num_kv_heads, head_dim, block_size, dtype, device, gen):
    """Random caches with a shuffled block table; returns caches, block_tables and each sequence's K/V."""
    nblocks = [(n + block_size - 1) // block_size for n in lens]
    total = sum(nblocks) + 3
    k_cache = torch.randn(total, block_size, num_kv_heads, head_dim, generator=gen).to(dtype)
    v_cache = torch.randn(total, block_size, num_kv_heads, head_dim, generator=gen).to(dtype)
    perm = torch.randperm(total, generator=gen)
    tables = torch.zeros(len(lens), max(nblocks), dtype=torch.int32)
    seqs, used = [], 0
    for i, (n, nb) in enumerate(zip(lens, nblocks)):
        ids = perm[used:used + nb]
        used += nb
        tables[i, :nb] = ids.int()
        tables[i, nb:] = perm[-1]  # padding entries hold some valid block id
        seqs.append((k_cache[ids].reshape(-1, num_kv_heads, head_dim)[:n],
                     v_cache[ids].reshape(-1, num_kv_heads, head_dim)[:n]))
    to = dict(device=device)
    return k_cache.to(**to), v_cache.to(**to), tables.to(**to), seqs


# (head_dim, q heads, kv heads, block_size, seq lens): length 1, block boundaries (16, 17), GQA 1/4/8.
DECODE_SHAPES = [
    (64, 4, 4, 16, [1, 16, 17, 50]),
    (128, 8, 2, 8, [33, 1, 64]),
    (64, 8, 1, 16, [31, 2]),
]


def test_reference_decode_matches_sdpa():
    gen = torch.Generator().manual_seed(0)
    d, hq, hkv, bs, lens = DECODE_SHAPES[1]
    kc, vc, bt, seqs = _paged_cache(lens, hkv, d, bs, torch.float32, "cpu", gen)
    q = torch.randn(len(lens), hq, d, generator=gen)
    out = ref.paged_decode_attention(q, kc, vc, bt, torch.tensor(lens, dtype=torch.int32), d ** -0.5)
    for i, (k, v) in enumerate(seqs):
        torch.testing.assert_close(out[i], _sdpa(q[i:i + 1], k, v, d ** -0.5)[0], atol=1e-5, rtol=1e-5)


def test_reference_decode_groups_by_length():
    """More sequences than one DECODE_GROUP, lengths unsorted: every sequence still attends to exactly its own
    context, and a second call with other tables is not served the first call's cached plan."""
    gen = torch.Generator().manual_seed(1)
    lens = [int(n) for n in torch.randint(1, 90, (2 * ref.DECODE_GROUP + 3,), generator=gen)] + [1]
    for trial in range(2):
        kc, vc, bt, seqs = _paged_cache(lens, 2, 64, 16, torch.float32, "cpu", gen)
        q = torch.randn(len(lens), 6, 64, generator=gen)
        out = ref.paged_decode_attention(q, kc, vc, bt, torch.tensor(lens, dtype=torch.int32), 0.125)
        for i, (k, v) in enumerate(seqs):
            torch.testing.assert_close(out[i], _sdpa(q[i:i + 1], k, v, 0.125)[0], atol=1e-5, rtol=1e-5)
        lens = lens[::-1]


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("shape", DECODE_SHAPES, ids=lambda s: f"d{s[0]}-gqa{s[1] // s[2]}-bs{s[3]}")
@pytest.mark.parametrize("partition", [None, 16], ids=["nosplit", "split16"])
def test_paged_decode_matches_reference(tri, case, shape, partition):
    device, dtype = case
    d, hq, hkv, bs, lens = shape
    gen = torch.Generator().manual_seed(1)
    kc, vc, bt, _ = _paged_cache(lens, hkv, d, bs, dtype, device, gen)
    q = torch.randn(len(lens), hq, d, generator=gen).to(dtype).to(device)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=device)
    expected = ref.paged_decode_attention(q.float(), kc.float(), vc.float(), bt, seq_lens, d ** -0.5)
    got = tri.paged_decode_attention(q, kc, vc, bt, seq_lens, d ** -0.5, partition_size=partition)
    assert got.dtype == dtype and got.shape == q.shape
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(got.float(), expected, atol=atol, rtol=rtol)


def test_split_partials_merge_across_uneven_splits(tri):
    """Long context split in 7 partitions next to a 1-token sequence that uses one."""
    gen = torch.Generator().manual_seed(2)
    lens = [100, 1, 47]
    kc, vc, bt, _ = _paged_cache(lens, 2, 64, 16, torch.float32, DEV, gen)
    q = torch.randn(3, 4, 64, generator=gen).to(DEV)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=DEV)
    expected = ref.paged_decode_attention(q, kc, vc, bt, seq_lens, 0.1)
    got = tri.paged_decode_attention(q, kc, vc, bt, seq_lens, 0.1, partition_size=16, max_seq_len=100)
    torch.testing.assert_close(got, expected, atol=1e-4, rtol=1e-4)


def _packed(lens_q, lens_k, hq, hkv, d, dtype, device, gen):
    q = torch.randn(sum(lens_q), hq, d, generator=gen).to(dtype).to(device)
    k = torch.randn(sum(lens_k), hkv, d, generator=gen).to(dtype).to(device)
    v = torch.randn(sum(lens_k), hkv, d, generator=gen).to(dtype).to(device)
    cu = lambda lens: torch.tensor([0] + list(torch.tensor(lens).cumsum(0)), dtype=torch.int32, device=device)
    return q, k, v, cu(lens_q), cu(lens_k)


# Query lengths 1, 16 (a tile), 17 (past a tile) and a chunk shorter than its context.
PREFILL_LENS = ([1, 16, 17, 5], [1, 16, 17, 21])


def test_reference_prefill_matches_sdpa():
    gen = torch.Generator().manual_seed(3)
    lq, lk = PREFILL_LENS
    q, k, v, cq, ck = _packed(lq, lk, 4, 2, 64, torch.float32, "cpu", gen)
    for causal in (True, False):
        out = ref.prefill_attention(q, k, v, cq, ck, 0.125, causal)
        for i in range(len(lq)):
            qs, ks = slice(cq[i], cq[i + 1]), slice(ck[i], ck[i + 1])
            exp = _sdpa(q[qs], k[ks], v[ks], 0.125, lk[i] - lq[i] if causal else None)
            torch.testing.assert_close(out[qs], exp, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("causal", [True, False], ids=["causal", "full"])
@pytest.mark.parametrize("heads", [(4, 4, 64), (8, 2, 128)], ids=["mha-d64", "gqa4-d128"])
def test_prefill_matches_reference(tri, case, causal, heads):
    device, dtype = case
    hq, hkv, d = heads
    gen = torch.Generator().manual_seed(4)
    q, k, v, cq, ck = _packed(*PREFILL_LENS, hq, hkv, d, dtype, device, gen)
    expected = ref.prefill_attention(q.float(), k.float(), v.float(), cq, ck, d ** -0.5, causal)
    got = tri.prefill_attention(q, k, v, cq, ck, d ** -0.5, causal)
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(got.float(), expected, atol=atol, rtol=rtol)


def test_reference_paged_prefill_matches_sdpa():
    gen = torch.Generator().manual_seed(5)
    lens, lq = [20, 7, 33], [4, 7, 1]
    kc, vc, bt, seqs = _paged_cache(lens, 2, 64, 8, torch.float32, "cpu", gen)
    q = torch.randn(sum(lq), 4, 64, generator=gen)
    cq = torch.tensor([0, 4, 11, 12], dtype=torch.int32)
    out = ref.paged_prefill_attention(q, kc, vc, bt, cq, torch.tensor(lens, dtype=torch.int32), 0.125)
    for i, (k, v) in enumerate(seqs):
        qs = slice(cq[i], cq[i + 1])
        torch.testing.assert_close(out[qs], _sdpa(q[qs], k, v, 0.125, lens[i] - lq[i]), atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("shape", [(4, 1, 64, 16), (8, 2, 128, 8)], ids=["gqa4-d64-bs16", "gqa4-d128-bs8"])
def test_paged_prefill_matches_reference(tri, case, shape):
    """Chunks after a cached prefix (prefix-cache hit / chunked prefill), a whole prompt and a single token."""
    device, dtype = case
    hq, hkv, d, bs = shape
    gen = torch.Generator().manual_seed(6)
    lens, lq = [40, 17, 9, 16], [8, 17, 1, 16]
    kc, vc, bt, _ = _paged_cache(lens, hkv, d, bs, dtype, device, gen)
    q = torch.randn(sum(lq), hq, d, generator=gen).to(dtype).to(device)
    cq = torch.tensor([0] + list(torch.tensor(lq).cumsum(0)), dtype=torch.int32, device=device)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=device)
    expected = ref.paged_prefill_attention(q.float(), kc.float(), vc.float(), bt, cq, seq_lens, d ** -0.5)
    got = tri.paged_prefill_attention(q, kc, vc, bt, cq, seq_lens, d ** -0.5)
    atol, rtol = TOLERANCES[dtype]
    torch.testing.assert_close(got.float(), expected, atol=atol, rtol=rtol)


def test_rejects_heads_that_do_not_group(tri):
    q = torch.randn(2, 6, 64)
    cache = torch.randn(4, 16, 4, 64)
    with pytest.raises(ValueError, match="multiple of num_kv_heads"):
        tri.paged_decode_attention(q, cache, cache, torch.zeros(2, 1, dtype=torch.int32),
                                   torch.ones(2, dtype=torch.int32), 0.1)


def test_split_count_is_capped_for_very_long_contexts(tri, monkeypatch):
    """More partitions than MAX_SPLITS asked for: the partition grows instead, and the result is unchanged."""
    monkeypatch.setattr(tri, "MAX_SPLITS", 2)
    gen = torch.Generator().manual_seed(7)
    lens = [90, 33]
    kc, vc, bt, _ = _paged_cache(lens, 1, 64, 16, torch.float32, DEV, gen)
    q = torch.randn(2, 2, 64, generator=gen).to(DEV)
    seq_lens = torch.tensor(lens, dtype=torch.int32, device=DEV)
    got = tri.paged_decode_attention(q, kc, vc, bt, seq_lens, 0.125, partition_size=16)
    torch.testing.assert_close(got, ref.paged_decode_attention(q, kc, vc, bt, seq_lens, 0.125), atol=1e-4, rtol=1e-4)
