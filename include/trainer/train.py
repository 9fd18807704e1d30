"""Trainer entrypoint: train one binary classifier and log it to MLflow.

Runs as a local subprocess or as a Kubernetes pod; both configure it only through environment
variables (see ``read_config``). It writes a result JSON to MLPLATFORM_RESULT_PATH and exits 2 with a
one-line message on bad configuration. Standalone on purpose: it never imports the mlplatform package.

Checkpoints (xgboost): every MLPLATFORM_CHECKPOINT_EVERY boosting rounds (default 25) the booster is saved
under MLPLATFORM_CHECKPOINT_DIR (a local folder, or an s3:// prefix written with boto3; the endpoint comes
from AWS_ENDPOINT_URL); a rerun of the same configuration (same data fingerprint, features, label and
hyperparameters) resumes from the latest checkpoint with the remaining rounds instead of starting over,
so a preempted or evicted pod loses at most one checkpoint interval. MLPLATFORM_TEST_STOP_AFTER_ROUNDS=K
(tests only) SIGKILLs the process right after the first checkpoint at or after round K.

PyTorch (MLPLATFORM_FRAMEWORK=pytorch, torch an optional dependency): a tabular MLP binary classifier on
standardised features (mean and scale from the training split only), on CUDA when MLPLATFORM_GPUS > 0 and
torch sees a GPU, else on the CPU. It checkpoints the same way, counted in epochs: every MLPLATFORM_CHECKPOINT_EVERY epochs the
network, optimizer and random-number states go to MLPLATFORM_CHECKPOINT_DIR, a rerun resumes from the
latest one, and MLPLATFORM_TEST_STOP_AFTER_ROUNDS=K counts epochs. The model is logged as an MLflow pyfunc
(models-from-code, weights loaded with ``weights_only``, no pickle) whose ``predict`` returns P(label=1)
as a 1-D float array.

Resources (from spec.training.resources, both backends): MLPLATFORM_CPU_THREADS sets n_jobs (xgboost, random
forest) and torch's threads; a GPU is used only when MLPLATFORM_GPUS > 0. device, n_jobs, nthread and the other
PLATFORM_KEYS are refused as hyperparameters. A MemoryError exits 3 with one line.
"""

from __future__ import annotations

import hashlib
import importlib
import json
import os
import shutil
import signal
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
DEFAULT_CHECKPOINT_EVERY = 25
DEFAULT_XGB_ROUNDS = 100  # XGBClassifier's n_estimators when the spec does not set it
FRAMEWORKS = ("xgboost", "sklearn", "pytorch")
# PyTorch MLP hyperparameters and their defaults (the only names accepted for framework pytorch).
TORCH_DEFAULTS = {"hidden_units": 64, "layers": 2, "epochs": 20, "lr": 1e-3, "batch_size": 128,
                  "weight_decay": 0.0, "dropout": 0.0, "seed": 0}
# Hyperparameters only the platform sets, from the pod's or process's resources (MLPLATFORM_CPU_THREADS,
# MLPLATFORM_GPUS): never from the spec or the trigger form (also refused at parse time, spec/bounds.py).
PLATFORM_KEYS = {"device", "gpu_id", "n_jobs", "nthread", "num_threads", "thread_count", "predictor", "callbacks",
                 "verbose", "verbosity", "warm_start"}
OOM_EXIT_CODE = 3  # a MemoryError: the run went above spec.training.resources.memory
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


