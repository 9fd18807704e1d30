"""Trainer entrypoint: train one binary classifier and log it to MLflow.

Runs as a local subprocess or as a Kubernetes pod; both configure it only through environment
variables (see ``read_config``). It writes a result JSON to MLPLATFORM_RESULT_PATH and exits 2 with a
one-line message on bad configuration. Standalone on purpose: it never imports the mlplatform package.
"""

from __future__ import annotations

import importlib
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from importlib import metadata
from pathlib import Path

DEFAULT_RESULT_PATH = "/airflow/xcom/return.json"
SKLEARN_MODELS = {
    "gradient_boosting": ("sklearn.ensemble", "GradientBoostingClassifier", {"random_state": 0}),
    "random_forest": ("sklearn.ensemble", "RandomForestClassifier", {"random_state": 0}),
    "logistic_regression": ("sklearn.linear_model", "LogisticRegression", {"max_iter": 1000}),
}
# Types skops does not trust by default but that our tree estimators contain.
SKOPS_TRUSTED_TYPES = ["sklearn.tree._tree.Tree"]


class ConfigError(Exception):
    """Bad configuration or input data: reported in one line, exit code 2."""


def env(name: str, default: str | None = None) -> str:
    value = os.environ.get(name, "").strip()
    if value:
        return value
    if default is None:
        raise ConfigError(f"environment variable {name} is required")
    return default


def json_object(name: str) -> dict:
    try:
        value = json.loads(env(name, "{}"))
    except json.JSONDecodeError as exc:
        raise ConfigError(f"{name} is not valid JSON: {exc}") from None
    if not isinstance(value, dict):
        raise ConfigError(f"{name} must be a JSON object, got {type(value).__name__}")
    return value


def read_config() -> dict:
    """The env contract shared by the local process backend and the Kubernetes pod."""
    cfg = {
        "tracking_uri": env("MLFLOW_TRACKING_URI"),
        "train_data": env("MLPLATFORM_TRAIN_DATA"),
        "holdout_data": env("MLPLATFORM_HOLDOUT_DATA"),
        "label": env("MLPLATFORM_LABEL"),
        "features": [f.strip() for f in env("MLPLATFORM_FEATURES").split(",") if f.strip()],
        "framework": env("MLPLATFORM_FRAMEWORK", "xgboost"),
        "model": env("MLPLATFORM_MODEL", "gradient_boosting"),
        "hyperparameters": json_object("MLPLATFORM_HYPERPARAMETERS"),
        "experiment": env("MLPLATFORM_EXPERIMENT"),
        "run_name": env("MLPLATFORM_RUN_NAME", "train"),
        "tags": {k: str(v) for k, v in json_object("MLPLATFORM_RUN_TAGS").items()},
        "fingerprint": env("MLPLATFORM_DATA_FINGERPRINT", "unknown"),
        "result_path": Path(env("MLPLATFORM_RESULT_PATH", DEFAULT_RESULT_PATH)),
        "scratch": Path(env("MLPLATFORM_SCRATCH_DIR", tempfile.gettempdir())),
        "artifact_location": env("MLPLATFORM_ARTIFACT_LOCATION", ""),
    }
    if cfg["framework"] not in ("xgboost", "sklearn"):
        raise ConfigError(f"MLPLATFORM_FRAMEWORK={cfg['framework']!r}: expected xgboost or sklearn")
    if cfg["framework"] == "sklearn" and cfg["model"] not in SKLEARN_MODELS:
        raise ConfigError(f"MLPLATFORM_MODEL={cfg['model']!r}: expected one of {', '.join(SKLEARN_MODELS)}")
    return cfg


def prepare_process(scratch: Path) -> None:
    """Temporary files only in the scratch dir (the pod's root filesystem is read-only); quiet MLflow."""
    scratch.mkdir(parents=True, exist_ok=True)
    os.environ["TMPDIR"] = str(scratch)
    tempfile.tempdir = str(scratch)
    os.environ.setdefault("MPLCONFIGDIR", str(scratch / "matplotlib"))
    for name in ("MLFLOW_DISABLE_TELEMETRY", "DO_NOT_TRACK"):
        os.environ.setdefault(name, "true")
    os.environ.setdefault("MLFLOW_ENABLE_ARTIFACTS_PROGRESS_BAR", "false")


