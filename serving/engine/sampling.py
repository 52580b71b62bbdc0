"""Per-request sampling parameters, validated before any work starts."""

from __future__ import annotations

from dataclasses import dataclass, field

from serving.engine.errors import InvalidRequestError

MAX_N = 16
MAX_TOP_LOGPROBS = 20
MAX_STOP_STRINGS = 16
MAX_STOP_LENGTH = 256


@dataclass
class SamplingParams:
    n: int = 1
    temperature: float = 1.0  # 0 means greedy
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    repetition_penalty: float = 1.0  # HF-style: divides positive logits of seen tokens (prompt included)
    presence_penalty: float = 0.0  # OpenAI-style, over generated tokens
    frequency_penalty: float = 0.0
    seed: int | None = None
    max_tokens: int | None = 16  # None: up to the context length
    stop: list[str] = field(default_factory=list)
    stop_token_ids: list[int] = field(default_factory=list)
    ignore_eos: bool = False
    logprobs: int | None = None  # None: none; k >= 0: the chosen token's logprob plus k top alternatives
    include_stop_str_in_output: bool = False
    skip_special_tokens: bool = True
    structured: dict | None = None  # structured output spec (serving/engine/structured.py); checked in check_request

    def __post_init__(self):
        if isinstance(self.stop, str):
            self.stop = [self.stop]
        self.stop = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])

    @property
    def greedy(self) -> bool:
        return self.temperature <= 1e-5

    def validate(self) -> "SamplingParams":
        def bad(param: str, message: str):
            raise InvalidRequestError(message, param=param)

        if not isinstance(self.n, int) or not 1 <= self.n <= MAX_N:
            bad("n", f"n must be an integer between 1 and {MAX_N}, got {self.n!r}")
        if not 0.0 <= self.temperature <= 2.0:
            bad("temperature", f"temperature must be between 0 and 2, got {self.temperature}")
        if not 0.0 < self.top_p <= 1.0:
            bad("top_p", f"top_p must be in (0, 1], got {self.top_p}")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            bad("top_k", f"top_k must be -1, 0 (disabled) or a positive integer, got {self.top_k!r}")
        if not 0.0 <= self.min_p <= 1.0:
            bad("min_p", f"min_p must be in [0, 1], got {self.min_p}")
        if not 0.0 < self.repetition_penalty <= 10.0:
            bad("repetition_penalty", f"repetition_penalty must be in (0, 10], got {self.repetition_penalty}")
        if not -2.0 <= self.presence_penalty <= 2.0:
            bad("presence_penalty", f"presence_penalty must be between -2 and 2, got {self.presence_penalty}")
        if not -2.0 <= self.frequency_penalty <= 2.0:
            bad("frequency_penalty", f"frequency_penalty must be between -2 and 2, got {self.frequency_penalty}")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens <= 0):
            bad("max_tokens", f"max_tokens must be a positive integer, got {self.max_tokens!r}")
        if len(self.stop) > MAX_STOP_STRINGS:
            bad("stop", f"at most {MAX_STOP_STRINGS} stop strings are allowed, got {len(self.stop)}")
        for s in self.stop:
            if not isinstance(s, str) or not s or len(s) > MAX_STOP_LENGTH:
                bad("stop", f"each stop string must be 1 to {MAX_STOP_LENGTH} characters")
        if len(self.stop_token_ids) > MAX_STOP_STRINGS * 4:
            bad("stop_token_ids", f"at most {MAX_STOP_STRINGS * 4} stop token ids are allowed")
        if self.logprobs is not None and (
            not isinstance(self.logprobs, int) or not 0 <= self.logprobs <= MAX_TOP_LOGPROBS
        ):
            bad("top_logprobs", f"top_logprobs must be between 0 and {MAX_TOP_LOGPROBS}, got {self.logprobs!r}")
        if self.structured is not None and not isinstance(self.structured, dict):
            bad("structured", f"structured must be an object, got {type(self.structured).__name__}")
        if self.seed is not None and (not isinstance(self.seed, int) or not -(2**63) <= self.seed < 2**63 - MAX_N):
            bad("seed", f"seed must be a 64-bit integer, got {self.seed!r}")
        return self
