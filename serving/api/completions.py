"""POST /v1/completions: OpenAI's legacy completions wire format over the shared pipeline."""

from __future__ import annotations

import time

from serving.api import outputs
from serving.api.outputs import ChoiceDelta, ChoiceResult, StreamFormat
from serving.api.protocol import CompletionRequest
from serving.api.streaming import SSE_DONE, sse
from serving.api.wire import CompletionLogprobs, new_id


def gen_request(body: CompletionRequest):
    from serving.api.pipeline import GenRequest

    body.check()
    return GenRequest(endpoint="completions", route="/v1/completions", model=body.model, kind="completion",
                      prompts=body.prompts(), sampling=body.to_sampling(), n=body.n, max_tokens=body.max_tokens,
                      logprobs=body.logprobs is not None, structured=body.structured, json_output=body.json_output,
                      echo=body.echo, user=body.user, id_prefix="cmpl", stream=body.stream, body=body)


async def handle(pipeline, body: CompletionRequest, http=None):
    g = await pipeline.start(gen_request(body), http)
    if body.stream:
        return outputs.stream(pipeline, g, CompletionStream(g, body.include_usage))
    return completion_body(g, await outputs.collect(pipeline, g), body.logprobs is not None)


def completion_body(g, results: list[ChoiceResult], logprobs: bool) -> dict:
    empty = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
    choices = [{"index": r.index, "text": r.text,
                "logprobs": (CompletionLogprobs().convert(r.logprobs) or empty) if logprobs else None,
                "finish_reason": r.finish_reason} for r in results]
    return {"id": new_id("cmpl"), "object": "text_completion", "created": int(time.time()), "model": g.model_name,
            "system_fingerprint": g.fingerprint, "choices": choices, "usage": outputs.usage_of(g)}


class CompletionStream(StreamFormat):
    def __init__(self, g, include_usage: bool):
        self.id = new_id("cmpl")
        self.created = int(time.time())
        self.model, self.fingerprint = g.model_name, g.fingerprint
        self.include_usage = include_usage
        self.converters: dict[int, CompletionLogprobs] = {}

    def _chunk(self, choices: list[dict]) -> dict:
        c = {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
             "system_fingerprint": self.fingerprint, "choices": choices}
        if self.include_usage:
            c["usage"] = None
        return c

    def deltas(self, g, item: dict, deltas: list[ChoiceDelta]) -> list[str]:
        choices = []
        for d in deltas:
            if not d.text and d.finish_reason is None and not d.logprobs:
                continue
            conv = self.converters.setdefault(d.index, CompletionLogprobs())
            choices.append({"index": d.index, "text": d.text, "logprobs": conv.convert(d.logprobs),
                            "finish_reason": d.finish_reason})
        return [sse(self._chunk(choices))] if choices else []

    def end(self, g, usage: dict) -> list[str]:
        if not self.include_usage:
            return [SSE_DONE]
        last = self._chunk([])
        last["usage"] = usage
        return [sse(last), SSE_DONE]

    def fail(self, g, error: dict, usage: dict) -> list[str]:
        """The usage chunk (when asked for: what was delivered) before the error event."""
        return self.end(g, usage)[:-1] + [sse(error), SSE_DONE]
