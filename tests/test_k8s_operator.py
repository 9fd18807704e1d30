"""The kubernetes train path end to end against a fake cluster: only the Kubernetes API is faked.

The real ``TrainOperator`` built by the real factory runs its execute path with the real
KubernetesPodOperator (provider 10.25), its real ``KubernetesPodTrigger`` and ``PodManager``; the fake
stands in for the API server and kubelet behind the client calls: ``CoreV1Api`` (create/read/list/patch/
delete pods, logs, events), the exec websocket the XCom sidecar is read through, and the triggerer's async
hook reads. Pods walk Pending -> Running -> Succeeded (or Failed: OOMKilled, Evicted, a traceback).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import logging
from datetime import datetime, timedelta, timezone
from types import SimpleNamespace
from typing import Any

import kubernetes_validate
import pytest

from mlplatform.config import get_config, load_config
from mlplatform.k8s import manifests, retry
from mlplatform.k8s import run as k8s_run
from mlplatform.k8s.pod import GPU_RESOURCE
from mlplatform.spec.loader import load_catalog

VERSIONS = (manifests.KUBERNETES_VERSION, "1.37")  # pinned like test_k8s_render.py
RUN_ID = "scheduled__2026-11-23T03:00:00+00:00"
TRACKING = "http://mlflow.mlplatform.svc:5000"
T0 = "2026-11-23T03:00:00Z"
RESULT = {"run_id": "0123456789abcdef", "model_uri": "runs:/0123456789abcdef/model",
          "metrics": {"roc_auc": 0.91, "accuracy": 0.85, "f1": 0.8, "log_loss": 0.33}, "framework": "xgboost",
          "experiment_id": "7", "data_fingerprint": "0" * 64}
TRAINER_OK = ["loading s3://mlplatform-artifacts/acme/train.parquet", "trained xgboost on 1600 rows (cuda) in 4.20s",
              "logged model runs:/0123456789abcdef/model in 0.05s (run 0123456789abcdef)",
              "result written to /airflow/xcom/return.json"]
TRAINER_TRACEBACK = [
    "trained xgboost on 1600 rows (cuda) in 4.20s",
    "Traceback (most recent call last):",
    '  File "/opt/trainer/train.py", line 420, in <module>',
    "    sys.exit(main())",
    '  File "/opt/trainer/train.py", line 300, in train',
    "    metrics = holdout_metrics(estimator, X_holdout, y_holdout)",
    "ValueError: Input contains NaN",
]


# --- the fake cluster -----------------------------------------------------------------------------------

def _running():
    return {"running": {"startedAt": T0}}


def _terminated(code: int, reason: str, message: str | None = None):
    state = {"exitCode": code, "reason": reason, "startedAt": T0, "finishedAt": "2026-11-23T03:10:00Z"}
    if message:
        state["message"] = message
    return {"terminated": state}


def _waiting(reason: str, message: str = ""):
    return {"waiting": {"reason": reason, "message": message}}


def _cstatus(name: str, state: dict) -> dict:
    return {"name": name, "image": "img", "imageID": "", "ready": "running" in state, "restartCount": 0,
            "state": state}


def phase(name: str, *, base: dict | None = None, sidecar: dict | None = None, scheduled: bool = True,
          reason: str | None = None, message: str | None = None, conditions: list | None = None) -> dict:
    status: dict[str, Any] = {"phase": name}
    conds = [{"type": "PodScheduled", "status": "True" if scheduled else "False"}] + list(conditions or [])
    status["conditions"] = conds
    if base is not None:
        status["containerStatuses"] = [_cstatus("base", base)]
        if sidecar is not None:
            status["containerStatuses"].append(_cstatus("airflow-xcom-sidecar", sidecar))
    if reason:
        status["reason"] = reason
    if message:
        status["message"] = message
    return status


STARTING = [phase("Pending", scheduled=False), phase("Pending", base=_waiting("ContainerCreating"),
                                                        sidecar=_waiting("ContainerCreating"))]
RUNNING = phase("Running", base=_running(), sidecar=_running())
SCENARIOS = {
    "succeeded": STARTING + [RUNNING, phase("Running", base=_terminated(0, "Completed"), sidecar=_running())],
    "oom": STARTING + [RUNNING, phase("Running", base=_terminated(137, "OOMKilled"), sidecar=_running())],
    "evicted": STARTING + [RUNNING, phase(
        "Failed", reason="Evicted", message="The node was low on resource: memory.",
        base=_terminated(137, "ContainerStatusUnknown"), sidecar=_terminated(137, "ContainerStatusUnknown"),
        conditions=[{"type": "DisruptionTarget", "status": "True", "reason": "TerminationByKubelet"}])],
    "user_code": STARTING + [RUNNING, phase("Running", base=_terminated(
        1, "Error", "\n".join(TRAINER_TRACEBACK)), sidecar=_running())],
    "image_pull": [phase("Pending", scheduled=False), phase(
        "Pending", base=_waiting("ImagePullBackOff", 'Back-off pulling image "registry.example/trainer:0.1.0"'),
        sidecar=_running())],
}


class FakeStore:
    """The task state store: survives the tries of one task instance."""

    def __init__(self):
        self.data: dict[str, Any] = {}

    def get(self, key, default=None):
        return self.data.get(key, default)

    def set(self, key, value, *, retention=None):
        self.data[key] = value


class FakeExec:
    """The exec websocket of ``kubernetes.stream.stream``: ``cat`` the XCom file, or kill the sidecar."""

    def __init__(self, cluster: FakeCluster, name: str, command: list[str]):
        self.cluster, self.name, self.command = cluster, name, command
        self.output = ""

    def run_forever(self, timeout=None):
        pod = self.cluster.pods[self.name]
        result = pod["xcom"]
        self.output = json.dumps(result) if result is not None else "__airflow_xcom_result_empty__"

    def peek_stderr(self):
        return False

    def read_all(self):
        return self.output

    def is_open(self):  # the kill command's session: the sidecar exits at once
        self.cluster.pods[self.name]["sidecar_killed"] = True
        return False

    def close(self):
        pass


class FakeLogResponse:
    """The streaming HTTP response of a log read: iterable by line, or ``stream()``ed in chunks."""

    def __init__(self, lines: list[str], timestamps: bool):
        prefix = "2026-11-23T03:05:00.000000000Z " if timestamps else ""
        self.data = [f"{prefix}{line}\n".encode() for line in lines]

    def __iter__(self):
        return iter(self.data)

    def stream(self, amt=None, decode_content=True):
        yield b"".join(self.data)

    def release_conn(self):
        pass

    def close(self):
        pass


class FakeCoreV1:
    """The subset of ``CoreV1Api`` the operator and pod manager call; each call is recorded with its RBAC verb."""

    def __init__(self, cluster: FakeCluster):
        from kubernetes.client import ApiClient

        self.cluster = cluster
        self.api_client = ApiClient()

    def create_namespaced_pod(self, body, namespace, **_):
        return self.cluster.create(body, namespace)

    def read_namespaced_pod(self, name, namespace, **_):
        return self.cluster.read(name, namespace, "pods", "get")

    def list_namespaced_pod(self, namespace, label_selector="", **_):
        from kubernetes.client import V1PodList

        self.cluster.record("pods", "list")
        return V1PodList(items=[self.cluster.view(n) for n, p in self.cluster.pods.items()
                                if p["namespace"] == namespace and _selects(label_selector, p["labels"])])

    def patch_namespaced_pod(self, name, namespace, body, **_):
        self.cluster.record("pods", "patch")
        self.cluster.pods[name]["labels"].update(body["metadata"]["labels"])

    def delete_namespaced_pod(self, name, namespace, body=None, **_):
        self.cluster.record("pods", "delete")
        self.cluster.deleted.append(name)
        self.cluster.pods.pop(name, None)

    def read_namespaced_pod_log(self, name, namespace, container=None, _preload_content=True, tail_lines=None,
                                **kwargs):
        self.cluster.record("pods/log", "get")
        lines = self.cluster.pods[name]["logs"] if name in self.cluster.pods else []
        if tail_lines:
            lines = lines[-tail_lines:]
        if _preload_content:
            return "".join(f"{line}\n" for line in lines)
        return FakeLogResponse(lines, timestamps=kwargs.get("timestamps", False))

    def list_namespaced_event(self, namespace, field_selector="", **_):
        from kubernetes.client import CoreV1EventList

        self.cluster.record("events", "list")
        name = field_selector.partition("=")[2]
        return CoreV1EventList(items=self.cluster.events(name))

    def connect_get_namespaced_pod_exec(self, *args, **kwargs):  # only ever called through the fake stream
        raise AssertionError("exec goes through kubernetes.stream.stream")


def _selects(selector: str, labels: dict[str, str]) -> bool:
    for term in filter(None, selector.split(",")):
        if "!=" in term:
            key, value = term.split("!=")
            if labels.get(key) == value:
                return False
        elif "=" in term:
            key, value = term.split("=")
            if labels.get(key) != value:
                return False
        elif term.startswith("!") and term[1:] in labels:
            return False
    return True


class FakeCluster:
    """API server + kubelet: every read of a pod moves it one step along its scenario (the last one sticks)."""

    def __init__(self, scenario: str, logs: list[str], xcom: dict | None):
        self.scenario, self.logs, self.xcom = SCENARIOS[scenario], logs, xcom
        self.pods: dict[str, dict[str, Any]] = {}
        self.created: list[dict] = []
        self.deleted: list[str] = []
        self.verbs: set[tuple[str, str]] = set()
        self.api = FakeCoreV1(self)

    def record(self, resource: str, verb: str) -> None:
        self.verbs.add((resource, verb))

    def create(self, body: dict, namespace: str):
        from kubernetes.client.exceptions import ApiException

        self.record("pods", "create")
        name = body["metadata"]["name"]
        if name in self.pods:
            raise ApiException(status=409, reason="AlreadyExists")
        self.created.append(json.loads(json.dumps(body)))
        self.pods[name] = {"body": body, "namespace": namespace, "step": -1, "sidecar_killed": False,
                           "labels": dict(body["metadata"].get("labels") or {}), "logs": list(self.logs),
                           "xcom": self.xcom, "finished_at": datetime.now(timezone.utc).isoformat()}
        return self.view(name)

    def view(self, name: str):
        """The pod as the API returns it now (no step)."""
        from kubernetes.client import ApiClient

        pod = self.pods[name]
        status = json.loads(json.dumps(self.scenario[max(pod["step"], 0)]))
        for container in status.get("containerStatuses", []):  # containers finish "now", not in the past
            if "terminated" in container["state"]:
                container["state"]["terminated"]["finishedAt"] = pod["finished_at"]
        if pod["sidecar_killed"]:
            by_name = {c["name"]: c for c in status.get("containerStatuses", [])}
            by_name["airflow-xcom-sidecar"]["state"] = _terminated(0, "Completed")
            by_name["airflow-xcom-sidecar"]["state"]["terminated"]["finishedAt"] = pod["finished_at"]
            base = by_name["base"]["state"].get("terminated")
            if base is not None:  # a pod whose trainer never started stays Pending (kubelet semantics)
                status["phase"] = "Succeeded" if base.get("exitCode") == 0 else "Failed"
        manifest = {**pod["body"], "metadata": {**pod["body"]["metadata"], "labels": dict(pod["labels"]),
                                                "creationTimestamp": T0}, "status": status}
        return ApiClient().deserialize(_Response(manifest), "V1Pod")

    def read(self, name: str, namespace: str, resource: str, verb: str):
        from kubernetes.client.exceptions import ApiException

        self.record(resource, verb)
        if name not in self.pods:
            raise ApiException(status=404, reason="Not Found")
        pod = self.pods[name]
        pod["step"] = min(pod["step"] + 1, len(self.scenario) - 1)
        return self.view(name)

    def events(self, name: str) -> list:
        from kubernetes.client import CoreV1Event, V1ObjectMeta, V1ObjectReference

        return [CoreV1Event(metadata=V1ObjectMeta(uid=f"{name}-1", resource_version="1"), type="Normal",
                            reason="Scheduled", message=f"Successfully assigned {name} to gpu-node-1",
                            involved_object=V1ObjectReference(name=name, field_path=""))]


class _Response:
    def __init__(self, data: dict):
        self.data = json.dumps(data)


@pytest.fixture
def cluster_factory(monkeypatch):
    """Patch the Kubernetes API boundary; returns a function making the fake cluster of one scenario."""
    from airflow.providers.cncf.kubernetes.hooks.kubernetes import AsyncKubernetesHook, KubernetesHook
    from airflow.providers.cncf.kubernetes.utils import pod_manager

    holder: dict[str, FakeCluster] = {}

    def make(scenario: str, logs: list[str] | None = None, xcom: dict | None = None) -> FakeCluster:
        holder["cluster"] = FakeCluster(scenario, TRAINER_OK if logs is None else logs, xcom)
        return holder["cluster"]

    monkeypatch.setattr(KubernetesHook, "core_v1_client", property(lambda self: holder["cluster"].api))
    monkeypatch.setattr(KubernetesHook, "is_in_cluster", property(lambda self: False))

    def fake_stream(func, name, namespace, *, command, **_):
        holder["cluster"].record("pods/exec", "create")
        return FakeExec(holder["cluster"], name, command)

    monkeypatch.setattr(pod_manager, "kubernetes_stream", fake_stream)

    async def get_pod(self, name, namespace):
        return holder["cluster"].read(name, namespace, "pods", "get")

    async def watch_pod_events(self, name, namespace, resource_version=None, timeout_seconds=30):
        await asyncio.sleep(0.01)
        holder["cluster"].record("events", "watch")
        for event in holder["cluster"].events(name):
            yield event

    monkeypatch.setattr(AsyncKubernetesHook, "get_pod", get_pod)
    monkeypatch.setattr(AsyncKubernetesHook, "watch_pod_events", watch_pod_events)
    monkeypatch.setattr(k8s_run, "STARTUP_CHECK_INTERVAL_SECONDS", 0)
    monkeypatch.setattr(k8s_run, "POLL_INTERVAL_SECONDS", 0.01)
    monkeypatch.setenv("AIRFLOW_CONN_KUBERNETES_DEFAULT", json.dumps({"conn_type": "kubernetes"}))
    return make


# --- the real operator from the real factory ------------------------------------------------------------

@pytest.fixture
def platform_k8s(monkeypatch):
    monkeypatch.setenv("MLPLATFORM_TRAIN_BACKEND", "kubernetes")
    monkeypatch.setenv("MLFLOW_TRACKING_URI", TRACKING)
    monkeypatch.setenv("MLPLATFORM_ARTIFACT_ROOT", "s3://mlplatform-artifacts")
    monkeypatch.setenv("MLPLATFORM_S3_ENDPOINT_URL", "http://minio.mlplatform.svc:9000")
    monkeypatch.delenv("MLPLATFORM_TRAIN_DEFERRABLE", raising=False)
    get_config.cache_clear()
    yield load_config()
    get_config.cache_clear()


def train_task(config, dag_id: str | None = None):
    """(TrainOperator of a GPU example spec as the factory builds it, its loaded spec)."""
    from mlplatform.factory.build import build_dag

    catalog = load_catalog(config)
    loaded = next(s for s in catalog.specs if (s.dag_id == dag_id if dag_id else s.spec.spec.training.resources.gpu))
    dag = build_dag(loaded, catalog, config)
    return dag.get_task("train"), loaded, catalog.tenants[loaded.spec.metadata.tenant]


class FakeTI:
    def __init__(self, dag_id: str, try_number: int = 1):
        self.dag_id, self.task_id, self.run_id, self.map_index = dag_id, "train", RUN_ID, -1
        self.try_number = try_number
        self.start_date = datetime.now(timezone.utc)
        self.pushed: dict[str, Any] = {}

    def xcom_push(self, key, value):
        self.pushed[key] = value

    def xcom_pull(self, task_ids=None, key="return_value"):
        assert task_ids == "features"
        prefix = f"s3://mlplatform-artifacts/{self.dag_id}/{RUN_ID}"
        return {"train_path": f"{prefix}/train.parquet", "holdout_path": f"{prefix}/holdout.parquet",
                "feature_columns": ["tenure_months", "monthly_charges"], "fingerprint": "0" * 64}


def task_context(task, try_number: int = 1, store: FakeStore | None = None) -> dict[str, Any]:
    ti = FakeTI(task.dag_id, try_number)
    return {"ti": ti, "run_id": RUN_ID, "dag": task.dag, "task": task, "params": {},
            "task_state_store": store if store is not None else FakeStore()}


def first_event(trigger) -> dict:
    async def run():
        async for event in trigger.run():
            return event.payload
        raise AssertionError("the trigger ended without an event")

    return asyncio.run(asyncio.wait_for(run(), timeout=60))


def run_deferred(task, context: dict) -> tuple[Any, dict, Any]:
    """execute -> TaskDeferred; the triggerer: rebuild the trigger from its serialized form and run it;
    the task runner: resume_execution(next_method, next_kwargs + event). Returns (deferral, event, outcome)."""
    from airflow.providers.cncf.kubernetes.triggers.pod import KubernetesPodTrigger
    from airflow.sdk.exceptions import TaskDeferred

    with pytest.raises(TaskDeferred) as deferred:
        task.execute(context)
    classpath, kwargs = deferred.value.trigger.serialize()
    assert classpath.endswith("KubernetesPodTrigger")
    event = first_event(KubernetesPodTrigger(**kwargs))
    try:
        outcome = task.resume_execution(deferred.value.method_name, {**(deferred.value.kwargs or {}), "event": event},
                                        context)
    except Exception as exc:  # noqa: BLE001 - returned for the test to assert on
        outcome = exc
    return deferred.value, event, outcome


def base_container(body: dict) -> dict:
    return next(c for c in body["spec"]["containers"] if c["name"] == "base")


# --- tests: the happy path ------------------------------------------------------------------------------

def task_log(capfd, caplog) -> str:
    """What the task log shows: Airflow's structlog output (stdout) plus stdlib logging records."""
    return capfd.readouterr().out + caplog.text


