"""SignalTracker: EWMA estimates from finished requests, stats polls, and what the predictor makes of them."""

import numpy as np
import pytest

from serving.router import DeploymentSignals, SignalTracker, parse_routes
from serving.router.predict import DEFAULT_PREFILL_TOK_S, predict
from serving.router.signals import Ewma, EwmaLine


def test_ewma_first_sample_then_moves_by_alpha():
    e = Ewma(0.25)
    assert e.update(4.0) == 4.0
    assert e.update(8.0) == pytest.approx(5.0)
    with pytest.raises(ValueError, match="alpha"):
        Ewma(0)


def test_ewma_line_matches_numpy_weighted_least_squares():
    rng = np.random.default_rng(0)
    x = rng.integers(10, 2000, size=40).astype(float)
    y = 0.03 + x / 4000 + rng.normal(0, 0.002, size=40)
    line = EwmaLine(alpha=0.1)
    for xi, yi in zip(x, y):
        line.update(xi, yi)
    a, b = line.fit()
    w = (1 - 0.1) ** np.arange(len(x) - 1, -1, -1)  # newest sample weighs 1
    b_ref, a_ref = np.polyfit(x, y, 1, w=np.sqrt(w))  # polyfit weights multiply residuals
    assert (a, b) == pytest.approx((a_ref, b_ref), rel=1e-6)


def test_ewma_line_without_spread_falls_back_to_a_ratio():
    line = EwmaLine()
    assert line.fit() is None
    for _ in range(3):
        line.update(500.0, 0.25)
    assert line.fit() == pytest.approx((0.0, 0.25 / 500))


def test_finished_requests_teach_prefill_speed_tpot_and_service_time():
    tr = SignalTracker(alpha=0.5)
    # a deployment with 20 ms overhead, 5000 prompt tok/s, 10 ms per output token
    for prompt, out in ((100, 10), (2000, 50), (800, 20), (1500, 5)):
        ttft = 0.02 + prompt / 5000
        tr.observe_request("m", ttft_s=ttft, prompt_tokens=prompt, completion_tokens=out, e2e_s=ttft + (out - 1) * 0.01)
    s = tr.get("m")
    assert s.ttft_base_s == pytest.approx(0.02) and s.prefill_tok_s == pytest.approx(5000)
    assert s.tpot_s == pytest.approx(0.01) and s.samples == 4
    # a known queue time is taken out of TTFT before fitting
    tr2 = SignalTracker()
    tr2.observe_request("m", ttft_s=1.1, prompt_tokens=500, completion_tokens=1, queue_s=1.0)
    assert tr2.get("m").prefill_tok_s == pytest.approx(5000)


def test_stats_polls_give_load_and_the_deployments_own_averages():
    tr = SignalTracker()
    tr.observe_stats("m", {"num_running": 3, "num_waiting": 2, "kv_usage": 0.7, "max_num_seqs": 4,
                           "tpot_s": 0.03, "prefill_tok_s": 3000, "kv_blocks_free": 12})
    s = tr.get("m")
    assert (s.num_running, s.num_waiting, s.kv_usage, s.max_num_seqs) == (3, 2, 0.7, 4)
    assert s.tpot_s == 0.03 and s.prefill_tok_s == 3000 and s.stats_age_s is not None
    tr.observe_stats("m", {"num_running": "x", "num_waiting": -1, "kv_usage": float("nan")})  # bad values skipped
    s = tr.get("m")
    assert (s.num_running, s.num_waiting, s.kv_usage) == (0, 0, 0.0)


def test_predictions_use_measured_then_prior_then_default_and_local_inflight():
    cand = parse_routes({"r": {"candidates": [
        {"model": "m", "input_per_1m": 1, "output_per_1m": 1, "quality": 0.5, "context_length": 4096,
         "expect": {"ttft_ms": 100, "tpot_ms": 20}}]}})["r"].candidates[0]
    p = predict(cand, DeploymentSignals(name="m"), prompt_tokens=1000, max_tokens=11)
    assert p.source == "default"  # prefill speed had neither measurement nor prior
    assert p.ttft_s == pytest.approx(0.1 + 1000 / DEFAULT_PREFILL_TOK_S)
    assert p.e2e_s == pytest.approx(p.ttft_s + 10 * 0.02)
    tr = SignalTracker()
    tr.observe_request("m", ttft_s=0.3, prompt_tokens=1000, completion_tokens=11, e2e_s=0.3 + 10 * 0.05)
    p = predict(cand, tr.get("m"), prompt_tokens=2000, max_tokens=11)
    assert p.source == "measured" and p.e2e_s == pytest.approx(0.6 + 0.5)
    # 4 slots; the last poll saw 2 running, but this gateway has since opened 6: 2 wait ahead of this one
    tr.observe_stats("m", {"num_running": 2, "num_waiting": 0, "max_num_seqs": 4})
    for _ in range(6):
        tr.begin("m")
    p = predict(cand, tr.get("m"), prompt_tokens=1000, max_tokens=11)
    service = tr.get("m").service_s
    assert p.queue_s == pytest.approx((2 + 1) / 4 * service)


def test_poll_stats_feeds_the_tracker_and_marks_unreachable_deployments_down():
    import asyncio

    from serving.router.signals import poll_stats

    tr = SignalTracker(error_cooldown_s=60)
    calls = {"up": 0, "flaky": 0}

    async def up():
        calls["up"] += 1
        return {"num_running": calls["up"], "num_waiting": 0}

    async def flaky():
        calls["flaky"] += 1
        if calls["flaky"] == 1:
            raise ConnectionError("refused")
        return {"num_running": 1}

    async def main():
        stop = asyncio.Event()
        task = asyncio.create_task(poll_stats(tr, {"up": up, "flaky": flaky}, interval_s=0.01, stop=stop))
        async def until(cond):
            for _ in range(5000):
                if cond():
                    return
                await asyncio.sleep(0.001)
            raise AssertionError("timed out")

        await until(lambda: tr.get("flaky").down_reason is not None)
        assert not tr.get("flaky").available and "stats poll failed" in tr.get("flaky").down_reason
        await until(lambda: calls["flaky"] >= 3 and tr.get("flaky").num_running == 1)
        stop.set()
        await task

    asyncio.run(main())
    assert tr.get("flaky").available  # a later successful poll brought it back
    assert tr.get("up").num_running == calls["up"] >= 3


def test_prompt_token_estimate_tracks_a_real_tokenizer_within_a_factor():
    from pathlib import Path

    from tokenizers import Tokenizer

    from serving.models import resolve_model
    from serving.router.predict import estimate_prompt_tokens

    tok = Tokenizer.from_file(str(Path(resolve_model("smollm2-135m-instruct")) / "tokenizer.json"))
    text = open(__file__).read()[:4000]
    messages = [{"role": "system", "content": "You are terse."}, {"role": "user", "content": text}]
    real = sum(len(tok.encode(m["content"]).ids) for m in messages)
    est = estimate_prompt_tokens(messages)
    assert 0.5 * real <= est <= 2 * real
    assert estimate_prompt_tokens([{"role": "user", "content": [{"type": "text", "text": "abcd" * 10}]}]) == 14
    assert estimate_prompt_tokens("abcde") == 2
