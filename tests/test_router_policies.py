"""Router.decide: predictions, each policy's choice, SLO boundaries, quality floors, overrides, exclusions."""

import pytest
from prometheus_client import CollectorRegistry

from serving.router import (
    SLO,
    DeploymentSignals,
    NoCandidateAvailable,
    RouteContextOverflow,
    RouteRequestError,
    Router,
    SignalTracker,
    UnknownRouteError,
    parse_overrides,
    parse_routes,
)
from serving.router.config import Weights
from serving.router.policies import balanced_scores

# Two deployments of known speed and price: "small" is cheap and quick per token, "big" dear and slow.
SPEC = {
    "small": dict(ttft_base_s=0.05, prefill_tok_s=10_000.0, tpot_s=0.01),
    "mid": dict(ttft_base_s=0.10, prefill_tok_s=5_000.0, tpot_s=0.02),
    "big": dict(ttft_base_s=0.20, prefill_tok_s=2_000.0, tpot_s=0.04),
}
CANDS = {
    "small": {"model": "small", "input_per_1m": 0.1, "output_per_1m": 0.4, "quality": 0.5, "context_length": 4096},
    "mid": {"model": "mid", "input_per_1m": 0.3, "output_per_1m": 1.2, "quality": 0.7, "context_length": 8192},
    "big": {"model": "big", "input_per_1m": 1.0, "output_per_1m": 4.0, "quality": 0.9, "context_length": 32768},
}


class Signals(dict):
    """A fixed signals provider: deployment name -> DeploymentSignals (loads set per test)."""

    def __init__(self, **load):
        super().__init__({n: DeploymentSignals(name=n, **SPEC[n], **load.get(n, {})) for n in SPEC})

    def get(self, name):
        return self[name]


def expected(name, prompt, max_tokens, queue_s=0.0):
    s = SPEC[name]
    ttft = queue_s + s["ttft_base_s"] + prompt / s["prefill_tok_s"]
    return ttft, ttft + (max_tokens - 1) * s["tpot_s"]


def make_router(signals=None, names=("small", "big"), **route):
    routes = parse_routes({"auto": {"candidates": [CANDS[n] for n in names], **route}})
    return Router(routes, signals if signals is not None else Signals(), registry=CollectorRegistry())


def test_prediction_is_queue_plus_prefill_plus_decode_and_cost_at_prices():
    sig = Signals(small={"num_running": 4, "num_waiting": 3, "max_num_seqs": 4, "service_s": 2.0})
    d = make_router(sig).decide("auto", prompt_tokens=1000, max_tokens=100, policy="cheapest")
    small = next(c.prediction for c in d.choices if c.model == "small")
    big = next(c.prediction for c in d.choices if c.model == "big")
    # small: 3 waiting + this one over 4 slots, each freeing every 2 s -> 2 s of queue
    assert small.queue_s == pytest.approx(2.0)
    assert (small.ttft_s, small.e2e_s) == pytest.approx(expected("small", 1000, 100, queue_s=2.0))
    assert (big.ttft_s, big.e2e_s) == pytest.approx(expected("big", 1000, 100))
    assert small.cost_usd == pytest.approx((1000 * 0.1 + 100 * 0.4) / 1e6)
    assert big.cost_usd == pytest.approx((1000 * 1.0 + 100 * 4.0) / 1e6)


def test_cheapest_fastest_and_slo_choose_differently_under_load():
    # small has a long queue: cheapest still picks it, fastest and a tight SLO pick big.
    sig = Signals(small={"num_running": 4, "num_waiting": 8, "max_num_seqs": 4, "service_s": 3.0})
    r = make_router(sig)
    assert [c.model for c in r.decide("auto", 200, 50, policy="cheapest").choices] == ["small", "big"]
    assert [c.model for c in r.decide("auto", 200, 50, policy="fastest").choices] == ["big", "small"]
    d = r.decide("auto", 200, 50, slo_ms=5000)  # an SLO alone selects the slo policy
    assert d.policy == "slo" and d.primary.model == "big" and d.slo_met is True
    # without the queue, small is both cheapest and fastest
    r2 = make_router()
    assert r2.decide("auto", 200, 50, policy="fastest").primary.model == "small"


