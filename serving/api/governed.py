"""The gateway's glue to serving.governance: admission of one model request and its output guards.

Prompts are counted here before any replica tokenises them (about 4 characters a token): the count only
sizes the budget reservation and the TPM window; `settle` charges the replica's exact counts.
"""

from __future__ import annotations

from serving.api.errors import APIError


def build_governance(config, registry):
    """Governance for a serve config, or None when `governance.enabled` is false. Every served model must
    have a price (the config's, or the default model's built-in one): it fails at start-up otherwise."""
    if not config.governance.enabled:
        return None
    from serving.governance import Governance

    prices = {m.name: config.price_of(m.name) for m in config.models}
    gov = Governance(config.governance, registry=registry, prices={k: v for k, v in prices.items() if v})
    gov.check_prices(list(prices))
    return gov


def principal_of(request):
    """The caller the governance middleware authenticated (None without governance or outside /v1)."""
    ctx = getattr(getattr(request, "state", None), "governance", None) if request is not None else None
    return ctx.principal if ctx is not None else None


def allows(principal, base: str, adapter: str | None) -> bool:
    if principal is None:
        return True
    return principal.allows("models", base) and (adapter is None or principal.allows("adapters", adapter))


def estimate_tokens(prompt) -> int:
    """Messages, a string, token ids or a list of those -> an approximate token count."""
    from serving.router.predict import estimate_prompt_tokens

    if isinstance(prompt, str):
        return estimate_prompt_tokens(prompt)
    if isinstance(prompt, list) and prompt and all(isinstance(x, int) for x in prompt):
        return len(prompt)
    if isinstance(prompt, list) and prompt and all(isinstance(x, dict) for x in prompt):
        return estimate_prompt_tokens(prompt)
    return sum(estimate_tokens(p) for p in prompt) if isinstance(prompt, list) else 0


def reprice(ticket, gov, base: str, adapter: str | None) -> None:
    """The router fell back to another candidate after admission: charge that model's price instead."""
    if ticket is None or (ticket.model, ticket.adapter) == (base, adapter):
        return
    gov.authorize(ticket.principal, model=base, adapter=adapter)
    price = gov.price_for(base, adapter)
    if price is not None:
        ticket.model, ticket.adapter, ticket.price = base, adapter, price


def check_logprobs(ticket, wanted: bool) -> None:
    if wanted and ticket is not None and ticket.output_action != "allow":
        raise APIError(400, "logprobs are not available to this key: its outputs pass a personal-data filter "
                            f"({ticket.output_action}) that token log-probabilities would bypass.",
                       param="logprobs", code="unsupported_parameter")


class OutputGuards:
    """One serving.governance StreamGuard per output (choice index); a no-op when outputs are allowed."""

    def __init__(self, ticket):
        self.ticket = ticket
        self.active = ticket is not None and ticket.output_action != "allow"
        self.guards: dict[int, object] = {}

    def feed(self, index: int, text: str, final: bool) -> str:
        """Text safe to send now; `final` flushes what the guard held back. Raises PIIBlocked under `block`."""
        if not self.active:
            return text
        guard = self.guards.get(index)
        if guard is None:
            guard = self.guards[index] = self.ticket.output_guard()
        try:
            out = guard.feed(text) if text else ""
            return out + guard.flush() if final else out
        except Exception:
            self.ticket._note_output(guard, "block")
            raise

    def whole(self, text: str) -> str:
        """A complete (non-streamed) output, redacted or refused."""
        return self.ticket.check_output(text) if self.active else text

    def close(self) -> None:
        """Record what the guards found in the audit entry (once, at the end of a stream)."""
        if self.active:
            for guard in self.guards.values():
                self.ticket._note_output(guard, self.ticket.output_action)  # only notes what it found
