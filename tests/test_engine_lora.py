"""Multi-LoRA in the engine against HF transformers + PEFT (merged), heterogeneous batches, bad adapters."""

import json

import pytest
import torch
from transformers import AutoModelForCausalLM

from serving.engine import EngineConfig, SamplingParams
from serving.engine.errors import AdapterError, AdapterNotFoundError
from serving.engine.llm_engine import LLMEngine
from tests.conftest import make_lora_adapter

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def make_adapter(base_path, folder, rank, seed, targets=ALL, alpha=None, rslora=False):
    return make_lora_adapter(base_path, folder, rank, seed, targets=targets, alpha=alpha, rslora=rslora)


def peft_merged_greedy(base_path, adapter, prompts, max_tokens):
    from peft import PeftModel

    base = AutoModelForCausalLM.from_pretrained(base_path, dtype=torch.float32)
    merged = PeftModel.from_pretrained(base, adapter).merge_and_unload().eval() if adapter else base.eval()
    return [merged.generate(torch.tensor([ids]), max_new_tokens=max_tokens, min_new_tokens=max_tokens,
                            do_sample=False, pad_token_id=0)[0, len(ids):].tolist() for ids in prompts]


@pytest.fixture(scope="module")
def lora_setup(tiny_model_factory, tmp_path_factory):
    base = tiny_model_factory("llama")
    root = tmp_path_factory.mktemp("adapters")
    ranks = [4, 8, 16, 8, 4, 16, 2, 8]
    targets = [ALL, ["q_proj", "v_proj"], ALL, ["gate_proj", "up_proj", "down_proj"], ALL, ["o_proj"], ALL, ALL]
    adapters = {f"a{i}": make_adapter(base, root / f"a{i}", r, seed=i, targets=t, rslora=(i == 2))
                for i, (r, t) in enumerate(zip(ranks, targets))}
    return base, adapters


def test_adapter_greedy_equals_peft_merged(lora_setup):
    base, adapters = lora_setup
    engine = LLMEngine(EngineConfig(model=base, dtype="float32", num_kv_blocks=128, max_lora_rank=16))
    prompts = [engine.tokenizer(p)["input_ids"] for p in ("Hello world", "The answer is forty two and")]
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    for name in ("a0", "a2", "a3"):
        engine.add_lora(name, adapters[name])
        ours = [o.outputs[0].token_ids for o in engine.generate(prompts, params, lora_names=[name] * 2)]
        assert ours == peft_merged_greedy(base, adapters[name], prompts, 10), name
    assert engine.allocator.all_free()


def test_mixed_batch_of_8_adapters_and_base_equals_each_alone(lora_setup):
    base, adapters = lora_setup
    engine = LLMEngine(EngineConfig(model=base, dtype="float32", num_kv_blocks=256, max_lora_rank=16, max_loras=4,
                                    max_num_batched_tokens=64))
    for name, path in adapters.items():
        engine.add_lora(name, path)
    names = [None] + list(adapters)
    prompts = [engine.tokenizer(f"Request number {i} says hello")["input_ids"] for i in range(len(names) * 2)]
    lora_names = (names * 2)[:len(prompts)]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    alone = [engine.generate([p], params, lora_names=[n])[0].outputs[0].token_ids for p, n in zip(prompts, lora_names)]
    together = [o.outputs[0].token_ids for o in engine.generate(prompts, params, lora_names=lora_names)]
    assert together == alone
    # Adapters really change the output (otherwise the test above proves nothing).
    assert len({tuple(t) for t in alone[:len(names)]}) > len(names) // 2
    assert engine.allocator.all_free() and all(r == 0 for r in engine.lora.slot_refs)


def test_unload_and_reload_gives_same_output(lora_setup):
    base, adapters = lora_setup
    engine = LLMEngine(EngineConfig(model=base, dtype="float32", num_kv_blocks=128, max_lora_rank=16))
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    engine.add_lora("x", adapters["a1"])
    first = engine.generate(["Hi there"], params, lora_names=["x"])[0].outputs[0].token_ids
    engine.remove_lora("x")
    with pytest.raises(AdapterNotFoundError):
        engine.add_request("Hi there", params, lora_name="x")
    engine.add_lora("x", adapters["a1"])
    assert engine.generate(["Hi there"], params, lora_names=["x"])[0].outputs[0].token_ids == first


