"""Spec -> the pipeline's monitor DAG ``<tenant>__<pipeline>__monitor``. Parse-time code: no ML imports.

One task, ``drift_check`` (``DriftCheckOperator``), on ``spec.monitoring.schedule``. Its drift events go
to the same tenant-namespaced Asset the training DAG is scheduled on (``build.drift_asset``).
"""

from __future__ import annotations

from datetime import timedelta

from airflow.sdk import DAG, Param

from mlplatform.config import PlatformConfig
from mlplatform.factory.queues import queue_kwargs
from mlplatform.operators.monitor import DriftCheckOperator, monitor_alias
from mlplatform.spec.loader import Catalog, LoadedSpec

MONITOR_SUFFIX = "__monitor"
MONITOR_TIMEOUT = timedelta(minutes=30)


def monitor_dag_id(loaded: LoadedSpec) -> str:
    return f"{loaded.spec.dag_id}{MONITOR_SUFFIX}"


def build_monitor_dag(loaded: LoadedSpec, catalog: Catalog, config: PlatformConfig) -> DAG:
    """The monitor DAG of one valid spec."""
    from mlplatform.factory.build import START_DATE, drift_asset  # here: build.py may import this module

    spec = loaded.spec
    md, monitoring = spec.metadata, spec.spec.monitoring
    tenant = catalog.tenants[md.tenant]
    asset = drift_asset(md.tenant, md.name)
    trigger = (f"emits asset `{asset.name}` (cooldown {monitoring.cooldown}, at most "
               f"{monitoring.max_retrains_per_day} per day)" if monitoring.retrain_on_drift
               else "reports only (retrain_on_drift: false)")
    dag = DAG(
        dag_id=monitor_dag_id(loaded),
        description=f"{md.tenant}/{md.name}: drift of the newest data against the champion's training set"[:250],
        schedule=monitoring.schedule,
        start_date=START_DATE,
        catchup=False,
        max_active_runs=1,
        tags=sorted({"mlplatform", "mlplatform-monitor", f"tenant:{md.tenant}", *md.tags}),
        doc_md=(f"### Drift monitor of `{spec.dag_id}`\n\nReference: the champion's training-set snapshot; "
                f"current: the newest partition of `{spec.spec.data.source}`. Drift share threshold "
                f"{monitoring.drift_threshold}; on drift {trigger}. Spec: `{loaded.display}`."),
        params={"as_of": Param(None, type=["null", "string"], format="date",
                               description="Partition date to check (dt=YYYY-MM-DD); empty: the newest.")},
        default_args={
            "owner": md.owner or tenant.spec.owner,
            "retries": 1,
            "retry_delay": timedelta(seconds=30),
            "execution_timeout": MONITOR_TIMEOUT,
            "pool": tenant.cpu_pool,
        },
    )
    DriftCheckOperator.for_spec(spec=spec, tenant=tenant, spec_sha256=loaded.sha256,
                                extra={"drift_asset": asset, "training_dag_id": spec.dag_id},
                                task_id="drift_check", dag=dag, outlets=[monitor_alias(asset)],
                                **queue_kwargs("drift_check", md.tenant))
    return dag


def build_monitor_dags(catalog: Catalog, config: PlatformConfig, existing: dict | None = None) -> dict[str, DAG]:
    """Monitor DAGs of every valid spec not already in ``existing``; one failure never hides the others."""
    import logging

    dags: dict[str, DAG] = {}
    for loaded in catalog.specs:
        dag_id = monitor_dag_id(loaded)
        if existing and dag_id in existing:
            continue
        try:
            dags[dag_id] = build_monitor_dag(loaded, catalog, config)
        except Exception:  # noqa: BLE001 - logged; the pipeline DAG itself is unaffected
            logging.getLogger(__name__).exception("building %s failed", dag_id)
    return dags


def with_monitor_dags(dags: dict) -> dict:
    """``loader.load_dags()`` output plus the monitor DAGs it lacks (for a DAG file, until build_all has them)."""
    from mlplatform.config import get_config
    from mlplatform.spec.loader import load_catalog

    config = get_config()
    have = {dag.dag_id for dag in dags.values()}
    extra = build_monitor_dags(load_catalog(config), config, existing=dict.fromkeys(have))
    return {**dags, **{dag_id.replace("-", "_"): dag for dag_id, dag in extra.items()}}
