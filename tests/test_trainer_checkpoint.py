"""Trainer checkpoints: a preempted trainer (a real process, SIGKILLed mid-training) resumes on rerun.

The trainer runs as a real subprocess under the pod's environment contract (read-only cwd and HOME, a
scratch dir); MLPLATFORM_TEST_STOP_AFTER_ROUNDS makes it SIGKILL itself right after a checkpoint, as a
spot reclaim or an eviction would. The rerun must resume from that round and end with the full number of
trees, the same model an uninterrupted run produces.
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

TRAINER = REPO_ROOT / "include" / "trainer" / "train.py"
FEATURES = ["f0", "f1", "f2", "f3"]
ROUNDS, EVERY, STOP = 60, 10, 30


def make_data(folder: Path, rows: int = 1500) -> tuple[Path, Path]:
    rng = np.random.default_rng(7)
    X = rng.normal(size=(rows, len(FEATURES)))
    frame = pd.DataFrame(X, columns=FEATURES)
    frame["label"] = (rng.random(rows) < 1 / (1 + np.exp(-(1.2 * X[:, 0] - X[:, 1])))).astype("int64")
    folder.mkdir(parents=True, exist_ok=True)
    cut = int(rows * 0.8)
    frame.iloc[:cut].to_parquet(folder / "train.parquet", index=False)
    frame.iloc[cut:].to_parquet(folder / "holdout.parquet", index=False)
    return folder / "train.parquet", folder / "holdout.parquet"


@pytest.fixture
def read_only(tmp_path):
    folder = tmp_path / "ro"
    folder.mkdir()
    folder.chmod(0o555)
    yield folder
    folder.chmod(0o755)


@pytest.fixture
def contract(tmp_path, read_only) -> dict[str, str]:
    train, holdout = make_data(tmp_path / "data")
    env = {k: v for k, v in os.environ.items() if not k.startswith(("MLFLOW_", "MLPLATFORM_", "AWS_"))}
    env.pop("TMPDIR", None)
    return env | {  # the venv's bytecode was compiled at install: no pycache prefix (that recompiles mlflow)
        "HOME": str(read_only),
        "MLFLOW_TRACKING_URI": f"sqlite:///{tmp_path}/mlflow.db",
        "MLPLATFORM_TRAIN_DATA": str(train),
        "MLPLATFORM_HOLDOUT_DATA": str(holdout),
        "MLPLATFORM_LABEL": "label",
        "MLPLATFORM_FEATURES": ",".join(FEATURES),
        "MLPLATFORM_FRAMEWORK": "xgboost",
        "MLPLATFORM_HYPERPARAMETERS": json.dumps({"n_estimators": ROUNDS, "max_depth": 3, "learning_rate": 0.1}),
        "MLPLATFORM_EXPERIMENT": "acme/churn",
        "MLPLATFORM_RUN_NAME": "acme__churn.manual_1",
        "MLPLATFORM_RUN_TAGS": json.dumps({"mlplatform.tenant": "acme"}),
        "MLPLATFORM_DATA_FINGERPRINT": "fp-ckpt",
        "MLPLATFORM_RESULT_PATH": str(tmp_path / "out" / "result.json"),
        "MLPLATFORM_SCRATCH_DIR": str(tmp_path / "scratch"),
        "MLPLATFORM_ARTIFACT_LOCATION": str(tmp_path / "mlartifacts"),
        "MLPLATFORM_CHECKPOINT_DIR": str(tmp_path / "checkpoints"),
        "MLPLATFORM_CHECKPOINT_EVERY": str(EVERY),
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "true",
    }


def run_trainer(env: dict[str, str], cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, str(TRAINER)], env=env, cwd=cwd, capture_output=True, text=True,
                          timeout=600)


def load_result(env: dict[str, str]):
    import mlflow

    result = json.loads(Path(env["MLPLATFORM_RESULT_PATH"]).read_text())
    mlflow.set_tracking_uri(env["MLFLOW_TRACKING_URI"])
    model = mlflow.xgboost.load_model(result["model_uri"])
    run = mlflow.MlflowClient(env["MLFLOW_TRACKING_URI"]).get_run(result["run_id"])
    return result, model, run


def kill_then_resume(env: dict[str, str], cwd: Path) -> tuple[subprocess.CompletedProcess, subprocess.CompletedProcess]:
    killed = run_trainer(env | {"MLPLATFORM_TEST_STOP_AFTER_ROUNDS": str(STOP)}, cwd)
    assert killed.returncode == -signal.SIGKILL, killed.stdout + killed.stderr
    assert f"checkpoint saved at round {STOP}/{ROUNDS}" in killed.stdout
    assert f"checkpoint saved at round {STOP + EVERY}/" not in killed.stdout  # it really died there
    assert not Path(env["MLPLATFORM_RESULT_PATH"]).exists()
    resumed = run_trainer(env, cwd)
    assert resumed.returncode == 0, resumed.stdout + resumed.stderr
    assert f"resumed from checkpoint at round {STOP} of {ROUNDS}" in resumed.stdout
    assert f"{ROUNDS - STOP} rounds to go" in resumed.stdout
    return killed, resumed


def test_killed_trainer_resumes_from_its_local_checkpoint(contract, read_only, tmp_path):
    killed, resumed = kill_then_resume(contract, read_only)
    latest = json.loads((tmp_path / "checkpoints" / "latest.json").read_text())
    assert latest["rounds"] == ROUNDS - EVERY and latest["model"] == f"model-{ROUNDS - EVERY:06d}.ubj"
    assert sorted(p.name for p in (tmp_path / "checkpoints").iterdir()) == ["latest.json", latest["model"]]
    assert os.listdir(read_only) == []

    result, model, run = load_result(contract)
    assert model.get_booster().num_boosted_rounds() == ROUNDS  # the full number of trees
    assert run.data.metrics["resumed_from_round"] == STOP and run.data.metrics["boosted_rounds"] == ROUNDS
    assert run.data.params["n_estimators"] == str(ROUNDS)

    # An uninterrupted run of the same configuration (no checkpoints) gives the same model.
    fresh_env = contract | {"MLPLATFORM_CHECKPOINT_DIR": "",
                            "MLPLATFORM_RESULT_PATH": str(tmp_path / "fresh" / "result.json")}
    fresh = run_trainer(fresh_env, read_only)
    assert fresh.returncode == 0, fresh.stdout + fresh.stderr
    assert "resumed" not in fresh.stdout
    fresh_result, fresh_model, fresh_run = load_result(fresh_env)
    assert fresh_run.data.metrics["resumed_from_round"] == 0
    holdout = pd.read_parquet(contract["MLPLATFORM_HOLDOUT_DATA"])[FEATURES].astype("float64")
    np.testing.assert_allclose(model.predict_proba(holdout), fresh_model.predict_proba(holdout), atol=1e-6)
    assert result["metrics"] == pytest.approx(fresh_result["metrics"], abs=1e-6)


def test_killed_trainer_resumes_from_an_s3_checkpoint(contract, read_only, tmp_path):
    """The pod's case: the checkpoint prefix is s3:// on an S3-compatible store (moto on loopback)."""
    boto3 = pytest.importorskip("boto3")
    server_mod = pytest.importorskip("moto.server")
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    try:
        host, port = server.get_host_and_port()
        endpoint = f"http://{host}:{port}"
        s3_env = {"AWS_ENDPOINT_URL": endpoint, "AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing",
                  "AWS_DEFAULT_REGION": "us-east-1"}
        s3 = boto3.client("s3", endpoint_url=endpoint, aws_access_key_id="testing", aws_secret_access_key="testing",
                          region_name="us-east-1")
        s3.create_bucket(Bucket="mlplatform-artifacts")
        prefix = "acme/churn/manual_1/train/checkpoints"
        env = contract | s3_env | {"MLPLATFORM_CHECKPOINT_DIR": f"s3://mlplatform-artifacts/{prefix}"}
        kill_then_resume(env, read_only)
        keys = sorted(o["Key"] for o in s3.list_objects_v2(Bucket="mlplatform-artifacts")["Contents"])
        assert keys == [f"{prefix}/latest.json", f"{prefix}/model-{ROUNDS - EVERY:06d}.ubj"]
        _, model, run = load_result(env)
        assert model.get_booster().num_boosted_rounds() == ROUNDS
        assert run.data.metrics["resumed_from_round"] == STOP
    finally:
        server.stop()


