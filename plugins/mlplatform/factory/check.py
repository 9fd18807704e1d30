"""`mlplatform lint` builds the DAGs too: a lint-clean spec always builds.

Every valid spec's pipeline and monitor DAGs are built in-process with the real factory and then checked the
way the dag-processor's DagBag checks a DAG before bagging it (``DAG.validate``: the timetable, e.g. a
continuous schedule needs ``max_active_runs`` 1; ``check_cycle``), without a database. Attribute-level rules
run in the DAG's constructor (Params valid for a scheduled DAG, tag length, ``max_active_runs`` against the
timetable's limit, timedelta ranges). A failure becomes a problem at the spec line it most likely comes from.
"""

from __future__ import annotations

from mlplatform.config import PlatformConfig
from mlplatform.spec.errors import Problem
from mlplatform.spec.loader import Catalog, LoadedSpec


def validate_dag(dag) -> None:
    """What DagBag does to a built DAG before bagging it (minus cluster policies), without a database."""
    dag.validate()
    dag.check_cycle()


def build_problem(loaded: LoadedSpec, exc: BaseException, monitor: bool = False) -> Problem:
    """A build failure as a problem at the spec line most likely at fault (else the file's first line)."""
    message = f"{type(exc).__name__}: {exc}"
    schedule = ("spec", "monitoring", "schedule") if monitor else ("spec", "schedule")
    low = message.lower()
    if "timetable" in low or "schedule" in low or "max_active_runs" in low or "cron" in low:
        path: tuple = schedule
    elif "param" in low:
        path = ("spec", "training", "tunable")
    elif isinstance(exc, OverflowError) or "timedelta" in low or "days=" in low:
        path = ("spec", "training", "timeout")
    else:
        path = ("spec",)
    dag_id = f"{loaded.dag_id}__monitor" if monitor else loaded.dag_id
    return loaded.located.problem(path, f"the DAG {dag_id} cannot be built: {message}")


def build_problems(catalog: Catalog, config: PlatformConfig) -> list[Problem]:
    """Build and validate each valid spec's pipeline and monitor DAGs; one problem per DAG that fails."""
    from mlplatform.factory.build import build_dag
    from mlplatform.factory.monitor import build_monitor_dag

    out: list[Problem] = []
    for loaded in catalog.specs:
        for builder, monitor in ((build_dag, False), (build_monitor_dag, True)):
            try:
                validate_dag(builder(loaded, catalog, config))
            except Exception as exc:  # noqa: BLE001 - any failure is the spec's problem to report
                out.append(build_problem(loaded, exc, monitor))
    return out
