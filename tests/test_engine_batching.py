"""Continuous batching must not change results: concurrency, preemption and prefix-cache hits are invisible."""

import asyncio
import random

import pytest

from serving.engine import (ContextLengthExceededError, EngineConfig, EngineOverloadedError, InvalidRequestError,
                            SamplingParams)
from serving.engine.async_engine import AsyncEngine
from serving.engine.llm_engine import LLMEngine

SYSTEM = "You are a careful assistant. Answer briefly and precisely, and never invent facts. "


def prompts(tokenizer, n, seed=0, max_words=60):
    rng = random.Random(seed)
    words = "alpha beta gamma delta river stone cloud paper seven green quick lazy".split()
    # A shared system prompt of several blocks, then a tail of 1..60 words: prefix-cache hits and ragged lengths.
    return [tokenizer(SYSTEM + " ".join(rng.choice(words) for _ in range(rng.randint(1, max_words))))["input_ids"]
            for _ in range(n)]


def alone(engine, ids, params):
    return [engine.generate([p], params)[0].outputs[0].token_ids for p in ids]


def assert_same_up_to_float_ties(engine, ids, got, expected, params):
    """Equal, or first diverging where the solo run's top-2 logits tie within float noise (tiny random
    models over a 49k vocabulary have exact ties; the real model's test demands plain equality)."""
    for p, g, e in zip(ids, got, expected):
        if g == e:
            continue
        k = next(i for i, (a, b) in enumerate(zip(g, e)) if a != b)
        solo = engine.generate([p], SamplingParams(**{**params.__dict__, "logprobs": 2}))[0].outputs[0]
        top = solo.logprobs[k].top
        assert abs(top[0][2] - top[1][2]) < 1e-4, f"diverged at token {k} without a tie: {top}"


def together(engine, ids, params):
    return [o.outputs[0].token_ids for o in engine.generate(ids, params)]


@pytest.mark.parametrize("num_kv_blocks", [512, 40], ids=["roomy-cache", "forced-preemption"])
def test_64_concurrent_requests_equal_each_alone_tiny(tiny_model_factory, num_kv_blocks):
    path = tiny_model_factory("llama")
    params = SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)
    # float32, the batch-invariant format: bf16 rows go through our C GEMM up to 64 rows and oneDNN past that,
    # whose sums differ by an ulp, so a bf16 batch may flip a near-tie that a solo run does not
    ref_engine = LLMEngine(EngineConfig(model=path, num_kv_blocks=512, block_size=8, dtype="float32"))
    ids = prompts(ref_engine.tokenizer, 64)
    expected = alone(ref_engine, ids, params)
    engine = LLMEngine(EngineConfig(model=path, num_kv_blocks=num_kv_blocks, block_size=8, dtype="float32",
                                    max_num_batched_tokens=96, max_num_seqs=64))
    assert_same_up_to_float_ties(ref_engine, ids, together(engine, ids, params), expected, params)
    stats = engine.stats()
    assert stats["prefix_cache_hits"] > 0
    if num_kv_blocks == 40:
        assert stats["num_preemptions"] > 0
    assert engine.allocator.all_free()


@pytest.mark.slow
def test_default_model_64_concurrent_equal_alone_with_preemption(default_model_path):
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)
    engine = LLMEngine(EngineConfig(model="smollm2-135m-instruct", dtype="float32", num_kv_blocks=40, block_size=16,
                                    max_num_batched_tokens=256))  # float32: the batch-invariant format
    ids = prompts(engine.tokenizer, 64, seed=1, max_words=30)
    expected = alone(engine, ids, params)
    assert engine.stats()["prefix_cache_hits"] > 0  # the shared system prompt came from the cache
    assert together(engine, ids, params) == expected
    assert engine.stats()["num_preemptions"] > 0
    assert engine.allocator.all_free()


