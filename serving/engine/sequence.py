"""One generation stream (one choice of a request) and its scheduling state."""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass, field

import torch

from serving.engine.sampling import SamplingParams


class Status(enum.Enum):
    WAITING = "waiting"
    RUNNING = "running"
    FINISHED = "finished"


@dataclass
class Sequence:
    seq_id: int
    request_id: str
    index: int  # choice index within the request
    token_ids: list[int]
    num_prompt_tokens: int
    params: SamplingParams
    lora_name: str | None = None
    lora_slot: int = -1
    status: Status = Status.WAITING
    num_computed_tokens: int = 0  # tokens whose KV is in the cache
    num_cached_tokens: int = 0  # prompt tokens that came from the prefix cache at first admission
    block_table: list[int] = field(default_factory=list)
    block_hashes: list[int] = field(default_factory=list)  # hash chain of this sequence's full blocks
    finish_reason: str | None = None
    stop_reason: str | int | None = None
    generator: torch.Generator | None = None  # of a sampled sequence; reseeded every step (sampler.seed_for_step)
    seed: int | None = None  # this choice's seed (the request's seed + its index) when sampled
    matcher: object | None = None  # xgrammar GrammarMatcher of a structured-output request (grammar.py)
    arrival_time: float = field(default_factory=time.monotonic)
    first_scheduled_time: float | None = None
    first_token_time: float | None = None
    num_preemptions: int = 0

    @property
    def num_tokens(self) -> int:
        return len(self.token_ids)

    @property
    def output_token_ids(self) -> list[int]:
        return self.token_ids[self.num_prompt_tokens:]

    @property
    def num_output_tokens(self) -> int:
        return len(self.token_ids) - self.num_prompt_tokens

    @property
    def is_finished(self) -> bool:
        return self.status == Status.FINISHED

    @property
    def in_prefill(self) -> bool:
        return self.num_tokens - self.num_computed_tokens > 1
