"""A request resumed on another engine from the tokens already delivered continues exactly where it stopped.

This is what mid-stream failover (serving.api.failover) rests on: for every cut point of a stream, the text and
tokens delivered before the cut plus what a fresh engine produces with `resume` equal the uninterrupted run,
for greedy and seeded sampling, penalties, grammars, stop strings (also while a stop string's first half is held
back) and several choices of which some already finished.
"""

import pytest

from serving.engine import EngineConfig, InvalidRequestError, SamplingParams
from serving.engine.llm_engine import LLMEngine

PROMPT = "The river runs past the old stone mill, and the miller says"


@pytest.fixture(scope="module")
def engines(tiny_model_factory):
    path = tiny_model_factory("llama")
    return LLMEngine(EngineConfig(model=path, dtype="float32", num_kv_blocks=256, block_size=8)), \
        LLMEngine(EngineConfig(model=path, dtype="float32", num_kv_blocks=256, block_size=8))


def run(engine, params, resume=None):
    """The request's stream as (choice, token ids, text, finish_reason) events, one per choice per step."""
    engine.add_request(PROMPT, params, resume=resume)
    events = []
    while engine.has_unfinished():
        for out in engine.step():
            events += [(c.index, list(c.token_ids), c.text, c.finish_reason) for c in out.outputs]
    return events


def whole(events):
    out: dict[int, list] = {}
    for i, ids, text, reason in events:
        ids0, text0, _ = out.get(i, ([], "", None))
        out[i] = (ids0 + ids, text0 + text, reason)
    return out


def check_every_cut(a, b, params, cuts=None):
    full = run(a, params)
    expected = whole(full)
    for m in cuts or range(1, len(full)):
        delivered = whole(full[:m])
        resume = {i: ids for i, (ids, _, reason) in delivered.items() if reason is None}
        resume.update({i: [] for i in range(params.n) if i not in delivered})
        if not resume:
            continue
        rest = whole(run(b, params, resume))
        assert set(rest) == set(resume), m
        for i in resume:
            ids, text, reason = delivered.get(i, ([], "", None))
            assert (ids + rest[i][0], text + rest[i][1], rest[i][2]) == expected[i], (m, i)
    assert a.allocator.all_free() and b.allocator.all_free()
    return expected


def test_greedy_and_seeded_sampling_resume_exactly(engines):
    a, b = engines
    check_every_cut(a, b, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    sampled = SamplingParams(temperature=1.0, top_p=0.9, top_k=50, seed=7, max_tokens=16, ignore_eos=True,
                             frequency_penalty=0.5)
    texts = check_every_cut(a, b, sampled)
    assert texts != whole(run(a, SamplingParams(**{**sampled.__dict__, "seed": 8})))  # the seed matters


def test_choices_that_finished_stay_finished(engines):
    a, b = engines
    params = SamplingParams(n=3, temperature=1.0, seed=3, max_tokens=12, stop=["e"])  # choices stop at different steps
    expected = check_every_cut(a, b, params)
    assert len({v[1] for v in expected.values()}) > 1


def test_stop_strings_held_back_across_the_cut(engines):
    a, b = engines
    greedy = SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)
    text = whole(run(a, greedy))[0][1]
    stop = text[len(text) // 2:len(text) // 2 + 4]
    expected = check_every_cut(a, b, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop]))
    assert expected[0][2] == "stop" and not expected[0][1].endswith(stop)


def test_grammar_state_replays(engines):
    a, b = engines
    schema = {"type": "object", "properties": {"name": {"type": "string", "maxLength": 8},
                                               "age": {"type": "integer"}}, "required": ["name", "age"]}
    params = SamplingParams(temperature=1.0, seed=5, max_tokens=40,
                            structured={"type": "json_schema", "schema": schema})
    check_every_cut(a, b, params, cuts=[1, 3, 6, 10])


def test_resume_is_checked(engines):
    a, _ = engines
    params = SamplingParams(temperature=0, max_tokens=4)
    with pytest.raises(InvalidRequestError, match="choice 2"):
        a.add_request(PROMPT, params, resume={2: []})
    with pytest.raises(InvalidRequestError, match="already reached its length"):
        a.add_request(PROMPT, params, resume={0: [1, 2, 3, 4]})
    with pytest.raises(InvalidRequestError, match="vocabulary"):
        a.add_request(PROMPT, params, resume={0: [10**9]})
    assert not a.has_unfinished()
