"""DriftCheckOperator without a scheduler: no champion, no reference, backfilled reference, policy, links."""

from __future__ import annotations

import json
import sys
from pathlib import Path
from types import SimpleNamespace

import pytest

from conftest import REPO, write_spec

SPEC = """\
apiVersion: mlplatform.io/v1
kind: Pipeline
metadata: {name: churn-mon, tenant: acme}
spec:
  template: batch-v1
  data: {source: acme/churn, entity: customer_id, timestamp: event_timestamp, label: churned}
  monitoring:
    schedule: "@daily"
    columns: {usage_gb: {method: ks, threshold: 0.01}}
"""
NAME = "acme.churn-mon"


@pytest.fixture
def setup(platform):
    from mlplatform.data.generate import generate_all
    from mlplatform.factory.monitor import build_monitor_dags
    from mlplatform.spec.loader import load_catalog

    write_spec(platform.specs_dir, "acme", "churn-mon", SPEC)
    generate_all(platform)
    catalog = load_catalog(platform)
    dags = build_monitor_dags(catalog, platform)
    return SimpleNamespace(config=platform, dag=dags["acme__churn-mon__monitor"])


class _Events:
    def __init__(self):
        self.added = []

    def __getitem__(self, alias):
        return SimpleNamespace(add=lambda asset, extra=None: self.added.append((alias.name, asset.name, extra)))


def _run(op, run_id, running=0, as_of=None):
    events = _Events()
    ti = SimpleNamespace(try_number=1, task_id="drift_check", dag_id=op.dag_id, run_id=run_id,
                         get_dr_count=lambda dag_id, states: running)
    context = {"run_id": run_id, "params": {"as_of": as_of}, "ti": ti, "outlet_events": events,
               "dag_run": SimpleNamespace(run_type="manual")}
    return op.execute(context), events


def _champion(config, tags):
    from mlflow import MlflowClient

    client = MlflowClient(config.tracking_uri, registry_uri=config.tracking_uri)
    client.create_registered_model(NAME)
    mv = client.create_model_version(NAME, source="file:///nonexistent/model", tags=tags)
    client.set_registered_model_alias(NAME, "champion", mv.version)
    return client, mv.version


def _train_snapshot(config, run_key):
    """What the features stage leaves: train.parquet of the first seven partitions (incl. the label)."""
    import pandas as pd

    src = config.data_root / "acme" / "churn"
    frames = [pd.read_parquet(p) for p in sorted(src.glob("dt=*/*.parquet"))[:7]]
    path = config.artifact_dir("acme", "churn-mon", run_key) / "train.parquet"
    path.parent.mkdir(parents=True, exist_ok=True)
    pd.concat(frames).to_parquet(path, index=False)
    return path


def test_dag_shape_and_no_ml_imports(setup):
    dag = setup.dag
    assert dag.dag_id == "acme__churn-mon__monitor" and list(dag.task_dict) == ["drift_check"]
    op = dag.task_dict["drift_check"]
    assert [o.name for o in op.outlets] == ["acme__churn-mon__drift__monitor"]
    assert op.drift_asset.name == "acme__churn-mon__drift" and op.training_dag_id == "acme__churn-mon"
    assert [link.name for link in op.operator_extra_links] == ["Drift report", "Drift report (JSON)"]
    assert op.pool == "acme__cpu"


