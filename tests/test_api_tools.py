"""Tool calling, API side: request validation (400s naming the field), prompts through the model's template or
the Hermes fallback, the three call parsers (whole text and streams cut anywhere) and their grammar descriptions.

References: OpenAI's own response types (the `openai` package's pydantic models) for chunks and messages, and
jsonschema for the call-body schemas; expected calls are built by the tests, not by the code under test.
"""

import copy
import json
import re

import jsonschema
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from openai.types.chat import ChatCompletionChunk, ChatCompletionMessage
from transformers import AutoTokenizer

from serving.api.errors import APIError
from serving.api.tool_parsers import Hermes, Llama3Json, Mistral, pick_parser
from serving.api.tool_prompt import render_chat, template_takes_tools
from serving.api.tools import check_messages, new_call_id, parse_tool_request

ID = re.compile(r"^call_[A-Za-z0-9]{24}$")

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}, "unit": {"enum": ["C", "F"]}},
                   "required": ["city"]}}}
CLOCK = {"type": "function", "function": {"name": "get_time"}}  # no parameters: a function of no arguments
TOOLS = [WEATHER, CLOCK]

HISTORY = [
    {"role": "system", "content": "Be brief."},
    {"role": "user", "content": "Weather in Paris and the time?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_a", "type": "function", "function": {"name": "get_weather", "arguments": '{"city":"Paris"}'}},
        {"id": "call_b", "type": "function", "function": {"name": "get_time", "arguments": "{}"}}]},
    {"role": "tool", "tool_call_id": "call_a", "content": "18C, sunny"},
    {"role": "tool", "tool_call_id": "call_b", "content": "14:05"},
]


@pytest.fixture(scope="module")
def tok(default_model_path):
    return AutoTokenizer.from_pretrained(default_model_path)


def _err(fn, *a, **kw) -> APIError:
    with pytest.raises(APIError) as info:
        fn(*a, **kw)
    err = info.value
    assert err.status == 400 and err.message.startswith(err.param)  # the message opens with the field it names
    body = err.body()["error"]  # OpenAI's error JSON
    assert set(body) == {"message", "type", "param", "code"} and body["type"] == "invalid_request_error"
    return err


# ---------------------------------------------------------------- validation
def test_tools_are_normalised_and_choices_parsed():
    req = parse_tool_request([{**WEATHER, "function": {**WEATHER["function"], "strict": True}}, CLOCK])
    assert req.choice.mode == "auto" and req.parallel  # OpenAI's defaults with tools
    assert req.tools[0]["function"]["strict"] is True
    assert req.tools[1]["function"]["parameters"] == {"type": "object", "properties": {}}
    assert parse_tool_request(TOOLS, "none").prompt_tools() is None
    named = parse_tool_request(TOOLS, {"type": "function", "function": {"name": "get_time"}}, False)
    assert (named.choice.mode, named.choice.function, named.parallel) == ("required", "get_time", False)
    assert [t["function"]["name"] for t in named.allowed()] == ["get_time"]
    assert parse_tool_request(None) is None and parse_tool_request(None, "none") is None


@pytest.mark.parametrize("tools, choice, parallel, param, words", [
    ([WEATHER, CLOCK, {"type": "function", "function": {"name": "bad name!"}}], None, None,
     "tools[2].function.name", "letters, digits"),
    ([WEATHER, CLOCK, {"type": "function", "function": {"name": "f", "parameters": {
        "type": "object", "properties": {"a": {"type": "strin"}}}}}], None, None,
     "tools[2].function.parameters", "not a valid JSON Schema (at properties.a.type)"),
    ([{"type": "function", "function": {"name": "f", "parameters": {"type": "string"}}}], None, None,
     "tools[0].function.parameters", 'type "object"'),
    ([{"type": "function", "function": {"name": "f", "parameters": [1]}}], None, None,
     "tools[0].function.parameters", "JSON Schema object"),
    ([WEATHER, {"type": "retrieval"}], None, None, "tools[1].type", '"function"'),
    ([WEATHER, {"type": "function"}], None, None, "tools[1].function", "required"),
    ([WEATHER, CLOCK, WEATHER], None, None, "tools[2].function.name", "already the name of tools[0]"),
    ([], None, None, "tools", "must not be empty"),
    ({"type": "function"}, None, None, "tools", "array"),
    (TOOLS, {"type": "function", "function": {"name": "get_stock"}}, None, "tool_choice.function.name",
     "not among the tools (get_weather, get_time)"),
    (TOOLS, "sometimes", None, "tool_choice", "must be one of"),
    (TOOLS, {"type": "function"}, None, "tool_choice.function.name", "required"),
    (None, "required", None, "tool_choice", "needs tools"),
    (TOOLS, None, "yes", "parallel_tool_calls", "boolean"),
    ([{"type": "function", "function": {"name": "f", "strict": "yes"}}], None, None, "tools[0].function.strict",
     "boolean"),
])
def test_bad_tools_name_the_field(tools, choice, parallel, param, words):
    err = _err(parse_tool_request, tools, choice, parallel)
    assert err.param == param and words in err.message
    assert "SchemaError" not in err.message and "ValidationError" not in err.message


