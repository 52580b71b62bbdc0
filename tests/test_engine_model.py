"""Our Llama-family forward against HF transformers (fp32, atol 1e-4), on tiny random models of each architecture."""

import pytest
import torch
from transformers import AutoModelForCausalLM

from serving.engine import EngineConfig, ModelLoadError, SamplingParams
from serving.engine.llm_engine import LLMEngine
from serving.engine.perplexity import prompt_logits

ARCHS = ["llama", "mistral", "qwen2", "qwen3"]


@pytest.mark.parametrize("arch", ARCHS)
def test_logits_match_transformers(arch, tiny_model_factory):
    path = tiny_model_factory(arch)
    engine = LLMEngine(EngineConfig(model=path, dtype="float32", num_kv_blocks=64, block_size=8))
    if torch.backends.mkldnn.is_available():  # the CPU path under test is the oneDNN pre-packed one
        from serving.engine.linear import PackedLinear

        layer = engine.model.layers[0]
        assert all(isinstance(m, PackedLinear) for m in (layer.self_attn.qkv_proj, layer.self_attn.o_proj,
                                                          layer.mlp.gate_up_proj, layer.mlp.down_proj,
                                                          engine.model.lm_head))
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = engine.tokenizer("The quick brown fox jumps over the lazy dog, then runs far away into the woods.")["input_ids"]
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    for chunk in (len(ids), 5, 1):  # whole prompt, chunked prefill over block boundaries, token by token
        ours = prompt_logits(engine, ids, chunk)
        torch.testing.assert_close(ours, ref, atol=1e-4, rtol=1e-4)
    assert engine.allocator.all_free()


@pytest.mark.parametrize("arch", ARCHS)
def test_greedy_generation_matches_hf_generate(arch, tiny_model_factory):
    path = tiny_model_factory(arch)
    engine = LLMEngine(EngineConfig(model=path, dtype="float32", num_kv_blocks=128, block_size=4,
                                    max_num_batched_tokens=7))
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    prompts = [engine.tokenizer(p)["input_ids"] for p in ("Hello there", "One two three four five six seven eight")]
    outs = engine.generate(prompts, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))
    for ids, out in zip(prompts, outs):
        ref = hf.generate(torch.tensor([ids]), max_new_tokens=12, min_new_tokens=12, do_sample=False,
                          pad_token_id=0)[0, len(ids):].tolist()
        assert out.outputs[0].token_ids == ref
    assert engine.allocator.all_free()


def test_rope_scaling_llama3_matches_hf(tiny_model_factory):
    rope = {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
            "original_max_position_embeddings": 64, "rope_theta": 500000.0}
    path = tiny_model_factory("llama", rope_parameters=rope)
    engine = LLMEngine(EngineConfig(model=path, dtype="float32", num_kv_blocks=64, block_size=8))
    hf = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    ids = list(range(100, 180))
    with torch.no_grad():
        ref = hf(torch.tensor([ids])).logits[0]
    torch.testing.assert_close(prompt_logits(engine, ids, 32), ref, atol=1e-4, rtol=1e-4)


def test_unsupported_architecture_is_refused(tmp_path, default_model_path):
    from transformers import GPT2Config, GPT2LMHeadModel

    GPT2LMHeadModel(GPT2Config(n_layer=1, n_embd=32, n_head=2)).save_pretrained(tmp_path)
    with pytest.raises(ModelLoadError, match="unsupported architecture.*GPT2LMHeadModel"):
        LLMEngine(EngineConfig(model=str(tmp_path)))


def test_unknown_model_path_is_refused(tmp_path):
    with pytest.raises(ModelLoadError, match="does not exist"):
        LLMEngine(EngineConfig(model=str(tmp_path / "nope")))
    with pytest.raises(ModelLoadError, match="unknown model"):
        LLMEngine(EngineConfig(model="not-a-model"))


def test_dummy_weights_build_at_config_shapes(tmp_path, tiny_model_factory):
    import shutil

    src = tiny_model_factory("qwen2")
    folder = tmp_path / "config-only"
    folder.mkdir()
    for name in ("config.json", "tokenizer.json", "tokenizer_config.json"):
        shutil.copy(f"{src}/{name}", folder / name)
    engine = LLMEngine(EngineConfig(model=str(folder), load_format="dummy", num_kv_blocks=32))
    out = engine.generate([[1, 2, 3]], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True))[0]
    assert len(out.outputs[0].token_ids) == 3
