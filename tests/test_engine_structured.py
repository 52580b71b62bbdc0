"""Structured output: grammar-constrained decoding in the engine, checked against HF transformers + xgrammar's own
HF logits processor, jsonschema, and re; every refusal names its param."""

from __future__ import annotations

import json
import re

import jsonschema
import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from serving.engine import EngineConfig, InvalidRequestError, SamplingParams
from serving.engine.llm_engine import LLMEngine
from tests.conftest import make_lora_adapter

PERSON = {"type": "object",
          "properties": {"name": {"type": "string", "maxLength": 12},
                         "age": {"type": "integer", "minimum": 0, "maximum": 120},
                         "tags": {"type": "array", "items": {"type": "string", "enum": ["a", "b", "c"]},
                                  "maxItems": 3},
                         "score": {"type": "number", "minimum": -1, "maximum": 1}},
          "required": ["name", "age"], "additionalProperties": False}
WEATHER = {"type": "object", "properties": {"city": {"type": "string", "maxLength": 16},
                                            "unit": {"type": "string", "enum": ["celsius", "fahrenheit"]}},
           "required": ["city", "unit"], "additionalProperties": False}


def spec(schema, **extra) -> dict:
    return {"type": "json_schema", "schema": schema, **extra}


def validate(text: str, schema) -> None:
    jsonschema.validate(json.loads(text), schema, format_checker=jsonschema.FormatChecker())


@pytest.fixture(scope="module")
def tiny(tiny_model_factory, tmp_path_factory):
    path = tiny_model_factory("llama")
    engine = LLMEngine(EngineConfig(model=path, dtype="float32", num_kv_blocks=512, block_size=8, max_num_seqs=32))
    adapter = make_lora_adapter(path, tmp_path_factory.mktemp("structured-lora") / "a", rank=4, seed=1)
    engine.add_lora("a", str(adapter))
    return engine


def prompts(engine, n: int) -> list[list[int]]:
    words = "alpha beta gamma delta river stone cloud paper seven green quick lazy".split()
    return [engine.tokenizer(" ".join(words[(i + j) % len(words)] for j in range(3 + 2 * i)))["input_ids"]
            for i in range(n)]


# ---- against HF transformers with xgrammar's own logits processor ---------------------------------------------
def hf_constrained(model_path: str, ids: list[int], schema: dict, max_new_tokens: int, eos_ids) -> list[int]:
    """HF greedy generate under xgrammar.contrib.hf.LogitsProcessor, compiled straight from xgrammar (not
    through our Grammars), with the engine's EOS ids as stop tokens."""
    import xgrammar as xgr
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(model_path)
    model = AutoModelForCausalLM.from_pretrained(model_path, dtype=torch.float32).eval()
    info = xgr.TokenizerInfo.from_huggingface(tokenizer, vocab_size=model.config.vocab_size,
                                              stop_token_ids=sorted(eos_ids))
    compiled = xgr.GrammarCompiler(info).compile_json_schema(json.dumps(schema), any_whitespace=False)
    out = model.generate(torch.tensor([ids]), max_new_tokens=max_new_tokens, do_sample=False,
                         eos_token_id=sorted(eos_ids), pad_token_id=sorted(eos_ids)[0],
                         logits_processor=[xgr.contrib.hf.LogitsProcessor(compiled)])
    return out[0, len(ids):].tolist()


def test_greedy_constrained_equals_hf_generate_with_xgrammar_processor_tiny(tiny):
    ids_list = prompts(tiny, 4)
    params = SamplingParams(temperature=0, max_tokens=48, structured=spec(PERSON))
    outs = tiny.generate(ids_list, params)  # four constrained requests in one batch
    for ids, out in zip(ids_list, outs):
        assert out.outputs[0].token_ids == hf_constrained(tiny.model_path, ids, PERSON, 48, tiny.eos_ids)
        if out.outputs[0].finish_reason == "stop":
            validate(out.outputs[0].text, PERSON)


