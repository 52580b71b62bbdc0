"""Team limits and budgets: `governance.teams` in the config, overridden by what admins set over the API.

The overrides live in the governance database, so every gateway replica (and process) enforces an edit from
its next request on; deleting an override returns the team to its config policy, or to no policy.
"""

from __future__ import annotations

import json
import re
import time

from serving.governance.config import GovernanceConfig, TeamPolicy
from serving.governance.db import Database

_NAME_RE = re.compile(r"^[A-Za-z0-9][A-Za-z0-9_.@-]{0,199}$")


def check_team_name(name: str) -> str:
    if not _NAME_RE.match(name):
        raise ValueError(f"team name {name!r}: use 1-200 letters, digits and . _ @ -, starting with a letter or digit")
    return name


class TeamStore:
    def __init__(self, db: Database, config: GovernanceConfig):
        self.db = db
        self.config = config

    def get(self, name: str) -> TeamPolicy | None:
        """The policy in force: the database's override, else the config's, else None (no team limits)."""
        rows = self.db.query("SELECT policy FROM teams WHERE name = ?", (name,))
        if rows:
            return TeamPolicy.model_validate_json(rows[0]["policy"])
        return self.config.teams.get(name)

    def overrides(self) -> dict[str, dict]:
        """name -> {updated_at, updated_by} for the teams edited over the API (their policies: `get`)."""
        return {r["name"]: {"updated_at": r["updated_at"], "updated_by": r["updated_by"]}
                for r in self.db.query("SELECT name, updated_at, updated_by FROM teams")}

    def put(self, name: str, policy: TeamPolicy, actor: str) -> None:
        check_team_name(name)
        with self.db.tx() as c:
            c.execute("INSERT INTO teams VALUES (?,?,?,?) ON CONFLICT(name) DO UPDATE SET policy = excluded.policy, "
                      "updated_at = excluded.updated_at, updated_by = excluded.updated_by",
                      (name, json.dumps(policy.model_dump(mode="json")), time.time(), actor))

    def delete(self, name: str) -> bool:
        """Drop an override; False if the team had none."""
        with self.db.tx() as c:
            return c.execute("DELETE FROM teams WHERE name = ?", (name,)).rowcount > 0
