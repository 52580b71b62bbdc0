"""The C kernels for the CPU (kernels/csrc/cpu_kernels.c): decode attention against torch's SDPA run sequence
by sequence, RMSNorm / SwiGLU / rotary against their torch references (HF's formulas), routed to by auto dispatch
for float32 CPU tensors only; a machine without a C compiler falls back to the torch paths with a warning."""

import os
import subprocess
import sys

import pytest
import torch

import kernels
from kernels import cpu_attention, cpu_lora, cpu_native, cpu_ops, dispatch, ref_attention, ref_lora, ref_ops
from tests.test_kernels_attention import _paged_cache, _sdpa


@pytest.fixture(autouse=True)
def _auto_backend(monkeypatch):
    monkeypatch.delenv("LORAPLEX_KERNELS", raising=False)
    dispatch.set_backend("auto")
    yield
    dispatch.set_backend("auto")


def _spy(monkeypatch, module, name) -> list:
    """Wrap module.name so each call appends to the returned list (which path dispatch took)."""
    calls, real = [], getattr(module, name)
    monkeypatch.setattr(module, name, lambda *a: calls.append(1) or real(*a))
    return calls


def test_kernel_builds_here():
    """CI machines have gcc: the kernel must build, or every CPU test below would only exercise the fallback."""
    assert cpu_native.available(), cpu_native.status()
    assert cpu_native.status().startswith("C kernels")


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
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    assert cpu_attention.supports(q, kc, vc, bt, seq_lens)
    out = cpu_attention.paged_decode_attention(q, kc, vc, bt, seq_lens, d ** -0.5)
    for i, (k, v) in enumerate(seqs):
        torch.testing.assert_close(out[i], _sdpa(q[i:i + 1], k, v, d ** -0.5)[0], atol=2e-5, rtol=2e-5)


# heads of 64 over a bf16 cache take their own kernel (groups of 1, 3, 4 and 8 heads; blocks over 16 tokens)
BF16_SHAPES = SHAPES + [(64, 8, 2, 32, [40, 32, 7]), (64, 16, 2, 16, [50, 3])]


@pytest.mark.parametrize("shape", BF16_SHAPES, ids=lambda s: f"d{s[0]}-h{s[1]}x{s[2]}-bs{s[3]}")
def test_decode_over_a_bf16_cache_matches_sdpa(shape):
    """dtype bfloat16 on the CPU: float32 queries over a bfloat16 KV cache, widened as read; SDPA on the same
    bf16 values in float32 is the reference."""
    d, hq, hkv, bs, lens = shape
    gen = torch.Generator().manual_seed(14)
    kc, vc, bt, seqs = _paged_cache(lens, hkv, d, bs, torch.float32, "cpu", gen)
    kc, vc = kc.bfloat16(), vc.bfloat16()
    q = torch.randn(len(lens), hq, d, generator=gen)
    seq_lens = torch.tensor(lens, dtype=torch.int32)
    assert cpu_attention.supports(q, kc, vc, bt, seq_lens)
    out = cpu_attention.paged_decode_attention(q, kc, vc, bt, seq_lens, d ** -0.5)
    for i, (k, v) in enumerate(seqs):
        ref = _sdpa(q[i:i + 1], k.bfloat16().float(), v.bfloat16().float(), d ** -0.5)[0]
        torch.testing.assert_close(out[i], ref, atol=2e-5, rtol=2e-5)
    assert not cpu_attention.supports(q.bfloat16(), kc, vc, bt, seq_lens)  # bf16 queries: the torch path


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


def test_auto_dispatch_uses_it_for_float32_queries_on_the_cpu(monkeypatch):
    calls = _spy(monkeypatch, cpu_attention, "paged_decode_attention")
    gen = torch.Generator().manual_seed(13)
    lens = [20, 7]
    kc, vc, bt, _ = _paged_cache(lens, 2, 64, 16, torch.float32, "cpu", gen)
    q, seq_lens = torch.randn(2, 4, 64, generator=gen), torch.tensor(lens, dtype=torch.int32)
    out = kernels.paged_decode_attention(q, kc, vc, bt, seq_lens, 0.125)
    assert calls == [1]
    torch.testing.assert_close(out, ref_attention.paged_decode_attention(q, kc, vc, bt, seq_lens, 0.125),
                               atol=1e-5, rtol=1e-5)
    kernels.paged_decode_attention(q.bfloat16(), kc.bfloat16(), vc.bfloat16(), bt, seq_lens, 0.125)
    assert calls == [1]  # bf16 queries: the torch path
    kernels.paged_decode_attention(q, kc.bfloat16(), vc.bfloat16(), bt, seq_lens, 0.125)
    assert calls == [1, 1]  # float32 queries over a bf16 cache: C
    kernels.set_backend("torch")  # forcing torch means the pure torch path
    kernels.paged_decode_attention(q, kc, vc, bt, seq_lens, 0.125)
    assert calls == [1, 1]


