"""Run the trainer pod with the cncf.kubernetes provider's KubernetesPodOperator, deferrable by default.

The only module of the platform that imports the provider or the kubernetes client, always inside a
function: the train task pays for it, DAG parsing never does (the factory builds the same ``TrainOperator``
for both backends; measured: importing the provider's operator module adds 1.3-3 s and ~1,750 modules to
every parse of the DAG file).

How the real task defers although the KubernetesPodOperator (KPO) is built at execute time: the KPO's
``execute`` creates the pod and raises ``TaskDeferred(method_name="trigger_reentry")``; ``_drive`` re-raises
it with ``method_name=RESUME_METHOD`` so the triggerer resumes *our* task (``TrainOperator.execute_complete``),
which builds an equivalent KPO and hands it the trigger event (``resume_pod_trainer``). Every KPO call goes
through ``_drive``, which also turns a failure into the decision of ``mlplatform.k8s.retry``: fail fast on a
user-code error, retry infrastructure failures, retry an OOM with more memory (kept in the task state
store, which outlives the try).
"""

from __future__ import annotations

import copy
import logging
import os
import time
from collections.abc import Callable
from datetime import datetime, timezone
from pathlib import Path
from typing import TYPE_CHECKING, Any

from mlplatform.k8s.pod import BASE_CONTAINER, SCRATCH_DIR, TERMINATION_MESSAGE_POLICY, render_train_pod
from mlplatform.k8s.retry import OOM, Failure, attempt_memory, classify, next_memory, split_lines

if TYPE_CHECKING:
    from mlplatform.stages.context import RunContext

log = logging.getLogger("mlplatform.train")

RESULT_PATH = Path("/airflow/xcom/return.json")  # the provider's XCom volume, read back through its sidecar
# Waiting for a GPU node to scale up and pull the CUDA image takes minutes, not the default 120 s.
STARTUP_TIMEOUT_SECONDS = 900
STARTUP_CHECK_INTERVAL_SECONDS = 5
POLL_INTERVAL_SECONDS = 10.0  # the trigger's pod polling while the trainer runs
RESUME_METHOD = "execute_complete"  # TrainOperator's method the triggerer resumes
MEMORY_STATE_KEY = "mlplatform.train.memory"  # task state store: the memory an OOM retry asked for
ON_FINISH_ACTION = "delete_succeeded_pod"  # failed pods stay for debugging until the reaper removes them
DEFAULT_FAILED_POD_RETENTION = "3d"
LOG_TAIL_LINES = 200  # read from the failed pod; the classifier keeps the last retry.TAIL_LINES
TRAINER_SELECTOR = "app.kubernetes.io/name=mlplatform-trainer"


def deferrable() -> bool:
    """``MLPLATFORM_TRAIN_DEFERRABLE`` (default true): wait for the pod in the triggerer, not in a worker slot."""
    return os.environ.get("MLPLATFORM_TRAIN_DEFERRABLE", "true").strip().lower() not in ("0", "false", "no", "off")


def failed_pod_retention_seconds() -> int | None:
    """``MLPLATFORM_FAILED_POD_RETENTION`` (default 3d, e.g. 12h): how long failed trainer pods are kept for
    debugging before the next finished train task of the tenant deletes them; ``never`` keeps them."""
    from mlplatform.spec.model import duration_seconds

    raw = os.environ.get("MLPLATFORM_FAILED_POD_RETENTION", "").strip() or DEFAULT_FAILED_POD_RETENTION
    if raw.lower() in ("never", "forever", "0"):
        return None
    return duration_seconds(raw)


def kubernetes_conn_id() -> str:
    return os.environ.get("MLPLATFORM_KUBERNETES_CONN_ID", "").strip() or "kubernetes_default"


def to_v1_pod(manifest: dict[str, Any]) -> Any:
    """A ``kubernetes.client.V1Pod`` from the manifest dict (the provider's own ApiClient deserializer)."""
    from airflow.providers.cncf.kubernetes.pod_generator import PodGenerator

    return PodGenerator.deserialize_model_dict(manifest)


def _operator(task_id: str, namespace: str, *, pod: Any = None, deferrable_mode: bool | None = None,
              execution_timeout: Any = None) -> Any:
    from airflow.providers.cncf.kubernetes.operators.pod import KubernetesPodOperator

    kwargs: dict[str, Any] = {}
    if pod is not None:
        # The sidecar must pass the namespace's "restricted" Pod Security too; it sets requests only and
        # gets its limits from the namespace LimitRange's defaults (see mlplatform.k8s.manifests).
        kwargs["xcom_sidecar_container_security_context"] = copy.deepcopy(pod.spec.containers[0].security_context)
    return KubernetesPodOperator(
        task_id=task_id,
        full_pod_spec=pod,
        namespace=namespace,
        kubernetes_conn_id=kubernetes_conn_id(),
        base_container_name=BASE_CONTAINER,
        do_xcom_push=True,
        get_logs=True,
        log_events_on_failure=True,
        log_pod_spec_on_failure=False,  # the classifier's summary replaces a dump of the whole pod
        on_finish_action=ON_FINISH_ACTION,
        startup_timeout_seconds=STARTUP_TIMEOUT_SECONDS,
        startup_check_interval_seconds=STARTUP_CHECK_INTERVAL_SECONDS,
        poll_interval=POLL_INTERVAL_SECONDS,
        termination_message_policy=TERMINATION_MESSAGE_POLICY,  # operator params win over full_pod_spec
        deferrable=deferrable() if deferrable_mode is None else deferrable_mode,
        execution_timeout=execution_timeout,
        **kwargs,
    )


