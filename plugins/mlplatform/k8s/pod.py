"""The trainer pod as a plain v1 Pod manifest dict, held to the Pod Security Standards "restricted" profile.

Imports only the standard library and ``mlplatform.spec``: safe at DAG-parse time. Platform knobs that
are not in ``PlatformConfig`` are module defaults overridable by environment variables read here.
"""

from __future__ import annotations

import copy
import hashlib
import json
import os
import re
from typing import TYPE_CHECKING, Any

from mlplatform.spec.model import Resources, duration_seconds
from mlplatform.spec.secrets import find_secrets

if TYPE_CHECKING:
    from mlplatform.stages.context import RunContext

BASE_CONTAINER = "base"  # the KubernetesPodOperator's main container name
TRAINER_COMMAND = ["python", "/opt/trainer/train.py"]
RUN_AS_USER = 10001  # the trainer image's USER
SCRATCH_DIR = "/scratch"
PRIORITY_CLASS = "mlplatform-priority"
GPU_RESOURCE = "nvidia.com/gpu"
TERMINATION_MESSAGE_POLICY = "FallbackToLogsOnError"
# 63 (a DNS label) minus the "-xxxxxxxx" random suffix the KubernetesPodOperator appends to the name.
NAME_MAX = 54
DEFAULT_GPU_NODE_SELECTOR = {"nvidia.com/gpu.present": "true"}  # set by NVIDIA GPU feature discovery
DEFAULT_GPU_TOLERATIONS = [{"key": GPU_RESOURCE, "operator": "Exists", "effect": "NoSchedule"}]
DEFAULT_CREDENTIALS_SECRET = "mlplatform-{tenant}-s3"
# Env vars filled from keys of the same name in the tenant's credentials Secret, never from literals.
SECRET_ENV = ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY")


def run_hash(dag_id: str, run_id: str) -> str:
    """Short stable hash of one DAG run (label value and pod-name suffix)."""
    return hashlib.sha256(f"{dag_id}\n{run_id}".encode()).hexdigest()[:10]


def pod_name(dag_id: str, run_id: str) -> str:
    """DNS-1123 name ``<dag>-train-<hash>`` of at most ``NAME_MAX`` characters."""
    suffix = f"-train-{run_hash(dag_id, run_id)}"
    slug = re.sub(r"[^a-z0-9]+", "-", dag_id.lower()).strip("-")
    return slug[: NAME_MAX - len(suffix)].rstrip("-") + suffix


def _json_env(name: str, default: Any, kind: type) -> Any:
    raw = os.environ.get(name, "").strip()
    if not raw:
        return copy.deepcopy(default)
    try:
        value = json.loads(raw)
    except json.JSONDecodeError as exc:
        raise ValueError(f"{name} is not valid JSON: {exc}") from None
    if not isinstance(value, kind):
        raise ValueError(f"{name} must be a JSON {'object' if kind is dict else 'array'}")
    return value


def gpu_node_selector() -> dict[str, str]:
    """Node labels GPU pods require (``MLPLATFORM_GPU_NODE_SELECTOR``, a JSON object)."""
    return _json_env("MLPLATFORM_GPU_NODE_SELECTOR", DEFAULT_GPU_NODE_SELECTOR, dict)


def gpu_tolerations() -> list[dict[str, Any]]:
    """Taints GPU pods tolerate (``MLPLATFORM_GPU_TOLERATIONS``, a JSON array of tolerations)."""
    return _json_env("MLPLATFORM_GPU_TOLERATIONS", DEFAULT_GPU_TOLERATIONS, list)


def credentials_secret(tenant: str) -> str:
    """The tenant's object-store credentials Secret (``MLPLATFORM_TRAINER_SECRET``, ``{tenant}`` expands)."""
    template = os.environ.get("MLPLATFORM_TRAINER_SECRET", "").strip() or DEFAULT_CREDENTIALS_SECRET
    return template.replace("{tenant}", tenant)


def container_security_context() -> dict[str, Any]:
    """Container half of the restricted profile (the pod half is in ``render_train_pod``)."""
    return {
        "allowPrivilegeEscalation": False,
        "capabilities": {"drop": ["ALL"]},
        "readOnlyRootFilesystem": True,
        "runAsNonRoot": True,
    }


