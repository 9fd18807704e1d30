"""Parse-time benchmark: N specs through the real DagBag versus N hand-written DAGs with a KPO train task.

Each figure is the median of several fresh processes. What is timed is ``DagBag(dag_folder)`` after
Airflow itself is imported (the dag-processor has Airflow loaded already), so it includes importing
this package (or the Kubernetes provider, for the hand-written DAGs), loading specs and building DAGs.

    .venv/bin/python bench/parse_bench.py [--sizes 1 100 1000] [--repeat 5]
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
EXAMPLE = (REPO / "dags" / "specs" / "acme" / "churn-xgb.yaml").read_text()

TIMER = textwrap.dedent("""
    import json, sys, time
    import airflow  # noqa: F401  (the dag-processor has this loaded already)
    from airflow.dag_processing.dagbag import DagBag
    t0 = time.perf_counter()
    bag = DagBag(dag_folder=sys.argv[1], safe_mode=False)
    elapsed = time.perf_counter() - t0
    print(json.dumps({"seconds": elapsed, "dags": len(bag.dags), "errors": len(bag.import_errors)}))
""")

HAND_HEADER = textwrap.dedent("""
    from datetime import datetime
    from airflow.sdk import DAG
    from airflow.providers.standard.operators.python import PythonOperator
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator
    from kubernetes.client import models as k8s

    def step(**_):
        return None
""")

EQUIV_HEADER = HAND_HEADER + textwrap.dedent("""
    from airflow.sdk import Asset, AssetAlias, AssetOrTimeSchedule, CronTriggerTimetable, Param
""")

# The seven pipeline tasks of both hand-written DAGs (formatted with dag_id and i).
PIPELINE_TASKS = """\
        validate = PythonOperator(task_id="validate", python_callable=step, pool="acme__cpu")
        features = PythonOperator(task_id="features", python_callable=step, pool="acme__cpu")
        train = KubernetesPodOperator(
            task_id="train", name="train-{i}", namespace="ml-acme", image="mlplatform/trainer:0.1.0",
            cmds=["python", "/opt/trainer/train.py"], env_vars={{"MLPLATFORM_FRAMEWORK": "xgboost"}},
            container_resources=k8s.V1ResourceRequirements(requests={{"cpu": "2", "memory": "4Gi"}},
                                                           limits={{"memory": "4Gi", "nvidia.com/gpu": "1"}}),
            pool="acme__gpu", pool_slots=1, do_xcom_push=True)
        evaluate = PythonOperator(task_id="evaluate", python_callable=step, pool="acme__cpu")
        register = PythonOperator(task_id="register", python_callable=step, pool="acme__cpu")
        deploy = PythonOperator(task_id="canary_deploy", python_callable=step, pool="acme__cpu")
        drift = PythonOperator(task_id="drift_monitor", python_callable=step, pool="acme__cpu", trigger_rule="none_failed")
        validate >> features >> train >> evaluate >> register >> deploy >> drift
"""

# The same DAG with what the spec gives it too: the trigger form, cron-or-drift schedule, the monitor DAG.
EQUIV_DAG = textwrap.dedent("""
    with DAG(dag_id="{dag_id}", start_date=datetime(2026, 1, 1), catchup=False, tags=["mlplatform"],
             max_active_runs=2, doc_md="# {dag_id}",
             schedule=AssetOrTimeSchedule(timetable=CronTriggerTimetable("0 3 * * *", timezone="UTC"),
                                          assets=Asset(name="{dag_id}__drift", uri="mlplatform://x/{i}/drift")),
             params={{"as_of": Param(None, type=["null", "string"], format="date"),
                     "skip_canary": Param(False, type="boolean"),
                     "hp_max_depth": Param(4, type="integer", minimum=2, maximum=10),
                     "hp_n_estimators": Param(120, type="integer", minimum=20, maximum=500)}}) as dag_{i}:
""" + PIPELINE_TASKS + """    with DAG(dag_id="{dag_id}__monitor", schedule="@daily", start_date=datetime(2026, 1, 1), catchup=False,
             max_active_runs=1, params={{"as_of": Param(None, type=["null", "string"], format="date")}}):
        PythonOperator(task_id="drift_check", python_callable=step, pool="acme__cpu",
                       outlets=[AssetAlias(name="{dag_id}__drift__monitor")])
