"""What ``dags/mlplatform_unassigned.py`` calls: stand-ins for spec folders no tenant DAG file parses.

A spec folder is parsed by ``tenant_<folder>.py`` next to the calling DAG file when that file exists, else here,
so every spec has exactly one parse unit and no DAG id is defined by two files. A folder whose tenant file exists
(its DAG file is missing: `mlplatform dagfiles` was not run) gets one cheap stand-in per spec saying so, without
reading them; a folder without a tenant file has its specs loaded for their errors ("unknown tenant ...; did you
mean ...?"), under a parse budget like a tenant's.

Light on purpose: this runs on every parse, and usually every folder has its DAG file, so it only lists folders;
the factory is imported only when there is something to build.
"""

from __future__ import annotations

from pathlib import Path

from mlplatform.config import get_config
from mlplatform.tenants.dagfiles import dagfile_name, tenant_has_file


def load_unassigned_dags(dag_file: str | Path) -> dict:
    """``{variable_name: DAG}``: stand-ins for the spec folders no ``tenant_<folder>.py`` next to ``dag_file``
    parses."""
    config = get_config()
    folder = Path(dag_file).parent
    if not config.specs_dir.is_dir():
        return {}
    pending = [d for d in sorted(config.specs_dir.iterdir()) if d.is_dir() and not (folder / dagfile_name(d.name)).is_file()]
    if not pending:
        return {}

    from airflow.sdk import get_parsing_context

    from mlplatform.factory.budget import MAX_STAND_INS, ParseBudget, file_dag_id_parts
    from mlplatform.factory.build import build_all, build_broken_dag
    from mlplatform.factory.loader import spec_files_for, variables
    from mlplatform.spec.errors import Problem
    from mlplatform.spec.loader import BrokenSpec, _display, _files, load_specs, platform_catalog

    only = spec_files_for(get_parsing_context().dag_id, config)
    dags: dict = {}
    unknown: list[Path] = []
    for spec_folder in pending:
        files = [p for p in _files(spec_folder) if only is None or p in only]
        if not tenant_has_file(spec_folder.name, config):
            unknown += files
            continue
        message = (f"tenant {spec_folder.name!r} has no DAG file ({dagfile_name(spec_folder.name)} in Airflow's DAG "
                   "folder), so its specs are not built: the platform team runs `mlplatform dagfiles`")
        for path in files[:max(0, MAX_STAND_INS - len(dags))]:  # cheap, but not free: capped like the budget's
            display = _display(path, config)
            broken = BrokenSpec(path, display, *file_dag_id_parts(path), [Problem(display, 1, 1, "", message)])
            dags[broken.dag_id] = build_broken_dag(broken)
    if unknown:  # no tenant file: each spec is an "unknown tenant" stand-in with lint's message
        catalog = platform_catalog(config)
        dags.update(build_all(catalog, config, load_specs(catalog, config, unknown, ParseBudget.for_tenant("", config))))
    return variables(dags)
