"""Real Airflow: api-server, scheduler and dag-processor as processes, LocalExecutor, SQLite metadata DB.

One module-scoped installation: a broken spec sits next to the healthy ones; the demo pipeline runs twice
(first model promoted directly, second one through the canary gateway).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest

from conftest import REPO, set_platform_environ, write_spec

pytestmark = pytest.mark.slow

DAG_ID = "acme__churn-xgb"
STRICT = """\
apiVersion: mlplatform.io/v1
kind: Pipeline
metadata: {name: churn-strict, tenant: acme}
spec:
  data: {source: acme/churn, entity: customer_id, timestamp: event_timestamp, label: churned}
  training: {framework: sklearn, model: logistic_regression}
  evaluation: {minimum: 0.99}
  monitoring: {retrain_on_drift: false}
"""


@pytest.fixture(scope="module")
def airflow_stack(tmp_path_factory):
    from mlplatform.config import load_config
    from mlplatform.data.generate import generate_all
    from mlplatform.local_airflow import running_airflow

    root = tmp_path_factory.mktemp("e2e")
    specs = root / "specs"
    shutil.copytree(REPO / "dags" / "specs", specs)
    write_spec(specs, "globex", "broken", "apiVersion: mlplatform.io/v1\nkind: Pipeline\nmetadata: {name: broken, tenant: globex}\n"
               "spec:\n  data: {source: globex/accounts, entity: account_id, timestamp: event_timestamp, label: upgraded}\n"
               "  training: {resources: {gpu: 5}}\n")
    write_spec(specs, "acme", "churn-strict", STRICT)
    env = {"MLPLATFORM_HOME": str(root / "home"), "MLPLATFORM_SPECS_DIR": str(specs),
           "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'home' / 'mlflow.db'}"}
    restore_environ = set_platform_environ(env)
    generate_all(load_config())
    try:
        with running_airflow(root / "airflow", extra=env) as (aenv, api, procs):
            api.wait_for_dag(DAG_ID)
            yield {"api": api, "procs": procs, "root": root, "config": load_config(), "env": aenv}
    finally:
        restore_environ()


def test_dag_processor_loads_healthy_dags_and_the_broken_stand_in(airflow_stack):
    api = airflow_stack["api"]
    for dag_id in ("acme__churn-baseline", "globex__upsell", "globex__broken", "acme__churn-xgb__monitor",
                   "acme__deployments"):
        api.wait_for_dag(dag_id, timeout=60)
    assert api.import_errors() == []
    broken = api.http.get("/dags/globex__broken").json()
    assert "invalid-spec" in [t["name"] for t in broken["tags"]]
    assert broken["is_paused"] is True
    from mlplatform.local_airflow import airflow

    out = airflow(airflow_stack["env"], "dags", "list", "-o", "json").stdout
    listed = json.loads(out[out.index("[{"):])  # Airflow may print a warning line before the JSON
    assert {"acme__churn-xgb", "acme__churn-baseline", "globex__upsell", "globex__broken"} <= {d["dag_id"] for d in listed}
    details = api.http.get("/dags/globex__broken/details").json()
    assert "specs/globex/broken.yaml:6:" in details["doc_md"]
    assert "5 GPUs requested but tenant 'globex' has a quota of 1" in details["doc_md"]


def test_pools_synced_from_tenant_files(airflow_stack):
    pools = {p["name"]: p for p in airflow_stack["api"].http.get("/pools").json()["pools"]}
    assert pools["acme__gpu"]["slots"] == 2 and pools["acme__gpu"]["include_deferred"] is True
    assert pools["globex__cpu"]["slots"] == 4


def _results(airflow_stack, run_id):
    api = airflow_stack["api"]
    run = api.wait_for_run(DAG_ID, run_id, timeout=900, on_tick=lambda _: airflow_stack["procs"].check_alive())
    states = api.task_states(DAG_ID, run_id)
    return run, states, {t: api.xcom(DAG_ID, run_id, t) for t in states}


def test_pipeline_scheduled_run_then_duplicate_then_trigger_form(airflow_stack):
    """Run 1 (the cron schedule's) promotes the first model and reports drift (retraining on drift is the
    monitor DAG's job: tests/test_monitor_e2e.py); run 2 trains the champion's exact training again and is
    rejected, not registered twice (the canary against a champion on real Airflow: tests/test_canary_airflow.py);
    run 3 uses the trigger form (a hyperparameter, skip canary)."""
    from mlflow import MlflowClient

    api, config = airflow_stack["api"], airflow_stack["config"]
    client = MlflowClient(config.tracking_uri)

    run_id, run_type = api.start(DAG_ID)
    assert run_type == "scheduled"  # unpausing a cron DAG runs its latest slot: scheduled retraining
    run, states, r = _results(airflow_stack, run_id)
    assert run["state"] == "success", states
    assert set(states.values()) == {"success"}
    assert r["validate"]["success"] is True
    assert r["features"]["rows"] == r["features"]["train_rows"] + r["features"]["holdout_rows"]
    assert r["evaluate"]["decision"] == "accepted"
    assert r["register"]["version"] == "1"
    assert r["canary_deploy"]["decision"] == "promoted_first"
    drift = r["drift_monitor"]
    assert drift["drift_detected"] is True and drift["event_emitted"] is False
    assert Path(drift["html"]).is_file() and json.loads(Path(drift["json"]).read_text())
    v1 = client.get_model_version("acme.churn-xgb", "1")
    assert v1.tags["mlplatform.dag_run_id"] == run["dag_run_id"]
    assert v1.tags["mlplatform.data_fingerprint"] == r["features"]["fingerprint"]
    assert str(client.get_model_version_by_alias("acme.churn-xgb", "champion").version) == "1"

    run2, states2, r2 = _results(airflow_stack, api.trigger(DAG_ID))
    assert run2["state"] == "success", states2
    # Same data, spec and hyperparameters as the champion: not registered again, no canary.
    assert r2["evaluate"]["decision"] == "rejected" and "same training as champion v1" in r2["evaluate"]["reason"]
    assert states2["register"] == states2["canary_deploy"] == "skipped"
    assert str(client.get_model_version_by_alias("acme.churn-xgb", "champion").version) == "1"
    assert [str(v.version) for v in client.search_model_versions("name='acme.churn-xgb'")] == ["1"]

    run3, states3, r3 = _results(airflow_stack, api.trigger(DAG_ID, {"hp_max_depth": 3, "skip_canary": True,
                                                                      "hp_n_estimators": 60}))
    assert run3["state"] == "success", states3
    train_run = client.get_run(r3["train"]["run_id"])
    assert train_run.data.params["max_depth"] == "3"
    if r3["evaluate"]["decision"] == "accepted":
        assert r3["canary_deploy"]["decision"] == "promoted_skip_canary"


def test_rejected_model_skips_register_and_deploy_without_failing_the_run(airflow_stack):
    api = airflow_stack["api"]
    api.wait_for_dag("acme__churn-strict")
    run_id = api.trigger("acme__churn-strict")
    run = api.wait_for_run("acme__churn-strict", run_id, timeout=900)
    states = api.task_states("acme__churn-strict", run_id)
    assert run["state"] == "success", states
    assert states["evaluate"] == "success"
    assert states["register"] == "skipped" and states["canary_deploy"] == "skipped"
    assert states["drift_monitor"] == "success"
    evaluation = api.xcom("acme__churn-strict", run_id, "evaluate")
    assert evaluation["decision"] == "rejected" and "0.99" in evaluation["reason"]
    log = api.http.get(f"/dags/acme__churn-strict/dagRuns/{run_id}/taskInstances/register/logs/1",
                       headers={"Accept": "application/json"}).json()
    assert "model rejected by evaluate" in json.dumps(log)
    # The tenant-influenced stages ran in the sandbox (mlplatform.sandbox), and their own log lines still
    # reached the task log.
    from mlplatform.sandbox import namespaces_available

    log = json.dumps(api.http.get(f"/dags/acme__churn-strict/dagRuns/{run_id}/taskInstances/evaluate/logs/1",
                                  headers={"Accept": "application/json"}).json())
    isolation = "PID+mount namespaces" if namespaces_available()[0] else "scrubbed environment"
    assert "mlplatform.stages.entry:evaluate: stage process started in" in log and isolation in log, log[-2000:]
    assert "evaluation REJECTED" in log
