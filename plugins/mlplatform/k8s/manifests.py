"""Per-tenant Kubernetes manifests, generated from the tenant file: namespace, quota, limits and RBAC.

Plain dicts (``to_yaml`` for ``kubectl apply -f -``); imports only the standard library, PyYAML and
``mlplatform.spec``.
"""

from __future__ import annotations

import math
import os
from typing import Any

import yaml

from mlplatform.k8s.pod import GPU_RESOURCE
from mlplatform.spec.model import TenantFile, cpu_cores, memory_bytes

# Oldest Kubernetes minor the platform supports: the Pod Security policy version and the tests' schema.
KUBERNETES_VERSION = "1.33"
LAUNCHER = "mlplatform-pod-launcher"
# Defaults for containers that set no limit / no request. The trainer sets both; the one container here
# that sets no limit is the KubernetesPodOperator's XCom sidecar (a `sleep` loop), so they are sized for it.
DEFAULT_LIMIT = {"cpu": 0.1, "memory": 64 * 2**20}
DEFAULT_REQUEST = {"cpu": 0.01, "memory": 16 * 2**20}


def _cpu(cores: float) -> str:
    return f"{math.ceil(cores * 1000)}m"


def _memory(size: float) -> str:
    return f"{math.ceil(size / 2**20)}Mi"


def _meta(tenant: TenantFile, name: str, namespaced: bool = True) -> dict[str, Any]:
    meta: dict[str, Any] = {"name": name, "namespace": tenant.spec.namespace} if namespaced else {"name": name}
    meta["labels"] = {"app.kubernetes.io/part-of": "mlplatform", "app.kubernetes.io/managed-by": "mlplatform",
                      "mlplatform.io/tenant": tenant.name}
    return meta


def namespace(tenant: TenantFile) -> dict[str, Any]:
    """The tenant namespace, enforcing the Pod Security Standards "restricted" profile."""
    meta = _meta(tenant, tenant.spec.namespace, namespaced=False)
    meta["labels"].update({
        "pod-security.kubernetes.io/enforce": "restricted",
        "pod-security.kubernetes.io/enforce-version": f"v{KUBERNETES_VERSION}",
        "pod-security.kubernetes.io/warn": "restricted",
        "pod-security.kubernetes.io/warn-version": "latest",
        "pod-security.kubernetes.io/audit": "restricted",
        "pod-security.kubernetes.io/audit-version": "latest",
    })
    return {"apiVersion": "v1", "kind": "Namespace", "metadata": meta}


def resource_quota(tenant: TenantFile) -> dict[str, Any]:
    """A backstop behind the Airflow pools, sized so that it never refuses what the pools allow.

    ``pods = cpu_slots + gpu_slots`` (a trainer holds a slot of the tenant's CPU pool, or at least one of
    its GPU pool); each pod may use up to ``max_cpu_per_task`` and ``max_memory_per_task`` plus the XCom
    sidecar's limits (``DEFAULT_LIMIT``), so ``requests.cpu = limits.cpu = pods x (max_cpu_per_task +
    DEFAULT_LIMIT cpu)``, likewise for memory, and ``requests.nvidia.com/gpu = gpu_slots``.
    """
    q = tenant.spec.quotas
    pods = q.cpu_slots + q.gpu_slots
    cpu = _cpu(pods * (cpu_cores(q.max_cpu_per_task) + DEFAULT_LIMIT["cpu"]))
    memory = _memory(pods * (memory_bytes(q.max_memory_per_task) + DEFAULT_LIMIT["memory"]))
    hard = {
        "pods": str(pods),
        "requests.cpu": cpu,
        "limits.cpu": cpu,
        "requests.memory": memory,
        "limits.memory": memory,
        f"requests.{GPU_RESOURCE}": str(q.gpu_slots),
    }
    return {"apiVersion": "v1", "kind": "ResourceQuota", "metadata": _meta(tenant, "mlplatform-quota"),
            "spec": {"hard": hard}}