def test_same_seed_same_text_and_n_choices(tiny_model_factory):
    engine = LLMEngine(EngineConfig(model=tiny_model_factory("llama"), num_kv_blocks=256))
    params = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, max_tokens=16, seed=1234, n=3, ignore_eos=True)
    a = engine.generate(["Once upon a time"], params)[0]
    b = engine.generate(["Once upon a time"], params)[0]
    assert [o.token_ids for o in a.outputs] == [o.token_ids for o in b.outputs]
    assert len(a.outputs) == 3 and len({tuple(o.token_ids) for o in a.outputs}) > 1  # choices differ
    c = engine.generate(["Once upon a time"], SamplingParams(**{**params.__dict__, "seed": 99}))[0]
    assert [o.token_ids for o in c.outputs] != [o.token_ids for o in a.outputs]
    assert engine.allocator.all_free()


def test_stop_strings_stop_tokens_and_logprobs(tiny_model_factory):
    engine = LLMEngine(EngineConfig(model=tiny_model_factory("llama"), num_kv_blocks=256))
    greedy = SamplingParams(temperature=0, max_tokens=20, ignore_eos=True, logprobs=3)
    full = engine.generate(["Hello"], greedy)[0].outputs[0]
    assert len(full.logprobs) == 20 and all(len(lp.top) == 3 for lp in full.logprobs)
    assert all(lp.top[0][2] >= lp.logprob - 1e-6 for lp in full.logprobs)  # greedy picks the top token
    # Stop on a string taken from the middle of the greedy text: output ends right before it.
    text = full.text
    stop = text[len(text) // 2:len(text) // 2 + 3]
    if stop.strip():
        out = engine.generate(["Hello"], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True,
                                                        stop=[stop]))[0].outputs[0]
        assert out.finish_reason == "stop" and out.stop_reason == stop
        assert out.text == text[:text.find(stop)]
    tok = full.token_ids[5]
    out = engine.generate(["Hello"], SamplingParams(temperature=0, max_tokens=20, ignore_eos=True,
                                                    stop_token_ids=[tok]))[0].outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == tok and out.token_ids[-1] == tok
    assert out.token_ids == full.token_ids[:full.token_ids.index(tok) + 1]
    assert engine.allocator.all_free()


def test_bad_requests_are_refused_before_any_work(tiny_model_factory):
    engine = LLMEngine(EngineConfig(model=tiny_model_factory("llama"), num_kv_blocks=64, block_size=8))
    cases = [
        (SamplingParams(max_tokens=0), "max_tokens"),
        (SamplingParams(n=0), "n"),
        (SamplingParams(n=99), "n"),
        (SamplingParams(logprobs=50), "top_logprobs"),
        (SamplingParams(stop=["x"] * 40), "stop"),
        (SamplingParams(temperature=-1), "temperature"),
        (SamplingParams(top_p=0), "top_p"),
    ]
    for params, param in cases:
        with pytest.raises(InvalidRequestError) as err:
            engine.add_request("hi", params)
        assert err.value.param == param
    with pytest.raises(ContextLengthExceededError) as err:
        engine.add_request(list(range(1, 500)), SamplingParams(max_tokens=100))
    assert err.value.code == "context_length_exceeded"
    with pytest.raises(InvalidRequestError, match="empty"):
        engine.add_request([], SamplingParams())
    assert not engine.has_unfinished() and engine.allocator.all_free()


def test_async_streaming_abort_frees_blocks(tiny_model_factory):
    engine = AsyncEngine(EngineConfig(model=tiny_model_factory("llama"), num_kv_blocks=256, max_waiting=4))

    async def main():
        params = SamplingParams(temperature=0, max_tokens=200, ignore_eos=True)
        chunks = 0
        async for out in engine.generate("Tell me a story", params):
            chunks += 1
            if chunks == 5:
                break  # the consumer leaves: the request is aborted
        full = [o async for o in engine.generate("Count", SamplingParams(temperature=0, max_tokens=7,
                                                                          ignore_eos=True))]
        assert sum(len(o.outputs[0].token_ids) for o in full if o.outputs) == 7 and full[-1].finished
        await asyncio.sleep(0.3)
        return chunks

    try:
        assert asyncio.run(main()) == 5
        assert engine.stats()["kv_blocks_free"] == engine.stats()["kv_blocks_total"]
    finally:
        engine.shutdown()


