"""CPU weight formats (serving.engine.linear): bfloat16, int8 and int4 projections against torch references,
engines built on each, LoRA on a quantized base, and the perplexity bounds on the default model."""

from pathlib import Path

import pytest
import torch

from tests.conftest import make_lora_adapter
from serving.engine import EngineConfig, ModelLoadError, SamplingParams
from serving.engine.linear import (BF16Linear, Int4Linear, Int8Linear, PackedLinear, bf16_native, cpu_linear,
                                   cpu_path)
from serving.engine.llm_engine import LLMEngine
from serving.engine.perplexity import perplexity

TEXT = (Path(__file__).parent / "data" / "perplexity.txt").read_text()
# Bounds from the issue: a format may not become a default that misses its bound against float32.
BOUNDS = {"bfloat16": 0.01, "int8": 0.03, "int4": 0.10}


def _weights(n=96, k=128, seed=0):
    gen = torch.Generator().manual_seed(seed)
    return torch.randn(n, k, generator=gen) * 0.05, torch.randn(n, generator=gen) * 0.1, \
        torch.randn(5, k, generator=gen)


def test_bf16_projection_matches_a_bf16_matmul(monkeypatch):
    """Every row count takes the C kernel over the packed weight (decode steps, prefill past the 256-row block, a
    3-D input), and equals a float32 matmul of the bf16-rounded x and w, rounded to bf16 (as oneDNN rounds), up to
    summation order; 98 outputs leave a last packed group of 2 columns. Only the packed copy is kept."""
    from kernels import cpu_native

    w, b, _ = _weights(n=98)
    x = torch.randn(300, 128, generator=torch.Generator().manual_seed(1))
    lin = BF16Linear(w, b)
    assert lin._lib is not None and not hasattr(lin, "weight") and lin.packed.dtype == torch.bfloat16
    assert lin.packed.numel() == 128 * 128 and lin.nbytes == 128 * 128 * 2  # 98 outputs padded to 4 x 32
    ref = (x.bfloat16().float() @ w.bfloat16().float().t() + b).bfloat16().float()
    calls = []
    real = lin._lib.lp_linear_bf16
    spy = staticmethod(lambda *a: calls.append(a[2]) or real(*a))  # a[2]: the row count
    monkeypatch.setattr(lin, "_lib", type("Spy", (), {"lp_linear_bf16": spy})())
    for rows in (1, 2, 3, 9, BF16Linear.GEMV_ROWS, 300):
        y = lin(x[:rows])
        assert y.dtype == torch.float32 and y.shape == (rows, 98)
        torch.testing.assert_close(y, ref[:rows], atol=1e-2, rtol=8e-3)  # one bf16 step
    torch.testing.assert_close(lin(x[:12].view(3, 4, 128)), ref[:12].view(3, 4, 98), atol=1e-2, rtol=8e-3)
    assert calls == [1, 2, 3, 9, BF16Linear.GEMV_ROWS, 300, 12]
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    assert cpu_native.lib().lp_isa() == (2 if bf16_native() or "avx512_bf16" in flags
                                         else 1 if " avx2" in flags and " fma" in flags else 0)


def test_bf16_projection_without_c_kernels_runs_onednn_on_the_dense_weight(monkeypatch):
    monkeypatch.setenv("LORAPLEX_KERNELS", "torch")
    w, b, x = _weights()
    lin = BF16Linear(w, b)
    assert lin._lib is None and lin.weight.shape == (96, 128) and not hasattr(lin, "packed")
    ref = (x.bfloat16().float() @ w.bfloat16().float().t() + b).bfloat16().float()
    torch.testing.assert_close(lin(x), ref, atol=2e-2, rtol=2e-2)