@pytest.mark.slow
def test_greedy_constrained_equals_hf_generate_default_model(default_model_path):
    # float32, the format exact against HF (auto is bf16 on CPUs with AVX512-BF16: its sums differ by an ulp)
    engine = LLMEngine(EngineConfig(model=default_model_path, dtype="float32"))
    tok = engine.tokenizer
    questions = ["Give me a person as JSON.", "Describe a customer named Ada who is 36."]
    ids_list = [tok(tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True,
                                            tokenize=False), add_special_tokens=False)["input_ids"] for q in questions]
    outs = engine.generate(ids_list, SamplingParams(temperature=0, max_tokens=64, structured=spec(PERSON)))
    for ids, out in zip(ids_list, outs):
        assert out.outputs[0].token_ids == hf_constrained(default_model_path, ids, PERSON, 64, engine.eos_ids)
        assert out.outputs[0].finish_reason == "stop"
        validate(out.outputs[0].text, PERSON)


# ---- generated schemas in mixed batches -------------------------------------------------------------------------
PATTERNS = ["^[a-z]{1,6}$", "^[A-Z][a-z]{0,5}$", "^[0-9]{2,4}$", "^(red|green|blue)$", "^[a-f0-9]{4}-[a-f0-9]{2}$"]
names = st.text(alphabet="abcdefghijklmnopqrstuvwxyz_", min_size=1, max_size=8)


def _scalar():
    return st.one_of(
        st.builds(lambda lo, span: {"type": "integer", "minimum": lo, "maximum": lo + span},
                  st.integers(-1000, 1000), st.integers(0, 500)),
        st.builds(lambda lo, span: {"type": "number", "minimum": lo, "maximum": lo + span},
                  st.integers(-50, 50), st.integers(1, 100)),
        st.builds(lambda n: {"type": "string", "maxLength": n}, st.integers(0, 8)),
        st.builds(lambda lo, n: {"type": "string", "minLength": lo, "maxLength": lo + n}, st.integers(1, 3),
                  st.integers(0, 4)),
        st.builds(lambda p: {"type": "string", "pattern": p}, st.sampled_from(PATTERNS)),
        st.builds(lambda v: {"type": "string", "enum": v}, st.lists(names, min_size=1, max_size=4, unique=True)),
        st.builds(lambda v: {"enum": v}, st.lists(st.one_of(st.integers(-5, 5), st.booleans(), st.none(), names),
                                                  min_size=1, max_size=4, unique_by=json.dumps)),
        st.just({"type": "boolean"}), st.just({"type": "null"}),
        st.builds(lambda f: {"type": "string", "format": f}, st.sampled_from(["date", "ipv4", "uuid"])),
    )


def _schema(children):
    objects = st.builds(
        lambda props, data: {"type": "object", "properties": dict(props),
                             "required": data.draw(st.lists(st.sampled_from([k for k, _ in props]), unique=True))
                             if props else [],
                             "additionalProperties": False},
        st.lists(st.tuples(names, children), min_size=1, max_size=4, unique_by=lambda kv: kv[0]), st.data())
    arrays = st.builds(lambda items, lo, n: {"type": "array", "items": items, "minItems": lo, "maxItems": lo + n},
                       children, st.integers(0, 2), st.integers(0, 2))
    nullable = st.builds(lambda s: {"anyOf": [s, {"type": "null"}]}, children)
    return st.one_of(objects, arrays, nullable)


schemas = _schema(st.recursive(_scalar(), _schema, max_leaves=4))


@settings(max_examples=8, deadline=None, suppress_health_check=list(HealthCheck))
@given(schema=schemas)
def test_generated_schemas_validate_in_mixed_batches(tiny, schema):
    """Each example: greedy and sampled constrained requests, on the base and an adapter, beside unconstrained
    ones, in one engine step; every constrained output finishes and validates under jsonschema."""
    jsonschema.Draft202012Validator.check_schema(schema)
    ids = prompts(tiny, 6)
    constrained = [SamplingParams(temperature=0, max_tokens=200, structured=spec(schema)),
                   SamplingParams(temperature=1.0, seed=3, max_tokens=200, structured=spec(schema)),
                   SamplingParams(temperature=1.0, seed=4, max_tokens=200, structured=spec(schema))]
    free = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    params = [constrained[0], free, constrained[1], free, constrained[2], constrained[0]]
    loras = [None, None, "a", "a", None, "a"]
    outs = tiny.generate(ids, params, lora_names=loras)
    for p, out in zip(params, outs):
        o = out.outputs[0]
        if p.structured is None:
            assert len(o.token_ids) == 12
            continue
        assert o.finish_reason == "stop", (schema, o.text)
        validate(o.text, schema)


