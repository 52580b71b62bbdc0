"""Latency and cost prediction for one request on one candidate.

    ttft = queue wait + TTFT overhead + prompt_tokens / prefill speed
    e2e  = ttft + (max_tokens - 1) * time per output token
    cost = prompt_tokens and max_tokens at the candidate's prices (an upper bound: the answer may be shorter)

Each speed comes from the deployment's measurements, else the candidate's `expect` priors, else defaults.
"""

from __future__ import annotations

from dataclasses import dataclass

from serving.router.config import CandidateConfig
from serving.router.signals import DeploymentSignals

DEFAULT_TTFT_BASE_S = 0.05  # used only when neither measurements nor an `expect` prior exist
DEFAULT_PREFILL_TOK_S = 2000.0
DEFAULT_TPOT_S = 0.05
DEFAULT_MAX_TOKENS = 256  # a request without max_tokens is predicted at its deployment's mean length or this


@dataclass(frozen=True)
class Prediction:
    model: str
    deployment: str
    prompt_tokens: int
    completion_tokens: int  # max_tokens, or the expected length when the request gave none
    queue_s: float
    ttft_s: float
    e2e_s: float
    cost_usd: float
    quality: float
    fits_context: bool
    available: bool
    down_reason: str | None
    source: str  # measured | prior | default: where the speeds came from (the weakest one used)

    def summary(self) -> dict:
        return {
            "model": self.model,
            "ttft_ms": round(self.ttft_s * 1000, 1),
            "e2e_ms": round(self.e2e_s * 1000, 1),
            "queue_ms": round(self.queue_s * 1000, 1),
            "cost_usd": self.cost_usd,
            "quality": self.quality,
            "source": self.source,
        }


_RANK = {"measured": 0, "prior": 1, "default": 2}


def _pick(measured, prior, default, scale=1.0):
    if measured is not None:
        return measured, "measured"
    if prior is not None:
        return prior * scale, "prior"
    return default, "default"


def queue_wait(sig: DeploymentSignals, service_s: float) -> float:
    """Expected wait before this request starts: requests ahead of it over the deployment's slots, each slot
    freeing every `service_s` on average. Local in-flight counts cover load the last poll has not seen."""
    load = max(sig.num_running + sig.num_waiting, sig.inflight)
    if sig.max_num_seqs:
        slots = sig.max_num_seqs
        ahead = max(sig.num_waiting, load - slots)
        queued = load >= slots
    else:
        slots = max(1, sig.num_running)
        ahead = sig.num_waiting
        queued = ahead > 0
    if not queued:
        return 0.0
    return (ahead + 1) / slots * service_s


def predict(
    cand: CandidateConfig, sig: DeploymentSignals, prompt_tokens: int, max_tokens: int | None
) -> Prediction:
    exp = cand.expect
    if sig.prefill_tok_s is not None:
        base, base_src = (sig.ttft_base_s or 0.0), "measured"
        prefill_tok_s, prefill_src = sig.prefill_tok_s, "measured"
        prefill_s = base + prompt_tokens / prefill_tok_s
    elif sig.ttft_s is not None and exp.prefill_tok_s is None:  # only a flat TTFT average is known
        prefill_s, base_src, prefill_src = sig.ttft_s, "measured", "measured"
    else:
        base, base_src = _pick(None, exp.ttft_ms, DEFAULT_TTFT_BASE_S, 1e-3)
        prefill_tok_s, prefill_src = _pick(None, exp.prefill_tok_s, DEFAULT_PREFILL_TOK_S)
        prefill_s = base + prompt_tokens / prefill_tok_s
    tpot_s, tpot_src = _pick(sig.tpot_s, exp.tpot_ms, DEFAULT_TPOT_S, 1e-3)

    if max_tokens is None:
        n_out = round(sig.completion_tokens) if sig.completion_tokens else DEFAULT_MAX_TOKENS
        fits = prompt_tokens < cand.context_length
    else:
        n_out = max_tokens
        fits = prompt_tokens + max_tokens <= cand.context_length
    decode_s = max(0, n_out - 1) * tpot_s
    service_s = sig.service_s if sig.service_s is not None else prefill_s + decode_s
    q = queue_wait(sig, service_s)
    ttft = q + prefill_s
    source = max((base_src, prefill_src, tpot_src), key=_RANK.__getitem__)
    return Prediction(
        model=cand.model,
        deployment=cand.deployment_name,
        prompt_tokens=prompt_tokens,
        completion_tokens=n_out,
        queue_s=q,
        ttft_s=ttft,
        e2e_s=ttft + decode_s,
        cost_usd=cand.price.cost(prompt_tokens, n_out),
        quality=cand.quality,
        fits_context=fits,
        available=sig.available,
        down_reason=sig.down_reason,
        source=source,
    )


def estimate_prompt_tokens(messages: list[dict] | str) -> int:
    """A tokenizer-free estimate (about 4 characters per token, plus a few per chat message for the
    template) for gateways that route before any deployment has tokenised the prompt. An underestimate only
    costs a context-overflow fallback; the deployment's own count is what gets billed."""
    if isinstance(messages, str):
        return -(-len(messages) // 4)
    chars = 0
    for m in messages:
        content = m.get("content") if isinstance(m, dict) else None
        if isinstance(content, list):  # content parts: count the text ones
            content = " ".join(str(p.get("text", "")) for p in content if isinstance(p, dict))
        chars += len(str(content or ""))
        for call in (m.get("tool_calls") or []) if isinstance(m, dict) else []:  # calls in the history
            chars += len(str(call.get("function", {}).get("arguments", ""))) + 16 if isinstance(call, dict) else 0
    return -(-chars // 4) + 4 * len(messages)


def estimate_tool_tokens(tools: list[dict] | None) -> int:
    """Tokens the tool definitions add to a prompt (the template or loraplex's fallback renders them)."""
    import json

    return -(-len(json.dumps(tools)) // 4) + 32 if tools else 0