@pytest.mark.parametrize("flag, isa", [("-mno-avx512bf16", 1), ("-mno-avx2", 0)], ids=["avx2", "scalar"])
def test_c_kernels_without_avx512_bf16_give_the_same_results(tmp_path, flag, isa):
    """The C source's other code paths, built here by adding one flag after -march=native: AVX2 + FMA over
    widened bf16 (the laptop CPUs without AVX512-BF16) and the scalar loops. bf16, int8 and int4 projections at
    several row counts equal their torch references, a row gets the same bits alone and in a batch, and the fused
    path's attention over a bf16 KV cache runs."""
    import os
    import subprocess
    import sys

    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    if isa == 1 and not all(f" {f}" in flags for f in ("avx2", "fma")):
        pytest.skip("this CPU has no AVX2 + FMA to run the AVX2 path on")
    cc = tmp_path / "cc-variant"
    cc.write_text(f'#!/bin/sh\nexec cc "$@" {flag}\n')
    cc.chmod(0o755)
    code = ("import sys, torch\n"
            "from kernels import cpu_native\n"
            "from serving.engine.linear import BF16Linear, Int4Linear, Int8Linear\n"
            "assert cpu_native.lib().lp_isa() == int(sys.argv[1]), cpu_native.lib().lp_isa()\n"
            "g = torch.Generator().manual_seed(5)\n"
            "w, b = torch.randn(98, 64, generator=g) * 0.1, torch.randn(98, generator=g)\n"
            "x = torch.randn(33, 64, generator=g)\n"
            "lin, q8, q4 = BF16Linear(w, b), Int8Linear(w, b), Int4Linear(w, b)\n"
            "assert lin._lib is not None and q8._lib is not None and q4._lib is not None\n"
            "q4w = q4.qweight.int(); q4q = torch.stack([q4w & 15, q4w >> 4], 1).view(98, 2, 2, 16)\n"
            "q4q = q4q.transpose(1, 2).reshape(98, 2, 32).float()\n"
            "sm = q4.scales_mins\n"
            "deq4 = (q4q * sm[..., :1] + sm[..., 1:]).reshape(98, 64).bfloat16().float()\n"
            "for rows in (1, 2, 3, 5, 9, 33):\n"
            "    xr = x[:rows].bfloat16().float()\n"
            "    ref = (xr @ w.bfloat16().float().t() + b).bfloat16().float()\n"
            "    torch.testing.assert_close(lin(x[:rows]), ref, atol=1e-2, rtol=8e-3)\n"
            "    torch.testing.assert_close(q8(x[:rows]), xr @ q8.dequantized().t() + b, atol=1e-4, rtol=1e-4)\n"
            "    torch.testing.assert_close(q4(x[:rows]), xr @ deq4.t() + b, atol=1e-3, rtol=1e-3)\n"
            "for m in (lin, q8, q4):\n"
            "    alone = torch.cat([m(x[i:i + 1]) for i in range(9)])\n"
            "    assert torch.equal(m(x[:9]).view(torch.int32), alone.view(torch.int32)), type(m).__name__\n"
            "print('ok')\n")
    env = dict(os.environ, CC=str(cc), LORAPLEX_HOME=str(tmp_path / "home"))
    env.pop("LORAPLEX_KERNELS", None)
    env.pop("LORAPLEX_KERNEL_CACHE", None)  # build (or fail to) in this data dir, not the session's shared cache
    res = subprocess.run([sys.executable, "-c", code, str(isa)], env=env, capture_output=True, text=True,
                         timeout=240, cwd=str(Path(__file__).parent.parent))
    assert res.returncode == 0 and res.stdout.strip() == "ok", res.stderr[-2000:]


def test_fp32_projection_is_packed_and_drops_the_dense_weight():
    w, b, x = _weights()
    lin = PackedLinear(w, b)
    torch.testing.assert_close(lin(x), x @ w.t() + b, atol=1e-5, rtol=1e-5)
    assert not hasattr(lin, "weight")