def test_parameters_are_checked_against_their_own_draft():
    draft4 = {"$schema": "http://json-schema.org/draft-04/schema#", "type": "object",
              "properties": {"n": {"type": "integer", "exclusiveMinimum": True, "minimum": 0}}}
    assert parse_tool_request([{"type": "function", "function": {"name": "f", "parameters": draft4}}])
    # the same keyword is a number in 2020-12 (the default draft): a boolean there is an invalid schema
    del draft4["$schema"]
    err = _err(parse_tool_request, [{"type": "function", "function": {"name": "f", "parameters": draft4}}])
    assert err.param == "tools[0].function.parameters" and "exclusiveMinimum" in err.message


def test_tool_history_is_valid_and_normalised():
    out = check_messages(copy.deepcopy(HISTORY))
    assert out[2]["tool_calls"][0] == HISTORY[2]["tool_calls"][0]
    assert check_messages([{"role": "assistant", "content": "hi", "tool_calls": []}]) == [
        {"role": "assistant", "content": "hi"}]
    # training data may end on the calls; a request may not (its calls must be answered)
    assert check_messages(HISTORY[:3], require_responses=False)
    err = _err(check_messages, HISTORY[:4])
    assert err.param == "messages[2].tool_calls" and "call_b" in err.message


@pytest.mark.parametrize("change, param, words", [
    (lambda h: h[3].pop("tool_call_id"), "messages[3].tool_call_id", "required"),
    (lambda h: h[3].update(tool_call_id="call_zz"), "messages[3].tool_call_id", "answers no tool call"),
    (lambda h: h[1].update(tool_calls=[]), "messages[1].tool_calls", "only allowed on assistant"),
    (lambda h: h[2]["tool_calls"][1]["function"].update(arguments={"a": 1}),
     "messages[2].tool_calls[1].function.arguments", "string holding JSON"),
    (lambda h: h[2]["tool_calls"][0].pop("id"), "messages[2].tool_calls[0].id", "required"),
    (lambda h: h[2]["tool_calls"][1].update(id="call_a"), "messages[2].tool_calls[1].id", "repeats"),
    (lambda h: h[2]["tool_calls"][0]["function"].pop("name"), "messages[2].tool_calls[0].function.name", ""),
    (lambda h: h[4].update(content=None), "messages[4].content", "required on tool messages"),
    (lambda h: h.insert(4, {"role": "user", "content": "?"}), "messages[2].tool_calls", "before messages[4]"),
    (lambda h: h[1].update(tool_call_id="call_a"), "messages[1].tool_call_id", "only allowed on tool messages"),
])
def test_bad_history_names_the_field(change, param, words):
    h = copy.deepcopy(HISTORY)
    change(h)
    err = _err(check_messages, h)
    assert err.param == param and words in err.message


# ---------------------------------------------------------------- rendering
def _hermes_blocks(text: str, tag: str) -> list[str]:
    return re.findall(rf"<{tag}>\n(.*?)\n</{tag}>", text, flags=re.S)


def test_without_tools_the_models_template_is_untouched(tok):
    plain = [{"role": "user", "content": "Hi"}, {"role": "assistant", "content": "Hello!"},
             {"role": "user", "content": "Bye"}]
    assert render_chat(tok, plain) == tok.apply_chat_template(plain, tokenize=False, add_generation_prompt=True)
    assert render_chat(tok, plain, add_generation_prompt=False) == tok.apply_chat_template(plain, tokenize=False)