# ---- other kinds ------------------------------------------------------------------------------------------------
def test_regex_choice_ebnf_and_lark_outputs_match(tiny):
    ebnf = 'root ::= "(" num ("," num)* ")"\nnum ::= [1-9] [0-9]?'
    lark = 'start: WORD ("-" WORD)?\nWORD: /[a-z]{2,5}/'
    cases = [({"type": "regex", "pattern": r"[a-z]{3}-[0-9]{2,3}"}, lambda t: re.fullmatch(r"[a-z]{3}-[0-9]{2,3}", t)),
             ({"type": "choice", "choices": ["yes", "no", "maybe not"]}, lambda t: t in ("yes", "no", "maybe not")),
             ({"type": "grammar", "grammar": ebnf}, lambda t: re.fullmatch(r"\([1-9][0-9]?(,[1-9][0-9]?)*\)", t)),
             ({"type": "grammar", "syntax": "lark", "grammar": lark},
              lambda t: re.fullmatch(r"[a-z]{2,5}(-[a-z]{2,5})?", t))]
    ids = prompts(tiny, 2)
    for s, check in cases:
        for temperature in (0, 1):
            outs = tiny.generate(ids, SamplingParams(temperature=temperature, seed=1, max_tokens=120, structured=s))
            for out in outs:
                o = out.outputs[0]
                assert o.finish_reason == "stop" and check(o.text), (s, o.text)
    # any JSON object: a random model's free strings may outrun max_tokens, so only finished ones must parse
    outs = tiny.generate(prompts(tiny, 6), SamplingParams(temperature=0, max_tokens=120,
                                                          structured={"type": "json_object"}))
    done = [o.outputs[0].text for o in outs if o.outputs[0].finish_reason == "stop"]
    assert done and all(isinstance(json.loads(t), dict) for t in done)
    assert all(o.outputs[0].text.startswith("{") for o in outs)


def test_logprobs_are_of_the_masked_distribution(tiny):
    choices = ["yes", "no"]
    out = tiny.generate(prompts(tiny, 1), SamplingParams(temperature=0, max_tokens=4, logprobs=5,
                                                         structured={"type": "choice", "choices": choices}))[0]
    first = out.outputs[0].logprobs[0]
    allowed = [(tid, lp) for tid, _, lp in first.top if lp > float("-inf")]
    assert allowed and all(any(c.startswith(tiny.tokenizer.decode([tid])) for c in choices) for tid, _ in allowed)
    assert abs(sum(torch.tensor([lp for _, lp in allowed]).exp().tolist()) - 1.0) < 1e-3  # mass only where allowed


# ---- tool calls -------------------------------------------------------------------------------------------------
def tool_tag(name: str, params: dict, begin="<tool_call>\n", end="\n</tool_call>") -> dict:
    return {"begin": begin, "end": end,
            "schema": {"type": "object", "properties": {"name": {"const": name}, "arguments": params},
                       "required": ["name", "arguments"]}}


