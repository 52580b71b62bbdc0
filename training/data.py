"""Training data: load JSONL/JSON/CSV files or saved HF datasets, format (chat/alpaca/completion), tokenise,
mask labels, truncate or refuse long examples, pack, and batch.

Chat records may use OpenAI's fine-tuning format with tools: a `tools` list, assistant messages with
`tool_calls` (content may be null) and `tool` messages with `tool_call_id`. They are checked by the same code
as API requests (serving.api.tools) and rendered by the same function (serving.api.tool_prompt.render_chat), so
a fine-tuned model learns exactly the call format the server parses.

Every error names the file and line (or row) it came from.
"""

from __future__ import annotations

import csv
import hashlib
import json
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

from serving.api.errors import APIError
from serving.api.tool_prompt import render_chat
from serving.api.tools import check_messages, parse_tool_request

IGNORE = -100
ROLES = ("system", "user", "assistant", "tool")

CHATML_TEMPLATE = (
    "{% for message in messages %}{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>\n' }}"
    "{% endfor %}{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


class DataError(ValueError):
    """Bad training data: the message names the file and line (or row)."""


@dataclass
class Example:
    input_ids: list[int]
    labels: list[int]
    where: str  # "file.jsonl:12" (or "file+file" for packed rows)
    position_ids: list[int] | None = None  # set on packed rows: restarts at 0 for each example
    truncated: bool = False


@dataclass
class DataStats:
    examples: int = 0
    truncated: int = 0
    dropped: int = 0
    tokens: int = 0
    trainable_tokens: int = 0
    notes: list[str] = field(default_factory=list)


# ---------------------------------------------------------------- reading
def read_records(path: str, split: str | None = None) -> Iterator[tuple[str, dict]]:
    """Yield (location, record) from a .jsonl/.json/.csv file or a datasets.save_to_disk folder."""
    p = Path(path)
    if not p.exists():
        raise DataError(f"dataset {path!r} does not exist")
    if p.is_dir():
        yield from _read_hf(p, split)
        return
    suffix = p.suffix.lower()
    if suffix in (".jsonl", ".ndjson"):
        with p.open(encoding="utf-8") as fh:
            for lineno, line in enumerate(fh, 1):
                if not line.strip():
                    continue
                try:
                    rec = json.loads(line)
                except json.JSONDecodeError as exc:
                    raise DataError(f"{p.name}:{lineno}: invalid JSON ({exc.msg} at column {exc.colno})") from None
                if not isinstance(rec, dict):
                    raise DataError(f"{p.name}:{lineno}: expected a JSON object, got {type(rec).__name__}")
                yield f"{p.name}:{lineno}", rec
    elif suffix == ".json":
        try:
            data = json.loads(p.read_text(encoding="utf-8"))
        except json.JSONDecodeError as exc:
            raise DataError(f"{p.name}:{exc.lineno}: invalid JSON ({exc.msg})") from None
        if not isinstance(data, list):
            raise DataError(f"{p.name}: a .json dataset must be a list of objects (use .jsonl for one per line)")
        for i, rec in enumerate(data):
            if not isinstance(rec, dict):
                raise DataError(f"{p.name}[{i}]: expected a JSON object, got {type(rec).__name__}")
            yield f"{p.name}[{i}]", rec
    elif suffix in (".csv", ".tsv"):
        with p.open(encoding="utf-8", newline="") as fh:
            reader = csv.DictReader(fh, delimiter="\t" if suffix == ".tsv" else ",")
            for rec in reader:
                yield f"{p.name}:{reader.line_num}", dict(rec)
    else:
        raise DataError(f"dataset {path!r}: unsupported file type {suffix!r} (use .jsonl, .json, .csv or a saved HF dataset)")


def _read_hf(p: Path, split: str | None) -> Iterator[tuple[str, dict]]:
    import datasets

    try:
        ds = datasets.load_from_disk(str(p))
    except Exception as exc:  # noqa: BLE001 - any failure here means "not a saved dataset"
        raise DataError(f"dataset folder {str(p)!r} is not a saved HF dataset: {exc}") from None
    if isinstance(ds, datasets.DatasetDict):
        name = split or "train"
        if name not in ds:
            raise DataError(f"dataset {str(p)!r} has no split {name!r} (has {sorted(ds)})")
        ds = ds[name]
    for i, rec in enumerate(ds):
        yield f"{p.name}[row {i}]", dict(rec)


# ---------------------------------------------------------------- formatting
def _need_str(rec: dict, key: str, where: str, optional: bool = False) -> str:
    value = rec.get(key)
    if value is None and optional:
        return ""
    if not isinstance(value, str):
        missing = key not in rec
        raise DataError(f"{where}: {'missing field' if missing else 'field'} {key!r}"
                        f"{'' if missing else ' must be a string'}")
    return value


def _json_cell(rec: dict, key: str, where: str):
    value = rec.get(key)
    if isinstance(value, str):  # CSV cells hold JSON text
        try:
            return json.loads(value)
        except json.JSONDecodeError:
            raise DataError(f"{where}: field {key!r} is not valid JSON") from None
    return value


def to_tools(rec: dict, kind: str, where: str) -> list[dict] | None:
    """A chat record's `tools` (OpenAI's function tools), checked as the API checks them; None without tools."""
    if kind != "chat" or rec.get("tools") is None:
        return None
    try:
        req = parse_tool_request(_json_cell(rec, "tools", where))
    except APIError as exc:
        raise DataError(f"{where}: {exc.message}") from None
    return req.tools if req is not None else None


def to_messages(rec: dict, kind: str, where: str) -> list[dict]:
    """Chat and alpaca records as chat messages (alpaca: instruction + input as the user turn)."""
    if kind == "alpaca":
        instruction = _need_str(rec, "instruction", where)
        extra = _need_str(rec, "input", where, optional=True)
        output = _need_str(rec, "output", where)
        user = f"{instruction}\n\n{extra}" if extra.strip() else instruction
        return [{"role": "user", "content": user}, {"role": "assistant", "content": output}]
    messages = _json_cell(rec, "messages", where)
    if "messages" not in rec:
        raise DataError(f"{where}: missing field 'messages' (type: chat expects {{\"messages\": [...]}})")
    if not isinstance(messages, list) or not messages:
        raise DataError(f"{where}: 'messages' must be a non-empty list")
    out = []
    for i, m in enumerate(messages):
        if not isinstance(m, dict):
            raise DataError(f"{where}: messages[{i}] must be an object with role and content")
        role, content = m.get("role"), m.get("content")
        if role not in ROLES:
            raise DataError(f"{where}: messages[{i}].role must be one of {list(ROLES)}, got {role!r}")
        calls = m.get("tool_calls")
        if content is None and role == "assistant" and calls:
            content = ""  # an assistant turn that only calls tools
        if not isinstance(content, str):
            raise DataError(f"{where}: messages[{i}].content must be a string")
        msg = {"role": role, "content": content}
        if calls is not None:
            msg["tool_calls"] = calls
        if m.get("tool_call_id") is not None:
            msg["tool_call_id"] = m["tool_call_id"]
        out.append(msg)
    try:  # a conversation may end on the assistant's calls: that is what it learns to make
        return check_messages(out, require_responses=False)
    except APIError as exc:
        raise DataError(f"{where}: {exc.message}") from None


def resolve_chat_template(tokenizer, chat_template: str | None) -> str:
    if chat_template is None:
        if not getattr(tokenizer, "chat_template", None):
            raise DataError("the tokenizer has no chat template: set chat_template: chatml (or a Jinja template)")
        return tokenizer.chat_template
    if chat_template == "chatml":
        return CHATML_TEMPLATE
    if chat_template.endswith(".jinja"):
        p = Path(chat_template)
        if not p.is_file():
            raise DataError(f"chat_template file {chat_template!r} does not exist")
        return p.read_text()
    return chat_template


def _render(tokenizer, template: str, messages: list[dict], add_generation_prompt: bool = False,
            tools: list[dict] | None = None) -> str:
    return render_chat(tokenizer, messages, tools, add_generation_prompt=add_generation_prompt,
                       chat_template=template)


def tokenize_chat(tokenizer, template: str, messages: list[dict], train_on_inputs: bool,
                  tools: list[dict] | None = None) -> tuple[list[int], list[int]]:
    """Render the conversation; labels cover the assistant turns (their text, tool calls and end-of-turn
    tokens), not tool results: a turn's span runs from the end of the prompt before it to its own end."""
    text = _render(tokenizer, template, messages, tools=tools)
    spans = []
    for i, m in enumerate(messages):
        if m["role"] != "assistant":
            continue
        start = len(_render(tokenizer, template, messages[:i], add_generation_prompt=True, tools=tools)) if i else 0
        end = len(_render(tokenizer, template, messages[: i + 1], tools=tools))
        spans.append((start, end))
    enc = tokenizer(text, add_special_tokens=False, return_offsets_mapping=True)
    ids = list(enc["input_ids"])
    if train_on_inputs:
        return ids, list(ids)
    labels = [IGNORE] * len(ids)
    for k, (s, _e) in enumerate(enc["offset_mapping"]):
        if any(a <= s < b for a, b in spans):
            labels[k] = ids[k]
    return ids, labels


def tokenize_completion(tokenizer, prompt: str, completion: str, train_on_inputs: bool) -> tuple[list[int], list[int]]:
    p = tokenizer(prompt, add_special_tokens=True)["input_ids"]
    c = tokenizer(completion, add_special_tokens=False)["input_ids"]
    if tokenizer.eos_token_id is not None and (not c or c[-1] != tokenizer.eos_token_id):
        c = [*c, tokenizer.eos_token_id]
    ids = list(p) + list(c)
    labels = list(ids) if train_on_inputs else [IGNORE] * len(p) + list(c)
    return ids, labels


def prompt_text(tokenizer, template: str | None, rec: dict, kind: str, where: str) -> str:
    """The prompt a model sees for a record (for sample generations): everything before the last answer."""
    if kind == "completion":
        return _need_str(rec, "prompt", where)
    messages = to_messages(rec, kind, where)
    last = max((i for i, m in enumerate(messages) if m["role"] == "assistant"), default=len(messages))
    return _render(tokenizer, template, messages[:last], add_generation_prompt=True,
                   tools=to_tools(rec, kind, where))


def reference_answer(rec: dict, kind: str) -> str:
    if kind == "completion":
        return rec.get("completion", "")
    if kind == "alpaca":
        return rec.get("output", "")
    answers = [m.get("content") or "" for m in rec.get("messages", [])
               if isinstance(m, dict) and m.get("role") == "assistant"]
    return answers[-1] if answers else ""


# ---------------------------------------------------------------- building
def build_examples(specs, tokenizer, *, chat_template: str | None, train_on_inputs: bool, sequence_len: int,
                   excess_length_strategy: str, stats: DataStats | None = None) -> list[Example]:
    """Tokenise every record of every dataset spec into masked examples, applying the length policy."""
    stats = stats if stats is not None else DataStats()
    template = None
    out: list[Example] = []
    for spec in specs:
        count = 0
        for where, rec in read_records(spec.path, spec.split):
            count += 1
            if spec.type == "completion":
                ids, labels = tokenize_completion(tokenizer, _need_str(rec, "prompt", where),
                                                  _need_str(rec, "completion", where), train_on_inputs)
            else:
                template = template or resolve_chat_template(tokenizer, chat_template)
                ids, labels = tokenize_chat(tokenizer, template, to_messages(rec, spec.type, where), train_on_inputs,
                                            tools=to_tools(rec, spec.type, where))
            ex = Example(ids, labels, where)
            if len(ids) > sequence_len:
                if excess_length_strategy == "error":
                    raise DataError(f"{where}: example is {len(ids)} tokens, longer than sequence_len={sequence_len} "
                                    "(raise sequence_len, or set excess_length_strategy: truncate or drop)")
                if excess_length_strategy == "drop":
                    stats.dropped += 1
                    continue
                ex = Example(ids[:sequence_len], labels[:sequence_len], where, truncated=True)
                stats.truncated += 1
            if all(lab == IGNORE for lab in ex.labels):
                stats.dropped += 1
                stats.notes.append(f"{where}: no trainable tokens (no assistant answer within sequence_len); skipped")
                continue
            out.append(ex)
        if count == 0:
            raise DataError(f"dataset {spec.path!r} is empty")
    if not out:
        raise DataError("no usable training examples: every example was dropped (see excess_length_strategy)")
    stats.examples += len(out)
    stats.tokens += sum(len(e.input_ids) for e in out)
    stats.trainable_tokens += sum(sum(1 for lab in e.labels if lab != IGNORE) for e in out)
    return out


def split_eval(examples: list[Example], val_set_size: float, seed: int) -> tuple[list[Example], list[Example]]:
    if not val_set_size:
        return examples, []
    n = len(examples)
    n_eval = int(val_set_size) if val_set_size >= 1 else max(1, round(val_set_size * n))
    if n_eval >= n:
        raise DataError(f"val_set_size={val_set_size} leaves no training examples out of {n}")
    order = list(range(n))
    random.Random(seed).shuffle(order)
    held = set(order[:n_eval])
    return [e for i, e in enumerate(examples) if i not in held], [e for i, e in enumerate(examples) if i in held]


def pack(examples: list[Example], sequence_len: int) -> list[Example]:
    """Concatenate examples (in order) into rows of at most sequence_len tokens; position_ids restart per
    example, which transformers turns into a block-diagonal causal mask, so examples never attend to each other."""
    rows: list[Example] = []
    cur = Example([], [], "", position_ids=[])
    for ex in examples:
        if cur.input_ids and len(cur.input_ids) + len(ex.input_ids) > sequence_len:
            rows.append(cur)
            cur = Example([], [], "", position_ids=[])
        cur.input_ids += ex.input_ids
        cur.labels += [IGNORE, *ex.labels[1:]]  # never predict an example's first token from the previous one
        cur.position_ids += list(range(len(ex.input_ids)))
        cur.where = f"{cur.where}+{ex.where}" if cur.where else ex.where
    if cur.input_ids:
        rows.append(cur)
    return rows


def collate(batch: list[Example], pad_id: int):
    """Right-pad a micro-batch into tensors. Packed rows get position_ids and no attention_mask."""
    import torch

    width = max(len(e.input_ids) for e in batch)
    ids = torch.full((len(batch), width), pad_id, dtype=torch.long)
    labels = torch.full((len(batch), width), IGNORE, dtype=torch.long)
    packed = batch[0].position_ids is not None
    attn = torch.zeros((len(batch), width), dtype=torch.long)
    pos = torch.zeros((len(batch), width), dtype=torch.long)
    for i, e in enumerate(batch):
        n = len(e.input_ids)
        ids[i, :n] = torch.tensor(e.input_ids)
        labels[i, :n] = torch.tensor(e.labels)
        attn[i, :n] = 1
        if packed:
            pos[i, :n] = torch.tensor(e.position_ids)
            pos[i, n:] = torch.arange(width - n)  # padding forms its own (masked-out) segment
    out = {"input_ids": ids, "labels": labels}
    if packed:
        out["position_ids"] = pos
    else:
        out["attention_mask"] = attn
    return out


def dataset_hash(specs) -> str:
    """sha256 over each dataset's type and bytes (files) or its saved files (folders)."""
    h = hashlib.sha256()
    for spec in specs:
        h.update(f"{spec.type}|{spec.split}|".encode())
        p = Path(spec.path)
        files = sorted(f for f in p.rglob("*") if f.is_file()) if p.is_dir() else [p]
        for f in files:
            if f.exists():
                h.update(f.read_bytes())
    return h.hexdigest()
