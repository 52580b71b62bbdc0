"""The stored responses of the Responses API (serving.api.response_store) on a real SQLite file: round trips,
conversations through previous_response_id, owners, expiry, deletion, pagination, concurrent writers."""

from __future__ import annotations

import multiprocessing
import sqlite3
import threading

import pytest

from serving.api.errors import APIError
from serving.api.response_items import normalize_input, output_items
from serving.api.response_store import (
    DEFAULT_TTL_S,
    ResponseNotFoundError,
    ResponseStore,
    new_response_id,
    owner_of,
)
from serving.governance.keys import ANONYMOUS, Principal

DAY = 24 * 3600.0


class Clock:
    def __init__(self, now: float = 1_700_000_000.0):
        self.now = now

    def __call__(self) -> float:
        return self.now


@pytest.fixture
def clock():
    return Clock()


@pytest.fixture
def store(tmp_path, clock):
    s = ResponseStore(tmp_path / "responses.sqlite3", clock=clock)
    yield s
    s.close()


def response(text: str, model: str = "tiny", **extra) -> dict:
    return {"id": new_response_id(), "object": "response", "created_at": 1_700_000_000, "status": "completed",
            "model": model, "output": output_items(text), **extra}


def turn(store: ResponseStore, question: str, answer: str, owner: str | None, previous: str | None = None):
    """One stored turn, as the gateway stores it: the normalised input and the response with its output."""
    items = normalize_input(question)
    r = response(answer, previous_response_id=previous)
    store.put(r, items, owner, previous)
    return r, items


def texts(items: list[dict]) -> list[str]:
    return [p["text"] for i in items for p in i["content"]]


# ---------------------------------------------------------------- round trips
def test_put_get_round_trip(store, clock):
    items = normalize_input([{"role": "developer", "content": "terse"}, {"role": "user", "content": "hi"}])
    r = response("Hello.", usage={"input_tokens": 3, "output_tokens": 2}, metadata={"k": "v ✓"})
    expires = store.put(r, items, "team-a")
    assert expires == clock.now + DEFAULT_TTL_S
    assert store.get(r["id"], "team-a") == r
    assert store.require(r["id"], "team-a") == r
    page = store.input_items(r["id"], "team-a", order="asc")
    assert page["data"] == items
    assert r["id"].startswith("resp_") and len(r["id"]) == 5 + 48


def test_no_owner_is_one_shared_owner(store):
    r, _ = turn(store, "q", "a", None)
    assert store.get(r["id"], None)["id"] == r["id"]
    assert store.get(r["id"], "team-a") is None  # a team does not see open-access responses, nor they its
    assert owner_of(None) is None and owner_of(ANONYMOUS) is None
    assert owner_of(Principal(key_id="k1", name="n", team="research", role="user")) == "research"


def test_put_refuses_duplicates_and_unnormalised_items(store):
    r, items = turn(store, "q", "a", "t")
    with pytest.raises(ValueError, match="already stored"):
        store.put(r, items, "t")
    with pytest.raises(ValueError, match="unique ids"):
        store.put(response("a"), [{"type": "message", "role": "user", "content": "raw"}], "t")
    with pytest.raises(ValueError, match="unique ids"):
        store.put(response("a"), items + items, "t")
    with pytest.raises(ValueError, match="resp_"):
        store.put({"id": "chatcmpl-1", "model": "m"}, [], "t")
    with pytest.raises(ValueError, match="owner"):
        store.put(response("a"), [], "")
    assert store.get(r["id"], "t") == r  # the refused puts changed nothing


