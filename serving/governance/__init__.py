"""Governance for the OpenAI-compatible API: API keys and roles, rate limits and budgets, spend accounting,
PII guardrails and the audit log.

  config.py      GovernanceConfig (strict): open_access, database, limits, teams, PII policies, audit, prices
  keys.py        KeyStore (salted hashes in SQLite), Principal, glob allow-lists
  limits.py      sliding-window RPM/TPM and max parallel (in process)
  budgets.py     reserve -> settle budgets per key and team (SQLite transactions)
  spend.py       the usage ledger, usage reports, Prometheus collector
  pii.py         detectors (Luhn, mod-97, national ids, secrets), redact, StreamGuard
  audit.py       append-only JSON-lines audit log with rotation
  core.py        Governance (authenticate, authorize, admit) and Ticket (guard outputs, settle)
  middleware.py  ASGI middleware: auth, route roles, RPM/parallel, one audit entry per request
  api.py         admin keys, /v1/usage, /v1/admin/audit routes; install(app, gov)
  cli.py         loraplex keys | usage | audit

Gateway use:
  gov = Governance(load_config(path), prices={"smollm2": Price(...)}, registry=REGISTRY)
  install(app, gov)
  ticket = gov.admit(request, route=..., model=..., adapter=..., prompt=messages,
                     prompt_tokens=n, max_tokens=m)          # 401/403/429/400 as GovernanceError
  async for text in ticket.guard_output(deltas): ...        # redacts / blocks personal data in outputs
  ticket.settle(prompt_tokens, completion_tokens, status=200)
"""

from serving.governance.api import governance_router, install
from serving.governance.config import GovernanceConfig, load_config
from serving.governance.core import Governance, Ticket
from serving.governance.errors import GovernanceError, PIIBlocked
from serving.governance.keys import Principal

__all__ = ["Governance", "GovernanceConfig", "GovernanceError", "PIIBlocked", "Principal", "Ticket",
           "governance_router", "install", "load_config"]
