"""Monitor DAGs with a real scheduler: drift -> asset -> retrain; cooldown; no drift -> nothing.

Real api-server, scheduler and dag-processor (LocalExecutor, SQLite). Two small batch pipelines (acme churn,
drifted newest partition; globex accounts, no drift) are trained once each, then their monitor DAGs run.
A loopback webhook receiver stands in for the tenant's alert channel.
"""

from __future__ import annotations

import json
import shutil
import threading
import time
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from urllib.parse import unquote, urlparse

import pytest

from conftest import ARTIFACTS, REPO, set_platform_environ, write_spec

pytestmark = pytest.mark.slow

ACME, GLOBEX = "acme__churn-mon", "globex__upsell-mon"
ACME_SPEC = """\
apiVersion: mlplatform.io/v1
kind: Pipeline
metadata: {name: churn-mon, tenant: acme}
spec:
  template: batch-v1
  data: {source: acme/churn, entity: customer_id, timestamp: event_timestamp, label: churned}
  training: {framework: sklearn, model: logistic_regression}
  evaluation: {minimum: 0.5, margin_over_champion: -1.0}
  monitoring:
    schedule: null
    drift_threshold: 0.3
    cooldown: 6h
    max_retrains_per_day: 2
    columns: {monthly_charges: {method: psi, threshold: 0.2}}
"""
GLOBEX_SPEC = """\
apiVersion: mlplatform.io/v1
kind: Pipeline
metadata: {name: upsell-mon, tenant: globex}
spec:
  template: batch-v1
  data: {source: globex/accounts, entity: account_id, timestamp: event_timestamp, label: upgraded}
  training: {framework: sklearn, model: logistic_regression}
  evaluation: {minimum: 0.5}
  monitoring: {schedule: null, drift_threshold: 0.3}
"""
DAG_FILE = """\
# Test DAG file (airflow DAG factory): pipeline DAGs plus their monitor DAGs.
from mlplatform.factory.loader import load_dags
from mlplatform.factory.monitor import with_monitor_dags

globals().update(with_monitor_dags(load_dags()))
"""


class _Hook(BaseHTTPRequestHandler):
    received: list = []

    def do_POST(self):  # noqa: N802
        body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
        type(self).received.append(json.loads(body))
        self.send_response(204)
        self.end_headers()

    def log_message(self, *args):
        pass


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    from mlplatform.config import load_config
    from mlplatform.data.generate import generate_all
    from mlplatform.local_airflow import running_airflow

    root = tmp_path_factory.mktemp("monitor-e2e")
    specs, tenants, dags = root / "specs", root / "tenants", root / "dags"
    write_spec(specs, "acme", "churn-mon", ACME_SPEC)
    write_spec(specs, "globex", "upsell-mon", GLOBEX_SPEC)
    shutil.copytree(REPO / "include" / "tenants", tenants)
    with open(tenants / "acme.yaml", "a") as fh:
        fh.write("  alerts: {webhook_connection: mlp_alerts}\n")
    dags.mkdir()
    (dags / "pipelines.py").write_text(DAG_FILE)

    server = ThreadingHTTPServer(("127.0.0.1", 0), _Hook)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    hook_url = f"http://127.0.0.1:{server.server_address[1]}/hook"
    env = {"MLPLATFORM_HOME": str(root / "home"), "MLPLATFORM_SPECS_DIR": str(specs),
           "MLPLATFORM_TENANTS_DIR": str(tenants),
           "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'home' / 'mlflow.db'}",
           "AIRFLOW_CONN_MLP_ALERTS": json.dumps({"conn_type": "http", "host": hook_url})}
    restore_environ = set_platform_environ(env)
    generate_all(load_config())
    # Create the MLflow SQLite schema once: two trainers migrating a fresh file at once collide.
    from mlflow import MlflowClient

    (root / "home").mkdir(exist_ok=True)
    MlflowClient(env["MLFLOW_TRACKING_URI"]).search_experiments()
    try:
        with running_airflow(root / "airflow", extra={**env, "AIRFLOW__CORE__DAGS_FOLDER": str(dags)}) as (aenv, api, procs):
            for dag_id in (ACME, GLOBEX, f"{ACME}__monitor", f"{GLOBEX}__monitor"):
                api.wait_for_dag(dag_id, timeout=240)
            yield {"api": api, "procs": procs, "root": root, "config": load_config(), "hooks": _Hook.received}
    finally:
        server.shutdown()
        restore_environ()


def _finish(stack, dag_id, run_id, timeout=600):
    api = stack["api"]
    run = api.wait_for_run(dag_id, run_id, timeout=timeout, on_tick=lambda _: stack["procs"].check_alive())
    states = api.task_states(dag_id, run_id)
    assert run["state"] == "success", (dag_id, states)
    return states