""")

HAND_DAG = textwrap.dedent("""
    with DAG(dag_id="{dag_id}", schedule="0 3 * * *", start_date=datetime(2026, 1, 1), catchup=False,
             tags=["mlplatform"], max_active_runs=2) as dag_{i}:
""" + PIPELINE_TASKS)


def make_spec_tree(root: Path, n: int) -> Path:
    """``n`` specs for acme (copies of the demo spec under other names) plus the DAG file."""
    dags = root / "dags"
    specs = dags / "specs" / "acme"
    specs.mkdir(parents=True)
    shutil.copy(REPO / "dags" / "mlplatform_pipelines.py", dags)
    for i in range(n):
        name = f"churn-{i:04d}"
        (specs / f"{name}.yaml").write_text(EXAMPLE.replace("name: churn-xgb", f"name: {name}"))
    return dags


def make_hand_tree(root: Path, n: int, equivalent: bool = False) -> Path:
    """N hand-written DAGs: plain (the issue's floor) or with the spec's trigger form, schedule and monitor."""
    dags = root / ("hand_equivalent" if equivalent else "hand")
    dags.mkdir()
    header, dag = (EQUIV_HEADER, EQUIV_DAG) if equivalent else (HAND_HEADER, HAND_DAG)
    body = header + "".join(dag.format(dag_id=f"acme__churn-{i:04d}", i=i) for i in range(n))
    (dags / "hand_written.py").write_text(body)
    return dags


def time_dagbag(folder: Path, env: dict[str, str], repeat: int) -> dict:
    runs = []
    for _ in range(repeat):
        out = subprocess.run([sys.executable, "-c", TIMER, str(folder)], env=env, capture_output=True, text=True,
                             check=True)
        runs.append(json.loads(out.stdout.strip().splitlines()[-1]))
    seconds = sorted(r["seconds"] for r in runs)
    return {"median_s": round(statistics.median(seconds), 3), "min_s": round(seconds[0], 3),
            "max_s": round(seconds[-1], 3), "dags": runs[0]["dags"], "errors": runs[0]["errors"]}


def loader_import_seconds(env: dict[str, str], repeat: int) -> float:
    code = ("import time, airflow, airflow.sdk; t=time.perf_counter(); import mlplatform.factory.loader; "
            "print(time.perf_counter()-t)")
    vals = [float(subprocess.run([sys.executable, "-c", code], env=env, capture_output=True, text=True,
                                 check=True).stdout.strip()) for _ in range(repeat)]
    return round(statistics.median(vals), 3)


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--sizes", type=int, nargs="+", default=[1, 100, 1000])
    parser.add_argument("--repeat", type=int, default=5)
    parser.add_argument("--json", type=Path, default=REPO / "bench" / "results" / "parse.json")
    args = parser.parse_args()
    results = {"sizes": {}, "python": sys.version.split()[0], "cores": os.cpu_count()}
    with tempfile.TemporaryDirectory() as tmp:
        for n in args.sizes:
            root = Path(tmp) / f"n{n}"
            dags = make_spec_tree(root, n)
            env = dict(os.environ, MLPLATFORM_SPECS_DIR=str(dags / "specs"), AIRFLOW__CORE__LOAD_EXAMPLES="False")
            specs = time_dagbag(dags, env, args.repeat)
            hand = time_dagbag(make_hand_tree(root, n), env, args.repeat)
            equiv = time_dagbag(make_hand_tree(root, n, equivalent=True), env, args.repeat)
            row = {"specs": specs, "hand_written_kpo": hand, "hand_written_equivalent": equiv,
                   "per_spec_ms": round(1000 * specs["median_s"] / n, 2),
                   "per_pipeline_ms_hand": round(1000 * hand["median_s"] / n, 2),
                   "per_pipeline_ms_equivalent": round(1000 * equiv["median_s"] / n, 2)}
            results["sizes"][n] = row
            print(f"{n:5d} pipelines  specs {specs['median_s']:7.3f}s ({specs['dags']} DAGs)   "
                  f"hand-written plain KPO {hand['median_s']:7.3f}s ({hand['dags']} DAGs)   "
                  f"hand-written equivalent {equiv['median_s']:7.3f}s ({equiv['dags']} DAGs)", flush=True)
        results["loader_import_s"] = loader_import_seconds(dict(os.environ), args.repeat)
    print(f"loader import (after airflow): {results['loader_import_s']}s")
    args.json.parent.mkdir(parents=True, exist_ok=True)
    args.json.write_text(json.dumps(results, indent=2) + "\n")


if __name__ == "__main__":
    main()