def test_fallback_puts_tools_in_the_system_prompt(tok):
    assert not template_takes_tools(tok)  # SmolLM2's template ignores `tools`
    msgs = [{"role": "user", "content": "Weather in Paris?"}]
    text = render_chat(tok, msgs, parse_tool_request(TOOLS).tools)
    system = text.split("<|im_end|>")[0]
    assert system.startswith("<|im_start|>system\n# Tools")
    listed = re.search(r"<tools>\n(.*?)\n</tools>", system, flags=re.S).group(1).splitlines()
    assert [json.loads(line)["function"]["name"] for line in listed] == ["get_weather", "get_time"]
    assert json.loads(listed[0])["function"]["parameters"] == WEATHER["function"]["parameters"]
    assert "<tool_call>" in system and text.endswith("<|im_start|>user\nWeather in Paris?<|im_end|>\n"
                                                     "<|im_start|>assistant\n")
    # an existing system message keeps its text, first, and gains the tools
    text2 = render_chat(tok, [{"role": "system", "content": "Be brief."}, *msgs], TOOLS)
    assert text2.startswith("<|im_start|>system\nBe brief.\n\n# Tools") and text2.count("<|im_start|>system") == 1
    assert render_chat(tok, msgs, TOOLS) == render_chat(tok, copy.deepcopy(msgs), copy.deepcopy(TOOLS))


def test_fallback_history_renders_calls_and_results_the_parser_reads_back(tok):
    text = render_chat(tok, check_messages(copy.deepcopy(HISTORY)), TOOLS)
    turns = text.split("<|im_start|>")
    assistant = next(t for t in turns if t.startswith("assistant\n<tool_call>"))
    content, calls = Hermes().parse(assistant.removeprefix("assistant\n").removesuffix("<|im_end|>\n"))
    assert content is None
    assert [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("get_weather", {"city": "Paris"}), ("get_time", {})]
    results = next(t for t in turns if "<tool_response>\n" in t)
    assert results.startswith("user\n")  # one user turn holds both results, in order
    assert _hermes_blocks(results, "tool_response") == ["18C, sunny", "14:05"]
    assert "<|im_start|>tool" not in text and text.endswith("<|im_start|>assistant\n")


QWEN_STYLE = (  # a small Qwen2.5-like template written for this test: tools in the system turn, Hermes calls
    "{%- if tools %}<|im_start|>system\n{% if messages[0].role == 'system' %}{{ messages[0].content }}\n\n{% endif %}"
    "Tools:\n<tools>{% for t in tools %}\n{{ t | tojson }}{% endfor %}\n</tools><|im_end|>\n"
    "{%- elif messages[0].role == 'system' %}<|im_start|>system\n{{ messages[0].content }}<|im_end|>\n{%- endif %}"
    "{%- for m in messages %}"
    "{%- if m.role == 'system' %}"
    "{%- elif m.role == 'tool' %}\n<|im_start|>user\n<tool_response>\n{{ m.content }}\n</tool_response><|im_end|>"
    "{%- elif m.role == 'assistant' and m.tool_calls %}\n<|im_start|>assistant\n"
    "{%- for c in m.tool_calls %}\n<tool_call>\n{\"name\": \"{{ c.function.name }}\", \"arguments\": "
    "{{ c.function.arguments | tojson }}}\n</tool_call>{% endfor %}<|im_end|>"
    "{%- else %}\n<|im_start|>{{ m.role }}\n{{ m.content }}<|im_end|>{%- endif %}"
    "{%- endfor %}{% if add_generation_prompt %}\n<|im_start|>assistant\n{% endif %}"
)
LLAMA_STYLE = (  # Llama-3.1-like: JSON calls with "parameters", results in an ipython turn
    "{{ bos_token }}{%- if tools %}<|start_header_id|>system<|end_header_id|>\n\nTools:\n"
    "{% for t in tools %}{{ t | tojson }}\n{% endfor %}<|eot_id|>{% endif %}"
    "{%- for m in messages %}{%- if m.tool_calls %}<|start_header_id|>assistant<|end_header_id|>\n\n"
    "{%- for c in m.tool_calls %}{\"name\": \"{{ c.function.name }}\", \"parameters\": "
    "{{ c.function.arguments | tojson }}}{% endfor %}<|eot_id|>"
    "{%- elif m.role == 'tool' %}{% if m.name is not defined %}{{ raise_exception('tool messages need a name') }}"
    "{% endif %}<|start_header_id|>ipython<|end_header_id|>\n\n{{ m.name }}: {{ m.content }}<|eot_id|>"
    "{%- else %}<|start_header_id|>{{ m.role }}<|end_header_id|>\n\n{{ m.content }}<|eot_id|>{% endif %}"
    "{%- endfor %}{% if add_generation_prompt %}<|start_header_id|>assistant<|end_header_id|>\n\n{% endif %}"
)
MISTRAL_STYLE = (  # Mistral-like: 9-character call ids enforced, as Mistral's templates do
    "{%- for m in messages %}{%- if m.role == 'user' %}{% if loop.last and tools %}[AVAILABLE_TOOLS]"
    "{{ tools | tojson }}[/AVAILABLE_TOOLS]{% endif %}[INST]{{ m.content }}[/INST]"
    "{%- elif m.tool_calls %}[TOOL_CALLS] [{% for c in m.tool_calls %}"
    "{% if c.id|length != 9 %}{{ raise_exception('Tool call IDs should be alphanumeric strings with length 9!') }}"
    "{% endif %}{\"name\": \"{{ c.function.name }}\", \"arguments\": {{ c.function.arguments | tojson }}, "
    "\"id\": \"{{ c.id }}\"}{% if not loop.last %}, {% endif %}{% endfor %}]</s>"
    "{%- elif m.role == 'tool' %}[TOOL_RESULTS]{\"call_id\": \"{{ m.tool_call_id }}\", \"content\": "
    "{{ m.content | tojson }}}[/TOOL_RESULTS]{%- else %}{{ m.content }}</s>{% endif %}{%- endfor %}"
)


