"""The C decode-attention kernel for the CPU (kernels.cpu_attention): against torch's SDPA run sequence by
sequence, routed to by auto dispatch for float32 CPU tensors only, and a machine without a C compiler falls
back to the torch path with a warning."""

import os
import subprocess
import sys

import pytest
import torch

import kernels
from kernels import cpu_attention, dispatch, ref_attention
from tests.test_kernels_attention import _paged_cache, _sdpa


@pytest.fixture(autouse=True)
def _auto_backend(monkeypatch):
    monkeypatch.delenv("LORAPLEX_KERNELS", raising=False)
    dispatch.set_backend("auto")
    yield
    dispatch.set_backend("auto")


def test_kernel_builds_here():
    """CI machines have gcc: the kernel must build, or every CPU test below would only exercise the fallback."""
    assert cpu_attention.available(), cpu_attention.status()
    assert cpu_attention.status().startswith("C decode attention")


# (head_dim, q heads, kv heads, block_size, seq lens): SmolLM2's 9/3 heads, MHA, GQA 8, an odd head_dim, a
# block size of 32; lengths of 1, exactly a block, one past it, and long contexts over many blocks.
SHAPES = [
    (64, 9, 3, 16, [1, 16, 17, 200, 5]),
    (64, 4, 4, 16, [33, 1, 64]),
    (128, 8, 1, 8, [70, 2, 8, 9]),
    (80, 6, 2, 32, [31, 32, 33, 100]),
]


@pytest.mark.parametrize("shape", SHAPES, ids=lambda s: f"d{s[0]}-h{s[1]}x{s[2]}-bs{s[3]}")
def test_decode_matches_sdpa(shape):
    d, hq, hkv, bs, lens = shape
    gen = torch.Generator().manual_seed(11)
    kc, vc, bt, seqs = _paged_cache(lens, hkv, d, bs, torch.float32, "cpu", gen)
    # q as the engine passes it: a slice of the fused q/k heads, rows strided past the k heads
    q = torch.randn(len(lens), hq + hkv, d, generator=gen)[:, :hq]
    assert cpu_attention.supports(q, kc, vc)
    out = cpu_attention.paged_decode_attention(q, kc, vc, bt, torch.tensor(lens, dtype=torch.int32), d ** -0.5)
    for i, (k, v) in enumerate(seqs):
        torch.testing.assert_close(out[i], _sdpa(q[i:i + 1], k, v, d ** -0.5)[0], atol=2e-5, rtol=2e-5)


def test_extreme_scores_stay_finite():
    """Scores spanning thousands of units: the online softmax must rescale, not overflow or divide 0 by 0."""
    gen = torch.Generator().manual_seed(12)
    lens = [90, 3]
    kc, vc, bt, seqs = _paged_cache(lens, 2, 64, 16, torch.float32, "cpu", gen)
    kc *= 50
    q = torch.randn(2, 4, 64, generator=gen) * 50
    out = cpu_attention.paged_decode_attention(q, kc, vc, bt, torch.tensor(lens, dtype=torch.int32), 0.125)
    assert torch.isfinite(out).all()
    for i, (k, v) in enumerate(seqs):
        torch.testing.assert_close(out[i], _sdpa(q[i:i + 1], k * 50, v, 0.125)[0], atol=1e-4, rtol=1e-4)


def test_auto_dispatch_uses_it_for_float32_cpu_only(monkeypatch):
    calls = []
    real = cpu_attention.paged_decode_attention
    monkeypatch.setattr(cpu_attention, "paged_decode_attention", lambda *a: calls.append(1) or real(*a))
    gen = torch.Generator().manual_seed(13)
    lens = [20, 7]
    kc, vc, bt, _ = _paged_cache(lens, 2, 64, 16, torch.float32, "cpu", gen)
    q, seq_lens = torch.randn(2, 4, 64, generator=gen), torch.tensor(lens, dtype=torch.int32)
    out = kernels.paged_decode_attention(q, kc, vc, bt, seq_lens, 0.125)
    assert calls == [1]
    torch.testing.assert_close(out, ref_attention.paged_decode_attention(q, kc, vc, bt, seq_lens, 0.125),
                               atol=1e-5, rtol=1e-5)
    kernels.paged_decode_attention(q.bfloat16(), kc.bfloat16(), vc.bfloat16(), bt, seq_lens, 0.125)
    assert calls == [1]  # bf16: the torch path
    kernels.set_backend("torch")  # forcing torch means the pure torch path
    kernels.paged_decode_attention(q, kc, vc, bt, seq_lens, 0.125)
    assert calls == [1]


def test_without_a_compiler_the_torch_path_runs(tmp_path):
    """CC pointing at nothing and a fresh data dir: the build fails once, is logged, and decode still works."""
    code = ("import logging, torch, kernels\n"
            "from kernels import cpu_attention\n"
            "logging.basicConfig(level=logging.WARNING)\n"
            "print(kernels.prepare(torch.device('cpu'), torch.float32))\n"
            "assert not cpu_attention.available()\n"
            "q, kc = torch.randn(1, 2, 8), torch.randn(2, 4, 1, 8)\n"
            "out = kernels.paged_decode_attention(q, kc, kc, torch.tensor([[1]], dtype=torch.int32),\n"
            "                                     torch.tensor([3], dtype=torch.int32), 0.3)\n"
            "assert torch.isfinite(out).all()\n")
    env = dict(os.environ, CC=str(tmp_path / "no-such-cc"), LORAPLEX_HOME=str(tmp_path / "home"))
    env.pop("LORAPLEX_KERNELS", None)
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "torch decode attention (C kernel unavailable" in res.stdout
    assert "C decode-attention kernel unavailable, using the torch path" in res.stderr
    assert not list((tmp_path / "home" / "kernels").glob("*.so"))
