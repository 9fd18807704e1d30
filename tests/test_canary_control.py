"""Operator control: promote now, abort, roll back to previous; the control DAG; audit events."""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from conftest import REPO, copy_example_specs

from mlplatform.stages.canary_state import SHARE_TAG, STATE_TAG, CanaryMachine, CanaryState, apply_action

NAME = "acme.churn"


@pytest.fixture
def client(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory):
    """A registry with versions 1..3 (no artifacts needed: actions only move aliases and tags)."""
    from mlflow import MlflowClient

    template = tmp_path_factory.getbasetemp() / "mlflow-control-template.db"
    if not template.exists():
        MlflowClient(f"sqlite:///{template}").search_experiments()
    shutil.copy(template, tmp_path / "mlflow.db")
    c = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db", f"sqlite:///{tmp_path}/mlflow.db")
    c.create_registered_model(NAME)
    for _ in range(3):
        c.create_model_version(NAME, source=str(tmp_path / "model"))
    return c


def aliases(client) -> dict[str, str]:
    return {a: str(v) for a, v in client.get_registered_model(NAME).aliases.items()}


def canary_in_progress(client, champion="1", challenger="2", share=0.5) -> CanaryMachine:
    client.set_registered_model_alias(NAME, "champion", champion)
    m = CanaryMachine(client, NAME, challenger, actor="airflow:deploy")
    st = m.start(champion, [0.1, share, 1.0])
    st.state, st.step = "baking", 1
    m.save(st)
    m.set_share(share)
    return m


def test_promote_now(client, tmp_path):
    m = canary_in_progress(client)
    audit = tmp_path / "audit.jsonl"
    result = apply_action(client, NAME, "promote_now", actor="user:alice", reason="looks good", run_id="r1",
                          audit_file=audit)
    assert result["changed"] and result["decision"] == "promoted_by_operator"
    assert aliases(client) == {"champion": "2", "previous": "1"}
    assert client.get_registered_model(NAME).tags[SHARE_TAG] == "0"
    assert m.load().state == "promoted"
    events = m.audit_events()
    promoted = [e for e in events if e["action"] == "promoted_by_operator"][0]
    assert promoted["actor"] == "user:alice" and promoted["from_version"] == "1" and promoted["to_version"] == "2"
    assert events[-1]["reason"] == "looks good"
    assert [json.loads(line)["action"] for line in audit.read_text().splitlines()] == [
        "promoted_by_operator", "operator_reason"]
    # idempotent: a retry changes nothing; there is no canary left to promote
    with pytest.raises(LookupError):
        apply_action(client, NAME, "promote_now", actor="user:alice")


def test_abort_returns_traffic_and_keeps_the_challenger(client):
    m = canary_in_progress(client)
    result = apply_action(client, NAME, "abort", actor="user:bob", reason="latency spike on dashboard")
    assert result["changed"] and result["state"] == "aborted"
    assert aliases(client) == {"champion": "1", "challenger": "2"}
    assert client.get_registered_model(NAME).tags[SHARE_TAG] == "0"
    st = m.load()
    assert st.state == "aborted" and st.reason == "latency spike on dashboard"
    last = m.audit_events()[-1]
    assert (last["action"], last["from_state"], last["to_state"], last["actor"]) == (
        "aborted", "baking", "aborted", "user:bob")
    assert client.get_model_version(NAME, "2").tags["mlplatform.canary"] == "aborted"
    again = apply_action(client, NAME, "abort", actor="user:bob")
    assert again["changed"] is False


def test_abort_during_a_bake_stops_the_deploy_task(client):
    """The deploy task re-reads the state after each bake: an abort by a person wins."""
    m = canary_in_progress(client)

    class Traffic:
        url = None
        shares: list[float] = []

        def set_share(self, share):
            self.shares.append(share)

        def bake(self, share, seconds):
            apply_action(client, NAME, "abort", actor="user:carol")
            stats = {"requests": 100, "errors": 0, "error_rate": 0.0, "p99_ms": 1.0}
            return {"champion": dict(stats), "challenger": dict(stats)}, 0.1

        def close(self):
            pass

    from mlplatform.spec.model import DeploymentSpec

    traffic = Traffic()
    result = m.run(DeploymentSpec(steps=[0.1, 0.5, 1.0]), "1", traffic, 0)
    assert result["state"] == "aborted" and traffic.shares[-1] == 0.0
    assert aliases(client) == {"champion": "1", "challenger": "2"}


