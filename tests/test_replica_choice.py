"""Replica choice (serving.replica_choice): prefix affinity unless clearly busier, adapter residency, avoidance."""

from __future__ import annotations

import random

from serving.replica_choice import PREFIX_CHUNK_CHARS, PrefixMap, chunk_hashes, prompt_text, rank

SYSTEM = "You are the support assistant of ACME. " * 40  # a long shared system prompt (~1.5k characters)


def chat(system: str, user: str, adapter=None) -> dict:
    return {"kind": "chat", "adapter": adapter, "messages": [{"role": "system", "content": system},
                                                             {"role": "user", "content": user}]}


def test_prompts_sharing_a_prefix_share_its_chunk_hashes():
    a = chunk_hashes(prompt_text(chat(SYSTEM, "Where is my order?")))
    b = chunk_hashes(prompt_text(chat(SYSTEM, "Cancel it, please.")))
    shared = len(SYSTEM) // PREFIX_CHUNK_CHARS
    assert a[:shared] == b[:shared] and len(a) >= shared
    assert chunk_hashes(prompt_text(chat(SYSTEM, "x", adapter="sql")))[0] != a[0]  # adapters cache apart
    assert chunk_hashes(prompt_text({"kind": "completion", "prompt": "short"})) == []


def test_the_longest_remembered_prefix_wins_and_dead_replicas_are_forgotten():
    m = PrefixMap(max_entries=1000)
    a = chunk_hashes(prompt_text(chat(SYSTEM, "first question " * 30)))
    m.record(a[:2], "r1")
    m.record(a, "r2")
    b = chunk_hashes(prompt_text(chat(SYSTEM, "another question")))
    assert m.lookup(b, lambda r: True) == ("r2", len(b))
    assert m.lookup(b, lambda r: r != "r2") == (None, 0)  # r2 overwrote the shared chunks
    m.record(a[:3], "r1")
    assert m.lookup(a, lambda r: r != "r2") == ("r1", 3)
    m.forget("r1")
    assert m.lookup(a, lambda r: r != "r2") == (None, 0)
    small = PrefixMap(max_entries=4)
    small.record(a, "r1")
    assert len(small.entries) == 4  # LRU-bounded


def test_affinity_unless_clearly_busier():
    ids = ["r1", "r2", "r3"]
    loads = {"r1": 10, "r2": 3, "r3": 4}
    assert rank(ids, loads.get, "prefix", "r1")[0] == ["r1"]  # 10 vs 3: not clearly busier (needs > 8 more)
    loads["r1"] = 20
    assert len(rank(ids, loads.get, "prefix", "r1")[0]) == 2  # clearly busier: power of two choices
    assert len(rank(ids, loads.get, "pow2", "r2")[0]) == 2  # pow2 ignores affinity
    random.seed(0)
    picks = {tuple(sorted(rank(ids, loads.get, "pow2", None)[0])) for _ in range(50)}
    assert all(len(p) == 2 for p in picks) and len(picks) == 3  # two random replicas, Serve probes both


def test_adapter_residency_comes_first_while_not_clearly_busier():
    ids = ["r1", "r2"]
    on = {"r1": False, "r2": True}.get
    assert rank(ids, {"r1": 0, "r2": 5}.get, "prefix", "r1", on)[0] == ["r2"]
    assert rank(ids, {"r1": 0, "r2": 30}.get, "prefix", "r1", on)[0] == ["r1"]  # holder clearly busier
