"""Reconcile Airflow pools with the tenant files, through Airflow's own Pool model (never from a DAG file).

Each tenant gets ``<tenant>__gpu`` (slots = GPU quota, counting deferred tasks so a deferred training job
keeps its slot) and ``<tenant>__cpu`` (every other task). Pools this module created carry a description
prefix; only those are ever updated or deleted, so hand-made pools are left alone. In multi-team mode
(``[core] multi_team``) each pool belongs to the tenant's team, which must exist (``mlplatform sync``).
"""

from __future__ import annotations

from dataclasses import dataclass

from mlplatform.spec.model import TenantFile

MANAGED_PREFIX = "mlplatform:"


@dataclass(frozen=True)
class PoolSpec:
    name: str
    slots: int
    include_deferred: bool
    description: str
    team: str | None = None


@dataclass(frozen=True)
class PoolChange:
    action: str  # create | update | delete | unchanged
    pool: str
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.action:9} {self.pool}{'  ' + self.detail if self.detail else ''}"


def desired_pools(tenants: dict[str, TenantFile], teams: bool = False) -> list[PoolSpec]:
    out = []
    for name, t in sorted(tenants.items()):
        q, team = t.spec.quotas, name if teams else None
        out.append(PoolSpec(t.gpu_pool, q.gpu_slots, True, f"{MANAGED_PREFIX} GPU slots of tenant {name}", team))
        out.append(PoolSpec(t.cpu_pool, q.cpu_slots, False, f"{MANAGED_PREFIX} task slots of tenant {name}", team))
    return out


class MissingTeams(ValueError):
    """Multi-team mode, but a tenant has no Airflow team yet."""


def sync_pools(tenants: dict[str, TenantFile], dry_run: bool = False) -> list[PoolChange]:
    """Create, update and delete managed pools so they match the tenant files; idempotent."""
    from airflow.configuration import conf
    from airflow.models.pool import Pool
    from airflow.models.team import Team
    from airflow.utils.session import create_session
    from sqlalchemy import select

    changes: list[PoolChange] = []
    teams = conf.getboolean("core", "multi_team")
    wanted = {p.name: p for p in desired_pools(tenants, teams)}
    with create_session() as session:
        missing = sorted(set(tenants) - Team.get_all_team_names(session=session)) if teams else []
        if missing and not dry_run:
            raise MissingTeams(f"multi-team mode: no Airflow team for tenant(s) {', '.join(missing)}; "
                               "run `mlplatform sync`, which creates the teams and their pools")
        existing = {p.pool: p for p in session.scalars(select(Pool))}
        for name, want in wanted.items():
            have = existing.get(name)
            team = f" team={want.team}" if want.team else ""
            if have is None:
                changes.append(PoolChange("create", name, f"slots={want.slots} include_deferred={want.include_deferred}{team}"))
            elif (have.slots, bool(have.include_deferred), have.description, have.team_name) != (
                    want.slots, want.include_deferred, want.description, want.team):
                changes.append(PoolChange("update", name, f"slots {have.slots}->{want.slots} "
                                          f"include_deferred {bool(have.include_deferred)}->{want.include_deferred}"
                                          + (f" team {have.team_name}->{want.team}" if have.team_name != want.team else "")))
            else:
                changes.append(PoolChange("unchanged", name, f"slots={want.slots}{team}"))
                continue
            if not dry_run:
                Pool.create_or_update_pool(name, want.slots, want.description, want.include_deferred,
                                           team_name=want.team, session=session)
        for name, have in existing.items():
            if name not in wanted and (have.description or "").startswith(MANAGED_PREFIX):
                changes.append(PoolChange("delete", name, "tenant file removed"))
                if not dry_run:
                    session.delete(have)
    return changes