TIME = {"type": "object", "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}}, "required": ["zone"]}
TOOLS = {"get_weather": WEATHER, "get_time": TIME}


def parse_calls(text: str, begin: str, end: str) -> list[dict]:
    calls = [json.loads(m) for m in re.findall(re.escape(begin) + r"(.*?)" + re.escape(end), text, re.S)]
    for c in calls:
        jsonschema.validate(c["arguments"], TOOLS[c["name"]])
    return calls


@pytest.mark.parametrize("parallel", [True, False])
def test_tool_calls_required_mode_outputs_only_valid_calls(tiny, parallel):
    s = {"type": "tool_calls", "mode": "required", "parallel": parallel,
         "tags": [tool_tag(n, p) for n, p in TOOLS.items()]}
    outs = tiny.generate(prompts(tiny, 3), [SamplingParams(temperature=t, seed=2, max_tokens=120, structured=s)
                                            for t in (0, 1, 1)])
    for out in outs:
        o = out.outputs[0]
        assert o.finish_reason == "stop" or parallel, o.text  # parallel: a model may call until max_tokens
        calls = parse_calls(o.text, "<tool_call>\n", "\n</tool_call>")
        assert calls and (parallel or len(calls) == 1)
        rest = re.sub(r"<tool_call>\n.*?\n</tool_call>", "", o.text, flags=re.S)
        if o.finish_reason == "stop":
            assert rest == "\n" * (len(calls) - 1), o.text  # nothing but calls and their separators
        else:
            assert rest.startswith("\n" * len(calls) + "<tool_call>"[:len(rest) - len(calls)]), o.text


def test_tool_calls_auto_mode_free_text_then_constrained_call(tiny):
    """auto: text is free until the trigger, then the call is constrained. The tiny model's own greedy text
    supplies a trigger it will produce, so the test sees both halves."""
    ids = prompts(tiny, 1)
    free = tiny.generate(ids, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True))[0].outputs[0]
    trigger = tiny.tokenizer.decode(free.token_ids[3:5])
    prefix = free.text[:free.text.index(trigger)]
    begin, end = trigger + "<call>", "</call>"
    s = {"type": "tool_calls", "mode": "auto", "triggers": [trigger],
         "tags": [tool_tag(n, p, begin=begin, end=end) for n, p in TOOLS.items()]}
    o = tiny.generate(ids, SamplingParams(temperature=0, max_tokens=200, structured=s))[0].outputs[0]
    assert o.text.startswith(prefix + begin), o.text  # free text untouched up to the trigger
    calls = parse_calls(o.text, begin, end)
    assert calls, o.text
    # no trigger in sight: auto mode leaves the output exactly as unconstrained
    s_never = {**s, "triggers": ["\u2603"], "tags": [tool_tag("get_time", TIME, begin="\u2603<call>", end=end)]}
    o2 = tiny.generate(ids, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, structured=s_never))[0]
    assert o2.outputs[0].token_ids == free.token_ids


# ---- engine behaviours under constraints ------------------------------------------------------------------------
def test_preemption_with_constrained_requests_changes_nothing(tiny_model_factory):
    path = tiny_model_factory("llama")
    roomy = LLMEngine(EngineConfig(model=path, num_kv_blocks=512, block_size=8))
    ids = prompts(roomy, 9)
    params = SamplingParams(temperature=0, max_tokens=48, structured=spec(PERSON))
    expected = [roomy.generate([p], params)[0].outputs[0].token_ids for p in ids]
    tight = LLMEngine(EngineConfig(model=path, num_kv_blocks=20, block_size=8, max_num_batched_tokens=64))
    outs = tight.generate(ids, [params if i % 3 else SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)
                                for i in range(len(ids))])
    assert tight.stats()["num_preemptions"] > 0
    for i, (out, exp) in enumerate(zip(outs, expected)):
        if i % 3:
            assert out.outputs[0].token_ids == exp
            validate(out.outputs[0].text, PERSON)
    assert tight.allocator.all_free()


def test_n_choices_seed_and_stop_strings(tiny):
    s = spec(PERSON)
    p = SamplingParams(n=3, temperature=1.0, seed=11, max_tokens=80, structured=s)
    a = tiny.generate(prompts(tiny, 1), p)[0].outputs
    b = tiny.generate(prompts(tiny, 1), p)[0].outputs
    assert [o.text for o in a] == [o.text for o in b]  # same seed, same texts
    assert len({o.text for o in a}) > 1  # each choice its own draw and matcher
    for o in a:
        assert o.finish_reason == "stop"
        validate(o.text, PERSON)
    stopped = tiny.generate(prompts(tiny, 1), SamplingParams(temperature=0, max_tokens=80, structured=s,
                                                             stop=['"age"']))[0].outputs[0]
    assert stopped.stop_reason == '"age"' and stopped.text.startswith('{"name": ')


