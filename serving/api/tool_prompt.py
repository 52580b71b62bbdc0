"""Chat prompts with tools, rendered the same way for serving and for fine-tuning (training.data imports this).

A template that takes `tools` (Llama 3.x, Qwen2.5/3, Mistral, Hermes...) renders tools and tool history itself.
For one that does not (SmolLM2, plain ChatML) the fallback rewrites the conversation before templating:
  * the tool list goes into the system prompt (appended to the first system message, or as a new one), with an
    instruction to answer with Hermes-style blocks `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`;
  * assistant `tool_calls` become those blocks after the message's text;
  * `tool` messages become a user turn of `<tool_response>\\n...\\n</tool_response>` blocks (consecutive ones
    share one turn), since such templates know no tool role.
JSON in prompts keeps the key order it was given (what HF's `tojson` filter does in the model templates), with
json.dumps' default separators and non-ASCII kept as is: deterministic, and the same text a model template makes.

Where this plugs in: serving.api.backend.ModelBackend._prompt_ids renders chat with
`render_chat(tok, req["messages"], req.get("tools"))` instead of `tok.apply_chat_template(...)` (same except
clause: a template error stays a 400 on `messages`); the gateway puts `"tools": tool_request.prompt_tools()` into
the replica request. training.data renders with the same function.
"""

from __future__ import annotations

import hashlib
import json
from functools import lru_cache

FALLBACK_FORMAT = "hermes"  # the call format the fallback prompt asks for (serving.api.tool_parsers)

_PROBE_TOOL = {"type": "function", "function": {"name": "loraplex_probe_fn", "description": "probe",
                                                "parameters": {"type": "object", "properties": {}}}}


def template_source(tokenizer_or_template, chat_template: str | None = None) -> str:
    """The Jinja source: an explicit template, a string, or the tokenizer's (its `tool_use` one if it has
    several, as transformers picks when tools are given)."""
    if chat_template is not None:
        return chat_template
    if isinstance(tokenizer_or_template, str):
        return tokenizer_or_template
    tpl = getattr(tokenizer_or_template, "chat_template", None)
    if isinstance(tpl, dict):
        tpl = tpl.get("tool_use") or tpl.get("default") or next(iter(tpl.values()), None)
    return tpl or ""


@lru_cache(maxsize=64)
def _renders_tools(tokenizer, template: str) -> bool:
    try:
        text = tokenizer.apply_chat_template([{"role": "user", "content": "hi"}], tools=[_PROBE_TOOL],
                                             chat_template=template, tokenize=False, add_generation_prompt=True)
    except Exception:  # noqa: BLE001 - a template that cannot render this does not take tools
        return False
    return "loraplex_probe_fn" in text


def template_takes_tools(tokenizer, chat_template: str | None = None) -> bool:
    """Whether the template renders a `tools` list: it must name `tools` in its source and, rendered with a
    probe tool, show that tool's name (a template can mention `tools` and still drop them)."""
    src = template_source(tokenizer, chat_template)
    return "tools" in src and _renders_tools(tokenizer, src)


def dumps(obj) -> str:
    return json.dumps(obj, ensure_ascii=False)


def _arguments_obj(arguments: str):
    """The arguments JSON string as a value; text that is not JSON (a truncated call) stays a string."""
    try:
        return json.loads(arguments)
    except (TypeError, ValueError):
        return arguments


def hermes_call(name: str, arguments: str) -> str:
    """One call as the fallback prompt asks for it (and as Qwen2.5's template writes history)."""
    return f"<tool_call>\n{dumps({'name': name, 'arguments': _arguments_obj(arguments)})}\n</tool_call>"


def tools_system_prompt(tools: list[dict]) -> str:
    lines = "\n".join(dumps(t) for t in tools)
    return (
        "# Tools\n\n"
        "You can call the functions below when they help answer the user. Their signatures, as JSON, are "
        "inside <tools></tools>:\n"
        f"<tools>\n{lines}\n</tools>\n\n"
        "To call functions, reply with one block per call, each holding a JSON object with the function's name "
        "and its arguments:\n"
        "<tool_call>\n{\"name\": <function name>, \"arguments\": <arguments as a JSON object>}\n</tool_call>\n"
        "A tool's result comes back to you inside <tool_response></tool_response>."
    )


