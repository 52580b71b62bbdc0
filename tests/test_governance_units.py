"""Governance building blocks on a real SQLite file and audit log: keys, limits, budgets, ledger, audit, CLI."""

import json
import sqlite3
import threading
import time

import pytest

from serving.governance import Governance, GovernanceConfig, GovernanceError, load_config
from serving.governance.audit import AuditLog
from serving.governance.config import Limits
from serving.governance.limits import RateLimiter
from serving.pricing import Price

PRICE = Price(input_per_1m=1000.0, output_per_1m=3000.0)  # large so small token counts give visible costs


@pytest.fixture
def gov(tmp_path):
    cfg = GovernanceConfig(database=str(tmp_path / "gov.db"), audit={"path": str(tmp_path / "audit.jsonl")},
                           teams={"capped": {"budget": {"amount_usd": 1.0, "period": "day"}}})
    g = Governance(cfg, prices={"m": PRICE})
    yield g
    g.db.close()


def test_keys_are_stored_hashed_and_verified(gov, tmp_path):
    key, rec = gov.keys.create(name="alice", team="t1", role="trainer", models=["m", "llama-*"])
    assert key.startswith("lpx-") and key[4:16] == rec.id and len(key) >= 48
    raw = (tmp_path / "gov.db").read_bytes() + b"".join(p.read_bytes() for p in tmp_path.glob("gov.db*"))
    assert key.encode() not in raw and key[16:].encode() not in raw
    cols = [r[1] for r in sqlite3.connect(tmp_path / "gov.db").execute("PRAGMA table_info(api_keys)")]
    assert "key" not in cols and {"salt", "hash"} <= set(cols)
    p = gov.authenticate(f"Bearer {key}")
    assert (p.key_id, p.team, p.role) == (rec.id, "t1", "trainer")
    assert p.allows("models", "llama-3-8b") and not p.allows("models", "mistral")
    tampered = key[:-1] + ("A" if key[-1] != "A" else "B")
    for bad in (tampered, "lpx-short", f"lpx-{'0' * 12}{key[16:]}"):
        with pytest.raises(GovernanceError) as e:
            gov.authenticate(f"Bearer {bad}")
        assert e.value.status == 401 and e.value.code == "invalid_api_key" and bad not in e.value.message


def test_revoked_and_expired_keys_get_401(gov):
    key, rec = gov.keys.create(name="bob")
    soon, rec2 = gov.keys.create(name="short", expires_at=time.time() + 0.3)
    assert gov.authenticate(f"Bearer {soon}").key_id == rec2.id
    gov.keys.revoke(rec.id)
    with pytest.raises(GovernanceError) as e:
        gov.authenticate(f"Bearer {key}")
    assert (e.value.status, e.value.code) == (401, "key_revoked")
    time.sleep(0.35)
    with pytest.raises(GovernanceError) as e:
        gov.authenticate(f"Bearer {soon}")
    assert (e.value.status, e.value.code) == (401, "key_expired")
    assert [r.status for r in gov.keys.list()] == ["revoked", "expired"]
    assert gov.keys.list(include_inactive=False) == []


def test_open_until_first_key_unless_open_access(gov, tmp_path):
    assert gov.authenticate(None).anonymous and gov.startup_warnings()
    assert gov.authenticate("Bearer EMPTY").anonymous  # the OpenAI client's placeholder key
    gov.keys.create(name="first")
    with pytest.raises(GovernanceError) as e:
        gov.authenticate(None)
    assert e.value.code == "missing_api_key" and e.value.headers()["WWW-Authenticate"].startswith("Bearer")
    with pytest.raises(GovernanceError):
        gov.authenticate("Basic abc")
    open_gov = Governance(gov.config.model_copy(update={"open_access": True}))
    assert open_gov.authenticate(None).anonymous and "open_access" in open_gov.startup_warnings()[0]