def test_max_tokens_first_is_length(tiny):
    long = {"type": "array", "items": {"type": "integer"}, "minItems": 40}
    o = tiny.generate(prompts(tiny, 1), SamplingParams(temperature=0, max_tokens=6, structured=spec(long)))[0]
    assert o.outputs[0].finish_reason == "length" and len(o.outputs[0].token_ids) == 6


def test_unconstrained_engine_never_builds_the_grammar_compiler(tiny_model_factory):
    engine = LLMEngine(EngineConfig(model=tiny_model_factory("llama"), num_kv_blocks=64, block_size=8))
    engine.generate(prompts(engine, 2), SamplingParams(temperature=0, max_tokens=4))
    assert engine.grammars._compiler is None


def test_compiled_grammars_are_cached_by_canonical_form(tiny):
    g = tiny.grammars
    a = g.compile(spec(PERSON))
    hits = g.hits
    assert g.compile(spec(json.loads(json.dumps(PERSON)))) is a and g.hits == hits + 1
    reordered = json.loads(json.dumps(PERSON, sort_keys=True))  # same keywords, keys in another order
    reordered["properties"] = dict(PERSON["properties"])  # ... but the same property order
    assert g.compile({"schema": reordered, "type": "json_schema"}) is a
    other_order = {**PERSON, "properties": dict(reversed(list(PERSON["properties"].items())))}
    assert g.compile(spec(other_order)) is not a  # property order is the output's order: a different grammar
    assert g.compile(spec(PERSON, param="response_format.json_schema.schema")) is a  # param is not in the key


