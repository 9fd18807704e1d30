"""A deferred task keeps its GPU-pool slots: real scheduler, dag-processor, triggerer and api-server.

The tenant GPU pools are synced with ``include_deferred=True``: while a deferrable training task waits in
the triggerer it still holds its slots, so another task of the same tenant cannot take the GPUs.
"""

from __future__ import annotations

import time

import pytest

pytestmark = pytest.mark.slow

DAGS = '''
from datetime import datetime, timedelta
from airflow.sdk import DAG
from airflow.providers.standard.operators.bash import BashOperator
from airflow.providers.standard.sensors.time_delta import TimeDeltaSensor

with DAG("gpu_holder", schedule=None, start_date=datetime(2026, 1, 1), catchup=False):
    TimeDeltaSensor(task_id="train", delta=timedelta(seconds=45), deferrable=True, pool="acme__gpu", pool_slots=2)

with DAG("gpu_waiter", schedule=None, start_date=datetime(2026, 1, 1), catchup=False):
    # Not an EmptyOperator: the scheduler finishes those itself, without queueing them through a pool.
    BashOperator(task_id="train", bash_command="true", pool="acme__gpu", pool_slots=1)
'''


def _state(api, dag_id, run_id):
    return api.task_states(dag_id, run_id).get("train")


def test_deferred_task_holds_its_gpu_slots(tmp_path):
    from mlplatform.local_airflow import running_airflow

    dags = tmp_path / "dags"
    dags.mkdir()
    (dags / "pool_dags.py").write_text(DAGS)
    components = ("api-server", "scheduler", "dag-processor", "triggerer")
    with running_airflow(tmp_path / "airflow", extra={"AIRFLOW__CORE__DAGS_FOLDER": str(dags)},
                         components=components) as (env, api, procs):
        api.wait_for_dag("gpu_holder")
        api.wait_for_dag("gpu_waiter")
        holder = api.trigger("gpu_holder")
        deadline = time.monotonic() + 120
        while _state(api, "gpu_holder", holder) != "deferred":
            assert time.monotonic() < deadline, "holder never deferred"
            procs.check_alive()
            time.sleep(1)
        waiter = api.trigger("gpu_waiter")
        pool = api.http.get("/pools/acme__gpu").json()
        assert pool["include_deferred"] is True and pool["deferred_slots"] == 2 and pool["open_slots"] == 0
        # While the holder is deferred the waiter must not start, however long the scheduler loops.
        for _ in range(15):
            assert _state(api, "gpu_holder", holder) == "deferred"
            assert _state(api, "gpu_waiter", waiter) in (None, "scheduled"), "waiter ran while the GPUs were held"
            time.sleep(1)
        assert api.wait_for_run("gpu_holder", holder, timeout=180)["state"] == "success"
        assert api.wait_for_run("gpu_waiter", waiter, timeout=120)["state"] == "success"
