"""The serve config: configs/serve.yaml loads and documents every key; mistakes name the key and the file."""

from __future__ import annotations

import re
from pathlib import Path

import pytest

from serving.config import (
    DEFAULT_MODEL_PRICE,
    ActorOptions,
    AdapterSpec,
    Autoscaling,
    ConfigError,
    EmbeddingSpec,
    FineTuningSpec,
    ModelSpec,
    RagSpec,
    ResponsesSpec,
    ServerSpec,
    load_config,
    parse_config,
)
from serving.governance.config import AuditConfig, GovernanceConfig, Limits, ModelPrice, PIIPolicy
from serving.router.config import SLO, CandidateConfig, Expect, RouteConfig, Weights

ROOT = Path(__file__).resolve().parents[1]
SHIPPED = ROOT / "configs" / "serve.yaml"


def test_shipped_config_serves_the_default_model_on_8000():
    cfg = load_config(SHIPPED)
    assert [m.name for m in cfg.models] == ["smollm2-135m-instruct"]
    assert (cfg.server.host, cfg.server.port) == ("127.0.0.1", 8000)
    assert cfg.embeddings.enabled and cfg.embeddings.name == "all-MiniLM-L6-v2"


@pytest.mark.parametrize("section", [ServerSpec, ModelSpec, EmbeddingSpec, AdapterSpec, Autoscaling,
                                     ActorOptions, RagSpec, FineTuningSpec, ModelPrice, GovernanceConfig,
                                     Limits, PIIPolicy, AuditConfig, RouteConfig, CandidateConfig, Expect,
                                     Weights, SLO, ResponsesSpec])
def test_shipped_config_documents_every_key(section):
    text = SHIPPED.read_text()
    for key in section.model_fields:
        assert re.search(rf"(^|[\s{{,]){key}:", text, re.M), f"{section.__name__}.{key} is not in {SHIPPED.name}"


def test_engine_kwargs_are_accepted_by_the_engine_config():
    from serving.engine import EngineConfig

    spec = load_config(SHIPPED).models[0]
    ec = EngineConfig(**spec.engine_kwargs())
    assert ec.name == spec.name and ec.max_waiting == spec.max_waiting and ec.kv_cache_bytes == 2**30


def _write(tmp_path, text):
    p = tmp_path / "serve.yaml"
    p.write_text(text)
    return p