def build_operator(manifest: dict[str, Any], task_id: str, *, deferrable_mode: bool | None = None,
                   execution_timeout: Any = None) -> Any:
    """A KubernetesPodOperator that creates exactly ``manifest`` plus the provider's XCom sidecar."""
    pod = to_v1_pod(manifest)
    return _operator(task_id, pod.metadata.namespace, pod=pod, deferrable_mode=deferrable_mode,
                     execution_timeout=execution_timeout)


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


def _state_store(context: Any) -> Any:
    try:
        return context.get("task_state_store")
    except AttributeError:
        return None


def memory_for_try(ctx: RunContext, context: Any) -> str:
    """The trainer's memory for this try: the spec's, or what the last OOM of this task asked for."""
    resources = ctx.spec.spec.training.resources
    maximum = ctx.tenant.spec.quotas.max_memory_per_task
    store, stored = _state_store(context), None
    if store is not None:
        try:
            stored = store.get(MEMORY_STATE_KEY)
        except Exception as exc:  # the store is an optimisation of the retry, never a reason to fail
            log.warning("could not read %s from the task state store: %s", MEMORY_STATE_KEY, exc)
    memory = attempt_memory(resources.memory, maximum, stored)
    if memory != resources.memory:
        log.warning("try %s: trainer memory %s instead of the spec's %s (a previous try was OOMKilled)",
                    ctx.try_number, memory, resources.memory)
    return memory


def _task_timeout(context: Any) -> Any:
    task = context.get("task") if hasattr(context, "get") else None
    return getattr(task, "execution_timeout", None)


def run_pod_trainer(ctx: RunContext, features: dict[str, Any], context: Any) -> dict[str, Any]:
    """Train in a pod of the tenant's namespace; returns the trainer's result (its XCom).

    Deferrable (the default): creates the pod and raises ``TaskDeferred``; the result comes back from
    ``resume_pod_trainer`` in the resumed task.
    """
    from mlplatform.stages.train_local import train_env

    env = train_env(ctx, features, RESULT_PATH, Path(SCRATCH_DIR))
    check_remote(env)
    memory = memory_for_try(ctx, context)
    manifest = render_train_pod(ctx, env, memory=memory)
    operator = build_operator(manifest, task_id=context["ti"].task_id, execution_timeout=_task_timeout(context))
    return _drive(operator, ctx, context, memory, lambda: operator.execute(context))


def resume_pod_trainer(ctx: RunContext, context: Any, event: dict[str, Any], memory: str | None = None,
                       **_: Any) -> dict[str, Any]:
    """The resumed half of a deferred ``run_pod_trainer``: logs, XCom result, cleanup, failure decision."""
    memory = memory or ctx.spec.spec.training.resources.memory
    operator = _operator(context["ti"].task_id, event.get("namespace") or ctx.tenant.spec.namespace,
                         deferrable_mode=True, execution_timeout=_task_timeout(context))
    where = (event.get("name"), event.get("namespace"))
    log.info("train pod %s/%s reported %r by the triggerer", where[1], where[0], event.get("status"))
    return _drive(operator, ctx, context, memory, lambda: operator.trigger_reentry(context, event), where)


def _drive(operator: Any, ctx: RunContext, context: Any, memory: str, call: Callable[[], Any],
           where: tuple[str | None, str | None] = (None, None)) -> dict[str, Any]:
    """Run one KPO step: defer as the real task, or return the XCom result, or decide about a failure."""
    from airflow.sdk.exceptions import AirflowFailException, TaskDeferred

    try:
        result = call()
    except TaskDeferred as deferred:
        kwargs = {**(deferred.kwargs or {}), "memory": memory}
        raise TaskDeferred(trigger=deferred.trigger, method_name=RESUME_METHOD, kwargs=kwargs,
                           timeout=deferred.timeout) from None
    except AirflowFailException:
        raise
    except Exception as exc:
        diagnosis = diagnose(operator, where)
        _reap(operator, ctx)
        if diagnosis is None:  # no pod was ever created: nothing to classify, Airflow's retries apply
            raise
        failure, pod = diagnosis
        _decide(failure, pod, operator, ctx, context, memory, exc)
        raise  # pragma: no cover - _decide always raises
    _reap(operator, ctx)
    if not isinstance(result, dict):
        raise RuntimeError(f"the trainer pod wrote no result to {RESULT_PATH}")
    return result


def _pod_ref(operator: Any, where: tuple[str | None, str | None]) -> tuple[str | None, str | None]:
    for pod in (operator.pod, operator.remote_pod, operator.pod_request_obj):
        meta = getattr(pod, "metadata", None)
        if meta is not None and meta.name and meta.namespace:
            return meta.name, meta.namespace
    return where