def test_succeeded_pod_returns_the_trainer_result_through_the_sidecar(cluster_factory, platform_k8s, caplog,
                                                                       capfd):
    cluster = cluster_factory("succeeded", xcom=RESULT)
    task, loaded, tenant = train_task(platform_k8s)
    context = task_context(task)
    caplog.set_level(logging.INFO)

    deferral, event, result = run_deferred(task, context)

    # The real task deferred, to our own resume method, remembering the memory this try used.
    assert deferral.method_name == k8s_run.RESUME_METHOD == "execute_complete"
    assert deferral.kwargs == {"memory": loaded.spec.spec.training.resources.memory}
    assert event["status"] == "success"
    # The same dict the local backend returns, for evaluate and register.
    assert result == RESULT
    (body,) = cluster.created
    assert event["name"] == body["metadata"]["name"] and event["namespace"] == tenant.spec.namespace
    assert context["ti"].pushed == {"pod_name": body["metadata"]["name"], "pod_namespace": tenant.spec.namespace}
    # The trainer's log lines reach the task log; the succeeded pod is deleted.
    assert "[base] logs: trained xgboost on 1600 rows (cuda) in 4.20s" in task_log(capfd, caplog)
    assert cluster.deleted == [body["metadata"]["name"]]


def test_the_submitted_pod_is_schema_valid_restricted_and_gpu(cluster_factory, platform_k8s):
    cluster = cluster_factory("succeeded", xcom=RESULT)
    task, loaded, tenant = train_task(platform_k8s)
    run_deferred(task, task_context(task))
    (body,) = cluster.created
    for version in VERSIONS:
        kubernetes_validate.validate(body, version, strict=True)
    spec, base = body["spec"], base_container(body)
    gpus = str(loaded.spec.spec.training.resources.gpu)
    assert base["resources"]["limits"][GPU_RESOURCE] == base["resources"]["requests"][GPU_RESOURCE] == gpus
    assert spec["tolerations"] and spec["nodeSelector"]
    assert body["metadata"]["namespace"] == tenant.spec.namespace
    assert spec["serviceAccountName"] == tenant.spec.service_account
    assert spec["securityContext"]["runAsNonRoot"] and spec["securityContext"]["seccompProfile"]["type"] == "RuntimeDefault"
    for container in spec["containers"]:
        assert container["securityContext"]["allowPrivilegeEscalation"] is False
        assert container["securityContext"]["capabilities"] == {"drop": ["ALL"]}
    assert base["terminationMessagePolicy"] == "FallbackToLogsOnError"
    labels = body["metadata"]["labels"]
    assert labels["dag_id"] == loaded.dag_id and labels["task_id"] == "train" and labels["try_number"] == "1"
    env = {e["name"]: e for e in base["env"]}
    # Non-secret S3 endpoint as literals; credentials only as Secret references.
    assert env["MLFLOW_S3_ENDPOINT_URL"]["value"] == env["AWS_ENDPOINT_URL"]["value"] == "http://minio.mlplatform.svc:9000"
    assert "secretKeyRef" in env["AWS_SECRET_ACCESS_KEY"]["valueFrom"]
    assert env["MLPLATFORM_CHECKPOINT_DIR"]["value"] == (
        f"s3://mlplatform-artifacts/{loaded.spec.metadata.tenant}/{loaded.spec.metadata.name}/"
        f"{RUN_ID.replace(':', '_').replace('+', '_')}/train/checkpoints")