@pytest.mark.parametrize("yaml_text,expected", [
    ("models:\n  - name: a\n    max_waitng: 3\n", r"models\[0\]\.max_waitng: unknown key"),
    ("models:\n  - name: a\n    dtype: float8\n", r"models\[0\]\.dtype: Input should be"),
    ("models:\n  - name: a\n    kv_cache_memory: lots\n", r"models\[0\]\.kv_cache_memory: .*not a size"),
    ("models:\n  - name: a\n  - name: a\n", r"models\[1\]\.name: duplicate model name 'a'"),
    ("models:\n  - name: 'a:b'\n", r"models\[0\]\.name: .*not a usable model name"),
    ("models:\n  - name: a\n    ray_actor_options: {num_gpu: 1}\n", r"models\[0\]\.ray_actor_options\.num_gpu: unknown"),
    ("models:\n  - name: a\n    autoscaling: {min_replicas: 3, max_replicas: 2}\n",
     r"models\[0\]\.autoscaling: min_replicas must be <= max_replicas"),
    ("models:\n  - name: a\nadapters:\n  - {name: x, base: b, source: /tmp/x}\n",
     r"adapters\[0\]\.base: 'b' is not a configured model"),
    ("server: {port: 70000}\n", r"server\.port: Input should be less than or equal to 65535"),
    ("models: []\n", r"models: List should have at least 1 item"),
    ("modles: []\n", r"modles: unknown key"),
    ("models:\n  - source: x\n", r"models\[0\]\.name: Field required"),
    ("- just\n- a list\n", r"the top level must be a mapping"),
    ("models:\n  - {name: a, source: /m}\n", r"models\[0\]\.price: model 'a' \(source '/m'\) has no price"),
    ("models:\n  - {name: a, price: {input_per_1m: 1}}\n", r"models\[0\]\.price: .*input_per_1m and output_per_1m"),
    ("models:\n  - {name: a, price: {gpu_hour_usd: 2}}\n", r"models\[0\]\.price: .*needs gpu_hour_usd, input_tok_s"),
    ("governance: {pii: {prompt: hide}}\n", r"governance\.pii\.prompt: Input should be"),
    ("governance: {open_acess: true}\n", r"governance\.open_acess: unknown key"),
    ("routes: {auto: {candidates: [{model: zz, quality: 1}]}}\n",
     r"routes\.auto\.candidates\[0\]\.model: 'zz' is not a served model"),
    ("routes: {auto: {candidates: [{model: smollm2-135m-instruct}]}}\n",
     r"routes\.auto\.candidates\[0\]\.quality: Field required"),
    ("routes: {smollm2-135m-instruct: {candidates: [{model: smollm2-135m-instruct, quality: 1}]}}\n",
     r"both a route and a served model"),
    ("models:\n  - {name: a, colocate: true, num_replicas: 2}\n",
     r"models\[0\]\.colocate: .*scale it with server\.num_replicas"),
    ("server: {direct_ingress: true, num_replicas: 2}\n", r"server\.direct_ingress: .*only one"),
    ("models: [\n", r"not valid YAML \(line \d+, column \d+\)"),
])
def test_mistakes_name_the_key_and_the_file(tmp_path, yaml_text, expected):
    path = _write(tmp_path, yaml_text)
    with pytest.raises(ConfigError) as e:
        load_config(path)
    msg = str(e.value)
    assert msg.startswith(str(path)), msg
    assert re.search(expected, msg), msg


def test_missing_file_and_defaults(tmp_path):
    with pytest.raises(ConfigError, match="no such config file"):
        load_config(tmp_path / "nope.yaml")
    cfg = parse_config({})
    assert cfg.models[0].name == "smollm2-135m-instruct" and cfg.server.port == 8000


def test_build_app_takes_replicas_autoscaling_and_actor_options_from_the_config():
    from serving.app import build_app

    cfg = parse_config({
        "server": {"num_replicas": 2},
        "models": [
            {"name": "a", "num_replicas": 3, "ray_actor_options": {"num_gpus": 1, "num_cpus": 2}},
            {"name": "b", "autoscaling": {"min_replicas": 1, "max_replicas": 4, "target_ongoing_requests": 8}},
        ],
        "adapters": [{"name": "sql", "base": "a", "source": "/tmp/sql"}],
        "embeddings": {"enabled": False},
        "rag": {"enabled": False},
    })
    gateway = build_app(cfg)._bound_deployment
    assert gateway.name == "gateway" and gateway._deployment_config.num_replicas == 2
    config_arg, llm, embed, rag, colocated = gateway.init_args
    assert embed is None and rag is None and set(llm) == {"a", "b"} and colocated == {}
    a, b = llm["a"]._bound_deployment, llm["b"]._bound_deployment
    assert a.name == "llm-a" and a._deployment_config.num_replicas == 3
    assert a.ray_actor_options["num_gpus"] == 1 and a.ray_actor_options["num_cpus"] == 2
    assert a.init_args[1] == {"sql": {"source": "/tmp/sql", "force": False}}
    auto = b._deployment_config.autoscaling_config
    assert (auto.min_replicas, auto.max_replicas, auto.target_ongoing_requests) == (1, 4, 8)


