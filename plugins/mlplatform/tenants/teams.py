"""One Airflow team per tenant (``[core] multi_team``), and the tenant's listed connections scoped to it.

Teams are only ever created: a team without a tenant file is reported and left alone (Airflow's own
``airflow teams delete`` refuses while the team still owns bundles, pools, connections or variables).
A connection a tenant file lists gets that tenant's team, so no other team's task can read it; a
connection with no team stays readable by every team, as Airflow defines it.
"""

from __future__ import annotations

import re

from mlplatform.config import PlatformConfig
from mlplatform.spec.model import TenantFile
from mlplatform.tenants.reconcile import Change, tenant_problem

TEAM_NAME_RE = re.compile(r"^[a-zA-Z0-9_-]{3,50}$")  # what `airflow teams create` accepts


def team_problems(tenants: dict[str, TenantFile], config: PlatformConfig) -> list[str]:
    """Tenant names that cannot be team names, and connections claimed by two tenants."""
    problems = []
    owner: dict[str, str] = {}
    for name, tenant in sorted(tenants.items()):
        if not TEAM_NAME_RE.match(name):
            problems.append(tenant_problem(config, name, ("metadata", "name"),
                                           f"tenant {name!r} cannot be an Airflow team: team names have 3 to 50 "
                                           "characters; rename the tenant"))
        for index, conn_id in enumerate(tenant.spec.connections):
            if conn_id in owner:
                problems.append(tenant_problem(config, name, ("spec", "connections", index),
                                               f"connection {conn_id!r} is also listed by tenant {owner[conn_id]!r}; "
                                               "in multi-team mode a connection belongs to one team"))
            owner.setdefault(conn_id, name)
    return problems


def sync_teams(tenants: dict[str, TenantFile], session, dry_run: bool = False) -> list[Change]:
    """Create the team of every tenant; report teams that have no tenant file."""
    from airflow.models.team import Team

    existing = Team.get_all_team_names(session=session)
    changes = []
    for name in sorted(tenants):
        if name in existing:
            changes.append(Change("team", "unchanged", name))
            continue
        changes.append(Change("team", "create", name))
        if not dry_run:
            session.add(Team(name=name))
    for name in sorted(existing - set(tenants)):
        changes.append(Change("team", "keep", name, "no tenant file; delete with `airflow teams delete` when empty"))
    if not dry_run:
        session.flush()
    return changes


def sync_connections(tenants: dict[str, TenantFile], session, dry_run: bool = False) -> list[Change]:
    """Give each connection a tenant file lists that tenant's team."""
    from airflow.models.connection import Connection
    from sqlalchemy import select

    changes = []
    for name, tenant in sorted(tenants.items()):
        for conn_id in tenant.spec.connections:
            conn = session.scalar(select(Connection).where(Connection.conn_id == conn_id))
            if conn is None:
                changes.append(Change("connection", "missing", conn_id,
                                      f"listed by tenant {name}; not in the metadata DB (the next sync scopes it "
                                      f"once created; env connections: AIRFLOW_CONN__{name.upper()}___<ID>)"))
            elif conn.team_name == name:
                changes.append(Change("connection", "unchanged", conn_id, f"team={name}"))
            else:
                changes.append(Change("connection", "update", conn_id, f"team {conn.team_name}->{name}"))
                if not dry_run:
                    conn.team_name = name
    return changes
