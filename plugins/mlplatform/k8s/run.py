"""Run the trainer pod with the cncf.kubernetes provider's KubernetesPodOperator.

The only module of the platform that imports the provider or the kubernetes client, always inside a
function: the train task pays for it, DAG parsing never does.
"""

from __future__ import annotations

import copy
import os
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlplatform.k8s.pod import BASE_CONTAINER, SCRATCH_DIR, render_train_pod

if TYPE_CHECKING:
    from mlplatform.stages.context import RunContext

RESULT_PATH = Path("/airflow/xcom/return.json")  # the provider's XCom volume, read back through its sidecar
# Waiting for a GPU node to scale up and pull the CUDA image takes minutes, not the default 120 s.
STARTUP_TIMEOUT_SECONDS = 900


def to_v1_pod(manifest: dict[str, Any]) -> Any:
    """A ``kubernetes.client.V1Pod`` from the manifest dict (the provider's own ApiClient deserializer)."""
    from airflow.providers.cncf.kubernetes.pod_generator import PodGenerator

    return PodGenerator.deserialize_model_dict(manifest)


def build_operator(manifest: dict[str, Any], task_id: str) -> Any:
    """A KubernetesPodOperator that creates exactly ``manifest`` plus the provider's XCom sidecar."""
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator

    pod = to_v1_pod(manifest)
    return KubernetesPodOperator(
        task_id=task_id,
        full_pod_spec=pod,
        namespace=pod.metadata.namespace,
        kubernetes_conn_id=os.environ.get("MLPLATFORM_KUBERNETES_CONN_ID", "").strip() or "kubernetes_default",
        base_container_name=BASE_CONTAINER,
        do_xcom_push=True,
        get_logs=True,
        log_events_on_failure=True,
        on_finish_action="delete_succeeded_pod",
        startup_timeout_seconds=STARTUP_TIMEOUT_SECONDS,
        # The sidecar must pass the namespace's "restricted" Pod Security too; it sets requests only and
        # gets its limits from the namespace LimitRange's defaults (see mlplatform.k8s.manifests).
        xcom_sidecar_container_security_context=copy.deepcopy(pod.spec.containers[0].security_context),
    )


def check_remote(env: dict[str, str]) -> None:
    """A pod cannot see the worker's disk: tracking store and data must be remote URIs."""
    from mlplatform.stages.context import StageFailed

    keys = ("MLFLOW_TRACKING_URI", "MLPLATFORM_TRAIN_DATA", "MLPLATFORM_HOLDOUT_DATA")
    local = [f"{k}={env[k]}" for k in keys if "://" not in env[k] or env[k].startswith(("file:", "sqlite:"))]
    if local:
        raise StageFailed(
            f"the kubernetes train backend needs remote locations, but {', '.join(local)} is local to the "
            "Airflow worker: point MLFLOW_TRACKING_URI at the MLflow server and MLPLATFORM_ARTIFACT_ROOT at s3://"
        )


def run_pod_trainer(ctx: RunContext, features: dict[str, Any], context: Any) -> dict[str, Any]:
    """Train in a pod of the tenant's namespace; returns the trainer's result (its XCom)."""
    from mlplatform.stages.train_local import train_env

    env = train_env(ctx, features, RESULT_PATH, Path(SCRATCH_DIR))
    check_remote(env)
    operator = build_operator(render_train_pod(ctx, env), task_id=context["ti"].task_id)
    result = operator.execute(context)
    if not isinstance(result, dict):
        raise RuntimeError(f"the trainer pod wrote no result to {RESULT_PATH}")
    return result
