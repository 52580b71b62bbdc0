"""Training data: formats, label masking, length policy, packing, and errors that name file and line."""

import json

import pytest
import torch
from transformers import AutoTokenizer

from serving.models import resolve_model
from training.config import DatasetSpec
from training.data import (
    IGNORE,
    DataError,
    build_examples,
    collate,
    pack,
    read_records,
    split_eval,
)
from training.testing import make_tiny_llama, qa_records, write_jsonl


@pytest.fixture(scope="module")
def tok():
    return AutoTokenizer.from_pretrained(resolve_model("smollm2-135m-instruct"))


def _build(tok, specs, **kw):
    opts = dict(chat_template=None, train_on_inputs=False, sequence_len=256, excess_length_strategy="truncate")
    opts.update(kw)
    return build_examples(specs, tok, **opts)


def _trained_text(tok, ex):
    return tok.decode([i for i, lab in zip(ex.input_ids, ex.labels) if lab != IGNORE])


def test_chat_labels_cover_only_assistant_turns(tok, tmp_path):
    rec = {"messages": [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Capital of Peru?"},
                        {"role": "assistant", "content": "Lima."}, {"role": "user", "content": "And Chile?"},
                        {"role": "assistant", "content": "Santiago."}]}
    path = write_jsonl(tmp_path / "c.jsonl", [rec])
    (ex,) = _build(tok, [DatasetSpec(path=path, type="chat")])
    assert tok.decode(ex.input_ids) == tok.apply_chat_template(rec["messages"], tokenize=False)
    assert _trained_text(tok, ex) == "Lima.<|im_end|>\nSantiago.<|im_end|>\n"
    (full,) = _build(tok, [DatasetSpec(path=path, type="chat")], train_on_inputs=True)
    assert full.labels == full.input_ids


def test_alpaca_completion_csv_and_saved_hf_dataset(tok, tmp_path):
    import datasets

    alp = write_jsonl(tmp_path / "a.jsonl", [{"instruction": "Add", "input": "2 and 3", "output": "5"}])
    (ex,) = _build(tok, [DatasetSpec(path=alp, type="alpaca")])
    assert "Add\n\n2 and 3" in tok.decode(ex.input_ids) and _trained_text(tok, ex) == "5<|im_end|>\n"

    comp = write_jsonl(tmp_path / "p.jsonl", [{"prompt": "The sky is", "completion": " blue"}])
    (ex,) = _build(tok, [DatasetSpec(path=comp, type="completion")])
    assert tok.decode(ex.input_ids) == "The sky is blue" + tok.eos_token
    assert _trained_text(tok, ex) == " blue" + tok.eos_token

    csv_path = tmp_path / "t.csv"
    csv_path.write_text("instruction,input,output\nSay hi,,hello\n")
    (ex,) = _build(tok, [DatasetSpec(path=str(csv_path), type="alpaca")])
    assert _trained_text(tok, ex) == "hello<|im_end|>\n"

    datasets.Dataset.from_list(qa_records(3)).save_to_disk(str(tmp_path / "hf"))
    exs = _build(tok, [DatasetSpec(path=str(tmp_path / "hf"), type="chat")])
    assert [e.where for e in exs] == ["hf[row 0]", "hf[row 1]", "hf[row 2]"]
    assert _trained_text(tok, exs[2]) == "Code 2 is 17 blue widgets.<|im_end|>\n"


