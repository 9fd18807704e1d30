"""The trainer pod and tenant manifests: schema-valid for pinned Kubernetes versions, restricted, no secrets."""

from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path
from types import SimpleNamespace

import kubernetes_validate
import pytest
import yaml

from mlplatform.config import load_config
from mlplatform.k8s import manifests
from mlplatform.k8s.pod import (
    BASE_CONTAINER,
    DEFAULT_GPU_TOLERATIONS,
    GPU_RESOURCE,
    NAME_MAX,
    PRIORITY_CLASS,
    SCRATCH_DIR,
    SECRET_ENV,
    credentials_secret,
    pod_name,
    render_train_pod,
)
from mlplatform.spec.loader import load_catalog
from mlplatform.spec.model import cpu_cores, memory_bytes
from mlplatform.spec.secrets import find_secrets
from mlplatform.stages.context import RunContext, StageFailed
from mlplatform.stages.train_local import train_env

RESULT_PATH = Path("/airflow/xcom/return.json")  # also asserted against run.RESULT_PATH below

# The platform's floor (also its Pod Security policy version) and the newest schema kubernetes-validate ships.
VERSIONS = (manifests.KUBERNETES_VERSION, "1.37")
RUN_ID = "scheduled__2026-11-23T03:00:00+00:00"
DNS1123_LABEL = re.compile(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$")

CONFIG = dataclasses.replace(load_config(), tracking_uri="http://mlflow.mlplatform.svc:5000")
CATALOG = load_catalog(CONFIG)
SPECS = {loaded.dag_id: loaded for loaded in CATALOG.specs}
TENANTS = sorted(CATALOG.tenants)
GPU_SPECS = sorted(d for d, loaded in SPECS.items() if loaded.spec.spec.training.resources.gpu > 0)
CPU_SPECS = sorted(set(SPECS) - set(GPU_SPECS))


def features_for(dag_id: str) -> dict:
    """A features-stage result whose data sits in object storage, as the pod backend needs."""
    prefix = f"s3://mlplatform-artifacts/{dag_id}/{RUN_ID}"
    return {"train_path": f"{prefix}/train.parquet", "holdout_path": f"{prefix}/holdout.parquet",
            "feature_columns": ["tenure_months", "monthly_charges"], "fingerprint": "0" * 64}


def pod_env(ctx: RunContext) -> dict[str, str]:
    """The trainer env exactly as run.py builds it."""
    return train_env(ctx, features_for(ctx.dag_id), RESULT_PATH, Path(SCRATCH_DIR))


def context_for(dag_id: str) -> RunContext:
    loaded = SPECS[dag_id]
    tenant = CATALOG.tenants[loaded.spec.metadata.tenant]
    return RunContext(spec=loaded.spec, tenant=tenant, config=CONFIG, run_id=RUN_ID, spec_sha256=loaded.sha256)


def render(dag_id: str) -> dict:
    ctx = context_for(dag_id)
    return render_train_pod(ctx, pod_env(ctx))


def gpus(dag_id: str) -> int:
    return SPECS[dag_id].spec.spec.training.resources.gpu


def test_catalog_has_gpu_and_cpu_examples():
    assert GPU_SPECS and CPU_SPECS


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("dag_id", sorted(SPECS))
def test_pod_is_schema_valid(dag_id, version):
    kubernetes_validate.validate(render(dag_id), version, strict=True)


@pytest.mark.parametrize("dag_id", sorted(SPECS))
def test_pod_identity_and_runtime(dag_id):
    pod, ctx = render(dag_id), context_for(dag_id)
    meta, spec = pod["metadata"], pod["spec"]
    assert DNS1123_LABEL.match(meta["name"]) and len(meta["name"]) <= NAME_MAX
    assert meta["namespace"] == ctx.tenant.spec.namespace
    assert meta["labels"]["mlplatform.io/tenant"] == ctx.tenant.name
    assert meta["labels"]["mlplatform.io/pipeline"] == ctx.spec.metadata.name
    assert all(len(v) <= 63 for v in meta["labels"].values())
    assert spec["serviceAccountName"] == ctx.tenant.spec.service_account
    assert spec["restartPolicy"] == "Never"
    assert spec["activeDeadlineSeconds"] == 2 * 3600
    (container,) = spec["containers"]
    assert container["name"] == BASE_CONTAINER
    assert container["image"] == CONFIG.trainer_image
    assert container["command"] == ["python", "/opt/trainer/train.py"]
    assert spec["volumes"] == [{"name": "scratch", "emptyDir": {}}]
    assert container["volumeMounts"] == [{"name": "scratch", "mountPath": "/scratch"}]
    env = {e["name"]: e.get("value") for e in container["env"]}
    assert env["MLPLATFORM_SCRATCH_DIR"] == env["TMPDIR"] == "/scratch"
    assert env["MLPLATFORM_FRAMEWORK"] == ctx.spec.spec.training.framework
    res = ctx.spec.spec.training.resources
    assert container["resources"]["requests"]["memory"] == container["resources"]["limits"]["memory"] == res.memory


@pytest.mark.parametrize("dag_id", sorted(SPECS))
def test_pod_is_restricted(dag_id):
    spec = render(dag_id)["spec"]
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == 10001
    assert spec["securityContext"]["fsGroup"] == 10001
    assert spec["securityContext"]["seccompProfile"] == {"type": "RuntimeDefault"}
    assert spec["automountServiceAccountToken"] is False
    sc = spec["containers"][0]["securityContext"]
    assert sc["allowPrivilegeEscalation"] is False
    assert sc["capabilities"] == {"drop": ["ALL"]}
    assert sc["readOnlyRootFilesystem"] is True
    assert not {"hostNetwork", "hostPID", "hostIPC"} & set(spec)


@pytest.mark.parametrize("dag_id", sorted(SPECS))
def test_pod_env_has_no_literal_secrets(dag_id):
    env = render(dag_id)["spec"]["containers"][0]["env"]
    literal = {e["name"]: e["value"] for e in env if "value" in e}
    assert find_secrets(literal) == []
    refs = {e["name"]: e["valueFrom"]["secretKeyRef"] for e in env if "valueFrom" in e}
    assert set(refs) == set(SECRET_ENV)
    tenant = SPECS[dag_id].spec.metadata.tenant
    assert all(ref["name"] == credentials_secret(tenant) for ref in refs.values())
    assert all(set(e) in ({"name", "value"}, {"name", "valueFrom"}) for e in env)


@pytest.mark.parametrize("dag_id", GPU_SPECS)
def test_gpu_pod_gets_gpu_limit_node_selector_and_tolerations(dag_id):
    spec = render(dag_id)["spec"]
    resources = spec["containers"][0]["resources"]
    assert resources["limits"][GPU_RESOURCE] == resources["requests"][GPU_RESOURCE] == str(gpus(dag_id))
    assert spec["tolerations"] == DEFAULT_GPU_TOLERATIONS
    assert spec["nodeSelector"] == {"nvidia.com/gpu.present": "true"}


@pytest.mark.parametrize("dag_id", CPU_SPECS)
def test_cpu_pod_has_no_gpu_anything(dag_id):
    spec = render(dag_id)["spec"]
    resources = spec["containers"][0]["resources"]
    assert GPU_RESOURCE not in resources["limits"] and GPU_RESOURCE not in resources["requests"]
    assert "tolerations" not in spec and "nodeSelector" not in spec


def test_gpu_scheduling_comes_from_platform_env(monkeypatch):
    dag_id = GPU_SPECS[0]
    tolerations = [{"key": "gpu", "operator": "Equal", "value": "a100", "effect": "NoSchedule"}]
    monkeypatch.setenv("MLPLATFORM_GPU_NODE_SELECTOR", json.dumps({"pool": "a100"}))
    monkeypatch.setenv("MLPLATFORM_GPU_TOLERATIONS", json.dumps(tolerations))
    spec = render(dag_id)["spec"]
    assert spec["nodeSelector"] == {"pool": "a100"} and spec["tolerations"] == tolerations
    monkeypatch.setenv("MLPLATFORM_GPU_TOLERATIONS", '{"not": "a list"}')
    with pytest.raises(ValueError, match="MLPLATFORM_GPU_TOLERATIONS"):
        render(dag_id)


def test_priority_class_follows_tenant_tier():
    for dag_id in SPECS:
        pod, tier = render(dag_id), context_for(dag_id).tenant.spec.tier
        assert pod["spec"].get("priorityClassName") == (PRIORITY_CLASS if tier == "priority" else None)
    assert {context_for(d).tenant.spec.tier for d in SPECS} == {"priority", "standard"}


@pytest.mark.parametrize("extra", [
    {"AWS_SECRET_ACCESS_KEY": "abc"},
    {"AWS_ACCESS_KEY_ID": "AKIAABCDEFGHIJKLMNOP"},
    {"MLFLOW_TRACKING_URI": "http://admin:hunter2@mlflow:5000"},
])
def test_literal_secrets_are_refused(extra):
    ctx = context_for(sorted(SPECS)[0])
    with pytest.raises(ValueError, match="literal secrets"):
        render_train_pod(ctx, {**pod_env(ctx), **extra})


def test_pod_name_is_bounded_and_unique_per_run():
    long_dag = "a" * 40 + "__" + "b" * 40
    names = {pod_name(long_dag, f"manual__2026-11-23T0{i}:00:00+00:00") for i in range(5)}
    assert len(names) == 5
    assert all(DNS1123_LABEL.match(n) and len(n) <= NAME_MAX for n in names)
    assert pod_name("acme__churn-xgb", RUN_ID).startswith("acme-churn-xgb-train-")


@pytest.mark.parametrize("version", VERSIONS)
@pytest.mark.parametrize("tenant", TENANTS)
def test_tenant_manifests_are_schema_valid(tenant, version):
    for doc in manifests.tenant_manifests(CATALOG.tenants[tenant]):
        kubernetes_validate.validate(doc, version, strict=True)


def test_tenant_manifests_content():
    tenant = CATALOG.tenants["acme"]
    docs = {d["kind"]: d for d in manifests.tenant_manifests(tenant)}
    assert list(docs) == ["Namespace", "ResourceQuota", "LimitRange", "ServiceAccount", "Role", "RoleBinding"]
    ns = docs["Namespace"]
    assert ns["metadata"]["name"] == "ml-acme"
    assert ns["metadata"]["labels"]["pod-security.kubernetes.io/enforce"] == "restricted"
    assert all(d["metadata"]["namespace"] == "ml-acme" for k, d in docs.items() if k != "Namespace")
    # acme: 8 cpu slots + 2 gpu slots = 10 pods, each up to 8 cpu / 32Gi plus the sidecar's default 100m / 64Mi.
    assert docs["ResourceQuota"]["spec"]["hard"] == {
        "pods": "10",
        "requests.cpu": "81000m",
        "limits.cpu": "81000m",
        "requests.memory": f"{10 * (32 * 1024 + 64)}Mi",
        "limits.memory": f"{10 * (32 * 1024 + 64)}Mi",
        "requests.nvidia.com/gpu": "2",
    }
    (limits,) = docs["LimitRange"]["spec"]["limits"]
    assert limits["max"] == {"cpu": "8000m", "memory": "32768Mi"}
    assert docs["ServiceAccount"]["metadata"]["name"] == tenant.spec.service_account
    assert docs["ServiceAccount"]["automountServiceAccountToken"] is False
    rules = {r["resources"][0]: set(r["verbs"]) for r in docs["Role"]["rules"]}
    assert rules == {
        "pods": {"create", "get", "list", "patch", "delete"},
        "pods/log": {"get"},
        "pods/exec": {"create", "get"},
        "events": {"list"},
    }
    assert docs["RoleBinding"]["roleRef"]["name"] == docs["Role"]["metadata"]["name"]
    assert docs["RoleBinding"]["subjects"] == [  # workers create the pod; the triggerer watches a deferred one
        {"kind": "ServiceAccount", "name": "airflow-worker", "namespace": "airflow"},
        {"kind": "ServiceAccount", "name": "airflow-triggerer", "namespace": "airflow"},
    ]


def test_limit_range_defaults_are_coherent():
    for tenant in CATALOG.tenants.values():
        (limits,) = manifests.limit_range(tenant)["spec"]["limits"]
        for kind, parse in (("cpu", cpu_cores), ("memory", memory_bytes)):
            assert parse(limits["defaultRequest"][kind]) <= parse(limits["default"][kind]) <= parse(limits["max"][kind])


def test_to_yaml_round_trips():
    docs = [d for t in TENANTS for d in manifests.tenant_manifests(CATALOG.tenants[t])]
    text = manifests.to_yaml(docs)
    assert text.startswith("---\n")
    assert list(yaml.safe_load_all(text)) == docs


def test_dict_converts_to_the_same_v1_pod_run_py_sends():
    from kubernetes.client import ApiClient, V1Pod

    from mlplatform.k8s.run import to_v1_pod

    for dag_id in SPECS:
        manifest = render(dag_id)
        pod = to_v1_pod(manifest)
        assert isinstance(pod, V1Pod)
        assert ApiClient().sanitize_for_serialization(pod) == manifest


@pytest.mark.parametrize("dag_id", sorted(SPECS))
def test_operator_pod_request_is_valid_and_restricted(dag_id, monkeypatch):
    """The pod the KubernetesPodOperator would create (sidecar included) still passes schema and PSS."""
    from kubernetes.client import ApiClient

    from mlplatform.k8s.run import build_operator

    monkeypatch.setenv("AIRFLOW_CONN_KUBERNETES_DEFAULT", json.dumps({"conn_type": "kubernetes"}))
    manifest = render(dag_id)
    operator = build_operator(manifest, task_id="train")
    request = ApiClient().sanitize_for_serialization(operator.build_pod_request_obj(dry_run=True))
    kubernetes_validate.validate(request, manifests.KUBERNETES_VERSION, strict=True)
    base, sidecar = request["spec"]["containers"]
    assert base["name"] == BASE_CONTAINER and sidecar["name"] == "airflow-xcom-sidecar"
    assert request["metadata"]["namespace"] == manifest["metadata"]["namespace"]
    assert request["metadata"]["name"].startswith(manifest["metadata"]["name"] + "-")
    assert len(request["metadata"]["name"]) <= 63
    assert request["spec"]["securityContext"] == manifest["spec"]["securityContext"]
    assert sidecar["securityContext"] == base["securityContext"] == manifest["spec"]["containers"][0]["securityContext"]
    # Requests only: the namespace LimitRange's defaults (budgeted in the ResourceQuota) supply its limits.
    assert "limits" not in sidecar["resources"]
    requests = sidecar["resources"]["requests"]
    assert cpu_cores(requests["cpu"]) <= manifests.DEFAULT_LIMIT["cpu"]
    assert memory_bytes(requests["memory"]) <= manifests.DEFAULT_LIMIT["memory"]
    assert base["resources"] == manifest["spec"]["containers"][0]["resources"]
    assert {"name": "xcom", "mountPath": "/airflow/xcom"} in base["volumeMounts"]
    assert base["env"] == manifest["spec"]["containers"][0]["env"]


def test_rendering_imports_no_kubernetes_client():
    code = (
        "import sys, mlplatform.k8s.pod, mlplatform.k8s.manifests, mlplatform.k8s.run\n"
        "bad = [m for m in sys.modules if m.split('.')[0] == 'kubernetes' or m.startswith('airflow.providers')]\n"
        "assert not bad, bad\n"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_run_pod_trainer_runs_the_rendered_pod(monkeypatch):
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator

    from mlplatform.k8s import run

    assert run.RESULT_PATH == RESULT_PATH
    seen = {}

    def fake_execute(self, context):
        seen["operator"] = self
        return {"run_id": "abc", "metrics": {"roc_auc": 0.8}}

    monkeypatch.setattr(KubernetesPodOperator, "execute", fake_execute)
    dag_id = GPU_SPECS[0]
    ctx = context_for(dag_id)
    context = {"ti": SimpleNamespace(task_id="train")}
    assert run.run_pod_trainer(ctx, features_for(dag_id), context) == {"run_id": "abc", "metrics": {"roc_auc": 0.8}}
    operator = seen["operator"]
    assert operator.task_id == "train" and operator.namespace == ctx.tenant.spec.namespace
    assert operator.do_xcom_push and operator.get_logs and operator.on_finish_action.value == "delete_succeeded_pod"
    assert operator.kubernetes_conn_id == "kubernetes_default"
    from kubernetes.client import ApiClient

    assert ApiClient().sanitize_for_serialization(operator.full_pod_spec) == render_train_pod(ctx, pod_env(ctx))


def test_run_pod_trainer_refuses_worker_local_paths():
    from mlplatform.k8s.run import check_remote

    ctx = context_for(sorted(SPECS)[0])
    env = pod_env(ctx)
    check_remote(env)
    with pytest.raises(StageFailed, match="MLPLATFORM_TRAIN_DATA=/tmp/train.parquet"):
        check_remote({**env, "MLPLATFORM_TRAIN_DATA": "/tmp/train.parquet"})
    with pytest.raises(StageFailed, match="MLFLOW_TRACKING_URI=sqlite"):
        check_remote({**env, "MLFLOW_TRACKING_URI": "sqlite:///mlflow.db"})