def test_the_operator_needs_only_what_the_tenant_role_grants(cluster_factory, platform_k8s):
    """Every API call the worker side made is allowed by the launcher Role of `mlplatform k8s`."""
    cluster = cluster_factory("succeeded", xcom=RESULT)
    task, _, tenant = train_task(platform_k8s)
    run_deferred(task, task_context(task))
    granted = {(r["resources"][0], verb) for r in manifests.launcher_role(tenant)["rules"] for verb in r["verbs"]}
    worker_side = cluster.verbs - {("events", "watch")}  # the triggerer's event watch falls back to list on 403
    assert worker_side <= granted, worker_side - granted


def test_non_deferrable_mode_is_a_platform_switch(cluster_factory, platform_k8s, monkeypatch):
    """MLPLATFORM_TRAIN_DEFERRABLE=false builds a synchronous KPO (waits in the worker slot)."""
    seen = {}

    def fake_execute(self, context):
        seen["deferrable"] = self.deferrable
        return RESULT

    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator

    monkeypatch.setattr(KubernetesPodOperator, "execute", fake_execute)
    cluster_factory("succeeded", xcom=RESULT)
    task, _, _ = train_task(platform_k8s)
    monkeypatch.setenv("MLPLATFORM_TRAIN_DEFERRABLE", "false")
    assert task.execute(task_context(task)) == RESULT and seen == {"deferrable": False}
    monkeypatch.delenv("MLPLATFORM_TRAIN_DEFERRABLE")
    assert task.execute(task_context(task)) == RESULT and seen == {"deferrable": True}


