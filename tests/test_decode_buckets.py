"""Decode buckets (serving.engine.decode_buckets): padded decode steps on persistent inputs give the unpadded
step's tokens and log-probs; prefills, LoRA batches and batches past the largest bucket take the plain step;
cuda_graphs is refused off CUDA."""

import pytest

from tests.conftest import make_lora_adapter
from serving.engine import EngineConfig, SamplingParams
from serving.engine.decode_buckets import DecodeBuckets, bucket_sizes
from serving.engine.errors import ModelLoadError
from serving.engine.llm_engine import LLMEngine


def test_bucket_sizes_are_vllm_capture_sizes_up_to_max_seqs():
    assert bucket_sizes(64) == [1, 2, 4, 8, 16, 24, 32, 40, 48, 56, 64]
    assert bucket_sizes(5) == [1, 2, 4, 5]
    assert bucket_sizes(1) == [1]
    assert bucket_sizes(20) == [1, 2, 4, 8, 16, 20]


def _engine(path, dtype="float32", **kw):
    return LLMEngine(EngineConfig(model=path, dtype=dtype, num_kv_blocks=128, block_size=8, max_num_seqs=12,
                                  enable_prefix_caching=False, **kw))


def _run(engine, prompts, params, lora_names=None):
    """Tokens and top-logprobs per prompt, and the bucket of every bucketed step."""
    buckets = []
    if engine.buckets is not None:
        real = engine.buckets._forward
        engine.buckets._forward = lambda b: buckets.append(b) or real(b)
    outs = engine.generate(prompts, params, lora_names)
    res = [(o.outputs[0].token_ids, [(lp.token_id, lp.logprob) for lp in o.outputs[0].logprobs]) for o in outs]
    return res, buckets


@pytest.mark.parametrize("arch,dtype", [("llama", "float32"), ("qwen2", "float32"), ("llama", "bfloat16")])
def test_padded_decode_steps_equal_the_plain_steps(arch, dtype, tiny_model_factory):
    """float32 per op, and bf16 through the fused C step (whose rows do not depend on the batch's size)."""
    path = tiny_model_factory(arch)
    bucketed, plain = _engine(path, dtype, decode_buckets=True), _engine(path, dtype)
    assert (bucketed.model.fused is not None) == (dtype == "bfloat16")
    prompts = [[5, 6, 7], list(range(20, 45)), [9], [30, 31], [40] * 6, [11, 12, 13, 14]]
    # different lengths: the batch shrinks 6 -> 1 as requests finish, through buckets 8, 4, 2 and 1
    params = [SamplingParams(temperature=0, max_tokens=m, ignore_eos=True, logprobs=2) for m in (3, 5, 7, 9, 11, 13)]
    got, buckets = _run(bucketed, prompts, params)
    want, _ = _run(plain, prompts, params)
    assert got == want
    assert set(buckets) == {8, 4, 2, 1} and buckets[0] == 8
    assert bucketed.allocator.all_free() and bucketed.kv_caches[0][0].shape[0] == 129  # the pad block
    sampled = [SamplingParams(temperature=0.8, max_tokens=6, seed=7 + i, ignore_eos=True, logprobs=1)
               for i in range(len(prompts))]
    assert _run(bucketed, prompts, sampled)[0] == _run(plain, prompts, sampled)[0]


def test_prefills_lora_and_oversized_batches_take_the_plain_step(tiny_model_factory, tmp_path):
    path = tiny_model_factory("llama")
    engine = _engine(path, decode_buckets=True, max_loras=2)
    params = SamplingParams(temperature=0, max_tokens=4, ignore_eos=True, logprobs=1)
    plain = _engine(path, max_loras=2)
    adapter = make_lora_adapter(path, tmp_path / "a", rank=4, seed=1)
    engine.add_lora("a", adapter)
    plain.add_lora("a", adapter)
    got, buckets = _run(engine, [[5, 6, 7], [8, 9]], params, ["a", None])
    assert buckets == []  # a LoRA batch
    assert got == _run(plain, [[5, 6, 7], [8, 9]], params, ["a", None])[0]
    got, buckets = _run(engine, [[5, 6, 7], [8, 9]], params)
    assert got == _run(plain, [[5, 6, 7], [8, 9]], params)[0] and buckets == [2, 2, 2]  # 3 decode steps
    small = DecodeBuckets(engine.model, engine.kv_caches, 128, 8, 2, 64, engine.device)
    assert small.bucket(3) is None and small.bucket(2) == 2


def test_cuda_graphs_are_refused_off_cuda(tiny_model_factory):
    with pytest.raises(ModelLoadError, match="cuda_graphs needs a CUDA device"):
        _engine(tiny_model_factory("llama"), cuda_graphs=True)
