"""What the engine streams back: per-request deltas, one CompletionOutput per choice (n) that advanced."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenLogprob:
    token_id: int
    token: str  # the token's text (may be a partial UTF-8 character, as OpenAI's `token`)
    logprob: float
    top: list[tuple[int, str, float]] = field(default_factory=list)  # (token_id, token, logprob), best first


@dataclass
class CompletionOutput:
    index: int  # choice index, 0..n-1
    text: str  # new text since the previous output of this choice (never a split UTF-8 character)
    token_ids: list[int]  # new token ids since the previous output
    logprobs: list[TokenLogprob] | None = None  # one per new token when requested
    finish_reason: str | None = None  # None while running; "stop", "length" or "abort"
    stop_reason: str | int | None = None  # the stop string or token id that ended it, if any
    num_generated: int = 0  # tokens generated so far for this choice


@dataclass
class RequestOutput:
    request_id: str
    prompt_token_ids: list[int]
    outputs: list[CompletionOutput]
    finished: bool  # every choice finished
    num_cached_tokens: int = 0  # prompt tokens served from the prefix cache
    metrics: dict = field(default_factory=dict)  # arrival, first_token, finished timestamps (time.monotonic)

    def merged(self, newer: "RequestOutput") -> "RequestOutput":
        """This delta followed by `newer` (the next one of the same request) as one delta."""
        outs = {c.index: c for c in self.outputs}
        for c in newer.outputs:
            old = outs.get(c.index)
            if old is None:
                outs[c.index] = c
                continue
            lps = None if old.logprobs is None and c.logprobs is None else (old.logprobs or []) + (c.logprobs or [])
            outs[c.index] = CompletionOutput(c.index, old.text + c.text, old.token_ids + c.token_ids, lps,
                                             c.finish_reason, c.stop_reason, c.num_generated)
        return RequestOutput(newer.request_id, newer.prompt_token_ids, [outs[i] for i in sorted(outs)],
                             newer.finished, newer.num_cached_tokens, {**self.metrics, **newer.metrics})