def positive_int(name: str, default: int) -> int:
    raw = env(name, str(default))
    try:
        value = int(raw)
    except ValueError:
        raise ConfigError(f"{name}={raw!r} is not an integer") from None
    if value < 0:
        raise ConfigError(f"{name} must not be negative")
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
        "checkpoint_dir": env("MLPLATFORM_CHECKPOINT_DIR", ""),
        "checkpoint_every": positive_int("MLPLATFORM_CHECKPOINT_EVERY", DEFAULT_CHECKPOINT_EVERY),
        "test_stop_after_rounds": positive_int("MLPLATFORM_TEST_STOP_AFTER_ROUNDS", 0),
        # From spec.training.resources: threads = cpu request (0: unset, the libraries' default), GPU only when > 0.
        "cpu_threads": positive_int("MLPLATFORM_CPU_THREADS", 0),
        "gpus": positive_int("MLPLATFORM_GPUS", 0),
    }
    if cfg["framework"] not in FRAMEWORKS:
        raise ConfigError(f"MLPLATFORM_FRAMEWORK={cfg['framework']!r}: expected xgboost, sklearn or pytorch")
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
    reserved = sorted(set(hp) & PLATFORM_KEYS)
    if reserved:
        raise ConfigError(f"hyperparameter {reserved[0]!r} is set by the platform from spec.training.resources "
                          "(threads from cpu, the device from gpu), not by the spec")
    threads = cfg["cpu_threads"]
    if cfg["framework"] == "xgboost":
        import xgboost

        cuda = cfg["gpus"] > 0 and gpu_visible()
        if cfg["gpus"] > 0 and not cuda:
            print("resources.gpu > 0 but no GPU is visible: training on cpu", flush=True)
        if cuda and not xgboost.build_info().get("USE_CUDA", False):
            print("a GPU is visible but this xgboost build has no CUDA: training on cpu", flush=True)
            cuda = False
        estimator = xgboost.XGBClassifier(device="cuda" if cuda else "cpu", eval_metric="logloss", random_state=0,
                                          n_jobs=threads or None)
        check_names(estimator, hp, "xgboost")
    elif cfg["framework"] == "pytorch":
        params = torch_hyperparameters(hp)  # names and values first: a bad spec fails without importing torch
        started = time.perf_counter()
        try:
            import torch
        except ImportError:
            raise ConfigError("framework pytorch needs torch, which is not installed in this environment "
                              "(the trainer image has it; locally `make setup` installs it when available)") from None
        estimator = TorchTabularClassifier(params, "cuda" if cfg["gpus"] > 0 and torch.cuda.is_available() else "cpu")
        if threads:
            torch.set_num_threads(threads)  # the CPU request, not every core of the node
        elif not os.environ.get("OMP_NUM_THREADS"):
            # Small batches gain nothing from intra-op threads, and torch's default (every core of the node,
            # not the pod's CPU limit) oversubscribes: 20x slower measured on a loaded 2-core machine.
            torch.set_num_threads(1)
        print(f"torch {torch.__version__} imported in {time.perf_counter() - started:.2f}s; training on "
              f"{estimator.device} ({torch.get_num_threads()} cpu thread(s); OMP_NUM_THREADS sets more)", flush=True)
        return estimator, estimator.device
    else:
        module, cls, defaults = SKLEARN_MODELS[cfg["model"]]
        estimator = getattr(importlib.import_module(module), cls)(**defaults)
        if threads and "n_jobs" in estimator.get_params() and cfg["model"] == "random_forest":
            estimator.set_params(n_jobs=threads)  # LogisticRegression's n_jobs does nothing since 1.8
        check_names(estimator, hp, f"sklearn {cfg['model']}")
    estimator.set_params(**hp)
    return estimator, estimator.get_params().get("device", "cpu")


# --- checkpoints (xgboost) ------------------------------------------------------------------------------

