"""Tenant GPU quotas under a bigger load: the quota load test's setup with more runs, and its figures.

    .venv/bin/python bench/quota_bench.py [--runs-per-pipeline 10] [--parallelism 12]

Real api-server, scheduler, dag-processor and triggerer (LocalExecutor), metadata DB on a fresh
PostgreSQL database on 127.0.0.1:5432 (dropped afterwards). Three tenants with GPU quotas 1, 2 and 4;
per tenant two pipelines whose train task takes the pool and ``pool_slots`` the DAG factory assigns
(``train-local``: features on the CPU pool, then a plain GPU task; ``train-pod``: a GPU task that defers
to the triggerer and resumes on a worker). Every run is triggered at once; see tests/quota_load.py.

Figures (bench/results/quota.json): runs, task instances, peak GPU slots per tenant as Airflow counts them
and counting whole task lives (apache/airflow#69187), post-deferral gaps and how many resumed tasks were
overtaken, the longest wait of a ready task that fitted into free slots, wall time (unpause to last run
finished) and scheduler throughput (task instances finished per minute, task starts incl. resumes).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
import uuid
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "tests"))
os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")

import psycopg  # noqa: E402

from quota_load import QUOTAS, analyse, fetch_records, run_load  # noqa: E402

RESULTS = Path(__file__).resolve().parent / "results" / "quota.json"
ADMIN = "postgresql://postgres@127.0.0.1:5432/postgres"


def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--runs-per-pipeline", type=int, default=10, help="runs of each of the 6 pipelines")
    ap.add_argument("--parallelism", type=int, default=12)
    ap.add_argument("--plain-seconds", type=int, default=4)
    ap.add_argument("--defer-seconds", type=int, default=8)
    ap.add_argument("--features-seconds", type=int, default=2)
    ap.add_argument("--out", default=str(RESULTS))
    args = ap.parse_args()

    name = f"mlplatform_quota_bench_{uuid.uuid4().hex[:8]}"
    admin = psycopg.connect(ADMIN, autocommit=True)
    admin.execute(f'CREATE DATABASE "{name}"')
    url = f"postgresql://postgres@127.0.0.1:5432/{name}"
    try:
        with tempfile.TemporaryDirectory(prefix="quota-bench-") as tmp:
            def progress(done, total, _last=[-1]):
                if done != _last[0]:
                    print(f"  {done}/{total} runs finished", flush=True)
                    _last[0] = done

            load = run_load(Path(tmp), url.replace("postgresql://", "postgresql+psycopg2://", 1),
                            runs_per_pipeline=args.runs_per_pipeline, plain_seconds=args.plain_seconds,
                            defer_seconds=args.defer_seconds, features_seconds=args.features_seconds,
                            parallelism=args.parallelism, timeout=3600, progress=progress)
            records = fetch_records(url)
    finally:
        admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()

    pools = analyse(records)
    tis = records["tis"]
    first = min(t["queued_dttm"] or t["start_date"] for t in tis)
    last = max(t["end_date"] for t in tis)
    busy_min = (last - first).total_seconds() / 60
    starts = sum(1 for e in records["log"] if e["event"] == "running")
    tenants = {}
    for tenant, quota in QUOTAS.items():
        f = pools[f"{tenant}__gpu"]
        tenants[tenant] = {
            "gpu_quota": quota,
            "gpu_task_instances": f["task_instances"],
            "deferred_task_instances": f["deferred_task_instances"],
            "peak_gpu_slots_counted_by_airflow": f["peak_accounted_slots_audit"],
            "peak_gpu_slots_whole_task_life": f["peak_held_slots"],
            "moments_above_quota_whole_life": len(f["held_excess"]),
            "resumed_tasks_overtaken": len(f["admitted_during_gap"]),
            "max_post_deferral_gap_s": round(f["post_deferral_gap_s"]["max"], 2),
            "max_eligible_wait_s": round(f["max_eligible_wait_s"], 2),
        }
    figures = {
        "machine": {"python": platform.python_version(), "cpus": os.cpu_count(),
                    "load_avg_at_end": os.getloadavg()},
        "config": {k: v for k, v in vars(args).items() if k != "out"}
        | {"quotas": QUOTAS, "executor": "LocalExecutor", "db": "postgresql"},
        "runs": len(records["dag_runs"]),
        "runs_succeeded": sum(1 for r in records["dag_runs"] if r["state"] == "success"),
        "task_instances": len(tis),
        "task_starts_incl_resumes": starts,
        "wall_seconds": round(load["wall_seconds"], 1),
        "throughput_tasks_per_min": round(len(tis) / busy_min, 1),
        "throughput_starts_per_min": round(starts / busy_min, 1),
        "tenants": tenants,
    }
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out).write_text(json.dumps(figures, indent=2) + "\n")
    print(json.dumps(figures, indent=2))
    ok = figures["runs_succeeded"] == figures["runs"] and all(
        t["peak_gpu_slots_counted_by_airflow"] <= t["gpu_quota"] for t in tenants.values())
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