def test_slo_boundary_just_inside_and_just_outside():
    r = make_router(names=("small", "mid", "big"))
    prompt, n = 500, 200
    small_ttft, small_e2e = expected("small", prompt, n)
    mid_ttft, mid_e2e = expected("mid", prompt, n)
    # cheapest meeting the SLO is small exactly at its predicted latency (inclusive) ...
    d = r.decide("auto", prompt, n, policy="slo", slo_ms=SLO(e2e_ms=small_e2e * 1000 * (1 + 1e-9)))
    assert d.primary.model == "small" and d.slo_met
    # ... and the order is cheapest-first among those meeting it
    assert [c.model for c in d.choices] == ["small", "mid", "big"]
    # nobody is faster than small, so just below it no one meets: best effort, fastest first
    d = r.decide("auto", prompt, n, policy="slo", slo_ms=SLO(e2e_ms=small_e2e * 1000 * (1 - 1e-9)))
    assert d.slo_met is False and [c.model for c in d.choices] == ["small", "mid", "big"]
    assert "misses SLO" in d.primary.reason
    # a TTFT objective: small is fastest to first token; just below it, best effort again
    d = r.decide("auto", prompt, n, slo_ms=SLO(ttft_ms=small_ttft * 1000 * (1 + 1e-9)))
    assert d.primary.model == "small" and d.slo_met
    # when small is loaded, the SLO boundary moves the choice to mid (cheapest of the rest meeting it)
    loaded = Signals(small={"num_running": 2, "num_waiting": 2, "max_num_seqs": 2, "service_s": 10.0})
    r = make_router(loaded, names=("small", "mid", "big"))
    d = r.decide("auto", prompt, n, slo_ms=SLO(e2e_ms=mid_e2e * 1000 * (1 + 1e-9)))
    assert [c.model for c in d.choices][0] == "mid" and d.slo_met
    d = r.decide("auto", prompt, n, slo_ms=SLO(e2e_ms=mid_e2e * 1000 * (1 - 1e-9)))
    assert d.slo_met is False and d.primary.model == "mid"  # best effort: mid is still the fastest


def test_balanced_weights_reduce_to_single_objectives_and_mix_them():
    r = make_router(names=("small", "mid", "big"), policy="balanced")
    only = lambda **w: parse_routes(  # noqa: E731
        {"auto": {"candidates": [CANDS[n] for n in ("small", "mid", "big")], "weights": w}}
    )
    sig = Signals(small={"num_running": 4, "num_waiting": 8, "max_num_seqs": 4, "service_s": 3.0})
    for weights, policy in (({"cost": 1, "latency": 0, "quality": 0}, "cheapest"),
                            ({"cost": 0, "latency": 1, "quality": 0}, "fastest")):
        rb = Router(only(**weights), sig, registry=CollectorRegistry())
        assert [c.model for c in rb.decide("auto", 300, 80).choices] == [
            c.model for c in rb.decide("auto", 300, 80, policy=policy).choices
        ]
    rq = Router(only(cost=0, latency=0, quality=1), sig, registry=CollectorRegistry())
    assert rq.decide("auto", 300, 80).primary.model == "big"
    # default weights (1, 1, 1) on an idle system, checked against scores computed by hand
    d = r.decide("auto", 1000, 100)
    preds = {c.model: c.prediction for c in d.choices}
    costs = {m: p.cost_usd for m, p in preds.items()}
    lats = {m: p.e2e_s for m, p in preds.items()}
    quals = {"small": 0.5, "mid": 0.7, "big": 0.9}

    def norm(vals, m):
        return (vals[m] - min(vals.values())) / (max(vals.values()) - min(vals.values()))

    hand = {m: (norm(costs, m) + norm(lats, m) + (1 - norm(quals, m))) / 3 for m in preds}
    got = dict(zip(preds, balanced_scores(list(preds.values()), Weights())))
    assert got == pytest.approx(hand)
    assert [c.model for c in d.choices] == sorted(hand, key=hand.get)


def test_quality_floor_from_route_and_per_request():
    r = make_router(names=("small", "mid", "big"), policy="cheapest", quality_floor=0.6)
    d = r.decide("auto", 100, 10)
    assert [c.model for c in d.choices] == ["mid", "big"]
    assert ("small", "quality 0.5 < floor 0.6") in d.excluded
    assert r.decide("auto", 100, 10, quality_floor=0.8).primary.model == "big"
    assert r.decide("auto", 100, 10, quality_floor=0.0).primary.model == "mid"  # a request cannot lower it
    with pytest.raises(RouteRequestError, match="quality >= 0.95") as info:
        r.decide("auto", 100, 10, quality_floor=0.95)
    assert info.value.status == 400


