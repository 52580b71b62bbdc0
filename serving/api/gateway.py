"""The gateway's request handling: route to a model deployment, stream or aggregate, record metrics.

Ray-agnostic apart from the handle calls (`handle.options(stream=True).stream.remote(req)` and
`await handle.<method>.remote()`), so it reads as plain asyncio.
"""

from __future__ import annotations

import asyncio
import base64
import logging
import time
import uuid

import numpy as np

from serving.api import governed
from serving.api.errors import APIError, not_found_model
from serving.api.metrics import Metrics
from serving.api.protocol import ChatCompletionRequest, CompletionRequest, EmbeddingRequest, split_model
from serving.api.responses import (
    ChatChunks,
    CompletionChunks,
    CompletionLogprobs,
    chat_logprobs,
    finish,
    merge_completion_logprobs,
    new_id,
    usage,
)
from serving.api.streaming import SSE_DONE, cancel_stream, close_stream, merge_streams, sse
from serving.api.structured import describe as describe_constraint

log = logging.getLogger("loraplex.gateway")
STATS_MAX_AGE_S = 60.0


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
        else:
            self.m.itl.labels(**self.lab).observe(now - self.last)
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


def _status_of(exc: BaseException) -> int:
    """The HTTP status an exception ends a request with (499: the client went away)."""
    status = getattr(exc, "status", None)
    if isinstance(status, int) and not isinstance(status, bool):
        return status
    return 499 if isinstance(exc, asyncio.CancelledError) else 500


class ChatRun:
    """One admitted chat request between its first replica item and its end."""

    def __init__(self, body, gen, rec, ticket, citations, routed, base, opened_at, accepted: dict):
        self.body, self.gen, self.rec, self.ticket = body, gen, rec, ticket
        self.citations, self.routed, self.base, self.opened_at = citations, routed, base, opened_at
        self.fingerprint = accepted["system_fingerprint"]  # the replica's
        self.tool_format = accepted.get("tool_format")  # serving.api.tool_parsers.ToolFormat when tools are on
        self.guards = governed.OutputGuards(ticket, json_output=body.json_output)


