"""The fused decode step (serving.engine.fused_decode): bitwise the per-op path's logits, taken exactly when it
applies (decode-only, up to GEMV_ROWS rows, bf16, int8 or int4 projections, LoRA groups the C kernels take), and
never where it cannot run."""

import pytest
import torch

from tests.conftest import make_lora_adapter
from serving.engine import EngineConfig, SamplingParams
from serving.engine.fused_decode import FusedDecode
from serving.engine.linear import BF16Linear
from serving.engine.llm_engine import LLMEngine


def _logits_per_step(engine, prompts, fused, params, lora_names=None):
    """Every step's logits and the fused path's calls, with the fused path on (its FusedDecode) or off (None)."""
    model = engine.model
    model.fused = fused
    steps, calls = [], []
    if fused is not None:
        real = fused.run
        fused.run = lambda *a: calls.append(a[0].shape[0]) or real(*a)
    hook = model.register_forward_hook(lambda m, inp, out: steps.append(out.clone()))
    try:
        outs = engine.generate(prompts, params, lora_names)
    finally:
        hook.remove()
        if fused is not None:
            del fused.run
    return steps, calls, [o.outputs[0].token_ids for o in outs]


@pytest.mark.parametrize("arch,quantization",
                         [("llama", None), ("qwen2", None), ("llama", "int8"), ("llama", "int4")],
                         ids=["llama", "qwen2", "llama-int8", "llama-int4"])  # qwen2: biased q/k/v projections
def test_fused_step_equals_the_per_op_path_bitwise(arch, quantization, tiny_model_factory):
    engine = LLMEngine(EngineConfig(model=tiny_model_factory(arch), dtype="bfloat16", num_kv_blocks=256,
                                    block_size=8, enable_prefix_caching=False, quantization=quantization))
    fused = engine.model.fused
    assert isinstance(fused, FusedDecode)
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    rows = [[5, 6, 7, 8, 9], list(range(20, 41)), [7, 7], [30, 31, 32], [9], [40] * 6, [41, 42], [50, 51, 52, 53]]
    rows += [[60 + i, 61 + i % 5] for i in range(BF16Linear.GEMV_ROWS - len(rows))]
    # one row to GEMV_ROWS (four and more: threaded small ops; 4, 2 and 1-row tiles of the projections)
    for prompts in (rows[:1], rows[:2], rows[:5], rows[:8], rows[:23], rows):
        on, calls, tokens_on = _logits_per_step(engine, prompts, fused, params)
        off, none, tokens_off = _logits_per_step(engine, prompts, None, params)
        prefill = sum(map(len, prompts))  # up to GEMV_ROWS prompt tokens: the prefill runs fused too
        assert none == [] and calls == [prefill] * (prefill <= BF16Linear.GEMV_ROWS) + [len(prompts)] * 11
        assert tokens_on == tokens_off and len(on) == len(off) == 12
        for a, b in zip(on, off):
            assert torch.equal(a, b)
    engine.model.fused = fused
    assert engine.allocator.all_free()


@pytest.mark.parametrize("lora_dtype", ["bfloat16", "float32"])
def test_fused_step_with_lora_equals_the_per_op_path_bitwise(lora_dtype, tiny_model_factory, tmp_path):
    """Adapters of two ranks and target sets, base rows among them; rows on distinct slots (the per-token
    kernel) and one adapter for the whole batch (the runs kernel): the LoRA runs inside the fused call."""
    path = tiny_model_factory("qwen2")
    engine = LLMEngine(EngineConfig(model=path, dtype="bfloat16", num_kv_blocks=256, block_size=8,
                                    enable_prefix_caching=False, max_loras=4, lora_dtype=lora_dtype))
    engine.add_lora("a", make_lora_adapter(path, tmp_path / "a", rank=4, seed=1))
    engine.add_lora("b", make_lora_adapter(path, tmp_path / "b", rank=8, seed=2,
                                           targets=["q_proj", "v_proj", "down_proj"]))
    engine.add_lora("c", make_lora_adapter(path, tmp_path / "c", rank=8, seed=3))
    fused = engine.model.fused
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    prompts = [[5, 6, 7], list(range(20, 33)), [7, 7], [30, 31, 32], [9], [40] * 6, [41, 42]]
    for names in (["a", "b", None, "c", "a", "b", "c"], ["b"] * 7):
        on, calls, tokens_on = _logits_per_step(engine, prompts, fused, params, names)
        off, _, tokens_off = _logits_per_step(engine, prompts, None, params, names)
        base, _, tokens_base = _logits_per_step(engine, prompts, fused, params)
        assert calls == [sum(map(len, prompts))] + [len(prompts)] * 7 and tokens_on == tokens_off
        assert all(torch.equal(a, b) for a, b in zip(on, off))
        assert not torch.equal(on[-1], base[-1])  # the adapters change the logits
    engine.model.fused = fused
    assert engine.allocator.all_free()


