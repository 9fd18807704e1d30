"""KServe target up to the Kubernetes API boundary: manifests, the patch sequence of a canary, Prometheus gates."""

from __future__ import annotations

import copy
import shutil
from pathlib import Path

import pytest

from mlplatform.k8s.kserve import (
    KServeDeployer,
    KServeTraffic,
    ManifestError,
    gate_stats,
    kserve_target,
    parse_instant,
    render_inference_service,
    storage_uri,
    validate_inference_service,
)
from mlplatform.spec.model import DeploymentSpec, Resources
from mlplatform.stages.canary_state import CanaryMachine

NAME = "acme.churn"


class ApiException(Exception):
    def __init__(self, status):
        super().__init__(f"({status})")
        self.status = status


def merge(target: dict, patch: dict) -> dict:
    """RFC 7386 JSON merge patch."""
    for key, value in patch.items():
        if value is None:
            target.pop(key, None)
        elif isinstance(value, dict) and isinstance(target.get(key), dict):
            merge(target[key], value)
        else:
            target[key] = copy.deepcopy(value)
    return target


class FakeCustomObjectsApi:
    """Records every call; keeps one object per name; simulates KServe's revision bookkeeping."""

    def __init__(self):
        self.objects: dict[tuple, dict] = {}
        self.calls: list[tuple] = []
        self.revision = 0

    def _key(self, group, version, namespace, plural, name):
        assert (group, version, plural) == ("serving.kserve.io", "v1beta1", "inferenceservices")
        return namespace, name

    def get_namespaced_custom_object(self, group, version, namespace, plural, name):
        self.calls.append(("get", name))
        obj = self.objects.get(self._key(group, version, namespace, plural, name))
        if obj is None:
            raise ApiException(404)
        return copy.deepcopy(obj)

    def create_namespaced_custom_object(self, group, version, namespace, plural, body):
        validate_inference_service(body)
        self.calls.append(("create", copy.deepcopy(body)))
        obj = copy.deepcopy(body)
        self._revise(obj, rolled_out=True)
        self.objects[self._key(group, version, namespace, plural, body["metadata"]["name"])] = obj
        return obj

    def patch_namespaced_custom_object(self, group, version, namespace, plural, name, body):
        self.calls.append(("patch", copy.deepcopy(body)))
        obj = self.objects[self._key(group, version, namespace, plural, name)]
        before = obj["spec"]["predictor"]["model"]["storageUri"]
        merge(obj, body)
        validate_inference_service({k: v for k, v in obj.items() if k != "status"})
        predictor = obj["spec"]["predictor"]
        if predictor["model"]["storageUri"] != before:
            self._revise(obj, rolled_out="canaryTrafficPercent" not in predictor)
        elif "canaryTrafficPercent" not in predictor:  # promotion: the latest revision is rolled out
            status = obj["status"]["components"]["predictor"]
            status["latestRolledoutRevision"] = status["latestCreatedRevision"]
        return obj

    def _revise(self, obj, rolled_out):
        self.revision += 1
        rev = f"{obj['metadata']['name']}-predictor-{self.revision:05d}"
        status = obj.setdefault("status", {}).setdefault("components", {}).setdefault("predictor", {})
        status["latestCreatedRevision"] = rev
        if rolled_out or "latestRolledoutRevision" not in status:
            status["latestRolledoutRevision"] = rev

    def patches(self) -> list[dict]:
        """(canaryTrafficPercent, storageUri) of each patch: None means 'removed', '-' means 'untouched'."""
        out = []
        for kind, body in self.calls:
            if kind != "patch":
                continue
            pred = body["spec"]["predictor"]
            out.append((pred.get("canaryTrafficPercent", "-") if "canaryTrafficPercent" in pred else "-",
                        pred.get("model", {}).get("storageUri", "-")))
        return out


def manifest(**kw):
    args = dict(name="churn", namespace="ml-acme", tenant="acme", pipeline="churn",
                storage="s3://models/acme/churn/1/model", model_version="1",
                resources=Resources(cpu="500m", memory="1Gi", gpu=1), min_replicas=1, max_replicas=3)
    return render_inference_service(**(args | kw))