def test_default_location_is_the_data_directory(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAPLEX_HOME", str(tmp_path / "home"))
    s = ResponseStore()
    try:
        assert s.path == tmp_path / "home" / "responses" / "responses.sqlite3" and s.path.exists()
        assert sqlite3.connect(s.path).execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    finally:
        s.close()


# ---------------------------------------------------------------- conversations
def test_three_turn_conversation(store):
    r1, _ = turn(store, "My name is Ada.", "Hello Ada.", "t")
    r2, _ = turn(store, "What is 2+2?", "4.", "t", r1["id"])
    r3, _ = turn(store, "What is my name?", "Ada.", "t", r2["id"])
    history = store.conversation(r3["id"], "t")
    assert texts(history) == ["My name is Ada.", "Hello Ada.", "What is 2+2?", "4.", "What is my name?", "Ada."]
    assert [i["role"] for i in history] == ["user", "assistant"] * 3
    assert texts(store.conversation(r1["id"], "t")) == ["My name is Ada.", "Hello Ada."]
    assert store.input_items(r3["id"], "t")["data"][0]["content"][0]["text"] == "What is my name?"  # its turn only


def test_conversation_keeps_function_calls_in_order(store):
    calls = [{"id": "call_1", "function": {"name": "get_weather", "arguments": '{"city":"Oslo"}'}}]
    items1 = normalize_input("Weather in Oslo?")
    r1 = {**response(""), "output": output_items(None, calls)}
    store.put(r1, items1, "t")
    items2 = normalize_input([{"type": "function_call_output", "call_id": "call_1", "output": "9C"}])
    r2 = response("It is 9C.", previous_response_id=r1["id"])
    store.put(r2, items2, "t", r1["id"])
    history = store.conversation(r2["id"], "t")
    assert [i["type"] for i in history] == ["message", "function_call", "function_call_output", "message"]
    assert history[1]["call_id"] == history[2]["call_id"] == "call_1"


def test_missing_link_in_the_chain(store):
    r1, _ = turn(store, "one", "1", "t")
    r2, _ = turn(store, "two", "2", "t", r1["id"])
    r3, _ = turn(store, "three", "3", "t", r2["id"])
    assert store.delete(r2["id"], "t")
    with pytest.raises(ResponseNotFoundError) as info:
        store.conversation(r3["id"], "t")
    err = info.value
    assert (err.status, err.param, err.code) == (400, "previous_response_id", "previous_response_not_found")
    assert r2["id"] in err.message and r3["id"] in err.message
    assert store.get(r3["id"], "t") is not None  # the later turn itself is still there
    assert texts(store.conversation(r1["id"], "t")) == ["one", "1"]


def test_conversation_of_an_unknown_response(store):
    with pytest.raises(ResponseNotFoundError) as info:
        store.conversation("resp_" + "0" * 48, "t")
    assert (info.value.status, info.value.param, info.value.code) == (400, "previous_response_id",
                                                                      "previous_response_not_found")
    assert info.value.message == f"Previous response with id 'resp_{'0' * 48}' not found."


def test_a_put_on_a_vanished_previous_is_kept(store):
    """put records previous_id without checking it, so a finished answer is never lost; the broken chain is
    reported when a later turn walks it."""
    r, _ = turn(store, "q", "a", "t", previous="resp_" + "f" * 48)
    assert store.get(r["id"], "t")["id"] == r["id"]
    with pytest.raises(ResponseNotFoundError, match="f" * 48):
        store.conversation(r["id"], "t")


# ---------------------------------------------------------------- owners
def not_found_body(store, rid, owner) -> dict:
    """Everything another owner can learn about a response, with the id masked."""
    out = {"get": store.get(rid, owner), "delete": store.delete(rid, owner)}
    for name, call in (("items", lambda: store.input_items(rid, owner)), ("chain", lambda: store.conversation(rid, owner)),
                       ("require", lambda: store.require(rid, owner))):
        with pytest.raises(ResponseNotFoundError) as info:
            call()
        out[name] = {k: (v.replace(rid, "<id>") if isinstance(v, str) else v)
                     for k, v in info.value.body()["error"].items()} | {"status": info.value.status}
    return out


def test_another_owner_sees_exactly_what_a_missing_id_shows(store):
    r, _ = turn(store, "secret question", "secret answer", "team-a")
    leaked = not_found_body(store, r["id"], "team-b")
    missing = not_found_body(store, new_response_id(), "team-b")
    assert leaked == missing
    assert leaked["get"] is None and leaked["delete"] is False
    assert leaked["items"]["status"] == 404 and leaked["chain"]["status"] == 400
    assert not_found_body(store, r["id"], None) == missing  # open access does not see a team's responses
    assert store.get(r["id"], "team-a") == r  # and team-b's delete did nothing


def test_a_chain_does_not_cross_owners(store):
    r1, _ = turn(store, "a's turn", "x", "team-a")
    r2, _ = turn(store, "b's turn", "y", "team-b", r1["id"])  # b names a's response as its previous one
    with pytest.raises(ResponseNotFoundError) as info:
        store.conversation(r2["id"], "team-b")
    assert "a's turn" not in str(info.value.body())


# ---------------------------------------------------------------- expiry
def test_expired_responses_read_as_missing(tmp_path, clock):
    store = ResponseStore(tmp_path / "r.sqlite3", ttl_s=DAY, clock=clock)
    r1, _ = turn(store, "one", "1", "t")
    clock.now += DAY / 2
    r2, _ = turn(store, "two", "2", "t", r1["id"])
    clock.now += DAY / 2 - 1
    assert store.get(r1["id"], "t") is not None
    clock.now += 1  # r1's TTL is over; r2 has half a day left
    assert store.get(r1["id"], "t") is None and not store.delete(r1["id"], "t")
    with pytest.raises(ResponseNotFoundError):
        store.input_items(r1["id"], "t")
    assert store.get(r2["id"], "t") is not None
    with pytest.raises(ResponseNotFoundError) as info:  # r2 is there, but its conversation is not whole
        store.conversation(r2["id"], "t")
    assert r1["id"] in info.value.message
    expired = not_found_body(store, r1["id"], "t")
    assert expired == not_found_body(store, new_response_id(), "t")


def test_purge_expired(tmp_path, clock):
    store = ResponseStore(tmp_path / "r.sqlite3", ttl_s=DAY, clock=clock)
    old, _ = turn(store, "old", "1", "t")
    clock.now += DAY
    new, _ = turn(store, "new", "2", "t")
    assert store.purge_expired() == 1 and store.purge_expired() == 0
    db = sqlite3.connect(store.path)
    assert [r[0] for r in db.execute("SELECT id FROM responses")] == [new["id"]]
    assert {r[0] for r in db.execute("SELECT response_id FROM response_input_items")} == {new["id"]}


def test_ttl_must_be_positive(tmp_path):
    with pytest.raises(ValueError, match="ttl_s"):
        ResponseStore(tmp_path / "r.sqlite3", ttl_s=0)


# ---------------------------------------------------------------- delete
def test_delete(store):
    r, _ = turn(store, "q", "a", "t")
    other, _ = turn(store, "q2", "a2", "t")
    assert store.delete(r["id"], "t") is True
    assert store.get(r["id"], "t") is None and store.delete(r["id"], "t") is False
    with pytest.raises(ResponseNotFoundError):
        store.input_items(r["id"], "t")
    db = sqlite3.connect(store.path)
    assert db.execute("SELECT COUNT(*) FROM response_input_items WHERE response_id=?", (r["id"],)).fetchone()[0] == 0
    assert store.get(other["id"], "t") == other


# ---------------------------------------------------------------- pagination
@pytest.fixture
def five(store):
    items = normalize_input([{"role": "user", "content": f"m{i}", "id": f"msg_{i}"} for i in range(5)])
    r = response("ok")
    store.put(r, items, "t")
    return r["id"]


def ids(page: dict) -> list[str]:
    return [i["id"] for i in page["data"]]


def test_pagination_desc_by_default(store, five):
    page = store.input_items(five, "t", limit=2)
    assert page["object"] == "list" and ids(page) == ["msg_4", "msg_3"] and page["has_more"] is True
    assert (page["first_id"], page["last_id"]) == ("msg_4", "msg_3")
    page = store.input_items(five, "t", after=page["last_id"], limit=2)
    assert ids(page) == ["msg_2", "msg_1"] and page["has_more"] is True
    page = store.input_items(five, "t", after=page["last_id"], limit=2)
    assert ids(page) == ["msg_0"] and page["has_more"] is False
    page = store.input_items(five, "t", after="msg_0")
    assert page == {"object": "list", "data": [], "first_id": None, "last_id": None, "has_more": False}
    assert ids(store.input_items(five, "t")) == ["msg_4", "msg_3", "msg_2", "msg_1", "msg_0"]


def test_pagination_asc_and_before(store, five):
    page = store.input_items(five, "t", order="asc", limit=3)
    assert ids(page) == ["msg_0", "msg_1", "msg_2"] and page["has_more"] is True
    page = store.input_items(five, "t", order="asc", after="msg_2", limit=3)
    assert ids(page) == ["msg_3", "msg_4"] and page["has_more"] is False
    page = store.input_items(five, "t", order="asc", before="msg_4", limit=2)  # the page just before msg_4
    assert ids(page) == ["msg_2", "msg_3"] and page["has_more"] is True
    assert ids(store.input_items(five, "t", before="msg_1")) == ["msg_4", "msg_3", "msg_2"]
    assert ids(store.input_items(five, "t", after="msg_4", before="msg_1")) == ["msg_3", "msg_2"]


@pytest.mark.parametrize("kwargs, param", [
    ({"limit": 0}, "limit"), ({"limit": 101}, "limit"), ({"limit": "5"}, "limit"), ({"limit": True}, "limit"),
    ({"order": "newest"}, "order"), ({"after": "msg_9"}, "after"), ({"before": "msg_9"}, "before"),
])
def test_bad_pagination_names_the_field(store, five, kwargs, param):
    with pytest.raises(APIError) as info:
        store.input_items(five, "t", **kwargs)
    assert (info.value.status, info.value.param) == (400, param)
    assert not isinstance(info.value, ResponseNotFoundError)


def test_pagination_limit_100(store):
    items = normalize_input([{"role": "user", "content": str(i)} for i in range(150)])
    r = response("ok")
    store.put(r, items, "t")
    first = store.input_items(r["id"], "t", limit=100, order="asc")
    rest = store.input_items(r["id"], "t", limit=100, order="asc", after=first["last_id"])
    assert len(first["data"]) == 100 and first["has_more"] and len(rest["data"]) == 50 and not rest["has_more"]
    assert [i["id"] for i in first["data"] + rest["data"]] == [i["id"] for i in items]


# ---------------------------------------------------------------- concurrency
def test_two_threads_write_and_read_at_once(tmp_path):
    path = tmp_path / "r.sqlite3"
    shared, second = ResponseStore(path), ResponseStore(path)  # one store shared by threads, one more connection
    errors: list[BaseException] = []
    heads: dict[str, str] = {}

    def writer(name: str, s: ResponseStore) -> None:
        try:
            prev = None
            for i in range(40):
                r, _ = turn(s, f"{name} q{i}", f"{name} a{i}", name, prev)
                prev = r["id"]
                assert len(s.conversation(prev, name)) == 2 * (i + 1)
            heads[name] = prev
        except BaseException as exc:  # noqa: BLE001 - reported below
            errors.append(exc)

    threads = [threading.Thread(target=writer, args=("t1", shared)), threading.Thread(target=writer, args=("t2", shared)),
               threading.Thread(target=writer, args=("t3", second))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors, errors
    for name in ("t1", "t2", "t3"):
        history = shared.conversation(heads[name], name)
        assert texts(history) == [x for i in range(40) for x in (f"{name} q{i}", f"{name} a{i}")]
    assert sqlite3.connect(path).execute("SELECT COUNT(*) FROM responses").fetchone()[0] == 120


def _process_writer(path: str, name: str, turns: int, start) -> str:
    start.wait()
    s = ResponseStore(path)
    prev = None
    for i in range(turns):
        r, _ = turn(s, f"{name} q{i}", f"{name} a{i}", name, prev)
        prev = r["id"]
    s.delete(prev, name)  # deletes interleave with the other process's inserts
    s.close()
    return prev


def test_two_processes_write_one_file(tmp_path):
    path = str(tmp_path / "r.sqlite3")
    ResponseStore(path).close()
    ctx = multiprocessing.get_context("spawn")  # a fresh interpreter each: nothing shared but the file
    with ctx.Manager() as manager:
        start = manager.Event()
        with ctx.Pool(2) as pool:
            jobs = [pool.apply_async(_process_writer, (path, name, 30, start)) for name in ("p1", "p2")]
            start.set()
            deleted = [j.get(timeout=120) for j in jobs]
    s = ResponseStore(path)
    db = sqlite3.connect(path)
    assert db.execute("SELECT COUNT(*) FROM responses").fetchone()[0] == 58
    assert db.execute("SELECT COUNT(*) FROM response_input_items").fetchone()[0] == 58
    for name, gone in zip(("p1", "p2"), deleted):
        assert s.get(gone, name) is None
        prev_id = db.execute("SELECT id FROM responses WHERE owner=? ORDER BY rowid DESC LIMIT 1",
                             (name,)).fetchone()[0]
        assert texts(s.conversation(prev_id, name)) == [x for i in range(29) for x in (f"{name} q{i}", f"{name} a{i}")]
