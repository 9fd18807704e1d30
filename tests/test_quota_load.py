"""Tenant GPU quotas under real load: real scheduler, dag-processor, triggerer and api-server, LocalExecutor
with parallelism above the quotas, metadata DB on PostgreSQL.

Three test tenants with GPU quotas 1, 2 and 4; pools synced by ``mlplatform sync-pools``; 18 runs
triggered at once (3 of a features -> plain GPU train pipeline and 3 of a deferrable GPU train pipeline
per tenant, pools and ``pool_slots`` as the DAG factory assigns them; see tests/quota_load.py for why the
DAGs are small and how they are arranged to meet apache/airflow#69187).
From Airflow's task-instance records (and a state-change audit log added to the test DB) it checks:

- **quota**: at no moment did a tenant's GPU pool count more slots than its quota (Airflow's accounting:
  queued + running + deferred), from the records and from the audit log independently;
- **#69187**: a deferred task whose trigger fired goes back to ``scheduled`` and stops counting
  (apache/airflow#69187, open). Counting every GPU task for its whole life (what ``include_deferred``
  means for the GPUs), any moment above the quota must be one where a resumed task sat in that gap; the
  test records what it saw in test-artifacts/quota_load.json and warns when it happened;
- **no starvation**: no ready GPU task waited in ``scheduled`` while its ``pool_slots`` fitted into the
  pool's free slots for longer than ``WAIT_BOUND_S`` (many scheduler loops: the scheduler loops about
  every second; the bound only catches a task left behind, not a slow machine);
- every run and task instance succeeded; the Kubernetes ResourceQuota from the same tenant file has
  ``requests.nvidia.com/gpu`` equal to the pool size;
- ``mlplatform usage`` gives exactly the GPU-slot hours and task hours computed here from the records;
- Airflow sends StatsD pool gauges (``pool.open_slots.<pool>`` ...) for the tenant pools.

No timing is asserted beyond the starvation bound; figures for the bigger load are in bench/quota_bench.py.
"""

from __future__ import annotations

import json
import subprocess
import warnings
from collections import defaultdict
from datetime import timedelta

import pytest
import yaml

from conftest import ARTIFACTS
from quota_load import QUOTAS, StatsdReceiver, analyse, dump, fetch_records, run_load

pytestmark = pytest.mark.slow

RUNS_PER_PIPELINE = 3  # x 2 pipelines = 6 runs per tenant, 18 in all
WAIT_BOUND_S = 60.0


class AirflowPoolUndercount(UserWarning):
    """apache/airflow#69187 observed: a resumed deferred task's slot went to another task."""