def test_async_queue_limit_raises_overloaded(tiny_model_factory):
    engine = AsyncEngine(EngineConfig(model=tiny_model_factory("llama"), num_kv_blocks=256, max_waiting=0))

    async def main():
        with pytest.raises(EngineOverloadedError):
            async for _ in engine.generate("hi", SamplingParams(max_tokens=2)):
                pass

    try:
        asyncio.run(main())
    finally:
        engine.shutdown()


def test_async_coalesced_deltas_carry_the_same_tokens_text_and_logprobs(tiny_model_factory):
    """A consumer that reads one answer asks for deltas gathered over a while (the replica of a non-streaming
    request): fewer items, and joined they equal the per-step stream and the synchronous engine exactly."""
    engine = AsyncEngine(EngineConfig(model=tiny_model_factory("llama"), num_kv_blocks=256))
    params = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, logprobs=2, n=2, seed=3)

    async def collect(coalesce_s):
        items = [o async for o in engine.generate("Tell me a story", params, coalesce_s=coalesce_s)]
        joined = {}
        for o in items:
            for c in o.outputs:
                j = joined.setdefault(c.index, {"ids": [], "text": "", "lps": [], "finish": None})
                j["ids"] += c.token_ids
                j["text"] += c.text
                j["lps"] += [(lp.token_id, round(lp.logprob, 5)) for lp in c.logprobs or []]
                j["finish"] = c.finish_reason
        return items, joined

    async def main():
        per_step = await collect(0.0)
        gathered = await collect(10.0)  # longer than the request: the first delta, then one with the rest
        return per_step, gathered

    try:
        (steps, a), (fewer, b) = asyncio.run(main())
        assert a == b and len(a) == 2 and all(len(c["ids"]) == 40 and c["finish"] == "length" for c in a.values())
        assert len(fewer) == 2 < len(steps) and fewer[-1].finished and not fewer[0].finished
        sync = engine.run_in_engine(lambda e: e.generate(["Tell me a story"], params)).result(timeout=60)[0]
        assert {c.index: c.token_ids for c in sync.outputs} == {i: c["ids"] for i, c in a.items()}
    finally:
        engine.shutdown()


def test_async_engine_pauses_after_a_streamed_first_token_only(tiny_model_factory, monkeypatch):
    """After a step that gave a streamed request (coalesce_s 0) its first token, the CPU loop sleeps
    first_token_pause_ms once; a gathered (non-streaming) request never pauses it, nor do its later tokens; two
    first tokens within FIRST_TOKEN_PAUSE_EVERY_S pause it once, unless at most FIRST_TOKEN_PAUSE_ALWAYS_UP_TO
    requests run (each pauses then)."""
    import serving.engine.async_engine as ae

    engine = AsyncEngine(EngineConfig(model=tiny_model_factory("llama"), num_kv_blocks=256))
    assert engine.first_token_pause_s == 0.004  # the CPU default
    pauses = []
    real = engine._pause_for_first_token
    engine._pause_for_first_token = lambda: pauses.append(engine._last_pause) or real()
    params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True)

    async def run(coalesce_s, n=1):
        async def one(i):
            return [o async for o in engine.generate(f"Hello {i}", params, coalesce_s=coalesce_s)]
        return await asyncio.gather(*(one(i) for i in range(n)))

    try:
        asyncio.run(run(0.5))
        assert pauses == []  # gathered: no pause
        asyncio.run(run(0.0))
        assert len(pauses) == 1 and engine._last_pause > 0  # one pause, after the first token only
        monkeypatch.setattr(ae, "FIRST_TOKEN_PAUSE_EVERY_S", 60.0)
        slept = engine._last_pause
        asyncio.run(run(0.0))
        assert engine._last_pause > slept  # within the interval, but a lone request: slept again
        monkeypatch.setattr(ae, "FIRST_TOKEN_PAUSE_ALWAYS_UP_TO", 0)
        slept = engine._last_pause
        asyncio.run(run(0.0, n=3))
        assert engine._last_pause == slept  # within the interval: asked, not slept
        assert not engine._awaiting_first
    finally:
        engine.shutdown()
    off = AsyncEngine(EngineConfig(model=tiny_model_factory("llama"), num_kv_blocks=64, first_token_pause_ms=0))
    try:
        assert off.first_token_pause_s == 0
    finally:
        off.shutdown()