def _asset_runs(api, dag_id):
    runs = api.http.get(f"/dags/{dag_id}/dagRuns").json()["dag_runs"]
    return [r for r in runs if r["run_type"] == "asset_triggered"]


def _monitor(stack, dag_id):
    api = stack["api"]
    run_id = api.trigger(f"{dag_id}__monitor")
    _finish(stack, f"{dag_id}__monitor", run_id, timeout=300)
    return run_id, api.xcom(f"{dag_id}__monitor", run_id, "drift_check")


def test_drift_triggers_one_retrain_cooldown_and_no_drift_triggers_nothing(stack):
    from mlflow import MlflowClient

    api, config = stack["api"], stack["config"]
    # Train both champions (acme as of the last undrifted day, so its own drift stage sees no drift).
    acme_run = api.trigger(ACME, {"as_of": "2026-11-07"})
    globex_run = api.trigger(GLOBEX)
    _finish(stack, ACME, acme_run, timeout=900)
    _finish(stack, GLOBEX, globex_run, timeout=900)
    client = MlflowClient(config.tracking_uri)
    champion = client.get_model_version_by_alias("acme.churn-mon", "champion")
    ref = champion.tags["mlplatform.reference_uri"]
    assert ref.startswith("file://") and Path(unquote(urlparse(ref).path)).is_file()
    assert _asset_runs(api, ACME) == []

    # 1. The acme monitor finds drift on the newest partition and emits the asset: one retrain starts.
    run_id, r = _monitor(stack, ACME)
    assert r["status"] == "checked" and r["drift_detected"] is True and r["event_emitted"] is True, r
    assert r["policy"]["reason"] == "allowed"
    assert r["current"] == "acme/churn@dt=2026-11-08"
    methods = {c["column"]: c for c in r["columns"]}
    assert methods["monthly_charges"]["method"] == "psi" and methods["monthly_charges"]["threshold"] == 0.2
    assert Path(r["html"]).is_file() and json.loads(Path(r["json"]).read_text())["metrics"]
    links = api.http.get(f"/dags/{ACME}__monitor/dagRuns/{run_id}/taskInstances/drift_check/links").json()["extra_links"]
    assert links["Drift report"] == Path(r["html"]).resolve().as_uri(), links
    tags = client.get_model_version("acme.churn-mon", champion.version).tags
    assert tags["mlplatform.drift_report"] == links["Drift report"]
    log = api.http.get(f"/dags/{ACME}__monitor/dagRuns/{run_id}/taskInstances/drift_check/logs/1",
                       headers={"Accept": "application/x-ndjson"}).text
    assert "DRIFT DETECTED" in log and "monthly_charges: psi score" in log
    drift_alerts = [h for h in stack["hooks"] if h["event"] == "drift"]
    assert len(drift_alerts) == 1 and drift_alerts[0]["tenant"] == "acme"
    assert drift_alerts[0]["details"]["event_emitted"] is True

    deadline = time.monotonic() + 120
    while not _asset_runs(api, ACME) and time.monotonic() < deadline:
        time.sleep(2)
    retrains = _asset_runs(api, ACME)
    assert len(retrains) == 1, "the drift asset event did not start the training DAG"

    # 2. Drift again while the retrain runs (or right after): refused, nothing emitted.
    _, r2 = _monitor(stack, ACME)
    assert r2["drift_detected"] is True and r2["event_emitted"] is False
    assert r2["policy"]["reason"] in ("retrain_running", "cooldown"), r2["policy"]
    _finish(stack, ACME, retrains[0]["dag_run_id"], timeout=900)

    # 3. Drift after the retrain finished, inside the cooldown: refused by the cooldown.
    _, r3 = _monitor(stack, ACME)
    assert r3["event_emitted"] is False and r3["policy"]["reason"] == "cooldown", r3["policy"]
    time.sleep(15)  # give the scheduler the chance to (wrongly) create a run
    assert len(_asset_runs(api, ACME)) == 1
    assert [h["details"]["policy"]["reason"] for h in stack["hooks"] if h["event"] == "drift"][1:] == \
        [r2["policy"]["reason"], "cooldown"]

    # 4. Globex: no drift, no event, no run, no alert (globex has no channel either).
    _, g = _monitor(stack, GLOBEX)
    assert g["status"] == "checked" and g["drift_detected"] is False and g["event_emitted"] is False, g
    time.sleep(10)
    assert _asset_runs(api, GLOBEX) == []
    assert all(h["tenant"] == "acme" for h in stack["hooks"])
    ARTIFACTS.mkdir(exist_ok=True)
    shutil.copy(r["html"], ARTIFACTS / "monitor_drift_report.html")
