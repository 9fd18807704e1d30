"""One DAG bundle per tenant: a generated folder holding a two-line loader that builds only that tenant's specs.

The bundle carries ``team_name`` = tenant, so Airflow gives every DAG it parses to the tenant's team. Specs
stay where tenants write them (``dags/specs/<tenant>/``); the bundle folder holds platform code only. The
loader is the same as the tenant's DAG file in single-deployment mode (``tenants/dagfiles.py``): one parse
unit per tenant, with the tenant's parse budget.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from mlplatform.spec.model import TenantFile
from mlplatform.tenants.dagfiles import is_generated, loader_source, write_generated
from mlplatform.tenants.reconcile import Change

LOADER_FILE = "mlplatform_pipelines.py"
GENERATED_BY = "mlplatform sync"
LOCAL_BUNDLE = "airflow.dag_processing.bundles.local.LocalDagBundle"


def bundle_config(tenants: dict[str, TenantFile], bundles_dir: Path) -> list[dict]:
    """``[dag_processor] dag_bundle_config_list``: one local bundle per tenant, named and teamed after it."""
    return [{"name": name, "classpath": LOCAL_BUNDLE, "kwargs": {"path": str(bundles_dir / name)}, "team_name": name}
            for name in sorted(tenants)]


def write_bundles(tenants: dict[str, TenantFile], bundles_dir: Path, dry_run: bool = False) -> list[Change]:
    """Write each tenant's bundle folder; remove generated folders of tenants that are gone."""
    changes = [write_generated(bundles_dir / name / LOADER_FILE, loader_source(name, GENERATED_BY), "bundle", name,
                               f"{bundles_dir / name} team={name}", dry_run) for name in sorted(tenants)]
    for folder in sorted(bundles_dir.iterdir()) if bundles_dir.is_dir() else []:
        loader = folder / LOADER_FILE
        if folder.name in tenants or not is_generated(loader):
            continue  # a tenant's, or not ours
        changes.append(Change("bundle", "delete", folder.name, "tenant file removed"))
        if not dry_run:
            shutil.rmtree(folder)
    return changes