class CheckpointStore:
    """Boosters by round under a local folder or an s3:// prefix; ``latest.json`` is the commit point.

    A save writes ``model-<rounds>.ubj`` first and then ``latest.json`` naming it, so a kill between the
    two leaves the previous checkpoint valid; older model files are removed after the commit.
    """

    def __init__(self, location: str, scratch: Path):
        self.location = location.rstrip("/")
        self.scratch = scratch / "checkpoints"
        self.s3 = self.location.startswith("s3://")
        self._client = None
        if self.s3:
            self.bucket, _, self.prefix = self.location[len("s3://"):].partition("/")
        elif "://" in self.location:
            raise ConfigError(f"MLPLATFORM_CHECKPOINT_DIR={location!r}: expected a local folder or s3://")

    # storage primitives
    def _s3(self):
        if self._client is None:
            try:
                import boto3
            except ImportError:
                raise ConfigError("MLPLATFORM_CHECKPOINT_DIR is s3:// but boto3 is not installed") from None
            self._client = boto3.client("s3")  # honours AWS_ENDPOINT_URL and the AWS_* credentials
        return self._client

    def _key(self, name: str) -> str:
        return f"{self.prefix.rstrip('/')}/{name}" if self.prefix else name

    def _write(self, name: str, local: Path) -> None:
        if self.s3:
            self._s3().upload_file(str(local), self.bucket, self._key(name))
        else:
            folder = Path(self.location)
            folder.mkdir(parents=True, exist_ok=True)
            tmp = folder / f".{name}.tmp"
            shutil.copyfile(local, tmp)
            os.replace(tmp, folder / name)

    def _read(self, name: str, local: Path) -> bool:
        if self.s3:
            from botocore.exceptions import ClientError

            try:
                self._s3().download_file(self.bucket, self._key(name), str(local))
            except ClientError as exc:
                if exc.response.get("Error", {}).get("Code") in ("404", "NoSuchKey", "NotFound"):
                    return False
                raise
            return True
        path = Path(self.location) / name
        if not path.is_file():
            return False
        shutil.copyfile(path, local)
        return True

    def _delete(self, name: str) -> None:
        if self.s3:
            self._s3().delete_object(Bucket=self.bucket, Key=self._key(name))
        else:
            (Path(self.location) / name).unlink(missing_ok=True)

    # checkpoints
    def check_writable(self) -> None:
        """Raise OSError (or a boto3 error) now rather than after the first interval of training."""
        if self.s3:
            self._s3().head_bucket(Bucket=self.bucket)
        else:
            Path(self.location).mkdir(parents=True, exist_ok=True)
            probe = Path(self.location) / ".write-probe"
            probe.write_text("ok")
            probe.unlink()

    def latest(self, key: str):
        """(local model path, rounds) of the newest checkpoint made with the same configuration key."""
        self.scratch.mkdir(parents=True, exist_ok=True)
        meta_path = self.scratch / "latest.json"
        if not self._read("latest.json", meta_path):
            return None
        meta = json.loads(meta_path.read_text())
        if meta.get("key") != key:
            print(f"checkpoint in {self.location} was made with another configuration: starting fresh", flush=True)
            return None
        model = self.scratch / meta["model"]
        if not self._read(meta["model"], model):
            return None
        return model, int(meta["rounds"])

    def save(self, booster, rounds: int, key: str, suffix: str = "ubj") -> None:
        """``booster`` is anything with ``save_model(path)``: an xgboost booster or a ``TorchCheckpoint``."""
        self.scratch.mkdir(parents=True, exist_ok=True)
        name = f"model-{rounds:06d}.{suffix}"
        local = self.scratch / name
        booster.save_model(str(local))
        self._write(name, local)
        previous = None
        meta_path = self.scratch / "latest.json"
        if meta_path.is_file():
            previous = json.loads(meta_path.read_text()).get("model")
        meta_path.write_text(json.dumps({"key": key, "rounds": rounds, "model": name, "saved_at": time.time()}))
        self._write("latest.json", meta_path)
        local.unlink(missing_ok=True)
        if previous and previous != name:
            try:
                self._delete(previous)
            except Exception as exc:  # a leftover file is harmless
                print(f"could not delete old checkpoint {previous}: {exc}", flush=True)


def open_checkpoints(cfg: dict) -> CheckpointStore | None:
    """The checkpoint store of MLPLATFORM_CHECKPOINT_DIR, or None when unset, disabled or not writable."""
    if not (cfg["checkpoint_dir"] and cfg["checkpoint_every"] > 0):
        return None
    store = CheckpointStore(cfg["checkpoint_dir"], cfg["scratch"])
    try:
        store.check_writable()
    except Exception as exc:  # e.g. a worker-local path inside a pod: train, just without checkpoints
        print(f"checkpointing disabled: {cfg['checkpoint_dir']} is not writable ({exc})", flush=True)
        return None
    return store