def test_quotas_hold_under_load(tmp_path, new_postgres_db):
    from mlplatform.local_airflow import BIN

    pytest_showwarning = warnings.showwarning  # importing Airflow replaces it (warnings go to its logging)
    db = new_postgres_db("mlplatform_quota")
    sql_conn = db.replace("postgresql://", "postgresql+psycopg2://", 1)
    with StatsdReceiver() as statsd:
        result = run_load(tmp_path, sql_conn, runs_per_pipeline=RUNS_PER_PIPELINE, statsd_port=statsd.port,
                          plain_seconds=4, defer_seconds=8, features_seconds=2, parallelism=12)
    env = result["env"]
    records = fetch_records(db)
    report = analyse(records)
    dump({"wall_seconds": result["wall_seconds"], "pools": report}, ARTIFACTS / "quota_load.json")

    # Pools as synced from the tenant files; the factory's pool_slots never exceed the quota.
    pools = {p["pool"]: p for p in records["pools"]}
    for tenant, quota in QUOTAS.items():
        assert pools[f"{tenant}__gpu"]["slots"] == quota and pools[f"{tenant}__gpu"]["include_deferred"]
    for p in result["pipelines"]:
        assert p.pool == f"{p.tenant}__gpu" and 1 <= p.pool_slots <= QUOTAS[p.tenant]

    # Every run and every GPU task instance finished, each deferrable one after a real deferral.
    assert len(records["dag_runs"]) == 6 * RUNS_PER_PIPELINE
    assert {r["state"] for r in records["dag_runs"]} == {"success"}
    assert {t["state"] for t in records["tis"]} == {"success"}
    for pool, figures in report.items():
        assert figures["task_instances"] == 2 * RUNS_PER_PIPELINE
        assert figures["deferred_task_instances"] == RUNS_PER_PIPELINE, pool
        assert len(figures["resumes"]) == RUNS_PER_PIPELINE, pool  # deferred -> scheduled, seen by the audit

    for pool, f in report.items():
        quota = f["quota"]
        # Airflow's pool accounting never went above the quota (records and audit log agree on it).
        assert f["peak_accounted_slots_records"] <= quota, (pool, f)
        assert f["peak_accounted_slots_audit"] <= quota, (pool, f)
        # The load really filled the pool (otherwise the test proves nothing).
        assert f["peak_accounted_slots_audit"] == quota, (pool, f)
        # When a deferred task's trigger fired, the pool was within quota with the task still in it.
        for r in f["resumes"]:
            assert r["others_counted"] + r["slots"] <= quota, (pool, r)
        # Counting whole task lives, any moment above quota is a resumed task's post-deferral gap (#69187).
        assert all(e["explained_by_69187"] for e in f["held_excess"]), (pool, f["held_excess"])
        # No ready task that fitted into the free slots was left waiting.
        assert f["max_eligible_wait_s"] <= WAIT_BOUND_S, (pool, f["eligible_waits_over_5s"])
    seen = {p: f["held_excess"] for p, f in report.items() if f["held_excess"]}
    if seen:
        print(json.dumps(seen, indent=1))
        with warnings.catch_warnings():
            warnings.showwarning = pytest_showwarning
            warnings.simplefilter("always", AirflowPoolUndercount)
            warnings.warn(AirflowPoolUndercount(
                "apache/airflow#69187: counting whole task lives, GPU slots held went above the quota while "
                "resumed deferred tasks waited in 'scheduled': peak held/quota "
                + ", ".join(f"{p} {report[p]['peak_held_slots']}/{report[p]['quota']}" for p in seen)
                + "; details in test-artifacts/quota_load.json"))

    # The Kubernetes ResourceQuota rendered from the same tenant files is the hard stop behind each pool.
    out = subprocess.run([str(BIN / "mlplatform"), "k8s", *QUOTAS], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    quotas = {d["metadata"]["namespace"]: d["spec"]["hard"] for d in yaml.safe_load_all(out.stdout)
              if d and d["kind"] == "ResourceQuota"}
    for tenant in QUOTAS:
        assert quotas[f"ml-{tenant}"]["requests.nvidia.com/gpu"] == str(pools[f"{tenant}__gpu"]["slots"])

    # mlplatform usage equals what the records say, per tenant (GPU-slot hours, task hours, tries).
    day = min(t["start_date"] for t in records["tis"]).date()
    out = subprocess.run([str(BIN / "mlplatform"), "usage", "--json", "--since", str(day - timedelta(days=1)),
                          "--until", str(day + timedelta(days=1))], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    got: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0, 0])
    for row in json.loads(out.stdout)["rows"]:
        g = got[row["tenant"]]
        g[0] += row["gpu_slot_hours"]
        g[1] += row["gpu_task_hours"]
        g[2] += row["task_hours"]
        g[3] += row["tasks"]
        assert 1 <= row["peak_gpu_slots"] <= QUOTAS[row["tenant"]] + max(
            (e["slots"] - QUOTAS[row["tenant"]] for e in report[f"{row['tenant']}__gpu"]["held_excess"]), default=0)
    want: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0, 0])
    for t in records["tis"]:
        tenant, _, kind = t["pool"].partition("__")
        if tenant not in QUOTAS:
            continue
        hours = (t["end_date"] - t["start_date"]).total_seconds() / 3600
        w = want[tenant]
        w[2] += hours
        w[3] += 1
        if kind == "gpu":
            w[0] += hours * t["pool_slots"]
            w[1] += hours
    assert set(got) == set(QUOTAS)
    for tenant in QUOTAS:
        assert got[tenant][3] == want[tenant][3] == 3 * RUNS_PER_PIPELINE  # features + 2 trains
        for i in range(3):
            assert got[tenant][i] == pytest.approx(want[tenant][i], rel=1e-5, abs=1e-5), (tenant, i)

    # StatsD: the scheduler reports every tenant pool; open slots stay within [0, quota].
    for tenant, quota in QUOTAS.items():
        pool = f"{tenant}__gpu"
        opens = statsd.gauges(f"airflow.pool.open_slots.{pool}")
        assert opens, sorted(n for n in statsd.names() if "pool" in n)[:40]
        assert all(0 <= v <= quota for v in opens), (pool, opens)
        assert statsd.gauges(f"airflow.pool.running_slots.{pool}")
        assert max(statsd.gauges(f"airflow.pool.running_slots.{pool}") or [0]) <= quota
        assert statsd.gauges(f"airflow.pool.open_slots.{tenant}__cpu")
    assert any(max(statsd.gauges(f"airflow.pool.deferred_slots.{t}__gpu") or [0]) > 0 for t in QUOTAS)
    assert "airflow.scheduler_heartbeat" in statsd.names()
