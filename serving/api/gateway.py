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
from serving.api.streaming import SSE_DONE, cancel_stream, merge_streams, sse

log = logging.getLogger("loraplex.gateway")
STATS_MAX_AGE_S = 60.0


class RequestRecord:
    """Metrics of one API request: TTFT, inter-token gaps, queue time, tokens, final status."""

    def __init__(self, metrics: Metrics, model: str, adapter: str | None, endpoint: str):
        self.m, self.endpoint = metrics, endpoint
        self.lab = Metrics.labels(model, adapter)
        self.t0 = time.monotonic()
        self.last: float | None = None
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
        if "queue_time" in item and self.last is None:
            self.m.queue.labels(**self.lab).observe(item["queue_time"])
        self.cached_tokens = max(self.cached_tokens, item.get("num_cached_tokens", 0))
        if not n:
            return
        now = time.monotonic()
        if self.last is None:
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


class GatewayCore:
    def __init__(self, config, llm_handles: dict, embed_handle=None, routers: list | None = None):
        self.config = config
        self.llm = dict(llm_handles)
        self.embed = embed_handle
        self.embed_name = config.embeddings.name if (embed_handle is not None and config.embeddings.enabled) else None
        self.metrics = Metrics()
        self.ready: set[str] = set()
        self.embed_info: dict | None = None
        self._stats: dict[str, dict[str, dict]] = {name: {} for name in self.llm}
        self._pollers: list[asyncio.Task] = []
        self.extra_routers = routers or []
        from serving.adapters import read_registry

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

    async def _wait_ready(self, name: str, handle) -> None:
        while True:
            try:
                info = await handle.ready.remote()
                if name == self.embed_name:
                    self.embed_info = info
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

    def resolve(self, model: str) -> tuple[str, str | None]:
        base, adapter = split_model(model)
        if adapter is None and base not in self.llm and base in self.adapter_bases:
            base, adapter = self.adapter_bases[base], base
        if base not in self.llm:
            raise not_found_model(model, list(self.llm))
        self._check_ready(base)
        return base, adapter

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
    async def chat(self, body: ChatCompletionRequest):
        body.check()
        base, adapter = self.resolve(body.model)
        rec = RequestRecord(self.metrics, base, adapter, "chat")
        req = {"kind": "chat", "messages": body.template_messages(), "sampling": body.to_sampling(),
               "adapter": adapter, "request_id": new_id("chatcmpl"), "user": body.user}
        try:
            accepted, gen = await self.open(base, req)
        except APIError as err:
            rec.done(err.status)
            raise
        rec.accepted(accepted["prompt_tokens"])
        if body.stream:
            return self._chat_sse(body, gen, rec)
        return await self._chat_full(body, gen, rec)

    async def _chat_sse(self, body: ChatCompletionRequest, gen, rec: RequestRecord):
        chunks = ChatChunks(body.model, body.include_usage)
        status = 499  # client closed the connection, unless we get to the end
        try:
            yield sse(chunks.role_chunk(body.n))
            async for item in gen:
                rec.delta(item)
                chunk = chunks.delta_chunk(item)
                if chunk:
                    yield sse(chunk)
            if body.include_usage:
                yield sse(chunks.usage_chunk(usage(rec.prompt_tokens, rec.completion_tokens, rec.cached_tokens)))
            yield SSE_DONE
            status = 200
        except Exception as exc:  # the replica died mid-stream: tell the client in-band
            log.exception("stream failed")
            status = 500
            yield sse(APIError(500, f"generation failed: {type(exc).__name__}", type="server_error").body())
            yield SSE_DONE
        finally:
            if status != 200:
                cancel_stream(gen)
            rec.done(status)

    async def _chat_full(self, body: ChatCompletionRequest, gen, rec: RequestRecord) -> dict:
        n = body.n
        texts = [[] for _ in range(n)]
        lps: list[list | None] = [None] * n
        reasons: list[str | None] = [None] * n
        status = 499
        try:
            async for item in gen:
                rec.delta(item)
                for c in item["choices"]:
                    i = c["index"]
                    texts[i].append(c["text"])
                    if c["logprobs"] is not None:
                        lps[i] = (lps[i] or []) + c["logprobs"]
                    if c["finish_reason"]:
                        reasons[i] = finish(c["finish_reason"])
            status = 200
        finally:
            if status != 200:
                cancel_stream(gen)
            rec.done(status)
        choices = []
        for i in range(n):
            lp = chat_logprobs(lps[i] or []) if body.logprobs else None
            choices.append({"index": i, "message": {"role": "assistant", "content": "".join(texts[i]),
                                                    "refusal": None},
                            "logprobs": lp, "finish_reason": reasons[i] or "stop"})
        return {"id": new_id("chatcmpl"), "object": "chat.completion", "created": int(time.time()),
                "model": body.model, "system_fingerprint": None, "choices": choices,
                "usage": usage(rec.prompt_tokens, rec.completion_tokens, rec.cached_tokens)}

    # ---- completions ----------------------------------------------------------------------------
    async def completion(self, body: CompletionRequest):
        body.check()
        base, adapter = self.resolve(body.model)
        prompts = body.prompts()
        rec = RequestRecord(self.metrics, base, adapter, "completions")
        sampling = body.to_sampling()
        reqs = [{"kind": "completion", "prompt": p, "echo": body.echo, "sampling": sampling,
                 "adapter": adapter, "request_id": f"cmpl-{uuid.uuid4().hex}", "user": body.user}
                for p in prompts]
        try:
            opened = await self.open_many(base, reqs)
        except APIError as err:
            rec.done(err.status)
            raise
        for accepted, _ in opened:
            rec.accepted(accepted["prompt_tokens"])
        gens = [g for _, g in opened]
        if body.stream:
            return self._completion_sse(body, gens, rec)
        return await self._completion_full(body, opened, rec)

    async def _completion_sse(self, body: CompletionRequest, gens: list, rec: RequestRecord):
        chunks = CompletionChunks(body.model, body.include_usage)
        converters: dict[int, CompletionLogprobs] = {}
        status = 499
        try:
            async for p, item in merge_streams(gens):
                rec.delta(item)
                chunk = chunks.delta_chunk(item, p * body.n, converters)
                if chunk:
                    yield sse(chunk)
            if body.include_usage:
                yield sse(chunks.usage_chunk(usage(rec.prompt_tokens, rec.completion_tokens, rec.cached_tokens)))
            yield SSE_DONE
            status = 200
        except Exception as exc:
            log.exception("stream failed")
            status = 500
            yield sse(APIError(500, f"generation failed: {type(exc).__name__}", type="server_error").body())
            yield SSE_DONE
        finally:
            if status != 200:
                for g in gens:
                    cancel_stream(g)
            rec.done(status)

    async def _completion_full(self, body: CompletionRequest, opened: list, rec: RequestRecord) -> dict:
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
            status = 200
        finally:
            if status != 200:
                for _, g in opened:
                    cancel_stream(g)
            rec.done(status)
        empty = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        choices = [{"index": i, "text": "".join(texts[i]),
                    "logprobs": (lps[i] or empty) if body.logprobs is not None else None,
                    "finish_reason": reasons[i] or "stop"} for i in range(total)]
        return {"id": new_id("cmpl"), "object": "text_completion", "created": int(time.time()),
                "model": body.model, "system_fingerprint": None, "choices": choices,
                "usage": usage(rec.prompt_tokens, rec.completion_tokens, rec.cached_tokens)}

    # ---- embeddings -----------------------------------------------------------------------------
    async def embeddings(self, body: EmbeddingRequest) -> dict:
        if self.embed is None or body.model != self.embed_name:
            known = [self.embed_name] if self.embed_name else []
            raise not_found_model(body.model, known)
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
    async def models(self) -> dict:
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
        return {"object": "list", "data": cards}

    async def model(self, model_id: str) -> dict:
        for card in (await self.models())["data"]:
            if card["id"] == model_id:
                return card
        raise not_found_model(model_id, [c["id"] for c in (await self.models())["data"]])

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
