"""Train (local backend), evaluate and register stages against a SQLite MLflow in tmp_path."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pandas as pd
import pytest

from mlplatform.config import load_config
from mlplatform.spec.model import PipelineSpec, TenantFile
from mlplatform.stages.context import RunContext, StageFailed

FEATURES = ["f0", "f1", "f2", "f3"]
RUN_ID = "manual__2026-11-22T03:00:00+00:00"


def make_features(folder: Path, rows: int = 2000) -> dict:
    """A features-stage result: train/holdout parquet with a learnable binary label."""
    rng = np.random.default_rng(7)
    frame = pd.DataFrame(rng.normal(size=(rows, len(FEATURES))), columns=FEATURES)
    logit = 1.2 * frame["f0"] - 0.8 * frame["f1"] + 0.4 * frame["f2"]
    frame["label"] = (rng.random(rows) < 1 / (1 + np.exp(-logit))).astype("int64")
    frame.insert(0, "entity", np.arange(rows))
    frame.insert(1, "timestamp", pd.Timestamp("2026-11-01", tz="UTC"))
    folder.mkdir(parents=True, exist_ok=True)
    frame.iloc[:1600].to_parquet(folder / "train.parquet", index=False)
    frame.iloc[1600:].to_parquet(folder / "holdout.parquet", index=False)
    return {"train_path": str(folder / "train.parquet"), "holdout_path": str(folder / "holdout.parquet"),
            "feature_columns": FEATURES, "fingerprint": "fp-abc"}


def make_ctx(name: str = "churn", run_id: str = RUN_ID, hyperparameters: dict | None = None,
             **evaluation) -> RunContext:
    spec = PipelineSpec.model_validate({
        "apiVersion": "mlplatform.io/v1",
        "kind": "Pipeline",
        "metadata": {"name": name, "tenant": "acme"},
        "spec": {
            "data": {"source": "acme/churn", "entity": "entity", "timestamp": "timestamp", "label": "label"},
            "training": {"framework": "sklearn", "model": "logistic_regression", "hyperparameters": hyperparameters or {"C": 1.0}},
            "evaluation": evaluation,
        },
    })
    tenant = TenantFile.model_validate({
        "apiVersion": "mlplatform.io/v1",
        "kind": "Tenant",
        "metadata": {"name": "acme"},
        "spec": {"owner": "ml-acme@example.com", "namespace": "ml-acme",
                 "quotas": {"gpu_slots": 0, "cpu_slots": 2}, "data": {"allowed_prefixes": ["acme/"]}},
    })
    return RunContext(spec=spec, tenant=tenant, config=load_config(), run_id=run_id, spec_sha256="sha-1")


@pytest.fixture(scope="module")
def platform(tmp_path_factory):
    """One SQLite tracking store and one trained candidate (via the local trainer) for the module."""
    import mlflow

    from mlplatform.stages.train_local import run_local_trainer

    root = tmp_path_factory.mktemp("platform")
    with pytest.MonkeyPatch.context() as mp:
        mp.setenv("MLPLATFORM_HOME", str(root / "home"))
        mp.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{root}/mlflow.db")
        mp.setenv("MLPLATFORM_GIT_COMMIT", "0123abc")
        for var in ("MLPLATFORM_ARTIFACT_ROOT", "MLPLATFORM_DATA_ROOT", "MLFLOW_REGISTRY_URI"):
            mp.delenv(var, raising=False)
        # Let the trainer subprocess cache bytecode (outside the venv) if this shell forbids writing it.
        mp.delenv("PYTHONDONTWRITEBYTECODE", raising=False)
        mp.setenv("PYTHONPYCACHEPREFIX", str(root / "pycache"))
        features = make_features(root / "features")
        train_result = run_local_trainer(make_ctx(), features)
        yield SimpleNamespace(root=root, features=features, train_result=train_result)
    mlflow.set_tracking_uri(None)
    mlflow.set_registry_uri(None)


def client(ctx):
    from mlplatform.stages import registry

    return registry.client(ctx)


def make_champion(ctx: RunContext, model_uri: str) -> str:
    """Register ``model_uri`` as a version of ctx's model and point the champion alias at it."""
    import mlflow

    from mlplatform.stages import registry

    registry.use_tracking(ctx.config)
    version = mlflow.register_model(model_uri, ctx.spec.model_name).version
    client(ctx).set_registered_model_alias(ctx.spec.model_name, "champion", version)
    return str(version)