@pytest.mark.parametrize("scenario", ["succeeded", "user_code", "oom"])
def test_synchronous_mode_against_the_same_fake(cluster_factory, platform_k8s, monkeypatch, scenario, capfd, caplog):
    """MLPLATFORM_TRAIN_DEFERRABLE=false: the KPO waits in the worker; same result and same decisions."""
    from airflow.sdk.exceptions import AirflowException, AirflowFailException

    monkeypatch.setenv("MLPLATFORM_TRAIN_DEFERRABLE", "false")
    logs = {"succeeded": TRAINER_OK, "user_code": TRAINER_TRACEBACK, "oom": ["trained 10 rounds"]}[scenario]
    cluster = cluster_factory(scenario, logs=logs, xcom=RESULT if scenario == "succeeded" else None)
    task, loaded, _ = train_task(platform_k8s)
    store = FakeStore()
    try:
        outcome = task.execute(task_context(task, store=store))
    except Exception as exc:  # noqa: BLE001
        outcome = exc
    (body,) = cluster.created
    kubernetes_validate.validate(body, manifests.KUBERNETES_VERSION, strict=True)
    if scenario == "succeeded":
        assert outcome == RESULT and cluster.deleted == [body["metadata"]["name"]]
        assert "[base] trained xgboost on 1600 rows (cuda)" in task_log(capfd, caplog)
    elif scenario == "user_code":
        assert isinstance(outcome, AirflowFailException) and "ValueError: Input contains NaN" in str(outcome)
    else:
        assert isinstance(outcome, AirflowException) and not isinstance(outcome, AirflowFailException)
        assert store.data[k8s_run.MEMORY_STATE_KEY] == "8Gi"


