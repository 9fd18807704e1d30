"""The trainer's pytorch framework as a real subprocess under the pod's environment contract.

torch is an optional extra (`make setup` installs the CPU wheel when /opt/wheels has it): without it the
whole module is skipped. The trainer runs with a read-only cwd and HOME and a scratch dir, like in the pod.
No PYTHONPYCACHEPREFIX here: the venv's bytecode (torch included) is compiled at install, and a fresh
prefix would make the first trainer recompile torch and mlflow (about a minute on 2 cores).
"""

from __future__ import annotations

import importlib.util
import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mlplatform.config import REPO_ROOT

pytestmark = pytest.mark.skipif(
    importlib.util.find_spec("torch") is None,
    reason="torch is not installed (optional extra for the trainer's pytorch framework; `make setup` installs "
           "the CPU wheel from /opt/wheels when present)",
)

TRAINER = REPO_ROOT / "include" / "trainer" / "train.py"
FEATURES = ["f0", "f1", "f2", "f3", "f4"]
HYPERPARAMETERS = {"hidden_units": 32, "layers": 2, "epochs": 12, "lr": 0.003, "batch_size": 64}
EPOCHS, EVERY, STOP = 12, 4, 8


def make_data(folder: Path, rows: int = 2000, seed: int = 0) -> tuple[Path, Path]:
    """Binary label from a logistic model of numeric features (one of them integer); 80/20 parquet split.
    Features on very different scales, so the standardisation matters."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(rows, len(FEATURES)))
    logit = 1.5 * X[:, 0] - X[:, 1] + 0.5 * X[:, 2]
    frame = pd.DataFrame(X, columns=FEATURES)
    frame["f1"] = frame["f1"] * 1000.0 + 5000.0
    frame["f4"] = rng.integers(0, 10, rows)
    frame["label"] = (rng.random(rows) < 1 / (1 + np.exp(-logit))).astype("int64")
    frame.insert(0, "entity", np.arange(rows))
    folder.mkdir(parents=True, exist_ok=True)
    cut = int(rows * 0.8)
    frame.iloc[:cut].to_parquet(folder / "train.parquet", index=False)
    frame.iloc[cut:].to_parquet(folder / "holdout.parquet", index=False)
    return folder / "train.parquet", folder / "holdout.parquet"


def contract_env(root: Path, train: Path, holdout: Path, home: Path, name: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "MLPLATFORM_", "AWS_"))}
    for var in ("TMPDIR", "CUDA_VISIBLE_DEVICES", "OMP_NUM_THREADS"):
        env.pop(var, None)
    return env | {
        "HOME": str(home),
        "MLFLOW_TRACKING_URI": f"sqlite:///{root}/mlflow.db",
        "MLPLATFORM_TRAIN_DATA": str(train),
        "MLPLATFORM_HOLDOUT_DATA": str(holdout),
        "MLPLATFORM_LABEL": "label",
        "MLPLATFORM_FEATURES": ",".join(FEATURES),
        "MLPLATFORM_FRAMEWORK": "pytorch",
        "MLPLATFORM_MODEL": "gradient_boosting",  # what the spec default passes; ignored for pytorch
        "MLPLATFORM_HYPERPARAMETERS": json.dumps(HYPERPARAMETERS),
        "MLPLATFORM_EXPERIMENT": "acme/churn",
        "MLPLATFORM_RUN_NAME": f"acme__churn.{name}",
        "MLPLATFORM_RUN_TAGS": json.dumps({"mlplatform.tenant": "acme", "mlplatform.pipeline": "churn"}),
        "MLPLATFORM_DATA_FINGERPRINT": "fp-torch",
        "MLPLATFORM_RESULT_PATH": str(root / name / "result.json"),
        "MLPLATFORM_SCRATCH_DIR": str(root / name / "scratch"),
        "MLPLATFORM_ARTIFACT_LOCATION": str(root / "mlartifacts"),
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "true",
    }


def run_trainer(env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TRAINER)], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=600)


@pytest.fixture(scope="module")
def site(tmp_path_factory):
    """Data, a read-only cwd/HOME and one tracking store for the module."""
    root = tmp_path_factory.mktemp("torch")
    train, holdout = make_data(root / "data")
    read_only = root / "ro"
    read_only.mkdir()
    read_only.chmod(0o555)
    yield root, train, holdout, read_only
    read_only.chmod(0o755)


@pytest.fixture(scope="module")
def fresh(site):
    """One uninterrupted training run without checkpoints: (env, result, trainer process)."""
    root, train, holdout, read_only = site
    env = contract_env(root, train, holdout, read_only, "fresh")
    proc = run_trainer(env, read_only)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert os.listdir(read_only) == []  # root ignores chmod: check that nothing was written there
    return env, json.loads(Path(env["MLPLATFORM_RESULT_PATH"]).read_text()), proc


def pyfunc(env: dict[str, str], model_uri: str):
    import mlflow

    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    return mlflow.pyfunc.load_model(model_uri)


def holdout_of(env: dict[str, str]) -> pd.DataFrame:
    return pd.read_parquet(env["MLPLATFORM_HOLDOUT_DATA"])


def test_trains_and_logs_a_pyfunc_returning_probabilities(fresh):
    import mlflow
    from sklearn.metrics import roc_auc_score

    env, result, proc = fresh
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])  # for runs:/ URIs
    assert "training on cpu" in proc.stdout and "resumed" not in proc.stdout
    assert set(result) == {"run_id", "model_uri", "metrics", "framework", "experiment_id", "data_fingerprint"}
    assert result["framework"] == "pytorch" and result["model_uri"] == f"runs:/{result['run_id']}/model"
    assert result["metrics"]["roc_auc"] > 0.75

    client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])
    run = client.get_run(result["run_id"])
    params, metrics = run.data.params, run.data.metrics
    assert {k: str(v) for k, v in HYPERPARAMETERS.items()}.items() <= params.items()
    assert params["dropout"] == "0.0" and params["seed"] == "0"  # defaults are logged too
    assert params["framework"] == "pytorch" and params["model"] == "tabular_mlp" and params["device"] == "cpu"
    assert metrics["epochs"] == EPOCHS and metrics["resumed_from_epoch"] == 0 and metrics["train_rows"] == 1600
    assert 0 < metrics["train_loss"] < 0.7 and metrics["log_model_seconds"] > 0
    assert metrics["roc_auc"] == pytest.approx(result["metrics"]["roc_auc"])
    assert run.data.tags["mlplatform.framework"] == "pytorch"

    info = mlflow.models.get_model_info(result["model_uri"])
    assert set(info.flavors) == {"python_function"}  # no native flavor: evaluate and serving use pyfunc
    assert info.signature.inputs.input_names() == FEATURES
    assert info.saved_input_example_info is not None
    requirements = Path(mlflow.pyfunc.get_model_dependencies(result["model_uri"])).read_text().split()
    assert "torch==2.13.0" in requirements  # the local +cpu label is dropped
    assert any(r.startswith("mlflow==") for r in requirements) and any(r.startswith("numpy==") for r in requirements)

    holdout = holdout_of(env)
    # float64 like evaluate sends (MLflow's schema enforcement refuses int64 -> double: f4 must be cast)
    proba = pyfunc(env, result["model_uri"]).predict(holdout[FEATURES].astype("float64"))
    assert isinstance(proba, np.ndarray) and proba.shape == (len(holdout),) and proba.dtype == np.float64
    assert ((proba >= 0) & (proba <= 1)).all() and len(np.unique(proba)) > 100
    auc = roc_auc_score(holdout["label"], proba)
    assert auc > 0.75 and auc == pytest.approx(result["metrics"]["roc_auc"], abs=1e-6)
    # The model selects its columns by name: extra and reordered columns do not matter.
    shuffled = holdout[FEATURES[::-1] + ["entity"]].astype("float64")
    assert np.allclose(pyfunc(env, result["model_uri"]).predict(shuffled), proba)


def test_evaluate_and_gateway_score_the_pyfunc_model(fresh, site, monkeypatch):
    import mlflow

    from mlplatform.config import load_config
    from mlplatform.serving.gateway import load_predictor
    from mlplatform.spec.model import PipelineSpec, TenantFile
    from mlplatform.stages.context import RunContext
    from mlplatform.stages.evaluate import evaluate_model

    env, result, _ = fresh
    root = site[0]
    monkeypatch.setenv("MLPLATFORM_HOME", str(root / "home"))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", env["MLFLOW_TRACKING_URI"])
    spec = PipelineSpec.model_validate({
        "apiVersion": "mlplatform.io/v1", "kind": "Pipeline", "metadata": {"name": "churn", "tenant": "acme"},
        "spec": {"data": {"source": "acme/churn", "entity": "entity", "timestamp": "timestamp", "label": "label"},
                 "training": {"framework": "pytorch", "hyperparameters": HYPERPARAMETERS},
                 "evaluation": {"metric": "roc_auc", "minimum": 0.75}},
    })
    tenant = TenantFile.model_validate({
        "apiVersion": "mlplatform.io/v1", "kind": "Tenant", "metadata": {"name": "acme"},
        "spec": {"owner": "ml-acme@example.com", "namespace": "ml-acme",
                 "quotas": {"gpu_slots": 0, "cpu_slots": 2}, "data": {"allowed_prefixes": ["acme/"]}},
    })
    ctx = RunContext(spec=spec, tenant=tenant, config=load_config(), run_id="manual__torch", spec_sha256="sha-t")
    features = {"holdout_path": env["MLPLATFORM_HOLDOUT_DATA"], "feature_columns": FEATURES}
    try:
        decision = evaluate_model(ctx, result, features)
        assert decision["decision"] == "accepted", decision
        assert decision["value"] == pytest.approx(result["metrics"]["roc_auc"], abs=1e-6)

        # As champion it is scored through the registry (models:/...) the same way.
        version = mlflow.register_model(result["model_uri"], spec.model_name).version
        client = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"], registry_uri=env["MLFLOW_TRACKING_URI"])
        client.set_registered_model_alias(spec.model_name, "champion", version)
        again = evaluate_model(ctx, result, features)
        assert again["champion_version"] == str(version)
        assert again["champion_value"] == pytest.approx(decision["value"])
        assert again["decision"] == "rejected" and "does not beat" in again["reason"]  # a tie never wins

        # The serving gateway falls back to pyfunc and answers P(label=1) per row. Values are floats: MLflow's
        # schema enforcement refuses a JSON integer (int64) for a double column of a pyfunc model.
        predict = load_predictor(env["MLFLOW_TRACKING_URI"], spec.model_name, str(version))
        rows = holdout_of(env)[FEATURES].astype("float64").head(3).to_dict(orient="records")
        out = predict(rows)
        assert len(out) == 3 and all(isinstance(p, float) and 0 <= p <= 1 for p in out)
    finally:
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)


def test_killed_trainer_resumes_from_its_epoch_checkpoint(fresh, site):
    """SIGKILLed right after the epoch-8 checkpoint, the rerun resumes there and ends with the same model
    as the uninterrupted run (network, optimizer and RNG states are all checkpointed)."""
    root, train, holdout, read_only = site
    env = contract_env(root, train, holdout, read_only, "resumed") | {
        "MLPLATFORM_CHECKPOINT_DIR": str(root / "checkpoints"), "MLPLATFORM_CHECKPOINT_EVERY": str(EVERY)}
    killed = run_trainer(env | {"MLPLATFORM_TEST_STOP_AFTER_ROUNDS": str(STOP)}, read_only)
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    assert f"checkpoint saved at epoch {EVERY}/{EPOCHS}" in killed.stdout
    assert f"checkpoint saved at epoch {STOP}/{EPOCHS}" in killed.stdout
    assert not Path(env["MLPLATFORM_RESULT_PATH"]).exists()
    latest = json.loads((root / "checkpoints" / "latest.json").read_text())
    assert latest["rounds"] == STOP and latest["model"] == f"model-{STOP:06d}.pt"

    resumed = run_trainer(env, read_only)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resumed from checkpoint at epoch {STOP} of {EPOCHS}" in resumed.stdout
    assert f"{EPOCHS - STOP} epochs to go" in resumed.stdout
    assert os.listdir(read_only) == []

    import mlflow

    result = json.loads(Path(env["MLPLATFORM_RESULT_PATH"]).read_text())
    run = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"]).get_run(result["run_id"])
    assert run.data.metrics["resumed_from_epoch"] == STOP and run.data.metrics["epochs"] == EPOCHS

    fresh_env, fresh_result, _ = fresh
    frame = holdout_of(env)[FEATURES].astype("float64")
    np.testing.assert_allclose(pyfunc(env, result["model_uri"]).predict(frame),
                               pyfunc(fresh_env, fresh_result["model_uri"]).predict(frame), atol=1e-6)
    assert result["metrics"] == pytest.approx(fresh_result["metrics"], abs=1e-6)


@pytest.mark.parametrize(
    ("hyperparameters", "message"),
    [
        ({"epochs": 3, "hidden_size": 8}, "unknown hyperparameter 'hidden_size' for pytorch; valid names: batch_size,"),
        ({"layers": 0}, "layers=0 must be at least 1"),
        ({"lr": "fast"}, "lr='fast' must be a number"),
    ],
)
def test_bad_pytorch_hyperparameters_exit_2_in_one_line(site, tmp_path, hyperparameters, message):
    root, train, holdout, _ = site
    env = contract_env(tmp_path, train, holdout, tmp_path, "bad") | {
        "MLPLATFORM_HYPERPARAMETERS": json.dumps(hyperparameters)}
    proc = run_trainer(env, tmp_path)
    assert proc.returncode == 2, proc.stdout + proc.stderr
    assert message in proc.stderr and "Traceback" not in proc.stderr
    assert not Path(env["MLPLATFORM_RESULT_PATH"]).exists()
