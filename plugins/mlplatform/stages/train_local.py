"""Train stage, local process backend: run include/trainer/train.py as a subprocess.

``train_env`` is the environment contract the trainer reads; the Kubernetes pod backend uses it too.
"""

from __future__ import annotations

import json
import logging
import os
import subprocess
import sys
from collections import deque
from pathlib import Path

from mlplatform.config import REPO_ROOT
from mlplatform.sandbox import child_environ
from mlplatform.stages.context import RunContext, StageFailed
from mlplatform.stages.limits import TrainerLimits

TRAINER = REPO_ROOT / "include" / "trainer" / "train.py"
TAIL_LINES = 30
log = logging.getLogger("mlplatform.train")


def run_tags(ctx: RunContext) -> dict[str, str]:
    """Tags of the MLflow run: who and what produced it."""
    return {
        "mlplatform.tenant": ctx.spec.metadata.tenant,
        "mlplatform.pipeline": ctx.spec.metadata.name,
        "mlplatform.dag_id": ctx.dag_id,
        "mlplatform.dag_run_id": ctx.run_id,
        "mlplatform.spec_sha256": ctx.spec_sha256,
        "mlplatform.git_commit": ctx.config.git_commit or "unknown",
    }


def train_env(ctx: RunContext, features: dict, result_path: Path, scratch: Path) -> dict[str, str]:
    """The trainer's environment variables for this run and the features stage's result."""
    training = ctx.spec.spec.training
    env = {
        "MLFLOW_TRACKING_URI": ctx.config.tracking_uri,
        "MLPLATFORM_TRAIN_DATA": str(features["train_path"]),
        "MLPLATFORM_HOLDOUT_DATA": str(features["holdout_path"]),
        "MLPLATFORM_LABEL": ctx.spec.spec.data.label,
        "MLPLATFORM_FEATURES": ",".join(features["feature_columns"]),
        "MLPLATFORM_FRAMEWORK": training.framework,
        "MLPLATFORM_MODEL": training.model,
        "MLPLATFORM_HYPERPARAMETERS": json.dumps(ctx.hyperparameters(), sort_keys=True),
        "MLPLATFORM_EXPERIMENT": ctx.experiment_name,
        "MLPLATFORM_RUN_NAME": f"{ctx.dag_id}.{ctx.run_key}",
        "MLPLATFORM_RUN_TAGS": json.dumps(run_tags(ctx), sort_keys=True),
        "MLPLATFORM_DATA_FINGERPRINT": str(features["fingerprint"]),
        "MLPLATFORM_RESULT_PATH": str(result_path),
        "MLPLATFORM_SCRATCH_DIR": str(scratch),
        "MLFLOW_DISABLE_TELEMETRY": "true",
        "DO_NOT_TRACK": "true",
    }
    env["MLPLATFORM_CHECKPOINT_DIR"] = checkpoint_location(ctx)
    env.update(object_store_env())
    env.update(TrainerLimits.of(training.resources).env())  # threads = cpu request, GPU only when gpu > 0
    if ctx.config.tracking_uri.startswith(("sqlite:", "file:")):
        # A database-only tracking store would put new experiments' artifacts under the trainer's cwd.
        env["MLPLATFORM_ARTIFACT_LOCATION"] = str(ctx.config.home / "mlartifacts")
    return env


def object_store_env() -> dict[str, str]:
    """Endpoint of an S3-compatible object store (MinIO, Ceph...) for MLflow and boto3 in the trainer.

    From the platform's ``MLPLATFORM_S3_ENDPOINT_URL``; not a secret (credentials reach the pod only as
    Secret references, see ``mlplatform.k8s.pod``). Empty when unset: AWS S3 itself needs no endpoint.
    """
    endpoint = os.environ.get("MLPLATFORM_S3_ENDPOINT_URL", "").strip()
    return {"MLFLOW_S3_ENDPOINT_URL": endpoint, "AWS_ENDPOINT_URL": endpoint} if endpoint else {}


def checkpoint_location(ctx: RunContext) -> str:
    """Where the trainer keeps its checkpoints for this DAG run: retries of the run resume from there.

    Under the artifact root: an s3:// prefix in production (the pod's scratch dir dies with the pod), a
    local folder for the local backend.
    """
    root = ctx.config.artifact_root.rstrip("/")
    parts = (ctx.spec.metadata.tenant, ctx.spec.metadata.name, ctx.run_key, "train", "checkpoints")
    if "://" in root:
        return "/".join((root, *parts))
    return str(Path(root, *parts))


def run_local_trainer(ctx: RunContext, features: dict) -> dict:
    """Run the trainer with ``train_env``, stream its output to the log, return its result JSON."""
    workdir = ctx.artifact_dir / "train"
    scratch = workdir / "scratch"
    scratch.mkdir(parents=True, exist_ok=True)
    result_path = workdir / "result.json"
    result_path.unlink(missing_ok=True)
    # Never the task's own environment: the platform's secrets stay out of the trainer (mlplatform.sandbox).
    env = {**child_environ(ctx.tenant.name), **train_env(ctx, features, result_path, scratch)}
    limits = TrainerLimits.of(ctx.spec.spec.training.resources)  # memory and CPU of the process (stages/limits.py)
    code, tail = _stream(limits.command([sys.executable, str(TRAINER)]), env, cwd=workdir, watch=limits.watch)
    if code != 0:
        reason = limits.explain(code, tail)
        if reason:
            raise StageFailed(reason + "; last lines:\n" + "\n".join(tail))
        raise StageFailed(f"trainer exited with code {code}; last lines:\n" + "\n".join(tail))
    if not result_path.is_file():
        raise StageFailed(f"trainer exited 0 but wrote no result to {result_path}")
    return json.loads(result_path.read_text())


def _stream(cmd: list[str], env: dict[str, str], cwd: Path, watch=None) -> tuple[int, list[str]]:
    """Run ``cmd``, logging each output line; (exit code, last lines). Kills it if we are interrupted."""
    tail: deque[str] = deque(maxlen=TAIL_LINES)
    with subprocess.Popen(cmd, env=env, cwd=cwd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT,
                          text=True, bufsize=1) as proc:
        halt = watch(proc) if watch else None  # e.g. the memory watchdog of TrainerLimits
        try:
            for line in proc.stdout or ():
                tail.append(line.rstrip())
                log.info("%s", tail[-1])
            return proc.wait(), list(tail)
        finally:
            if halt:
                halt()
            if proc.poll() is None:
                proc.kill()