def test_int8_projection_is_its_dequantized_weight(monkeypatch):
    """Our C kernel (every row count, a last group of fewer than 4 weight rows) equals a float32 matmul of the
    bf16-rounded x and the dequantized weight, and agrees with torch's fused int8 op within its bf16 output."""
    w, b, _ = _weights(n=98, seed=1)
    lin = Int8Linear(w, b)
    assert lin.qweight.dtype == torch.int8 and int(lin.qweight.abs().max()) == 127 and lin._lib is not None
    deq = lin.dequantized()
    assert float((deq - w).abs().max()) <= float(w.abs().max()) / 127  # within half a step per channel... twice
    calls = []
    real = lin._lib.lp_linear_i8
    monkeypatch.setattr(lin, "_lib", type("Spy", (), {"lp_linear_i8": staticmethod(
        lambda *a: calls.append(a[2]) or real(*a))})())
    for rows in (1, 2, 3, 8, 33):
        x = torch.randn(rows, 128, generator=torch.Generator().manual_seed(rows))
        ref = x.bfloat16().float() @ deq.t() + b
        torch.testing.assert_close(lin(x), ref, atol=1e-5, rtol=1e-5)
        fused = torch._weight_int8pack_mm(x.bfloat16(), lin.qweight, lin.scales).float() + b
        torch.testing.assert_close(lin(x), fused, atol=3e-2, rtol=2e-2)
    assert calls == [1, 1, 2, 2, 3, 3, 8, 8, 33, 33]


def test_int4_projection_is_q4_1_of_its_weight():
    w, b, x = _weights(seed=2)
    lin = Int4Linear(w, b)
    groups = w.reshape(96, -1, 32)
    lo, hi = groups.amin(-1, keepdim=True), groups.amax(-1, keepdim=True)
    scale = (hi - lo) / 15
    deq = (torch.round((groups - lo) / scale) * scale + lo).reshape(96, 128)  # GGUF Q4_1's reconstruction
    ref = x.bfloat16().float() @ deq.t() + b
    torch.testing.assert_close(lin(x), ref, atol=5e-2, rtol=3e-2)
    from kernels import cpu_native

    if cpu_native.available():  # our C kernel: the group's weights widened to bf16, then float32 dot products
        assert lin._lib is not None and lin.qweight.dtype == torch.uint8
        for rows in (1, 2, 3, 5, 8, 33):
            xr = torch.randn(rows, 128, generator=torch.Generator().manual_seed(rows))
            want = xr.bfloat16().float() @ deq.bfloat16().float().t() + b
            torch.testing.assert_close(lin(xr), want, atol=1e-3, rtol=1e-3)  # an fma may round a weight 1 ulp off
    with pytest.raises(ModelLoadError, match="divisible by 32"):
        Int4Linear(torch.randn(8, 40), None)


@pytest.mark.parametrize("cls", [BF16Linear, Int8Linear, Int4Linear])
def test_a_row_gets_the_same_bits_alone_or_in_a_batch(cls):
    """With a bias, a row computed in a 4 x 4 tile (vector stores) and alone (a 1 x 4 tile, scalar stores) gives the
    same bits, so a sequence's tokens do not depend on its batch's size (98 outputs: a last group of 2 rows)."""
    w, b, _ = _weights(n=98, seed=3)
    lin = cls(w, b)
    x = torch.randn(9, 128, generator=torch.Generator().manual_seed(9))
    alone = torch.cat([lin(x[i:i + 1]) for i in range(9)])
    assert torch.equal(lin(x).view(torch.int32), alone.view(torch.int32))


def test_cpu_linear_picks_the_format_and_prepare_names_the_path():
    w, b, _ = _weights()
    assert isinstance(cpu_linear(w, b, torch.float32, None), PackedLinear)
    assert isinstance(cpu_linear(w, b, torch.bfloat16, None), BF16Linear)
    assert isinstance(cpu_linear(w, b, torch.bfloat16, "int8"), Int8Linear)
    assert isinstance(cpu_linear(w, b, torch.bfloat16, "int4"), Int4Linear)
    line = cpu_path(torch.bfloat16, None)
    assert ("lacks AVX512-BF16" in line) == (not bf16_native())  # the fallback's line names what is missing
    if "avx512_bf16" in Path("/proc/cpuinfo").read_text():  # this VM's CPU: the hardware path must be found
        assert bf16_native() and "AVX512-BF16)" in line