def test_bad_adapters_are_refused_and_engine_keeps_serving(lora_setup, tmp_path, tiny_model_factory):
    base, adapters = lora_setup
    engine = LLMEngine(EngineConfig(model=base, dtype="float32", num_kv_blocks=128, max_lora_rank=8))
    with pytest.raises(AdapterError, match="does not exist"):
        engine.add_lora("missing", str(tmp_path / "nope"))
    (tmp_path / "empty").mkdir()
    with pytest.raises(AdapterError, match="adapter_config.json missing"):
        engine.add_lora("empty", str(tmp_path / "empty"))
    with pytest.raises(AdapterError, match="rank 16 exceeds max_lora_rank 8"):
        engine.add_lora("big", adapters["a2"])
    other = make_adapter(tiny_model_factory("qwen2"), tmp_path / "qwen", 4, seed=0)
    with pytest.raises(AdapterError, match="trained on|shape"):
        engine.add_lora("qwen", other)
    # Same shapes but another base name in adapter_config: a base-model mismatch.
    mismatch = tmp_path / "mismatch"
    make_adapter(base, mismatch, 4, seed=1)
    cfg = json.loads((mismatch / "adapter_config.json").read_text())
    cfg["base_model_name_or_path"] = "meta-llama/Llama-3.1-8B"
    (mismatch / "adapter_config.json").write_text(json.dumps(cfg))
    with pytest.raises(AdapterError, match="trained on 'meta-llama/Llama-3.1-8B'"):
        engine.add_lora("mismatch", str(mismatch))
    engine.add_lora("ok", adapters["a0"])
    with pytest.raises(AdapterError, match="already exists"):
        engine.add_lora("ok", adapters["a0"])
    out = engine.generate(["still serving"], SamplingParams(temperature=0, max_tokens=3), lora_names=["ok"])
    assert out[0].finished


def test_bfloat16_adapter_store_follows_fp32(lora_setup):
    """lora_dtype: bfloat16 on an fp32 model keeps slots in bf16 (half the bytes per decode step); log-probs stay
    within bf16 rounding of the fp32 store, far closer than the adapter's own effect. Token 1 comes from prefill,
    token 2 from a mixed-adapter decode step (both through the C LoRA kernels on the CPU); token 2 is compared where
    token 1 agrees (this tiny random model's top tokens can be ~0.01 apart, so greedy paths may part)."""
    base, adapters = lora_setup
    prompts = [[1, 2, 3, 4, 5, 6], [7, 8, 9]]

    def run(lora_dtype, names, k):
        engine = LLMEngine(EngineConfig(model=base, dtype="float32", num_kv_blocks=128, max_lora_rank=16,
                                        lora_dtype=lora_dtype))
        for name in {n for n in names if n}:
            engine.add_lora(name, adapters[name])
        params = SamplingParams(temperature=0, max_tokens=2, ignore_eos=True, logprobs=k)
        outs = engine.generate(prompts * 2, params, lora_names=names)
        if lora_dtype == "bfloat16":
            assert engine.lora.a["q_proj"].dtype == engine.lora.b["q_proj"].dtype == torch.bfloat16
        return [(o.outputs[0].token_ids, [{t: lp for t, _, lp in step.top} for step in o.outputs[0].logprobs])
                for o in outs]

    names = ["a0", "a0", "a2", "a2"]
    fp32, bf16, plain = run("auto", names, 5), run("bfloat16", names, 20), run("auto", [None] * 4, 20)
    decode_compared = 0
    for (ids32, want), (ids16, got), (_, base_lps) in zip(fp32, bf16, plain):
        for step in (0, 1):
            if step == 1 and ids32[0] != ids16[0]:
                continue
            shared = [t for t in want[step] if t in got[step]]
            assert len(shared) >= 3
            rounding = max(abs(want[step][t] - got[step][t]) for t in shared)
            assert rounding < 0.1
            if step == 0:  # the adapter really is applied from the bf16 slots
                assert max(abs(want[0][t] - base_lps[0].get(t, -99.0)) for t in want[0]) > 5 * rounding
            decode_compared += step
    assert decode_compared >= 2


def test_lora_dtype_is_checked(lora_setup, monkeypatch):
    from serving.engine.errors import ModelLoadError

    base, _ = lora_setup
    with pytest.raises(ModelLoadError, match="lora_dtype must be"):
        EngineConfig(model=base, lora_dtype="int8")
    monkeypatch.setenv("TRITON_INTERPRET", "1")  # the Triton kernels (interpreted here) read B in the model's dtype
    with pytest.raises(ModelLoadError, match="Triton LoRA kernels need them equal"):
        LLMEngine(EngineConfig(model=base, dtype="float32", num_kv_blocks=64, kernels="triton", lora_dtype="bfloat16"))
