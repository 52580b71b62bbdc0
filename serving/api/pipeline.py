"""The one request pipeline that every generation endpoint (chat, completions, responses) runs.

    parse and validate (the endpoint) -> resolve or route -> authenticate and admit -> ground -> generate
    -> guard output -> settle

An endpoint module translates its wire format into a `GenRequest` and the pipeline's results back
(serving.api.outputs holds the shared streaming and aggregate paths). Each policy is a stage that is present
only when it is on: with governance off there is no Admission stage, with no collections no Grounding stage,
so handlers carry no `if ticket is not None` branches. Resolution is a strategy: `Direct` for models and
adapters, `Routed` (serving.router) for route names. Everything that can fail a request fails before the
first byte of the response, so a client's mistake is always a 4xx JSON error and never inside a stream.
"""

from __future__ import annotations

import asyncio
import logging
import time
from dataclasses import dataclass, field
from typing import Any

from serving.api import governed
from serving.api.errors import APIError
from serving.api.metrics import Metrics
from serving.api.streaming import close_stream
from serving.api.structured import describe as describe_constraint

log = logging.getLogger("loraplex.gateway")
# A client that does not stream reads one answer, so its replica sends its tokens in one item per this many seconds
# (and at the end) rather than one per engine step: each item is a Ray call on both sides, which on a 2-core box
# took a third of the 32-stream throughput. A failover resumes from the last item, losing at most this much work.
REPLICA_FLUSH_S = 0.5


@dataclass
class GenRequest:
    """What an endpoint hands the pipeline, its wire format already translated."""

    endpoint: str  # metrics label and audit name: chat, completions, responses
    route: str  # the governance route, e.g. /v1/chat/completions
    model: str  # as the client named it: a model, "base:adapter", an adapter or a route
    kind: str  # "chat" (prompts hold one messages list) or "completion" (one prompt per replica stream)
    prompts: list
    sampling: dict  # serving.engine.SamplingParams keywords
    n: int = 1
    max_tokens: int | None = None
    logprobs: bool = False
    tools: Any = None  # serving.api.tools.ToolRequest that may call tools
    structured: dict | None = None  # the output constraint (serving.api.structured)
    json_output: bool = False  # output constrained to JSON: guards redact inside string values only
    retrieval: Any = None  # the `retrieval` field (grounded chat)
    echo: bool = False
    user: str | None = None
    id_prefix: str = "chatcmpl"
    stream: bool = True  # False: the client reads one answer, so the replica batches its deltas (REPLICA_FLUSH_S)
    body: Any = None  # the parsed request, for routing overrides read from it


class RequestRecord:
    """Metrics of one API request: TTFT, inter-token gaps, queue time, tokens, final status."""

    def __init__(self, metrics: Metrics, model: str, adapter: str | None, endpoint: str):
        self.m, self.endpoint = metrics, endpoint
        self.lab = Metrics.labels(model, adapter)
        self.t0 = time.monotonic()
        self.last: float | None = None
        self.first_token_at: float | None = None
        self.queue_s: float | None = None
        self.completion_tokens = 0
        self.prompt_tokens = 0
        self.cached_tokens = 0
        self.active = False
        self.closed = False

    def accepted(self, prompt_tokens: int) -> None:
        self.prompt_tokens += prompt_tokens
        self.m.prompt_tokens.labels(**self.lab).inc(prompt_tokens)
        if not self.active:
            self.active = True
            self.m.in_flight.labels(**self.lab).inc()

    def delta(self, item: dict) -> None:
        n = sum(c["num_tokens"] for c in item["choices"])
        if "queue_time" in item and self.last is None and self.queue_s is None:
            self.queue_s = item["queue_time"]
            self.m.queue.labels(**self.lab).observe(item["queue_time"])
        self.cached_tokens = max(self.cached_tokens, item.get("num_cached_tokens", 0))
        if not n:
            return
        now = time.monotonic()
        if self.last is None:
            self.first_token_at = now
            self.m.ttft.labels(**self.lab).observe(now - self.t0)
        else:  # a delta of k steps (a non-streaming request's replica sends them gathered): k gaps of 1/k each
            itl, k = self.m.itl.labels(**self.lab), max(c["num_tokens"] for c in item["choices"])
            for _ in range(k):
                itl.observe((now - self.last) / k)
        self.last = now
        self.completion_tokens += n
        self.m.generation_tokens.labels(**self.lab).inc(n)

    def done(self, status: int) -> None:
        if self.closed:
            return
        self.closed = True
        if self.active:
            self.m.in_flight.labels(**self.lab).dec()
            if status == 200:
                self.m.e2e.labels(**self.lab).observe(time.monotonic() - self.t0)
        self.m.requests.labels(**self.lab, endpoint=self.endpoint, status=str(status)).inc()