def test_rendered_manifest_has_the_documented_fields():
    m = manifest(canary_percent=10, service_account="mlplatform-serving")
    assert m["apiVersion"] == "serving.kserve.io/v1beta1" and m["kind"] == "InferenceService"
    assert m["metadata"]["namespace"] == "ml-acme" and m["metadata"]["labels"]["mlplatform.io/tenant"] == "acme"
    pred = m["spec"]["predictor"]
    assert pred["canaryTrafficPercent"] == 10 and (pred["minReplicas"], pred["maxReplicas"]) == (1, 3)
    assert pred["serviceAccountName"] == "mlplatform-serving"
    model = pred["model"]
    assert model["modelFormat"] == {"name": "mlflow"} and model["protocolVersion"] == "v2"
    assert model["storageUri"] == "s3://models/acme/churn/1/model"
    assert model["resources"] == {"requests": {"cpu": "500m", "memory": "1Gi", "nvidia.com/gpu": "1"},
                                  "limits": {"memory": "1Gi", "nvidia.com/gpu": "1"}}


@pytest.mark.parametrize("change,message", [
    (lambda m: m["spec"]["predictor"].update(canaryTrafficPercent=150), "canaryTrafficPercent"),
    (lambda m: m["spec"]["predictor"].update(canaryTrafficPercent=0.5), "canaryTrafficPercent"),
    (lambda m: m["spec"]["predictor"]["model"].update(storageUri="/tmp/model"), "storageUri"),
    (lambda m: m["spec"]["predictor"].update(trafic=10), "unknown fields"),
    (lambda m: m["metadata"].update(name="acme.churn"), "DNS-1035"),
    (lambda m: m["spec"]["predictor"]["model"].pop("modelFormat"), "modelFormat"),
    (lambda m: m["spec"]["predictor"].update(minReplicas=5, maxReplicas=2), "minReplicas"),
    (lambda m: m.update(apiVersion="serving.kserve.io/v1alpha1"), "apiVersion"),
])
def test_invalid_manifests_are_rejected(change, message):
    m = manifest()
    change(m)
    with pytest.raises(ManifestError, match=message):
        validate_inference_service(m)


@pytest.fixture
def client(tmp_path: Path, tmp_path_factory: pytest.TempPathFactory):
    from mlflow import MlflowClient

    template = tmp_path_factory.getbasetemp() / "mlflow-kserve-template.db"
    if not template.exists():
        MlflowClient(f"sqlite:///{template}").search_experiments()
    shutil.copy(template, tmp_path / "mlflow.db")
    c = MlflowClient(f"sqlite:///{tmp_path}/mlflow.db", f"sqlite:///{tmp_path}/mlflow.db")
    c.create_registered_model(NAME)
    for v in (1, 2):
        c.create_model_version(NAME, source=f"s3://models/acme/churn/{v}/model")
    c.create_model_version(NAME, source=str(tmp_path / "local-model"))
    c.set_registered_model_alias(NAME, "champion", "1")
    return c


def test_storage_uri_from_the_model_version(client):
    assert storage_uri(client, NAME, "2") == "s3://models/acme/churn/2/model"
    with pytest.raises(ManifestError, match="KServe needs"):
        storage_uri(client, NAME, "3")


def prometheus(bad_revision: str | None = None):
    """A fake instant-query function: 200 requests per revision, 5xx for the bad one, p99 40 ms."""
    queries = []

    def fetch(query: str):
        queries.append(query)
        bad = bad_revision is not None and f'revision_name="{bad_revision}"' in query
        if "histogram_quantile" in query:
            return 40.0
        if 'response_code_class="5xx"' in query:
            return 60.0 if bad else 0.0
        return 200.0

    fetch.queries = queries
    return fetch


def make_traffic(api, client, fetch):
    from helpers_stage import pipeline_spec, tenant_file

    ctx = type("Ctx", (), {"spec": pipeline_spec(), "tenant": tenant_file()})()
    deployer, manifest_for = kserve_target(ctx, client, NAME, api=api)
    deployer.apply(manifest_for("1"))
    return KServeTraffic(deployer, fetch, challenger_storage=storage_uri(client, NAME, "2"), challenger_version="2",
                         champion_storage=storage_uri(client, NAME, "1"), champion_version="1",
                         sleep=lambda s: None), deployer


