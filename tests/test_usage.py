"""``mlplatform usage``: per-tenant GPU-slot hours and task hours per UTC day.

The figures are checked by hand on known tries (unit), then through the CLI on a real, migrated Airflow
SQLite metadata DB holding task_instance and task_instance_history rows (tests/test_quota_load.py checks
them again against the records of a real load on PostgreSQL).
"""

from __future__ import annotations

import json
import shutil
import sqlite3
import subprocess
import sys
import uuid
from datetime import date, datetime, timezone
from pathlib import Path

import pytest

from conftest import REPO

BIN = Path(sys.executable).parent
UTC = timezone.utc


def at(day: int, hour: int, minute: int = 0) -> datetime:
    return datetime(2026, 1, day, hour, minute, tzinfo=UTC)


def tenants():
    from mlplatform.config import load_config
    from mlplatform.spec.loader import load_catalog

    return load_catalog(load_config(), only=[]).tenants  # the repo's acme (2 GPUs) and globex (1 GPU)


def test_usage_splits_days_counts_slots_and_every_try():
    from mlplatform.tenants.usage import TaskTry, compute_usage, pool_owners

    tries = [
        # acme: a 2-GPU train from 23:00 to 01:00 -> 1 h on each day, 2 slot-hours each
        TaskTry("acme__churn", "train", "r1", -1, 1, "acme__gpu", 2, at(5, 23), at(6, 1)),
        # its retry, 01:00-01:30 on day 6, and a CPU task overlapping it
        TaskTry("acme__churn", "train", "r1", -1, 2, "acme__gpu", 2, at(6, 1), at(6, 1, 30)),
        TaskTry("acme__churn", "features", "r1", -1, 1, "acme__cpu", 1, at(6, 1), at(6, 2)),
        # globex: a 1-GPU task still running at "now" (day 6, 12:00) -> counted up to now
        TaskTry("globex__upsell", "train", "r9", -1, 1, "globex__gpu", 1, at(6, 11), None),
        # not a tenant pool: ignored
        TaskTry("other", "t", "r", -1, 1, "default_pool", 1, at(6, 1), at(6, 2)),
        # outside the window: ignored
        TaskTry("acme__churn", "train", "r0", -1, 1, "acme__gpu", 2, at(1, 1), at(1, 2)),
    ]
    rows = compute_usage(tries, pool_owners(tenants()), date(2026, 1, 5), date(2026, 1, 6), now=at(6, 12))
    got = {(r.tenant, r.day.day): r for r in rows}
    assert set(got) == {("acme", 5), ("acme", 6), ("globex", 6)}
    a5, a6, g6 = got["acme", 5], got["acme", 6], got["globex", 6]
    assert (a5.gpu_slot_hours, a5.gpu_task_hours, a5.task_hours, a5.tasks) == (2.0, 1.0, 1.0, 1)
    assert a6.gpu_slot_hours == pytest.approx(2.0 + 1.0)  # 1 h x 2 slots + 0.5 h x 2 slots
    assert a6.gpu_task_hours == pytest.approx(1.5) and a6.task_hours == pytest.approx(2.5)
    assert a6.tasks == 2  # the retry and the CPU task started on day 6
    assert a6.peak_gpu_slots == 2 and a5.peak_gpu_slots == 2
    assert (g6.gpu_slot_hours, g6.tasks, g6.peak_gpu_slots) == (1.0, 1, 1)

    # The window clips: only day 6 asked for.
    rows = compute_usage(tries, pool_owners(tenants()), date(2026, 1, 6), date(2026, 1, 6), now=at(6, 12))
    assert [(r.tenant, r.day.day, r.gpu_slot_hours) for r in rows] == [("acme", 6, 3.0), ("globex", 6, 1.0)]


@pytest.fixture(scope="module")
def airflow_db(tmp_path_factory):
    from mlplatform.local_airflow import airflow, airflow_env, free_port

    home = tmp_path_factory.mktemp("airflow")
    shutil.copytree(REPO / "include" / "tenants", home / "tenants")
    env = airflow_env(home, free_port(), extra={"MLPLATFORM_TENANTS_DIR": str(home / "tenants")})
    airflow(env, "db", "migrate")
    return env, home / "airflow.db"


def _insert(db: Path, table: str, rows: list[dict]) -> None:
    with sqlite3.connect(db) as conn:  # plain sqlite3: no foreign keys, so no DAG runs are needed
        for row in rows:
            cols = ", ".join(row)
            conn.execute(f"INSERT INTO {table} ({cols}) VALUES ({', '.join('?' * len(row))})", list(row.values()))


def _ts(dt: datetime) -> str:
    return dt.astimezone(UTC).replace(tzinfo=None).isoformat(sep=" ")


def test_usage_cli_reads_task_instances_and_history(airflow_db):
    env, db = airflow_db

    def ti(task_id, run_id, try_number, pool, slots, start, end, state="success"):
        return {"id": uuid.uuid4().hex, "task_id": task_id, "dag_id": "acme__churn-xgb", "run_id": run_id,
                "map_index": -1, "try_number": try_number, "pool": pool, "pool_slots": slots,
                "start_date": _ts(start), "end_date": _ts(end), "state": state}

    current = [ti("train", "r1", 2, "acme__gpu", 2, at(6, 1), at(6, 1, 30)),
               ti("features", "r1", 1, "acme__cpu", 1, at(6, 0, 30), at(6, 1))]
    _insert(db, "task_instance", current)
    first_try = ti("train", "r1", 1, "acme__gpu", 2, at(5, 23), at(6, 0, 30), state="failed")
    first_try["task_instance_id"] = first_try.pop("id")
    _insert(db, "task_instance_history", [first_try])

    out = subprocess.run([str(BIN / "mlplatform"), "usage", "--json", "--since", "2026-01-05", "--until",
                          "2026-01-06"], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    rows = {(r["tenant"], r["day"]): r for r in json.loads(out.stdout)["rows"]}
    assert set(rows) == {("acme", "2026-01-05"), ("acme", "2026-01-06")}
    d5, d6 = rows["acme", "2026-01-05"], rows["acme", "2026-01-06"]
    assert (d5["gpu_slot_hours"], d5["task_hours"], d5["tasks"]) == (2.0, 1.0, 1)  # failed try 23:00-24:00
    assert d6["gpu_slot_hours"] == pytest.approx(2 * 0.5 + 2 * 0.5)  # failed try to 00:30, retry 01:00-01:30
    assert d6["task_hours"] == pytest.approx(0.5 + 0.5 + 0.5) and d6["tasks"] == 2
    assert d6["peak_gpu_slots"] == 2

    table = subprocess.run([str(BIN / "mlplatform"), "usage", "acme", "--since", "2026-01-05", "--until",
                            "2026-01-06"], env=env, capture_output=True, text=True)
    assert table.returncode == 0, table.stderr
    lines = table.stdout.splitlines()
    assert lines[0].split()[:3] == ["tenant", "day", "gpu_slot_h"]
    assert lines[-1].split()[:5] == ["acme", "total", "4.000", "2.000", "2.500"]

    bad = subprocess.run([str(BIN / "mlplatform"), "usage", "nobody"], env=env, capture_output=True, text=True)
    assert bad.returncode == 2 and "unknown tenant" in bad.stderr
