"""What the DAG file calls: load the catalog and build every DAG.

In a task worker Airflow tells the DAG file which DAG it is parsing for (the parsing context); then only
that pipeline's spec is read and built, so starting a task costs one spec, not every tenant's.
"""

from __future__ import annotations

from pathlib import Path

from airflow.sdk import get_parsing_context

from mlplatform.config import PlatformConfig, get_config
from mlplatform.factory.build import build_all
from mlplatform.factory.control import control_dag_id
from mlplatform.factory.monitor import MONITOR_SUFFIX
from mlplatform.spec.loader import SPEC_SUFFIXES, load_catalog


def load_dags(tenant: str | None = None) -> dict:
    """``{variable_name: DAG}`` for the DAG file's globals.

    ``tenant``: only that tenant's pipelines (the loader of the tenant's own DAG bundle in multi-team mode).
    """
    config = get_config()
    only = spec_files_for(get_parsing_context().dag_id, config)
    if tenant is not None:
        only = tenant_spec_files(tenant, only, config)
    dags = build_all(load_catalog(config, only=only), config)
    if tenant is not None:  # a bundle never carries another team's DAG id
        dags = {dag_id: dag for dag_id, dag in dags.items() if dag_id.startswith(f"{tenant}__")}
    return {dag_id.replace("-", "_"): dag for dag_id, dag in dags.items()}


def tenant_spec_files(tenant: str, only: list[Path] | None, config: PlatformConfig) -> list[Path]:
    """The files of ``only`` (None: all) that live in the tenant's spec folder."""
    folder = config.specs_dir / tenant
    if only is None:
        return sorted(p for p in folder.iterdir() if p.suffix in SPEC_SUFFIXES) if folder.is_dir() else []
    return [p for p in only if p.parent == folder]


def spec_files_for(dag_id: str | None, config: PlatformConfig) -> list[Path] | None:
    """The spec file(s) of ``<tenant>__<pipeline>``, or None (load everything) when not parsing for one DAG."""
    if not dag_id or "__" not in dag_id:
        return None
    tenant, name = dag_id.split("__", 1)
    if dag_id == control_dag_id(tenant):  # the tenant's control DAG needs all of that tenant's specs
        folder = config.specs_dir / tenant
        return sorted(p for p in folder.iterdir() if p.suffix in SPEC_SUFFIXES) if folder.is_dir() else None
    name = name.removesuffix(MONITOR_SUFFIX)  # a pipeline's monitor DAG is built from the same spec
    files = [config.specs_dir / tenant / f"{name}{suffix}" for suffix in SPEC_SUFFIXES]
    found = [f for f in files if f.is_file()]
    return found or None
