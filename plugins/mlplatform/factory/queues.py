"""Which Celery queue a task goes to: per-tenant workers for tenant-influenced work (platform config).

``MLPLATFORM_TENANT_QUEUE`` (e.g. ``tenant-{tenant}``, unset by default) sends the stages that read a tenant's
data, column names or hyperparameters (validate, features, local train, evaluate, drift_monitor, the monitor's
drift_check) to that tenant's own queue, served by a worker that holds only that tenant's credentials
(docker-compose.yaml: ``airflow-worker-<tenant>``). Platform work (register, canary_deploy, the control DAG,
the Kubernetes train backend that launches pods with the cluster connection) stays on the default queue,
whose worker holds the platform's connections (the gateway token). Unset: every task on the default queue.
Parse-time code: standard library only.
"""

from __future__ import annotations

import os
import re

TENANT_STAGES = frozenset({"validate", "features", "train", "evaluate", "drift_monitor", "drift_check"})


def tenant_queue(tenant: str) -> str | None:
    """The tenant's queue name from ``MLPLATFORM_TENANT_QUEUE`` (``{tenant}`` expands), or None when unset."""
    template = os.environ.get("MLPLATFORM_TENANT_QUEUE", "").strip()
    if not template:
        return None
    name = template.replace("{tenant}", tenant)
    if not re.fullmatch(r"[A-Za-z0-9][A-Za-z0-9_.:-]{0,199}", name):
        raise ValueError(f"MLPLATFORM_TENANT_QUEUE={template!r} gives the queue name {name!r}: use letters, digits "
                         "and . _ : - (e.g. tenant-{tenant})")
    return name


def queue_kwargs(stage: str, tenant: str, train_backend: str = "local") -> dict[str, str]:
    """``{"queue": ...}`` for a tenant stage when per-tenant queues are configured, else ``{}``."""
    if stage not in TENANT_STAGES or (stage == "train" and train_backend != "local"):
        return {}
    queue = tenant_queue(tenant)
    return {"queue": queue} if queue else {}