def load_split(path: str, label: str, features: list[str]):
    """(X as float64, y as int 0/1) from one parquet file."""
    import pandas as pd

    if not Path(path).is_file():
        raise ConfigError(f"data file {path} does not exist")
    frame = pd.read_parquet(path)
    missing = [c for c in [label, *features] if c not in frame.columns]
    if missing:
        raise ConfigError(f"{path} lacks column(s) {', '.join(missing)}")
    not_numeric = [c for c in features if not pd.api.types.is_numeric_dtype(frame[c])]
    if not_numeric:
        raise ConfigError(f"feature column(s) {', '.join(not_numeric)} are not numeric")
    y = frame[label]
    if not set(y.dropna().unique()) <= {0, 1} or y.isna().any():
        raise ConfigError(f"label {label!r} must be binary 0/1 (or boolean) without nulls")
    return frame[features].astype("float64"), y.astype("int64")


def gpu_visible() -> bool:
    """True when nvidia-smi lists a GPU and CUDA_VISIBLE_DEVICES does not hide them all."""
    if os.environ.get("CUDA_VISIBLE_DEVICES") in ("", "-1"):
        return False
    smi = shutil.which("nvidia-smi")
    if not smi:
        return False
    try:
        out = subprocess.run([smi, "-L"], capture_output=True, text=True, timeout=30)
    except (OSError, subprocess.TimeoutExpired):
        return False
    return out.returncode == 0 and "GPU" in out.stdout


def check_names(estimator, hyperparameters: dict, what: str) -> None:
    valid = estimator.get_params()
    for name in hyperparameters:
        if name not in valid:
            raise ConfigError(
                f"unknown hyperparameter {name!r} for {what}; valid names: {', '.join(sorted(valid))}"
            )


def build_estimator(cfg: dict):
    """(estimator, training device) from framework, model and hyperparameters."""
    hp = cfg["hyperparameters"]
    if cfg["framework"] == "xgboost":
        import xgboost

        cuda = gpu_visible()
        if cuda and not xgboost.build_info().get("USE_CUDA", False):
            print("a GPU is visible but this xgboost build has no CUDA: training on cpu", flush=True)
            cuda = False
        estimator = xgboost.XGBClassifier(device="cuda" if cuda else "cpu", eval_metric="logloss", random_state=0)
        check_names(estimator, hp, "xgboost")
    else:
        module, cls, defaults = SKLEARN_MODELS[cfg["model"]]
        estimator = getattr(importlib.import_module(module), cls)(**defaults)
        check_names(estimator, hp, f"sklearn {cfg['model']}")
    estimator.set_params(**hp)
    return estimator, estimator.get_params().get("device", "cpu")


def holdout_metrics(estimator, X, y) -> dict[str, float]:
    from sklearn.metrics import accuracy_score, f1_score, log_loss, roc_auc_score

    proba = estimator.predict_proba(X)[:, 1]
    pred = (proba >= 0.5).astype("int64")
    return {
        "roc_auc": float(roc_auc_score(y, proba)),
        "accuracy": float(accuracy_score(y, pred)),
        "f1": float(f1_score(y, pred, zero_division=0)),
        "log_loss": float(log_loss(y, proba, labels=[0, 1])),
    }


def pinned(*dists: str) -> list[str]:
    """``name==version`` of each installed distribution (skips ones not installed)."""
    pins = []
    for dist in dists:
        try:
            pins.append(f"{dist}=={metadata.version(dist)}")
        except metadata.PackageNotFoundError:
            pass
    return pins


