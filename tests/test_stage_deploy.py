"""The deploy stage's canary against a real MLflow SQLite registry and the real embedded gateway."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mlplatform.config import load_config
from mlplatform.spec.model import PipelineSpec, TenantFile
from mlplatform.stages.context import RunContext
from mlplatform.stages.deploy import canary_deploy

NAME = "acme.churn"
FEATURES = ["f1", "f2", "f3"]
TENANT = {
    "apiVersion": "mlplatform.io/v1",
    "kind": "Tenant",
    "metadata": {"name": "acme"},
    "spec": {
        "owner": "ml-acme@example.com",
        "namespace": "ml-acme",
        "quotas": {"gpu_slots": 2, "cpu_slots": 8},
        "data": {"allowed_prefixes": ["acme/"]},
    },
}


@pytest.fixture(scope="session")
def mlflow_template_db(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """An initialised MLflow database to copy (creating the tables takes seconds; a copy is instant)."""
    path = tmp_path_factory.getbasetemp() / "mlflow-template.db"
    if not path.exists():
        from mlflow import MlflowClient

        MlflowClient(f"sqlite:///{path}").search_experiments()
    return path


@pytest.fixture
def env(tmp_path: Path, monkeypatch: pytest.MonkeyPatch, mlflow_template_db: Path) -> dict:
    """A fresh registry, platform home and held-out parquet for one test."""
    from mlflow import MlflowClient

    shutil.copy(mlflow_template_db, tmp_path / "mlflow.db")
    uri = f"sqlite:///{tmp_path}/mlflow.db"
    monkeypatch.setenv("MLPLATFORM_HOME", str(tmp_path))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", uri)
    monkeypatch.setenv("MLFLOW_DISABLE_TELEMETRY", "true")
    client = MlflowClient(uri)
    x = pd.DataFrame(np.random.default_rng(1).normal(size=(300, 3)), columns=FEATURES)
    y = (x["f1"] - x["f3"] > 0).astype(int)
    holdout = tmp_path / "holdout.parquet"
    x.tail(100).assign(churned=y.tail(100)).to_parquet(holdout)
    return {
        "client": client,
        "config": load_config(),
        "experiment": client.create_experiment("deploy", artifact_location=str(tmp_path / "artifacts")),
        "x": x,
        "y": y,
        "features": {"holdout_path": str(holdout), "feature_columns": FEATURES},
    }


def register_sklearn(env: dict, c: float = 1.0) -> str:
    import mlflow
    from sklearn.linear_model import LogisticRegression

    model = LogisticRegression(C=c).fit(env["x"], env["y"])
    with mlflow.start_run(experiment_id=env["experiment"]):
        info = mlflow.sklearn.log_model(
            model, name="model", registered_model_name=NAME, pip_requirements=[], serialization_format="cloudpickle"
        )
    return str(info.registered_model_version)


def register_raising(env: dict) -> str:
    import mlflow

    class Raising(mlflow.pyfunc.PythonModel):
        def predict(self, context, model_input, params=None):
            raise RuntimeError("model exploded")

    with mlflow.start_run(experiment_id=env["experiment"]):
        info = mlflow.pyfunc.log_model(
            name="model", python_model=Raising(), registered_model_name=NAME, pip_requirements=[]
        )
    return str(info.registered_model_version)


def make_ctx(env: dict, params: dict | None = None, **gates) -> RunContext:
    spec = PipelineSpec.model_validate({
        "apiVersion": "mlplatform.io/v1",
        "kind": "Pipeline",
        "metadata": {"name": "churn", "tenant": "acme"},
        "spec": {
            "data": {
                "source": "acme/churn", "entity": "customer_id", "timestamp": "event_timestamp", "label": "churned",
            },
            "deployment": {
                "canary_traffic": 0.5,
                "bake_time": "2s",
                "gates": {"min_requests": 20, "max_p99_latency_ms": 1000, **gates},
            },
        },
    })
    return RunContext(spec=spec, tenant=TenantFile.model_validate(TENANT), config=env["config"],
                      run_id="manual__2026-11-23T00:00:00", params=params or {})


def deploy(env: dict, version: str, **kwargs) -> dict:
    ctx = make_ctx(env, **kwargs)
    result = canary_deploy(ctx, {"model_name": NAME, "version": version}, env["features"])
    assert json.loads((ctx.artifact_dir / "canary.json").read_text()) == result
    return result


def aliases(env: dict) -> dict[str, str]:
    return {a: str(v) for a, v in env["client"].get_registered_model(NAME).aliases.items()}


def tags(env: dict, version: str) -> dict[str, str]:
    return env["client"].get_model_version(NAME, version).tags


def test_first_model_is_promoted_directly(env):
    v1 = register_sklearn(env)
    result = deploy(env, v1)
    assert result["decision"] == "promoted_first"
    assert (result["champion_version"], result["previous_version"], result["gateway_url"]) == (v1, None, None)
    assert aliases(env) == {"champion": v1}
    assert tags(env, v1)["mlplatform.canary"] == "promoted_first"
    assert tags(env, v1)["mlplatform.dag_run_id"] == "manual__2026-11-23T00:00:00"


def test_skip_canary_promotes_directly(env):
    v1, v2 = register_sklearn(env), register_sklearn(env, c=0.1)
    deploy(env, v1)
    result = deploy(env, v2, params={"skip_canary": True})
    assert result["decision"] == "promoted_skip_canary"
    assert aliases(env) == {"champion": v2, "previous": v1}


def test_good_challenger_is_promoted(env):
    v1, v2 = register_sklearn(env), register_sklearn(env, c=0.1)
    deploy(env, v1)
    result = deploy(env, v2)

    assert result["decision"] == "promoted", result["gates"]
    assert (result["champion_version"], result["previous_version"], result["challenger_version"]) == (v2, v1, v2)
    assert aliases(env) == {"champion": v2, "previous": v1}
    gates = result["gates"]
    assert gates["passed"] and gates["failed"] == [] and gates["requests"] >= 20 and gates["errors"] == 0
    assert result["champion_stats"]["requests"] > 0 and result["champion_stats"]["version"] == v1
    assert result["bake_seconds"] >= 2 and result["gateway_url"].startswith("http://127.0.0.1:")
    assert json.loads(tags(env, v2)["mlplatform.canary_gates"]) == gates
    log = make_ctx(env).artifact_dir / "predictions" / f"{NAME}.jsonl"
    assert len(log.read_text().splitlines()) == gates["requests"] + result["champion_stats"]["requests"]


def test_erroring_challenger_is_rolled_back(env):
    v1 = register_sklearn(env)
    deploy(env, v1)
    v2 = register_raising(env)
    result = deploy(env, v2)

    assert result["decision"] == "rolled_back"
    assert result["champion_version"] == v1 and result["challenger_version"] == v2
    assert result["gates"]["passed"] is False and result["gates"]["error_rate"] == 1.0
    assert result["champion_stats"]["errors"] == 0
    assert aliases(env) == {"champion": v1, "challenger": v2}
    assert tags(env, v2)["mlplatform.canary"] == "rolled_back"
    assert "error_rate" in tags(env, v2)["mlplatform.canary_reason"]


def test_slow_challenger_fails_the_latency_gate(env):
    v1, v2 = register_sklearn(env), register_sklearn(env, c=0.1)
    deploy(env, v1)
    result = deploy(env, v2, max_p99_latency_ms=0.001)
    assert result["decision"] == "rolled_back"
    assert [f.split()[0] for f in result["gates"]["failed"]] == ["p99"]
    assert aliases(env)["champion"] == v1


def test_retry_of_promoted_deploy_does_not_redeploy(env, monkeypatch):
    import mlplatform.serving.gateway as gateway

    v1, v2 = register_sklearn(env), register_sklearn(env, c=0.1)
    deploy(env, v1)
    first = deploy(env, v2)
    assert first["decision"] == "promoted"

    def no_gateway(*args, **kwargs):
        raise AssertionError("a retry must not start the gateway again")

    monkeypatch.setattr(gateway, "GatewayServer", no_gateway)
    retry = deploy(env, v2)
    assert retry["decision"] == "promoted"
    assert retry["gates"] == first["gates"]
    assert (retry["champion_version"], retry["previous_version"]) == (v2, v1)
    assert aliases(env) == {"champion": v2, "previous": v1}