def diagnose(operator: Any, where: tuple[str | None, str | None] = (None, None)) -> tuple[Failure, Any] | None:
    """(classification, current pod or None) of the operator's pod; None when no pod is known."""
    from kubernetes.client.exceptions import ApiException

    name, namespace = _pod_ref(operator, where)
    if not name or not namespace:
        return None
    try:
        pod = operator.client.read_namespaced_pod(name=name, namespace=namespace)
    except ApiException as exc:
        pod = None if exc.status == 404 else (operator.pod or operator.remote_pod)
    except Exception as exc:
        log.warning("could not read pod %s/%s: %s", namespace, name, exc)
        pod = operator.pod or operator.remote_pod
    lines: list[str] = []
    if pod is not None:
        try:
            lines = split_lines(operator.client.read_namespaced_pod_log(
                name=name, namespace=namespace, container=BASE_CONTAINER, tail_lines=LOG_TAIL_LINES))
        except Exception as exc:  # e.g. the container never started: the termination message may still tell
            log.info("no log from pod %s/%s: %s", namespace, name, exc)
    return classify(pod, lines, container=BASE_CONTAINER), pod


def _decide(failure: Failure, pod: Any, operator: Any, ctx: RunContext, context: Any, memory: str,
            exc: BaseException) -> None:
    """Raise what the failure calls for: AirflowFailException (no retry) or AirflowException (retry)."""
    from airflow.sdk.exceptions import AirflowException, AirflowFailException

    name = getattr(getattr(pod, "metadata", None), "name", None)
    phase = getattr(getattr(pod, "status", None), "phase", None)
    if pod is not None and phase not in ("Succeeded", "Failed"):
        # Stuck (image pull back-off, no GPU node) or still running after a timeout: it would hold quota
        # and GPUs, or train twice next to the retry. Nothing to debug that the events did not show.
        try:
            operator.pod_manager.delete_pod(pod)
            log.warning("deleted pod %s left in phase %s", name, phase)
        except Exception as delete_exc:
            log.warning("could not delete pod %s (phase %s): %s", name, phase, delete_exc)
    kept = f"\nthe failed pod {pod.metadata.namespace}/{name} is kept for debugging" if phase == "Failed" else ""
    summary = failure.message() + kept
    if failure.kind == OOM:
        maximum = ctx.tenant.spec.quotas.max_memory_per_task
        more = next_memory(memory, maximum)
        if more is None:
            log.error("%s", summary)
            raise AirflowFailException(
                f"{summary}\nnot retried: the pod already had {memory}, the tenant's max_memory_per_task; "
                "reduce the data or the model, or ask the platform team for a larger per-task memory quota"
            ) from None
        store = _state_store(context)
        if store is None:
            log.warning("no task state store in the context: the retry cannot get more memory than %s", memory)
        else:
            store.set(MEMORY_STATE_KEY, more)
        log.warning("%s", summary)
        raise AirflowException(f"{summary}\nretrying with memory {more} (was {memory}; tenant maximum "
                               f"{maximum})") from exc
    if not failure.retry:
        log.error("%s", summary)
        raise AirflowFailException(f"{summary}\nnot retried: a {failure.kind.replace('_', ' ')} failure "
                                   "fails the same way again") from None
    log.warning("%s", summary)
    raise AirflowException(f"{summary}\nretrying ({failure.kind} failure)") from exc


def _reap(operator: Any, ctx: RunContext) -> None:
    """Delete this tenant's finished trainer pods older than the retention (best effort, one list call)."""
    retention = failed_pod_retention_seconds()
    if retention is None or "client" not in vars(operator):  # no API client was needed: do not make one
        return
    namespace = ctx.tenant.spec.namespace
    try:
        pods = operator.client.list_namespaced_pod(namespace=namespace, label_selector=TRAINER_SELECTOR).items
        now = time.time()
        for pod in pods:
            if getattr(pod.status, "phase", None) not in ("Failed", "Succeeded"):
                continue
            finished = _finished_at(pod)
            if finished is not None and now - finished.timestamp() > retention:
                log.info("deleting trainer pod %s/%s: finished %s, older than the retention of %ss",
                         namespace, pod.metadata.name, finished.isoformat(), retention)
                operator.client.delete_namespaced_pod(name=pod.metadata.name, namespace=namespace)
    except Exception as exc:
        log.info("could not clean up old trainer pods in %s: %s", namespace, exc)


def _finished_at(pod: Any) -> datetime | None:
    """When the pod's containers finished (latest finishedAt), else its creation time."""
    stamps = []
    for status in getattr(pod.status, "container_statuses", None) or ():
        terminated = getattr(getattr(status, "state", None), "terminated", None)
        if terminated is not None and terminated.finished_at is not None:
            stamps.append(terminated.finished_at)
    stamp = max(stamps) if stamps else getattr(pod.metadata, "creation_timestamp", None)
    if stamp is not None and stamp.tzinfo is None:
        stamp = stamp.replace(tzinfo=timezone.utc)
    return stamp