def test_context_length_excludes_candidates_and_overflow_everywhere_is_a_400():
    r = make_router(names=("small", "big"), policy="cheapest")
    d = r.decide("auto", prompt_tokens=4000, max_tokens=200)
    assert [c.model for c in d.choices] == ["big"]
    assert d.excluded == [("small", "context 4200 > 4096 tokens")]
    # without max_tokens only the prompt has to fit
    assert r.decide("auto", prompt_tokens=4000).primary.model == "small"
    with pytest.raises(RouteContextOverflow) as info:
        r.decide("auto", prompt_tokens=40_000, max_tokens=10)
    assert info.value.status == 400 and info.value.code == "context_length_exceeded"


def test_down_candidates_are_skipped_and_all_down_is_503():
    now = [100.0]
    tracker = SignalTracker(error_cooldown_s=5.0, clock=lambda: now[0])
    r = make_router(tracker, policy="cheapest")
    assert r.decide("auto", 10, 10).primary.model == "small"
    tracker.mark_overloaded("small", retry_after=2.0)
    d = r.decide("auto", 10, 10)
    assert [c.model for c in d.choices] == ["big"] and d.excluded == [("small", "down: overloaded (429)")]
    tracker.mark_failed("big", "server_error")
    with pytest.raises(NoCandidateAvailable) as info:
        r.decide("auto", 10, 10)
    assert info.value.status == 503 and info.value.retry_after == pytest.approx(2.0)
    assert "small: down: overloaded" in str(info.value) and "big: down: server_error" in str(info.value)
    now[0] += 2.5  # small's cooldown is over, big's (5 s) is not
    assert [c.model for c in r.decide("auto", 10, 10).choices] == ["small"]
    tracker.observe_stats("small", {"healthy": False})  # a deployment may report itself unhealthy
    with pytest.raises(NoCandidateAvailable):
        r.decide("auto", 10, 10)


def test_bad_decide_arguments_and_unknown_route():
    r = make_router()
    with pytest.raises(UnknownRouteError, match="unknown route 'nope'; routes: auto"):
        r.decide("nope", 10, 10)
    with pytest.raises(RouteRequestError, match="unknown route policy 'cheap'"):
        r.decide("auto", 10, 10, policy="cheap")
    with pytest.raises(RouteRequestError, match="policy 'slo' needs an SLO") as info:
        r.decide("auto", 10, 10, policy="slo")
    assert info.value.param == "X-Latency-SLO-Ms"
    with pytest.raises(RouteRequestError, match="max_tokens"):
        r.decide("auto", 10, 0)
    with pytest.raises(RouteRequestError, match="prompt_tokens"):
        r.decide("auto", -1, 10)


def test_route_default_policy_and_slo_are_used_and_overrides_win():
    r = make_router(policy="slo", slo={"e2e_ms": 1}, names=("small", "big"))
    d = r.decide("auto", 10, 10)
    assert d.policy == "slo" and d.slo.e2e_ms == 1 and d.slo_met is False
    assert r.decide("auto", 10, 10, policy="cheapest").policy == "cheapest"
    ov = parse_overrides({"x-route-policy": "Fastest", "X-Latency-SLO-Ms": "ttft=300,e2e=2000"})
    d = r.decide("auto", 10, 10, **ov.as_kwargs())
    assert d.policy == "fastest" and d.slo is None  # the SLO is only reported for the slo policy


def test_decisions_are_counted_in_prometheus():
    registry = CollectorRegistry()
    sig = Signals(small={"num_running": 4, "num_waiting": 8, "max_num_seqs": 4, "service_s": 3.0})
    r = Router(parse_routes({"auto": {"candidates": [CANDS["small"], CANDS["big"]]}}), sig, registry=registry)
    for _ in range(3):
        r.decide("auto", 10, 10, policy="cheapest")
    r.decide("auto", 10, 10, policy="fastest")
    r.decide("auto", 10, 10, slo_ms=0.001)
    value = registry.get_sample_value
    assert value("loraplex_route_decisions_total", {"route": "auto", "policy": "cheapest", "model": "small"}) == 3
    assert value("loraplex_route_decisions_total", {"route": "auto", "policy": "fastest", "model": "big"}) == 1
    assert value("loraplex_route_slo_unmet_total", {"route": "auto"}) == 1
    # a second router on the same registry shares the counters instead of failing to register them
    Router(r.routes, sig, registry=registry).decide("auto", 10, 10, policy="cheapest")
    assert value("loraplex_route_decisions_total", {"route": "auto", "policy": "cheapest", "model": "small"}) == 4