def checkpoint_key(cfg: dict) -> str:
    """What must match for a checkpoint to be resumed: data, columns, model and hyperparameters."""
    what = {k: cfg[k] for k in ("framework", "fingerprint", "label", "features", "hyperparameters")}
    what["train_data"] = cfg["train_data"]
    return hashlib.sha256(json.dumps(what, sort_keys=True).encode()).hexdigest()


def checkpoint_callback(store: CheckpointStore, every: int, total: int, key: str, stop_after: int):
    """An xgboost TrainingCallback saving a checkpoint every ``every`` rounds (not after the last one)."""
    import xgboost

    class Checkpoint(xgboost.callback.TrainingCallback):
        def after_iteration(self, model, epoch, evals_log) -> bool:
            rounds = model.num_boosted_rounds()
            if rounds % every == 0 and rounds < total:
                started = time.perf_counter()
                store.save(model, rounds, key)
                print(f"checkpoint saved at round {rounds}/{total} to {store.location} "
                      f"in {time.perf_counter() - started:.2f}s", flush=True)
                if stop_after and rounds >= stop_after:
                    print(f"MLPLATFORM_TEST_STOP_AFTER_ROUNDS={stop_after}: killing the trainer", flush=True)
                    os.kill(os.getpid(), signal.SIGKILL)
            return False

    return Checkpoint()


def fit_xgboost(cfg: dict, estimator, X, y) -> dict:
    """Fit with checkpoints, resuming from the latest one; returns {"resumed_from_round", "boosted_rounds"}."""
    total = int(cfg["hyperparameters"].get("n_estimators") or estimator.get_params().get("n_estimators")
                or DEFAULT_XGB_ROUNDS)
    info = {"resumed_from_round": 0, "boosted_rounds": total}
    store = open_checkpoints(cfg)
    if store is None:
        estimator.fit(X, y)
        return info
    key = checkpoint_key(cfg)
    found = store.latest(key)
    start_model, done = (found if found else (None, 0))
    if done >= total:  # cannot happen with our saves (never after the last round); be safe
        start_model, done = None, 0
    if start_model is not None:
        print(f"resumed from checkpoint at round {done} of {total} ({store.location}): "
              f"{total - done} rounds to go", flush=True)
    estimator.set_params(n_estimators=total - done, callbacks=[
        checkpoint_callback(store, cfg["checkpoint_every"], total, key, cfg["test_stop_after_rounds"])])
    estimator.fit(X, y, xgb_model=str(start_model) if start_model is not None else None)
    estimator.set_params(n_estimators=total, callbacks=None)
    rounds = estimator.get_booster().num_boosted_rounds()
    if rounds != total:
        raise RuntimeError(f"expected {total} boosting rounds after training, found {rounds}")
    info["resumed_from_round"] = done
    return info


# --- pytorch ------------------------------------------------------------------------------------------

def torch_hyperparameters(hp: dict) -> dict:
    """TORCH_DEFAULTS overridden by ``hp``; unknown names and out-of-range values are ConfigErrors."""
    unknown = sorted(set(hp) - set(TORCH_DEFAULTS))
    if unknown:
        raise ConfigError(f"unknown hyperparameter {unknown[0]!r} for pytorch; valid names: "
                          f"{', '.join(sorted(TORCH_DEFAULTS))}")
    params = dict(TORCH_DEFAULTS)
    for name, value in hp.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise ConfigError(f"pytorch hyperparameter {name}={value!r} must be a number")
        if isinstance(TORCH_DEFAULTS[name], int):
            if float(value) != int(value):
                raise ConfigError(f"pytorch hyperparameter {name}={value!r} must be an integer")
            value = int(value)
        params[name] = value if isinstance(TORCH_DEFAULTS[name], int) else float(value)
    for name in ("hidden_units", "layers", "epochs", "batch_size"):
        if params[name] < 1:
            raise ConfigError(f"pytorch hyperparameter {name}={params[name]} must be at least 1")
    if params["lr"] <= 0 or params["weight_decay"] < 0 or not 0 <= params["dropout"] < 1 or params["seed"] < 0:
        raise ConfigError("pytorch hyperparameters need lr > 0, weight_decay >= 0, 0 <= dropout < 1, seed >= 0")
    return params