def log_model(cfg: dict, estimator, X):
    """Log with the native flavor (so evaluation can call predict_proba); returns (model info, seconds)."""
    import mlflow
    from mlflow.models import infer_signature

    sample = X.head(5)
    common = {
        "name": "model",
        "signature": infer_signature(sample, estimator.predict(sample)),
        "input_example": sample,
    }
    started = time.perf_counter()
    if cfg["framework"] == "xgboost":
        estimator.set_params(device="cpu")  # serve on CPU whatever it trained on
        info = mlflow.xgboost.log_model(
            estimator, model_format="ubj",
            pip_requirements=pinned("mlflow", "xgboost", "xgboost-cpu", "scikit-learn", "pandas", "numpy"),
            **common,
        )
    else:
        info = mlflow.sklearn.log_model(
            estimator, serialization_format="skops", skops_trusted_types=SKOPS_TRUSTED_TYPES,
            pip_requirements=pinned("mlflow", "scikit-learn", "skops", "pandas", "numpy"),
            **common,
        )
    return info, time.perf_counter() - started


def experiment_id(cfg: dict) -> str:
    """Id of the named experiment, created (at MLPLATFORM_ARTIFACT_LOCATION/<name> if set) when missing."""
    from mlflow import MlflowClient
    from mlflow.exceptions import MlflowException

    client = MlflowClient()
    found = client.get_experiment_by_name(cfg["experiment"])
    if found:
        return found.experiment_id
    location = f"{cfg['artifact_location'].rstrip('/')}/{cfg['experiment']}" if cfg["artifact_location"] else None
    try:
        return client.create_experiment(cfg["experiment"], artifact_location=location)
    except MlflowException:  # created concurrently by another trainer?
        found = client.get_experiment_by_name(cfg["experiment"])
        if found is None:
            raise
        return found.experiment_id


def train(cfg: dict) -> dict:
    X, y = load_split(cfg["train_data"], cfg["label"], cfg["features"])
    X_holdout, y_holdout = load_split(cfg["holdout_data"], cfg["label"], cfg["features"])
    estimator, device = build_estimator(cfg)
    started = time.perf_counter()
    estimator.fit(X, y)
    fit_seconds = time.perf_counter() - started
    metrics = holdout_metrics(estimator, X_holdout, y_holdout)
    print(f"trained {cfg['framework']} on {len(X)} rows ({device}) in {fit_seconds:.2f}s: {metrics}", flush=True)

    import mlflow

    mlflow.set_tracking_uri(cfg["tracking_uri"])
    exp_id = experiment_id(cfg)
    tags = {**cfg["tags"], "mlplatform.data_fingerprint": cfg["fingerprint"], "mlplatform.framework": cfg["framework"]}
    with mlflow.start_run(experiment_id=exp_id, run_name=cfg["run_name"], tags=tags) as run:
        mlflow.log_params({**cfg["hyperparameters"], "framework": cfg["framework"], "device": device,
                           "model": cfg["model"] if cfg["framework"] == "sklearn" else "xgb_classifier",
                           "n_features": len(cfg["features"]), "data_fingerprint": cfg["fingerprint"]})
        mlflow.log_metrics({**metrics, "train_rows": len(X), "holdout_rows": len(X_holdout),
                            "fit_seconds": fit_seconds})
        info, log_seconds = log_model(cfg, estimator, X)
        mlflow.log_metric("log_model_seconds", log_seconds)
    print(f"logged model {info.model_uri} in {log_seconds:.2f}s (run {run.info.run_id})", flush=True)
    return {
        "run_id": run.info.run_id,
        "model_uri": f"runs:/{run.info.run_id}/model",
        "metrics": metrics,
        "framework": cfg["framework"],
        "experiment_id": exp_id,
        "data_fingerprint": cfg["fingerprint"],
    }


def main() -> int:
    try:
        cfg = read_config()
        prepare_process(cfg["scratch"])
        result = train(cfg)
    except ConfigError as exc:
        print(f"trainer: configuration error: {exc}", file=sys.stderr, flush=True)
        return 2
    cfg["result_path"].parent.mkdir(parents=True, exist_ok=True)
    cfg["result_path"].write_text(json.dumps(result))
    print(f"result written to {cfg['result_path']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