def _resources(res: Resources, memory: str | None = None) -> dict[str, dict[str, str]]:
    """Requests equal limits (Guaranteed QoS); GPUs, an extended resource, must appear in both.

    ``memory`` overrides the spec's memory (an OOM retry's escalated value, see ``mlplatform.k8s.retry``).
    """
    amounts = {"cpu": str(res.cpu), "memory": memory or res.memory}
    if res.gpu > 0:
        amounts[GPU_RESOURCE] = str(res.gpu)
    return {"requests": amounts, "limits": dict(amounts)}


def _env(env: dict[str, str], tenant: str) -> list[dict[str, Any]]:
    """Literal values from ``env`` plus the scratch dirs, then Secret references for credentials."""
    clashes = sorted(set(env) & set(SECRET_ENV))
    found = find_secrets(dict(env))
    if clashes or found:
        names = clashes + [str(path[0]) for path, _ in found]
        raise ValueError(f"literal secrets in the trainer env: {', '.join(names)}; use Secret references")
    literal = {**env, "MLPLATFORM_SCRATCH_DIR": SCRATCH_DIR, "TMPDIR": SCRATCH_DIR, "HOME": SCRATCH_DIR}
    out: list[dict[str, Any]] = [{"name": k, "value": literal_env_value(v)} for k, v in sorted(literal.items())]
    secret = credentials_secret(tenant)
    out += [{"name": k, "valueFrom": {"secretKeyRef": {"name": secret, "key": k}}} for k in SECRET_ENV]
    return out


def literal_env_value(value: Any) -> str:
    """A container env value that reaches the trainer as written: the kubelet expands ``$(NAME)`` in env values
    (Kubernetes dependent environment variables), and these values carry tenant text (label, column names,
    hyperparameters), so ``$(`` is escaped as ``$$(``."""
    return str(value).replace("$(", "$$(")


def render_train_pod(ctx: RunContext, env: dict[str, str], memory: str | None = None) -> dict[str, Any]:
    """The full v1 Pod manifest that runs the trainer for one DAG run (``memory``: an OOM retry's value)."""
    spec, tenant = ctx.spec, ctx.tenant
    training = spec.spec.training
    name = pod_name(ctx.dag_id, ctx.run_id)
    container = {
        "name": BASE_CONTAINER,
        "image": ctx.config.trainer_image,
        "command": list(TRAINER_COMMAND),
        "env": _env(env, tenant.name),
        "resources": _resources(training.resources, memory),
        "securityContext": container_security_context(),
        # A trainer that dies without writing /dev/termination-log gets its last log lines copied into the
        # pod status by the kubelet: the failure classifier reads them even when the logs are gone.
        "terminationMessagePolicy": TERMINATION_MESSAGE_POLICY,
        "volumeMounts": [{"name": "scratch", "mountPath": SCRATCH_DIR}],
    }
    pod_spec: dict[str, Any] = {
        "serviceAccountName": tenant.spec.service_account,
        "automountServiceAccountToken": False,  # the trainer never calls the Kubernetes API
        "restartPolicy": "Never",
        "activeDeadlineSeconds": duration_seconds(training.timeout),
        "securityContext": {
            "runAsNonRoot": True,
            "runAsUser": RUN_AS_USER,
            "runAsGroup": RUN_AS_USER,
            "fsGroup": RUN_AS_USER,
            "seccompProfile": {"type": "RuntimeDefault"},
        },
        "containers": [container],
        "volumes": [{"name": "scratch", "emptyDir": {}}],
    }
    if tenant.spec.tier == "priority":
        pod_spec["priorityClassName"] = PRIORITY_CLASS
    if training.resources.gpu > 0:
        pod_spec["nodeSelector"] = gpu_node_selector()
        pod_spec["tolerations"] = gpu_tolerations()
    return {
        "apiVersion": "v1",
        "kind": "Pod",
        "metadata": {
            "name": name,
            "namespace": tenant.spec.namespace,
            "labels": {
                "app.kubernetes.io/name": "mlplatform-trainer",
                "app.kubernetes.io/instance": name,
                "app.kubernetes.io/component": "train",
                "app.kubernetes.io/part-of": "mlplatform",
                "app.kubernetes.io/managed-by": "airflow",
                "mlplatform.io/tenant": tenant.name,
                "mlplatform.io/pipeline": spec.metadata.name,
                "mlplatform.io/dag-run": run_hash(ctx.dag_id, ctx.run_id),
            },
            "annotations": {
                "mlplatform.io/dag-id": ctx.dag_id,
                "mlplatform.io/run-id": ctx.run_id,
                "mlplatform.io/spec-sha256": ctx.spec_sha256,
            },
        },
        "spec": pod_spec,
    }