def test_without_a_compiler_the_torch_path_runs(tmp_path):
    """CC pointing at nothing and a fresh data dir: the build fails once, is logged, and decode still works."""
    code = ("import logging, torch, kernels\n"
            "from kernels import cpu_native\n"
            "logging.basicConfig(level=logging.WARNING)\n"
            "print(kernels.prepare(torch.device('cpu'), torch.float32))\n"
            "assert not cpu_native.available()\n"
            "q, kc = torch.randn(1, 2, 8), torch.randn(2, 4, 1, 8)\n"
            "out = kernels.paged_decode_attention(q, kc, kc, torch.tensor([[1]], dtype=torch.int32),\n"
            "                                     torch.tensor([3], dtype=torch.int32), 0.3)\n"
            "assert torch.isfinite(out).all()\n")
    env = dict(os.environ, CC=str(tmp_path / "no-such-cc"), LORAPLEX_HOME=str(tmp_path / "home"))
    env.pop("LORAPLEX_KERNELS", None)
    env.pop("LORAPLEX_KERNEL_CACHE", None)  # build (or fail to) in this data dir, not the session's shared cache
    res = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True, timeout=120)
    assert res.returncode == 0, res.stderr
    assert "torch (C kernels unavailable" in res.stdout
    assert "C CPU kernels unavailable, using the torch paths" in res.stderr
    assert not list((tmp_path / "home" / "kernels").glob("*.so"))


@pytest.mark.parametrize("rows", [1, 7, 300], ids=lambda n: f"rows{n}")  # 300 x 576 crosses the threading cutoff
def test_rms_norm_with_and_without_residual(rows):
    gen = torch.Generator().manual_seed(14)
    x = torch.randn(rows, 576, generator=gen) * 3
    w = torch.randn(576, generator=gen)
    assert cpu_ops.ok_rms_norm(x, w, None)
    out, h = cpu_ops.rms_norm(x, w, 1e-5)
    ref_out, _ = ref_ops.rms_norm(x, w, 1e-5)
    assert h is x
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)
    residual = torch.randn(rows, 576, generator=gen)
    expected_h = residual + x
    ref_out, _ = ref_ops.rms_norm(x, w, 1e-5, residual.clone())
    out, h = cpu_ops.rms_norm(x, w, 1e-5, residual)
    assert h is residual  # added in place
    torch.testing.assert_close(h, expected_h, atol=1e-6, rtol=1e-6)
    torch.testing.assert_close(out, ref_out, atol=1e-5, rtol=1e-5)


def test_silu_and_mul():
    gen = torch.Generator().manual_seed(15)
    gu = torch.randn(40, 2 * 1536, generator=gen) * 4
    assert cpu_ops.ok_silu_and_mul(gu)
    torch.testing.assert_close(cpu_ops.silu_and_mul(gu), ref_ops.silu_and_mul(gu), atol=1e-5, rtol=1e-5)
    assert not cpu_ops.ok_silu_and_mul(gu[:, :3071])  # odd width: no gate/up halves
    # saturated gates, wide enough for the vectorised loop: exp(100) overflows, the result must not be NaN
    gu = torch.tensor([-100.0, -89.0, -80.0, 0.0, 89.0, 100.0]).repeat(2, 64)
    torch.testing.assert_close(cpu_ops.silu_and_mul(gu), ref_ops.silu_and_mul(gu), atol=1e-6, rtol=1e-5)


