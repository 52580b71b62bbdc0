"""`loraplex keys create|list|revoke`, `loraplex usage`, `loraplex audit` (straight on the database/log)."""

from __future__ import annotations

import argparse
import json
import os


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument("--config", help="a YAML file with governance settings (top level or under `governance:`)")
    p.add_argument("--database", help="SQLite path or sqlite:/// URL (default: <data dir>/governance.db)")
    p.add_argument("--json", action="store_true", help="print JSON instead of a table")


def register(subparsers) -> None:
    keys = subparsers.add_parser("keys", help="create, list and revoke API keys")
    ksub = keys.add_subparsers(dest="keys_command", metavar="ACTION")
    c = ksub.add_parser("create", help="create a key (printed once)")
    _common(c)
    c.add_argument("--name", required=True)
    c.add_argument("--team", default="default")
    c.add_argument("--role", default="user", choices=["user", "trainer", "admin"])
    for name in ("models", "adapters", "routes", "collections"):
        c.add_argument(f"--{name}", help=f"comma-separated glob allow-list of {name} (default: all)")
    c.add_argument("--expires", help="an ISO date/time or a lifetime such as 30d, 12h")
    c.add_argument("--rpm", type=int)
    c.add_argument("--tpm", type=int)
    c.add_argument("--max-parallel", type=int)
    c.add_argument("--budget", type=float, help="spend budget in USD per --period")
    c.add_argument("--period", default="month", choices=["day", "month"])
    c.set_defaults(func=_keys_create)
    ls = ksub.add_parser("list", help="list keys (never their secrets)")
    _common(ls)
    ls.add_argument("--team")
    ls.add_argument("--active", action="store_true", help="only active keys")
    ls.set_defaults(func=_keys_list)
    rv = ksub.add_parser("revoke", help="revoke a key by id")
    _common(rv)
    rv.add_argument("key_id")
    rv.set_defaults(func=_keys_revoke)
    keys.set_defaults(func=lambda a: keys.print_help() or 2)

    u = subparsers.add_parser("usage", help="spend and tokens by key, team, model, adapter over a period")
    _common(u)
    u.add_argument("--by", default="team", help="comma-separated: key_id, team, model, adapter, route, hour, day, month")
    u.add_argument("--since", help="ISO date/time or an age such as 7d (default: all time)")
    u.add_argument("--until")
    for name in ("key_id", "team", "model", "adapter"):
        u.add_argument(f"--{name.replace('_', '-')}", dest=name)
    u.set_defaults(func=_usage)

    au = subparsers.add_parser("audit", help="query the audit log")
    _common(au)
    au.add_argument("--since")
    au.add_argument("--until")
    au.add_argument("--key-id")
    au.add_argument("--team")
    au.add_argument("--model")
    au.add_argument("--route")
    au.add_argument("--status", type=int)
    au.add_argument("--event", choices=["request", "admin"])
    au.add_argument("--limit", type=int, default=50)
    au.set_defaults(func=_audit)


def _gov(args):
    from loraplex.cli import CLIError
    from serving.governance.config import load_config
    from serving.governance.core import Governance

    try:
        config = load_config(args.config)
        if args.database:
            config = config.model_copy(update={"database": args.database})
        config.database_path()
    except (ValueError, FileNotFoundError) as exc:
        raise CLIError(str(exc)) from None
    return Governance(config)


def _time(value, flag):
    from loraplex.cli import CLIError
    from serving.governance.api import parse_time
    from serving.governance.errors import GovernanceError

    try:
        return parse_time(value, flag)
    except GovernanceError as exc:
        raise CLIError(exc.message) from None


def _table(rows: list[dict], columns: list[str]) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table(*columns)
    for r in rows:
        table.add_row(*["" if r.get(c) is None else (f"{r[c]:.6f}" if isinstance(r[c], float) else str(r[c]))
                        for c in columns])
    Console().print(table)


def _actor() -> str:
    return "cli:" + (os.environ.get("USER") or "unknown")


def _keys_create(args) -> int:
    import time

    from loraplex.cli import CLIError

    gov = _gov(args)
    expires = None
    if args.expires:
        v = args.expires.strip()
        units = {"m": 60, "h": 3600, "d": 86400, "w": 604800}
        if v[-1:] in units and v[:-1].replace(".", "", 1).isdigit():
            expires = time.time() + float(v[:-1]) * units[v[-1]]
        else:
            expires = _time(v, "--expires")
    limits = {"rpm": args.rpm, "tpm": args.tpm, "max_parallel": args.max_parallel}
    try:
        key, record = gov.keys.create(name=args.name, team=args.team, role=args.role, models=args.models,
                                      adapters=args.adapters, routes=args.routes, collections=args.collections,
                                      expires_at=expires, limits=limits, budget_usd=args.budget,
                                      budget_period=args.period)
    except ValueError as exc:
        raise CLIError(str(exc).splitlines()[0]) from None
    gov.admin_event("keys.create", _actor(), target=record.id, target_team=record.team, target_role=record.role)
    if args.json:
        print(json.dumps({"key": key, **record.public()}))
    else:
        print(key)
        print(f"# key id {record.id}, team {record.team}, role {record.role}: store the key now, it is not shown again",
              flush=True)
    return 0


def _keys_list(args) -> int:
    from datetime import datetime, timezone

    gov = _gov(args)
    rows = [r.public() for r in gov.keys.list(team=args.team, include_inactive=not args.active)]
    if args.json:
        print(json.dumps(rows))
        return 0
    for r in rows:
        r["models"] = ",".join(r["allow"]["models"])
        r["expires"] = (datetime.fromtimestamp(r["expires_at"], timezone.utc).strftime("%Y-%m-%d %H:%M")
                        if r["expires_at"] else "never")
    _table(rows, ["id", "name", "team", "role", "models", "status", "expires", "budget_usd"])
    return 0


def _keys_revoke(args) -> int:
    from loraplex.cli import CLIError

    gov = _gov(args)
    record = gov.keys.revoke(args.key_id)
    if record is None:
        raise CLIError(f"no API key with id {args.key_id!r} (see `loraplex keys list`)")
    gov.admin_event("keys.revoke", _actor(), target=args.key_id)
    print(json.dumps(record.public()) if args.json else f"revoked {args.key_id}")
    return 0


def _usage(args) -> int:
    from loraplex.cli import CLIError

    gov = _gov(args)
    groups = [g.strip() for g in args.by.split(",") if g.strip()]
    try:
        rows = gov.ledger.usage(groups, since=_time(args.since, "--since"), until=_time(args.until, "--until"),
                                key_id=args.key_id, team=args.team, model=args.model, adapter=args.adapter)
    except ValueError as exc:
        raise CLIError(str(exc).replace("group_by", "--by")) from None
    if args.json:
        print(json.dumps(rows))
    else:
        _table(rows, groups + ["requests", "prompt_tokens", "completion_tokens", "cost_usd"])
    return 0


def _audit(args) -> int:
    gov = _gov(args)
    rows = gov.audit.query(since=_time(args.since, "--since"), until=_time(args.until, "--until"),
                           key_id=args.key_id, team=args.team, model=args.model, route=args.route,
                           status=args.status, event=args.event, limit=args.limit)
    if args.json:
        for r in rows:
            print(json.dumps(r))
    else:
        for r in rows:
            r["tokens"] = f"{r.get('prompt_tokens', '')}/{r.get('completion_tokens', '')}" if "model" in r else None
            r["what"] = r.get("action") or r.get("error")
        _table(rows, ["time", "key_id", "team", "route", "model", "adapter", "status", "tokens", "cost_usd",
                      "latency_ms", "what"])
    return 0
