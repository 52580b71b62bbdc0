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
    engine = LLMEngine(EngineConfig(model=base, num_kv_blocks=128, max_lora_rank=16))
    prompts = [engine.tokenizer(p)["input_ids"] for p in ("Hello world", "The answer is forty two and")]
    params = SamplingParams(temperature=0, max_tokens=10, ignore_eos=True)
    for name in ("a0", "a2", "a3"):
        engine.add_lora(name, adapters[name])
        ours = [o.outputs[0].token_ids for o in engine.generate(prompts, params, lora_names=[name] * 2)]
        assert ours == peft_merged_greedy(base, adapters[name], prompts, 10), name
    assert engine.allocator.all_free()


def test_mixed_batch_of_8_adapters_and_base_equals_each_alone(lora_setup):
    base, adapters = lora_setup
    engine = LLMEngine(EngineConfig(model=base, num_kv_blocks=256, max_lora_rank=16, max_loras=4,
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
    engine = LLMEngine(EngineConfig(model=base, num_kv_blocks=128, max_lora_rank=16))
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
    engine = LLMEngine(EngineConfig(model=base, num_kv_blocks=128, max_lora_rank=8))
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
