"""Deferrable canary on real Airflow: scheduler, dag-processor, api-server and triggerer as processes, the
standalone gateway (``python -m mlplatform.serving``) as a process, and real client traffic from this test.

Run 1 promotes the first model directly. Run 2 goes through two canary steps; each bake waits in the
triggerer (the task is ``deferred``, holding no worker slot), and the triggerer is SIGKILLed mid-bake and
started again: the run still finishes, promoted through every step, one champion, the old one ``previous``.
"""

from __future__ import annotations

import json
import os
import shutil
import subprocess
import sys
import threading
import time

import httpx
import pytest

from conftest import set_platform_environ, write_spec

pytestmark = pytest.mark.slow

DAG_ID = "acme__churn-canary"
MODEL = "acme.churn-canary"
SPEC = """\
apiVersion: mlplatform.io/v1
kind: Pipeline
metadata: {name: churn-canary, tenant: acme}
spec:
  data: {source: acme/churn, entity: customer_id, timestamp: event_timestamp, label: churned}
  training: {framework: sklearn, model: logistic_regression}
  evaluation: {margin_over_champion: -1.0}  # run 2 (one more day of data) is accepted whatever its score
  deployment:
    steps: [0.25, 1.0]
    bake_time: 8s
    gates: {min_requests: 10, max_error_rate: 0.01, max_p99_latency_ms: 5000}
  monitoring: {retrain_on_drift: false}
"""


def _wait(predicate, timeout: float, what: str, tick=None):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = predicate()
        if value:
            return value
        if tick:
            tick()
        time.sleep(0.5)
    raise TimeoutError(what)


class ClientTraffic:
    """Two client threads posting rows to the gateway (about 100 requests/s) until stopped."""

    def __init__(self, url: str, token: str):
        self.url, self.token = url, token
        self.rows: list[dict] = []
        self.status: dict[int, int] = {}
        self._stop = threading.Event()
        self._threads = [threading.Thread(target=self._run, daemon=True) for _ in range(2)]

    def start(self, rows: list[dict]) -> None:
        self.rows = rows
        for t in self._threads:
            t.start()

    def _run(self) -> None:
        headers = {"Authorization": f"Bearer {self.token}"}
        with httpx.Client(base_url=self.url, timeout=10, headers=headers) as http:
            i = 0
            while not self._stop.wait(0.02):
                try:
                    code = http.post("/v1/models/acme/churn-canary:predict",
                                     json={"inputs": self.rows[i % len(self.rows)]}).status_code
                    self.status[code] = self.status.get(code, 0) + 1
                except httpx.HTTPError:
                    pass
                i += 1

    def stop(self) -> None:
        self._stop.set()
        for t in self._threads:
            t.join(timeout=15)


@pytest.fixture(scope="module")
def stack(tmp_path_factory):
    from mlflow import MlflowClient

    from mlplatform.config import load_config
    from mlplatform.data.generate import generate_all
    from mlplatform.local_airflow import free_port, running_airflow
    from mlplatform.serving.auth import add_token

    root = tmp_path_factory.mktemp("canary-airflow")
    specs = root / "specs"
    write_spec(specs, "acme", "churn-canary", SPEC)
    home = root / "home"
    port = free_port()
    gateway_url = f"http://127.0.0.1:{port}"
    env = {"MLPLATFORM_HOME": str(home), "MLPLATFORM_SPECS_DIR": str(specs),
           "MLFLOW_TRACKING_URI": f"sqlite:///{home / 'mlflow.db'}", "MLPLATFORM_GATEWAY_URL": gateway_url}
    restore_environ = set_platform_environ(env)
    config = load_config()
    generate_all(config)
    client = MlflowClient(config.tracking_uri, config.tracking_uri)
    client.search_registered_models()  # creates the registry DB once, before two processes race to
    tokens = home / "gateway" / "tokens.json"
    platform_token, acme_token = add_token(tokens, "*"), add_token(tokens, "acme")
    gateway_log = (root / "gateway.log").open("ab")
    gateway = subprocess.Popen([sys.executable, "-m", "mlplatform.serving", "--reload-interval", "0.5"],
                               env={**os.environ, "MLPLATFORM_GATEWAY_PORT": str(port)},
                               stdout=gateway_log, stderr=subprocess.STDOUT)
    connection = json.dumps({"conn_type": "http", "host": gateway_url, "password": platform_token})
    traffic = ClientTraffic(gateway_url, acme_token)
    try:
        _wait(lambda: _ready(gateway_url, gateway), 120, "gateway not ready")
        with running_airflow(root / "airflow", extra={**env, "AIRFLOW_CONN_MLPLATFORM_GATEWAY": connection},
                             components=("api-server", "scheduler", "dag-processor", "triggerer")) as (_, api, procs):
            api.wait_for_dag(DAG_ID)
            yield {"api": api, "procs": procs, "client": client, "traffic": traffic, "gateway": gateway_url,
                   "root": root, "platform_token": platform_token}
    finally:
        traffic.stop()
        gateway.terminate()
        gateway.wait(timeout=30)
        gateway_log.close()
        restore_environ()


