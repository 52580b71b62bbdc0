"""Top-k retrieval scoring: the chunked torch reference against FAISS IndexFlatIP and a full torch.topk, and the
Triton kernel (CPU interpreter, or CUDA) against the reference."""

import faiss
import numpy as np
import pytest
import torch

from kernels import ref_topk as ref
from kernels.testing import TOLERANCES, case_id, cases, triton_module

CASES = cases()


@pytest.fixture(scope="module")
def tri():
    return triton_module("topk")


def _data(nq, n, d, gen):
    return torch.randn(nq, d, generator=gen), torch.randn(n, d, generator=gen)


@pytest.mark.parametrize("metric", ["ip", "cosine"])
def test_reference_matches_faiss_flat_ip(metric):
    q, keys = _data(7, 1000, 24, torch.Generator().manual_seed(0))
    if metric == "cosine":
        qn, kn = q / q.norm(dim=1, keepdim=True), keys / keys.norm(dim=1, keepdim=True)
    else:
        qn, kn = q, keys
    index = faiss.IndexFlatIP(24)
    index.add(kn.numpy())
    f_scores, f_ids = index.search(qn.numpy(), 25)
    scores, ids = ref.topk_scores(q, keys, 25, metric, chunk=128)  # 8 chunks, the last one partial
    np.testing.assert_allclose(scores.numpy(), f_scores, atol=1e-4, rtol=1e-4)
    assert np.array_equal(ids.numpy(), f_ids)


def test_reference_chunked_equals_full_topk_and_clamps_k():
    q, keys = _data(3, 50, 8, torch.Generator().manual_seed(1))
    s_full, i_full = torch.topk(q @ keys.T, 50, dim=1)
    scores, ids = ref.topk_scores(q, keys, 1024, "ip", chunk=16)  # k > n: all keys, best first
    assert scores.shape == (3, 50)
    torch.testing.assert_close(scores, s_full)
    assert torch.equal(ids, i_full)


def _check(tri_out, queries, keys, k, metric, dtype):
    """Scores match the reference's; each returned id really has the score returned for it; no id repeats."""
    scores, ids = tri_out
    exp_scores, _ = ref.topk_scores(queries.float(), keys.float(), k, metric)
    assert scores.shape == exp_scores.shape and ids.dtype == torch.int64
    atol, rtol = TOLERANCES[torch.float32 if dtype == torch.float32 else torch.float16]
    torch.testing.assert_close(scores, exp_scores, atol=atol, rtol=rtol)
    q, kk = queries.float(), keys.float()
    if metric == "cosine":
        q, kk = q / q.norm(dim=1, keepdim=True), kk / kk.norm(dim=1, keepdim=True)
    rescored = torch.gather(q @ kk.T, 1, ids)
    torch.testing.assert_close(rescored, scores, atol=atol, rtol=rtol)
    assert all(len(set(row)) == len(row) for row in ids.tolist())


# k = 1, 10 (per-tile selection), 100 (whole tiles kept on the CPU's 64-key tiles); n not a tile multiple.
@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("k,metric", [(1, "ip"), (10, "ip"), (10, "cosine"), (100, "cosine")])
def test_topk_matches_reference(tri, case, k, metric):
    device, dtype = case
    q, keys = _data(5, 203, 40, torch.Generator().manual_seed(2))
    q, keys = q.to(dtype).to(device), keys.to(dtype).to(device)
    _check(tri.topk_scores(q, keys, k, metric), q, keys, k, metric, dtype)


@pytest.mark.parametrize("case", CASES, ids=case_id)
@pytest.mark.parametrize("k,metric", [(1, "ip"), (10, "ip"), (10, "cosine")])
def test_two_pass_topk_finds_keys_clustered_in_one_tile(tri, case, k, metric):
    """n large against k x tile: the tile-maximum pass then a rescore of each query's k best tiles. Query 0's
    true top-k sit side by side in one tile, so nine of its chosen tiles hold none of them."""
    device, dtype = case
    q, keys = _data(5, 6000, 40, torch.Generator().manual_seed(4))
    keys[200:200 + k] = 4 * q[0] + 0.01 * torch.randn(k, 40, generator=torch.Generator().manual_seed(5))
    q, keys = q.to(dtype).to(device), keys.to(dtype).to(device)
    scores, ids = tri.topk_scores(q, keys, k, metric)
    _check((scores, ids), q, keys, k, metric, dtype)
    assert sorted(ids[0].tolist()) == list(range(200, 200 + k))


def test_topk_more_queries_than_a_tile_and_k_above_n(tri):
    q, keys = (t.to(CASES[0][0]) for t in _data(19, 70, 16, torch.Generator().manual_seed(3)))
    scores, ids = tri.topk_scores(q, keys, 1024, "ip")
    assert scores.shape == (19, 70)
    exp_scores, exp_ids = torch.topk(q @ keys.T, 70, dim=1)
    torch.testing.assert_close(scores, exp_scores, atol=1e-4, rtol=1e-4)
    assert torch.equal(ids, exp_ids)


@pytest.mark.parametrize("impl", ["ref", "triton"])
def test_bad_arguments_are_named(tri, impl):
    mod = ref if impl == "ref" else tri
    q, keys = torch.randn(2, 8), torch.randn(10, 8)
    with pytest.raises(ValueError, match="metric"):
        mod.topk_scores(q, keys, 3, "l2")
    with pytest.raises(ValueError, match="k must be"):
        mod.topk_scores(q, keys, 0)
    with pytest.raises(ValueError, match="queries"):
        mod.topk_scores(q, torch.randn(10, 9), 3)
