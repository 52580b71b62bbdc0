"""What a model replica does with an API request: template, tokenise, validate, then stream engine deltas.

The replica streams plain dicts (cheap to pickle through Ray Serve), and the first one is always either
`{"kind": "accepted", ...}` or `{"kind": "error", ...}`: the gateway waits for it before sending any HTTP
headers, so validation errors, context-length errors and a full queue come back as proper 4xx JSON rather
than inside an SSE stream.
"""

from __future__ import annotations

import asyncio
import logging
import secrets
import threading
import time
import uuid

from serving.api.errors import APIError

log = logging.getLogger("loraplex.backend")


class TokenBytes:
    """Each token id's raw bytes, OpenAI's logprobs `bytes`: a byte-level BPE token may be part of one UTF-8
    character (an emoji is often two tokens), whose text alone decodes to U+FFFD, so the bytes cannot come from
    the text. They come from xgrammar's decoded vocabulary (it reads byte-level, byte-fallback and raw
    vocabularies alike); an id beyond it, or a tokenizer xgrammar cannot read, falls back to the text's UTF-8."""

    def __init__(self, tokenizer):
        self.tokenizer = tokenizer
        self._vocab: list[bytes] | None = None
        self._built = False
        self._lock = threading.Lock()

    def ready(self) -> "TokenBytes":
        """Build the table once (about half a second for a 50k vocabulary: call it off the event loop)."""
        with self._lock:
            if not self._built:
                try:
                    import xgrammar as xgr

                    self._vocab = list(xgr.TokenizerInfo.from_huggingface(self.tokenizer).decoded_vocab)
                except Exception:  # an unusual tokenizer: the text's bytes, as before
                    log.warning("no byte table for this tokenizer; logprobs bytes from token text", exc_info=True)
                self._built = True
        return self

    def __call__(self, token_id: int, text: str) -> list[int]:
        if self._vocab is not None and 0 <= token_id < len(self._vocab):
            return list(self._vocab[token_id])
        return list(text.encode("utf-8", errors="replace"))


def _logprobs_dict(lps, token_bytes: TokenBytes | None = None) -> list | None:
    """Picklable logprobs; with `token_bytes`, each token's raw `bytes` and its top entries' (`top_bytes`)."""
    if lps is None:
        return None
    out = []
    for lp in lps:
        top = [(int(t[0]), str(t[1]), float(t[2])) for t in (lp.top or [])]
        d = {"id": lp.token_id, "token": lp.token, "logprob": float(lp.logprob), "top": top}
        if token_bytes is not None:
            d["bytes"] = token_bytes(lp.token_id, lp.token)
            d["top_bytes"] = [token_bytes(i, t) for i, t, _ in top]
        out.append(d)
    return out


def _ended_by_stop_token(c) -> bool:
    """Whether the choice's last token is EOS or a stop_token_id: it ends the answer without being in its text,
    so it gets no logprobs entry (OpenAI's logprobs are the *content* tokens: their bytes join to the text)."""
    return c.finish_reason == "stop" and not isinstance(getattr(c, "stop_reason", None), str)


def delta_item(out, token_bytes: TokenBytes | None = None) -> dict:
    """One engine RequestOutput -> a picklable delta."""
    choices = []
    for c in out.outputs:
        lps = c.logprobs
        if lps and c.token_ids and _ended_by_stop_token(c) and lps[-1].token_id == c.token_ids[-1]:
            lps = lps[:-1]
        choices.append({
            "index": c.index,
            "text": c.text,
            "num_tokens": len(c.token_ids),
            "token_ids": list(c.token_ids),  # what a failover resumes from (serving.api.failover)
            "logprobs": _logprobs_dict(lps, token_bytes),
            "finish_reason": c.finish_reason,
        })
    item = {"kind": "delta", "choices": choices, "finished": bool(out.finished),
            "num_cached_tokens": int(getattr(out, "num_cached_tokens", 0) or 0)}
    m = getattr(out, "metrics", None) or {}
    arrival = m.get("arrival") or m.get("arrival_time")
    started = m.get("first_scheduled") or m.get("scheduled") or m.get("first_scheduled_time")
    if arrival is not None and started is not None:
        item["queue_time"] = max(0.0, float(started) - float(arrival))
    return item