class GatewayCore:
    def __init__(self, config, llm_handles: dict, embed_handle=None, routers: list | None = None,
                 rag_handle=None):
        self.config = config
        self.llm = dict(llm_handles)
        self.embed = embed_handle
        self.embed_name = config.embeddings.name if (embed_handle is not None and config.embeddings.enabled) else None
        self.rag = rag_handle
        self.metrics = Metrics()
        self.ready: set[str] = set()
        self.context: dict[str, int] = {}  # max_model_len each loaded model reported
        self.embed_info: dict | None = None
        self._stats: dict[str, dict[str, dict]] = {name: {} for name in self.llm}
        self._pollers: list[asyncio.Task] = []
        self.extra_routers = routers or []
        self.governance = governed.build_governance(config, self.metrics.registry)
        self.routing = None
        if config.routes:
            from serving.api.routing import GatewayRouter

            self.routing = GatewayRouter(self, config, registry=self.metrics.registry)
        from serving.adapters import read_registry

        # every name of a base model (API name, repo id, aliases; lower-cased) -> its API name
        self.identities: dict[str, str] = {}
        for m in config.models:
            self.learn_names(m.name, m.identity().names())
        # adapter name -> base model, so `model: "<adapter>"` works without the base prefix
        self.adapter_bases = {a.name: a.base for a in config.adapters}
        for base, names in read_registry().items():
            if base in self.llm:
                self.adapter_bases.update({n: base for n in names})

    # ---- readiness ------------------------------------------------------------------------------
    def start(self) -> None:
        """Wait (in the background) for each deployment's first replica to load its model."""
        for name, handle in self.llm.items():
            self._pollers.append(asyncio.ensure_future(self._wait_ready(name, handle)))
        if self.embed is not None:
            self._pollers.append(asyncio.ensure_future(self._wait_ready(self.embed_name, self.embed)))
        if self.routing is not None:
            self._pollers.append(asyncio.ensure_future(self.routing.poll()))

    async def _wait_ready(self, name: str, handle) -> None:
        while True:
            try:
                info = await handle.ready.remote()
                if name == self.embed_name:
                    self.embed_info = info
                elif isinstance(info, dict) and info.get("max_model_len"):
                    self.context[name] = int(info["max_model_len"])
                    self.learn_names(name, [info.get("hf_id"), *(info.get("aliases") or [])])
                    if self.routing is not None:
                        self.routing.refresh_context(self.context)
                self.ready.add(name)
                return
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # a replica failing to start: keep waiting, Serve restarts it
                log.warning("model %s not ready yet: %s", name, exc)
                await asyncio.sleep(2.0)

    def all_names(self) -> list[str]:
        return list(self.llm) + ([self.embed_name] if self.embed_name else [])

    def is_ready(self) -> bool:
        return all(n in self.ready for n in self.all_names())

    def _check_ready(self, name: str) -> None:
        if name not in self.ready:
            raise APIError(503, f"The model `{name}` is still loading; try again shortly.",
                           code="model_not_ready", retry_after=5)

    def learn_names(self, base: str, names) -> None:
        """Accept these names (a repo id, aliases) for `base` in requests; a name another model holds stays its."""
        for n in names:
            if n:
                self.identities.setdefault(n.lower(), base)

    def canonical(self, name: str) -> str | None:
        """The API name of the base model that `name` (its name, repo id or an alias) denotes, or None."""
        return name if name in self.llm else self.identities.get(name.lower())

    def split(self, model: str) -> tuple[str, str | None]:
        """'base:adapter', 'base' or a bare adapter name -> (base, adapter), without checks; the base may be
        given by any of its names (repo id in any letter case, alias)."""
        base, adapter = split_model(model)
        canon = self.canonical(base)
        if canon is not None:
            return canon, adapter
        if adapter is None and base in self.adapter_bases:
            return self.adapter_bases[base], base
        return base, adapter

    def resolve(self, model: str) -> tuple[str, str | None]:
        base, adapter = self.split(model)
        if base not in self.llm:
            known = list(self.llm) + (list(self.routing.routes) if self.routing else [])
            raise not_found_model(model, known)
        self._check_ready(base)
        return base, adapter

    def _admit(self, request, route: str, base: str, adapter: str | None, prompt, max_tokens: int | None, n: int,
               extra_tokens: int = 0):
        """A governance Ticket for one model request (None when governance is off); `extra_tokens`: what the
        prompt gains beyond its messages (tool definitions)."""
        if self.governance is None or request is None:
            return None
        est = governed.estimate_tokens(prompt) + extra_tokens
        if max_tokens is None:  # reserve the worst case: the rest of the context
            ctx = self.context.get(base) or self.config.model(base).max_model_len or 2048
            max_tokens = max(1, ctx - est)
        return self.governance.admit(request, route=route, model=base, adapter=adapter, prompt=prompt,
                                     prompt_tokens=est, max_tokens=max_tokens * n)

    # ---- model deployments ----------------------------------------------------------------------
    async def open(self, base: str, req: dict):
        """Start a replica stream and wait for its first item: accepted (go on) or error (raise)."""
        from ray.serve.exceptions import BackPressureError

        gen = self.llm[base].options(stream=True).stream.remote(req)
        try:
            first = await gen.__anext__()
        except BackPressureError:
            raise APIError(429, f"The model `{base}` is overloaded; retry later.", code="queue_full",
                           retry_after=1) from None
        except StopAsyncIteration:
            raise APIError(500, "the model deployment ended the stream early", type="server_error") from None
        except BaseException:
            cancel_stream(gen)
            raise
        if first["kind"] == "error":
            raise APIError.from_dict(first["error"])
        return first, gen

    async def open_many(self, base: str, reqs: list[dict]):
        results = await asyncio.gather(*(self.open(base, r) for r in reqs), return_exceptions=True)
        errors = [r for r in results if isinstance(r, BaseException)]
        if errors:
            for r in results:
                if not isinstance(r, BaseException):
                    cancel_stream(r[1])
            raise errors[0]
        return results

    # ---- chat -----------------------------------------------------------------------------------
    async def chat(self, body: ChatCompletionRequest, request=None):
        """(a response dict or an SSE iterator, extra response headers). Order: route or resolve the model,
        admit (keys, limits, budget, prompt PII), ground (retrieval), open a replica stream (with fallback)."""
        body.check()
        t0 = time.monotonic()
        messages = body.template_messages()
        principal = governed.principal_of(request)
        decision = None
        from serving.router.predict import estimate_prompt_tokens, estimate_tool_tokens

        tools = body.tool_request
        tool_tokens = estimate_tool_tokens(tools.tools if tools else None)  # priced and predicted with the prompt
        if self.routing is not None and self.routing.has_route(body.model):
            decision = self.routing.decide(body, request.headers if request is not None else None,
                                           estimate_prompt_tokens(messages) + tool_tokens, body.completion_limit())
            if principal is not None:
                self.governance.authorize(principal, model=body.model)  # the route name is on the models list
                self.routing.restrict(decision, lambda m: governed.allows(principal, *self.split(m)))
            base, adapter = self.split(decision.primary.model)
        else:
            base, adapter = self.resolve(body.model)
        if body.retrieval is not None and principal is not None and isinstance(body.retrieval, dict) \
                and isinstance(body.retrieval.get("collection"), str):
            from serving.governance.errors import GovernanceError

            try:
                self.governance.authorize(principal, collection=body.retrieval["collection"])
            except GovernanceError as exc:
                exc.param = "retrieval.collection"
                raise
        ticket = self._admit(request, "/v1/chat/completions", base, adapter, messages, body.completion_limit(),
                             body.n, extra_tokens=tool_tokens)
        headers: dict[str, str] = {}
        routed = None
        try:
            if ticket is not None:
                messages = ticket.prompt  # redacted under a `redact` prompt policy
                governed.check_logprobs(ticket, bool(body.logprobs))
            citations = None
            if body.retrieval is not None:
                messages, citations = await self._ground(body.retrieval, messages)
            if ticket is not None:
                ticket.constraint = describe_constraint(body.structured, tools.tools if tools else None)
            req = {"kind": "chat", "messages": messages, "sampling": body.to_sampling(), "adapter": adapter,
                   "request_id": new_id("chatcmpl"), "user": body.user,
                   "tools": tools.tools if tools else None, "tool_choice": body.tool_choice,
                   "parallel_tool_calls": body.parallel_tool_calls}
            if decision is not None:
                opened_at = [t0]
                routed, gen, accepted = await self.routing.open(decision, req, opened_at)
                base, adapter = accepted["base"], accepted["adapter"]
                headers = self._route_headers(routed)
                body.model = routed.model  # the answer names the model that wrote it; X-Routed-Model too
                governed.reprice(ticket, self.governance, base, adapter)
                opened = opened_at[0]
            else:
                opened = time.monotonic()
                accepted, gen = await self.open(base, req)
        except BaseException as exc:
            self._failed_before_stream(exc, ticket, base, adapter, "chat")
            raise
        rec = RequestRecord(self.metrics, base, adapter, "chat")
        rec.t0 = t0
        rec.accepted(accepted["prompt_tokens"])
        run = ChatRun(body, gen, rec, ticket, citations, routed, base, opened, accepted)
        if body.stream:
            return self._chat_sse(run), headers
        return await self._chat_full(run), headers

    def _failed_before_stream(self, exc: BaseException, ticket, base: str, adapter: str | None,
                              endpoint: str) -> None:
        """A request that failed before its first token: settle its budget ticket and count its status."""
        status = _status_of(exc)
        if ticket is not None:
            ticket.settle(0, 0, status=status)
        RequestRecord(self.metrics, base, adapter, endpoint).done(status)

    @staticmethod
    def _route_headers(routed) -> dict[str, str]:
        from serving.router import response_headers

        return response_headers(routed)

    async def _ground(self, retrieval, messages: list[dict]) -> tuple[list[dict], list[dict]]:
        """Retrieve chunks for the `retrieval` field and put them into the messages (serving.rag.grounding)."""
        if self.rag is None:
            raise APIError(400, "retrieval is not available: this server runs without collections "
                                "(rag.enabled is false).", param="retrieval", code="retrieval_unavailable")
        from serving.rag.errors import RagError
        from serving.rag.grounding import aretrieve_for_chat

        try:
            return await aretrieve_for_chat(self.rag, retrieval, messages)
        except RagError as exc:
            raise APIError(exc.status, exc.message, param=exc.param, code=exc.code) from None

    def _finish(self, run: ChatRun, status: int, content: dict | None = None) -> None:
        """Metrics, spend (exact token counts) and the router's signals, once per request."""
        run.rec.done(status)
        if run.ticket is not None:
            run.ticket.completion_tokens = run.rec.completion_tokens
            run.ticket.settle(run.rec.prompt_tokens, run.rec.completion_tokens, status=status, content=content)
        if self.routing is not None and status == 200:
            self.routing.observe(run.routed.choice if run.routed is not None else run.base, run.rec,
                                 run.opened_at)

    def _guard_item(self, run: ChatRun, item: dict, index_base: int = 0) -> None:
        """Pass an item's texts through the output guards (in place); raises PIIBlocked under `block`."""
        if run.guards.active:
            for c in item["choices"]:
                c["text"] = run.guards.feed(index_base + c["index"], c["text"], c["finish_reason"] is not None)

    async def _chat_sse(self, run: ChatRun):
        from serving.governance.errors import PIIBlocked

        body, rec = run.body, run.rec
        chunks = ChatChunks(body.model, body.include_usage, run.fingerprint)
        calls = {i: run.tool_format.stream() for i in range(body.n)} if run.tool_format else None
        status = 499  # client closed the connection, unless we get to the end
        try:
            yield sse(chunks.role_chunk(body.n))
            async for item in run.gen:
                rec.delta(item)
                if run.ticket is not None:
                    run.ticket.completion_tokens = rec.completion_tokens
                if calls:  # parse first, then guard content as text and arguments inside JSON strings
                    out = chunks.tool_chunks(item, calls, run.guards.pieces if run.guards.active else None)
                else:
                    self._guard_item(run, item)
                    out = [c for c in [chunks.delta_chunk(item)] if c]
                if item.get("finished") and run.citations is not None and not body.include_usage:
                    out = out or [chunks.empty_chunk()]
                    out[-1]["citations"] = run.citations  # the final chunk carries the sources
                for chunk in out:
                    yield sse(chunk)
            if body.include_usage:
                last = chunks.usage_chunk(usage(rec.prompt_tokens, rec.completion_tokens, rec.cached_tokens))
                if run.citations is not None:
                    last["citations"] = run.citations
                yield sse(last)
            run.guards.close()
            yield SSE_DONE
            status = 200
        except PIIBlocked as exc:  # personal data in the output under a `block` policy: stop, say why
            status = exc.status
            yield sse(exc.body())
            yield SSE_DONE
        except Exception as exc:  # the replica died mid-stream: tell the client in-band
            log.exception("stream failed")
            status = 500
            yield sse(APIError(500, f"generation failed: {type(exc).__name__}", type="server_error").body())
            yield SSE_DONE
        finally:
            if status != 200:
                await close_stream(run.gen)
            self._finish(run, status)

    async def _chat_full(self, run: ChatRun) -> dict:
        body, rec = run.body, run.rec
        n = body.n
        texts = [[] for _ in range(n)]
        lps: list[list | None] = [None] * n
        reasons: list[str | None] = [None] * n
        status = 499
        try:
            async for item in run.gen:
                rec.delta(item)
                for c in item["choices"]:
                    i = c["index"]
                    texts[i].append(c["text"])
                    if c["logprobs"] is not None:
                        lps[i] = (lps[i] or []) + c["logprobs"]
                    if c["finish_reason"]:
                        reasons[i] = finish(c["finish_reason"])
            if run.tool_format is None:
                outputs = [run.guards.whole("".join(t)) for t in texts]  # PIIBlocked: a 400 naming the kinds
            else:  # calls in the model's format -> message.tool_calls; guarded after parsing
                outputs = [self._parse_calls(run, "".join(t)) for t in texts]
            status = 200
        except BaseException as exc:
            status = getattr(exc, "status", None) if isinstance(getattr(exc, "status", None), int) else status
            await close_stream(run.gen)
            raise
        finally:
            content = {"prompt": run.ticket.prompt, "output": outputs} if status == 200 and run.ticket else None
            self._finish(run, status, content)
        choices = []
        for i in range(n):
            lp = chat_logprobs(lps[i] or []) if body.logprobs else None
            message = {"role": "assistant", "content": outputs[i], "refusal": None}
            reason = reasons[i] or "stop"
            if run.tool_format is not None:
                content, calls, reason = outputs[i](reason)
                message["content"] = content
                if calls:
                    message["tool_calls"] = calls
            choices.append({"index": i, "message": message, "logprobs": lp, "finish_reason": reason})
        out = {"id": new_id("chatcmpl"), "object": "chat.completion", "created": int(time.time()),
               "model": body.model, "system_fingerprint": run.fingerprint, "choices": choices,
               "usage": usage(rec.prompt_tokens, rec.completion_tokens, rec.cached_tokens)}
        if run.citations is not None:
            out["citations"] = run.citations
        return out

    @staticmethod
    def _parse_calls(run: ChatRun, text: str):
        """A whole answer in the model's call format -> a function of the engine's finish reason giving
        (content, tool_calls, finish_reason), content and arguments through the output guards."""
        parsed = run.tool_format.stream()
        parsed.feed(text)
        parsed.finish()
        content = run.guards.whole(parsed.content, json_text=False)
        calls = [{**c, "function": {**c["function"], "arguments": run.guards.whole(c["function"]["arguments"],
                                                                                    json_text=True)}}
                 for c in parsed.tool_calls]
        return lambda reason: (content, calls, parsed.finish_reason(reason))

    # ---- completions ----------------------------------------------------------------------------
    async def completion(self, body: CompletionRequest, request=None):
        body.check()
        if self.routing is not None and self.routing.has_route(body.model):
            raise APIError(400, f"`{body.model}` is a route: routes serve /v1/chat/completions only.",
                           param="model", code="route_chat_only")
        base, adapter = self.resolve(body.model)
        prompts = body.prompts()
        ticket = self._admit(request, "/v1/completions", base, adapter, prompts, body.max_tokens,
                             body.n * len(prompts))
        try:
            if ticket is not None:
                prompts = ticket.prompt
                governed.check_logprobs(ticket, body.logprobs is not None)
                ticket.constraint = describe_constraint(body.to_sampling().get("structured"), None)
            sampling = body.to_sampling()
            reqs = [{"kind": "completion", "prompt": p, "echo": body.echo, "sampling": sampling,
                     "adapter": adapter, "request_id": f"cmpl-{uuid.uuid4().hex}", "user": body.user}
                    for p in prompts]
            opened = await self.open_many(base, reqs)
        except BaseException as exc:
            self._failed_before_stream(exc, ticket, base, adapter, "completions")
            raise
        rec = RequestRecord(self.metrics, base, adapter, "completions")
        for accepted, _ in opened:
            rec.accepted(accepted["prompt_tokens"])
        run = ChatRun(body, [g for _, g in opened], rec, ticket, None, None, base, rec.t0, opened[0][0])
        if body.stream:
            return self._completion_sse(run)
        return await self._completion_full(run, opened)

    async def _completion_sse(self, run: ChatRun):
        from serving.governance.errors import PIIBlocked

        body, rec, gens = run.body, run.rec, run.gen
        chunks = CompletionChunks(body.model, body.include_usage, run.fingerprint)
        converters: dict[int, CompletionLogprobs] = {}
        status = 499
        try:
            async for p, item in merge_streams(gens):
                rec.delta(item)
                self._guard_item(run, item, p * body.n)
                chunk = chunks.delta_chunk(item, p * body.n, converters)
                if chunk:
                    yield sse(chunk)
            if body.include_usage:
                yield sse(chunks.usage_chunk(usage(rec.prompt_tokens, rec.completion_tokens, rec.cached_tokens)))
            run.guards.close()
            yield SSE_DONE
            status = 200
        except PIIBlocked as exc:
            status = exc.status
            yield sse(exc.body())
            yield SSE_DONE
        except Exception as exc:
            log.exception("stream failed")
            status = 500
            yield sse(APIError(500, f"generation failed: {type(exc).__name__}", type="server_error").body())
            yield SSE_DONE
        finally:
            if status != 200:
                for g in gens:
                    cancel_stream(g)
            self._finish(run, status)

    async def _completion_full(self, run: ChatRun, opened: list) -> dict:
        body, rec = run.body, run.rec
        n = body.n
        total = len(opened) * n
        texts = [[] for _ in range(total)]
        lps: list[dict | None] = [None] * total
        reasons: list[str | None] = [None] * total
        converters: dict[int, CompletionLogprobs] = {}
        for p, (accepted, _) in enumerate(opened):
            if body.echo:
                prompt = accepted.get("prompt_text") or ""
                for c in range(n):
                    texts[p * n + c].append(prompt)
        status = 499
        try:
            async for p, item in merge_streams([g for _, g in opened]):
                rec.delta(item)
                for c in item["choices"]:
                    i = p * n + c["index"]
                    texts[i].append(c["text"])
                    if c["logprobs"] is not None:
                        conv = converters.setdefault(i, CompletionLogprobs())
                        lps[i] = merge_completion_logprobs(lps[i], conv.convert(c["logprobs"]))
                    if c["finish_reason"]:
                        reasons[i] = finish(c["finish_reason"])
            outputs = [run.guards.whole("".join(t)) for t in texts]
            status = 200
        except BaseException as exc:
            status = exc.status if isinstance(getattr(exc, "status", None), int) else status
            for _, g in opened:
                cancel_stream(g)
            raise
        finally:
            self._finish(run, status)
        empty = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        choices = [{"index": i, "text": outputs[i],
                    "logprobs": (lps[i] or empty) if body.logprobs is not None else None,
                    "finish_reason": reasons[i] or "stop"} for i in range(total)]
        return {"id": new_id("cmpl"), "object": "text_completion", "created": int(time.time()),
                "model": body.model, "system_fingerprint": run.fingerprint, "choices": choices,
                "usage": usage(rec.prompt_tokens, rec.completion_tokens, rec.cached_tokens)}

    # ---- embeddings -----------------------------------------------------------------------------
    async def embeddings(self, body: EmbeddingRequest, request=None) -> dict:
        if self.embed is None or body.model != self.embed_name:
            known = [self.embed_name] if self.embed_name else []
            raise not_found_model(body.model, known)
        principal = governed.principal_of(request)
        if principal is not None:  # not priced (no chat tokens): only the key's model allow-list applies
            self.governance.authorize(principal, model=self.embed_name)
        self._check_ready(self.embed_name)
        texts = body.texts()
        limit = self.config.embeddings.max_inputs
        if len(texts) > limit:
            raise APIError(400, f"input has {len(texts)} strings; at most {limit} are allowed.", param="input",
                           code="invalid_value")
        dim = (self.embed_info or {}).get("dim")
        if body.dimensions is not None and body.dimensions != dim:
            raise APIError(400, f"dimensions must be {dim} for `{self.embed_name}` (it cannot be shortened).",
                           param="dimensions", code="invalid_value")
        t0 = time.monotonic()
        lab = Metrics.labels(self.embed_name, None)
        vecs, tokens = await self.embed.embed.remote(texts)
        vecs = np.asarray(vecs, dtype=np.float32)
        data = []
        for i, v in enumerate(vecs):
            if body.encoding_format == "base64":
                emb = base64.b64encode(v.astype("<f4").tobytes()).decode("ascii")
            else:
                emb = v.tolist()
            data.append({"object": "embedding", "index": i, "embedding": emb})
        self.metrics.embedding_tokens.labels(self.embed_name).inc(tokens)
        self.metrics.e2e.labels(**lab).observe(time.monotonic() - t0)
        self.metrics.requests.labels(**lab, endpoint="embeddings", status="200").inc()
        return {"object": "list", "data": data, "model": self.embed_name,
                "usage": {"prompt_tokens": tokens, "total_tokens": tokens}}

    # ---- models, readiness, metrics -------------------------------------------------------------
    async def models(self, request=None) -> dict:
        """Models, their adapters, the embedding model and routes; a key sees those its allow-lists cover."""
        cards: list[dict] = []
        names = [n for n in self.llm if n in self.ready]
        results = await asyncio.gather(*(self.llm[n].models.remote() for n in names), return_exceptions=True)
        for name, res in zip(names, results):
            if isinstance(res, BaseException):
                log.warning("listing models of %s failed: %s", name, res)
                continue
            cards.extend(res)
        for name in self.llm:
            if name not in self.ready:  # still loading: listed, without details
                cards.append({"id": name, "object": "model", "created": 0, "owned_by": "loraplex",
                              "root": name, "parent": None})
        if self.embed_name:
            cards.append({"id": self.embed_name, "object": "model", "created": 0, "owned_by": "loraplex",
                          "root": self.embed_name, "parent": None, "type": "embedding",
                          "dim": (self.embed_info or {}).get("dim")})
        if self.routing is not None:
            cards.extend(self.routing.cards())
        principal = governed.principal_of(request)
        if principal is not None:
            cards = [c for c in cards if self._card_allowed(principal, c)]
        return {"object": "list", "data": cards}

    def _card_allowed(self, principal, card: dict) -> bool:
        if card.get("parent"):
            return governed.allows(principal, card["parent"], card["id"].partition(":")[2] or card["id"])
        return principal.allows("models", card["id"])

    async def model(self, model_id: str, request=None) -> dict:
        cards = (await self.models(request))["data"]
        wanted = {model_id, self.canonical(model_id)}  # a base may be asked for by its repo id or an alias
        for card in cards:
            if card["id"] in wanted:
                return card
        raise not_found_model(model_id, [c["id"] for c in cards])

    async def readiness(self) -> dict:
        missing = [n for n in self.all_names() if n not in self.ready]
        if missing:
            raise APIError(503, f"Not ready: still loading {', '.join(missing)}.", code="not_ready",
                           retry_after=5)
        return {"status": "ready", "models": self.all_names()}

    async def refresh_stats(self) -> None:
        """Read engine stats from the model deployments (the last answer of each replica is kept)."""
        async def one(name):
            try:
                s = await asyncio.wait_for(self._await(self.llm[name].stats.remote()), timeout=2.0)
            except Exception:
                return
            self._stats[name][s.get("replica", "?")] = s

        # Serve has no broadcast: ask as many times as the deployment may have replicas, keep one per replica.
        calls = [one(n) for n in self.llm if n in self.ready for _ in range(self._max_replicas(n))]
        await asyncio.gather(*calls)
        now = time.time()
        for name, per in self._stats.items():
            for rid in [r for r, s in per.items() if now - s.get("time", now) > STATS_MAX_AGE_S]:
                del per[rid]
            if per:
                self.metrics.set_engine_stats(name, list(per.values()))

    def _max_replicas(self, name: str) -> int:
        spec = self.config.model(name)
        n = spec.autoscaling.max_replicas if spec.autoscaling else spec.num_replicas
        return 1 if n == 1 else min(n * 2, 16)

    @staticmethod
    async def _await(resp):
        return await resp
