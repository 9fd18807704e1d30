"""Pool occupancy over time from task-instance records: who held how many slots when, and who waited.

Pure functions over plain records (no Airflow import), shared by ``mlplatform usage`` (peak GPU slots per
tenant and day), the quota load test and ``bench/quota_bench.py``.

Two views of the same task:

- **held**: the task holds its ``pool_slots`` for its whole life, first start to end, deferral included.
  That is what a pool with ``include_deferred=True`` promises for an external resource (the GPUs).
- **accounted**: what Airflow's pool accounting counts (``Pool.slots_stats``: queued + running + deferred).
  A deferred task whose trigger fired goes back to ``scheduled`` and is not counted until it is queued
  again (apache/airflow#69187), so its accounted life has a gap the held one does not.

Intervals are half-open ``[start, end)``: a slot freed at ``t`` may be taken at ``t``.
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime

# Task-instance states Airflow counts against a pool that includes deferred tasks (Pool.slots_stats).
COUNTED_STATES = frozenset({"queued", "running", "deferred"})


@dataclass(frozen=True)
class Hold:
    """``slots`` of ``pool`` taken by task instance ``key`` from ``start`` to ``end``."""

    pool: str
    key: str
    slots: int
    start: datetime
    end: datetime


@dataclass(frozen=True)
class Excess:
    """A stretch during which a pool held more slots than its size."""

    pool: str
    start: datetime
    end: datetime
    slots: int
    keys: tuple[str, ...]


def steps(holds: Iterable[Hold]) -> dict[str, list[tuple[datetime, int, frozenset[str]]]]:
    """Per pool, the occupancy step function: ``(t, slots held from t on, keys holding)``."""
    events: dict[str, list[tuple[datetime, int, Hold]]] = defaultdict(list)
    for h in holds:
        if h.end > h.start:
            events[h.pool].append((h.start, 1, h))
            events[h.pool].append((h.end, 0, h))  # ends sort before starts at the same instant
    out: dict[str, list[tuple[datetime, int, frozenset[str]]]] = {}
    for pool, evs in events.items():
        evs.sort(key=lambda e: (e[0], e[1]))
        held: dict[str, int] = {}
        series: list[tuple[datetime, int, frozenset[str]]] = []
        i = 0
        while i < len(evs):
            t = evs[i][0]
            while i < len(evs) and evs[i][0] == t:
                _, is_start, h = evs[i]
                if is_start:
                    held[h.key] = held.get(h.key, 0) + h.slots
                else:
                    held[h.key] -= h.slots
                    if not held[h.key]:
                        del held[h.key]
                i += 1
            series.append((t, sum(held.values()), frozenset(held)))
        out[pool] = series
    return out


def peaks(holds: Iterable[Hold]) -> dict[str, tuple[int, datetime | None]]:
    """Per pool, the most slots held at once and the first moment it was reached."""
    out = {}
    for pool, series in steps(holds).items():
        top, at = 0, None
        for t, slots, _ in series:
            if slots > top:
                top, at = slots, t
        out[pool] = (top, at)
    return out


def occupancy_at(holds: Iterable[Hold], pool: str, t: datetime) -> int:
    return sum(h.slots for h in holds if h.pool == pool and h.start <= t < h.end)


def excesses(holds: Iterable[Hold], limits: dict[str, int]) -> list[Excess]:
    """Every stretch during which a pool in ``limits`` held more than its limit."""
    out = []
    for pool, series in steps(holds).items():
        if pool not in limits:
            continue
        for (t, slots, keys), nxt in zip(series, series[1:] + [None]):
            if slots > limits[pool]:
                out.append(Excess(pool, t, nxt[0] if nxt else t, slots, tuple(sorted(keys))))
    return out


# ------------------------------------------------------------------------------------------ waiting


@dataclass
class Wait:
    """One stretch during which a ready task fitted into its pool's free slots but was not queued."""

    pool: str
    key: str
    slots: int
    start: datetime
    end: datetime

    @property
    def seconds(self) -> float:
        return (self.end - self.start).total_seconds()


@dataclass
class PoolTimeline:
    """Everything :func:`replay` learns about one pool from the state history of its task instances."""

    pool: str
    limit: int
    peak: int = 0
    waits: list[Wait] = field(default_factory=list)
    # per resume (deferred -> scheduled): (t, key, slots, slots Airflow counted for the other tasks,
    # other tasks of the pool waiting in scheduled at that moment)
    resumes: list[tuple[datetime, str, int, int, int]] = field(default_factory=list)


def replay(transitions: Iterable[tuple[datetime, str, str, int, str | None]], limits: dict[str, int],
           until: datetime | None = None) -> dict[str, PoolTimeline]:
    """Replay ``(t, key, pool, pool_slots, new_state)`` transitions of task instances, per pool.

    Gives Airflow's counted occupancy (queued + running + deferred) and its peak, the resumes of deferred
    tasks (deferred -> scheduled) with the occupancy counted at that moment, and every **eligible wait**:
    a stretch during which a task sat in ``scheduled`` while its ``pool_slots`` fitted into the pool's free
    slots (limit minus counted occupancy). A wait ends when the task is queued or stops fitting.
    """
    by_pool: dict[str, list[tuple[datetime, str, int, str | None]]] = defaultdict(list)
    for t, key, pool, slots, state in transitions:
        by_pool[pool].append((t, key, slots, state))
    out: dict[str, PoolTimeline] = {}
    for pool, evs in by_pool.items():
        if pool not in limits:
            continue
        evs.sort(key=lambda e: e[0])
        tl = out[pool] = PoolTimeline(pool, limits[pool])
        state: dict[str, str | None] = {}
        slots_of: dict[str, int] = {}
        waiting_since: dict[str, datetime] = {}
        i = 0
        while i < len(evs):
            t = evs[i][0]
            while i < len(evs) and evs[i][0] == t:
                _, key, slots, new = evs[i]
                old = state.get(key)
                if old == "deferred" and new == "scheduled":
                    counted = sum(slots_of[k] for k, s in state.items() if s in COUNTED_STATES)
                    waiting = sum(1 for k, s in state.items() if s == "scheduled" and k != key)
                    tl.resumes.append((t, key, slots, counted - slots, waiting))
                state[key], slots_of[key] = new, slots
                i += 1
            counted = sum(slots_of[k] for k, s in state.items() if s in COUNTED_STATES)
            tl.peak = max(tl.peak, counted)
            free = tl.limit - counted
            for key, s in state.items():
                fits = s == "scheduled" and slots_of[key] <= free
                if fits and key not in waiting_since:
                    waiting_since[key] = t
                elif not fits and key in waiting_since:
                    tl.waits.append(Wait(pool, key, slots_of[key], waiting_since.pop(key), t))
        end = until or (evs[-1][0] if evs else None)
        for key, since in waiting_since.items():
            tl.waits.append(Wait(pool, key, slots_of[key], since, max(since, end)))
    return out