def build_mlp(n_features: int, hidden_units: int, layers: int, dropout: float):
    """The network: ``layers`` x (Linear, ReLU[, Dropout]) then Linear to one logit.

    Its source is also written into the logged model's code file, so training and serving build the same
    network from the same definition.
    """
    from torch import nn

    blocks, width = [], n_features
    for _ in range(layers):
        blocks += [nn.Linear(width, hidden_units), nn.ReLU()]
        if dropout:
            blocks.append(nn.Dropout(dropout))
        width = hidden_units
    blocks.append(nn.Linear(width, 1))
    return nn.Sequential(*blocks)


PYFUNC_MODEL_SOURCE = '''"""MLflow pyfunc model written by the mlplatform trainer (include/trainer/train.py): a tabular MLP.

predict(DataFrame) returns P(label=1) per row as a 1-D float64 numpy array. The weights, the feature
columns and the standardisation come from the artifact "state" (torch.save of tensors and plain values,
loaded with weights_only=True); the network is always evaluated on the CPU.
"""

import numpy as np
import pandas as pd
import torch
from mlflow.models import set_model
from mlflow.pyfunc import PythonModel


{build_mlp}


class TabularMLPClassifier(PythonModel):
    def load_context(self, context):
        state = torch.load(context.artifacts["state"], map_location="cpu", weights_only=True)
        self.features = list(state["features"])
        self.mean = state["mean"].numpy()
        self.scale = state["scale"].numpy()
        self.net = build_mlp(len(self.features), **state["architecture"])
        self.net.load_state_dict(state["model"])
        self.net.eval()

    def predict(self, context, model_input, params=None):
        frame = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        x = (frame[self.features].to_numpy(dtype="float64") - self.mean) / self.scale
        with torch.no_grad():
            logits = self.net(torch.as_tensor(x, dtype=torch.float32))
        return torch.sigmoid(logits).reshape(-1).to(torch.float64).numpy()


set_model(TabularMLPClassifier())
'''


class TorchCheckpoint:
    """What a pytorch checkpoint holds (network, optimizer, RNG states, epoch), saved like a booster."""

    def __init__(self, payload: dict):
        self.payload = payload

    def save_model(self, path: str) -> None:
        import torch

        torch.save(self.payload, path)