def _with_template(tok, template):
    t = copy.deepcopy(tok)
    t.chat_template = template
    return t


def test_a_tools_aware_template_renders_tools_and_history_itself(tok):
    qwen = _with_template(tok, QWEN_STYLE)
    assert template_takes_tools(qwen)
    msgs = check_messages(copy.deepcopy(HISTORY))
    text = render_chat(qwen, msgs, TOOLS)
    assert text == qwen.apply_chat_template(  # transformers' convention: arguments as objects
        [{**m, "tool_calls": [{**c, "function": {**c["function"], "arguments": json.loads(c["function"]["arguments"])}}
                              for c in m["tool_calls"]]} if m.get("tool_calls") else m for m in msgs],
        tools=TOOLS, tokenize=False, add_generation_prompt=True)
    assert '{"name": "get_weather", "arguments": {"city": "Paris"}}' in text
    assert text.startswith("<|im_start|>system\nBe brief.\n\nTools:\n<tools>") and json.dumps(WEATHER) in text
    assert "# Tools" not in text  # not the fallback
    assert isinstance(pick_parser(qwen), Hermes)


def test_llama_and_mistral_templates_pick_their_parsers_and_ids_fit_mistral(tok):
    llama = _with_template(tok, LLAMA_STYLE)
    assert template_takes_tools(llama) and isinstance(pick_parser(llama), Llama3Json)
    text = render_chat(llama, check_messages(copy.deepcopy(HISTORY)), TOOLS)
    assert '{"name": "get_weather", "parameters": {"city": "Paris"}}' in text
    assert "get_weather: 18C, sunny<|eot_id|>" in text and "get_time: 14:05" in text  # named after their calls
    mistral = _with_template(tok, MISTRAL_STYLE)
    fmt = pick_parser(mistral)
    assert isinstance(fmt, Mistral) and not fmt.args_tag
    msgs = [{"role": "user", "content": "Weather?"}] + HISTORY[2:4]
    msgs[1] = {**msgs[1], "tool_calls": msgs[1]["tool_calls"][:1]}
    text = render_chat(mistral, check_messages(msgs), TOOLS)
    call_id = re.search(r'"id": "(\w+)"', text).group(1)
    assert re.fullmatch(r"[0-9a-f]{9}", call_id) and f'"call_id": "{call_id}"' in text  # call and result agree
    assert render_chat(mistral, check_messages(msgs), TOOLS) == text  # stable


