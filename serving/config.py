"""The serve config (configs/serve.yaml): models, adapters, embeddings, host/port. Validated strictly.

Every section forbids unknown keys, so a typo stops start-up with a message naming the key path and file
(`configs/serve.yaml: models[0].max_waitng: unknown key`), instead of being silently ignored.
"""

from __future__ import annotations

import re
from pathlib import Path
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from serving.governance.config import GovernanceConfig, ModelPrice
from serving.models import DEFAULT_EMBEDDING_MODEL, DEFAULT_MODEL

_NAME = re.compile(r"^[A-Za-z0-9][A-Za-z0-9._\-/]*$")


class ConfigError(ValueError):
    """A serve config that cannot be used; the message names the file and the key path."""


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid", protected_namespaces=())


# The default model's price when its config gives none, so a self-hosted model is never silently free: a
# 2-vCPU cloud machine at $0.10/hour over rough fp32 CPU throughput (not a measurement: measure yours with
# benchmarks/engine_throughput.py and set `price` in the serve config).
DEFAULT_MODEL_PRICE = ModelPrice(gpu_hour_usd=0.10, input_tok_s=400.0, output_tok_s=60.0)
UNBOUNDED_CONTEXT = 10**9  # a model whose context length is its own: known only once it has loaded


class ActorOptions(_Strict):
    """The subset of Ray's actor options a replica may set (a typo here must not pass silently)."""

    num_cpus: float | None = Field(None, ge=0)
    num_gpus: float | None = Field(None, ge=0)
    memory: int | None = Field(None, ge=0)
    resources: dict[str, float] | None = None
    accelerator_type: str | None = None
    runtime_env: dict[str, Any] | None = None

    def to_ray(self) -> dict:
        return self.model_dump(exclude_none=True)


class Autoscaling(_Strict):
    min_replicas: int = Field(1, ge=0)
    max_replicas: int = Field(1, ge=1)
    initial_replicas: int | None = Field(None, ge=0)
    target_ongoing_requests: float = Field(16, gt=0)
    upscale_delay_s: float = Field(30.0, ge=0)
    downscale_delay_s: float = Field(600.0, ge=0)
    look_back_period_s: float = Field(30.0, gt=0, description="the window of load Serve averages over")

    @model_validator(mode="after")
    def _bounds(self):
        if self.min_replicas > self.max_replicas:
            raise ValueError("min_replicas must be <= max_replicas")
        return self