@dataclass
class Generation:
    """One request between the pipeline's start and its settlement."""

    req: GenRequest
    http: Any  # the Starlette request (governance reads its principal), or None in process
    t0: float = field(default_factory=time.monotonic)
    base: str = ""
    adapter: str | None = None
    decision: Any = None  # a routing decision, when the model is a route
    routed: Any = None  # the RoutedStream that answered
    ticket: Any = None  # the governance Ticket, when governance is on
    citations: list | None = None
    opened_at: float = 0.0
    accepted: list = field(default_factory=list)  # each replica stream's first item
    gens: list = field(default_factory=list)  # the replica streams (one per completions prompt)
    rec: RequestRecord | None = None
    guards: governed.OutputGuards | None = None
    headers: dict = field(default_factory=dict)
    failovers: list = field(default_factory=list)  # replicas lost and replaced (serving.api.failover)

    @property
    def model_name(self) -> str:
        """The model the answer names: the routed candidate for a route, else what the client asked for."""
        return self.routed.model if self.routed is not None else self.req.model

    @property
    def fingerprint(self) -> str:
        return self.accepted[0]["system_fingerprint"]

    @property
    def tool_format(self):
        """serving.api.tool_parsers.ToolFormat of the replica, when the request may call tools."""
        return self.accepted[0].get("tool_format")


def status_of(exc: BaseException) -> int:
    """The HTTP status an exception ends a request with (499: the client went away)."""
    status = getattr(exc, "status", None)
    if isinstance(status, int) and not isinstance(status, bool):
        return status
    return 499 if isinstance(exc, asyncio.CancelledError) else 500


# ---- resolution strategies ------------------------------------------------------------------------------
class Direct:
    """A model, `base:adapter` or adapter name: one deployment, one stream per prompt."""

    def __init__(self, deployments, routes=()):
        self.deployments, self.routes = deployments, routes

    def resolve(self, g: Generation) -> None:
        g.base, g.adapter = self.deployments.resolve(g.req.model, self.routes)

    async def open(self, g: Generation, reqs: list[dict]) -> None:
        g.opened_at = time.monotonic()
        opened = await self.deployments.open_many(g.base, reqs, g.failovers)
        g.accepted, g.gens = [a for a, _ in opened], [s for _, s in opened]


class Routed:
    """A route name (serving.router): the policy picks a candidate, falling back before the first token."""

    def __init__(self, routing):
        self.routing = routing

    def resolve(self, g: Generation) -> None:
        from serving.router.predict import estimate_prompt_tokens, estimate_tool_tokens

        if g.req.kind != "chat":
            raise APIError(400, f"`{g.req.model}` is a route: routes serve chat requests only.",
                           param="model", code="route_chat_only")
        tools = estimate_tool_tokens(g.req.tools.tools if g.req.tools else None)
        g.decision = self.routing.decide(g.req.body, g.http.headers if g.http is not None else None,
                                         estimate_prompt_tokens(g.req.prompts[0]) + tools, g.req.max_tokens)
        g.base, g.adapter = self.routing.deployments.split(g.decision.primary.model)

    async def open(self, g: Generation, reqs: list[dict]) -> None:
        opened_at = [g.t0]
        g.routed, gen, accepted = await self.routing.open(g.decision, reqs[0], opened_at, g.failovers)
        g.base, g.adapter = accepted["base"], accepted["adapter"]
        g.opened_at, g.accepted, g.gens = opened_at[0], [accepted], [gen]
        g.headers.update(self.routing.response_headers(g.routed))