def test_local_trainer_env_contract_and_run_tags(platform, tmp_path):
    from mlplatform.stages.train_local import train_env

    ctx = make_ctx()
    env = train_env(ctx, platform.features, tmp_path / "r.json", tmp_path / "scratch")
    assert env["MLPLATFORM_FEATURES"] == "f0,f1,f2,f3"
    assert env["MLPLATFORM_EXPERIMENT"] == "acme/churn" and env["MLPLATFORM_FRAMEWORK"] == "sklearn"
    assert json.loads(env["MLPLATFORM_HYPERPARAMETERS"]) == {"C": 1.0}
    assert env["MLPLATFORM_ARTIFACT_LOCATION"] == str(ctx.config.home / "mlartifacts")

    result = platform.train_result
    assert result["model_uri"] == f"runs:/{result['run_id']}/model" and result["data_fingerprint"] == "fp-abc"
    tags = client(ctx).get_run(result["run_id"]).data.tags
    assert tags["mlplatform.tenant"] == "acme" and tags["mlplatform.pipeline"] == "churn"
    assert tags["mlplatform.dag_run_id"] == RUN_ID and tags["mlplatform.spec_sha256"] == "sha-1"
    assert (ctx.config.home / "mlartifacts" / "acme" / "churn").is_dir()


def test_local_trainer_failure_raises_with_log_tail(platform):
    from mlplatform.stages.train_local import run_local_trainer

    ctx = make_ctx(run_id="manual__bad", hyperparameters={"no_such_knob": 1})
    with pytest.raises(StageFailed, match="no_such_knob"):
        run_local_trainer(ctx, platform.features)


def test_accepts_above_minimum_without_champion(platform):
    from mlplatform.stages.evaluate import evaluate_model

    ctx = make_ctx(metric="roc_auc", minimum=0.6)
    result = evaluate_model(ctx, platform.train_result, platform.features)
    assert result["decision"] == "accepted", result
    assert result["value"] == pytest.approx(platform.train_result["metrics"]["roc_auc"])
    assert result["champion_version"] is None and result["champion_value"] is None
    assert "no champion" in result["reason"]
    run = client(ctx).get_run(platform.train_result["run_id"])
    assert run.data.metrics["eval_roc_auc"] == pytest.approx(result["value"])
    assert run.data.tags["mlplatform.evaluation"] == "accepted"


def test_rejects_below_minimum_with_reason(platform):
    from mlplatform.stages.evaluate import evaluate_model

    result = evaluate_model(make_ctx(metric="accuracy", minimum=0.99), platform.train_result, platform.features)
    assert result["decision"] == "rejected"
    assert result["metric"] == "accuracy" and result["minimum"] == 0.99
    assert "below the minimum 0.99" in result["reason"]


def test_log_loss_minimum_is_a_ceiling(platform):
    from mlplatform.stages.evaluate import evaluate_model

    loss = platform.train_result["metrics"]["log_loss"]
    strict = evaluate_model(make_ctx(metric="log_loss", minimum=loss / 2), platform.train_result, platform.features)
    assert strict["decision"] == "rejected" and "above the maximum" in strict["reason"]
    loose = evaluate_model(make_ctx(metric="log_loss", minimum=loss * 2), platform.train_result, platform.features)
    assert loose["decision"] == "accepted" and loose["value"] == pytest.approx(loss)


def test_rejects_when_not_beating_champion_by_margin(platform):
    from mlplatform.stages.evaluate import evaluate_model

    ctx = make_ctx("churn-champ", metric="roc_auc", minimum=0.6, margin_over_champion=0.02)
    version = make_champion(ctx, platform.train_result["model_uri"])  # the same model: improvement 0
    result = evaluate_model(ctx, platform.train_result, platform.features)
    assert result["decision"] == "rejected"
    assert result["champion_version"] == version
    assert result["champion_value"] == pytest.approx(result["value"])
    assert f"does not beat champion v{version}" in result["reason"] and "margin 0.02" in result["reason"]
    metrics = client(ctx).get_run(platform.train_result["run_id"]).data.metrics
    assert metrics["champion_roc_auc"] == pytest.approx(result["champion_value"])

    # margin 0: a tie (the same model, improvement +0.0000) never beats the champion
    tie = evaluate_model(make_ctx("churn-champ", minimum=0.6), platform.train_result, platform.features)
    assert tie["decision"] == "rejected" and tie["champion_version"] == version, tie
    assert tie["champion_value"] == tie["value"]
    assert tie["reason"] == (f"roc_auc {tie['value']:.4f} does not beat champion v{version} ({tie['value']:.4f}) "
                             "by more than the margin 0 (improvement +0.0000)")
    # log_loss, lower is better: the same loss is a tie too
    loss = evaluate_model(make_ctx("churn-champ", metric="log_loss", minimum=5.0), platform.train_result,
                          platform.features)
    assert loss["decision"] == "rejected" and "does not beat" in loss["reason"], loss


