"""Small shared pieces of OpenAI's wire format: ids, usage, finish reasons, log-probabilities.

Bodies and stream chunks are plain dicts (cheaper than pydantic on every chunk); each endpoint module builds its
own (serving.api.chat, .completions, .responses).
"""

from __future__ import annotations

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
