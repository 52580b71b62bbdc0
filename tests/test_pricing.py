"""serving.pricing: per-1M-token prices and GPU-hour prices turned into per-token prices."""

import math

import pytest
from hypothesis import given
from hypothesis import strategies as st

from serving.pricing import Price


def test_cost_is_tokens_times_price_per_million():
    p = Price(input_per_1m=0.5, output_per_1m=1.5)
    assert p.cost(0, 0) == 0
    assert p.cost(2_000_000, 0) == pytest.approx(1.0)
    assert p.cost(0, 1_000_000) == pytest.approx(1.5)
    assert p.cost(1000, 200) == pytest.approx(1000 * 0.5e-6 + 200 * 1.5e-6)


@given(
    usd=st.floats(0.01, 100),
    in_tps=st.floats(1, 1e6),
    out_tps=st.floats(1, 1e5),
    n_in=st.integers(0, 10**7),
    n_out=st.integers(0, 10**6),
)
def test_gpu_hour_price_charges_the_gpu_time_the_tokens_take(usd, in_tps, out_tps, n_in, n_out):
    # Independent formulation: the tokens occupy the GPU for n/throughput seconds, billed at usd per hour.
    p = Price.from_gpu_hour(usd, input_tok_s=in_tps, output_tok_s=out_tps)
    gpu_seconds = n_in / in_tps + n_out / out_tps
    assert math.isclose(p.cost(n_in, n_out), gpu_seconds / 3600 * usd, rel_tol=1e-9, abs_tol=1e-15)


def test_utilization_spreads_idle_time_over_served_tokens():
    full = Price.from_gpu_hour(2.0, input_tok_s=10_000, output_tok_s=500)
    half = Price.from_gpu_hour(2.0, input_tok_s=10_000, output_tok_s=500, utilization=0.5)
    assert half.cost(100, 100) == pytest.approx(2 * full.cost(100, 100))
    assert full.output_per_1m > full.input_per_1m  # decode is slower than prefill, so pricier


@pytest.mark.parametrize(
    "kwargs, field",
    [
        ({"input_per_1m": -1, "output_per_1m": 1}, "input_per_1m"),
        ({"input_per_1m": 1, "output_per_1m": float("nan")}, "output_per_1m"),
        ({"input_per_1m": "1", "output_per_1m": 1}, "input_per_1m"),
    ],
)
def test_bad_prices_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field):
        Price(**kwargs)


def test_bad_gpu_hour_inputs_name_the_argument():
    with pytest.raises(ValueError, match="output_tok_s"):
        Price.from_gpu_hour(2.0, input_tok_s=1000, output_tok_s=0)
    with pytest.raises(ValueError, match="utilization"):
        Price.from_gpu_hour(2.0, input_tok_s=1000, output_tok_s=10, utilization=1.5)
    with pytest.raises(ValueError, match="usd_per_hour"):
        Price.from_gpu_hour(-1, input_tok_s=1000, output_tok_s=10)
    with pytest.raises(ValueError, match="token counts"):
        Price(1, 1).cost(-1, 0)