def test_rotary_in_place_on_strided_heads():
    """As the engine calls it: the q and k heads of a fused qkv row (v after them must stay untouched)."""
    gen = torch.Generator().manual_seed(16)
    t, hq, hkv, d = 5, 9, 3, 64
    qkv = torch.randn(t, (hq + 2 * hkv) * d, generator=gen)
    v_before = qkv[:, (hq + hkv) * d:].clone()
    qk = qkv[:, :(hq + hkv) * d].reshape(t, hq + hkv, d)
    angles = torch.rand(t, d // 2, generator=gen) * 50
    cos, sin = torch.cat([angles.cos()] * 2, dim=1), torch.cat([angles.sin()] * 2, dim=1)
    expected = ref_ops.rotary(qk.clone(), cos, sin)
    assert cpu_ops.ok_rotary(qk, cos, sin)
    out = cpu_ops.rotary(qk, cos, sin)
    assert out.data_ptr() == qk.data_ptr()
    torch.testing.assert_close(out, expected, atol=1e-5, rtol=1e-5)
    assert torch.equal(qkv[:, (hq + hkv) * d:], v_before)


def test_dispatch_routes_element_wise_ops(monkeypatch):
    x, w = torch.randn(4, 64), torch.randn(64)
    calls = _spy(monkeypatch, cpu_ops, "rms_norm")
    kernels.rms_norm(x, w, 1e-6)
    assert calls == [1]
    kernels.rms_norm(x.double(), w.double(), 1e-6)  # not float32: the reference
    kernels.rms_norm(x.reshape(4, 2, 32), w[:32], 1e-6)  # 3-D (Qwen3's per-head q/k norm): the reference
    kernels.set_backend("torch")
    kernels.rms_norm(x, w, 1e-6)
    assert calls == [1]


def _lora_case(gen, token_slots, slots=8, r_max=16, r=12, h_in=96, outs=(96, 32, 32), rank_major=False):
    """Stacked slot buffers sliced as the engine slices them (first r ranks; B rank-major as the engine keeps it
    on the CPU, or out-major as on CUDA), outputs as column views of one fused projection output (q/k/v)."""
    t = len(token_slots)
    a_full = [torch.randn(slots, r_max, h_in, generator=gen) for _ in outs]
    if rank_major:
        b_sliced = [torch.randn(slots, r_max, o, generator=gen)[:, :r].transpose(1, 2) for o in outs]
    else:
        b_sliced = [torch.randn(slots, o, r_max, generator=gen)[:, :, :r] for o in outs]
    x = torch.randn(t, h_in, generator=gen)
    fused = torch.randn(t, sum(outs), generator=gen)
    return x, [a[:, :r] for a in a_full], b_sliced, \
        torch.tensor(token_slots, dtype=torch.int32), fused, _columns(fused, outs)


def _columns(fused, outs):
    cols = torch.tensor([0, *outs]).cumsum(0).tolist()
    return [fused[:, cols[i]:cols[i + 1]] for i in range(len(outs))]


@pytest.mark.parametrize("rank_major", [False, True], ids=["b-out-major", "b-rank-major"])
def test_lora_apply_matches_reference_on_decode_batches(rank_major):
    """Unordered slots, base tokens (-1), a slot with several tokens, ranks sliced below r_max."""
    gen = torch.Generator().manual_seed(17)
    token_slots = [3, -1, 0, 7, 3, 5, -1, 1, 2, 6, 4, 3]
    x, a, b, tl, fused, ys = _lora_case(gen, token_slots, rank_major=rank_major)
    expected = fused.clone()
    ref_lora.lora_apply(x, a, b, tl, _columns(expected, [y.shape[1] for y in ys]))
    assert cpu_lora.ok(x, a, b, tl, ys, 1.0)
    cpu_lora.lora_apply(x, a, b, tl, ys)
    torch.testing.assert_close(fused, expected, atol=1e-4, rtol=1e-5)
    before = _lora_case(torch.Generator().manual_seed(17), token_slots, rank_major=rank_major)[4]
    assert torch.equal(fused[1], before[1]) and torch.equal(fused[6], before[6])  # base tokens untouched
    assert not torch.allclose(fused[0], before[0])


def test_lora_apply_with_bfloat16_weights_matches_reference():
    """lora_dtype bfloat16: the C kernel widens the stored bf16 weights; the reference upcasts them first."""
    gen = torch.Generator().manual_seed(20)
    x, a, b, tl, fused, ys = _lora_case(gen, [3, -1, 0, 3, 5, 1], rank_major=True)
    a16, b16 = [t.bfloat16() for t in a], [t.bfloat16() for t in b]
    b16 = [t.transpose(1, 2).contiguous().transpose(1, 2) for t in b16]  # keep B rank-major, as the engine does
    expected = fused.clone()
    ref_lora.lora_apply(x, a16, b16, tl, _columns(expected, [y.shape[1] for y in ys]))
    assert cpu_lora.ok(x, a16, b16, tl, ys, 1.0)
    cpu_lora.lora_apply(x, a16, b16, tl, ys)
    torch.testing.assert_close(fused, expected, atol=1e-4, rtol=1e-5)


def _group_case(gen, token_slots, rank_major=True):
    x, a, b, tl, fused, ys = _lora_case(gen, token_slots, rank_major=rank_major)
    outs = torch.tensor([0, *(y.shape[1] for y in ys)]).cumsum(0).tolist()
    return x, a, b, tl, fused, [slice(lo, hi) for lo, hi in zip(outs, outs[1:])]


def _expected(x, a, b, tl, fused, columns):
    expected = fused.clone()
    ref_lora.lora_apply(x, a, b, tl, [expected[:, c] for c in columns])
    return expected


@pytest.mark.parametrize("rank_major", [False, True], ids=["b-out-major", "b-rank-major"])
def test_lora_group_matches_reference_step_after_step(monkeypatch, rank_major):
    """A bound group (as the engine keeps one per layer and module group) over several steps: decode steps go to
    C, a prefill-shaped step to the general path, slots refilled in place between steps are read afresh."""
    gen = torch.Generator().manual_seed(22)
    x, a, b, tl, fused, columns = _group_case(gen, [2, 0, -1, 1, 3], rank_major)
    group = kernels.lora_group(a, b, columns)
    assert isinstance(group, cpu_lora.Group)
    c_calls = _spy(monkeypatch, cpu_lora._Weights, "run")
    prefill = cpu_lora.MAX_C_RUN + 3
    steps = [(x, tl, fused), (x, torch.tensor([3, 1, 0, -1, 2], dtype=torch.int32), fused),
             (x, torch.tensor([1] * 5, dtype=torch.int32), fused),  # one adapter for the whole batch
             (torch.randn(prefill, x.shape[1], generator=gen), torch.tensor([1] * prefill, dtype=torch.int32),
              torch.randn(prefill, fused.shape[1], generator=gen))]  # a long run (prefill)
    for i, (xs, step, out) in enumerate(steps):
        expected = _expected(xs, a, b, step, out, columns)
        assert group(xs, step, out) is out
        torch.testing.assert_close(out, expected, atol=1e-4, rtol=1e-5)
        assert len(c_calls) == (i + 1 if rank_major else min(i + 1, 3))  # long runs: C needs B rank-major
        for t in (*a, *b):
            t[1].copy_(torch.randn(t[1].shape, generator=gen))  # slot 1 takes another adapter


def test_lora_group_sends_what_c_does_not_take_to_the_general_path(monkeypatch):
    gen = torch.Generator().manual_seed(23)
    x, a, b, tl, fused, columns = _group_case(gen, [2, 0, 1, 3])
    group = kernels.lora_group(a, b, columns)
    c_calls = _spy(monkeypatch, cpu_lora._Weights, "run")
    with pytest.raises(IndexError):  # a slot out of range never reaches C: the reference raises
        group(x, torch.tensor([2, 0, 8, 3], dtype=torch.int32), fused)
    with pytest.raises(ValueError, match="lora_apply"):  # an output too narrow for the columns
        group(x, tl, fused[:, :-1])
    kernels.set_backend("torch")  # forced after binding: honoured from the next step (a new slot vector) on
    tl = tl.clone()
    expected = _expected(x, a, b, tl, fused, columns)
    group(x, tl, fused)
    torch.testing.assert_close(fused, expected, atol=1e-4, rtol=1e-5)
    assert c_calls == []
    kernels.set_backend("auto")
    group(x, tl.clone(), fused)
    assert c_calls == [1]
    wrong = columns[:2] + [slice(columns[2].start, columns[2].stop + 1)]  # a column wider than its module's B
    assert not isinstance(kernels.lora_group(a, b, wrong), cpu_lora.Group)


def _kernel(x, a, b, tl):
    """The C function kernels.lora_apply would run for these arguments (None: torch)."""
    return cpu_lora._Weights(a, b).kernel(tl) if cpu_lora.ok(x, a, b, tl, [x], 1.0) else None


def test_lora_kernel_choice_follows_the_steps_slots(monkeypatch):
    lib, gen = cpu_native.lib(), torch.Generator().manual_seed(18)
    long_run = [0] * (cpu_lora.MAX_C_RUN + 1) + [1] * 6 + [-1] * 3  # a prefill chunk, another, base tokens
    x, a, b, tl, fused, ys = _lora_case(gen, long_run, rank_major=True)
    assert _kernel(x, a, b, tl) == lib.lp_lora_runs_f32
    assert _kernel(x, *([t.bfloat16() for t in w] for w in (a, b)), tl) == lib.lp_lora_runs_bf16w
    x, a, b, tl, fused, ys = _lora_case(gen, long_run)  # B out-major: no runs kernel, long runs to torch's GEMMs
    assert _kernel(x, a, b, tl) is None
    x, a, b, tl, fused, ys = _lora_case(gen, [4] * cpu_lora.MAX_C_RUN)  # ... but short runs take the per-token one
    assert _kernel(x, a, b, tl) == lib.lp_lora_apply_f32
    x, a, b, tl, fused, ys = _lora_case(gen, [2, 0, 1, 3, 0, 2, 5, 5], rank_major=True)  # scattered: per token
    assert _kernel(x, a, b, tl) == lib.lp_lora_apply_f32
    assert _kernel(x, *([t.bfloat16() for t in w] for w in (a, b)), tl) == lib.lp_lora_apply_bf16w
    x, a, b, tl, fused, ys = _lora_case(gen, [2, 0, 1, 3, 0, 2])
    assert not cpu_lora.ok(x, a, b, tl, ys, 0.5)  # an unfolded scale: the reference handles it
    calls = _spy(monkeypatch, cpu_lora, "lora_apply")
    kernels.lora_apply(x, a, b, tl, ys)
    assert calls == [1]
    kernels.set_backend("torch")
    kernels.lora_apply(x, a, b, tl, ys)
    assert calls == [1]


@pytest.mark.parametrize("token_slots", [
    [1] * 37 + [0] * 9 + [-1] * 5 + [3] * 2 + [2] + [1] * 11,  # prefill chunks of every length, base tokens
    [0, 0, 0, 0, 1, 1, 1, 1, 2, 2, 2, 2, 3, 3, 3, 3, 4, 4, 4],  # decode, several tokens per adapter
], ids=["prefill", "decode-by-adapter"])
@pytest.mark.parametrize("wdtype", [torch.float32, torch.bfloat16])
def test_runs_kernel_matches_reference(token_slots, wdtype):
    """Odd rank (two ranks at a time), H_in not a multiple of 8 and outputs not of 16 (the scalar tails),
    blocks cut short by run ends; bf16 weights widened as read (the reference upcasts them first)."""
    gen = torch.Generator().manual_seed(24)
    x, a, b, tl, fused, ys = _lora_case(gen, token_slots, slots=6, r_max=8, r=5, h_in=100, outs=(100, 40, 9),
                                        rank_major=True)
    a = [t.to(wdtype) for t in a]
    b = [t.transpose(1, 2).contiguous().transpose(1, 2).to(wdtype) for t in b]  # rank-major, as the engine keeps B
    assert all(t.stride(1) == 1 for t in b)
    name = {torch.float32: "lp_lora_runs_f32", torch.bfloat16: "lp_lora_runs_bf16w"}[wdtype]
    assert _kernel(x, a, b, tl) == getattr(cpu_native.lib(), name)
    expected = fused.clone()
    ref_lora.lora_apply(x, a, b, tl, _columns(expected, [y.shape[1] for y in ys]))
    cpu_lora.lora_apply(x, a, b, tl, ys)
    torch.testing.assert_close(fused, expected, atol=1e-4, rtol=1e-5)


def test_lora_shape_errors_are_raised_on_the_c_path_too():
    gen = torch.Generator().manual_seed(19)
    x, a, b, tl, fused, ys = _lora_case(gen, [1, 0, 2])
    with pytest.raises(ValueError, match="lora_apply"):
        cpu_lora.lora_apply(x, a, b[:2], tl, ys)


def test_out_of_range_indices_never_reach_the_c_kernels():
    """The C kernels read without bounds checks; a bad block id or slot goes to torch, which raises."""
    gen = torch.Generator().manual_seed(21)
    lens = [20, 7]
    kc, vc, bt, _ = _paged_cache(lens, 2, 64, 16, torch.float32, "cpu", gen)
    q, seq_lens = torch.randn(2, 4, 64, generator=gen), torch.tensor(lens, dtype=torch.int32)
    assert cpu_attention.supports(q, kc, vc, bt, seq_lens)
    bad = bt.clone()
    bad[0, 1] = kc.shape[0]  # one past the last block, inside sequence 0's 20 tokens
    assert not cpu_attention.supports(q, kc, vc, bad, seq_lens)
    with pytest.raises(IndexError):
        kernels.paged_decode_attention(q, kc, vc, bad, seq_lens, 0.125)
    x, a, b, tl, fused, ys = _lora_case(gen, [1, 0, 2], slots=3)
    assert cpu_lora.ok(x, a, b, tl, ys, 1.0)
    tl = torch.tensor([1, 0, 3], dtype=torch.int32)  # slot 3 of 3
    assert not cpu_lora.ok(x, a, b, tl, ys, 1.0)
    with pytest.raises(IndexError):
        kernels.lora_apply(x, a, b, tl, ys)