def test_roles_and_allow_lists(gov):
    _, rec = gov.keys.create(name="u", models=["m"], adapters=["sql-*"], routes=["/v1/chat/*", "/v1/models"])
    user = rec.principal()
    gov.authorize(user, model="m", adapter="sql-v2")
    for kwargs, code in (({"model": "other"}, "model_not_allowed"), ({"adapter": "chat-lora"}, "adapter_not_allowed"),
                         ({"role": "trainer"}, "insufficient_role")):
        with pytest.raises(GovernanceError) as e:
            gov.authorize(user, **kwargs)
        assert (e.value.status, e.value.code) == (403, code)
    gov.authorize_route(user, "POST", "/v1/chat/completions")
    with pytest.raises(GovernanceError) as e:
        gov.authorize_route(user, "POST", "/v1/embeddings")
    assert e.value.code == "route_not_allowed"
    trainer = gov.keys.create(name="t", role="trainer")[1].principal()
    admin = gov.keys.create(name="a", role="admin")[1].principal()
    for method, path, least in (("POST", "/v1/fine_tuning/jobs", "trainer"), ("POST", "/v1/files", "trainer"),
                                ("POST", "/v1/adapters", "admin"), ("DELETE", "/v1/adapters/x", "admin"),
                                ("GET", "/v1/adapters", "user"), ("GET", "/v1/admin/keys", "admin")):
        assert gov.required_role(method, path) == least
        for p in (user, trainer, admin):
            allowed = {"user": 0, "trainer": 1, "admin": 2}[p.role] >= {"user": 0, "trainer": 1, "admin": 2}[least]
            if allowed:
                gov.authorize_route(p, method, "/v1/chat/completions" if p is user else path)
            else:
                with pytest.raises(GovernanceError) as e:
                    gov.authorize_route(p, method, path)
                assert e.value.status == 403


def test_rpm_tpm_parallel_with_retry_after():
    now = [1000.0]
    lim = RateLimiter(clock=lambda: now[0])
    subj = [("key:k", Limits(rpm=3, tpm=100, max_parallel=2))]
    leases = [lim.admit(subj, tokens=10) for _ in range(2)]
    with pytest.raises(GovernanceError) as e:
        lim.admit(subj, tokens=10)
    assert (e.value.status, e.value.code, e.value.retry_after) == (429, "too_many_parallel_requests", 1.0)
    lim.release(leases[0])
    now[0] += 20
    lease3 = lim.admit(subj, tokens=10)
    with pytest.raises(GovernanceError) as e:
        lim.admit(subj, tokens=10)  # 4th in the minute
    assert e.value.code == "rate_limit_exceeded" and e.value.retry_after == pytest.approx(40.0)
    assert e.value.headers()["Retry-After"] == "40"
    lim.release(leases[1])
    lim.release(lease3)
    now[0] += 40.001  # the first two fall out of the window
    lim.settle_tokens(lease3, 85)  # the third actually used 85 tokens
    with pytest.raises(GovernanceError) as e:
        lim.admit(subj, tokens=20)
    assert e.value.code == "rate_limit_exceeded" and e.value.retry_after == pytest.approx(20.0, abs=0.01)
    lim.admit(subj, tokens=15)
    with pytest.raises(GovernanceError) as e:
        lim.admit(subj, tokens=101)
    assert e.value.code == "tokens_exceed_limit"


