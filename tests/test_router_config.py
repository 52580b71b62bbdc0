"""Routes config: valid routes parse; mistakes raise RouteConfigError naming route, candidate and field."""

import pytest

from serving.pricing import Price
from serving.router import RouteConfigError, load_routes, parse_routes

SMALL = {"model": "small", "input_per_1m": 0.1, "output_per_1m": 0.4, "quality": 0.5, "context_length": 4096}
BIG = {"model": "big", "gpu_hour_usd": 3.6, "input_tok_s": 1000, "output_tok_s": 100, "quality": 0.9,
       "context_length": 32768, "expect": {"ttft_ms": 200, "tpot_ms": 40}}


def test_valid_routes_parse_with_both_price_forms():
    routes = parse_routes({"routes": {"auto": {"policy": "cheapest", "candidates": [SMALL, BIG]}}})
    route = routes["auto"]
    assert route.name == "auto" and route.policy == "cheapest"
    assert route.candidates[0].price == Price(0.1, 0.4)
    assert route.candidates[1].price == Price.from_gpu_hour(3.6, input_tok_s=1000, output_tok_s=100)
    assert route.candidates[1].deployment_name == "big"
    # the routes mapping may also be given without the top-level "routes" key
    assert parse_routes({"auto": {"candidates": [SMALL]}})["auto"].policy == "balanced"


@pytest.mark.parametrize(
    "route, needle",
    [
        ({"candidates": [{**SMALL, "colour": "red"}]}, "routes.auto.candidates[0].colour: unknown field"),
        ({"candidates": [{**SMALL, "input_per_1m": -1}]}, "routes.auto.candidates[0].input_per_1m"),
        ({"candidates": [{k: v for k, v in SMALL.items() if k != "output_per_1m"}]}, "missing price: output_per_1m"),
        ({"candidates": [{**SMALL, "gpu_hour_usd": 2}]}, "either input_per_1m"),
        ({"candidates": [{**BIG, "output_tok_s": None}]}, "needs output_tok_s"),
        ({"candidates": [{**SMALL, "quality": 1.5}]}, "routes.auto.candidates[0].quality"),
        ({"candidates": [{**SMALL, "context_length": 0}]}, "routes.auto.candidates[0].context_length"),
        ({"candidates": [SMALL, SMALL]}, "candidate models listed twice: small"),
        ({"candidates": []}, "routes.auto.candidates"),
        ({"candidates": [SMALL], "policy": "cheap"}, "routes.auto.policy"),
        ({"candidates": [SMALL], "policy": "slo"}, "policy 'slo' needs an slo"),
        ({"candidates": [SMALL], "slo": {}}, "an SLO needs ttft_ms, e2e_ms or both"),
        ({"candidates": [SMALL], "quality_floor": 0.8}, "quality_floor 0.8 excludes every candidate"),
        ({"candidates": [SMALL], "weights": {"cost": 0, "latency": 0, "quality": 0}}, "at least one balanced weight"),
        ({"candidates": [{**SMALL, "expect": {"tpot": 3}}]}, "routes.auto.candidates[0].expect.tpot: unknown field"),
        ("nope", "routes.auto: must be a mapping"),
    ],
)
def test_config_errors_name_the_field(route, needle):
    with pytest.raises(RouteConfigError) as info:
        parse_routes({"routes": {"auto": route}})
    assert needle in str(info.value)


def test_empty_or_wrong_top_level_is_refused():
    for data in ({}, [], None, {"routes": {}}):
        with pytest.raises(RouteConfigError, match="non-empty mapping"):
            parse_routes(data)


def test_load_routes_from_yaml_file(tmp_path):
    path = tmp_path / "routes.yaml"
    path.write_text(
        "routes:\n  chat-default:\n    policy: slo\n    slo: {e2e_ms: 2000}\n    candidates:\n"
        "      - {model: small, input_per_1m: 0.1, output_per_1m: 0.4, quality: 0.5, context_length: 4096}\n"
    )
    routes = load_routes(path)
    assert routes["chat-default"].slo.e2e_ms == 2000
    path.write_text("routes:\n  chat-default:\n    candidates:\n      - {model: small, quality: 0.5}\n")
    with pytest.raises(RouteConfigError, match=r"routes.yaml: routes.chat-default.candidates\[0\].context_length"):
        load_routes(path)
    with pytest.raises(RouteConfigError, match="does not exist"):
        load_routes(tmp_path / "missing.yaml")


def test_candidates_take_price_and_context_from_served_models():
    models = {"small": {"input_per_1m": 0.1, "output_per_1m": 0.4, "context_length": 4096},
              "big": {"input_per_1m": 1.0, "output_per_1m": 4.0, "context_length": 32768}}
    routes = parse_routes({"auto": {"candidates": [
        {"model": "small", "quality": 0.5},
        {"model": "small:sql", "quality": 0.6, "input_per_1m": 0.2, "output_per_1m": 0.5},  # an adapter
        {"model": "big", "quality": 0.9, "gpu_hour_usd": 3.6, "input_tok_s": 1000, "output_tok_s": 100,
         "context_length": 8192},
    ]}}, models=models)
    small, adapter, big = routes["auto"].candidates
    assert small.price == Price(0.1, 0.4) and small.context_length == 4096
    assert adapter.price == Price(0.2, 0.5) and adapter.context_length == 4096
    assert adapter.deployment_name == "small"  # an adapter shares its base model's engine and signals
    assert big.price == Price.from_gpu_hour(3.6, input_tok_s=1000, output_tok_s=100) and big.context_length == 8192
    with pytest.raises(RouteConfigError, match=r"routes.auto.candidates\[0\].model: 'tiny' is not a served model"):
        parse_routes({"auto": {"candidates": [{"model": "tiny", "quality": 0.5}]}}, models=models)
    with pytest.raises(RouteConfigError, match="small is both a route and a served model"):
        parse_routes({"small": {"candidates": [{"model": "big", "quality": 0.5}]}}, models=models)
