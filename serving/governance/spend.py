"""The usage ledger: one row per priced request (key, team, model, adapter, tokens, cost), reports, /metrics."""

from __future__ import annotations

import sqlite3
import time
from datetime import datetime, timezone
from typing import Any, Iterable

from serving.governance.db import Database

GROUPS = {"key_id": "key_id", "team": "team", "model": "model", "adapter": "adapter", "route": "route",
          "hour": "strftime('%Y-%m-%dT%H', ts, 'unixepoch')", "day": "strftime('%Y-%m-%d', ts, 'unixepoch')",
          "month": "strftime('%Y-%m', ts, 'unixepoch')"}


def period_bounds(period: str, now: float) -> tuple[float, float]:
    """UTC [start, end) of the day or month containing `now`."""
    t = datetime.fromtimestamp(now, timezone.utc)
    if period == "day":
        start = t.replace(hour=0, minute=0, second=0, microsecond=0)
        return start.timestamp(), start.timestamp() + 86400
    start = t.replace(day=1, hour=0, minute=0, second=0, microsecond=0)
    end = start.replace(year=start.year + 1, month=1) if start.month == 12 else start.replace(month=start.month + 1)
    return start.timestamp(), end.timestamp()


def insert_usage(c: sqlite3.Connection, *, key_id: str, team: str, model: str, adapter: str | None,
                 route: str, prompt_tokens: int, completion_tokens: int, cost_usd: float, status: int,
                 request_id: str | None = None, ts: float | None = None) -> None:
    """Inside the caller's transaction, so a budget settle and its ledger row commit together."""
    adapter = adapter or ""
    ts = ts or time.time()
    c.execute("INSERT INTO usage (ts, request_id, key_id, team, model, adapter, route, prompt_tokens,"
              " completion_tokens, cost_usd, status) VALUES (?,?,?,?,?,?,?,?,?,?,?)",
              (ts, request_id, key_id, team, model, adapter, route, prompt_tokens,
               completion_tokens, cost_usd, status))
    c.execute("INSERT INTO usage_totals VALUES (?,?,?,?,1,?,?,?) ON CONFLICT(key_id, team, model, adapter) DO "
              "UPDATE SET requests = requests + 1, prompt_tokens = prompt_tokens + excluded.prompt_tokens, "
              "completion_tokens = completion_tokens + excluded.completion_tokens, "
              "cost_usd = cost_usd + excluded.cost_usd",
              (key_id, team, model, adapter, prompt_tokens, completion_tokens, cost_usd))
    for scope, subject in (("key_id", key_id), ("team", team)):  # running sums: budget checks stay O(1)
        for period in ("day", "month"):
            c.execute("INSERT INTO period_spend VALUES (?,?,?,?,?) ON CONFLICT(scope, subject, period, start) "
                      "DO UPDATE SET cost_usd = cost_usd + excluded.cost_usd",
                      (scope, subject, period, period_bounds(period, ts)[0], cost_usd))


class UsageLedger:
    def __init__(self, db: Database):
        self.db = db

    def record(self, **row: Any) -> None:
        with self.db.tx() as c:
            insert_usage(c, **row)

    def usage(self, group_by: Iterable[str] = ("team",), *, since: float | None = None,
              until: float | None = None, key_id: str | None = None, team: str | None = None,
              model: str | None = None, adapter: str | None = None) -> list[dict[str, Any]]:
        """Spend and tokens grouped by any of key_id, team, model, adapter, route, hour, day, month (UTC)."""
        group_by = list(group_by)
        unknown = [g for g in group_by if g not in GROUPS]
        if unknown:
            raise ValueError(f"group_by: unknown field(s) {unknown}; choose from {sorted(GROUPS)}")
        where, args = [], []
        for col, value in (("key_id", key_id), ("team", team), ("model", model), ("adapter", adapter)):
            if value is not None:
                where.append(f"{col} = ?")
                args.append(value)
        if since is not None:
            where.append("ts >= ?")
            args.append(since)
        if until is not None:
            where.append("ts < ?")
            args.append(until)
        cols = [f"{GROUPS[g]} AS {g}" for g in group_by]
        sql = ("SELECT " + ", ".join(cols + ["COUNT(*) AS requests", "SUM(prompt_tokens) AS prompt_tokens",
                                            "SUM(completion_tokens) AS completion_tokens",
                                            "SUM(cost_usd) AS cost_usd"]) + " FROM usage")
        if where:
            sql += " WHERE " + " AND ".join(where)
        if group_by:
            sql += " GROUP BY " + ", ".join(GROUPS[g] for g in group_by)
        sql += " ORDER BY cost_usd DESC"
        rows = [dict(r) for r in self.db.query(sql, args)]
        return [r for r in rows if r["requests"]]

    def totals(self) -> list[dict[str, Any]]:
        return [dict(r) for r in self.db.query("SELECT * FROM usage_totals")]


class SpendCollector:
    """Prometheus collector over the ledger's running totals: survives restarts, same across replicas."""

    def __init__(self, ledger: UsageLedger):
        self.ledger = ledger

    def describe(self):
        return []

    def collect(self):
        from prometheus_client.core import CounterMetricFamily

        labels = ["key_id", "team", "model", "adapter"]
        spend = CounterMetricFamily("loraplex_spend_usd", "Spend in USD by key, team, model, adapter", labels=labels)
        tokens = CounterMetricFamily("loraplex_usage_tokens", "Tokens by key, team, model, adapter and kind",
                                     labels=labels + ["kind"])
        requests = CounterMetricFamily("loraplex_usage_requests", "Priced requests by key, team, model, adapter",
                                       labels=labels)
        for row in self.ledger.totals():
            values = [row[k] for k in labels]
            spend.add_metric(values, row["cost_usd"])
            tokens.add_metric(values + ["prompt"], row["prompt_tokens"])
            tokens.add_metric(values + ["completion"], row["completion_tokens"])
            requests.add_metric(values, row["requests"])
        yield spend
        yield tokens
        yield requests