def test_pick_parser_names_and_mismatches(tok):
    assert isinstance(pick_parser(tok, "auto"), Hermes) and isinstance(pick_parser(tok, "hermes"), Hermes)
    with pytest.raises(ValueError, match="does not take tools"):
        pick_parser(tok, "llama3_json")
    with pytest.raises(ValueError, match="must be one of"):
        pick_parser(tok, "granite")
    assert isinstance(pick_parser(QWEN_STYLE.replace("tool_call", "function_call") + "<tool_call>"), Hermes)
    assert pick_parser("{{ tools }}[TOOL_CALLS]name[ARGS]").args_tag
    odd = _with_template(tok, QWEN_STYLE.replace("tool_call>", "fn>"))
    with pytest.raises(ValueError, match="set tool_call_parser"):
        pick_parser(odd)


# ---------------------------------------------------------------- parsers
def _calls(calls):
    return [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls]


def _replay(fmt, pieces):
    """Stream `pieces` through a fresh parser; returns (content, [(id, name, arguments)], deltas)."""
    s = fmt.stream()
    deltas = []
    for p in pieces:
        deltas += s.feed(p)
    deltas += s.finish()
    content, calls = "", {}
    for d in deltas:
        assert set(d) in ({"content"}, {"tool_calls"})
        if "content" in d:
            assert d["content"]
            content += d["content"]
            continue
        (tc,) = d["tool_calls"]
        if tc["index"] not in calls:  # the first delta of a call: id, type and name, then only arguments
            assert ID.match(tc["id"]) and tc["type"] == "function" and tc["function"]["arguments"] == ""
            assert tc["index"] == len(calls)
            calls[tc["index"]] = [tc["id"], tc["function"]["name"], ""]
        else:
            assert set(tc) == {"index", "function"} and set(tc["function"]) == {"arguments"}
            calls[tc["index"]][2] += tc["function"]["arguments"]
        ChatCompletionChunk.model_validate({"id": "x", "object": "chat.completion.chunk", "created": 0,
                                            "model": "m", "choices": [{"index": 0, "delta": d,
                                                                       "finish_reason": None}]})
    whole = [[c["id"], c["function"]["name"], c["function"]["arguments"]] for c in s.tool_calls]
    assert [calls[i] for i in sorted(calls)] == whole and (content or None) == s.content
    return s.content, [tuple(c) for c in whole], s


CASES = [
    (Hermes(), 'Let me look.\n<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris", "n": [1, "}"]}}\n'
     '</tool_call>\n<tool_call>\n{"arguments": {}, "name": "get_time"}\n</tool_call>',
     "Let me look.", [("get_weather", {"city": "Paris", "n": [1, "}"]}), ("get_time", {})]),
    (Hermes(), '<tool_call>{"name": "get_time"}</tool_call> done', "done", [("get_time", {})]),
    (Hermes(), '<tool_call>\n{"name": "f", "arguments": "{\\"a\\": 1}"}\n</tool_call>', None, [("f", {"a": 1})]),
    (Hermes(), "a < b and <tool_ is not a tag; <tool_call>oops</tool_call> stays text",
     "a < b and <tool_ is not a tag; <tool_call>oops</tool_call> stays text", []),
    (Llama3Json(), '<|python_tag|>{"name": "get_weather", "parameters": {"city": "Oslo"}}; '
     '{"name": "get_time", "parameters": {}}', None, [("get_weather", {"city": "Oslo"}), ("get_time", {})]),
    (Llama3Json(), '  {"name": "get_time", "arguments": {}}', None, [("get_time", {})]),
    (Llama3Json(), '{"name": "Bob", "age": 3}', '{"name": "Bob", "age": 3}', []),  # JSON, but no call
    (Llama3Json(), 'Sure: {"name": "f", "parameters": {}}', 'Sure: {"name": "f", "parameters": {}}', []),
    (Mistral(), 'Checking. [TOOL_CALLS] [{"name": "get_weather", "arguments": {"city": "Rome"}, "id": "abcdefghi"}, '
     '{"name": "get_time", "arguments": {}}]', "Checking.", [("get_weather", {"city": "Rome"}), ("get_time", {})]),
    (Mistral(), '[TOOL_CALLS]get_weather[ARGS]{"city": "Rome"}[TOOL_CALLS]get_time[ARGS]{}', None,
     [("get_weather", {"city": "Rome"}), ("get_time", {})]),
    (Mistral(), "[TOOL_CALLS] not a call", "[TOOL_CALLS] not a call", []),
]