class TorchTabularClassifier:
    """A scikit-learn-like wrapper (fit, predict_proba, predict) around the MLP, for the trainer only."""

    def __init__(self, params: dict, device: str):
        self.params = params
        self.device = device
        self.features: list[str] = []
        self.net = None

    def _scaled(self, X):
        import numpy as np

        return (X[self.features].to_numpy(dtype=np.float64) - self.mean) / self.scale

    def fit(self, X, y, store: CheckpointStore | None = None, key: str = "", every: int = 0,
            stop_after: int = 0) -> dict:
        """Train (resuming from the store's latest checkpoint for ``key``); returns progress metrics."""
        import numpy as np
        import torch

        p, device = self.params, torch.device(self.device)
        self.features = list(X.columns)
        self.mean = X.to_numpy(dtype=np.float64).mean(axis=0)
        scale = X.to_numpy(dtype=np.float64).std(axis=0)
        self.scale = np.where(scale > 0, scale, 1.0)  # a constant column stays constant (0), not NaN
        torch.manual_seed(p["seed"])
        net = build_mlp(len(self.features), p["hidden_units"], p["layers"], p["dropout"]).to(device)
        optimizer = torch.optim.Adam(net.parameters(), lr=p["lr"], weight_decay=p["weight_decay"])
        shuffle = torch.Generator().manual_seed(p["seed"])
        x = torch.as_tensor(self._scaled(X), dtype=torch.float32, device=device)
        target = torch.as_tensor(y.to_numpy(), dtype=torch.float32, device=device).reshape(-1, 1)
        loss_fn = torch.nn.BCEWithLogitsLoss()
        total, done = p["epochs"], 0

        found = store.latest(key) if store is not None else None
        if found is not None and found[1] < total:
            state = torch.load(found[0], map_location="cpu", weights_only=True)
            net.load_state_dict(state["model"])
            optimizer.load_state_dict(state["optimizer"])
            shuffle.set_state(state["shuffle_rng"])
            torch.set_rng_state(state["cpu_rng"])
            if device.type == "cuda" and "cuda_rng" in state:
                torch.cuda.set_rng_state(state["cuda_rng"])
            done = found[1]
            print(f"resumed from checkpoint at epoch {done} of {total} ({store.location}): "
                  f"{total - done} epochs to go", flush=True)

        rows, batch, epoch_loss = len(x), p["batch_size"], float("nan")
        for epoch in range(done, total):
            net.train()
            order = torch.randperm(rows, generator=shuffle).to(device)
            summed = torch.zeros((), device=device)
            for start in range(0, rows, batch):
                index = order[start:start + batch]
                optimizer.zero_grad(set_to_none=True)
                loss = loss_fn(net(x[index]), target[index])
                loss.backward()
                optimizer.step()
                summed += loss.detach() * len(index)
            epoch_loss = float(summed) / rows
            epochs = epoch + 1
            if store is not None and epochs % every == 0 and epochs < total:
                started = time.perf_counter()
                payload = {"epoch": epochs, "model": net.state_dict(), "optimizer": optimizer.state_dict(),
                           "shuffle_rng": shuffle.get_state(), "cpu_rng": torch.get_rng_state()}
                if device.type == "cuda":
                    payload["cuda_rng"] = torch.cuda.get_rng_state()
                store.save(TorchCheckpoint(payload), epochs, key, suffix="pt")
                print(f"checkpoint saved at epoch {epochs}/{total} to {store.location} "
                      f"in {time.perf_counter() - started:.2f}s", flush=True)
                if stop_after and epochs >= stop_after:
                    print(f"MLPLATFORM_TEST_STOP_AFTER_ROUNDS={stop_after}: killing the trainer", flush=True)
                    os.kill(os.getpid(), signal.SIGKILL)
        self.net = net.to("cpu").eval()  # evaluate and log on the CPU whatever it trained on
        return {"resumed_from_epoch": done, "epochs": total, "train_loss": epoch_loss}

    def predict_proba(self, X):
        import numpy as np
        import torch

        with torch.no_grad():
            logits = self.net(torch.as_tensor(self._scaled(X), dtype=torch.float32))
        p1 = torch.sigmoid(logits).reshape(-1).to(torch.float64).numpy()
        return np.column_stack([1.0 - p1, p1])

    def predict(self, X):
        return (self.predict_proba(X)[:, 1] >= 0.5).astype("int64")

    def export_state(self) -> dict:
        """What the logged pyfunc model loads (see PYFUNC_MODEL_SOURCE)."""
        import torch

        p = self.params
        return {"features": self.features, "mean": torch.as_tensor(self.mean), "scale": torch.as_tensor(self.scale),
                "architecture": {"hidden_units": p["hidden_units"], "layers": p["layers"], "dropout": p["dropout"]},
                "model": self.net.state_dict()}


def fit_torch(cfg: dict, estimator: TorchTabularClassifier, X, y) -> dict:
    store = open_checkpoints(cfg)
    return estimator.fit(X, y, store=store, key=checkpoint_key(cfg) if store else "",
                         every=cfg["checkpoint_every"], stop_after=cfg["test_stop_after_rounds"])


