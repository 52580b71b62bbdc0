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


class JsonStrings:
    """Passes JSON text through a StreamGuard inside string literals only, so personal data in string values
    is redacted and the JSON stays valid (placeholders such as [EMAIL] hold no quote or backslash); structure
    and numbers pass as they are. A string's end flushes the guard: no value spans two strings."""

    def __init__(self, guard):
        self.guard, self.in_str, self.esc = guard, False, False

    def feed(self, text: str, final: bool = False) -> str:
        out, buf = [], []
        for ch in text:
            if not self.in_str:
                out.append(ch)
                self.in_str = ch == '"'
            elif self.esc:
                self.esc = False
                buf.append(ch)
            elif ch == "\\":
                self.esc = True
                buf.append(ch)
            elif ch == '"':
                out.append(self.guard.feed("".join(buf)) + self.guard.flush())
                out.append(ch)
                buf, self.in_str = [], False
            else:
                buf.append(ch)
        if buf:
            out.append(self.guard.feed("".join(buf)))
        if final:
            out.append(self.guard.flush())
        return "".join(out)


class OutputGuards:
    """One serving.governance StreamGuard per output (a choice's text, or one tool call's arguments); a no-op
    when outputs are allowed. JSON outputs (response_format json, tool arguments) are guarded inside their
    string values only (JsonStrings), so redaction keeps them valid."""

    def __init__(self, ticket, json_output: bool = False):
        self.ticket = ticket
        self.active = ticket is not None and ticket.output_action != "allow"
        self.json_output = json_output
        self.guards: dict = {}  # key -> StreamGuard (what close() reports)
        self.readers: dict = {}  # key -> the guard, or its JsonStrings wrapper

    def feed(self, index, text: str, final: bool, json_text: bool | None = None) -> str:
        """Text safe to send now; `final` flushes what the guard held back. Raises PIIBlocked under `block`.
        `index` keys the guard (a choice index, or (choice, call) for tool arguments)."""
        if not self.active:
            return text
        reader = self.readers.get(index)
        if reader is None:
            guard = self.guards[index] = self.ticket.output_guard()
            wrap = self.json_output if json_text is None else json_text
            reader = self.readers[index] = JsonStrings(guard) if wrap else guard
        try:
            if isinstance(reader, JsonStrings):
                return reader.feed(text, final)
            out = reader.feed(text) if text else ""
            return out + reader.flush() if final else out
        except Exception:
            self.ticket._note_output(self.guards[index], "block")
            raise

    def pieces(self, index: int, pieces: list[dict], done: bool) -> list[dict]:
        """A choice's parsed stream deltas (content / tool_calls, serving.api.tool_parsers) through the guards:
        content as text, each call's arguments inside JSON strings; `done` flushes what they held back."""
        out = []
        for d in pieces:
            if "content" in d:
                text = self.feed((index, "content"), d["content"], False, json_text=False)
                if text:
                    out.append({"content": text})
                continue
            calls = []
            for c in d["tool_calls"]:
                fn = c.get("function", {})
                if fn.get("arguments"):
                    fn = {**fn, "arguments": self.feed((index, c["index"]), fn["arguments"], False, json_text=True)}
                calls.append({**c, "function": fn})
            out.append({"tool_calls": calls})
        if done:
            for key in [k for k in self.readers if isinstance(k, tuple) and k[0] == index]:
                tail = self.feed(key, "", True)
                if tail:
                    out.append({"content": tail} if key[1] == "content" else
                               {"tool_calls": [{"index": key[1], "function": {"arguments": tail}}]})
        return out

    def whole(self, text: str | None, json_text: bool | None = None) -> str | None:
        """A complete (non-streamed) output, redacted or refused."""
        if not self.active or text is None:
            return text
        if not (self.json_output if json_text is None else json_text):
            return self.ticket.check_output(text)
        key = ("whole", len(self.guards))
        out = self.feed(key, text, True, json_text=True)
        self.ticket._note_output(self.guards.pop(key), self.ticket.output_action)
        self.readers.pop(key)
        return out

    def close(self) -> None:
        """Record what the guards found in the audit entry (once, at the end of a stream)."""
        if self.active:
            for guard in self.guards.values():
                self.ticket._note_output(guard, self.ticket.output_action)  # only notes what it found
