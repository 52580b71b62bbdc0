"""The shared output paths of every generation endpoint: one streaming path and one aggregate path.

Both read a started serving.api.pipeline.Generation: they merge its replica streams, count tokens for metrics
and spend, pass the text through the output guards (PII) and, when the request may call tools, through the
model's call parser (serving.api.tool_parsers) — content as text, arguments as JSON — and settle the request
once at the end. An endpoint supplies only the wire format: a `StreamFormat` for the stream, or a function of
the `ChoiceResult`s for the whole body.
"""

from __future__ import annotations

import inspect
import logging
from dataclasses import dataclass, field
from typing import AsyncIterator

from serving.api.errors import APIError
from serving.api.streaming import close_stream, merge_streams
from serving.api.wire import finish, usage

log = logging.getLogger("loraplex.gateway")


@dataclass
class ChoiceDelta:
    """One choice's part of one replica item, guarded and parsed."""

    index: int
    text: str  # content text (empty when tools are on: see pieces)
    pieces: list | None  # tools on: OpenAI delta pieces in order ({"content"} or {"tool_calls": [...]})
    logprobs: list | None
    finish_reason: str | None  # as OpenAI names it (`tool_calls` when the answer made calls)


@dataclass
class ChoiceResult:
    """A whole choice: its content, calls, log-probabilities and finish reason."""

    index: int
    text: str | None
    tool_calls: list = field(default_factory=list)
    logprobs: list | None = None
    finish_reason: str = "stop"


def usage_of(g) -> dict:
    return usage(g.rec.prompt_tokens, g.rec.completion_tokens, g.rec.cached_tokens)


async def choice_deltas(g) -> AsyncIterator[tuple[dict, list[ChoiceDelta]]]:
    """(replica item, its choices' deltas) as they arrive; choice indexes run over all prompts (p * n + c)."""
    fmt, guards, n = g.tool_format, g.guards, g.req.n
    calls: dict = {}
    async for p, item in merge_streams(g.gens):
        g.rec.delta(item)
        if g.ticket is not None:
            g.ticket.completion_tokens = g.rec.completion_tokens
        out = []
        for c in item["choices"]:
            i, done, reason = p * n + c["index"], c["finish_reason"] is not None, finish(c["finish_reason"])
            if fmt is None:
                text = guards.feed(i, c["text"], done) if guards.active else c["text"]
                out.append(ChoiceDelta(i, text, None, c["logprobs"], reason))
                continue
            stream = calls.get(i) or calls.setdefault(i, fmt.stream())
            pieces = stream.feed(c["text"]) + (stream.finish() if done else [])
            if guards.active:  # after parsing: content as text, arguments inside JSON strings
                pieces = guards.pieces(i, pieces, done)
            out.append(ChoiceDelta(i, "", pieces, c["logprobs"], stream.finish_reason(reason) if done else None))
        yield item, out


class StreamFormat:
    """An endpoint's stream wire format: SSE strings for the start, each item's deltas, the end, a failure."""

    def start(self, g) -> list[str]:
        return []

    def deltas(self, g, item: dict, deltas: list[ChoiceDelta]) -> list[str]:
        raise NotImplementedError

    def end(self, g, usage: dict) -> list[str]:
        return []

    def fail(self, g, error: dict, usage: dict) -> list[str]:
        """The stream broke after it started: `error` is OpenAI's error body."""
        raise NotImplementedError


async def stream(pipeline, g, fmt: StreamFormat) -> AsyncIterator[str]:
    """The shared streaming path: the format's SSE events; errors after the start end the stream in-band."""
    from serving.governance.errors import PIIBlocked

    status = 499  # the client closed the connection, unless we get to the end
    try:
        for s in fmt.start(g):
            yield s
        async for item, deltas in choice_deltas(g):
            for s in fmt.deltas(g, item, deltas):
                yield s
        g.guards.close()
        events = fmt.end(g, usage_of(g))
        if inspect.isawaitable(events):  # e.g. the Responses API stores the response before saying it is done
            events = await events
        for s in events:
            yield s
        status = 200
    except PIIBlocked as exc:  # personal data in the output under a `block` policy: stop, say why
        status = exc.status
        for s in fmt.fail(g, exc.body(), usage_of(g)):
            yield s
    except Exception as exc:  # the replica died mid-stream: tell the client in-band, in words
        log.exception("stream failed")
        status = 500
        err = APIError(500, f"generation failed: {_cause(exc)}", type="server_error")
        for s in fmt.fail(g, err.body(), usage_of(g)):
            yield s
    finally:
        if status != 200:
            for gen in g.gens:
                await close_stream(gen)
        pipeline.finish(g, status)


def _cause(exc: BaseException) -> str:
    """A failure in words a user understands (Ray's class names mean nothing to them)."""
    name = type(exc).__name__
    if "ActorDied" in name or "ActorUnavailable" in name or "RayActorError" in name:
        return "the model replica stopped while generating"
    return str(exc) or name


async def collect(pipeline, g) -> list[ChoiceResult]:
    """The shared aggregate path: every choice whole (guarded; calls parsed when tools are on)."""
    n, fmt = g.req.n, g.tool_format
    total = n * len(g.gens)
    texts: list[list[str]] = [[] for _ in range(total)]
    lps: list[list | None] = [None] * total
    reasons: list[str | None] = [None] * total
    if g.req.echo:
        for p, accepted in enumerate(g.accepted):
            for c in range(n):
                texts[p * n + c].append(accepted.get("prompt_text") or "")
    status, results = 499, []
    try:
        async for p, item in merge_streams(g.gens):
            g.rec.delta(item)
            for c in item["choices"]:
                i = p * n + c["index"]
                texts[i].append(c["text"])
                if c["logprobs"] is not None:
                    lps[i] = (lps[i] or []) + c["logprobs"]
                if c["finish_reason"]:
                    reasons[i] = finish(c["finish_reason"])
        for i in range(total):  # PIIBlocked here: a 400 naming the kinds
            text, reason = "".join(texts[i]), reasons[i] or "stop"
            if fmt is None:
                results.append(ChoiceResult(i, g.guards.whole(text), [], lps[i], reason))
                continue
            parsed = fmt.stream()
            parsed.feed(text)
            parsed.finish()
            calls = [{**c, "function": {**c["function"],
                                        "arguments": g.guards.whole(c["function"]["arguments"], json_text=True)}}
                     for c in parsed.tool_calls]
            results.append(ChoiceResult(i, g.guards.whole(parsed.content, json_text=False), calls, lps[i],
                                        parsed.finish_reason(reason)))
        status = 200
    except BaseException as exc:
        status = exc.status if isinstance(getattr(exc, "status", None), int) else status
        for gen in g.gens:
            await close_stream(gen)
        raise
    finally:
        content = None
        if status == 200 and g.ticket is not None and g.req.kind == "chat":
            content = {"prompt": g.ticket.prompt, "output": [r.text for r in results]}
        pipeline.finish(g, status, content)
    return results
