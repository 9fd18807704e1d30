"""Spec + template -> Airflow DAG. Runs at parse time for every spec: keep it cheap, import no ML library."""

from __future__ import annotations

import logging
from collections.abc import Iterable
from datetime import datetime, timedelta, timezone

from airflow.sdk import DAG, Asset, AssetOrTimeSchedule, CronTriggerTimetable

from mlplatform.config import PlatformConfig
from mlplatform.factory.control import build_control_dags
from mlplatform.factory.docs import broken_doc_md, spec_doc_md
from mlplatform.factory.monitor import build_monitor_dag, monitor_dag_id
from mlplatform.factory.params import trigger_params
from mlplatform.factory.queues import queue_kwargs
from mlplatform.notify import stage_alert_callback
from mlplatform.operators.canary import DeferrableCanaryDeployOperator
from mlplatform.operators.stages import STAGE_OPERATORS, SpecErrorOperator
from mlplatform.spec.loader import BrokenSpec, Catalog, LoadedSpec
from mlplatform.spec.model import duration_seconds
from mlplatform.spec.template import PipelineTemplate

log = logging.getLogger(__name__)

START_DATE = datetime(2026, 1, 1, tzinfo=timezone.utc)
_PRESETS = {
    "@hourly": "0 * * * *",
    "@daily": "0 0 * * *",
    "@weekly": "0 0 * * 0",
    "@monthly": "0 0 1 * *",
    "@quarterly": "0 0 1 */3 *",
    "@yearly": "0 0 1 1 *",
    "@annually": "0 0 1 1 *",
}


def drift_asset(tenant: str, pipeline: str) -> Asset:
    """The Asset a pipeline's drift monitor emits; namespaced by tenant so no tenant triggers another."""
    return Asset(name=f"{tenant}__{pipeline}__drift", uri=f"mlplatform://{tenant}/{pipeline}/drift",
                 group="mlplatform-drift")


def schedule_for(loaded: LoadedSpec):
    """Cron OR drift Asset (one DAG for scheduled and drift-triggered retraining)."""
    body = loaded.spec.spec
    cron = _PRESETS.get(body.schedule, body.schedule) if body.schedule else None
    if not body.monitoring.retrain_on_drift:
        return body.schedule
    asset = drift_asset(loaded.spec.metadata.tenant, loaded.spec.metadata.name)
    if cron is None or cron in ("@once", "@continuous"):
        return [asset]
    return AssetOrTimeSchedule(timetable=CronTriggerTimetable(cron, timezone="UTC"), assets=asset)


def schedule_summary(loaded: LoadedSpec) -> str:
    body = loaded.spec.spec
    parts = [f"cron {body.schedule}"] if body.schedule else []
    if body.monitoring.retrain_on_drift:
        parts.append(f"asset {drift_asset(loaded.spec.metadata.tenant, loaded.spec.metadata.name).name}")
    return " OR ".join(parts) or "manual only"


def build_dag(loaded: LoadedSpec, catalog: Catalog, config: PlatformConfig) -> DAG:
    """The pipeline DAG of one valid spec."""
    spec = loaded.spec
    md, body = spec.metadata, spec.spec
    tenant = catalog.tenants[md.tenant]
    template: PipelineTemplate = catalog.templates[body.template]
    defaults = template.defaults
    task_defaults = {
        "owner": md.owner or tenant.spec.owner,
        "retries": defaults.retries,
        "retry_delay": timedelta(seconds=duration_seconds(defaults.retry_delay)),
        "execution_timeout": timedelta(seconds=duration_seconds(defaults.timeout)),
        "pool": tenant.cpu_pool,
    }
    dag = DAG(
        dag_id=spec.dag_id,
        description=(md.description or f"{md.tenant}/{md.name}: {body.training.framework} pipeline")[:250],
        schedule=schedule_for(loaded),
        start_date=START_DATE,
        catchup=False,
        max_active_runs=tenant.spec.quotas.max_active_runs,
        tags=sorted({"mlplatform", f"tenant:{md.tenant}", f"template:{body.template}", *md.tags}),
        doc_md=spec_doc_md(loaded, tenant, template),
        params=trigger_params(spec),
        default_args=task_defaults,
    )
    tasks = {}
    for node in template.stages:
        # Tasks are created unattached and added below: attached at creation, Airflow deep-copies the DAG's
        # Params into every task, although it merges DAG Params into the task's context at run time anyway
        # (``process_params``). That copy was a third of the parse time of a spec.
        kwargs = dict(task_defaults, task_id=node.name, trigger_rule=node.trigger_rule)
        extra = {}
        if node.retries is not None:
            kwargs["retries"] = node.retries
        if node.timeout is not None:
            kwargs["execution_timeout"] = timedelta(seconds=duration_seconds(node.timeout))
        if node.name == "train":
            gpu = body.training.resources.gpu
            kwargs["execution_timeout"] = timedelta(seconds=duration_seconds(body.training.timeout))
            if gpu > 0:
                kwargs.update(pool=tenant.gpu_pool, pool_slots=gpu)
        if node.name == "register":
            extra["promote"] = not template.has("canary_deploy")
        kwargs.update(queue_kwargs(node.name, md.tenant, config.train_backend))  # per-tenant workers, if configured
        if node.name in ("evaluate", "canary_deploy"):
            alert = stage_alert_callback(tenant, md.name, node.name)  # rejected-retrain / rollback alerts
            if alert is not None:
                kwargs["on_success_callback"] = alert
        task = _operator(node.name, body, config).for_spec(spec=spec, tenant=tenant, spec_sha256=loaded.sha256,
                                                   extra=extra, **kwargs)
        task.dag = dag
        for upstream in node.after:
            tasks[upstream] >> task
        tasks[node.name] = task
    return dag


