"""KServe target: one InferenceService per pipeline in the tenant's namespace, canaried step by step.

Follows KServe's documented canary rollout (serving.kserve.io/v1beta1, serverless mode): the champion is
the rolled-out revision; a canary step patches ``spec.predictor.model.storageUri`` to the challenger and
``spec.predictor.canaryTrafficPercent`` to the step's share; promotion removes ``canaryTrafficPercent``
(100% to the latest revision); rollback sets it to 0 (all traffic back to the previous rolled-out revision)
and then restores the champion's ``storageUri``. Gate figures come from Prometheus (Knative revision metrics)
through an Airflow HTTP connection. ``KServeTraffic`` plugs all of it into the canary state machine.

No cluster exists in the test environment: the Kubernetes API object is injected (a ``CustomObjectsApi`` in
production, a recording fake in tests) and manifests are checked by ``validate_inference_service`` against
the fields KServe documents for v1beta1.
"""

from __future__ import annotations

import logging
import re
import time
from collections.abc import Callable
from typing import Any

log = logging.getLogger(__name__)

GROUP, VERSION, PLURAL, KIND = "serving.kserve.io", "v1beta1", "inferenceservices", "InferenceService"
API_VERSION = f"{GROUP}/{VERSION}"
STORAGE_SCHEMES = ("s3://", "gs://", "pvc://", "https://", "http://", "hdfs://", "webhdfs://", "oci://", "hf://")
DNS_1035 = re.compile(r"^[a-z]([-a-z0-9]*[a-z0-9])?$")
MAX_NAME = 45  # KServe/Knative: longer names overflow the generated host names

# Fields KServe documents for an InferenceService (v1beta1) that this module may render.
_PREDICTOR_FIELDS = {"model", "minReplicas", "maxReplicas", "canaryTrafficPercent", "serviceAccountName",
                     "scaleTarget", "scaleMetric", "containerConcurrency", "timeout", "labels", "annotations"}
_MODEL_FIELDS = {"modelFormat", "runtime", "storageUri", "protocolVersion", "resources", "env", "args"}
_RESOURCE_KEYS = {"cpu", "memory", "nvidia.com/gpu"}


class ManifestError(ValueError):
    pass


def isvc_name(pipeline: str) -> str:
    """The InferenceService name of a pipeline (unique inside its tenant's namespace)."""
    name = pipeline.lower()
    if not DNS_1035.match(name) or len(name) > MAX_NAME:
        raise ManifestError(f"{pipeline!r} is not usable as an InferenceService name (DNS-1035, <= {MAX_NAME})")
    return name


def storage_uri(client: Any, model_name: str, version: str) -> str:
    """Where the model version's files are (resolves MLflow 3's ``models:/<id>`` sources to artifact URIs)."""
    uri = client.get_model_version_download_uri(model_name, str(version))
    if not uri.startswith(STORAGE_SCHEMES):
        raise ManifestError(f"{model_name} v{version} lives at {uri!r}; KServe needs one of {STORAGE_SCHEMES} "
                            "(run MLflow with an S3 artifact store for the kserve target)")
    return uri


def render_inference_service(*, name: str, namespace: str, tenant: str, pipeline: str, storage: str,
                             model_version: str, resources: Any, min_replicas: int = 1, max_replicas: int = 3,
                             canary_percent: int | None = None, service_account: str | None = None) -> dict:
    """The InferenceService manifest (MLflow model format, served by KServe's MLServer runtime, v2 protocol)."""
    requests = {"cpu": str(resources.cpu), "memory": resources.memory}
    limits = {"memory": resources.memory}
    if resources.gpu:
        requests["nvidia.com/gpu"] = limits["nvidia.com/gpu"] = str(resources.gpu)
    predictor: dict[str, Any] = {
        "minReplicas": min_replicas,
        "maxReplicas": max_replicas,
        "model": {
            "modelFormat": {"name": "mlflow"},
            "protocolVersion": "v2",
            "storageUri": storage,
            "resources": {"requests": requests, "limits": limits},
        },
    }
    if service_account:
        predictor["serviceAccountName"] = service_account
    if canary_percent is not None:
        predictor["canaryTrafficPercent"] = canary_percent
    manifest = {
        "apiVersion": API_VERSION,
        "kind": KIND,
        "metadata": {
            "name": name,
            "namespace": namespace,
            "labels": {"app.kubernetes.io/managed-by": "mlplatform", "mlplatform.io/tenant": tenant,
                       "mlplatform.io/pipeline": pipeline},
            "annotations": {"mlplatform.io/model-version": str(model_version)},
        },
        "spec": {"predictor": predictor},
    }
    validate_inference_service(manifest)
    return manifest


