"""POST /v1/chat/completions: OpenAI's chat wire format over the shared pipeline (serving.api.pipeline)."""

from __future__ import annotations

import time

from serving.api import outputs
from serving.api.outputs import ChoiceDelta, ChoiceResult, StreamFormat
from serving.api.protocol import ChatCompletionRequest
from serving.api.streaming import SSE_DONE, sse
from serving.api.wire import chat_logprobs, new_id


def gen_request(body: ChatCompletionRequest, endpoint: str = "chat", route: str = "/v1/chat/completions",
                stream: bool | None = None):
    """A checked chat request as the pipeline's GenRequest (`stream`: the client's, when not the body's)."""
    from serving.api.pipeline import GenRequest

    body.check()
    return GenRequest(endpoint=endpoint, route=route, model=body.model, kind="chat",
                      prompts=[body.template_messages()], sampling=body.to_sampling(), n=body.n,
                      max_tokens=body.completion_limit(), logprobs=bool(body.logprobs), tools=body.tool_request,
                      structured=body.structured, json_output=body.json_output, retrieval=body.retrieval,
                      user=body.user, id_prefix="chatcmpl", body=body,
                      stream=bool(body.stream) if stream is None else stream)


async def handle(pipeline, body: ChatCompletionRequest, http=None):
    """(a response dict or an SSE iterator, extra response headers)."""
    g = await pipeline.start(gen_request(body), http)
    if body.stream:
        return outputs.stream(pipeline, g, ChatStream(g, body.include_usage)), g.headers
    return completion_body(g, await outputs.collect(pipeline, g), bool(body.logprobs)), g.headers


def completion_body(g, results: list[ChoiceResult], logprobs: bool) -> dict:
    choices = []
    for r in results:
        message = {"role": "assistant", "content": r.text, "refusal": None}
        if r.tool_calls:
            message["tool_calls"] = r.tool_calls
        choices.append({"index": r.index, "message": message,
                        "logprobs": chat_logprobs(r.logprobs or []) if logprobs else None,
                        "finish_reason": r.finish_reason})
    out = {"id": new_id("chatcmpl"), "object": "chat.completion", "created": int(time.time()),
           "model": g.model_name, "system_fingerprint": g.fingerprint, "choices": choices,
           "usage": outputs.usage_of(g)}
    if g.citations is not None:
        out["citations"] = g.citations
    return out


class ChatStream(StreamFormat):
    """chat.completion.chunk events: a role chunk, content (or tool_calls) deltas, usage, [DONE]."""

    def __init__(self, g, include_usage: bool):
        self.id = new_id("chatcmpl")
        self.created = int(time.time())
        self.model, self.fingerprint = g.model_name, g.fingerprint
        self.include_usage = include_usage

    def _chunk(self, choices: list[dict]) -> dict:
        c = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
             "system_fingerprint": self.fingerprint, "choices": choices}
        if self.include_usage:
            c["usage"] = None
        return c

    def start(self, g) -> list[str]:
        return [sse(self._chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                                  "finish_reason": None} for i in range(g.req.n)]))]

    def deltas(self, g, item: dict, deltas: list[ChoiceDelta]) -> list[str]:
        chunks = self._tool_chunks(deltas) if g.tool_format is not None else self._text_chunks(deltas)
        if item.get("finished") and g.citations is not None and not self.include_usage:
            chunks = chunks or [self._chunk([])]
            chunks[-1]["citations"] = g.citations  # the final chunk carries the sources
        return [sse(c) for c in chunks]

    def _text_chunks(self, deltas: list[ChoiceDelta]) -> list[dict]:
        choices = []
        for d in deltas:
            if not d.text and d.finish_reason is None and not d.logprobs:
                continue
            delta = {"content": d.text} if d.text or d.finish_reason is None else {}
            choices.append({"index": d.index, "delta": delta, "logprobs": chat_logprobs(d.logprobs),
                            "finish_reason": d.finish_reason})
        return [self._chunk(choices)] if choices else []

    def _tool_chunks(self, deltas: list[ChoiceDelta]) -> list[dict]:
        """One delta piece a chunk, as OpenAI streams tool calls (index, id and name first, then arguments)."""
        out = []
        for d in deltas:
            lp = chat_logprobs(d.logprobs)
            for p, piece in enumerate(d.pieces):
                last = p == len(d.pieces) - 1
                out.append(self._chunk([{"index": d.index, "delta": piece, "logprobs": lp if p == 0 else None,
                                         "finish_reason": d.finish_reason if last else None}]))
            if not d.pieces and (d.finish_reason is not None or lp):
                out.append(self._chunk([{"index": d.index, "delta": {}, "logprobs": lp,
                                         "finish_reason": d.finish_reason}]))
        return out

    def end(self, g, usage: dict) -> list[str]:
        out = []
        if self.include_usage:
            last = self._chunk([])
            last["usage"] = usage
            if g.citations is not None:
                last["citations"] = g.citations
            out.append(sse(last))
        return out + [SSE_DONE]

    def fail(self, g, error: dict, usage: dict) -> list[str]:
        """The usage chunk (when asked for: what was delivered) before the error event."""
        return self.end(g, usage)[:-1] + [sse(error), SSE_DONE]
