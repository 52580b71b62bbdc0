"""The engine through the Triton kernels gives the torch path's tokens: decode, chunked prefill, prefix hits and a
mixed multi-LoRA batch. On the CPU the kernels run under the interpreter; with a GPU, compiled on CUDA."""

from __future__ import annotations

import pytest
import torch

import kernels
from kernels.testing import triton_module
from serving.engine import EngineConfig, SamplingParams
from serving.engine.llm_engine import LLMEngine
from tests.conftest import make_lora_adapter

PROMPTS = ["hello world " * k for k in (1, 5, 20, 40)]  # the longest spans several 64-token prefill chunks
LORAS = [("a0", 4), ("a1", 8)]
NAMES = ["a0", None, "a1", "a0"]


def engine_tokens(base, adapters, backend, device):
    engine = LLMEngine(EngineConfig(model=base, device=device, dtype="float32", kernels=backend, num_kv_blocks=128,
                                    block_size=8, max_num_batched_tokens=64, max_loras=2, max_lora_rank=8))
    for name, path in adapters.items():
        engine.add_lora(name, path)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    shared = [f"{PROMPTS[2]} and then {i}" for i in range(3)]  # a shared multi-block prefix: cache hits
    out = {"base": engine.generate(PROMPTS, params), "lora": engine.generate(PROMPTS, params, lora_names=NAMES),
           "prefix": engine.generate(shared, params)}
    assert engine.stats()["prefix_cache_hits"] > 0
    assert engine.allocator.all_free()
    groups = list(engine.lora._groups.values())
    assert groups and all(isinstance(g, triton_module("lora").Group) == (backend == "triton") for g in groups)
    return {k: [o.outputs[0].token_ids for o in v] for k, v in out.items()}


@pytest.fixture(autouse=True)
def _auto_backend_after():
    """Each engine below sets the process-wide kernel backend; put it back even when a test fails."""
    yield
    kernels.set_backend("auto")


def check_triton_engine_matches_torch(base, adapter_root) -> None:
    """Shared with the GPU check script: same greedy tokens from both backends, with and without adapters."""
    triton_module("attention"), triton_module("lora")  # interpreter-built without a GPU
    adapters = {name: make_lora_adapter(base, f"{adapter_root}/{name}", rank, seed=i)
                for i, (name, rank) in enumerate(LORAS)}
    device = "cuda" if torch.cuda.is_available() else "cpu"
    expected = engine_tokens(base, adapters, "torch", device)
    got = engine_tokens(base, adapters, "triton", device)
    assert got == expected
    assert expected["lora"][0] != expected["base"][0]  # the adapters change what is generated


def test_engine_on_triton_kernels_matches_torch(tiny_model_factory, tmp_path):
    check_triton_engine_matches_torch(tiny_model_factory("llama"), tmp_path)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_engine_on_triton_kernels_matches_torch_bf16_cuda(tiny_model_factory, tmp_path):
    """bf16 on CUDA: the two backends round differently, so compare the first tokens' agreement, not equality."""
    base = tiny_model_factory("llama")
    triton_module("attention"), triton_module("lora")
    tokens = {}
    for backend in ("torch", "triton"):
        engine = LLMEngine(EngineConfig(model=base, device="cuda", dtype="bfloat16", kernels=backend,
                                        num_kv_blocks=128, block_size=8, max_num_batched_tokens=64))
        tokens[backend] = [o.outputs[0].token_ids[:4] for o in
                           engine.generate(PROMPTS, SamplingParams(temperature=0, max_tokens=4, ignore_eos=True))]
    agree = sum(a == b for a, b in zip(tokens["torch"], tokens["triton"]))
    assert agree >= len(PROMPTS) - 1
