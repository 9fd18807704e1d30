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