def fallback_messages(messages: list[dict], tools: list[dict] | None) -> list[dict]:
    """Rewrite tools and tool history into plain system/user/assistant text messages (see the module doc)."""
    out: list[dict] = []
    for m in messages:
        role = m["role"]
        if role == "tool":
            block = f"<tool_response>\n{m.get('content') or ''}\n</tool_response>"
            if out and out[-1].get("_tool_turn"):
                out[-1]["content"] += "\n" + block
            else:
                out.append({"role": "user", "content": block, "_tool_turn": True})
            continue
        msg = {k: v for k, v in m.items() if k not in ("tool_calls", "tool_call_id")}
        calls = m.get("tool_calls") or []
        if calls:
            text = (m.get("content") or "").strip()
            blocks = "\n".join(hermes_call(c["function"]["name"], c["function"]["arguments"]) for c in calls)
            msg["content"] = f"{text}\n{blocks}" if text else blocks
        elif msg.get("content") is None:
            msg["content"] = ""
        out.append(msg)
    for m in out:
        m.pop("_tool_turn", None)
    if tools:
        block = tools_system_prompt(tools)
        if out and out[0]["role"] == "system":
            first = out[0]["content"]
            out[0] = {**out[0], "content": f"{first}\n\n{block}" if first else block}
        else:
            out.insert(0, {"role": "system", "content": block})
    return out


def _short_id(call_id: str) -> str:
    return hashlib.sha256(call_id.encode()).hexdigest()[:9]


def template_messages(messages: list[dict], template: str) -> list[dict]:
    """Messages for a tools-aware template, in transformers' convention: call arguments as objects (the
    templates `tojson` them), and each tool message named after the function it answers (some templates,
    Hermes' among them, require `name`; OpenAI's tool messages carry only the call id). Mistral's templates
    demand 9-character alphanumeric call ids; there each id is replaced by a stable hash of it, the same for
    the call and its tool message."""
    short = "length == 9" in template or "length != 9" in template
    names: dict[str, str] = {}  # call id -> function name
    out = []
    for m in messages:
        msg = dict(m)
        if m.get("role") == "tool" and not m.get("name") and m.get("tool_call_id") in names:
            msg["name"] = names[m["tool_call_id"]]
        if m.get("tool_calls"):
            names.update((c["id"], c["function"]["name"]) for c in m["tool_calls"])
            msg["tool_calls"] = [
                {"id": _short_id(c["id"]) if short else c["id"], "type": "function",
                 "function": {"name": c["function"]["name"], "arguments": _arguments_obj(c["function"]["arguments"])}}
                for c in m["tool_calls"]]
        if m.get("tool_call_id") and short:
            msg["tool_call_id"] = _short_id(m["tool_call_id"])
        out.append(msg)
    return out


def uses_tools(messages: list[dict], tools: list[dict] | None) -> bool:
    return bool(tools) or any(m.get("tool_calls") or m.get("role") == "tool" for m in messages)


def render_chat(tokenizer, messages: list[dict], tools: list[dict] | None = None, *,
                add_generation_prompt: bool = True, chat_template: str | None = None) -> str:
    """The prompt text for `messages` (OpenAI shape, checked by serving.api.tools.check_messages) and `tools`
    (ToolRequest.prompt_tools()), through `chat_template` or the tokenizer's own.

    Without tools and tool history this is exactly `apply_chat_template(messages)`; template errors propagate
    (the caller turns them into a 400 or a DataError).
    """
    kw = dict(tokenize=False, add_generation_prompt=add_generation_prompt)
    if not uses_tools(messages, tools):  # as given: a tokenizer with several templates picks its default one
        return tokenizer.apply_chat_template(messages, chat_template=chat_template, **kw)
    template = template_source(tokenizer, chat_template)
    kw["chat_template"] = template or None
    if template_takes_tools(tokenizer, template):
        return tokenizer.apply_chat_template(template_messages(messages, template), tools=tools or None, **kw)
    return tokenizer.apply_chat_template(fallback_messages(messages, tools), **kw)