# --- tests: failures and the retry decision -------------------------------------------------------------

def test_oom_retries_with_twice_the_memory_up_to_the_tenant_maximum(cluster_factory, platform_k8s):
    from airflow.sdk.exceptions import AirflowException, AirflowFailException

    from mlplatform.spec.model import memory_bytes

    task, loaded, tenant = train_task(platform_k8s)
    spec_memory = loaded.spec.spec.training.resources.memory
    maximum = tenant.spec.quotas.max_memory_per_task
    store = FakeStore()
    expected, try_number = spec_memory, 1
    while True:
        cluster = cluster_factory("oom", logs=["trained 10 rounds", "checkpoint saved at round 10"])
        _, event, outcome = run_deferred(task, task_context(task, try_number, store))
        (body,) = cluster.created
        assert base_container(body)["resources"]["limits"]["memory"] == expected  # this try's memory
        assert base_container(body)["resources"]["requests"]["memory"] == expected
        assert body["metadata"]["labels"]["try_number"] == str(try_number)
        assert event["status"] == "failed"
        assert cluster.deleted == []  # the failed pod is kept for debugging
        if memory_bytes(expected) >= memory_bytes(maximum):
            assert isinstance(outcome, AirflowFailException), outcome
            assert "not retried" in str(outcome) and "max_memory_per_task" in str(outcome)
            break
        assert isinstance(outcome, AirflowException) and not isinstance(outcome, AirflowFailException), outcome
        assert "OOMKilled" in str(outcome)
        doubled = retry.format_memory(min(2 * memory_bytes(expected), memory_bytes(maximum)))
        assert f"retrying with memory {doubled}" in str(outcome)
        assert store.data[k8s_run.MEMORY_STATE_KEY] == doubled
        expected, try_number = doubled, try_number + 1
    assert try_number >= 2  # at least one escalation happened before the limit


