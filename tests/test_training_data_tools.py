"""Training data with tools (OpenAI's fine-tuning format): rendered by serving's own prompt function, labels on
the assistant's calls and answers only, and errors that name the line and the field."""

import copy
import json

import pytest
from transformers import AutoTokenizer

from serving.api.tool_parsers import pick_parser
from serving.api.tool_prompt import render_chat
from training.config import DatasetSpec
from training.data import IGNORE, DataError, build_examples, prompt_text, reference_answer
from training.testing import qa_records, write_jsonl

TOOLS = [{"type": "function", "function": {
    "name": "get_weather", "description": "Current weather in a city",
    "parameters": {"type": "object", "properties": {"city": {"type": "string"}}, "required": ["city"]}}}]
RECORD = {"tools": TOOLS, "messages": [
    {"role": "user", "content": "Weather in Paris?"},
    {"role": "assistant", "content": None, "tool_calls": [
        {"id": "call_1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
    {"role": "tool", "tool_call_id": "call_1", "content": "18C, sunny"},
    {"role": "assistant", "content": "It is 18C and sunny in Paris."},
]}


@pytest.fixture(scope="module")
def tok(default_model_path):
    return AutoTokenizer.from_pretrained(default_model_path)


def _build(tok, path, **kw):
    opts = dict(chat_template=None, train_on_inputs=False, sequence_len=512, excess_length_strategy="error")
    opts.update(kw)
    return build_examples([DatasetSpec(path=path, type="chat")], tok, **opts)


def _trained_spans(tok, ex) -> list[str]:
    """The decoded runs of consecutive trained tokens."""
    runs, cur = [], []
    for i, lab in zip(ex.input_ids, ex.labels):
        if lab != IGNORE:
            cur.append(i)
        elif cur:
            runs.append(cur)
            cur = []
    if cur:
        runs.append(cur)
    return [tok.decode(r) for r in runs]


def test_tool_conversations_render_as_serving_does_and_train_only_the_assistant(tok, tmp_path):
    (ex,) = _build(tok, write_jsonl(tmp_path / "t.jsonl", [RECORD]))
    msgs = copy.deepcopy(RECORD["messages"])
    msgs[1]["content"] = ""
    assert tok.decode(ex.input_ids) == render_chat(tok, msgs, TOOLS, add_generation_prompt=False)
    call, answer = _trained_spans(tok, ex)
    assert call == '<tool_call>\n{"name": "get_weather", "arguments": {"city": "Paris"}}\n</tool_call><|im_end|>\n'
    assert answer == "It is 18C and sunny in Paris.<|im_end|>\n"
    # the server's parser, picked for this model as serving picks it, reads back the trained call
    content, calls = pick_parser(tok).parse(call.removesuffix("<|im_end|>\n"))
    assert content is None and [(c["function"]["name"], json.loads(c["function"]["arguments"])) for c in calls] == [
        ("get_weather", {"city": "Paris"})]
    assert "18C, sunny" not in "".join(_trained_spans(tok, ex))  # the tool's result is input, not a target


def test_a_conversation_may_end_on_the_call_and_samples_see_the_tools(tok, tmp_path):
    rec = {"tools": json.dumps(TOOLS), "messages": RECORD["messages"][:2]}  # tools as JSON text, as in a CSV cell
    (ex,) = _build(tok, write_jsonl(tmp_path / "c.jsonl", [rec]))
    assert _trained_spans(tok, ex)[0].startswith("<tool_call>\n")
    prompt = prompt_text(tok, tok.chat_template, rec, "chat", "c.jsonl:1")
    assert "<tools>" in prompt and prompt.endswith("<|im_start|>assistant\n")
    assert reference_answer(rec, "chat") == ""


def test_records_without_tools_are_unchanged(tok, tmp_path):
    rec = qa_records(1)[0]
    (ex,) = _build(tok, write_jsonl(tmp_path / "q.jsonl", [rec]))
    assert tok.decode(ex.input_ids) == tok.apply_chat_template(rec["messages"], tokenize=False)


@pytest.mark.parametrize("change, match", [
    (lambda r: r["tools"][0]["function"].update(parameters={"type": "object", "required": "city"}),
     r"t\.jsonl:2: tools\[0\]\.function\.parameters is not a valid JSON Schema \(at required\)"),
    (lambda r: r["tools"][0]["function"].update(name="get weather"), r"t\.jsonl:2: tools\[0\]\.function\.name must"),
    (lambda r: r["messages"][2].pop("tool_call_id"), r"t\.jsonl:2: messages\[2\]\.tool_call_id is required"),
    (lambda r: r["messages"][1]["tool_calls"][0]["function"].update(arguments={"city": "Paris"}),
     r"t\.jsonl:2: messages\[1\]\.tool_calls\[0\]\.function\.arguments must be a string"),
    (lambda r: r["messages"][2].update(tool_call_id="call_9"), r"t\.jsonl:2: messages\[2\]\.tool_call_id is 'call_9'"),
    (lambda r: r.update(tools="[{"), r"t\.jsonl:2: field 'tools' is not valid JSON"),
])
def test_bad_tool_records_name_the_line_and_field(tok, tmp_path, change, match):
    bad = copy.deepcopy(RECORD)
    change(bad)
    path = write_jsonl(tmp_path / "t.jsonl", [RECORD, bad])
    with pytest.raises(DataError, match=match):
        _build(tok, path)