class ModelSpec(_Strict):
    name: str = Field(..., description="the model id in the API")
    source: str = Field(DEFAULT_MODEL, description="our default name, an HF id or a local folder")
    hf_id: str | None = Field(None, description="the Hugging Face repo id of these weights; None: the default "
                                                "model's, an HF-id source, or a folder's config._name_or_path")
    aliases: list[str] = Field(default_factory=list, description="more names for `model` (vLLM's served_model_name)")
    dtype: Literal["auto", "float32", "bfloat16", "float16"] = "auto"
    quantization: Literal["int8", "int4", "none"] | None = Field(
        None, description="CPU weight-only quantization at load (int8 per channel, int4 in groups of 32); "
                          "activations and the KV cache in bfloat16/float32, adapters as lora_dtype")
    device: str = "auto"
    num_threads: int | None = Field(None, ge=1, description="CPU threads of each replica's engine; None: the CPUs "
                                    "the replica may run on (Ray sets OMP_NUM_THREADS=1 in its actors, which "
                                    "halved decode speed on 2 cores)")
    max_model_len: int | None = Field(None, gt=0)
    kv_cache_memory: str | int = "1GiB"
    block_size: int = Field(16, gt=0)
    max_num_seqs: int = Field(64, gt=0, description="max running requests per replica")
    max_num_batched_tokens: int = Field(1024, gt=0)
    max_waiting: int = Field(1024, ge=0, description="queue limit per replica; beyond it: HTTP 429")
    enable_prefix_caching: bool = True
    seed: int = 0
    max_loras: int = Field(8, ge=0)
    max_lora_rank: int = Field(64, gt=0)
    lora_dtype: Literal["auto", "float32", "bfloat16", "float16"] = Field(
        "auto", description="adapter weights' dtype in the slots: auto = the model's; bfloat16 halves the bytes "
                            "every decode step reads for adapters (CPU; on CUDA it must equal dtype)")
    decode_buckets: bool = Field(False, description="pad decode steps to batch-size buckets with persistent "
                                                    "inputs (what CUDA graphs need; on the CPU padding costs)")
    cuda_graphs: bool = Field(False, description="capture decode steps as CUDA graphs per bucket (CUDA only; "
                                                 "not yet run on a GPU)")
    first_token_pause_ms: float | None = Field(None, ge=0, le=100, description="CPU: after a step that gave a "
                                               "streamed request its first token, leave the cores to the serving "
                                               "path this long (at most every 80 ms); null: 4 on the CPU, 0 on CUDA")
    tool_call_parser: Literal["auto", "hermes", "llama3_json", "mistral"] = Field(
        "auto", description="the tool-call format: auto reads the chat template (hermes where it takes no tools)")
    max_grammar_bytes: int = Field(65536, gt=0, description="largest response_format schema, grammar or tools "
                                                             "a request may send (bytes of JSON)")
    num_replicas: int = Field(1, ge=1)
    autoscaling: Autoscaling | None = None
    colocate: bool = Field(False, description="run this model's engine inside each gateway replica: no gateway -> "
                                              "model hop (~9 ms of first-token time on 2 cores); it scales with "
                                              "server.num_replicas, and its ray_actor_options go to the gateway")
    replica_choice: Literal["prefix", "pow2"] = Field(
        "prefix", description="which replica takes a request: prefix = the one holding the longest prefix of its "
                              "prompt unless clearly busier, else power-of-two choices (serving.replica_choice)")
    ray_actor_options: ActorOptions = Field(default_factory=ActorOptions)
    price: ModelPrice | None = Field(
        None, description="USD per 1M tokens, or gpu_hour_usd with measured throughput; None: the default "
                          "model's built-in price (others must set one while governance is enabled)")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v) or ":" in v:
            raise ValueError(f"{v!r} is not a usable model name (letters, digits, . _ - /; no ':')")
        return v

    @field_validator("aliases")
    @classmethod
    def _aliases(cls, v: list[str]) -> list[str]:
        for a in v:
            if not _NAME.match(a) or ":" in a:
                raise ValueError(f"{a!r} is not a usable alias (letters, digits, . _ - /; no ':')")
        return v

    @field_validator("hf_id")
    @classmethod
    def _hf_id(cls, v: str | None) -> str | None:
        from serving.identity import is_repo_id

        if v is not None and not is_repo_id(v):
            raise ValueError(f"{v!r} is not a Hugging Face repo id ('org/name')")
        return v

    def identity(self):
        """serving.identity.ModelIdentity from the config alone (a replica adds what its folder says)."""
        from serving.identity import model_identity

        return model_identity(self.name, self.source, self.hf_id, self.aliases)

    @field_validator("kv_cache_memory")
    @classmethod
    def _size(cls, v):
        from serving.engine.config import parse_bytes

        if parse_bytes(v) <= 0:
            raise ValueError("must be a positive size")
        return v

    def resolved_price(self) -> ModelPrice | None:
        """The configured price, else the built-in one for the default model, else None."""
        if self.price is not None:
            return self.price
        return DEFAULT_MODEL_PRICE if self.source == DEFAULT_MODEL else None

    def engine_kwargs(self) -> dict:
        """Keyword arguments for serving.engine.EngineConfig."""
        return dict(
            model=self.source,
            served_name=self.name,
            hf_id=self.hf_id,
            aliases=tuple(self.aliases),
            dtype=self.dtype,
            quantization=None if self.quantization == "none" else self.quantization,
            device=self.device,
            num_threads=self.num_threads,
            max_model_len=self.max_model_len,
            kv_cache_memory=self.kv_cache_memory,
            block_size=self.block_size,
            max_num_seqs=self.max_num_seqs,
            max_num_batched_tokens=self.max_num_batched_tokens,
            max_waiting=self.max_waiting,
            enable_prefix_caching=self.enable_prefix_caching,
            seed=self.seed,
            max_loras=self.max_loras,
            max_lora_rank=self.max_lora_rank,
            lora_dtype=self.lora_dtype,
            max_grammar_bytes=self.max_grammar_bytes,
            decode_buckets=self.decode_buckets,
            cuda_graphs=self.cuda_graphs,
            first_token_pause_ms=self.first_token_pause_ms,
        )


class AdapterSpec(_Strict):
    name: str
    base: str = Field(..., description="the name of a configured model")
    source: str = Field(..., description="a PEFT adapter folder")
    force: bool = Field(False, description="load it although its declared base names another model (shapes "
                                           "are still checked)")

    @field_validator("name")
    @classmethod
    def _name(cls, v: str) -> str:
        if not _NAME.match(v) or ":" in v:
            raise ValueError(f"{v!r} is not a usable adapter name")
        return v