def validate_inference_service(manifest: dict) -> None:
    """Check a manifest against the InferenceService fields and constraints KServe documents."""
    problems = []
    if manifest.get("apiVersion") != API_VERSION or manifest.get("kind") != KIND:
        problems.append(f"apiVersion/kind must be {API_VERSION}/{KIND}")
    meta = manifest.get("metadata") or {}
    if not DNS_1035.match(str(meta.get("name", ""))) or len(meta.get("name", "")) > MAX_NAME:
        problems.append(f"metadata.name {meta.get('name')!r} must be a DNS-1035 label of <= {MAX_NAME} characters")
    if not re.match(r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$", str(meta.get("namespace", ""))):
        problems.append("metadata.namespace must be a DNS-1123 label")
    predictor = (manifest.get("spec") or {}).get("predictor")
    if not isinstance(predictor, dict):
        problems.append("spec.predictor is required")
        raise ManifestError("; ".join(problems))
    unknown = set(predictor) - _PREDICTOR_FIELDS
    if unknown:
        problems.append(f"spec.predictor: unknown fields {sorted(unknown)}")
    pct = predictor.get("canaryTrafficPercent")
    if pct is not None and (not isinstance(pct, int) or isinstance(pct, bool) or not 0 <= pct <= 100):
        problems.append("spec.predictor.canaryTrafficPercent must be an integer 0..100")
    lo, hi = predictor.get("minReplicas", 1), predictor.get("maxReplicas", 1)
    if not (isinstance(lo, int) and isinstance(hi, int) and 0 <= lo and hi >= 1 and (hi == 0 or lo <= hi)):
        problems.append("spec.predictor.minReplicas/maxReplicas must be integers with 0 <= min <= max")
    model = predictor.get("model")
    if not isinstance(model, dict):
        problems.append("spec.predictor.model is required")
    else:
        unknown = set(model) - _MODEL_FIELDS
        if unknown:
            problems.append(f"spec.predictor.model: unknown fields {sorted(unknown)}")
        if not (model.get("modelFormat") or {}).get("name"):
            problems.append("spec.predictor.model.modelFormat.name is required")
        if not str(model.get("storageUri", "")).startswith(STORAGE_SCHEMES):
            problems.append(f"spec.predictor.model.storageUri must start with one of {STORAGE_SCHEMES}")
        if model.get("protocolVersion") not in (None, "v1", "v2", "grpc-v2"):
            problems.append("spec.predictor.model.protocolVersion must be v1, v2 or grpc-v2")
        res = model.get("resources") or {}
        for part in ("requests", "limits"):
            bad = set(res.get(part) or {}) - _RESOURCE_KEYS
            if bad:
                problems.append(f"spec.predictor.model.resources.{part}: unexpected {sorted(bad)}")
    if problems:
        raise ManifestError("; ".join(problems))


def custom_objects_api(conn_id: str | None = None) -> Any:
    """A ``CustomObjectsApi`` from the cncf.kubernetes provider's connection (in-cluster when none)."""
    from airflow.providers.cncf.kubernetes.hooks.kubernetes import KubernetesHook
    from kubernetes import client as k8s

    return k8s.CustomObjectsApi(KubernetesHook(conn_id=conn_id).get_conn())


def _not_found(exc: Exception) -> bool:
    return getattr(exc, "status", None) == 404


class KServeDeployer:
    """Applies and patches one InferenceService through the Kubernetes API (``CustomObjectsApi``)."""

    def __init__(self, api: Any, namespace: str, name: str):
        self.api, self.namespace, self.name = api, namespace, name

    def _args(self) -> tuple:
        return GROUP, VERSION, self.namespace, PLURAL

    def get(self) -> dict | None:
        try:
            return self.api.get_namespaced_custom_object(*self._args(), self.name)
        except Exception as exc:  # kubernetes.client.ApiException
            if _not_found(exc):
                return None
            raise

    def apply(self, manifest: dict) -> dict:
        """Create, or merge-patch the spec of an existing InferenceService."""
        validate_inference_service(manifest)
        if self.get() is None:
            return self.api.create_namespaced_custom_object(*self._args(), manifest)
        patch = {"metadata": {"labels": manifest["metadata"]["labels"],
                              "annotations": manifest["metadata"]["annotations"]}, "spec": manifest["spec"]}
        return self.api.patch_namespaced_custom_object(*self._args(), self.name, patch)

    def _patch_predictor(self, predictor: dict, annotations: dict | None = None) -> dict:
        body: dict[str, Any] = {"spec": {"predictor": predictor}}
        if annotations:
            body["metadata"] = {"annotations": annotations}
        return self.api.patch_namespaced_custom_object(*self._args(), self.name, body)

    def start_canary(self, storage: str, version: str, percent: int) -> dict:
        return self._patch_predictor({"model": {"storageUri": storage}, "canaryTrafficPercent": percent},
                                     {"mlplatform.io/canary-version": str(version)})

    def set_canary_percent(self, percent: int) -> dict:
        return self._patch_predictor({"canaryTrafficPercent": percent})

    def promote(self, version: str) -> dict:
        """Merge-patch null removes canaryTrafficPercent: the latest revision takes all traffic."""
        return self._patch_predictor({"canaryTrafficPercent": None},
                                     {"mlplatform.io/model-version": str(version),
                                      "mlplatform.io/canary-version": None})

    def rollback(self, champion_storage: str, champion_version: str) -> list[dict]:
        """Traffic back to the rolled-out revision at once, then the spec back to the champion's model."""
        return [
            self.set_canary_percent(0),
            self._patch_predictor({"model": {"storageUri": champion_storage}, "canaryTrafficPercent": None},
                                  {"mlplatform.io/model-version": str(champion_version),
                                   "mlplatform.io/canary-version": None}),
        ]

    def revisions(self) -> dict[str, str | None]:
        """The predictor's rolled-out (champion) and latest created (canary) Knative revisions."""
        status = ((self.get() or {}).get("status") or {}).get("components", {}).get("predictor", {})
        return {"champion": status.get("latestRolledoutRevision"), "challenger": status.get("latestCreatedRevision")}


# ---------------------------------------------------------------------------------- Prometheus gate source

PROMQL = {
    "requests": 'sum(increase(revision_app_request_count{{namespace_name="{ns}",revision_name="{rev}"}}[{w}s]))',
    "errors": 'sum(increase(revision_app_request_count{{namespace_name="{ns}",revision_name="{rev}",'
              'response_code_class="5xx"}}[{w}s]))',
    "p99_ms": 'histogram_quantile(0.99, sum by (le) (rate(revision_app_request_latencies_bucket'
              '{{namespace_name="{ns}",revision_name="{rev}"}}[{w}s])))',
}


def prometheus_fetch(conn_id: str) -> Callable[[str], float | None]:
    """An instant-query function against the Prometheus of an Airflow HTTP connection."""
    import httpx
    from airflow.sdk import BaseHook

    conn = BaseHook.get_connection(conn_id)
    scheme = conn.schema or "http"
    base = conn.host if "://" in (conn.host or "") else f"{scheme}://{conn.host}:{conn.port or 9090}"
    auth = (conn.login, conn.password) if conn.login else None

    def fetch(query: str) -> float | None:
        body = httpx.get(f"{base}/api/v1/query", params={"query": query}, auth=auth, timeout=30).json()
        return parse_instant(body)

    return fetch


def parse_instant(body: dict) -> float | None:
    if body.get("status") != "success":
        raise RuntimeError(f"Prometheus query failed: {body.get('error')}")
    result = body["data"]["result"]
    if not result:
        return None
    value = float(result[0]["value"][1])
    return None if value != value else value  # NaN: no samples


def promql_label(value: str) -> str:
    """A value for a double-quoted PromQL label matcher: backslashes and quotes escaped, so a name can never
    end the string and change the query."""
    return str(value).replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def gate_stats(fetch: Callable[[str], float | None], namespace: str, revision: str | None,
               window_s: int) -> dict[str, Any]:
    """One revision's gate figures over the bake window, in the gateway's stats shape."""
    if revision is None:
        return {"requests": 0, "errors": 0, "error_rate": 0.0, "p99_ms": None}
    q = {k: v.format(ns=promql_label(namespace), rev=promql_label(revision), w=max(int(window_s), 1))
         for k, v in PROMQL.items()}
    requests = round(fetch(q["requests"]) or 0)
    errors = round(fetch(q["errors"]) or 0)
    p99 = fetch(q["p99_ms"])
    return {"requests": requests, "errors": errors, "error_rate": errors / requests if requests else 0.0,
            "p99_ms": p99}


class KServeTraffic:
    """The canary state machine's traffic on KServe: each step patches the canary share, bakes, reads Prometheus."""

    url = None

    def __init__(self, deployer: KServeDeployer, fetch: Callable[[str], float | None], *, challenger_storage: str,
                 challenger_version: str, champion_storage: str, champion_version: str,
                 sleep: Callable[[float], None] = time.sleep):
        self.deployer, self.fetch, self.sleep = deployer, fetch, sleep
        self.challenger_storage, self.challenger_version = challenger_storage, challenger_version
        self.champion_storage, self.champion_version = champion_storage, champion_version
        self.started = False

    def set_share(self, share: float) -> None:
        percent = round(share * 100)
        if percent == 0:
            if self.started:
                self.deployer.rollback(self.champion_storage, self.champion_version)
                self.started = False
        elif not self.started:
            current = self.deployer.get() or {}
            canary = (current.get("metadata", {}).get("annotations") or {}).get("mlplatform.io/canary-version")
            if canary == str(self.challenger_version):  # a resumed canary: only move the share
                self.deployer.set_canary_percent(percent)
            else:
                self.deployer.start_canary(self.challenger_storage, self.challenger_version, percent)
            self.started = True
        else:
            self.deployer.set_canary_percent(percent)

    def bake(self, share: float, seconds: int) -> tuple[dict[str, dict[str, Any]], float]:
        started = time.monotonic()
        self.sleep(seconds)
        revisions = self.deployer.revisions()
        stats = {v: gate_stats(self.fetch, self.deployer.namespace, revisions[v], seconds) | {"revision": revisions[v]}
                 for v in ("champion", "challenger")}
        return stats, time.monotonic() - started

    def promoted(self) -> None:
        """After the aliases moved: the challenger's revision takes all traffic."""
        self.deployer.promote(self.challenger_version)

    def close(self) -> None:
        pass


def kserve_target(ctx: Any, client: Any, model_name: str, api: Any = None,
                  fetch: Callable[[str], float | None] | None = None):
    """(deployer, manifest_for(version)) for one pipeline in its tenant's namespace."""
    import os

    spec, tenant = ctx.spec, ctx.tenant
    api = api or custom_objects_api(os.environ.get("MLPLATFORM_KUBERNETES_CONN_ID") or None)
    deployer = KServeDeployer(api, tenant.spec.namespace, isvc_name(spec.metadata.name))
    d = spec.spec.deployment

    def manifest_for(version: str) -> dict:
        return render_inference_service(
            name=deployer.name, namespace=deployer.namespace, tenant=spec.metadata.tenant,
            pipeline=spec.metadata.name, storage=storage_uri(client, model_name, version), model_version=version,
            resources=d.resources, min_replicas=d.min_replicas, max_replicas=d.max_replicas)

    return deployer, manifest_for


PROMETHEUS_CONN_ID = "mlplatform_prometheus"