def test_cpu_mask_apply_equals_xgrammars_own_apply():
    import xgrammar as xgr

    from serving.engine.grammar import apply_bitmask_cpu

    gen = torch.Generator().manual_seed(0)
    for vocab in (49152, 1000, 77):
        mask = torch.randint(-2**31, 2**31 - 1, (5, (vocab + 31) // 32), dtype=torch.int32, generator=gen)
        mask[1] = -1
        mask[2] = 0
        logits = torch.randn(5, vocab, generator=gen)
        ref = logits.clone()
        xgr.apply_token_bitmask_inplace(ref, mask, vocab_size=vocab)
        apply_bitmask_cpu(logits, mask)
        assert torch.equal(logits, ref)


# ---- what the grammar engine enforces, probed against the installed xgrammar --------------------------------
ENFORCED = [  # (schema, an instance breaking only that keyword)
    ({"type": "integer"}, '"a"'), ({"enum": ["a", "b"]}, '"c"'), ({"const": 3}, "4"),
    ({"type": "integer", "minimum": 5}, "4"), ({"type": "integer", "maximum": 5}, "6"),
    ({"type": "integer", "exclusiveMinimum": 5}, "5"), ({"type": "number", "exclusiveMaximum": 1}, "1"),
    ({"type": "number", "minimum": 0.25, "maximum": 0.75}, "0.8"), ({"type": "integer", "multipleOf": 3}, "4"),
    ({"type": "string", "minLength": 3}, '"ab"'), ({"type": "string", "maxLength": 3}, '"abcd"'),
    ({"type": "string", "pattern": "^[0-9]+$"}, '"ab"'), ({"type": "string", "format": "date"}, '"x"'),
    ({"type": "string", "format": "email"}, '"x"'), ({"type": "string", "format": "ipv4"}, '"x"'),
    ({"type": "string", "format": "uuid"}, '"x"'), ({"type": "string", "format": "ipv6"}, '"x"'),
    ({"type": "array", "items": {"type": "integer"}, "minItems": 2}, "[1]"),
    ({"type": "array", "maxItems": 1}, "[1, 2]"), ({"type": "array", "items": {"type": "integer"}}, '["a"]'),
    ({"type": "array", "prefixItems": [{"type": "integer"}]}, '["a"]'),
    ({"type": "array", "prefixItems": [{"type": "integer"}], "items": False}, "[1, 2]"),
    ({"type": "array", "contains": {"type": "string"}}, "[1]"),
    ({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["a"]}, "{}"),
    ({"type": "object", "properties": {"a": {"type": "integer"}}}, '{"a": "x"}'),
    ({"type": "object", "properties": {"a": {}}, "additionalProperties": False}, '{"b": 1}'),
    ({"type": "object", "additionalProperties": {"type": "integer"}}, '{"b": "x"}'),
    ({"type": "object", "minProperties": 1, "additionalProperties": {"type": "integer"}}, "{}"),
    ({"type": "object", "maxProperties": 1}, '{"a": 1, "b": 2}'),
    ({"type": "object", "patternProperties": {"^a": {"type": "integer"}}}, '{"ab": "x"}'),
    ({"type": "object", "propertyNames": {"pattern": "^a"}}, '{"b": 1}'),
    ({"anyOf": [{"type": "integer"}, {"type": "null"}]}, '"x"'), ({"allOf": [{"type": "integer"}]}, '"x"'),
    ({"$defs": {"a": {"type": "integer"}}, "$ref": "#/$defs/a"}, '"x"'),
    ({"type": ["integer", "null"]}, '"x"'), ({"type": "string", "enum": ["a", 1]}, "1"),
]


@pytest.mark.parametrize("schema,bad", ENFORCED, ids=lambda v: json.dumps(v)[:40] if isinstance(v, dict) else v)
def test_every_allowed_keyword_is_enforced_by_the_grammar(tiny, schema, bad):
    import xgrammar as xgr

    assert not jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker()).is_valid(
        json.loads(bad))
    matcher = xgr.GrammarMatcher(tiny.grammars.compile(spec(schema)))
    assert not (matcher.accept_string(bad) and matcher.is_completed())


def test_dates_follow_the_calendar(tiny):
    """format: date takes only real dates (xgrammar's own grammar let "2024-11-31" through), as jsonschema's
    format checker does; nested dates too."""
    import xgrammar as xgr

    schema = {"type": "object", "properties": {"d": {"type": "string", "format": "date"}}, "required": ["d"]}
    check = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())
    compiled = tiny.grammars.compile(spec({"type": "array", "items": schema}))
    for day in ["2024-02-29", "2000-02-29", "2023-02-28", "0001-01-01", "9999-12-31", "2024-11-30", "1999-01-31",
                "2023-02-29", "1900-02-29", "2024-11-31", "2024-04-31", "0000-01-01", "2024-13-01", "2024-00-10",
                "2024-01-00", "2100-02-29", "2400-02-29", "0004-02-29"]:
        m = xgr.GrammarMatcher(compiled)
        text = json.dumps([{"d": day}])
        assert (m.accept_string(text) and m.is_completed()) == check.is_valid({"d": day}), day


def test_ipv4_addresses_have_no_leading_zeros(tiny):
    """format: ipv4 as jsonschema's checker (Python's ipaddress) takes it: xgrammar's own let "86.76.86.048"
    through (hypothesis found it)."""
    import xgrammar as xgr

    schema = {"type": "string", "format": "ipv4"}
    check = jsonschema.Draft202012Validator(schema, format_checker=jsonschema.FormatChecker())
    compiled = tiny.grammars.compile(spec(schema))
    for ip in ["86.76.86.48", "0.0.0.0", "255.255.255.255", "10.0.12.9", "86.76.86.048", "01.2.3.4",
               "256.1.1.1", "1.2.3", "1.2.3.4.5"]:
        m = xgr.GrammarMatcher(compiled)
        assert (m.accept_string(json.dumps(ip)) and m.is_completed()) == check.is_valid(ip), ip