class EmbeddingSpec(_Strict):
    enabled: bool = True
    name: str = DEFAULT_EMBEDDING_MODEL
    source: str | None = Field(None, description="None: the bundled all-MiniLM-L6-v2")
    num_replicas: int = Field(1, ge=1)
    ray_actor_options: ActorOptions = Field(default_factory=lambda: ActorOptions(num_cpus=0))
    max_inputs: int = Field(2048, gt=0, description="most strings in one request")


class ServerSpec(_Strict):
    host: str = "127.0.0.1"
    port: int = Field(8000, ge=0, le=65535)
    ray_actor_options: ActorOptions = Field(default_factory=lambda: ActorOptions(num_cpus=0))
    num_replicas: int = Field(1, ge=1)
    request_timeout_s: float | None = Field(None, gt=0)
    direct_ingress: bool = Field(False, description="the gateway replica takes HTTP on `port` itself (Ray Serve's "
                                                    "direct ingress), not behind Serve's proxy: ~12 ms less to the "
                                                    "first token on 2 cores; one gateway replica, local Ray only")
    proxy_location: Literal["EveryNode", "HeadOnly"] = Field(
        "EveryNode", description="where Serve runs its HTTP proxy: EveryNode (Ray's default: one per node, behind a "
                                 "load balancer) or HeadOnly (several nodes on one machine would share the port)")


class RagSpec(_Strict):
    enabled: bool = True
    ray_actor_options: ActorOptions = Field(default_factory=lambda: ActorOptions(num_cpus=0))


class FineTuningSpec(_Strict):
    enabled: bool = True


class ResponsesSpec(_Strict):
    """Stored responses of the Responses API (`store: true`, the default, as OpenAI)."""

    ttl_s: float = Field(30 * 24 * 3600, gt=0, description="a stored response expires after this (seconds)")
    database: str | None = Field(None, description="SQLite path; None: $LORAPLEX_HOME/responses/responses.sqlite3")

    def database_path(self) -> str:
        from loraplex.paths import subdir

        return self.database or str(subdir("responses") / "responses.sqlite3")