# --- in-process checks of the checkpoint logic ---------------------------------------------------------

@pytest.fixture(scope="module")
def trainer():
    spec = importlib.util.spec_from_file_location("mlplatform_trainer_under_test", TRAINER)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def small_fit(trainer, tmp_path, checkpoint_dir: str, hp: dict, stop_after: int = 0):
    import xgboost

    X = pd.DataFrame(np.random.default_rng(0).normal(size=(300, 3)), columns=["a", "b", "c"])
    y = (X["a"] > 0).astype("int64")
    cfg = {"framework": "xgboost", "fingerprint": "fp", "label": "y", "features": ["a", "b", "c"],
           "hyperparameters": hp, "train_data": "train.parquet", "checkpoint_dir": checkpoint_dir,
           "checkpoint_every": 5, "scratch": tmp_path / "scratch", "test_stop_after_rounds": stop_after}
    estimator = xgboost.XGBClassifier(random_state=0, **hp)
    return trainer.fit_xgboost(cfg, estimator, X, y), estimator, cfg


def test_a_checkpoint_of_another_configuration_is_not_resumed(trainer, tmp_path, capsys):
    folder = str(tmp_path / "ck")
    info, _, cfg = small_fit(trainer, tmp_path, folder, {"n_estimators": 12})
    assert info == {"resumed_from_round": 0, "boosted_rounds": 12}
    assert json.loads((tmp_path / "ck" / "latest.json").read_text())["rounds"] == 10
    info, estimator, _ = small_fit(trainer, tmp_path, folder, {"n_estimators": 12, "max_depth": 2})
    assert info["resumed_from_round"] == 0 and "another configuration: starting fresh" in capsys.readouterr().out
    assert estimator.get_booster().num_boosted_rounds() == 12
    info, estimator, _ = small_fit(trainer, tmp_path, folder, {"n_estimators": 12, "max_depth": 2})
    assert info["resumed_from_round"] == 10 and estimator.get_booster().num_boosted_rounds() == 12


def test_an_unwritable_checkpoint_dir_only_disables_checkpoints(trainer, tmp_path, capsys):
    """E.g. a worker-local path inside a pod (read-only root filesystem); a file in the way fails even for root."""
    blocker = tmp_path / "not-a-dir"
    blocker.write_text("")
    info, estimator, _ = small_fit(trainer, tmp_path, str(blocker / "checkpoints"), {"n_estimators": 8})
    assert "checkpointing disabled" in capsys.readouterr().out
    assert info == {"resumed_from_round": 0, "boosted_rounds": 8}
    assert estimator.get_booster().num_boosted_rounds() == 8