def _operator(stage: str, body, config: PlatformConfig) -> type:
    """The stage's operator; with a standalone gateway configured, the canary bakes deferrably on its traffic."""
    if stage == "canary_deploy" and config.gateway_url and body.deployment.target == "gateway":
        return DeferrableCanaryDeployOperator
    return STAGE_OPERATORS[stage]


def build_broken_dag(broken: BrokenSpec) -> DAG:
    """A paused, unscheduled stand-in that keeps the DAG id and shows the spec's errors in the UI."""
    first = str(broken.problems[0]) if broken.problems else "invalid spec"
    dag = DAG(
        dag_id=broken.dag_id,
        description=f"INVALID SPEC: {first}"[:250],
        schedule=None,
        start_date=START_DATE,
        catchup=False,
        is_paused_upon_creation=True,
        tags=["mlplatform", "invalid-spec", f"tenant:{broken.tenant}"],
        doc_md=broken_doc_md(broken),
    )
    SpecErrorOperator(task_id="spec_error", problems=[str(p) for p in broken.problems], dag=dag, retries=0)
    return dag


def build_all(catalog: Catalog, config: PlatformConfig,
              results: Iterable[LoadedSpec | BrokenSpec] | None = None) -> dict[str, DAG]:
    """Every DAG: one per valid spec, a stand-in per broken one. One failure never hides the others.

    ``results``: the specs as ``spec.loader.load_specs`` loads them into ``catalog``, each built before the next
    file is read (a tenant's DAG file does this, so its parse budget covers reading and building alike).
    """
    dags: dict[str, DAG] = {}
    stream = results is not None
    for item in results if stream else [*catalog.specs, *catalog.broken]:
        if isinstance(item, LoadedSpec):
            dags.update(build_spec_dags(item, catalog, config))
        elif item.dag_id not in dags:  # a broken twin never replaces a healthy pipeline
            dags[item.dag_id] = build_broken_dag(item)
    dags.update(build_control_dags(catalog, config))
    return dags


def build_spec_dags(loaded: LoadedSpec, catalog: Catalog, config: PlatformConfig) -> dict[str, DAG]:
    """A valid spec's pipeline and monitor DAGs; a factory error gives a stand-in instead of raising.

    Each DAG also gets DagBag's own checks here (``factory.check.validate_dag``, what `mlplatform lint` runs):
    a DAG the dag-processor would refuse becomes a stand-in with the spec's line, not an import error."""
    from mlplatform.factory.check import build_problem, validate_dag

    try:
        dag = build_dag(loaded, catalog, config)
        validate_dag(dag)
        dags = {loaded.dag_id: dag}
    except Exception as exc:  # a factory bug must not take every other tenant's DAGs down with it
        log.exception("building %s failed", loaded.dag_id)
        broken = BrokenSpec(loaded.path, loaded.display, loaded.spec.metadata.tenant,
                            loaded.spec.metadata.name, [build_problem(loaded, exc)])
        return {broken.dag_id: build_broken_dag(broken)}
    try:
        monitor = build_monitor_dag(loaded, catalog, config)
        validate_dag(monitor)
        dags[monitor_dag_id(loaded)] = monitor
    except Exception:  # the pipeline DAG stays; only its monitor is missing until fixed
        log.exception("building the monitor DAG of %s failed", loaded.dag_id)
    return dags