def log_torch_model(cfg: dict, estimator: TorchTabularClassifier, sample, pip_requirements: list[str]):
    """Log as a models-from-code pyfunc: the code file (PYFUNC_MODEL_SOURCE) plus the state artifact."""
    import inspect

    import mlflow
    import torch
    from mlflow.models import infer_signature

    folder = Path(tempfile.mkdtemp(prefix="torch-model-", dir=cfg["scratch"]))
    state = folder / "state.pt"
    torch.save(estimator.export_state(), state)
    code = folder / "mlplatform_tabular_mlp.py"
    code.write_text(PYFUNC_MODEL_SOURCE.replace("{build_mlp}", inspect.getsource(build_mlp)))
    return mlflow.pyfunc.log_model(
        name="model", python_model=str(code), artifacts={"state": str(state)},
        signature=infer_signature(sample, estimator.predict_proba(sample)[:, 1]), input_example=sample,
        pip_requirements=pip_requirements,
    )


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
    """``name==version`` of each installed distribution (skips ones not installed). A local version label
    is dropped (torch ``2.13.0+cpu`` pins ``torch==2.13.0``, which the CPU and CUDA wheels both satisfy)."""
    pins = []
    for dist in dists:
        try:
            pins.append(f"{dist}=={metadata.version(dist).split('+')[0]}")
        except metadata.PackageNotFoundError:
            pass
    return pins


def log_model(cfg: dict, estimator, X):
    """Log with the native flavor (so evaluation can call predict_proba); returns (model info, seconds)."""
    import mlflow
    from mlflow.models import infer_signature

    sample = X.head(5)
    started = time.perf_counter()
    if cfg["framework"] == "pytorch":
        info = log_torch_model(cfg, estimator, sample, pinned("mlflow", "torch", "pandas", "numpy"))
        return info, time.perf_counter() - started
    common = {
        "name": "model",
        "signature": infer_signature(sample, estimator.predict(sample)),
        "input_example": sample,
    }
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
    if cfg["framework"] == "xgboost":
        progress = fit_xgboost(cfg, estimator, X, y)
    elif cfg["framework"] == "pytorch":
        progress = fit_torch(cfg, estimator, X, y)
    else:
        estimator.fit(X, y)
        progress = {}
    fit_seconds = time.perf_counter() - started
    metrics = holdout_metrics(estimator, X_holdout, y_holdout)
    print(f"trained {cfg['framework']} on {len(X)} rows ({device}) in {fit_seconds:.2f}s: {metrics}", flush=True)

    import mlflow

    mlflow.set_tracking_uri(cfg["tracking_uri"])
    exp_id = experiment_id(cfg)
    tags = {**cfg["tags"], "mlplatform.data_fingerprint": cfg["fingerprint"], "mlplatform.framework": cfg["framework"]}
    with mlflow.start_run(experiment_id=exp_id, run_name=cfg["run_name"], tags=tags) as run:
        model = {"sklearn": cfg["model"], "xgboost": "xgb_classifier", "pytorch": "tabular_mlp"}[cfg["framework"]]
        # pytorch: every hyperparameter with its default filled in (the MLP's defaults are ours, not a library's)
        hyperparameters = estimator.params if cfg["framework"] == "pytorch" else cfg["hyperparameters"]
        mlflow.log_params({**hyperparameters, "framework": cfg["framework"], "device": device, "model": model,
                           "n_features": len(cfg["features"]), "data_fingerprint": cfg["fingerprint"]})
        mlflow.log_metrics({**metrics, "train_rows": len(X), "holdout_rows": len(X_holdout),
                            "fit_seconds": fit_seconds, **progress})
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
    except MemoryError:
        limit = os.environ.get("MLPLATFORM_MEMORY_LIMIT_BYTES", "")
        print(f"trainer: out of memory (limit {limit or 'unset'} bytes: spec.training.resources.memory)",
              file=sys.stderr, flush=True)
        return OOM_EXIT_CODE
    cfg["result_path"].parent.mkdir(parents=True, exist_ok=True)
    cfg["result_path"].write_text(json.dumps(result))
    print(f"result written to {cfg['result_path']}", flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
