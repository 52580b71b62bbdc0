"""The sampler on hand-made logits: penalties against their formulas (HF repetition penalty, OpenAI presence and
frequency penalties), rows without penalties untouched, logprobs only when asked for."""

import torch

from serving.engine.sampler import sample
from serving.engine.sampling import SamplingParams
from serving.engine.sequence import Sequence


def _seq(i, prompt, output, **params):
    return Sequence(i, f"r{i}", 0, list(prompt) + list(output), len(prompt), SamplingParams(temperature=0, **params))


def test_penalties_follow_their_formulas_and_leave_other_rows_and_the_logits_alone():
    logits = torch.tensor([[4.0, 3.0, -1.0, 2.9, 0.0],
                           [4.0, 3.0, -1.0, 2.9, 0.0],
                           [4.0, 3.0, -1.0, 2.9, 0.0]])
    original = logits.clone()
    seqs = [
        _seq(0, [0, 2], [], repetition_penalty=2.0),  # 4 -> 2 and -1 -> -2: token 1 (3.0) wins
        _seq(1, [1], [0, 0, 3], presence_penalty=0.5, frequency_penalty=0.75),  # 4 - 0.5 - 1.5 = 2: token 1 wins
        _seq(2, [0], [0]),  # no penalty: the raw argmax
    ]
    tokens, logprobs = sample(logits, seqs)
    assert tokens == [1, 1, 0]
    assert logprobs is None  # nobody asked for logprobs: the full-vocabulary log-softmax is skipped
    assert torch.equal(logits, original)  # penalties work on a copy


def test_logprobs_are_the_raw_distribution_when_asked_for():
    logits = torch.randn(2, 7, generator=torch.Generator().manual_seed(0))
    seqs = [_seq(0, [1], [], logprobs=2, repetition_penalty=1.5), _seq(1, [2], [])]
    tokens, logprobs = sample(logits, seqs)
    torch.testing.assert_close(logprobs, torch.log_softmax(logits, dim=-1))
    assert tokens[1] == int(logits[1].argmax())
