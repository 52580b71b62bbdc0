"""Tool calls in model output, one parser per call format, and what the grammar layer needs to force them.

Formats (serve config `tool_call_parser: auto|hermes|llama3_json|mistral`; `auto` reads the chat template):
  hermes       `<tool_call>\\n{"name": ..., "arguments": {...}}\\n</tool_call>`, anywhere, any number
               (Hermes, Qwen2.5/3, and loraplex's fallback prompt for templates without tools)
  llama3_json  the reply opens with `{"name": ..., "parameters": {...}}`, optionally after `<|python_tag|>`,
               several separated by `;` (Llama 3.1+); text first means no calls (that is how Llama is trained)
  mistral      `[TOOL_CALLS] [{"name": ..., "arguments": {...}}, ...]`, or the newer
               `[TOOL_CALLS]name[ARGS]{...}` (repeated per call)

One state machine per format reads text deltas (ToolCallStream.feed) and writes OpenAI chat-completion `delta`
dicts; parsing a whole text runs the same machine over it, so a stream and a full response never disagree.

Choices a reader may wonder about:
  * `arguments` is the model's own text of the arguments object, verbatim: a stream can send it as it is
    generated, and its fragments concatenate to exactly the final string. A non-object value is re-serialised
    (a string value is taken as already-encoded JSON text, which some models write).
  * A call is committed (its id/name delta sent) once its name is complete and its arguments key has begun (or,
    in tagged formats, its object has closed). Until then the text is held, and text that turns out not to be a
    call (`<tool_call>oops`, a JSON answer without `name`) goes out as content, unchanged.
  * Content is the text outside calls with surrounding whitespace trimmed; a stream holds back trailing
    whitespace until more text follows, and any text that might be the start of a tag, so neither leaks.
  * Once committed a call is never withdrawn: output cut off mid-call (finish_reason `length`) keeps the
    arguments it has, like OpenAI's.
  * Names are not checked against the request's tools: under the grammar they cannot differ, and without it a
    caller who wants to can compare.
  * Formats whose tags are special tokens (`<|python_tag|>`, Mistral's `[TOOL_CALLS]`) need the engine to decode
    with skip_special_tokens=False, else the tags never reach the parser: see ToolFormat.needs_special_tokens.

Where this plugs in:
  * replica start (ModelBackend.__init__): `fmt = pick_parser(engine.tokenizer, spec.tool_call_parser)`, with a
    new ModelSpec key `tool_call_parser: auto|hermes|llama3_json|mistral` (default auto); its ValueError is a
    config error to report at startup.
  * ModelBackend._prepare, for a request with tools (the gateway sends `tool_request`, a picklable ToolRequest):
    `fmt.grammar(tool_request)` goes to the grammar layer with the sampling parameters (None: unconstrained);
    `fmt.needs_special_tokens(tok)` sets skip_special_tokens=False; the accepted item carries `fmt` (a plain,
    picklable object) back to the gateway.
  * gateway streaming, after the output guards: one `fmt.stream()` per choice; each engine text delta becomes
    the deltas of `stream.feed(text)` (instead of `{"content": text}`), the choice's last chunk adds
    `stream.finish()` and its finish_reason is `stream.finish_reason(reason)`. A full response uses
    `content, calls = fmt.parse(text)`: message `{"role": "assistant", "content": content, "tool_calls": calls}`
    (`tool_calls` left out when empty), finish_reason `tool_calls` when calls were made and it stopped normally.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Callable, Literal

from serving.api.tool_prompt import FALLBACK_FORMAT, template_source, template_takes_tools
from serving.api.tools import ToolRequest, new_call_id

PARSER_NAMES = ("auto", "hermes", "llama3_json", "mistral")
ARGS_KEYS = ("arguments", "parameters")
_WS = " \t\r\n"


# ---------------------------------------------------------------- JSON scanning, one character at a time
class _Value:
    """Scans one JSON value: tracks strings, escapes and bracket depth, not full validity (json.loads decides)."""

    def __init__(self):
        self.raw = ""
        self.kind = None  # "nested" | "string" | "scalar"
        self.depth = 0
        self.in_str = False
        self.esc = False

    def feed(self, ch: str) -> str:
        """'more' | 'done' (ch was the value's last char) | 'done_before' (value ended before ch) | 'error'."""
        if self.kind is None:
            if ch in _WS:
                return "more"
            if ch in "{[":
                self.kind, self.depth = "nested", 1
            elif ch == '"':
                self.kind, self.in_str = "string", True
            elif ch in "-0123456789tfn":
                self.kind = "scalar"
            else:
                return "error"
            self.raw = ch
            return "more"
        if self.kind == "scalar":
            if ch in _WS or ch in ",}]":
                return "done_before"
            if not (ch.isalnum() or ch in "+-."):
                return "error"
            self.raw += ch
            return "more"
        self.raw += ch
        if self.in_str:
            if self.esc:
                self.esc = False
            elif ch == "\\":
                self.esc = True
            elif ch == '"':
                self.in_str = False
                if self.kind == "string":
                    return "done"
            return "more"
        if ch == '"':
            self.in_str = True
        elif ch in "{[":
            self.depth += 1
        elif ch in "}]":
            self.depth -= 1
            if self.depth == 0:
                return "done"
        return "more"

    def at_eof(self) -> bool:
        """Whether the value is complete if the text ends here (only a bare number/literal can be)."""
        return self.kind == "scalar"


def arguments_text(raw: str) -> str | None:
    """The arguments string for a complete value's text: an object verbatim, null as {}, a string's content,
    anything else re-serialised. None if it is not JSON."""
    try:
        value = json.loads(raw)
    except ValueError:
        return None
    if isinstance(value, dict):
        return raw
    if value is None:
        return "{}"
    if isinstance(value, str):
        return value
    return json.dumps(value, ensure_ascii=False)


class _CallObject:
    """Scans a call's JSON object `{"name": ..., "arguments" | "parameters": ..., ...}` and reports, through the
    stream, the name, the arguments text as it grows, and the end."""

    def __init__(self):
        self.state = "open"
        self.key_raw = ""
        self.key_esc = False
        self.key = None
        self.value: _Value | None = None
        self.name: str | None = None
        self.args_started = False
        self.args_streaming = False  # the arguments value is an object: its chars go out as they come
        self.args_text: str | None = None  # set when the arguments value is complete
        self.raw = ""

    def feed(self, ch: str, on_args: Callable[[str], None]) -> str:
        """'more' | 'done' | 'error'; consumes ch unless 'error'. on_args gets streamed argument characters."""
        st = self.state
        if st == "value":
            r = self.value.feed(ch)
            if r == "error":
                return "error"
            if r == "done_before":
                self._value_done()
                self.state = "after"
                return self.feed(ch, on_args)
            self.raw += ch
            if self.key in ARGS_KEYS and self.args_text is None:
                if not self.args_started and self.value.kind is not None:
                    self.args_started = True
                    self.args_streaming = self.value.kind == "nested" and self.value.raw == "{"
                if self.args_streaming:
                    on_args(ch)
            if r == "done":
                self._value_done()
                self.state = "after"
            return "more"
        if ch in _WS and st != "key":
            self.raw += ch
            return "more"
        self.raw += ch
        if st == "open":
            if ch != "{":
                return "error"
            self.state = "first"
        elif st in ("first", "next"):
            if ch == '"':
                self.state, self.key_raw = "key", '"'
            elif ch == "}" and st == "first":
                self.state = "done"
                return "done"
            else:
                return "error"
        elif st == "key":
            self.key_raw += ch
            if self.key_esc:
                self.key_esc = False
            elif ch == "\\":
                self.key_esc = True
            elif ch == '"':
                try:
                    self.key = json.loads(self.key_raw)
                except ValueError:
                    return "error"
                self.state = "colon"
        elif st == "colon":
            if ch != ":":
                return "error"
            self.state, self.value = "value", _Value()
        elif st == "after":
            if ch == ",":
                self.state = "next"
            elif ch == "}":
                self.state = "done"
                return "done"
            else:
                return "error"
        return "more"

    def _value_done(self) -> None:
        if self.key == "name" and self.name is None:
            try:
                name = json.loads(self.value.raw)
            except ValueError:
                name = None
            self.name = name if isinstance(name, str) and name else None
        elif self.key in ARGS_KEYS and self.args_text is None:
            self.args_started = True
            self.args_text = arguments_text(self.value.raw) if not self.args_streaming else self.value.raw

    def at_eof(self) -> None:
        if self.state == "value" and self.value.at_eof():
            self._value_done()
            self.state = "after"


# ---------------------------------------------------------------- the stream
class ToolCallStream:
    """Feeds on text deltas, returns OpenAI `delta` dicts. Subclasses are the formats' state machines.

    `feed(text)` and `finish()` return lists of deltas: `{"content": str}` or
    `{"tool_calls": [{"index", "id", "type": "function", "function": {"name", "arguments": ""}}]}` to open a call,
    then `{"tool_calls": [{"index", "function": {"arguments": fragment}}]}`. After finish(), `content` and
    `tool_calls` hold the whole answer, and finish_reason() maps the engine's reason.
    """

    require_args = False  # a call must show its arguments key before it counts (untagged formats)

    def __init__(self, new_id: Callable[[], str] = new_call_id):
        self.new_id = new_id
        self.tool_calls: list[dict] = []
        self._content: list[str] = []
        self._buf = ""  # text received and not yet consumed
        self._region = ""  # consumed text of a call not yet committed: content if it turns out not to be one
        self._ws = ""  # whitespace held back from content
        self._out: list[dict] = []
        self._call: _CallObject | None = None
        self._committed = False
        self.state = "text"
        self.finished = False

    # -- public
    def feed(self, text: str) -> list[dict]:
        self._buf += text
        self._run(final=False)
        return self._take()

    def finish(self) -> list[dict]:
        """The end of the output: flush held text; a call cut off keeps what it has."""
        if not self.finished:
            self._run(final=True)
            self._at_end()
            self.finished = True
        return self._take()

    @property
    def content(self) -> str | None:
        return "".join(self._content) or None

    @property
    def called(self) -> bool:
        return bool(self.tool_calls)

    def finish_reason(self, engine_reason: str | None) -> str | None:
        """`tool_calls` when the answer made calls and ended normally; `length` and others stay as they are."""
        if self.called and engine_reason in (None, "stop", "abort"):
            return "tool_calls"
        return engine_reason

    # -- content and deltas
    def _take(self) -> list[dict]:
        out, self._out = self._out, []
        return out

    def _text(self, s: str) -> None:
        if not s:
            return
        pending = self._ws + s
        if not self._content:
            pending = pending.lstrip()
        body = pending.rstrip()
        self._ws = pending[len(body):]
        if body:
            self._content.append(body)
            if self._out and "content" in self._out[-1]:
                self._out[-1]["content"] += body
            else:
                self._out.append({"content": body})

    def _open_call(self, name: str) -> None:
        call = {"id": self.new_id(), "type": "function", "function": {"name": name, "arguments": ""}}
        self.tool_calls.append(call)
        self._out.append({"tool_calls": [{"index": len(self.tool_calls) - 1, "id": call["id"], "type": "function",
                                          "function": {"name": name, "arguments": ""}}]})
        self._committed = True
        self._region = ""

    def _args(self, frag: str) -> None:
        if not frag:
            return
        idx = len(self.tool_calls) - 1
        self.tool_calls[idx]["function"]["arguments"] += frag
        last = self._out[-1]["tool_calls"][0] if self._out and "tool_calls" in self._out[-1] else None
        if last is not None and last["index"] == idx and "id" not in last:
            last["function"]["arguments"] += frag
        else:
            self._out.append({"tool_calls": [{"index": idx, "function": {"arguments": frag}}]})

    def _revert(self) -> None:
        """What looked like a call is not one: its text is content."""
        self._text(self._region)
        self._region = ""
        self._call = None
        self.state = "text"

    def _broken(self) -> None:
        """The call object stopped being JSON: a committed call keeps what it has, anything else is text."""
        if self._committed:
            self._call = None
            self.state = "text"
        else:
            self._revert()

    # -- a call's JSON object, shared by the formats
    def _start_object(self) -> None:
        self._call = _CallObject()
        self._committed = False

    def _object_step(self, ch: str) -> str:
        """Feed one char of the current call object. 'more' | 'done' | 'error' (ch not consumed)."""
        c = self._call
        streamed: list[str] = []  # argument chars this char adds (an object value goes out as it comes)
        r = c.feed(ch, streamed.append)
        if r == "error":
            return "error"
        if not self._committed:
            self._region += ch
            if c.name is None or not (c.args_started or (r == "done" and not self.require_args)):
                if r == "done":  # a closed object that is no call: ch goes back, the caller reverts
                    self._region = self._region[:-1]
                    return "error"
                return r
            self._open_call(c.name)
            # arguments seen before the commit go out now: the part so far, or all of them if they came first
            streamed = [c.value.raw if c.args_text is None else c.args_text] if c.args_streaming else []
        self._args("".join(streamed))
        fn = self.tool_calls[-1]["function"]
        if c.args_text is not None and not fn["arguments"]:  # a complete non-object value goes out whole
            self._args(c.args_text)
        if r == "done":
            if not fn["arguments"]:
                self._args("{}")
            self._call = None
        return r

    def _object_eof(self) -> None:
        """The text ended inside a call object."""
        c = self._call
        c.at_eof()
        if self._committed:
            fn = self.tool_calls[-1]["function"]
            if not fn["arguments"] and c.args_text is not None:
                self._args(c.args_text)
            self._call = None
        else:
            self._revert()

    # -- helpers for the formats
    def _hold_tag(self, tag: str) -> int:
        """Index in _buf up to which text is surely not the start of `tag` (the rest may be, and waits)."""
        buf = self._buf
        for k in range(min(len(tag) - 1, len(buf)), 0, -1):
            if tag.startswith(buf[-k:]):
                return len(buf) - k
        return len(buf)

    def _text_until(self, tag: str, final: bool) -> bool:
        """In text: send text up to `tag` and consume the tag (True), or send what is safe and wait (False)."""
        i = self._buf.find(tag)
        if i >= 0:
            self._text(self._buf[:i])
            self._buf = self._buf[i + len(tag):]
            return True
        cut = len(self._buf) if final else self._hold_tag(tag)
        self._text(self._buf[:cut])
        self._buf = self._buf[cut:]
        return False

    def _run(self, final: bool) -> None:
        raise NotImplementedError

    def _at_end(self) -> None:
        """End of output in whatever state: finish or revert a call, drop held whitespace."""
        if self._call is not None:
            self._object_eof()
        if self._region:
            self._revert()
        self._ws = ""


class HermesStream(ToolCallStream):
    BEGIN, END = "<tool_call>", "</tool_call>"

    def _run(self, final: bool) -> None:
        while True:
            if self.state == "text":
                if not self._text_until(self.BEGIN, final):
                    return
                self._region = self.BEGIN
                self._start_object()
                self.state = "body"
            elif self.state == "body":
                if not self._buf:
                    return
                ch = self._buf[0]
                r = self._object_step(ch)
                if r == "error":
                    self._broken()
                    continue
                self._buf = self._buf[1:]
                if r == "done":
                    self.state = "end"
            elif self.state == "end":
                stripped = self._buf.lstrip(_WS)
                self._buf = stripped
                if not stripped:
                    return
                if stripped.startswith(self.END):
                    self._buf = stripped[len(self.END):]
                    self.state = "text"
                elif self.END.startswith(stripped) and not final:
                    return
                else:  # a complete call without its end tag: keep the call, read on as text
                    self.state = "text"


class Llama3JsonStream(ToolCallStream):
    TAG = "<|python_tag|>"
    require_args = True  # an answer that is JSON is only a call if it has name and parameters

    def _run(self, final: bool) -> None:
        while True:
            st = self.state
            if st == "text":  # the start: a call can only open the reply
                stripped = self._buf.lstrip(_WS)
                if not stripped:
                    if final:
                        self._buf = ""
                    return
                if stripped.startswith(self.TAG):
                    self._region += self._buf[: len(self._buf) - len(stripped)] + self.TAG
                    self._buf = stripped[len(self.TAG):]
                    self.state = "call_start"
                elif self.TAG.startswith(stripped) and not final:
                    return
                elif stripped[0] == "{":
                    self._buf = stripped
                    self._start_object()
                    self.state = "body"
                else:
                    self.state = "plain"
            elif st == "plain":  # free text to the end
                self._text(self._region + self._buf)
                self._region, self._buf = "", ""
                return
            elif st == "call_start":  # after `<|python_tag|>` or `;`
                stripped = self._buf.lstrip(_WS)
                if not stripped:
                    if final:  # a trailing `;` or tag with nothing after it
                        self._region, self._buf = "", ""
                    return
                self._region += self._buf[: len(self._buf) - len(stripped)]
                if stripped.startswith(self.TAG):
                    self._region += self.TAG
                    self._buf = stripped[len(self.TAG):]
                elif self.TAG.startswith(stripped) and not final:
                    self._buf = stripped
                    return
                elif stripped[0] == "{":
                    self._buf = stripped
                    self._start_object()
                    self.state = "body"
                else:
                    self._buf = stripped
                    self.state = "plain"
            elif st == "body":
                if not self._buf:
                    return
                r = self._object_step(self._buf[0])
                if r == "error":
                    self._call = None
                    self.state = "plain"  # a broken call ends the calls; the rest (and an uncommitted one) is text
                    continue
                self._buf = self._buf[1:]
                if r == "done":
                    self.state = "after"
            elif st == "after":
                stripped = self._buf.lstrip(_WS)
                if not stripped:
                    if final:
                        self._buf = ""
                    return
                if stripped[0] == ";":
                    self._region = self._buf[: len(self._buf) - len(stripped) + 1]
                    self._buf = stripped[1:]
                    self.state = "call_start"
                else:
                    self._buf = stripped
                    self.state = "plain"


class MistralStream(ToolCallStream):
    TAG, ARGS = "[TOOL_CALLS]", "[ARGS]"

    def __init__(self, new_id: Callable[[], str] = new_call_id):
        super().__init__(new_id)
        self.in_array = False
        self._name = ""
        self._value: _Value | None = None

    def _run(self, final: bool) -> None:
        while True:
            st = self.state
            if st == "text":
                if not self._text_until(self.TAG, final):
                    return
                self._region = self.TAG
                self.state = "after_tag"
            elif st in ("after_tag", "array"):
                stripped = self._buf.lstrip(_WS)
                self._region += self._buf[: len(self._buf) - len(stripped)]
                self._buf = stripped
                if not stripped:
                    return
                ch = stripped[0]
                if st == "after_tag" and ch == "[":
                    self._region += ch
                    self._buf = stripped[1:]
                    self.state = "array"
                elif ch == "{":
                    self._start_object()
                    self.in_array = st == "array"
                    self.state = "body"
                elif st == "array" and ch == "]":
                    self._buf = stripped[1:]
                    self._region = ""
                    self.state = "text"
                elif st == "after_tag" and (ch.isalnum() or ch in "_-."):
                    self.state, self._name = "name", ""
                else:
                    self._revert()
            elif st == "body":
                if not self._buf:
                    return
                r = self._object_step(self._buf[0])
                if r == "error":
                    self._broken()
                    continue
                self._buf = self._buf[1:]
                if r == "done":
                    self.state = "array_sep" if self.in_array else "text"
            elif st == "array_sep":
                stripped = self._buf.lstrip(_WS)
                if not stripped:
                    self._buf = ""
                    return
                self._buf = stripped[1:] if stripped[0] in ",]" else stripped
                self.state = "array" if stripped[0] == "," else "text"
            elif st == "name":  # [TOOL_CALLS]name[ARGS]{...}
                i = self._buf.find(self.ARGS)
                upto = i if i >= 0 else (len(self._buf) if final else self._hold_tag(self.ARGS))
                part = self._buf[:upto]
                if not all(c.isalnum() or c in "_-." for c in part):
                    bad = next(k for k, c in enumerate(part) if not (c.isalnum() or c in "_-."))
                    self._region += part[:bad]
                    self._buf = self._buf[bad:]
                    self._revert()
                    continue
                self._name += part
                self._region += part
                if i < 0:
                    self._buf = self._buf[upto:]
                    return
                self._buf = self._buf[i + len(self.ARGS):]
                self._open_call(self._name)
                self._value = _Value()
                self.state = "args"
            elif st == "args":
                if not self._buf:
                    return
                ch = self._buf[0]
                r = self._value.feed(ch)
                if r in ("error", "done_before"):  # ch is not part of the arguments: read it as text
                    self._args_done()
                    continue
                self._buf = self._buf[1:]
                if self._value.kind == "nested" and self._value.raw.startswith("{"):
                    self._args(ch)
                if r == "done":
                    self._args_done()

    def _args_done(self) -> None:
        """An object was streamed as it came; any other value goes out whole (raw if it is not JSON)."""
        v = self._value
        if not (v.kind == "nested" and v.raw.startswith("{")):
            self._args((arguments_text(v.raw) or v.raw) if v.raw else "{}")
        self._value = None
        self.state = "text"

    def _at_end(self) -> None:
        if self.state == "args" and self._value is not None:
            self._args_done()
        super()._at_end()


# ---------------------------------------------------------------- what the grammar layer receives
@dataclass(frozen=True)
class CallTag:
    """One tool's call: `begin`, then text matching `schema` (JSON), then `end`."""

    tool: str
    begin: str
    schema: dict
    end: str


@dataclass(frozen=True)
class ToolGrammar:
    """Constraints for one request's tool calls.

    mode `required`: the output is one or more calls from the start. mode `auto`: free text until one of
    `triggers` appears (only at the very start, after whitespace, when `trigger_at_start`); from the trigger on,
    the output must match a tag: each trigger is a prefix of every tag's `begin` (of its JSON body when
    `begin` is empty, as in llama3_json). Consecutive calls are joined by `separator`; after the last call's
    `end` the output may end. `max_calls` is 1 when parallel_tool_calls is false, else None (no limit).
    """

    mode: Literal["auto", "required"]
    triggers: tuple[str, ...]
    trigger_at_start: bool
    tags: tuple[CallTag, ...]
    separator: str
    max_calls: int | None


def _wrap(params: dict, args_key: str, name: str) -> dict:
    """The call object's schema with `params` under `args_key`; `$defs`/`definitions` move to the root so
    `#/$defs/...` references still resolve."""
    inner = {k: v for k, v in params.items() if k not in ("$defs", "definitions", "$schema", "$id")}
    out: dict = {"type": "object", "properties": {"name": {"const": name}, args_key: inner},
                 "required": ["name", args_key], "additionalProperties": False}
    for k in ("$defs", "definitions"):
        if k in params:
            out[k] = params[k]
    return out


class ToolFormat:
    """A call format: its stream parser, whole-text parse, and grammar description."""

    name: str
    stream_cls: type[ToolCallStream]
    tags: tuple[str, ...]  # the literal tags it uses (to see whether they are special tokens)
    triggers: tuple[str, ...] = ()
    trigger_at_start = False
    separator = ""

    def stream(self, new_id: Callable[[], str] = new_call_id) -> ToolCallStream:
        return self.stream_cls(new_id)

    def parse(self, text: str, new_id: Callable[[], str] = new_call_id) -> tuple[str | None, list[dict]]:
        """A whole output -> (content or None, calls `{"id", "type": "function", "function": {name, arguments}}`)."""
        s = self.stream(new_id)
        s.feed(text)
        s.finish()
        return s.content, s.tool_calls

    def needs_special_tokens(self, tokenizer) -> bool:
        """Whether a tag is a special token of this tokenizer, so decoding must keep special tokens."""
        added = getattr(tokenizer, "added_tokens_decoder", None) or {}
        special = {t.content for t in added.values() if getattr(t, "special", False)}
        return any(tag in special for tag in self.tags)

    def tag(self, tool: dict) -> CallTag:
        raise NotImplementedError

    def grammar(self, req: ToolRequest | None) -> ToolGrammar | None:
        """The constraints for a request; None when it makes no calls (no tools, or tool_choice none)."""
        if req is None or req.choice.mode == "none":
            return None
        return ToolGrammar(
            mode="auto" if req.choice.mode == "auto" else "required", triggers=self.triggers,
            trigger_at_start=self.trigger_at_start, tags=tuple(self.tag(t) for t in req.allowed()),
            separator=self.separator, max_calls=None if req.parallel else 1)


class Hermes(ToolFormat):
    name, stream_cls, tags = "hermes", HermesStream, ("<tool_call>", "</tool_call>")
    triggers, separator = ("<tool_call>",), "\n"

    def tag(self, tool: dict) -> CallTag:
        fn = tool["function"]
        return CallTag(fn["name"], "<tool_call>\n", _wrap(fn["parameters"], "arguments", fn["name"]), "\n</tool_call>")


class Llama3Json(ToolFormat):
    name, stream_cls, tags = "llama3_json", Llama3JsonStream, ("<|python_tag|>",)
    triggers, trigger_at_start, separator = ("{",), True, "; "

    def tag(self, tool: dict) -> CallTag:
        fn = tool["function"]
        return CallTag(fn["name"], "", _wrap(fn["parameters"], "parameters", fn["name"]), "")


class Mistral(ToolFormat):
    """`args_tag`: the newer `[TOOL_CALLS]name[ARGS]{...}` form (templates that write `[ARGS]`); the parser
    reads both forms either way, the grammar forces the model's own. Under the grammar, several calls in the
    array form come as one `[TOOL_CALLS] [...]` section each (the parser reads that too)."""

    name, stream_cls, tags = "mistral", MistralStream, ("[TOOL_CALLS]", "[ARGS]")
    triggers = ("[TOOL_CALLS]",)

    def __init__(self, args_tag: bool = False):
        self.args_tag = args_tag

    def tag(self, tool: dict) -> CallTag:
        fn = tool["function"]
        if self.args_tag:
            return CallTag(fn["name"], f"[TOOL_CALLS]{fn['name']}[ARGS]", fn["parameters"], "")
        return CallTag(fn["name"], "[TOOL_CALLS] [", _wrap(fn["parameters"], "arguments", fn["name"]), "]")


def detect_format(template: str) -> str | None:
    """The call format a tools-aware template writes, from the tags in its source; None if unknown."""
    if "[TOOL_CALLS]" in template:
        return "mistral"
    if "<tool_call>" in template:
        return "hermes"
    if "<|python_tag|>" in template or ('"parameters": ' in template and "ipython" in template):
        return "llama3_json"
    return None


def pick_parser(tokenizer_or_template, name: str = "auto") -> ToolFormat:
    """The ToolFormat for serve-config `tool_call_parser` and a model (its tokenizer, or a template string).

    `auto` reads the template: a template without tools gets loraplex's fallback prompt, hence `hermes`. Raises
    ValueError (to report at startup) for an unknown name, for a template whose format is not recognised, and
    for an explicit parser other than hermes on a template without tools (its prompt asks for hermes).
    """
    if name not in PARSER_NAMES:
        raise ValueError(f"tool_call_parser must be one of {', '.join(PARSER_NAMES)}, got {name!r}")
    template = template_source(tokenizer_or_template)
    if isinstance(tokenizer_or_template, str):
        takes = "tools" in template and detect_format(template) is not None  # no tokenizer to render with
    else:
        takes = template_takes_tools(tokenizer_or_template)
    if not takes:
        if name not in ("auto", FALLBACK_FORMAT):
            raise ValueError(f"tool_call_parser {name!r} does not fit this model: its chat template does not take "
                             f"tools, so loraplex's prompt asks for {FALLBACK_FORMAT} calls (use auto or "
                             f"{FALLBACK_FORMAT})")
        name = FALLBACK_FORMAT
    elif name == "auto":
        name = detect_format(template)
        if name is None:
            raise ValueError("the chat template takes tools, but its call format is none of hermes, llama3_json, "
                             "mistral: set tool_call_parser explicitly")
    if name == "hermes":
        return Hermes()
    if name == "llama3_json":
        return Llama3Json()
    return Mistral(args_tag="[ARGS]" in template)