def _run_concurrently(n, fn):
    barrier, results = threading.Barrier(n), [None] * n

    def run(i):
        barrier.wait()
        try:
            results[i] = fn(i)
        except Exception as exc:  # noqa: BLE001 - the test inspects each outcome
            results[i] = exc

    threads = [threading.Thread(target=run, args=(i,)) for i in range(n)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    return results


def test_team_budget_never_overspent_by_32_threads(gov):
    cost = PRICE.cost(100, 200)  # 0.7 USD each at worst case = actual
    assert cost == pytest.approx(0.7)
    keys = [gov.keys.create(name=f"k{i}", team="capped")[1].principal() for i in range(4)]

    def one(i):
        t = gov.admit(keys[i % 4], route="/v1/chat/completions", model="m", prompt_tokens=100, max_tokens=200)
        time.sleep(0.01)
        return t.settle(100, 200)["cost_usd"]

    results = _run_concurrently(32, one)
    ok = [r for r in results if isinstance(r, float)]
    refused = [r for r in results if isinstance(r, GovernanceError)]
    assert len(ok) == 1 and len(refused) == 31  # $1.00 affords one $0.70 request
    assert all(r.status == 429 and r.code == "insufficient_quota" and r.retry_after > 0 for r in refused)
    spent = sum(r["cost_usd"] for r in gov.ledger.usage(["team"], team="capped"))
    assert spent == pytest.approx(0.7) and spent <= 1.0
    assert gov.db.query("SELECT COUNT(*) FROM reservations")[0][0] == 0


def test_key_budget_reserve_settle_release(gov):
    key, rec = gov.keys.create(name="b", budget_usd=0.01, budget_period="month")
    p = rec.principal()
    t1 = gov.admit(p, route="/v1/x", model="m", prompt_tokens=2, max_tokens=2)  # reserves 0.008
    with pytest.raises(GovernanceError) as e:
        gov.admit(p, route="/v1/x", model="m", prompt_tokens=2, max_tokens=2)
    assert e.value.code == "insufficient_quota"
    t1.settle(2, 0)  # actual 0.002: the rest of the reservation is freed
    t2 = gov.admit(p, route="/v1/x", model="m", prompt_tokens=2, max_tokens=2)
    t2.abandon()  # charged for the prompt it sent
    assert gov.budgets.status(key_id=p.key_id, budget=p.budget)["spent_usd"] == pytest.approx(0.004)
    rows = gov.ledger.usage(["key_id", "model", "adapter"])
    assert rows == [{"key_id": rec.id, "model": "m", "adapter": "", "requests": 2, "prompt_tokens": 4,
                     "completion_tokens": 0, "cost_usd": pytest.approx(0.004)}]
    assert [e["status"] for e in gov.audit.query(key_id=rec.id)] == [429, 200, 499]


def test_a_short_prompt_estimate_is_topped_up_and_never_overspends(gov):
    """Admission estimates the prompt; the replica's exact count (chat template included) grows the reservation
    before a token is sent, or refuses the request when the budget cannot hold the difference."""
    key, rec = gov.keys.create(name="topped", budget_usd=0.02, budget_period="day")
    p = rec.principal()
    held = lambda: gov.budgets.status(key_id=p.key_id, budget=p.budget)["reserved_usd"]
    t1 = gov.admit(p, route="/v1/x", model="m", prompt_tokens=2, max_tokens=2)
    assert held() == pytest.approx(0.008)
    t1.confirm_prompt(5)  # cost(5, 2) = 0.011
    assert held() == pytest.approx(0.011) and t1.reserved_usd == pytest.approx(0.011)
    t1.confirm_prompt(3)  # fewer than reserved for: nothing changes
    assert held() == pytest.approx(0.011)
    t2 = gov.admit(p, route="/v1/x", model="m", prompt_tokens=2, max_tokens=2)
    with pytest.raises(GovernanceError) as e:
        t2.confirm_prompt(4)  # 0.011 + 0.010 > 0.02
    assert e.value.code == "insufficient_quota" and e.value.status == 429
    assert held() == pytest.approx(0.011)  # t2's reservation is freed, uncharged
    assert t2.settle(3, 0)["cost_usd"] == 0  # settled already: later settles change nothing
    t1.settle(5, 2)
    status = gov.budgets.status(key_id=p.key_id, budget=p.budget)
    assert status["spent_usd"] == pytest.approx(0.011) and status["reserved_usd"] == 0
    assert gov.ledger.usage(["key_id"], key_id=p.key_id)[0]["requests"] == 1
    assert [(e["status"], e.get("error")) for e in gov.audit.query(key_id=rec.id)] == [(429, "insufficient_quota"), (200, None)]


def test_a_dead_gateways_reservations_stop_holding_the_budget(tmp_path):
    """Two processes' books on one database: the live one renews its reservation past the TTL; the dead one's
    (no renewal) stops counting after it, so a killed gateway replica never holds a budget for long."""
    from serving.governance.budgets import BudgetBook
    from serving.governance.config import Budget
    from serving.governance.db import Database

    db = Database(tmp_path / "gov.db")
    live, dead = BudgetBook(db, reservation_ttl_s=0.4), BudgetBook(db, reservation_ttl_s=0.4)
    budget = Budget(amount_usd=1.0, period="day")
    reserve = lambda book, usd: book.reserve(key_id="k", team="t", amount_usd=usd, key_budget=budget, team_budget=None)
    kept = reserve(live, 0.5)
    lost = reserve(dead, 0.5)
    dead.stop()  # the process is gone: nothing renews its reservation any more
    with pytest.raises(GovernanceError):
        reserve(live, 0.1)
    time.sleep(0.7)  # past the TTL: the live book renewed (every 0.1 s), the dead one did not
    assert live.status(key_id="k", budget=budget)["reserved_usd"] == pytest.approx(0.5)
    reserve(live, 0.4)  # the dead reservation no longer counts (and is cleaned up)
    ids = {r["id"] for r in db.query("SELECT id FROM reservations")}
    assert kept in ids and lost not in ids
    db.close()


def test_a_database_from_before_reservation_owners_is_migrated(tmp_path):
    path = tmp_path / "old.db"
    old = sqlite3.connect(path)
    old.execute("CREATE TABLE reservations (id TEXT PRIMARY KEY, key_id TEXT NOT NULL, team TEXT NOT NULL, "
                "amount_usd REAL NOT NULL, created_at REAL NOT NULL)")
    old.execute("INSERT INTO reservations VALUES ('r1', 'k', 't', 0.25, ?)", (time.time(),))
    old.commit()
    old.close()
    from serving.governance.budgets import BudgetBook
    from serving.governance.config import Budget
    from serving.governance.db import Database

    db = Database(path)
    book = BudgetBook(db)
    budget = Budget(amount_usd=1.0, period="day")
    assert book.status(key_id="k", budget=budget)["reserved_usd"] == pytest.approx(0.25)
    book.reserve(key_id="k", team="t", amount_usd=0.5, key_budget=budget, team_budget=None)
    assert book.status(key_id="k", budget=budget)["reserved_usd"] == pytest.approx(0.75)
    db.close()


def test_unpriced_model_is_refused_not_free(gov):
    p = gov.keys.create(name="x")[1].principal()
    with pytest.raises(GovernanceError) as e:
        gov.admit(p, route="/v1/x", model="unknown-model", prompt_tokens=1, max_tokens=1)
    assert e.value.code == "model_unpriced"
    with pytest.raises(ValueError, match="unknown-model"):
        gov.check_prices(["m", "unknown-model"])
    cfg = GovernanceConfig.model_validate({**gov.config.model_dump(), "prices": {
        "unknown-model": {"gpu_hour_usd": 3.6, "input_tok_s": 1000, "output_tok_s": 100}}})
    gpu_priced = Governance(cfg)
    gpu_priced.check_prices(["unknown-model"])
    assert gpu_priced.price_for("unknown-model").cost(1000, 100) == pytest.approx(0.002)  # 1 s + 1 s of $3.6/h


def test_audit_rotation_restart_and_query(tmp_path):
    log = AuditLog(tmp_path / "a" / "audit.jsonl", max_bytes=2048, backups=3, fsync=True)
    for i in range(60):
        log.write({"event": "request", "key_id": f"k{i % 3}", "status": 200 if i % 5 else 429, "n": i})
    files = log.files()
    assert len(files) == 4 and all(p.stat().st_size <= 2048 for p in files)
    again = AuditLog(tmp_path / "a" / "audit.jsonl", max_bytes=2048, backups=3)  # a restart
    ns = [e["n"] for e in again.entries()]
    assert ns == list(range(60 - len(ns), 60)) and len(ns) >= 20  # oldest rotated away, order kept
    assert all(e["key_id"] == "k1" and e["status"] == 429 for e in again.query(key_id="k1", status=429))
    assert [e["n"] for e in again.query(limit=2)] == [58, 59]
    with pytest.raises(ValueError):
        log.write({"event": "x", "api_key": "lpx-..."})


def test_audit_concurrent_writers_keep_every_line(tmp_path):
    log = AuditLog(tmp_path / "audit.jsonl", max_bytes=10**7, fsync=False)
    _run_concurrently(16, lambda i: [log.write({"event": "request", "n": i * 100 + j}) for j in range(50)])
    assert sorted(e["n"] for e in log.entries()) == sorted(i * 100 + j for i in range(16) for j in range(50))


def test_config_is_strict_and_names_the_field(tmp_path):
    with pytest.raises(ValueError, match="default_limits.rpmm"):
        load_config({"governance": {"default_limits": {"rpmm": 5}}})
    with pytest.raises(ValueError, match="pii.prompt"):
        load_config({"pii": {"prompt": "shred"}})
    with pytest.raises(ValueError, match="prices.m"):
        load_config({"prices": {"m": {"gpu_hour_usd": 2.0}}})
    with pytest.raises(ValueError, match="only SQLite"):
        GovernanceConfig(database="postgresql://x/y").database_path()
    path = tmp_path / "g.yaml"
    path.write_text("governance:\n  open_access: true\n  pii_routes:\n    /v1/chat/*: {prompt: block}\n"
                    f"  database: sqlite:///{tmp_path}/x.db\n")
    cfg = load_config(path)
    assert cfg.open_access and cfg.database_path() == tmp_path / "x.db"
    assert cfg.pii_policy("/v1/chat/completions").prompt == "block"
    assert cfg.pii_policy("/v1/embeddings").prompt == "allow"


def test_cli_keys_usage_audit(tmp_path, monkeypatch, capsys):
    from loraplex.cli import main

    monkeypatch.setenv("LORAPLEX_HOME", str(tmp_path))
    assert main(["keys", "create", "--name", "ci", "--team", "ml", "--role", "trainer", "--models", "m,x-*",
                 "--expires", "30d", "--rpm", "5", "--budget", "2.5", "--json"]) == 0
    created = json.loads(capsys.readouterr().out)
    assert created["key"].startswith("lpx-") and created["allow"]["models"] == ["m", "x-*"]
    assert created["limits"]["rpm"] == 5 and created["expires_at"] > time.time() + 29 * 86400
    assert main(["keys", "list", "--json"]) == 0
    listed = json.loads(capsys.readouterr().out)
    assert [k["id"] for k in listed] == [created["id"]] and "key" not in listed[0]
    gov = Governance(GovernanceConfig(), prices={"m": PRICE})
    t = gov.admit(gov.authenticate(f"Bearer {created['key']}"), route="/v1/chat/completions", model="m",
                  prompt_tokens=10, max_tokens=5)
    t.settle(10, 5)
    assert main(["usage", "--by", "team,model", "--since", "1d", "--json"]) == 0
    assert json.loads(capsys.readouterr().out) == [{"team": "ml", "model": "m", "requests": 1, "prompt_tokens": 10,
                                                    "completion_tokens": 5, "cost_usd": pytest.approx(0.025)}]
    assert main(["keys", "revoke", created["id"]]) == 0
    assert main(["keys", "revoke", "nope"]) == 2
    assert "no API key with id 'nope'" in capsys.readouterr().err
    assert main(["usage", "--by", "colour"]) == 2
    assert main(["audit", "--json"]) == 0
    entries = [json.loads(line) for line in capsys.readouterr().out.splitlines()]
    assert [e.get("action", e["event"]) for e in entries] == ["keys.create", "request", "keys.revoke"]
    assert created["key"] not in (tmp_path / "audit" / "audit.jsonl").read_text()


def test_period_bounds_and_running_sums_match_the_ledger(gov):
    from datetime import datetime, timezone

    from serving.governance.spend import period_bounds

    dec = datetime(2026, 12, 31, 23, 59, tzinfo=timezone.utc).timestamp()
    start, end = period_bounds("month", dec)
    assert (datetime.fromtimestamp(start, timezone.utc), datetime.fromtimestamp(end, timezone.utc)) == \
        (datetime(2026, 12, 1, tzinfo=timezone.utc), datetime(2027, 1, 1, tzinfo=timezone.utc))
    assert period_bounds("day", dec) == (datetime(2026, 12, 31, tzinfo=timezone.utc).timestamp(),
                                         datetime(2027, 1, 1, tzinfo=timezone.utc).timestamp())
    for i, ts in enumerate((dec - 86400 * 40, dec - 3600, dec)):  # November, and twice on 31 December
        gov.ledger.record(key_id="k", team="t", model="m", adapter=None, route="/v1/x", prompt_tokens=i,
                          completion_tokens=1, cost_usd=0.5 + i, status=200, ts=ts)
    rows = {(r["scope"], r["period"], r["start"]): r["cost_usd"] for r in gov.db.query("SELECT * FROM period_spend")}
    month, day = period_bounds("month", dec)[0], period_bounds("day", dec)[0]
    direct = gov.db.query("SELECT SUM(cost_usd) FROM usage WHERE team = 't' AND ts >= ?", (month,))[0][0]
    assert rows[("team", "month", month)] == pytest.approx(direct) == pytest.approx(1.5 + 2.5)
    assert rows[("key_id", "day", day)] == pytest.approx(1.5 + 2.5)