class ServeConfig(_Strict):
    server: ServerSpec = Field(default_factory=ServerSpec)
    models: list[ModelSpec] = Field(default_factory=lambda: [ModelSpec(name=DEFAULT_MODEL)], min_length=1)
    adapters: list[AdapterSpec] = Field(default_factory=list)
    adapter_roots: list[str] = Field(default_factory=list, description="extra folders API-loaded adapters may come from")
    embeddings: EmbeddingSpec = Field(default_factory=EmbeddingSpec)
    rag: RagSpec = Field(default_factory=RagSpec)
    fine_tuning: FineTuningSpec = Field(default_factory=FineTuningSpec)
    responses: ResponsesSpec = Field(default_factory=ResponsesSpec)
    governance: GovernanceConfig = Field(default_factory=GovernanceConfig)
    routes: dict[str, Any] = Field(default_factory=dict, description="route name -> serving.router RouteConfig")

    @model_validator(mode="after")
    def _cross(self):
        names = [m.name for m in self.models]
        for i, n in enumerate(names):
            if n in names[:i]:
                raise ValueError(f"models[{i}].name: duplicate model name {n!r}")
            if self.embeddings.enabled and n == self.embeddings.name:
                raise ValueError(f"models[{i}].name: {n!r} is also the embedding model's name")
        owner: dict[str, str] = {n.lower(): n for n in names}
        for i, m in enumerate(self.models):
            for j, a in enumerate(m.aliases):
                if owner.get(a.lower(), m.name) != m.name or a in self.routes or \
                        (self.embeddings.enabled and a == self.embeddings.name):
                    raise ValueError(f"models[{i}].aliases[{j}]: {a!r} already names another model or route")
                owner[a.lower()] = m.name
        if self.server.direct_ingress and self.server.num_replicas != 1:
            raise ValueError("server.direct_ingress: the gateway replica listens on server.port itself, so there "
                             "can be only one (num_replicas: 1); put your own load balancer in front for more")
        for i, m in enumerate(self.models):
            if m.colocate and (m.num_replicas != 1 or m.autoscaling is not None):
                raise ValueError(f"models[{i}].colocate: a colocated model runs in each gateway replica; scale it "
                                 "with server.num_replicas, not num_replicas or autoscaling")
        seen: set[tuple[str, str]] = set()
        for i, a in enumerate(self.adapters):
            if a.base not in names:
                raise ValueError(f"adapters[{i}].base: {a.base!r} is not a configured model ({', '.join(names)})")
            if (a.base, a.name) in seen:
                raise ValueError(f"adapters[{i}].name: duplicate adapter {a.name!r} for {a.base!r}")
            seen.add((a.base, a.name))
        if self.governance.enabled:
            for i, m in enumerate(self.models):
                if m.resolved_price() is None and m.name not in self.governance.prices:
                    raise ValueError(
                        f"models[{i}].price: model {m.name!r} (source {m.source!r}) has no price; governance "
                        "charges every request, so set input_per_1m/output_per_1m, or gpu_hour_usd with the "
                        "input_tok_s/output_tok_s measured on it (or governance.enabled: false)")
        if self.routes:
            self.parsed_routes()  # errors name routes.<name>.<field>
        return self

    def price_of(self, name: str):
        """serving.pricing.Price of a configured model (its own, the default model's, or governance.prices)."""
        p = self.model(name).resolved_price() or self.governance.prices.get(name)
        return p.price() if p is not None else None

    def router_models(self, context: dict[str, int] | None = None) -> dict[str, dict]:
        """Served names for serving.router.parse_routes: models, 'base:adapter' and bare adapter names, with
        price and context length (`context`: max_model_len reported by loaded models)."""
        out: dict[str, dict] = {}
        for m in self.models:
            price = self.price_of(m.name)
            ctx = (context or {}).get(m.name) or m.max_model_len or UNBOUNDED_CONTEXT
            out[m.name] = {"input_per_1m": price.input_per_1m if price else None,
                           "output_per_1m": price.output_per_1m if price else None, "context_length": ctx}
        for a in self.adapters:
            out[f"{a.base}:{a.name}"] = out[a.name] = {**out[a.base], "deployment": a.base}
        return out

    def parsed_routes(self, context: dict[str, int] | None = None) -> dict:
        """{route name: serving.router.RouteConfig}; raises ValueError naming the route and field."""
        from serving.router.config import parse_routes
        from serving.router.errors import RouteConfigError

        if not isinstance(self.routes, dict):
            raise ValueError("routes: must be a mapping of route name -> route")
        models = self.router_models(context)
        try:
            routes = parse_routes(self.routes, models={k: {f: v for f, v in d.items() if f != "deployment"}
                                                       for k, d in models.items()})
        except RouteConfigError as exc:
            raise ValueError(exc.message) from None
        for name, route in routes.items():
            if ":" in name or (self.embeddings.enabled and name == self.embeddings.name):
                raise ValueError(f"routes.{name}: a route name may not contain ':' or be a served model's name")
            fixed = []
            for c in route.candidates:  # a bare adapter name: its signals are its base model's
                dep = models.get(c.model, {}).get("deployment")
                fixed.append(c.model_copy(update={"deployment": dep}) if dep and c.deployment is None else c)
            routes[name] = route.model_copy(update={"candidates": fixed})
        return routes

    def model(self, name: str) -> ModelSpec:
        return next(m for m in self.models if m.name == name)

    def adapters_for(self, base: str) -> list[AdapterSpec]:
        return [a for a in self.adapters if a.base == base]


def _loc(loc: tuple) -> str:
    out = ""
    for part in loc:
        if isinstance(part, int):
            out += f"[{part}]"
        elif part in ("function-after", "function-before") or "[" in str(part):
            continue  # pydantic's validator/union markers, not keys
        else:
            out += f".{part}" if out else str(part)
    return out


def format_validation_error(exc: ValidationError, source: str) -> str:
    lines = []
    for err in exc.errors():
        where = _loc(tuple(err["loc"]))
        msg = "unknown key" if err["type"] == "extra_forbidden" else err["msg"].removeprefix("Value error, ")
        lines.append(f"{source}: {where + ': ' if where else ''}{msg}")
    return "\n".join(lines)


def parse_config(data: Any, source: str = "<config>") -> ServeConfig:
    if data is None:
        data = {}
    if not isinstance(data, dict):
        raise ConfigError(f"{source}: the top level must be a mapping, got {type(data).__name__}")
    try:
        return ServeConfig.model_validate(data)
    except ValidationError as exc:
        raise ConfigError(format_validation_error(exc, source)) from None


def load_config(path: str | Path | None = None) -> ServeConfig:
    """Read and validate a serve config; None gives the defaults (the default model on 127.0.0.1:8000)."""
    import yaml

    if path is None:
        return ServeConfig()
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: no such config file")
    try:
        data = yaml.safe_load(path.read_text())
    except yaml.YAMLError as exc:
        mark = getattr(exc, "problem_mark", None)
        where = f" (line {mark.line + 1}, column {mark.column + 1})" if mark else ""
        raise ConfigError(f"{path}: not valid YAML{where}: {getattr(exc, 'problem', exc)}") from None
    return parse_config(data, str(path))