def test_no_raw_control_characters_in_json_strings(tiny):
    """xgrammar 0.2.9's length-bounded strings let raw control characters in (invalid JSON); grammar.py fixes it.
    Checked on plain strings, keys, and inside a tool call."""
    import xgrammar as xgr

    bounded = {"type": "object", "properties": {"s": {"type": "string", "maxLength": 5}}, "required": ["s"]}
    keys = {"type": "object", "propertyNames": {"maxLength": 3}, "additionalProperties": {"type": "integer"}}
    call = {"type": "tool_calls", "mode": "required", "tags": [tool_tag("f", bounded)]}
    for s, bad, good in [(spec(bounded), '{"s": "a\x10"}', '{"s": "a b"}'),
                         (spec(keys), '{"a\x10": 1}', '{"ab": 1}'),
                         (call, '<tool_call>\n{"name": "f", "arguments": {"s": "\x01"}}\n</tool_call>',
                          '<tool_call>\n{"name": "f", "arguments": {"s": "ok"}}\n</tool_call>')]:
        compiled = tiny.grammars.compile(s)
        m = xgr.GrammarMatcher(compiled)
        assert not (m.accept_string(bad) and m.is_completed()), bad
        m = xgr.GrammarMatcher(compiled)
        assert m.accept_string(good) and m.is_completed(), good


# ---- refusals: each names its param and the place ---------------------------------------------------------------
REFUSED = [
    ({"type": "array", "items": {"type": "string"}, "uniqueItems": True}, "$.uniqueItems"),
    ({"type": "object", "properties": {"tags": {"type": "array", "uniqueItems": True}}}, "$.properties.tags.uniqueItems"),
    ({"oneOf": [{"type": "integer"}, {"type": "number"}]}, "$.oneOf"),
    ({"allOf": [{"type": "integer"}, {"minimum": 3}]}, "$.allOf"),
    ({"not": {"type": "integer"}}, "$.not"), ({"if": {"type": "integer"}, "then": {"minimum": 3}}, "$.if"),
    ({"type": "object", "properties": {"a": {}, "b": {}}, "dependentRequired": {"a": ["b"]}}, "$.dependentRequired"),
    ({"type": "number", "multipleOf": 0.5}, "$.multipleOf"),
    ({"type": "array", "items": {"type": "object", "properties": {"x": {"type": "number", "multipleOf": 0.1}}}},
     "$.items.properties.x.multipleOf"),
    ({"type": "array", "contains": {"type": "integer"}, "minContains": 2}, "$.minContains"),
    ({"type": "string", "format": "idn-email"}, "$.format"), ({"type": "string", "format": "regex"}, "$.format"),
    ({"type": "string", "contentEncoding": "base64"}, "$.contentEncoding"),
    ({"type": "string", "pattern": "^[a-z]+$", "maxLength": 3}, "$.maxLength"),
    ({"type": "string", "enum": ["abcd", "a"], "maxLength": 3}, "$.maxLength"),
    ({"type": "integer", "anyOf": [{"minimum": 3}, {"maximum": -3}]}, "$.type"),
    ({"$defs": {"a": {"type": "integer"}}, "$ref": "#/$defs/a", "minimum": 3}, "$.minimum"),
    ({"minLength": 3}, "$.minLength"), ({"minimum": 3}, "$.minimum"),
    ({"type": "object", "properties": {"a": {"type": "integer"}}, "required": ["b"]}, "$.required"),
    ({"type": "object", "properties": {"a b": {"type": "integer", "maxLenght": 3}}}, "$.properties['a b'].maxLenght"),
    ({"type": "integer", "enum": ["x"]}, "$.enum"),
]


@pytest.mark.parametrize("schema,where", REFUSED, ids=[w for _, w in REFUSED])
def test_unenforceable_keywords_are_refused_by_path(tiny, schema, where):
    jsonschema.Draft202012Validator.check_schema(schema)  # a valid schema: refused only for what we cannot enforce
    keyword = re.split(r"[.\[]", where)[-1].strip("'] ")
    with pytest.raises(InvalidRequestError) as e:
        tiny.check_request([1, 2], SamplingParams(structured=spec(schema, param="response_format.json_schema.schema")))
    assert e.value.param == "response_format.json_schema.schema"
    assert f"(at {where})" in e.value.message and keyword in e.value.message
    with pytest.raises(InvalidRequestError) as e:  # default param
        tiny.check_request([1, 2], SamplingParams(structured=spec(schema)))
    assert e.value.param == "structured.schema"