def test_fused_step_on_the_default_model_keeps_its_tokens(default_model_path):
    """30 real layers, a bf16 KV cache: the same logits, bit for bit, as the per-op path."""
    engine = LLMEngine(EngineConfig(model=default_model_path, dtype="bfloat16", kv_cache_memory="64MiB",
                                    enable_prefix_caching=False))
    fused = engine.model.fused
    ids = engine.tokenizer("The three primary colors are")["input_ids"]
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    on, calls, tokens_on = _logits_per_step(engine, [ids], fused, params)
    off, _, tokens_off = _logits_per_step(engine, [ids], None, params)
    assert calls == [len(ids)] + [1] * 9 and tokens_on == tokens_off
    assert all(torch.equal(a, b) for a, b in zip(on, off))


def test_fused_step_is_skipped_where_it_does_not_apply(tiny_model_factory, tmp_path):
    """Qwen3's q/k norms and float32 weights build no fused path; more than GEMV_ROWS rows, a prefill and a
    LoRA batch the C kernels do not take (float16 adapter slots) run per op."""
    assert LLMEngine(EngineConfig(model=tiny_model_factory("qwen3"), dtype="bfloat16", num_kv_blocks=32,
                                  block_size=8)).model.fused is None
    for kw in (dict(dtype="float32"),):
        assert LLMEngine(EngineConfig(model=tiny_model_factory("llama"), num_kv_blocks=32, block_size=8,
                                      **kw)).model.fused is None
    path = tiny_model_factory("llama")
    engine = LLMEngine(EngineConfig(model=path, dtype="bfloat16", num_kv_blocks=256, block_size=8, max_num_seqs=128,
                                    lora_dtype="float16"))
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True)
    _, calls, _ = _logits_per_step(engine, [[5 + i, 6] for i in range(BF16Linear.GEMV_ROWS + 1)],
                                   engine.model.fused, params)
    assert calls == []  # more rows than GEMV_ROWS: oneDNN's GEMM, per op
    engine.add_lora("a", make_lora_adapter(path, tmp_path / "a", rank=4, seed=1))
    fused = engine.model.fused
    _, calls, lora = _logits_per_step(engine, [[5, 6, 7]], fused, params, ["a"])
    assert calls == []
    assert _logits_per_step(engine, [[5, 6, 7]], None, params, ["a"])[2] == lora


def test_short_prefill_as_decode_rows_is_causal_prefill_attention(tiny_model_factory):
    """as_decode_rows against the prefill kernels, in float32 (per op, so only the attention differs): prompts
    from position 0, a prefix-cache hit (a chunk from the middle), a chunked prefill beside decodes."""
    path = tiny_model_factory("llama")
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=3)
    shared = list(range(30, 47))  # 17 tokens: four blocks cached, then a chunk from position 16
    prompts = [[5, 6, 7, 8, 9], shared + [3], list(range(60, 80)), [7, 7]]

    def run(as_rows):
        engine = LLMEngine(EngineConfig(model=path, dtype="float32", num_kv_blocks=256, block_size=4,
                                        max_num_batched_tokens=12))
        model = engine.model
        model.prefill_as_decode = as_rows
        engine.generate([shared + [1]], params)  # fills the prefix cache
        hits = engine.stats().get("prefix_cache_hits")
        steps = []
        hook = model.register_forward_hook(lambda m, inp, out: steps.append(out.clone()))
        try:
            outs = engine.generate(prompts, params)
        finally:
            hook.remove()
        assert engine.stats().get("prefix_cache_hits") != hits
        return steps, [(o.outputs[0].token_ids, [lp.logprob for lp in o.outputs[0].logprobs]) for o in outs]

    off_steps, off = run(False)
    on_steps, on = run(True)
    assert len(on_steps) == len(off_steps) > 3
    for a, b in zip(on_steps, off_steps):
        torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
    assert [t for t, _ in on] == [t for t, _ in off]
    for (_, a), (_, b) in zip(on, off):
        assert a == pytest.approx(b, abs=1e-4)