def limit_range(tenant: TenantFile) -> dict[str, Any]:
    """Per-container maximum = the tenant's per-task maximum; defaults so the quota admits the sidecar."""
    q = tenant.spec.quotas
    top = {"cpu": cpu_cores(q.max_cpu_per_task), "memory": memory_bytes(q.max_memory_per_task)}
    limit = {k: min(DEFAULT_LIMIT[k], top[k]) for k in top}
    request = {k: min(DEFAULT_REQUEST[k], limit[k]) for k in top}
    item = {
        "type": "Container",
        "max": {"cpu": _cpu(top["cpu"]), "memory": _memory(top["memory"])},
        "default": {"cpu": _cpu(limit["cpu"]), "memory": _memory(limit["memory"])},
        "defaultRequest": {"cpu": _cpu(request["cpu"]), "memory": _memory(request["memory"])},
    }
    return {"apiVersion": "v1", "kind": "LimitRange", "metadata": _meta(tenant, "mlplatform-limits"),
            "spec": {"limits": [item]}}


def service_account(tenant: TenantFile) -> dict[str, Any]:
    """The identity trainer pods run as; it gets no API token and no permissions."""
    return {"apiVersion": "v1", "kind": "ServiceAccount", "metadata": _meta(tenant, tenant.spec.service_account),
            "automountServiceAccountToken": False}


def launcher_role(tenant: TenantFile) -> dict[str, Any]:
    """Exactly what the KubernetesPodOperator (provider 10.25, sync mode) does in the namespace.

    pods: create; get (poll); list (find the pod on retry/reattach); patch (the ``already_checked`` label
    on pods it keeps); delete. pods/log: get (stream logs). pods/exec: ``get`` and ``create``: the XCom is
    read by exec'ing ``cat`` in the sidecar over a websocket, an HTTP GET, which Kubernetes 1.35+ also
    authorizes as ``create``. events: list (logged when a pod fails).
    """
    rules = [
        {"apiGroups": [""], "resources": ["pods"], "verbs": ["create", "get", "list", "patch", "delete"]},
        {"apiGroups": [""], "resources": ["pods/log"], "verbs": ["get"]},
        {"apiGroups": [""], "resources": ["pods/exec"], "verbs": ["create", "get"]},
        {"apiGroups": [""], "resources": ["events"], "verbs": ["list"]},
    ]
    return {"apiVersion": "rbac.authorization.k8s.io/v1", "kind": "Role", "metadata": _meta(tenant, LAUNCHER),
            "rules": rules}


def airflow_identity() -> tuple[str, list[str]]:
    """(namespace, service accounts) of the Airflow components that launch and watch pods.

    Workers create the pod; with deferrable training the triggerer reads and deletes it. From
    ``MLPLATFORM_AIRFLOW_NAMESPACE`` / ``MLPLATFORM_AIRFLOW_SERVICE_ACCOUNTS`` (comma-separated); defaults
    match the official Helm chart installed as release "airflow" in namespace "airflow".
    """
    ns = os.environ.get("MLPLATFORM_AIRFLOW_NAMESPACE", "").strip() or "airflow"
    raw = os.environ.get("MLPLATFORM_AIRFLOW_SERVICE_ACCOUNTS", "").strip() or "airflow-worker,airflow-triggerer"
    return ns, [sa.strip() for sa in raw.split(",") if sa.strip()]


def launcher_binding(tenant: TenantFile) -> dict[str, Any]:
    """Grants the launcher Role to the Airflow workers' and triggerer's service accounts."""
    ns, accounts = airflow_identity()
    return {
        "apiVersion": "rbac.authorization.k8s.io/v1",
        "kind": "RoleBinding",
        "metadata": _meta(tenant, LAUNCHER),
        "subjects": [{"kind": "ServiceAccount", "name": sa, "namespace": ns} for sa in accounts],
        "roleRef": {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": LAUNCHER},
    }


def tenant_manifests(tenant: TenantFile) -> list[dict[str, Any]]:
    """Everything the tenant's namespace needs, in apply order."""
    builders = (namespace, resource_quota, limit_range, service_account, launcher_role, launcher_binding)
    return [build(tenant) for build in builders]


def to_yaml(docs: list[dict[str, Any]]) -> str:
    """Multi-document YAML, keys in the order built."""
    return yaml.safe_dump_all(docs, sort_keys=False, explicit_start=True, default_flow_style=False)
