"""The trainer entrypoint as a real subprocess, configured only through its environment contract."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest

from mlplatform.config import REPO_ROOT

TRAINER = REPO_ROOT / "include" / "trainer" / "train.py"
FEATURES = ["f0", "f1", "f2", "f3", "f4"]


def make_data(folder: Path, rows: int = 2000, seed: int = 0) -> tuple[Path, Path]:
    """Binary label from a logistic model of five numeric features; 80/20 train/holdout parquet."""
    rng = np.random.default_rng(seed)
    X = rng.normal(size=(rows, len(FEATURES)))
    logit = 1.5 * X[:, 0] - X[:, 1] + 0.5 * X[:, 2]
    frame = pd.DataFrame(X, columns=FEATURES)
    frame["f4"] = rng.integers(0, 10, rows)  # an integer column too
    frame["label"] = (rng.random(rows) < 1 / (1 + np.exp(-logit))).astype("int64")
    frame["entity"] = np.arange(rows)
    frame["timestamp"] = pd.Timestamp("2026-11-01", tz="UTC")
    folder.mkdir(parents=True, exist_ok=True)
    cut = int(rows * 0.8)
    frame.iloc[:cut].to_parquet(folder / "train.parquet", index=False)
    frame.iloc[cut:].to_parquet(folder / "holdout.parquet", index=False)
    return folder / "train.parquet", folder / "holdout.parquet"


@pytest.fixture(scope="module")
def pycache(tmp_path_factory) -> Path:
    """Shared bytecode cache for the trainer subprocesses (a fresh interpreter otherwise recompiles
    mlflow and scikit-learn every time when PYTHONDONTWRITEBYTECODE is set)."""
    return tmp_path_factory.mktemp("pycache")


@pytest.fixture
def contract(tmp_path, pycache) -> dict[str, str]:
    train, holdout = make_data(tmp_path / "data")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "MLPLATFORM_"))}
    env.pop("PYTHONDONTWRITEBYTECODE", None)
    return env | {
        "PYTHONPYCACHEPREFIX": str(pycache),
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db",
        "MLPLATFORM_TRAIN_DATA": str(train),
        "MLPLATFORM_HOLDOUT_DATA": str(holdout),
        "MLPLATFORM_LABEL": "label",
        "MLPLATFORM_FEATURES": ",".join(FEATURES),
        "MLPLATFORM_FRAMEWORK": "xgboost",
        "MLPLATFORM_HYPERPARAMETERS": json.dumps({"n_estimators": 30, "max_depth": 3}),
        "MLPLATFORM_EXPERIMENT": "acme/churn",
        "MLPLATFORM_RUN_NAME": "acme__churn.manual_1",
        "MLPLATFORM_RUN_TAGS": json.dumps({"mlplatform.tenant": "acme", "mlplatform.pipeline": "churn"}),
        "MLPLATFORM_DATA_FINGERPRINT": "fp-123",
        "MLPLATFORM_RESULT_PATH": str(tmp_path / "out" / "result.json"),
        "MLPLATFORM_SCRATCH_DIR": str(tmp_path / "scratch"),
        "MLPLATFORM_ARTIFACT_LOCATION": str(tmp_path / "mlartifacts"),
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "true",
    }


@pytest.fixture
def read_only(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    yield folder
    folder.chmod(0o755)


@pytest.fixture
def fake_gpu(tmp_path) -> Path:
    """A folder with an nvidia-smi that lists one GPU."""
    folder = tmp_path / "bin"
    folder.mkdir()
    smi = folder / "nvidia-smi"
    smi.write_text("#!/bin/sh\necho 'GPU 0: NVIDIA A10G (UUID: GPU-0)'\n")
    smi.chmod(0o755)
    return folder


def run_trainer(env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TRAINER)], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=600)


def client_for(env: dict[str, str]):
    import mlflow

    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    return mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"])


@pytest.mark.parametrize(
    ("framework", "model", "hyperparameters"),
    [
        ("xgboost", "gradient_boosting", {"n_estimators": 30, "max_depth": 3}),
        ("sklearn", "random_forest", {"n_estimators": 30, "max_depth": 6}),
        ("sklearn", "logistic_regression", {"C": 0.5}),
    ],
)
def test_trains_logs_and_writes_result(contract, read_only, fake_gpu, framework, model, hyperparameters):
    """Like in the pod, cwd and HOME are read-only: only the scratch dir and the result path are writable.
    resources.gpu is 1 and nvidia-smi lists a GPU: xgboost trains on cuda if its build has CUDA, else on cpu
    with a notice."""
    import mlflow

    env = contract | {"MLPLATFORM_FRAMEWORK": framework, "MLPLATFORM_MODEL": model, "MLPLATFORM_GPUS": "1",
                      "MLPLATFORM_CPU_THREADS": "1",
                      "MLPLATFORM_HYPERPARAMETERS": json.dumps(hyperparameters), "HOME": str(read_only),
                      "PATH": f"{fake_gpu}{os.pathsep}{os.environ['PATH']}"}
    env.pop("TMPDIR", None)
    env.pop("CUDA_VISIBLE_DEVICES", None)
    proc = run_trainer(env, read_only)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert os.listdir(read_only) == []  # root ignores chmod: check that nothing was written there

    result = json.loads(Path(env["MLPLATFORM_RESULT_PATH"]).read_text())
    assert set(result) == {"run_id", "model_uri", "metrics", "framework", "experiment_id", "data_fingerprint"}
    assert result["model_uri"] == f"runs:/{result['run_id']}/model"
    assert result["framework"] == framework and result["data_fingerprint"] == "fp-123"
    assert set(result["metrics"]) == {"roc_auc", "accuracy", "f1", "log_loss"}
    assert result["metrics"]["roc_auc"] > 0.75

    client = client_for(env)
    run = client.get_run(result["run_id"])
    assert run.info.experiment_id == result["experiment_id"]
    assert client.get_experiment(result["experiment_id"]).name == "acme/churn"
    assert run.info.run_name == "acme__churn.manual_1"
    assert {k: str(v) for k, v in hyperparameters.items()}.items() <= run.data.params.items()
    assert run.data.params["data_fingerprint"] == "fp-123" and run.data.params["framework"] == framework
    if framework == "xgboost":
        import xgboost

        cuda = xgboost.build_info().get("USE_CUDA", False)
        assert run.data.params["device"] == ("cuda" if cuda else "cpu")
        assert cuda or "a GPU is visible but this xgboost build has no CUDA" in proc.stdout
    assert run.data.metrics["train_rows"] == 1600
    assert run.data.metrics["roc_auc"] == pytest.approx(result["metrics"]["roc_auc"])
    assert run.data.tags["mlplatform.tenant"] == "acme"
    assert run.data.tags["mlplatform.data_fingerprint"] == "fp-123"

    holdout = pd.read_parquet(env["MLPLATFORM_HOLDOUT_DATA"])
    predictions = mlflow.pyfunc.load_model(result["model_uri"]).predict(holdout[FEATURES].astype("float64"))
    assert len(predictions) == len(holdout) and set(np.unique(predictions)) <= {0, 1}
    info = mlflow.models.get_model_info(result["model_uri"])
    assert info.signature.inputs.input_names() == FEATURES
    native = (mlflow.xgboost if framework == "xgboost" else mlflow.sklearn).load_model(result["model_uri"])
    assert native.predict_proba(holdout[FEATURES].astype("float64")).shape == (len(holdout), 2)
    requirements = Path(mlflow.pyfunc.get_model_dependencies(result["model_uri"])).read_text()
    assert "mlflow==" in requirements and "scikit-learn==" in requirements


def test_unknown_hyperparameter_exits_nonzero_naming_it(contract, tmp_path):
    env = contract | {"MLPLATFORM_FRAMEWORK": "sklearn", "MLPLATFORM_MODEL": "random_forest",
                      "MLPLATFORM_HYPERPARAMETERS": json.dumps({"n_estimators": 10, "n_trees": 5})}
    proc = run_trainer(env, tmp_path)
    assert proc.returncode == 2
    assert "unknown hyperparameter 'n_trees'" in proc.stderr
    assert not Path(env["MLPLATFORM_RESULT_PATH"]).exists()


@pytest.mark.parametrize(
    ("overrides", "message"),
    [
        ({"MLPLATFORM_FRAMEWORK": "lightgbm"}, "MLPLATFORM_FRAMEWORK='lightgbm'"),
        ({"MLPLATFORM_HYPERPARAMETERS": "[1, 2]"}, "MLPLATFORM_HYPERPARAMETERS must be a JSON object"),
        ({"MLPLATFORM_LABEL": ""}, "MLPLATFORM_LABEL is required"),
        ({"MLPLATFORM_FEATURES": "f0,nope"}, "lacks column(s) nope"),
    ],
)
def test_bad_configuration_is_one_readable_line(contract, tmp_path, overrides, message):
    proc = run_trainer(contract | overrides, tmp_path)
    assert proc.returncode == 2
    assert message in proc.stderr and "Traceback" not in proc.stderr


def test_gpu_only_when_resources_ask_for_one(contract, tmp_path, fake_gpu):
    """A visible GPU is not used unless spec.training.resources.gpu > 0 (MLPLATFORM_GPUS): it would be outside
    the tenant's GPU pool and chargeback."""
    env = contract | {"MLPLATFORM_GPUS": "0", "MLPLATFORM_CPU_THREADS": "1",
                      "PATH": f"{fake_gpu}{os.pathsep}{os.environ['PATH']}"}
    env.pop("CUDA_VISIBLE_DEVICES", None)
    proc = run_trainer(env, tmp_path)
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert "GPU" not in proc.stdout
    run = client_for(env).get_run(json.loads(Path(env["MLPLATFORM_RESULT_PATH"]).read_text())["run_id"])
    assert run.data.params["device"] == "cpu"


@pytest.mark.parametrize("hyperparameters", [{"n_jobs": -1}, {"device": "cuda"}, {"nthread": 64}])
def test_platform_keys_are_refused(contract, tmp_path, hyperparameters):
    """device and thread counts come from resources, never from the spec (lint refuses them too)."""
    proc = run_trainer(contract | {"MLPLATFORM_HYPERPARAMETERS": json.dumps(hyperparameters)}, tmp_path)
    assert proc.returncode == 2
    assert f"hyperparameter {next(iter(hyperparameters))!r} is set by the platform" in proc.stderr
    assert "Traceback" not in proc.stderr
