"""Reconcile Airflow pools with the tenant files, through Airflow's own Pool model (never from a DAG file).

Each tenant gets ``<tenant>__gpu`` (slots = GPU quota, counting deferred tasks so a deferred training job
keeps its slot) and ``<tenant>__cpu`` (every other task). Pools this module created carry a description
prefix; only those are ever updated or deleted, so hand-made pools are left alone.
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


@dataclass(frozen=True)
class PoolChange:
    action: str  # create | update | delete | unchanged
    pool: str
    detail: str = ""

    def __str__(self) -> str:
        return f"{self.action:9} {self.pool}{'  ' + self.detail if self.detail else ''}"


def desired_pools(tenants: dict[str, TenantFile]) -> list[PoolSpec]:
    out = []
    for name, t in sorted(tenants.items()):
        q = t.spec.quotas
        out.append(PoolSpec(t.gpu_pool, q.gpu_slots, True, f"{MANAGED_PREFIX} GPU slots of tenant {name}"))
        out.append(PoolSpec(t.cpu_pool, q.cpu_slots, False, f"{MANAGED_PREFIX} task slots of tenant {name}"))
    return out


def sync_pools(tenants: dict[str, TenantFile], dry_run: bool = False) -> list[PoolChange]:
    """Create, update and delete managed pools so they match the tenant files; idempotent."""
    from airflow.models.pool import Pool
    from airflow.utils.session import create_session
    from sqlalchemy import select

    changes: list[PoolChange] = []
    wanted = {p.name: p for p in desired_pools(tenants)}
    with create_session() as session:
        existing = {p.pool: p for p in session.scalars(select(Pool))}
        for name, want in wanted.items():
            have = existing.get(name)
            if have is None:
                changes.append(PoolChange("create", name, f"slots={want.slots} include_deferred={want.include_deferred}"))
            elif (have.slots, bool(have.include_deferred), have.description) != (want.slots, want.include_deferred, want.description):
                changes.append(PoolChange("update", name, f"slots {have.slots}->{want.slots} "
                                          f"include_deferred {bool(have.include_deferred)}->{want.include_deferred}"))
            else:
                changes.append(PoolChange("unchanged", name, f"slots={want.slots}"))
                continue
            if not dry_run:
                Pool.create_or_update_pool(name, want.slots, want.description, want.include_deferred, session=session)
        for name, have in existing.items():
            if name not in wanted and (have.description or "").startswith(MANAGED_PREFIX):
                changes.append(PoolChange("delete", name, "tenant file removed"))
                if not dry_run:
                    session.delete(have)
    return changes
