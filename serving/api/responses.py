"""OpenAI response bodies and stream chunks, built from the replicas' delta items."""

from __future__ import annotations

import time
import uuid


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def _bytes(token: str) -> list[int]:
    return list(token.encode("utf-8", errors="replace"))


def chat_logprobs(lps: list[dict] | None) -> dict | None:
    """OpenAI's chat logprobs; `bytes` are the token's raw bytes where the replica sent them (the text of a
    token that is part of a UTF-8 character is U+FFFD), else the text's UTF-8."""
    if lps is None:
        return None
    out = []
    for lp in lps:
        top_bytes = lp.get("top_bytes") or [_bytes(t) for _, t, _ in lp["top"]]
        out.append({"token": lp["token"], "logprob": lp["logprob"],
                    "bytes": lp["bytes"] if lp.get("bytes") is not None else _bytes(lp["token"]),
                    "top_logprobs": [{"token": t, "logprob": l, "bytes": b}
                                     for (_, t, l), b in zip(lp["top"], top_bytes)]})
    return {"content": out, "refusal": None}


class CompletionLogprobs:
    """OpenAI's legacy completions logprobs: tokens, token_logprobs, top_logprobs, text_offset."""

    def __init__(self, offset: int = 0):
        self.offset = offset

    def convert(self, lps: list[dict] | None) -> dict | None:
        if lps is None:
            return None
        out = {"tokens": [], "token_logprobs": [], "top_logprobs": [], "text_offset": []}
        for lp in lps:
            out["tokens"].append(lp["token"])
            out["token_logprobs"].append(lp["logprob"])
            top = {t: l for _, t, l in lp["top"]}
            top.setdefault(lp["token"], lp["logprob"])
            out["top_logprobs"].append(top)
            out["text_offset"].append(self.offset)
            self.offset += len(lp["token"])
        return out


def merge_completion_logprobs(acc: dict | None, new: dict | None) -> dict | None:
    if new is None:
        return acc
    if acc is None:
        return {k: list(v) for k, v in new.items()}
    for k, v in new.items():
        acc[k].extend(v)
    return acc


def usage(prompt_tokens: int, completion_tokens: int, cached: int = 0) -> dict:
    u = {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
         "total_tokens": prompt_tokens + completion_tokens}
    if cached:
        u["prompt_tokens_details"] = {"cached_tokens": cached}
    return u


def finish(reason: str | None) -> str | None:
    """The engine's finish reasons, as OpenAI names them (an engine-side abort reads as `stop`)."""
    if reason == "abort":
        return "stop"
    return reason


class ChatChunks:
    """Builds chat.completion.chunk objects for one streamed request."""

    def __init__(self, model: str, include_usage: bool, fingerprint: str):
        self.id = new_id("chatcmpl")
        self.created = int(time.time())
        self.model = model
        self.include_usage = include_usage
        self.fingerprint = fingerprint
        self.started: set[int] = set()

    def _chunk(self, choices: list[dict]) -> dict:
        c = {"id": self.id, "object": "chat.completion.chunk", "created": self.created, "model": self.model,
             "system_fingerprint": self.fingerprint, "choices": choices}
        if self.include_usage:
            c["usage"] = None
        return c

    def role_chunk(self, n: int) -> dict:
        self.started.update(range(n))
        return self._chunk([{"index": i, "delta": {"role": "assistant", "content": ""}, "logprobs": None,
                             "finish_reason": None} for i in range(n)])

    def delta_chunk(self, item: dict) -> dict | None:
        choices = []
        for c in item["choices"]:
            if not c["text"] and c["finish_reason"] is None and not c["logprobs"]:
                continue
            delta = {"content": c["text"]} if c["text"] or c["finish_reason"] is None else {}
            choices.append({"index": c["index"], "delta": delta, "logprobs": chat_logprobs(c["logprobs"]),
                            "finish_reason": finish(c["finish_reason"])})
        return self._chunk(choices) if choices else None

    def tool_chunks(self, item: dict, calls: dict, guard=None) -> list[dict]:
        """Chunks for one item when tools are on: each choice's text goes through its call parser
        (serving.api.tool_parsers), which turns it into content and `delta.tool_calls` pieces (index, id and
        name first, then argument fragments); one piece a chunk, as OpenAI streams them. `guard(index, pieces,
        done)` (the output guards) may rewrite the pieces."""
        out = []
        for c in item["choices"]:
            stream = calls[c["index"]]
            pieces = stream.feed(c["text"])
            done = c["finish_reason"] is not None
            if done:
                pieces += stream.finish()
            if guard is not None:
                pieces = guard(c["index"], pieces, done)
            lp = chat_logprobs(c["logprobs"])
            for p, delta in enumerate(pieces):
                last = done and p == len(pieces) - 1
                out.append(self._chunk([{"index": c["index"], "delta": delta, "logprobs": lp if p == 0 else None,
                                         "finish_reason": stream.finish_reason(finish(c["finish_reason"])) if last
                                         else None}]))
            if done and not pieces or (not pieces and lp):
                out.append(self._chunk([{"index": c["index"], "delta": {}, "logprobs": lp,
                                         "finish_reason": stream.finish_reason(finish(c["finish_reason"]))
                                         if done else None}]))
        return out

    def usage_chunk(self, u: dict) -> dict:
        c = self._chunk([])
        c["usage"] = u
        return c

    def empty_chunk(self) -> dict:
        return self._chunk([])


class CompletionChunks:
    def __init__(self, model: str, include_usage: bool, fingerprint: str):
        self.id = new_id("cmpl")
        self.created = int(time.time())
        self.model = model
        self.include_usage = include_usage
        self.fingerprint = fingerprint

    def _chunk(self, choices: list[dict]) -> dict:
        c = {"id": self.id, "object": "text_completion", "created": self.created, "model": self.model,
             "system_fingerprint": self.fingerprint, "choices": choices}
        if self.include_usage:
            c["usage"] = None
        return c

    def delta_chunk(self, item: dict, base_index: int, lp: dict[int, CompletionLogprobs]) -> dict | None:
        choices = []
        for c in item["choices"]:
            if not c["text"] and c["finish_reason"] is None and not c["logprobs"]:
                continue
            idx = base_index + c["index"]
            conv = lp.setdefault(idx, CompletionLogprobs())
            choices.append({"index": idx, "text": c["text"], "logprobs": conv.convert(c["logprobs"]),
                            "finish_reason": finish(c["finish_reason"])})
        return self._chunk(choices) if choices else None

    def usage_chunk(self, u: dict) -> dict:
        c = self._chunk([])
        c["usage"] = u
        return c