def test_same_data_spec_and_hyperparameters_as_champion_is_not_registered_again(platform):
    from mlplatform.stages.evaluate import evaluate_model
    from mlplatform.stages.register import HYPERPARAMETERS_TAG, hyperparameters_sha256, register_model

    ctx = make_ctx("churn-dup", minimum=0.6)
    first = register_model(ctx, platform.train_result, {"decision": "accepted", "metric": "roc_auc", "value": 0.8}, {})
    c = client(ctx)
    assert c.get_model_version("acme.churn-dup", first["version"]).tags[HYPERPARAMETERS_TAG] == \
        hyperparameters_sha256({"C": 1.0}) == hyperparameters_sha256({"C": 1})
    c.set_registered_model_alias("acme.churn-dup", "champion", first["version"])

    again = evaluate_model(make_ctx("churn-dup", run_id="manual__again", minimum=0.6, margin_over_champion=-1.0),
                           platform.train_result, platform.features)
    assert again["decision"] == "rejected" and again["champion_version"] == first["version"]
    assert again["reason"].startswith(f"same training as champion v{first['version']}: data fingerprint fp-abc")
    assert "not registered again" in again["reason"] and again["champion_value"] is None
    assert c.get_run(platform.train_result["run_id"]).data.tags["mlplatform.evaluation"] == "rejected"

    # other hyperparameters, another spec or other data: not a duplicate; the metric gate decides (a negative
    # margin lets the same score through here)
    for other in (make_ctx("churn-dup", run_id="manual__hp", hyperparameters={"C": 0.5}, minimum=0.6,
                           margin_over_champion=-1.0),
                  replace(make_ctx("churn-dup", run_id="manual__spec", minimum=0.6, margin_over_champion=-1.0),
                          spec_sha256="sha-2")):
        result = evaluate_model(other, platform.train_result, platform.features)
        assert result["decision"] == "accepted" and result["champion_value"] is not None, result
    new_data = evaluate_model(make_ctx("churn-dup", minimum=0.6, margin_over_champion=-1.0),
                              platform.train_result | {"data_fingerprint": "fp-new"}, platform.features)
    assert new_data["decision"] == "accepted", new_data

    # a champion registered before the hyperparameters tag existed: compared by its metric only
    c.delete_model_version_tag("acme.churn-dup", first["version"], HYPERPARAMETERS_TAG)
    old = evaluate_model(make_ctx("churn-dup", minimum=0.6), platform.train_result, platform.features)
    assert old["decision"] == "rejected" and "does not beat" in old["reason"], old


def test_models_load_through_the_platform_uri_not_the_process_default(platform, tmp_path, monkeypatch):
    """Evaluate and the champion's loading never touch MLflow's process-wide tracking/registry URI."""
    import mlflow

    from mlplatform.stages.evaluate import evaluate_model, load_classifier

    ctx = make_ctx("churn-uri", minimum=0.6)
    version = make_champion(ctx, platform.train_result["model_uri"])
    elsewhere = tmp_path / "elsewhere.db"
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{elsewhere}")
    monkeypatch.setenv("MLFLOW_REGISTRY_URI", f"sqlite:///{elsewhere}")
    mlflow.set_tracking_uri(f"sqlite:///{elsewhere}")
    mlflow.set_registry_uri(f"sqlite:///{elsewhere}")
    try:
        model, columns = load_classifier(f"models:/acme.churn-uri/{version}", ctx.config)
        assert hasattr(model, "predict_proba") and columns == FEATURES
        result = evaluate_model(ctx, platform.train_result, platform.features)
        assert result["champion_version"] == version and result["champion_value"] == result["value"]
        assert mlflow.get_tracking_uri() == f"sqlite:///{elsewhere}"  # restored after the scoped use
        assert not elsewhere.exists()
    finally:
        mlflow.set_tracking_uri(ctx.config.tracking_uri)
        mlflow.set_registry_uri(ctx.config.tracking_uri)


