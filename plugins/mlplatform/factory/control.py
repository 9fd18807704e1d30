"""The per-tenant deployments control DAG: a trigger form through which a person promotes, aborts or rolls back.

``<tenant>__deployments`` has no schedule and one task; the form picks one of the tenant's online pipelines
and an action. Every action goes through the same state machine as the deploy stage
(``mlplatform.stages.canary_state``) and is recorded as an audit event on the model version (MLflow tags)
and in the task log. One DAG per tenant, not per pipeline, so it adds nothing per spec to parse time.
"""

from __future__ import annotations

from datetime import timedelta

from airflow.sdk import DAG, Param

from mlplatform.config import PlatformConfig
from mlplatform.factory.params import DRAFT7
from mlplatform.operators.canary import CanaryControlOperator
from mlplatform.spec.loader import Catalog, LoadedSpec
from mlplatform.spec.model import TenantFile

ACTIONS = ("promote_now", "abort", "rollback_to_previous")  # = canary_state.ACTIONS (not imported: parse time)


def control_dag_id(tenant: str) -> str:
    return f"{tenant}__deployments"


def build_control_dags(catalog: Catalog, config: PlatformConfig) -> dict[str, DAG]:
    """One control DAG per tenant with at least one pipeline whose template has a canary stage."""
    online: dict[str, list[LoadedSpec]] = {}
    for loaded in catalog.specs:
        if catalog.templates[loaded.spec.spec.template].has("canary_deploy"):
            online.setdefault(loaded.spec.metadata.tenant, []).append(loaded)
    return {control_dag_id(t): build_control_dag(catalog.tenants[t], specs) for t, specs in online.items()}


def build_control_dag(tenant: TenantFile, specs: list[LoadedSpec]) -> DAG:
    """The control DAG of one tenant's online pipelines."""
    from mlplatform.factory.build import START_DATE

    names = sorted(loaded.spec.metadata.name for loaded in specs)
    dag = DAG(
        dag_id=control_dag_id(tenant.name),
        description=f"{tenant.name}: promote now, abort a canary, or roll back to the previous champion",
        schedule=None,
        start_date=START_DATE,
        catchup=False,
        max_active_runs=1,
        tags=sorted({"mlplatform", "mlplatform-control", f"tenant:{tenant.name}"}),
        doc_md=(
            f"### Deployment control for tenant `{tenant.name}`\n\n"
            "Trigger with a **pipeline** and an **action**:\n\n"
            "- `promote_now`: the canary's challenger becomes `champion` now (the old one becomes `previous`).\n"
            "- `abort`: the challenger's traffic goes back to the champion; its alias stays for inspection.\n"
            "- `rollback_to_previous`: `champion` moves back to `previous` (one step).\n\n"
            "Every action is an audit event in the model version's `mlplatform.audit.*` MLflow tags."
        ),
        params={
            "pipeline": Param(names[0], type="string", enum=names, title="Pipeline", **DRAFT7),
            "action": Param(None, type=["null", "string"], enum=[None, *ACTIONS], title="Action",
                            description="promote_now | abort | rollback_to_previous", **DRAFT7),
            "reason": Param("", type="string", maxLength=500, title="Reason",
                            description="Recorded with the audit event.", **DRAFT7),
        },
        default_args={
            "owner": tenant.spec.owner,
            "retries": 3,  # MLflow unreachable: retry; every action is idempotent
            "retry_delay": timedelta(seconds=30),
            "execution_timeout": timedelta(minutes=5),
            "pool": tenant.cpu_pool,
        },
    )
    first = specs[0]
    CanaryControlOperator.for_spec(
        spec=first.spec, tenant=tenant, spec_sha256=first.sha256, task_id="apply_action", dag=dag,
        extra={"pipelines": {loaded.spec.metadata.name: (loaded.spec, loaded.sha256) for loaded in specs}},
    )
    return dag