def test_auto_dtype_is_bf16_where_bf16_runs_in_hardware(monkeypatch):
    """`dtype: auto` on the CPU: bf16 with AVX512-BF16 or where our C kernels build for AVX2 (or better); float32
    where bf16 would be emulated (here: the C kernels switched off on a CPU without AVX512-BF16)."""
    from kernels import cpu_native
    from serving.engine.llm_engine import auto_dtype

    cpu = torch.device("cpu")
    flags = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    hardware = bf16_native() or (cpu_native.available() and " avx2" in flags and " fma" in flags)
    assert auto_dtype(cpu, None) == (torch.bfloat16 if hardware else torch.float32)
    assert auto_dtype(cpu, "int8") == torch.bfloat16
    monkeypatch.setenv("LORAPLEX_KERNELS", "torch")
    assert auto_dtype(cpu, None) == (torch.bfloat16 if bf16_native() else torch.float32)


@pytest.mark.parametrize("kw", [dict(dtype="bfloat16"), dict(quantization="int8"), dict(quantization="int4")],
                         ids=["bf16", "int8", "int4"])
def test_engines_on_each_format_generate_and_batch_consistently(kw, tiny_model_factory):
    """A tiny Llama in each format: projections swapped, KV cache bf16, the C decode path taken, and the same
    greedy tokens for a prompt alone and inside a batch."""
    engine = LLMEngine(EngineConfig(model=tiny_model_factory("llama"), num_kv_blocks=64, block_size=8, **kw))
    layer = engine.model.layers[0]
    want = {None: BF16Linear, "int8": Int8Linear, "int4": Int4Linear}[kw.get("quantization")]
    assert isinstance(layer.mlp.gate_up_proj, want) and isinstance(engine.model.lm_head, want)
    assert engine.kv_caches[0][0].dtype == torch.bfloat16
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    alone = engine.generate([[5, 6, 7, 8, 9]], params)[0].outputs[0].token_ids
    batch = engine.generate([[11, 12], [5, 6, 7, 8, 9], list(range(20, 40))], params)
    assert batch[1].outputs[0].token_ids == alone
    assert engine.allocator.all_free()


def test_quantization_is_validated():
    with pytest.raises(ModelLoadError, match="quantization must be int8, int4 or none"):
        EngineConfig(quantization="q5_k")


def test_lora_on_an_int4_base_in_bf16(tiny_model_factory, tmp_path):
    """Multi-LoRA on a quantized base: the adapter's delta moves the output, and a base-only request in the
    same batch is unchanged by it."""
    path = tiny_model_factory("llama")
    engine = LLMEngine(EngineConfig(model=path, num_kv_blocks=64, block_size=8, quantization="int4"))
    engine.add_lora("a", make_lora_adapter(path, tmp_path / "a", rank=8, seed=3))
    assert engine.lora.dtype == torch.bfloat16
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    base = engine.generate([[3, 4, 5, 6]], params)[0].outputs[0].token_ids
    mixed = engine.generate([[3, 4, 5, 6], [3, 4, 5, 6]], [params, params], lora_names=[None, "a"])
    assert mixed[0].outputs[0].token_ids == base
    assert mixed[1].outputs[0].token_ids != base


@pytest.mark.slow
def test_perplexity_of_each_format_is_within_its_bound(default_model_path):
    """SmolLM2-135M-Instruct on tests/data/perplexity.txt (public-domain prose, ~800 tokens): float32 equals
    HF transformers; bfloat16, int8 and int4 stay within 1%, 3% and 10% of float32."""
    import math

    from transformers import AutoModelForCausalLM

    fp32 = LLMEngine(EngineConfig(model=default_model_path, dtype="float32"))
    ref = perplexity(fp32, TEXT)["perplexity"]
    ids = fp32.tokenizer(TEXT)["input_ids"]
    hf = AutoModelForCausalLM.from_pretrained(fp32.model_path, dtype=torch.float32).eval()
    with torch.no_grad():
        hf_ppl = math.exp(float(hf(torch.tensor([ids]), labels=torch.tensor([ids])).loss))
    assert abs(ref - hf_ppl) / hf_ppl < 1e-4
    del fp32, hf
    for name, kw in (("bfloat16", dict(dtype="bfloat16")), ("int8", dict(quantization="int8")),
                     ("int4", dict(quantization="int4"))):
        ppl = perplexity(LLMEngine(EngineConfig(model=default_model_path, **kw)), TEXT)["perplexity"]
        assert ppl > ref * 0.99 and (ppl - ref) / ref <= BOUNDS[name], (name, ppl, ref)
