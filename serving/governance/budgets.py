"""Spend budgets per key and per team: reserve the worst-case cost before a request runs, settle after.

The check (spent this period + open reservations + this request <= budget) and the insert happen in one
BEGIN IMMEDIATE transaction, so concurrent requests, threads or processes can never overrun a budget.
"""

from __future__ import annotations

import secrets
import time

from serving.governance.config import Budget
from serving.governance.db import Database
from serving.governance.errors import RateLimited
from serving.governance.spend import insert_usage, period_bounds


class BudgetBook:
    def __init__(self, db: Database, reservation_ttl_s: float = 3600.0):
        self.db = db
        self.ttl = reservation_ttl_s

    def _state(self, c, column: str, value: str, budget: Budget, now: float) -> tuple[float, float, float, float]:
        start, end = period_bounds(budget.period, now)
        spent = c.execute("SELECT COALESCE(SUM(cost_usd), 0) FROM period_spend WHERE scope = ? AND subject = ? "
                          "AND period = ? AND start = ?", (column, value, budget.period, start)).fetchone()[0]
        held = c.execute(f"SELECT COALESCE(SUM(amount_usd), 0) FROM reservations WHERE {column} = ?",
                         (value,)).fetchone()[0]
        return spent, held, start, end

    def reserve(self, *, key_id: str, team: str, amount_usd: float, key_budget: Budget | None,
                team_budget: Budget | None) -> str | None:
        """-> reservation id, or None when neither key nor team has a budget. Raises 429 insufficient_quota."""
        if key_budget is None and team_budget is None:
            return None
        rid = secrets.token_hex(8)
        now = time.time()
        with self.db.tx() as c:
            c.execute("DELETE FROM reservations WHERE created_at < ?", (now - self.ttl,))
            self._check(c, key_id, team, amount_usd, key_budget, team_budget, now)
            c.execute("INSERT INTO reservations VALUES (?,?,?,?,?)", (rid, key_id, team, amount_usd, now))
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