def test_evicted_pod_is_retried_as_an_infrastructure_failure(cluster_factory, platform_k8s):
    from airflow.sdk.exceptions import AirflowException, AirflowFailException

    cluster = cluster_factory("evicted", logs=["trained 10 rounds"])
    task, loaded, _ = train_task(platform_k8s)
    store = FakeStore()
    _, event, outcome = run_deferred(task, task_context(task, store=store))
    assert isinstance(outcome, AirflowException) and not isinstance(outcome, AirflowFailException), outcome
    assert "(infrastructure): Evicted" in str(outcome) and "retrying" in str(outcome)
    assert k8s_run.MEMORY_STATE_KEY not in store.data  # an eviction does not change the memory
    assert cluster.deleted == []


def test_user_code_failure_fails_fast_with_the_trainer_traceback(cluster_factory, platform_k8s, caplog, capfd):
    from airflow.sdk.exceptions import AirflowFailException

    cluster = cluster_factory("user_code", logs=TRAINER_TRACEBACK)
    task, _, _ = train_task(platform_k8s)
    caplog.set_level(logging.INFO)
    _, event, outcome = run_deferred(task, task_context(task))
    assert isinstance(outcome, AirflowFailException), outcome
    text = str(outcome)
    assert "(user_code): the trainer raised ValueError: Input contains NaN (exit code 1)" in text
    assert "Traceback (most recent call last):" in text and "holdout_metrics(estimator" in text
    assert "not retried" in text
    (body,) = cluster.created
    assert f"kept for debugging" in text and cluster.deleted == []
    shown = task_log(capfd, caplog)
    assert "[base] logs: ValueError: Input contains NaN" in shown  # streamed to the task log as it ran
    assert "trainer pod failure (user_code)" in shown


