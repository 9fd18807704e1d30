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


def load_dags() -> dict:
    """``{variable_name: DAG}`` for the DAG file's globals."""
    config = get_config()
    only = spec_files_for(get_parsing_context().dag_id, config)
    catalog = load_catalog(config, only=only)
    return {dag_id.replace("-", "_"): dag for dag_id, dag in build_all(catalog, config).items()}


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