# ---- policy stages --------------------------------------------------------------------------------------
class Stage:
    """A policy of the pipeline; each hook runs in pipeline order, a stage that is off is not in the list."""

    async def admit(self, g: Generation) -> None:
        """Before any replica is asked: may refuse (raise) or rewrite the prompts."""

    def opened(self, g: Generation) -> None:
        """The replica streams are open (their accepted items are in g.accepted); may still refuse (raise)."""

    def settle(self, g: Generation, status: int, content: dict | None) -> None:
        """Once per request, at its end (also for a request that failed before its stream opened)."""


class Admission(Stage):
    """Governance: keys and allow-lists (a route's candidates included), limits, budget reservation, prompt PII;
    at the end the exact spend and the audit entry."""

    def __init__(self, governance, deployments, routing=None):
        self.gov, self.deployments, self.routing = governance, deployments, routing

    async def admit(self, g: Generation) -> None:
        from serving.governance.errors import GovernanceError
        from serving.router.predict import estimate_tool_tokens

        if g.http is None:  # an in-process call, outside the governance middleware
            return
        principal = governed.principal_of(g.http)
        if g.decision is not None and principal is not None:
            self.gov.authorize(principal, model=g.req.model)  # the route name is on the models list
            self.routing.restrict(g.decision, lambda m: governed.allows(principal, *self.deployments.split(m)))
            g.base, g.adapter = self.deployments.split(g.decision.primary.model)
        retrieval = g.req.retrieval
        if principal is not None and isinstance(retrieval, dict) and isinstance(retrieval.get("collection"), str):
            try:
                self.gov.authorize(principal, collection=retrieval["collection"])
            except GovernanceError as exc:
                exc.param = "retrieval.collection"
                raise
        prompt = g.req.prompts[0] if g.req.kind == "chat" else g.req.prompts
        est = governed.estimate_tokens(prompt) + estimate_tool_tokens(g.req.tools.tools if g.req.tools else None)
        max_tokens = g.req.max_tokens
        if max_tokens is None:  # reserve the worst case: the rest of the context
            ctx = self.deployments.context.get(g.base) or self.deployments.config.model(g.base).max_model_len or 2048
            max_tokens = max(1, ctx - est)
        n = g.req.n * (1 if g.req.kind == "chat" else len(g.req.prompts))
        g.ticket = self.gov.admit(g.http, route=g.req.route, model=g.base, adapter=g.adapter, prompt=prompt,
                                  prompt_tokens=est, max_tokens=max_tokens * n)
        g.req.prompts = [g.ticket.prompt] if g.req.kind == "chat" else list(g.ticket.prompt)  # redacted
        governed.check_logprobs(g.ticket, g.req.logprobs)
        g.ticket.constraint = describe_constraint(g.req.structured, g.req.tools.tools if g.req.tools else None)

    def opened(self, g: Generation) -> None:
        if g.ticket is None:
            return
        if g.routed is not None:
            governed.reprice(g.ticket, self.gov, g.base, g.adapter)
        g.ticket.confirm_prompt(sum(a["prompt_tokens"] for a in g.accepted))  # may refuse: 429, nothing sent

    def settle(self, g: Generation, status: int, content: dict | None) -> None:
        if g.ticket is None:
            return
        rec = g.rec
        g.ticket.failovers = g.failovers
        g.ticket.completion_tokens = rec.completion_tokens if rec else 0
        g.ticket.settle(rec.prompt_tokens if rec else 0, rec.completion_tokens if rec else 0, status=status,
                        content=content)


class Grounding(Stage):
    """Retrieval: the `retrieval` field's collection is searched and its chunks put into the prompt."""

    def __init__(self, rag_handle):
        self.rag = rag_handle

    async def admit(self, g: Generation) -> None:
        if g.req.retrieval is None:
            return
        from serving.rag.errors import RagError
        from serving.rag.grounding import aretrieve_for_chat

        try:
            messages, g.citations = await aretrieve_for_chat(self.rag, g.req.retrieval, g.req.prompts[0])
        except RagError as exc:
            raise APIError(exc.status, exc.message, param=exc.param, code=exc.code) from None
        g.req.prompts = [messages]