def test_user_code_failure_is_recognised_from_the_termination_message_when_logs_are_gone(cluster_factory,
                                                                                          platform_k8s):
    from airflow.sdk.exceptions import AirflowFailException

    cluster_factory("user_code", logs=[])  # log rotated away: the kubelet's FallbackToLogsOnError copy remains
    task, _, _ = train_task(platform_k8s)
    _, _, outcome = run_deferred(task, task_context(task))
    assert isinstance(outcome, AirflowFailException) and "ValueError: Input contains NaN" in str(outcome)


def test_image_pull_back_off_is_retried_and_the_stuck_pod_deleted(cluster_factory, platform_k8s):
    from airflow.sdk.exceptions import AirflowException, AirflowFailException

    cluster = cluster_factory("image_pull", logs=[])
    task, _, _ = train_task(platform_k8s)
    _, event, outcome = run_deferred(task, task_context(task))
    assert event["status"] in ("error", "failed")
    assert isinstance(outcome, AirflowException) and not isinstance(outcome, AirflowFailException), outcome
    assert "ImagePullBackOff" in str(outcome)
    (body,) = cluster.created
    assert cluster.deleted == [body["metadata"]["name"]]  # a Pending pod would hold quota forever


def test_a_pod_garbage_collected_before_resume_is_an_infrastructure_failure(cluster_factory, platform_k8s):
    from airflow.sdk.exceptions import AirflowException, AirflowFailException, TaskDeferred

    cluster = cluster_factory("oom")
    task, _, _ = train_task(platform_k8s)
    context = task_context(task)
    with pytest.raises(TaskDeferred) as deferred:
        task.execute(context)
    name = cluster.created[0]["metadata"]["name"]
    cluster.pods.pop(name)
    event = {"status": "failed", "name": name, "namespace": cluster.created[0]["metadata"]["namespace"],
             "message": "Container state failed"}
    with pytest.raises(AirflowException) as failed:
        task.resume_execution(deferred.value.method_name, {**deferred.value.kwargs, "event": event}, context)
    assert not isinstance(failed.value, AirflowFailException)
    assert "no longer exists" in str(failed.value)


def test_failed_pods_older_than_the_retention_are_reaped(cluster_factory, platform_k8s, monkeypatch):
    """A finished train task deletes the tenant's trainer pods that failed longer ago than the retention."""
    cluster = cluster_factory("user_code", logs=TRAINER_TRACEBACK)
    task, _, _ = train_task(platform_k8s)
    run_deferred(task, task_context(task))  # leaves a failed pod, finished two hours ago
    old = cluster.created[0]["metadata"]["name"]
    cluster.pods[old]["finished_at"] = (datetime.now(timezone.utc) - timedelta(hours=2)).isoformat()
    assert cluster.pods[old]["labels"]["app.kubernetes.io/name"] == "mlplatform-trainer"  # the reaper's selector
    monkeypatch.setenv("MLPLATFORM_FAILED_POD_RETENTION", "never")
    cluster.scenario = SCENARIOS["succeeded"]
    cluster.xcom = RESULT
    run_deferred(task, task_context(task, try_number=2))
    assert old in cluster.pods  # kept: retention "never"
    monkeypatch.setenv("MLPLATFORM_FAILED_POD_RETENTION", "1h")
    run_deferred(task, task_context(task, try_number=3))
    assert old not in cluster.pods and old in cluster.deleted


# --- tests: the classifier on its own -------------------------------------------------------------------

def pod_dict(status: dict) -> dict:
    return {"metadata": {"name": "p", "namespace": "ml-acme"}, "status": status}