def test_good_canary_patch_sequence(client):
    api = FakeCustomObjectsApi()
    traffic, deployer = make_traffic(api, client, prometheus())
    assert api.calls[1][0] == "create" and "canaryTrafficPercent" not in api.calls[1][1]["spec"]["predictor"]
    machine = CanaryMachine(client, NAME, "2", actor="test")
    result = machine.run(DeploymentSpec(steps=[0.1, 0.5, 1.0]), "1", traffic, bake_seconds=60)

    assert result["decision"] == "promoted"
    new, old = "s3://models/acme/churn/2/model", "s3://models/acme/churn/1/model"
    assert api.patches() == [(10, new), (50, "-"), (100, "-"), (None, "-")]
    obj = deployer.get()
    assert "canaryTrafficPercent" not in obj["spec"]["predictor"]
    assert obj["spec"]["predictor"]["model"]["storageUri"] == new
    assert obj["metadata"]["annotations"]["mlplatform.io/model-version"] == "2"
    assert obj["status"]["components"]["predictor"]["latestRolledoutRevision"].endswith("00002")
    assert old != new
    assert {a: str(v) for a, v in client.get_registered_model(NAME).aliases.items()} == {"champion": "2",
                                                                                         "previous": "1"}


def test_bad_canary_is_rolled_back_on_kserve(client):
    api = FakeCustomObjectsApi()
    fetch = prometheus(bad_revision="churn-predictor-00002")
    traffic, deployer = make_traffic(api, client, fetch)
    machine = CanaryMachine(client, NAME, "2", actor="test")
    result = machine.run(DeploymentSpec(steps=[0.1, 0.5, 1.0]), "1", traffic, bake_seconds=60)

    assert result["decision"] == "rolled_back" and "error_rate" in result["reason"]
    old, new = "s3://models/acme/churn/1/model", "s3://models/acme/churn/2/model"
    assert api.patches() == [(10, new), (0, "-"), (None, old)]  # traffic back at once, then the spec
    assert deployer.get()["spec"]["predictor"]["model"]["storageUri"] == old
    assert any('revision_name="churn-predictor-00002"' in q for q in fetch.queries)
    assert any('[60s]' in q for q in fetch.queries)


def test_resumed_canary_only_moves_the_share(client):
    api = FakeCustomObjectsApi()
    traffic, deployer = make_traffic(api, client, prometheus())
    traffic.set_share(0.1)
    resumed = KServeTraffic(deployer, prometheus(), challenger_storage=traffic.challenger_storage,
                            challenger_version="2", champion_storage=traffic.champion_storage,
                            champion_version="1", sleep=lambda s: None)
    resumed.set_share(0.5)
    assert api.patches() == [(10, "s3://models/acme/churn/2/model"), (50, "-")]


def test_prometheus_parsing_and_gate_stats():
    assert parse_instant({"status": "success", "data": {"result": [{"value": [0, "12.5"]}]}}) == 12.5
    assert parse_instant({"status": "success", "data": {"result": []}}) is None
    assert parse_instant({"status": "success", "data": {"result": [{"value": [0, "NaN"]}]}}) is None
    with pytest.raises(RuntimeError):
        parse_instant({"status": "error", "error": "bad query"})
    stats = gate_stats(prometheus(bad_revision="r2"), "ml-acme", "r2", 30)
    assert stats == {"requests": 200, "errors": 60, "error_rate": 0.3, "p99_ms": 40.0}
    assert gate_stats(prometheus(), "ml-acme", None, 30)["requests"] == 0


def test_deployment_spec_kserve_fields():
    d = DeploymentSpec(target="kserve", steps=[0.1, 0.5, 1.0], min_replicas=2, max_replicas=4)
    assert d.traffic_steps == [0.1, 0.5, 1.0] and d.resources.memory == "1Gi"
    with pytest.raises(ValueError, match="min_replicas"):
        DeploymentSpec(min_replicas=5, max_replicas=2)
    assert KServeDeployer(FakeCustomObjectsApi(), "ml-acme", "churn").get() is None