class ModelBackend:
    """One engine and the API-level work around it, inside a model replica."""

    def __init__(self, engine, name: str, adapters: dict[str, str] | None = None, tool_call_parser: str = "auto",
                 replica: str = "local"):
        from serving.api.tool_parsers import pick_parser

        self.engine = engine
        self.name = name
        # The model's tool-call format (serve config tool_call_parser; auto: by its chat template). A parser
        # that does not fit the template stops the replica at start with the reason, not at the first call.
        self.tool_format = pick_parser(engine.tokenizer, tool_call_parser)
        self.adapters = dict(adapters or {})  # adapter name -> source; the engine owns the weights
        self.created = int(time.time())
        self.token_bytes = TokenBytes(engine.tokenizer)  # built at the first request that asks for logprobs
        self.replica = replica  # named in each accepted item (a failover says which replica it left)

    # ---- requests -------------------------------------------------------------------------------
    def _prompt_ids(self, req: dict) -> tuple[list[int], str | None]:
        tok = self.engine.tokenizer
        if req["kind"] == "chat":
            from serving.api.tool_prompt import render_chat

            try:
                text = render_chat(tok, req["messages"], req.get("tools"))
            except Exception as exc:  # jinja raises TemplateError for e.g. an unsupported role order
                raise APIError(400, f"The chat template rejected these messages: {exc}",
                               param="messages", code="invalid_messages") from None
            return list(tok(text, add_special_tokens=False)["input_ids"]), None
        prompt = req["prompt"]
        if isinstance(prompt, str):
            return list(tok(prompt)["input_ids"]), prompt
        vocab = len(tok)
        bad = [t for t in prompt if not isinstance(t, int) or not 0 <= t < vocab]
        if bad:
            raise APIError(400, f"prompt contains token ids outside the vocabulary (0..{vocab - 1}): {bad[:5]}",
                           param="prompt", code="invalid_value")
        return list(prompt), (tok.decode(prompt) if req.get("echo") else None)

    def _prepare(self, req: dict):
        from serving.engine import SamplingParams
        from serving.engine.errors import EngineError

        param = "messages" if req["kind"] == "chat" else "prompt"
        try:
            prompt_ids, prompt_text = self._prompt_ids(req)
            params = SamplingParams(**self._with_tool_grammar(req)).validate()
            if not params.greedy and params.seed is None:  # told to the gateway: a failover resumes with it
                params.seed = secrets.randbits(62)
            self.engine.check_request(prompt_ids, params)
        except APIError:
            raise
        except EngineError as exc:
            err = APIError.from_engine(exc)
            if err.code == "context_length_exceeded" and err.param in (None, "messages", "prompt"):
                err.param = param
            raise err from None
        except TypeError as exc:  # an unexpected keyword in the sampling dict: our bug, not the client's
            raise APIError(500, f"bad sampling parameters: {exc}", type="server_error") from None
        lora = req.get("adapter")
        if lora is not None and lora not in self.adapters:
            raise APIError(404, f"The model `{self.name}:{lora}` does not exist.", param="model",
                           code="model_not_found")
        return prompt_ids, prompt_text, params

    def _with_tool_grammar(self, req: dict) -> dict:
        """The request's sampling dict, with the grammar that forces well-formed calls in this model's format."""
        sampling = req["sampling"]
        if not req.get("tools"):
            return sampling
        from serving.api.structured import tool_grammar_spec
        from serving.api.tools import parse_tool_request

        tools = parse_tool_request(req["tools"], req.get("tool_choice"), req.get("parallel_tool_calls"))
        sampling = {**sampling, "structured": tool_grammar_spec(self.tool_format.grammar(tools), tools)}
        if self.tool_format.needs_special_tokens(self.engine.tokenizer):  # e.g. <|python_tag|>, [TOOL_CALLS]
            sampling["skip_special_tokens"] = False
        return sampling

    async def stream(self, req: dict):
        """Yield the accepted/error item, then deltas until every choice finished. Cancelling aborts."""
        from serving.engine.errors import EngineError

        request_id = req.get("request_id") or uuid.uuid4().hex
        try:
            # off the replica's event loop: templating, tokenising and a cold grammar compile (~60 ms) take CPU
            prompt_ids, prompt_text, params = await asyncio.to_thread(self._prepare, req)
        except APIError as err:
            yield {"kind": "error", "error": err.to_dict()}
            return
        token_bytes = None
        if params.logprobs is not None:
            token_bytes = await asyncio.to_thread(self.token_bytes.ready)
        resume = req.get("resume")  # choice index -> tokens another replica delivered (serving.api.failover)
        gen = self.engine.generate(prompt_ids, params, request_id=request_id, lora_name=req.get("adapter"),
                                   resume={int(i): list(t) for i, t in resume.items()} if resume else None,
                                   coalesce_s=float(req.get("flush_s") or 0.0))
        finished = False
        try:
            try:
                first = await gen.__anext__()
            except StopAsyncIteration:
                first = None
            except EngineError as exc:
                finished = True
                yield {"kind": "error", "error": APIError.from_engine(exc).to_dict()}
                return
            except Exception as exc:  # an engine bug: a clean 500 rather than a broken stream
                finished = True
                log.exception("request %s failed before its first token", request_id)
                err = APIError(500, f"generation failed: {type(exc).__name__}", type="server_error")
                yield {"kind": "error", "error": err.to_dict()}
                return
            yield {"kind": "accepted", "request_id": request_id, "prompt_tokens": len(prompt_ids),
                   "prompt_text": prompt_text, "system_fingerprint": self.engine.system_fingerprint,
                   "seed": params.seed, "replica": self.replica,
                   "tool_format": self.tool_format if req.get("tools") else None}
            if first is not None:
                yield delta_item(first, token_bytes)
                async for out in gen:
                    yield delta_item(out, token_bytes)
            finished = True
        finally:
            if not finished:  # the client went away (cancelled) or the gateway stopped reading
                await self._abort(gen, request_id)

    async def _abort(self, gen, request_id: str) -> None:
        try:
            await asyncio.shield(self.engine.abort(request_id))
        except Exception:  # already finished or unknown: nothing to free
            log.debug("abort %s failed", request_id, exc_info=True)
        try:
            await gen.aclose()
        except Exception:
            pass

    # ---- adapters -------------------------------------------------------------------------------
    async def add_adapter(self, name: str, source: str, check_roots: bool = True,
                          roots: list[str] | None = None, force: bool = False) -> dict:
        """Resolve `source` (folder or MLflow URI) and load it into the engine; returns the adapter's card.
        `force` loads an adapter whose declared base names another model, when its shapes fit."""
        from serving.adapters import resolve_source
        from serving.engine.errors import EngineError

        if name in self.adapters:
            raise APIError(409, f"an adapter named {name!r} is already loaded on {self.name}", param="name",
                           code="adapter_exists")
        try:
            path = await asyncio.to_thread(resolve_source, source, roots, check_roots)
            await self.engine.add_lora(name, str(path), force)
        except EngineError as exc:
            raise APIError.from_engine(exc) from None
        self.adapters[name] = source
        return self.adapter_card(name)

    async def remove_adapter(self, name: str) -> None:
        if name not in self.adapters:
            raise APIError(404, f"no adapter named {name!r} on {self.name}", param="name", code="adapter_not_found")
        await self.engine.remove_lora(name)
        del self.adapters[name]

    def adapter_card(self, name: str) -> dict:
        info = next((i for i in self.engine.list_loras() if i.name == name), None)
        return {"id": f"{self.name}:{name}", "object": "adapter", "name": name, "base": self.name,
                "source": self.adapters.get(name, info.source if info else None),
                "state": info.state if info else "unknown", "rank": info.rank if info else None,
                "target_modules": info.target_modules if info else [],
                "load_time_s": info.load_time_s if info else None,
                "declared_base": info.base if info else None, "forced": bool(info and info.forced),
                "warnings": list(info.warnings) if info else []}

    def adapter_cards(self) -> list[dict]:
        return [self.adapter_card(n) for n in sorted(self.adapters)]

    # ---- introspection --------------------------------------------------------------------------
    def model_cards(self) -> list[dict]:
        """As vLLM lists them: the base with `root` = its repo id (else its name), adapters with `parent`."""
        ident = self.engine.identity
        cards = [{"id": self.name, "object": "model", "created": self.created, "owned_by": "loraplex",
                  "root": ident.hf_id or self.name, "parent": None, "aliases": list(ident.aliases),
                  "max_model_len": self.engine.max_model_len}]
        for name in sorted(self.adapters):
            cards.append({"id": f"{self.name}:{name}", "object": "model", "created": self.created,
                          "owned_by": "loraplex", "root": self.adapters[name], "parent": self.name,
                          "max_model_len": self.engine.max_model_len})
        return cards

    def identity_info(self) -> dict:
        """What the gateway needs to accept every name of this model and to fill system_fingerprint."""
        ident = self.engine.identity
        return {"hf_id": ident.hf_id, "aliases": list(ident.aliases),
                "system_fingerprint": self.engine.system_fingerprint}

    def stats(self) -> dict:
        s = dict(self.engine.stats())
        s["time"] = time.time()
        return s