@pytest.mark.parametrize(("status", "logs", "kind"), [
    (phase("Failed", base=_terminated(137, "OOMKilled")), [], retry.OOM),
    (phase("Failed", reason="Evicted", base=_terminated(137, "Error")), [], retry.INFRASTRUCTURE),
    (phase("Failed", reason="Preempting"), [], retry.INFRASTRUCTURE),
    (phase("Failed", reason="NodeShutdown", base=_terminated(143, "Error")), [], retry.INFRASTRUCTURE),
    (phase("Failed", reason="DeadlineExceeded", base=_terminated(137, "Error")), [], retry.INFRASTRUCTURE),
    (phase("Failed", reason="OutOfnvidia.com/gpu"), [], retry.INFRASTRUCTURE),
    (phase("Running", base=_running(), conditions=[{"type": "DisruptionTarget", "status": "True",
                                                    "reason": "PreemptionByScheduler"}]), [], retry.INFRASTRUCTURE),
    (phase("Pending", base=_waiting("ImagePullBackOff")), [], retry.INFRASTRUCTURE),
    (phase("Pending", base=_waiting("ErrImagePull")), [], retry.INFRASTRUCTURE),
    (phase("Pending", base=_waiting("InvalidImageName")), [], retry.CONFIG),
    (phase("Pending", base=_waiting("CreateContainerConfigError", 'secret "mlplatform-acme-s3" not found')), [],
     retry.CONFIG),
    (phase("Pending", scheduled=False), [], retry.INFRASTRUCTURE),
    (phase("Failed", base=_terminated(1, "Error")), TRAINER_TRACEBACK, retry.USER_CODE),
    (phase("Failed", base=_terminated(1, "Error")), ["Traceback (most recent call last):", '  File "x"',
                                                     "MemoryError"], retry.OOM),
    (phase("Failed", base=_terminated(2, "Error")), ["trainer: configuration error: label must be binary"],
     retry.USER_CODE),
    (phase("Failed", base=_terminated(137, "Error")), TRAINER_TRACEBACK, retry.INFRASTRUCTURE),  # killed mid-traceback
    (phase("Failed", base=_terminated(139, "Error")), ["segfault"], retry.UNKNOWN),
])
def test_classify(status, logs, kind):
    failure = retry.classify(pod_dict(status), logs)
    assert failure.kind == kind, failure
    assert failure.retry == (kind in (retry.INFRASTRUCTURE, retry.OOM, retry.UNKNOWN))


def test_classify_reads_client_objects_and_keeps_the_last_lines():
    from kubernetes.client import ApiClient

    pod = ApiClient().deserialize(_Response(pod_dict(phase("Failed", base=_terminated(1, "Error")))), "V1Pod")
    noise = [f"round {i}" for i in range(100)]
    failure = retry.classify(pod, noise + TRAINER_TRACEBACK)
    assert failure.kind == retry.USER_CODE and failure.exit_code == 1
    assert failure.log_tail[-1] == "ValueError: Input contains NaN" and len(failure.log_tail) <= retry.TAIL_LINES
    assert retry.classify(None).kind == retry.INFRASTRUCTURE


@pytest.mark.parametrize(("current", "maximum", "expected"), [
    ("4Gi", "32Gi", "8Gi"), ("24Gi", "32Gi", "32Gi"), ("32Gi", "32Gi", None), ("768Mi", "32Gi", "1536Mi"),
    ("40Gi", "32Gi", None),
])
def test_next_memory(current, maximum, expected):
    assert retry.next_memory(current, maximum) == expected


def test_attempt_memory_ignores_bad_or_out_of_range_values():
    assert retry.attempt_memory("4Gi", "32Gi", None) == "4Gi"
    assert retry.attempt_memory("4Gi", "32Gi", "8Gi") == "8Gi"
    assert retry.attempt_memory("4Gi", "32Gi", "64Gi") == "4Gi"
    assert retry.attempt_memory("4Gi", "32Gi", "2Gi") == "4Gi"
    assert retry.attempt_memory("4Gi", "32Gi", "lots") == "4Gi"


def test_s3_endpoint_env_only_when_configured(monkeypatch):
    from mlplatform.stages.train_local import object_store_env

    monkeypatch.delenv("MLPLATFORM_S3_ENDPOINT_URL", raising=False)
    assert object_store_env() == {}
    monkeypatch.setenv("MLPLATFORM_S3_ENDPOINT_URL", "http://minio:9000")
    assert object_store_env() == {"MLFLOW_S3_ENDPOINT_URL": "http://minio:9000", "AWS_ENDPOINT_URL": "http://minio:9000"}


def test_parsing_stays_free_of_the_provider_with_the_kubernetes_backend(tmp_path):
    """The design choice: the same TrainOperator for both backends, the provider imported only at run time."""
    import subprocess
    import sys

    from mlplatform.config import REPO_ROOT

    code = (
        "import sys\n"
        "from mlplatform.factory.loader import load_dags\n"
        "dags = load_dags()\n"
        "assert any(d.get_task('train').__class__.__name__ == 'TrainOperator' for d in dags.values()"
        " if 'train' in d.task_dict)\n"
        # (Airflow's provider discovery itself imports the package's __init__ and get_provider_info.)
        "bad = [m for m in sys.modules if m.split('.')[0] in ('kubernetes', 'kubernetes_asyncio')"
        " or m.startswith(('airflow.providers.cncf.kubernetes.operators', 'airflow.providers.cncf.kubernetes.hooks',"
        " 'airflow.providers.cncf.kubernetes.triggers', 'airflow.providers.cncf.kubernetes.utils'))]\n"
        "assert not bad, bad[:10]\n"
    )
    env = {**__import__("os").environ, "MLPLATFORM_TRAIN_BACKEND": "kubernetes", "MLPLATFORM_HOME": str(tmp_path)}
    subprocess.run([sys.executable, "-c", code], check=True, env=env, cwd=REPO_ROOT, timeout=120)
