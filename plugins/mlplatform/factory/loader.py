"""What the DAG file calls: load the catalog and build every DAG."""

from __future__ import annotations

from mlplatform.config import get_config
from mlplatform.factory.build import build_all
from mlplatform.spec.loader import load_catalog


def load_dags() -> dict:
    """``{variable_name: DAG}`` for the DAG file's globals."""
    config = get_config()
    catalog = load_catalog(config)
    return {dag_id.replace("-", "_"): dag for dag_id, dag in build_all(catalog, config).items()}