def test_rollback_to_previous(client):
    client.set_registered_model_alias(NAME, "champion", "3")
    client.set_registered_model_alias(NAME, "previous", "2")
    result = apply_action(client, NAME, "rollback_to_previous", actor="user:dave", reason="bad outputs")
    assert result == {"action": "rollback_to_previous", "changed": True, "champion_version": "2",
                      "previous_version": None, "demoted_version": "3"}
    assert aliases(client) == {"champion": "2"}
    restored = CanaryMachine(client, NAME, "2", actor="x").audit_events()[-1]
    demoted = CanaryMachine(client, NAME, "3", actor="x").audit_events()[-1]
    assert (restored["from_version"], restored["to_version"], restored["actor"]) == ("3", "2", "user:dave")
    assert demoted["to_state"] == "demoted" and demoted["reason"] == "bad outputs"
    with pytest.raises(LookupError, match="no previous"):
        apply_action(client, NAME, "rollback_to_previous", actor="user:dave")


def test_unknown_action(client):
    with pytest.raises(ValueError, match="unknown action"):
        apply_action(client, NAME, "delete_everything", actor="user:eve")


def test_state_round_trips_and_stays_under_the_tag_limit():
    st = CanaryState("baking", 2, [0.1, 0.5, 1.0], "1", passed=[{"failed": [], "x": "y" * 900}] * 10)
    text = st.to_json()
    assert len(text) <= 5000
    back = CanaryState.from_json(text)
    assert back.step == 2 and back.passed and len(back.passed) < 10


def test_control_dag(platform):
    from mlplatform.factory.control import build_control_dags
    from mlplatform.spec.loader import load_catalog

    copy_example_specs(platform.specs_dir)
    catalog = load_catalog(platform)
    dags = build_control_dags(catalog, platform)
    assert sorted(dags) == ["acme__deployments"]  # globex's only pipeline is batch: nothing to control
    dag = dags["acme__deployments"]
    assert dag.schedule is None
    assert dag.params.get_param("pipeline").schema["enum"] == ["churn-baseline", "churn-xgb"]
    assert set(dag.tasks[0].pipelines) == {"churn-baseline", "churn-xgb"}
    assert [t.task_id for t in dag.tasks] == ["apply_action"]
    task = dag.tasks[0]
    assert task.pool == catalog.tenants["acme"].cpu_pool and task.retries == 3
    action = dag.params.get_param("action")
    assert action.schema["enum"] == [None, "promote_now", "abort", "rollback_to_previous"]
    assert "tenant:acme" in dag.tags


def test_control_module_imports_no_ml_library():
    code = ("import sys; import mlplatform.factory.control, mlplatform.operators.canary; "
            "print(sorted(m for m in ('mlflow','sklearn','pandas','evidently','feast','great_expectations') "
            "if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, cwd=REPO, timeout=120)
    assert out.stdout.strip() == "[]", out.stderr[-2000:]


def test_control_operator_runs_the_action(client, tmp_path, monkeypatch):
    """The operator's run(): the trigger form's action, the triggering user as actor."""
    from mlplatform.operators.canary import CanaryControlOperator
    from mlplatform.stages import registry
    from mlplatform.stages.context import RunContext, StageFailed
    from helpers_stage import pipeline_spec, tenant_file

    monkeypatch.setenv("MLPLATFORM_HOME", str(tmp_path / "home"))
    monkeypatch.setattr(registry, "client", lambda _: client)
    canary_in_progress(client)
    spec = pipeline_spec()
    op = CanaryControlOperator.for_spec(spec=spec, tenant=tenant_file(), spec_sha256="x", task_id="apply_action")
    from mlplatform.config import load_config

    ctx = RunContext(spec=spec, tenant=tenant_file(), config=load_config(), run_id="manual__1",
                     params={"action": "abort", "reason": "test"})

    class DagRun:
        triggering_user_name = "alice"
        run_id = "manual__1"

    result = op.run(ctx, {}, {"dag_run": DagRun()})
    assert result["state"] == "aborted"
    assert CanaryMachine(client, NAME, "2", actor="x").audit_events()[-1]["actor"] == "user:alice"
    with pytest.raises(StageFailed, match="choose an action"):
        op.run(RunContext(spec=spec, tenant=tenant_file(), config=load_config(), run_id="m2", params={}), {}, {})
    assert STATE_TAG in client.get_model_version(NAME, "2").tags