def _ready(url: str, proc) -> bool:
    assert proc.poll() is None, "the gateway process exited"
    try:
        return httpx.get(f"{url}/readyz", timeout=1).status_code == 200
    except httpx.HTTPError:
        return False


def test_deferred_bakes_survive_a_triggerer_crash_and_promote(stack):
    from mlplatform.stages.canary_state import CanaryMachine
    from mlplatform.stages.deploy import _holdout_rows

    api, procs, client = stack["api"], stack["procs"], stack["client"]
    run1 = api.trigger(DAG_ID, {"as_of": "2026-11-07"})  # run 2 trains on one more day: not the same training
    assert api.wait_for_run(DAG_ID, run1, 900, on_tick=lambda _: procs.check_alive())["state"] == "success"
    first = api.xcom(DAG_ID, run1, "canary_deploy")
    assert first["decision"] == "promoted_first" and first["champion_version"] == "1"
    platform = {"Authorization": f"Bearer {stack['platform_token']}"}  # /v1/routes needs a token
    _wait(lambda: httpx.get(stack["gateway"] + "/v1/routes", headers=platform).json()["routes"].get(MODEL, {})
          .get("champion") == "1",
          60, "the gateway did not pick up champion 1")
    stack["traffic"].start(_holdout_rows(api.xcom(DAG_ID, run1, "features")))

    run2 = api.trigger(DAG_ID)

    def canary_state():
        procs.check_alive()
        return api.task_states(DAG_ID, run2).get("canary_deploy")

    _wait(lambda: canary_state() == "deferred", 900, "canary_deploy never deferred")
    procs.kill("triggerer")  # mid-bake: the trigger dies with it
    time.sleep(3)
    assert api.task_states(DAG_ID, run2)["canary_deploy"] == "deferred"  # still waiting, on no worker
    procs.spawn("triggerer")  # a new triggerer adopts the orphaned trigger once the old one's heartbeat is stale
    run = api.wait_for_run(DAG_ID, run2, 900, on_tick=lambda _: procs.check_alive())
    states = api.task_states(DAG_ID, run2)
    assert run["state"] == "success", states
    result = api.xcom(DAG_ID, run2, "canary_deploy")
    version = api.xcom(DAG_ID, run2, "register")["version"]
    assert result["decision"] == "promoted", result
    aliases = {a: str(v) for a, v in client.get_registered_model(MODEL).aliases.items()}
    assert aliases == {"champion": version, "previous": "1"}
    events = CanaryMachine(client, MODEL, version, actor="test").audit_events()
    assert [e["action"] for e in events] == ["start", "step_started", "step_passed", "step_started",
                                             "step_passed", "promoted"]
    assert [e.get("share") for e in events if e["action"] == "step_started"] == [0.25, 1.0]
    assert all(e["gates"]["requests"] >= 10 for e in events if e["action"] == "step_passed")
    assert stack["traffic"].status.get(200, 0) > 100 and set(stack["traffic"].status) <= {200, 404}
    task_log = json.dumps(api.http.get(f"/dags/{DAG_ID}/dagRuns/{run2}/taskInstances/canary_deploy/logs/1",
                                       headers={"Accept": "application/json"}).json())
    assert task_log.count("deferring for the 8s bake") == 2, task_log[-3000:]  # one deferral per step