def test_errors_name_the_file_and_line(tok, tmp_path):
    bad = tmp_path / "bad.jsonl"
    bad.write_text(json.dumps(qa_records(1)[0]) + "\n\n" + '{"messages": [}\n')
    with pytest.raises(DataError, match=r"bad\.jsonl:3: invalid JSON"):
        _build(tok, [DatasetSpec(path=str(bad))])
    with pytest.raises(DataError, match="does not exist"):
        _build(tok, [DatasetSpec(path=str(tmp_path / "nope.jsonl"))])
    (tmp_path / "empty.jsonl").write_text("\n")
    with pytest.raises(DataError, match="empty.jsonl' is empty"):
        _build(tok, [DatasetSpec(path=str(tmp_path / "empty.jsonl"))])
    wrong = write_jsonl(tmp_path / "w.jsonl", [qa_records(1)[0], {"messages": [{"role": "robot", "content": "x"}]}])
    with pytest.raises(DataError, match=r"w\.jsonl:2: messages\[0\]\.role must be one of"):
        _build(tok, [DatasetSpec(path=wrong)])
    alp = write_jsonl(tmp_path / "al.jsonl", [{"instruction": "x"}])
    with pytest.raises(DataError, match=r"al\.jsonl:1: missing field 'output'"):
        _build(tok, [DatasetSpec(path=alp, type="alpaca")])
    (tmp_path / "notes.txt").write_text("hello")
    with pytest.raises(DataError, match="unsupported file type '.txt'"):
        list(read_records(str(tmp_path / "notes.txt")))


def test_long_examples_truncate_drop_or_error(tok, tmp_path):
    long_answer = "word " * 200
    recs = qa_records(2) + [{"messages": [{"role": "user", "content": "Long?"},
                                          {"role": "assistant", "content": long_answer}]}]
    path = write_jsonl(tmp_path / "l.jsonl", recs)
    spec = [DatasetSpec(path=path)]
    exs = _build(tok, spec, sequence_len=64, excess_length_strategy="truncate")
    assert len(exs) == 3 and len(exs[2].input_ids) == 64 and exs[2].truncated
    assert len(_build(tok, spec, sequence_len=64, excess_length_strategy="drop")) == 2
    with pytest.raises(DataError, match=r"l\.jsonl:3: example is \d+ tokens, longer than sequence_len=64"):
        _build(tok, spec, sequence_len=64, excess_length_strategy="error")
    with pytest.raises(DataError, match="every example was dropped"):
        _build(tok, [DatasetSpec(path=write_jsonl(tmp_path / "o.jsonl", recs[2:]))], sequence_len=64,
               excess_length_strategy="drop")


def test_split_eval_is_seeded_and_disjoint(tok, tmp_path):
    exs = _build(tok, [DatasetSpec(path=write_jsonl(tmp_path / "q.jsonl", qa_records(10)))])
    tr, ev = split_eval(exs, 0.2, seed=3)
    tr2, ev2 = split_eval(exs, 0.2, seed=3)
    assert len(ev) == 2 and len(tr) == 8 and [e.where for e in ev] == [e.where for e in ev2]
    assert not {e.where for e in tr} & {e.where for e in ev}
    with pytest.raises(DataError, match="leaves no training examples"):
        split_eval(exs, 10, seed=0)


def test_packed_rows_give_the_same_loss_as_separate_examples(tok, tmp_path):
    """Packing must not let examples attend to each other: per-token losses match unpacked forward passes."""
    from transformers import AutoModelForCausalLM

    from training.evaluate import token_loss_sum

    model = AutoModelForCausalLM.from_pretrained(make_tiny_llama(tmp_path / "tiny")).eval()
    exs = _build(tok, [DatasetSpec(path=write_jsonl(tmp_path / "q.jsonl", qa_records(5)))], train_on_inputs=True)
    rows = pack(exs, sequence_len=200)
    assert len(rows) < len(exs) and sum(len(r.input_ids) for r in rows) == sum(len(e.input_ids) for e in exs)
    with torch.no_grad():
        packed = sum(float(token_loss_sum(model, collate([r], tok.pad_token_id))[0]) for r in rows)
        # reference: HF's own loss (mean over labelled tokens) on each example alone
        separate = sum(float(model(input_ids=torch.tensor([e.input_ids]), labels=torch.tensor([e.labels])).loss)
                       * sum(1 for lab in e.labels[1:] if lab != IGNORE) for e in exs)
        n_packed = sum(token_loss_sum(model, collate([r], tok.pad_token_id))[1] for r in rows)
    assert n_packed == sum(len(e.input_ids) - 1 for e in exs)
    assert packed == pytest.approx(separate, rel=1e-4)