class NoGrounding(Stage):
    """Collections are off: a request that asks for retrieval gets a 400 saying so."""

    async def admit(self, g: Generation) -> None:
        if g.req.retrieval is not None:
            raise APIError(400, "retrieval is not available: this server runs without collections "
                                "(rag.enabled is false).", param="retrieval", code="retrieval_unavailable")


class Signals(Stage):
    """The router's latency signals from every finished request (routed or addressed directly)."""

    def __init__(self, routing):
        self.routing = routing

    def settle(self, g: Generation, status: int, content: dict | None) -> None:
        if status == 200 and g.rec is not None:
            self.routing.observe(g.routed.choice if g.routed is not None else g.base, g.rec, g.opened_at)


# ---- the pipeline ---------------------------------------------------------------------------------------
class Pipeline:
    def __init__(self, deployments, metrics: Metrics, governance=None, routing=None):
        self.deployments, self.metrics, self.routing = deployments, metrics, routing
        self.direct = Direct(deployments, routing.routes if routing is not None else ())
        self.routed = Routed(routing) if routing is not None else None
        self.stages: list[Stage] = []
        if governance is not None:
            self.stages.append(Admission(governance, deployments, routing))
        self.stages.append(Grounding(deployments.rag) if deployments.rag is not None else NoGrounding())
        if routing is not None:
            self.stages.append(Signals(routing))

    def is_route(self, model: str) -> bool:
        return self.routed is not None and self.routing.has_route(model)

    async def start(self, req: GenRequest, http=None) -> Generation:
        """Resolve, admit, ground and open the replica streams; raises (a 4xx/5xx APIError or a governance
        error) before anything is sent, settling what was reserved."""
        g = Generation(req, http)
        strategy = self.routed if self.is_route(req.model) else self.direct
        try:
            strategy.resolve(g)
            for stage in self.stages:
                await stage.admit(g)
            await strategy.open(g, self._replica_requests(g))
            for stage in self.stages:
                stage.opened(g)
        except BaseException as exc:
            for gen in g.gens:
                await close_stream(gen)
            status = status_of(exc)
            for stage in self.stages:
                stage.settle(g, status, None)
            RequestRecord(self.metrics, g.base or req.model, g.adapter, req.endpoint).done(status)
            raise
        g.rec = RequestRecord(self.metrics, g.base, g.adapter, req.endpoint)
        g.rec.t0 = g.t0
        for a in g.accepted:
            g.rec.accepted(a["prompt_tokens"])
        g.guards = governed.OutputGuards(g.ticket, json_output=req.json_output)
        return g

    def _replica_requests(self, g: Generation) -> list[dict]:
        r = g.req
        common = {"sampling": r.sampling, "adapter": g.adapter, "user": r.user,
                  "flush_s": 0.0 if r.stream else REPLICA_FLUSH_S}
        if r.kind == "chat":
            tools = r.tools
            return [{"kind": "chat", "messages": r.prompts[0], "request_id": _new_id(r.id_prefix), **common,
                     "tools": tools.tools if tools else None, "tool_choice": _choice(tools),
                     "parallel_tool_calls": tools.parallel if tools else None}]
        return [{"kind": "completion", "prompt": p, "echo": r.echo, "request_id": _new_id(r.id_prefix), **common}
                for p in r.prompts]

    def finish(self, g: Generation, status: int, content: dict | None = None) -> None:
        """Metrics, spend (exact token counts), audit and the router's signals, once per request."""
        if g.rec is not None:
            g.rec.done(status)
        for f in g.failovers:
            self.metrics.failovers.labels(model=g.base or g.req.model, when=f["when"]).inc()
        for stage in self.stages:
            stage.settle(g, status, content)


def _choice(tools) -> Any:
    """A ToolRequest's choice in OpenAI's request form (the replica parses it again)."""
    if tools is None:
        return None
    if tools.choice.function is not None:
        return {"type": "function", "function": {"name": tools.choice.function}}
    return tools.choice.mode


def _new_id(prefix: str) -> str:
    from serving.api.wire import new_id

    return new_id(prefix)