def test_prices_never_silently_zero():
    from serving.pricing import Price

    cfg = load_config(SHIPPED)
    shipped = cfg.price_of(cfg.models[0].name)
    assert shipped == DEFAULT_MODEL_PRICE.price() and shipped.cost(10**6, 10**6) > 0
    # the default model without a price gets the built-in one; an explicit price (either form) wins
    cfg = parse_config({"models": [{"name": "x"}, {"name": "y", "price": {"input_per_1m": 1, "output_per_1m": 2}},
                                   {"name": "z", "source": "/m", "price": {"gpu_hour_usd": 3.6, "input_tok_s": 1000,
                                                                          "output_tok_s": 100}}]})
    assert cfg.price_of("x") == DEFAULT_MODEL_PRICE.price()
    assert cfg.price_of("y") == Price(1, 2)
    z = cfg.price_of("z")  # $0.001 a second: 1000 tokens in or 100 tokens out
    assert z.cost(10**6, 0) == pytest.approx(1.0) and z.cost(0, 10**6) == pytest.approx(10.0)
    # without governance nothing is charged, so an unpriced model is allowed
    assert parse_config({"models": [{"name": "a", "source": "/m"}], "governance": {"enabled": False}})


def test_routes_take_price_and_context_from_the_served_models():
    cfg = parse_config({
        "models": [{"name": "a", "max_model_len": 2048}, {"name": "b", "price": {"input_per_1m": 1, "output_per_1m": 2}}],
        "adapters": [{"name": "sql", "base": "a", "source": "/tmp/sql"}],
        "routes": {"auto": {"policy": "cheapest", "candidates": [
            {"model": "a", "quality": 0.3}, {"model": "b", "quality": 0.6, "context_length": 512},
            {"model": "sql", "quality": 0.5}, {"model": "a:sql", "quality": 0.5, "input_per_1m": 9, "output_per_1m": 9}]}},
    })
    a, b, sql, a_sql = cfg.parsed_routes()["auto"].candidates
    assert (a.context_length, a.price) == (2048, cfg.price_of("a"))
    assert (b.context_length, b.price.input_per_1m) == (512, 1)
    assert sql.deployment_name == "a" and a_sql.deployment_name == "a"  # adapters share their base's engine
    assert a_sql.price.input_per_1m == 9
    # a model whose context is its own is bounded once it reports it
    assert cfg.parsed_routes({"b": 8192})["auto"].candidates[1].context_length == 512


def test_a_colocated_model_is_loaded_by_the_gateway_not_a_deployment_of_its_own():
    from serving.app import build_app

    cfg = parse_config({
        "server": {"num_replicas": 2, "ray_actor_options": {"num_cpus": 0}},
        "models": [{"name": "a", "colocate": True, "ray_actor_options": {"num_cpus": 2, "memory": 2**30}},
                   {"name": "b"}],
        "adapters": [{"name": "sql", "base": "a", "source": "/tmp/sql"}],
        "embeddings": {"enabled": False}, "rag": {"enabled": False},
    })
    gateway = build_app(cfg)._bound_deployment
    _, llm, _, _, colocated = gateway.init_args
    assert set(llm) == {"b"} and set(colocated) == {"a"}  # "a" has no llm-a deployment
    spec, adapters, _ = colocated["a"]
    assert spec["name"] == "a" and adapters == {"sql": {"source": "/tmp/sql", "force": False}}
    assert gateway._deployment_config.num_replicas == 2
    assert gateway.ray_actor_options["num_cpus"] == 2 and gateway.ray_actor_options["memory"] == 2**30


def test_the_ray_serve_builder_refuses_direct_ingress_it_cannot_set_up(tmp_path):
    from serving.app import from_args

    path = _write(tmp_path, "server: {direct_ingress: true}\nembeddings: {enabled: false}\nrag: {enabled: false}\n")
    with pytest.raises(ConfigError, match="server.direct_ingress applies to `loraplex serve`"):
        from_args({"config": str(path)})
    path.write_text("embeddings: {enabled: false}\nrag: {enabled: false}\n")
    assert from_args({"config": str(path)})._bound_deployment.name == "gateway"