@pytest.mark.parametrize("fmt, text, content, calls", CASES)
def test_whole_text_parse(fmt, text, content, calls):
    got_content, got_calls = fmt.parse(text)
    assert got_content == content and _calls(got_calls) == calls
    assert all(ID.match(c["id"]) for c in got_calls) and len({c["id"] for c in got_calls}) == len(got_calls)
    msg = ChatCompletionMessage.model_validate({"role": "assistant", "content": got_content,
                                                "tool_calls": got_calls or None})
    assert [t.function.name for t in msg.tool_calls or []] == [n for n, _ in calls]


@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(case=st.sampled_from(CASES), data=st.data())
def test_streams_cut_anywhere_give_the_whole_text_answer(case, data):
    fmt, text, content, calls = case
    cuts = sorted(data.draw(st.sets(st.integers(1, max(1, len(text) - 1)), max_size=len(text) // 2)))
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    got_content, got_calls, s = _replay(fmt, pieces)
    assert got_content == content and [(n, json.loads(a)) for _, n, a in got_calls] == calls
    assert s.finish_reason("stop") == ("tool_calls" if calls else "stop")
    assert s.finish_reason("length") == "length"


_json = st.recursive(st.none() | st.booleans() | st.integers() | st.text(max_size=8),
                     lambda kids: st.lists(kids, max_size=3) | st.dictionaries(st.text(max_size=5), kids, max_size=3),
                     max_leaves=8)
_prose = st.text(st.sampled_from(list("ab <>/_[]{}\n\"|")), max_size=30).filter(
    lambda t: "<tool_call>" not in t and "[TOOL_CALLS]" not in t)


def _render_output(fmt, prose, calls):
    """A model answer in `fmt`'s own syntax, written independently of the parser."""
    if isinstance(fmt, Hermes):
        blocks = "\n".join(f"<tool_call>\n{json.dumps({'name': n, 'arguments': a})}\n</tool_call>" for n, a in calls)
        return f"{prose}\n{blocks}" if calls else prose
    if isinstance(fmt, Llama3Json):
        return "; ".join(json.dumps({"name": n, "parameters": a}) for n, a in calls) if calls else prose
    if fmt.args_tag:
        return prose + "".join(f"[TOOL_CALLS]{n}[ARGS]{json.dumps(a)}" for n, a in calls)
    return prose + (f"[TOOL_CALLS] {json.dumps([{'name': n, 'arguments': a} for n, a in calls])}" if calls else "")


@settings(max_examples=120, deadline=None)
@given(fmt=st.sampled_from([Hermes(), Llama3Json(), Mistral(), Mistral(args_tag=True)]), prose=_prose,
       calls=st.lists(st.tuples(st.from_regex(r"[a-z_][a-z0-9_]{0,10}", fullmatch=True),
                                st.dictionaries(st.text(max_size=6), _json, max_size=4)), max_size=3),
       data=st.data())
def test_any_calls_round_trip_through_a_stream(fmt, prose, calls, data):
    text = _render_output(fmt, prose, calls)
    cuts = sorted(data.draw(st.sets(st.integers(1, max(1, len(text) - 1)), max_size=12)))
    pieces = [text[a:b] for a, b in zip([0, *cuts], [*cuts, len(text)])]
    content, got, _ = _replay(fmt, pieces)
    assert [(n, json.loads(a)) for _, n, a in got] == calls
    written = "" if calls and isinstance(fmt, Llama3Json) else prose  # Llama's calls are the whole answer
    assert content == (written.strip() or None)  # the prose, and no tag text


def test_text_only_and_cut_off_answers():
    for fmt in (Hermes(), Llama3Json(), Mistral()):
        content, calls, s = _replay(fmt, ["The answer ", "is 42.", "\n"])
        assert (content, calls, s.finish_reason("stop")) == ("The answer is 42.", [], "stop")
    # a call cut off by max_tokens keeps what it has; finish_reason stays `length`
    content, calls, s = _replay(Hermes(), ['<tool_call>\n{"name": "get_weather", "argu', 'ments": {"city": "Par'])
    assert calls[0][1:] == ("get_weather", '{"city": "Par') and s.finish_reason("length") == "length"
    # an unfinished tag at the end is text, not held forever
    assert _replay(Hermes(), ["see <tool_c"])[0] == "see <tool_c"


def test_a_partial_tag_is_held_until_it_resolves():
    s = Hermes().stream()
    assert s.feed("Hi <tool") == [{"content": "Hi"}]  # the space waits too: it may be trailing
    assert s.feed("_c") == []
    assert s.feed('all>{"name": "get_time"') == []  # name known, but no arguments yet: not committed
    first = s.feed(', "arguments": {')
    assert first[0]["tool_calls"][0]["function"] == {"name": "get_time", "arguments": ""}
    assert first[1] == {"tool_calls": [{"index": 0, "function": {"arguments": "{"}}]}
    assert s.feed("}}</tool_call>") == [{"tool_calls": [{"index": 0, "function": {"arguments": "}"}}]}]
    assert s.finish() == [] and s.called


def test_new_call_ids():
    ids = {new_call_id() for _ in range(100)}
    assert len(ids) == 100 and all(ID.match(i) for i in ids)


# ---------------------------------------------------------------- grammar descriptions
REF_TOOL = {"type": "function", "function": {"name": "book", "parameters": {
    "type": "object", "$defs": {"day": {"type": "string", "pattern": "^[0-9]{4}-[0-9]{2}-[0-9]{2}$"}},
    "properties": {"when": {"$ref": "#/$defs/day"}}, "required": ["when"], "additionalProperties": False}}}


@pytest.mark.parametrize("fmt", [Hermes(), Llama3Json(), Mistral(), Mistral(args_tag=True)], ids=lambda f: repr(
    (f.name, getattr(f, "args_tag", None))))
def test_grammar_tags_describe_what_the_parser_reads(fmt):
    req = parse_tool_request([WEATHER, REF_TOOL], "required", False)
    g = fmt.grammar(req)
    assert g.mode == "required" and g.max_calls == 1 and [t.tool for t in g.tags] == ["get_weather", "book"]
    for t in g.tags:
        assert all((t.begin or "{").startswith(trig) for trig in g.triggers)
    book = g.tags[1]
    jsonschema.Draft202012Validator.check_schema(book.schema)
    args = {"when": "2025-01-31"}
    args_key = "parameters" if isinstance(fmt, Llama3Json) else "arguments"
    body = args if getattr(fmt, "args_tag", False) else {"name": "book", args_key: args}
    jsonschema.validate(body, book.schema)  # the $ref still resolves after wrapping
    for wrong in ({"when": "soon"}, {"when": "2025-01-31", "extra": 1}):
        bad = wrong if getattr(fmt, "args_tag", False) else {"name": "book", args_key: wrong}
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate(bad, book.schema)
    if not getattr(fmt, "args_tag", False):
        with pytest.raises(jsonschema.ValidationError):
            jsonschema.validate({"name": "get_weather", args_key: args}, book.schema)
    # what a grammar-forced output looks like parses into the call, twice joined by the separator
    one = book.begin + json.dumps(body) + book.end
    content, calls = fmt.parse(one + g.separator + one)
    assert content is None and _calls(calls) == [("book", args), ("book", args)]


def test_grammar_follows_tool_choice():
    fmt = Hermes()
    assert fmt.grammar(None) is None and fmt.grammar(parse_tool_request(TOOLS, "none")) is None
    auto = fmt.grammar(parse_tool_request(TOOLS))
    assert (auto.mode, auto.triggers, auto.max_calls, len(auto.tags)) == ("auto", ("<tool_call>",), None, 2)
    named = fmt.grammar(parse_tool_request(TOOLS, {"type": "function", "function": {"name": "get_time"}}))
    assert named.mode == "required" and [t.tool for t in named.tags] == ["get_time"]
    assert named.tags[0].schema["properties"]["name"] == {"const": "get_time"}
    assert Llama3Json().grammar(parse_tool_request(TOOLS)).trigger_at_start


def test_special_token_tags_are_reported(tok):
    assert not Hermes().needs_special_tokens(tok)
    t = copy.deepcopy(tok)
    t.add_special_tokens({"additional_special_tokens": ["[TOOL_CALLS]"]})
    assert Mistral().needs_special_tokens(t) and not Hermes().needs_special_tokens(t)