@pytest.mark.parametrize(
    ("metric", "value", "champion", "margin", "accepted"),
    [
        ("roc_auc", 0.81, 0.75, 0.05, True),
        ("roc_auc", 0.80, 0.75, 0.05, False),  # exactly the margin: not more than it
        ("roc_auc", 0.80, 0.76, 0.05, False),
        ("roc_auc", 0.7155, 0.7155, 0.0, False),  # a tie never beats the champion
        ("roc_auc", 0.7156, 0.7155, 0.0, True),
        ("f1", 0.70, None, 0.5, True),
        ("log_loss", 0.39, 0.50, 0.1, True),
        ("log_loss", 0.40, 0.50, 0.1, False),
        ("log_loss", 0.45, 0.50, 0.1, False),
        ("log_loss", 0.50, 0.50, 0.0, False),
        ("log_loss", 0.49, 0.50, 0.0, True),
        ("log_loss", 0.55, 0.50, 0.0, False),
    ],
)
def test_gate_direction(metric, value, champion, margin, accepted):
    from mlplatform.stages.evaluate import gate

    assert gate(metric, value, 0.6, margin, champion, "3")[0] is accepted


def test_register_creates_tagged_version_with_challenger_alias_once(platform):
    from mlplatform.stages.register import hyperparameters_sha256, register_model

    ctx = make_ctx("churn-reg")
    evaluation = {"decision": "accepted", "metric": "roc_auc", "value": 0.81}
    first = register_model(ctx, platform.train_result, evaluation, {"feature_views": ["churn"]})
    assert first == {"model_name": "acme.churn-reg", "version": "1", "created": True, "alias": "challenger",
                     "model_uri": "models:/acme.churn-reg/1"}
    mv = client(ctx).get_model_version_by_alias("acme.churn-reg", "challenger")
    assert str(mv.version) == "1" and mv.run_id == platform.train_result["run_id"]  # int from SQL, str over REST
    assert mv.tags == {
        "mlplatform.run_key": f"acme__churn-reg/{RUN_ID}",
        "mlplatform.spec_sha256": "sha-1",
        "mlplatform.dag_run_id": RUN_ID,
        "mlplatform.data_fingerprint": "fp-abc",
        "mlplatform.hyperparameters_sha256": hyperparameters_sha256({"C": 1.0}),
        "mlplatform.git_commit": "0123abc",
        "mlplatform.tenant": "acme",
        "mlplatform.pipeline": "churn-reg",
        "mlplatform.eval_metric": "roc_auc",
        "mlplatform.eval_value": "0.81",
        "mlplatform.lineage.feature_views": '["churn"]',
    }

    again = register_model(ctx, platform.train_result, evaluation, {"feature_views": ["churn"]})
    assert again == first | {"created": False}
    assert len(client(ctx).search_model_versions("name = 'acme.churn-reg'")) == 1

    other_run = register_model(make_ctx("churn-reg", run_id="manual__2"), platform.train_result, evaluation, {})
    assert other_run["version"] == "2" and other_run["created"] is True


def test_register_completes_a_half_registered_version(platform):
    import mlflow

    from mlplatform.stages import registry
    from mlplatform.stages.register import register_model

    ctx = make_ctx("churn-half")
    registry.use_tracking(ctx.config)  # a crash right after creating the version, before tags and alias
    mlflow.register_model(platform.train_result["model_uri"], "acme.churn-half",
                          tags={"mlplatform.run_key": f"acme__churn-half/{RUN_ID}"})
    result = register_model(ctx, platform.train_result, {"decision": "accepted", "metric": "f1", "value": 0.7}, {})
    assert result["version"] == "1" and result["created"] is False
    mv = client(ctx).get_model_version("acme.churn-half", "1")
    assert mv.tags["mlplatform.eval_metric"] == "f1" and mv.tags["mlplatform.spec_sha256"] == "sha-1"
    assert registry.get_alias_version(client(ctx), "acme.churn-half", "challenger") == "1"


def test_register_refuses_a_rejected_candidate(platform):
    from mlplatform.stages.register import register_model

    with pytest.raises(StageFailed, match="rejected"):
        register_model(make_ctx("churn-no"), platform.train_result,
                       {"decision": "rejected", "reason": "too weak", "metric": "roc_auc", "value": 0.5}, {})


def test_get_alias_version_missing_model_or_alias(platform):
    from mlplatform.stages import registry

    c = client(make_ctx())
    assert registry.get_alias_version(c, "acme.does-not-exist", "champion") is None
    c.create_registered_model("acme.no-alias")
    assert registry.get_alias_version(c, "acme.no-alias", "champion") is None


def test_stage_modules_import_no_ml_library():
    import subprocess
    import sys

    code = ("import sys, mlplatform.stages.train_local, mlplatform.stages.evaluate, mlplatform.stages.register; "
            "print(sorted(m for m in ('mlflow', 'sklearn', 'pandas', 'xgboost') if m in sys.modules))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, check=True).stdout
    assert out.strip() == "[]"
