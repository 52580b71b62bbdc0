"""Spend budgets per key and per team: reserve the worst-case cost before a request runs, settle after.

The check (spent this period + open reservations + this request <= budget) and the insert happen in one
BEGIN IMMEDIATE transaction, so concurrent requests, threads or processes can never overrun a budget.
Each process renews its open reservations every ttl/4; those of a process that died (a killed gateway
replica) stop being renewed and stop counting after `ttl`, so a crash never holds a budget for long.
"""

from __future__ import annotations

import secrets
import sqlite3
import threading
import time

from serving.governance.config import Budget
from serving.governance.db import Database
from serving.governance.errors import RateLimited
from serving.governance.spend import insert_usage, period_bounds


class BudgetBook:
    def __init__(self, db: Database, reservation_ttl_s: float = 120.0):
        self.db = db
        self.ttl = reservation_ttl_s
        self.owner = secrets.token_hex(8)  # this process's reservations, renewed by its heartbeat
        self._heartbeat: threading.Thread | None = None
        self._stopped = threading.Event()

    def renew(self) -> None:
        """Keep this process's open reservations alive (the heartbeat calls it every ttl/4)."""
        with self.db.tx() as c:
            c.execute("UPDATE reservations SET touched_at = ? WHERE owner = ?", (time.time(), self.owner))

    def _start_heartbeat(self) -> None:
        if self._heartbeat is not None:
            return

        def beat():
            while not self._stopped.wait(self.ttl / 4):
                try:
                    self.renew()
                except sqlite3.ProgrammingError:  # the database was closed: this book is done
                    return
                except sqlite3.Error:  # busy or I/O trouble: try again next beat
                    continue

        self._heartbeat = threading.Thread(target=beat, name="budget-heartbeat", daemon=True)
        self._heartbeat.start()

    def stop(self) -> None:
        """No more renewals (shutdown): open reservations then expire after the TTL."""
        self._stopped.set()

    def _state(self, c, column: str, value: str, budget: Budget, now: float) -> tuple[float, float, float, float]:
        start, end = period_bounds(budget.period, now)
        spent = c.execute("SELECT COALESCE(SUM(cost_usd), 0) FROM period_spend WHERE scope = ? AND subject = ? "
                          "AND period = ? AND start = ?", (column, value, budget.period, start)).fetchone()[0]
        held = c.execute(f"SELECT COALESCE(SUM(amount_usd), 0) FROM reservations WHERE {column} = ? "
                         "AND COALESCE(touched_at, created_at) >= ?", (value, now - self.ttl)).fetchone()[0]
        return spent, held, start, end

    def reserve(self, *, key_id: str, team: str, amount_usd: float, key_budget: Budget | None,
                team_budget: Budget | None) -> str | None:
        """-> reservation id, or None when neither key nor team has a budget. Raises 429 insufficient_quota."""
        if key_budget is None and team_budget is None:
            return None
        rid = secrets.token_hex(8)
        now = time.time()
        self._start_heartbeat()
        with self.db.tx() as c:
            c.execute("DELETE FROM reservations WHERE COALESCE(touched_at, created_at) < ?", (now - self.ttl,))
            self._check(c, key_id, team, amount_usd, key_budget, team_budget, now)
            c.execute("INSERT INTO reservations (id, key_id, team, amount_usd, created_at, owner, touched_at) "
                      "VALUES (?,?,?,?,?,?,?)", (rid, key_id, team, amount_usd, now, self.owner, now))
        return rid

    def top_up(self, reservation_id: str | None, *, key_id: str, team: str, extra_usd: float,
               key_budget: Budget | None, team_budget: Budget | None) -> None:
        """Grow a reservation once the exact prompt is known (the admission estimate was short); raises 429
        insufficient_quota, leaving the reservation as it was, when the budget cannot hold the difference."""
        if reservation_id is None or extra_usd <= 0:
            return
        now = time.time()
        with self.db.tx() as c:
            self._check(c, key_id, team, extra_usd, key_budget, team_budget, now)
            c.execute("UPDATE reservations SET amount_usd = amount_usd + ? WHERE id = ?", (extra_usd, reservation_id))

    def _check(self, c, key_id, team, amount_usd, key_budget, team_budget, now) -> None:
        for column, value, budget, who in (("key_id", key_id, key_budget, f"key {key_id}"),
                                           ("team", team, team_budget, f"team {team}")):
            if budget is None:
                continue
            spent, held, _, end = self._state(c, column, value, budget, now)
            if spent + held + amount_usd > budget.amount_usd + 1e-12:
                raise RateLimited(
                    f"{who} has spent ${spent:.6f} (plus ${held:.6f} reserved by running requests) of its "
                    f"${budget.amount_usd:.6f} {budget.period}ly budget; this request may cost up to "
                    f"${amount_usd:.6f} more", code="insufficient_quota", retry_after=end - now)

    def settle(self, reservation_id: str | None, **usage) -> None:
        """Drop the reservation and write the ledger row in one transaction (also without a reservation)."""
        with self.db.tx() as c:
            if reservation_id:
                c.execute("DELETE FROM reservations WHERE id = ?", (reservation_id,))
            insert_usage(c, **usage)

    def release(self, reservation_id: str | None) -> None:
        if reservation_id:
            with self.db.tx() as c:
                c.execute("DELETE FROM reservations WHERE id = ?", (reservation_id,))

    def status(self, *, key_id: str | None = None, team: str | None = None, budget: Budget) -> dict:
        column, value = ("key_id", key_id) if key_id else ("team", team)
        now = time.time()
        with self.db.tx() as c:
            spent, held, start, end = self._state(c, column, value, budget, now)
        return {"budget_usd": budget.amount_usd, "period": budget.period, "spent_usd": spent,
                "reserved_usd": held, "remaining_usd": budget.amount_usd - spent - held, "starts_at": start,
                "resets_at": end}