def refusal(engine, structured):
    with pytest.raises(InvalidRequestError) as e:
        engine.check_request([1, 2], SamplingParams(structured=structured))
    return e.value


def test_bad_specs_are_refused_before_any_work(tiny, tiny_model_factory):
    cases = [
        (spec({"type": "strnig"}), "structured.schema", "not a valid JSON Schema"),
        (spec({"type": "object", "properties": {"a": {"minimum": "x"}}}), "structured.schema", "$.properties.a.minimum"),
        (spec([1]), "structured.schema", "must be a JSON object"),
        (spec({"type": "integer", "exclusiveMinimum": 1.5}), "structured.schema", "does not compile"),
        ({"type": "regex", "pattern": "[a-z"}, "structured", "regex does not compile"),
        ({"type": "regex", "pattern": "(a|b){1,5000}", "param": "guided_regex"}, "guided_regex", "limit"),
        ({"type": "grammar", "grammar": "root ::= foo"}, "structured", 'Rule "foo" is not defined'),
        ({"type": "grammar", "syntax": "lark", "grammar": 'start: "a" | bar'}, "structured", "unknown name 'bar'"),
        ({"type": "grammar", "syntax": "peg", "grammar": "x"}, "structured", "ebnf or lark"),
        ({"type": "choice", "choices": []}, "structured", "non-empty"),
        ({"type": "choice", "choices": ["a", 1]}, "structured", "string"),
        ({"type": "xml"}, "structured", "must be one of"),
        ({"type": "json_object", "schema": {}}, "structured", "unknown field 'schema'"),
        ({"type": "tool_calls", "mode": "sometimes", "tags": [tool_tag("x", WEATHER)]}, "structured", "auto or required"),
        ({"type": "tool_calls", "mode": "auto", "triggers": ["<tool"], "tags": [tool_tag("x", WEATHER, begin="<fn>")]},
         "structured.triggers", "exactly one trigger"),
        ({"type": "tool_calls", "mode": "auto", "triggers": ["<t", "<tool"], "tags": [tool_tag("x", WEATHER)]},
         "structured.triggers", "exactly one trigger"),
        ({"type": "tool_calls", "mode": "required", "param": "tools",
          "tags": [tool_tag("x", WEATHER), {**tool_tag("y", {"type": "array", "uniqueItems": True}),
                                            "param": "tools[1].function.parameters"}]},
         "tools[1].function.parameters", "$.properties.arguments.uniqueItems"),
        ({"type": "tool_calls", "mode": "required", "tags": [tool_tag("x", {"type": "integer", "exclusiveMaximum": 0.5})]},
         "structured.tags[0].schema", "does not compile"),
        ({"type": "tool_calls", "mode": "required", "tags": [{"begin": "<a>", "end": "</a>"}]}, "structured.tags[0]",
         "'schema' is missing"),
    ]
    for structured, param, text in cases:
        err = refusal(tiny, structured)
        assert err.param == param and text in err.message, (structured, err.param, err.message)
    with pytest.raises(InvalidRequestError) as e:
        SamplingParams(structured="json").validate()
    assert e.value.param == "structured"
    small = LLMEngine(EngineConfig(model=tiny_model_factory("llama"), num_kv_blocks=64, block_size=8,
                                   max_grammar_bytes=200))
    err = refusal(small, spec(PERSON, param="response_format.json_schema.schema"))
    assert err.param == "response_format.json_schema.schema" and "over the limit of 200" in err.message
    with pytest.raises(InvalidRequestError):
        small.add_request([1, 2], SamplingParams(structured={"type": "regex", "pattern": "("}))
    assert not small.requests and small.allocator.all_free()
