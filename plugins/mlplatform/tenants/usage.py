"""Per-tenant usage for chargeback, from Airflow's task-instance records (``mlplatform usage``).

A task belongs to the tenant whose pool it ran in (the pools ``mlplatform sync-pools`` manages:
``<tenant>__gpu`` and ``<tenant>__cpu``, see :mod:`mlplatform.tenants.pools`). Every try counts: the
current try from ``task_instance`` and earlier ones from ``task_instance_history`` (a failed try held its
GPUs too). A try lasts from its ``start_date`` to its ``end_date`` (a deferred task keeps its start date
when it resumes, so its deferral is included, as the GPU pool's ``include_deferred`` counts it); a try
still running counts up to now. Durations are split across UTC days and clipped to the window.

Figures per tenant and day:

- ``gpu_slot_hours``: ``pool_slots`` x hours of tries in the tenant's GPU pool;
- ``gpu_task_hours`` and ``task_hours``: hours of tries in the GPU pool, and in any of the tenant's pools;
- ``tasks``: tries that started that day; ``peak_gpu_slots``: most GPU slots held at once that day.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import asdict, dataclass
from datetime import date, datetime, time, timedelta, timezone

from mlplatform.tenants.occupancy import Hold, peaks

UTC = timezone.utc


@dataclass(frozen=True)
class TaskTry:
    """One try of one task instance, as the usage figures need it."""

    dag_id: str
    task_id: str
    run_id: str
    map_index: int
    try_number: int
    pool: str
    pool_slots: int
    start: datetime
    end: datetime | None  # None: still running

    @property
    def key(self) -> str:
        return f"{self.dag_id}/{self.run_id}/{self.task_id}/{self.map_index}#{self.try_number}"


@dataclass
class UsageRow:
    tenant: str
    day: date
    gpu_slot_hours: float = 0.0
    gpu_task_hours: float = 0.0
    task_hours: float = 0.0
    tasks: int = 0
    peak_gpu_slots: int = 0

    def as_json(self) -> dict:
        out = asdict(self)
        out["day"] = self.day.isoformat()
        for k in ("gpu_slot_hours", "gpu_task_hours", "task_hours"):
            out[k] = round(out[k], 6)
        return out


def pool_owners(tenants: dict) -> dict[str, tuple[str, str]]:
    """``pool name -> (tenant, "gpu" | "cpu")`` for every tenant file (the names sync-pools creates)."""
    out = {}
    for name, t in tenants.items():
        out[t.gpu_pool] = (name, "gpu")
        out[t.cpu_pool] = (name, "cpu")
    return out


def _aware(dt: datetime | None) -> datetime | None:
    if dt is None:
        return None
    return dt if dt.tzinfo else dt.replace(tzinfo=UTC)


def window(since: date, until: date) -> tuple[datetime, datetime]:
    """``[since 00:00 UTC, the day after until 00:00 UTC)``: both dates inclusive."""
    return (datetime.combine(since, time(), UTC), datetime.combine(until + timedelta(days=1), time(), UTC))


def load_tries(pools: Iterable[str], start: datetime, end: datetime, session=None) -> list[TaskTry]:
    """Tries in ``pools`` that overlap ``[start, end)``, from task_instance and task_instance_history."""
    from airflow.models.taskinstance import TaskInstance as TI
    from airflow.models.taskinstancehistory import TaskInstanceHistory as TIH
    from airflow.utils.session import create_session
    from sqlalchemy import or_, select

    pools = list(pools)

    def query(model):
        return (select(model.dag_id, model.task_id, model.run_id, model.map_index, model.try_number, model.pool,
                       model.pool_slots, model.start_date, model.end_date)
                .where(model.pool.in_(pools), model.start_date.is_not(None), model.start_date < end,
                       or_(model.end_date.is_(None), model.end_date > start)))

    def fetch(s) -> list[TaskTry]:
        seen: dict[tuple, TaskTry] = {}
        # History first: a try archived there and still on the TI row (cleared, not yet rerun) counts once.
        for model in (TIH, TI):
            for row in s.execute(query(model)):
                t = TaskTry(row.dag_id, row.task_id, row.run_id, row.map_index, row.try_number, row.pool,
                            int(row.pool_slots or 1), _aware(row.start_date), _aware(row.end_date))
                seen[(t.dag_id, t.task_id, t.run_id, t.map_index, t.try_number)] = t
        return list(seen.values())

    if session is not None:
        return fetch(session)
    with create_session() as s:
        return fetch(s)


def _split_by_day(start: datetime, end: datetime) -> Iterable[tuple[date, float]]:
    """Seconds of ``[start, end)`` per UTC day."""
    t = start
    while t < end:
        next_midnight = datetime.combine(t.date() + timedelta(days=1), time(), UTC)
        stop = min(end, next_midnight)
        yield t.date(), (stop - t).total_seconds()
        t = stop


def compute_usage(tries: Iterable[TaskTry], owners: dict[str, tuple[str, str]], since: date, until: date,
                  now: datetime | None = None) -> list[UsageRow]:
    """Usage rows per (tenant, day) for the days in ``[since, until]`` that have any usage."""
    lo, hi = window(since, until)
    now = now or datetime.now(UTC)
    rows: dict[tuple[str, date], UsageRow] = {}
    holds: dict[tuple[str, date], list[Hold]] = defaultdict(list)

    def row(tenant: str, day: date) -> UsageRow:
        return rows.setdefault((tenant, day), UsageRow(tenant, day))

    for t in tries:
        if t.pool not in owners:
            continue
        tenant, kind = owners[t.pool]
        start, end = max(t.start, lo), min(t.end or now, hi)
        if lo <= t.start < hi:
            row(tenant, t.start.date()).tasks += 1
        for day, seconds in _split_by_day(start, end):
            r = row(tenant, day)
            hours = seconds / 3600
            r.task_hours += hours
            if kind == "gpu":
                r.gpu_task_hours += hours
                r.gpu_slot_hours += hours * t.pool_slots
        if kind == "gpu":
            for day, _ in _split_by_day(start, end):
                day_lo, day_hi = window(day, day)
                holds[(tenant, day)].append(Hold(t.pool, t.key, t.pool_slots, max(start, day_lo), min(end, day_hi)))
    for (tenant, day), hs in holds.items():
        rows[(tenant, day)].peak_gpu_slots = max((p for p, _ in peaks(hs).values()), default=0)
    return [rows[k] for k in sorted(rows)]


def usage_report(tenants: dict, since: date, until: date, only: list[str] | None = None,
                 now: datetime | None = None) -> list[UsageRow]:
    """Read the metadata DB Airflow is configured for and compute the rows for ``tenants`` (or ``only``)."""
    owners = {p: o for p, o in pool_owners(tenants).items() if not only or o[0] in only}
    lo, hi = window(since, until)
    return compute_usage(load_tries(owners, lo, hi), owners, since, until, now=now)


def format_table(rows: list[UsageRow]) -> str:
    head = f"{'tenant':16} {'day':10} {'gpu_slot_h':>11} {'gpu_task_h':>11} {'task_h':>9} {'tasks':>6} {'peak_gpu':>8}"
    lines = [head]
    totals: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0, 0])
    for r in rows:
        lines.append(f"{r.tenant:16} {r.day.isoformat():10} {r.gpu_slot_hours:11.3f} {r.gpu_task_hours:11.3f} "
                     f"{r.task_hours:9.3f} {r.tasks:6d} {r.peak_gpu_slots:8d}")
        tot = totals[r.tenant]
        tot[0] += r.gpu_slot_hours
        tot[1] += r.gpu_task_hours
        tot[2] += r.task_hours
        tot[3] += r.tasks
    for tenant, (g, gt, th, n) in sorted(totals.items()):
        lines.append(f"{tenant:16} {'total':10} {g:11.3f} {gt:11.3f} {th:9.3f} {int(n):6d} {'':>8}")
    return "\n".join(lines)