def test_factory_imports_no_ml_library():
    import subprocess

    code = ("import sys; from mlplatform.factory import monitor; "
            "bad=[m for m in ('evidently','mlflow','pandas','sklearn','feast','great_expectations') if m in sys.modules];"
            "print(bad); sys.exit(1 if bad else 0)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stdout + out.stderr


def test_no_champion_then_no_reference(setup):
    op = setup.dag.task_dict["drift_check"]
    result, events = _run(op, "manual__a")
    assert result["status"] == "no_champion" and events.added == []
    _champion(setup.config, {"mlplatform.dag_run_id": "manual__gone"})
    result, events = _run(op, "manual__b")
    assert result["status"] == "no_reference" and result["drift_detected"] is False and events.added == []
    assert "has no stored training snapshot" in result["message"]


def test_backfilled_reference_drift_policy_and_tags(setup):
    from mlplatform.stages.context import run_key

    op = setup.dag.task_dict["drift_check"]
    snapshot = _train_snapshot(setup.config, run_key("scheduled__old"))
    client, version = _champion(setup.config, {"mlplatform.dag_run_id": "scheduled__old",
                                               "mlplatform.data_fingerprint": "sha256:abc"})
    result, events = _run(op, "manual__1")
    assert result["status"] == "checked" and result["reference_found_by"] == "backfilled"
    assert result["drift_detected"] is True and result["event_emitted"] is True, result
    assert {c["column"] for c in result["drifted_columns"]} >= {"monthly_charges", "usage_gb"}
    assert next(c for c in result["columns"] if c["column"] == "usage_gb")["method"] == "ks"
    assert events.added[0][:2] == ("acme__churn-mon__drift__monitor", "acme__churn-mon__drift")
    assert events.added[0][2]["current"] == "acme/churn@dt=2026-11-08"
    tags = client.get_model_version(NAME, version).tags
    assert tags["mlplatform.reference_uri"] == snapshot.resolve().as_uri()
    assert tags["mlplatform.drift_report"] == Path(result["html"]).resolve().as_uri()
    assert op.report_link == tags["mlplatform.drift_report"]
    ti = SimpleNamespace(task_id="drift_check", xcom_pull=lambda task_ids: result)
    assert op.operator_extra_links[0].get_link(op, ti_key=ti) == result["report_url"]

    again, events = _run(op, "manual__2")  # inside the cooldown
    assert again["reference_found_by"] == "tag" and again["event_emitted"] is False
    assert again["policy"]["reason"] == "cooldown" and events.added == []

    quiet, events = _run(op, "manual__3", as_of="2026-11-06")  # an undrifted day: nothing to do
    assert quiet["drift_detected"] is False and quiet["policy"] is None and events.added == []


def _real_champion(config, snapshot: Path, features: list[str]):
    """A logistic regression trained on the snapshot, registered as champion with eval_roc_auc on its run."""
    import mlflow
    import pandas as pd
    from mlflow import MlflowClient
    from sklearn.linear_model import LogisticRegression

    frame = pd.read_parquet(snapshot)
    model = LogisticRegression(max_iter=500).fit(frame[features].astype("float64"), frame["churned"])
    mlflow.set_tracking_uri(config.tracking_uri)
    mlflow.set_registry_uri(config.tracking_uri)
    with mlflow.start_run() as run:
        mlflow.log_metric("eval_roc_auc", 0.8)
        info = mlflow.sklearn.log_model(model, name="model", registered_model_name=NAME, pip_requirements=[],
                                        serialization_format="cloudpickle")
    client = MlflowClient(config.tracking_uri, registry_uri=config.tracking_uri)
    version = str(info.registered_model_version)
    client.set_model_version_tag(NAME, version, "mlplatform.reference_uri", snapshot.resolve().as_uri())
    client.set_registered_model_alias(NAME, "champion", version)
    return client, version, run.info.run_id


def test_prediction_drift_and_performance_on_labelled_partition(setup):
    from mlplatform.stages.context import run_key

    op = setup.dag.task_dict["drift_check"]
    snapshot = _train_snapshot(setup.config, run_key("scheduled__real"))
    features = op.spec.feature_columns(list(__import__("pandas").read_parquet(snapshot).columns))
    client, version, _ = _real_champion(setup.config, snapshot, features)
    result, _ = _run(op, "manual__p1")
    assert result["current_source"] == "partition" and result["drift_detected"] is True
    pred = result["prediction_drift"]
    assert pred["column"] == "prediction" and isinstance(pred["score"], float) and Path(pred["html"]).is_file()
    perf = result["performance"]
    assert perf["metric"] == "roc_auc" and perf["at_evaluation"] == 0.8 and perf["rows"] > 100
    assert 0.0 <= perf["value"] <= 1.0 and perf["change"] == pytest.approx(perf["value"] - 0.8)
    tags = client.get_model_version(NAME, version).tags
    assert tags["mlplatform.prediction_drift_report"] == pred["report_url"]
    assert tags["mlplatform.live_performance"].startswith("roc_auc=")


def test_prediction_log_window_is_the_current_data(setup):
    """When the gateway logged enough requests in the window, they are the current data (no labels there)."""
    from datetime import datetime, timedelta, timezone

    import pandas as pd

    from mlplatform.stages.context import run_key

    op = setup.dag.task_dict["drift_check"]
    snapshot = _train_snapshot(setup.config, run_key("scheduled__log"))
    features = op.spec.feature_columns(list(pd.read_parquet(snapshot).columns))
    _real_champion(setup.config, snapshot, features)
    drifted = pd.read_parquet(sorted((setup.config.data_root / "acme" / "churn").glob("dt=*/*.parquet"))[-1])
    log_dir = setup.config.home / "gateway" / "predictions"
    log_dir.mkdir(parents=True)
    now = datetime.now(timezone.utc)
    with (log_dir / f"{NAME}.jsonl").open("w") as fh:
        old = {"time": (now - timedelta(days=3)).isoformat(), "status": "ok", "variant": "champion",
               "model_version": "1", "inputs": [{f: 0.0 for f in features}], "outputs": [0]}
        fh.write(json.dumps(old) + "\n")  # outside the 1d window
        for i, row in enumerate(drifted[features].head(120).to_dict("records")):
            fh.write(json.dumps({"time": (now - timedelta(minutes=i)).isoformat(), "status": "ok",
                                 "variant": "champion", "model_version": "1", "inputs": [row],
                                 "outputs": [0]}) + "\n")
        fh.write('{"time": "torn')  # the gateway mid-write
    result, _ = _run(op, "manual__l1")
    assert result["current_source"] == "prediction_log", result["current"]
    assert result["current_rows"] == 120 and result["current"].startswith(f"predictions:{NAME}@")
    assert result["drift_detected"] is True and result["performance"] is None
    assert result["prediction_drift"]["column"] == "prediction"

    dated, _ = _run(op, "manual__l2", as_of="2026-11-06")  # a chosen partition date overrides the window
    assert dated["current_source"] == "partition" and dated["current"] == "acme/churn@dt=2026-11-06"


def test_reports_go_to_s3_with_links_that_open(setup, monkeypatch):
    """With MLPLATFORM_REPORTS_S3_URI the reports land in the object store (moto over HTTP on loopback) and
    the task's and the model version's links are presigned URLs that serve the HTML."""
    import boto3
    import httpx
    from moto.server import ThreadedMotoServer

    from mlplatform.stages.context import run_key

    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        for key, value in {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing",
                           "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                           "MLPLATFORM_REPORTS_S3_URI": "s3://reports/monitor"}.items():
            monkeypatch.setenv(key, value)
        s3 = boto3.client("s3", endpoint_url=endpoint)
        s3.create_bucket(Bucket="reports")
        op = setup.dag.task_dict["drift_check"]
        snapshot = _train_snapshot(setup.config, run_key("scheduled__s3"))
        import pandas as pd

        client, version, _ = _real_champion(setup.config, snapshot,
                                            op.spec.feature_columns(list(pd.read_parquet(snapshot).columns)))
        result, _ = _run(op, "manual__s3")
        keys = {o["Key"] for o in s3.list_objects_v2(Bucket="reports")["Contents"]}
        assert {k.rsplit("/", 1)[1] for k in keys} == {"drift_report.html", "drift_report.json",
                                                       "prediction_drift.html"}
        assert all(k.startswith("monitor/acme/churn-mon/monitor__") for k in keys), keys
        page = httpx.get(result["report_url"])
        assert page.status_code == 200 and page.headers["content-type"].startswith("text/html")
        assert page.content == Path(result["html"]).read_bytes()
        assert client.get_model_version(NAME, version).tags["mlplatform.drift_report"] == result["report_url"]
        assert httpx.get(result["prediction_drift"]["report_url"]).status_code == 200
    finally:
        server.stop()


def test_monitor_uses_the_platform_registry_under_make_ui_environment(setup, tmp_path):
    """Under ``make ui`` the task has no MLFLOW_TRACKING_URI and runs in the repository: the champion must
    still load through the platform's registry (MLPLATFORM_HOME), prediction drift and performance must be
    computed, and MLflow's process default (an ``mlflow.db`` in the working directory) never touched."""
    import os
    import subprocess

    import pandas as pd

    from mlplatform.stages.context import run_key

    snapshot = _train_snapshot(setup.config, run_key("scheduled__ui"))
    features = setup.dag.task_dict["drift_check"].spec.feature_columns(list(pd.read_parquet(snapshot).columns))
    _real_champion(setup.config, snapshot, features)
    assert setup.config.tracking_uri == f"sqlite:///{setup.config.home / 'mlflow.db'}"  # the home's default
    cwd = tmp_path / "repo-root"
    cwd.mkdir()
    env = {k: v for k, v in os.environ.items() if k not in ("MLFLOW_TRACKING_URI", "MLFLOW_REGISTRY_URI")}
    env.update(MLPLATFORM_HOME=str(setup.config.home), MLPLATFORM_SPECS_DIR=str(setup.config.specs_dir),
               PYTHONPATH=os.pathsep.join([str(REPO / "plugins"), env.get("PYTHONPATH", "")]))
    code = """if True:
        import json
        from types import SimpleNamespace
        from mlplatform.config import load_config
        from mlplatform.factory.monitor import build_monitor_dags
        from mlplatform.spec.loader import load_catalog

        config = load_config()
        op = build_monitor_dags(load_catalog(config), config)["acme__churn-mon__monitor"].task_dict["drift_check"]
        ti = SimpleNamespace(try_number=1, task_id="drift_check", dag_id=op.dag_id, run_id="manual__ui",
                             get_dr_count=lambda dag_id, states: 0)
        class Events:
            def __getitem__(self, alias):
                return SimpleNamespace(add=lambda asset, extra=None: None)
        context = {"run_id": "manual__ui", "params": {"as_of": None}, "ti": ti, "outlet_events": Events(),
                   "dag_run": SimpleNamespace(run_type="manual")}
        result = op.execute(context)
        print("RESULT=" + json.dumps(result, default=str))
    """
    proc = subprocess.run([sys.executable, "-c", code], cwd=cwd, env=env, capture_output=True, text=True,
                          timeout=300)
    assert proc.returncode == 0, proc.stdout[-3000:] + proc.stderr[-5000:]
    line = next(x for x in proc.stdout.splitlines() if x.startswith("RESULT="))
    result = json.loads(line[len("RESULT="):])
    assert result["status"] == "checked" and result.get("model_checks_error") is None, result
    assert result["prediction_drift"]["column"] == "prediction" and isinstance(result["prediction_drift"]["score"], float)
    perf = result["performance"]
    assert perf["metric"] == "roc_auc" and perf["rows"] > 100 and perf["at_evaluation"] == 0.8
    assert result["performance_note"] is None
    assert "no labels" not in proc.stdout + proc.stderr
    assert sorted(p.name for p in cwd.iterdir()) == [], "MLflow's process default was used in the cwd"


def test_performance_note_only_when_there_are_no_labels():
    import pandas as pd

    from mlplatform.spec.model import PipelineSpec
    from mlplatform.stages.monitor_data import performance_skipped, summary_lines

    spec = PipelineSpec.model_validate({
        "apiVersion": "mlplatform.io/v1", "kind": "Pipeline", "metadata": {"name": "churn-p", "tenant": "acme"},
        "spec": {"data": {"source": "acme/churn", "entity": "e", "timestamp": "t", "label": "churned"}}})
    assert performance_skipped(spec, pd.DataFrame({"x": [1.0, 2.0]})).startswith("no labels in the current data yet")
    assert "all 2 'churned' values are null" in performance_skipped(spec, pd.DataFrame({"churned": [None, None]}))
    assert performance_skipped(spec, pd.DataFrame({"churned": [1, None, 0]})) is None
    assert "both classes" in performance_skipped(spec, pd.DataFrame({"churned": [1, 1, None]}))
    lines = summary_lines({"current": "c", "current_source": "partition", "prediction_drift": None,
                           "performance": None, "model_checks_error": "MlflowException: not found"})
    assert lines[-1] == "performance not computed: MlflowException: not found"
    assert not any("no labels" in x for x in lines)
