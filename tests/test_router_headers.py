"""Per-request routing overrides (headers and body fields) and the transparency response headers."""

import pytest

from serving.router import SLO, RouteRequestError, parse_overrides, pop_route_fields


def test_headers_are_parsed_case_insensitively():
    ov = parse_overrides({"x-route-policy": " CHEAPEST ", "X-LATENCY-SLO-MS": "1500", "x-route-min-quality": "0.7"})
    assert ov.policy == "cheapest" and ov.slo == SLO(e2e_ms=1500) and ov.quality_floor == 0.7
    assert parse_overrides({"X-Latency-SLO-Ms": "ttft=250, e2e_ms=3000"}).slo == SLO(ttft_ms=250, e2e_ms=3000)
    assert parse_overrides({"X-Latency-SLO-Ms": "ttft=250"}).slo == SLO(ttft_ms=250)
    assert parse_overrides({}, {}) == parse_overrides()


def test_body_fields_and_header_precedence():
    body = {"model": "auto", "route_policy": "fastest", "route_slo_ms": {"ttft_ms": 100}, "route_min_quality": 0.5}
    ov = parse_overrides({}, body)
    assert ov.policy == "fastest" and ov.slo == SLO(ttft_ms=100) and ov.quality_floor == 0.5
    assert parse_overrides({"X-Route-Policy": "slo"}, body).policy == "slo"  # the header wins
    assert parse_overrides({}, {"route_slo_ms": 900}).slo == SLO(e2e_ms=900)
    assert pop_route_fields(dict(body)) == {"model": "auto"}


@pytest.mark.parametrize(
    "headers, body, param, needle",
    [
        ({"X-Route-Policy": "cheap"}, None, "X-Route-Policy", "unknown route policy 'cheap'"),
        ({"X-Latency-SLO-Ms": "fast"}, None, "X-Latency-SLO-Ms", "must be a number of milliseconds"),
        ({"X-Latency-SLO-Ms": "0"}, None, "X-Latency-SLO-Ms", "must be > 0"),
        ({"X-Latency-SLO-Ms": "-5"}, None, "X-Latency-SLO-Ms", "must be > 0"),
        ({"X-Latency-SLO-Ms": "inf"}, None, "X-Latency-SLO-Ms", "must be > 0"),
        ({"X-Latency-SLO-Ms": "ttft=1,ttft=2"}, None, "X-Latency-SLO-Ms", "cannot parse"),
        ({"X-Latency-SLO-Ms": "p99=100"}, None, "X-Latency-SLO-Ms", "cannot parse"),
        ({"X-Latency-SLO-Ms": "ttft=abc"}, None, "X-Latency-SLO-Ms", "ttft must be a number"),
        ({"X-Route-Min-Quality": "1.5"}, None, "X-Route-Min-Quality", "in [0, 1]"),
        ({}, {"route_policy": 3}, "route_policy", "unknown route policy 3"),
        ({}, {"route_slo_ms": True}, "route_slo_ms", "must be a number"),
        ({}, {"route_slo_ms": {"p50": 1}}, "route_slo_ms", "invalid SLO"),
        ({}, {"route_min_quality": "high"}, "route_min_quality", "quality floor"),
    ],
)
def test_bad_override_values_are_400_naming_the_header_or_field(headers, body, param, needle):
    with pytest.raises(RouteRequestError) as info:
        parse_overrides(headers, body)
    assert info.value.status == 400 and info.value.param == param
    assert needle in info.value.message and param in info.value.message
    assert info.value.body()["error"]["type"] == "invalid_request_error"
