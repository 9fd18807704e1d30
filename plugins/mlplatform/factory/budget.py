"""The per-tenant parse budget: a tenant's specs may spend so many seconds of its DAG file's parse.

Each tenant's specs are parsed in a DAG file of their own (``dags/tenant_<tenant>.py``), so Airflow's
``dagbag_import_timeout`` can only ever drop that tenant's DAGs. The budget keeps even that from happening:
reading and building the tenant's specs is timed, and once the budget is spent the remaining specs (the last
ones in file-name order, so the same ones on every parse) become cheap stand-in DAGs that say so instead of
being built. A stand-in costs ~0.25 ms to build versus ~3 ms for a pipeline and its monitor.

The clock is wall time (``time.perf_counter``), like Airflow's import timeout it protects against; it starts
when the tenant's loader starts loading, after the package import. A tenant close to its budget may see its
last specs flip between real DAGs and stand-ins from one parse to the next: the message asks it to split or
simplify its specs, which is the fix.
"""

from __future__ import annotations

import re
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

from mlplatform.config import PlatformConfig
from mlplatform.spec.errors import Problem
from mlplatform.spec.loader import BrokenSpec
from mlplatform.spec.model import NAME_RE

# Past this many stand-ins in one parse the remaining specs get no DAG at all: stand-ins are cheap, not free
# (~0.25 ms to build, ~0.55 ms for Airflow to serialize), and a folder of 100,000 files must not time out.
MAX_STAND_INS = 2000


def _now() -> float:
    return time.perf_counter()


def default_budget_seconds() -> float:
    """A third of ``[core] dagbag_import_timeout`` and a fifth of ``[dag_processor] dag_file_processor_timeout``
    (10 s with Airflow's defaults of 30 s and 50 s), whichever is smaller.

    The import also pays the package import and the stand-ins; after the import the dag-processor serializes
    every DAG the file built (about 1.2 times the build time), inside ``dag_file_processor_timeout``.
    """
    try:
        from airflow.configuration import conf

        import_timeout = conf.getfloat("core", "dagbag_import_timeout", fallback=30.0)
        processor_timeout = conf.getfloat("dag_processor", "dag_file_processor_timeout", fallback=50.0)
    except Exception:  # noqa: BLE001 - no Airflow configuration: Airflow's defaults
        import_timeout, processor_timeout = 30.0, 50.0
    limits = [t for t in (import_timeout / 3, processor_timeout / 5) if t > 0]
    return min(limits) if limits else 0.0


def budget_seconds(config: PlatformConfig) -> float:
    """``MLPLATFORM_TENANT_PARSE_BUDGET`` (seconds; 0 turns the budget off), else the default above."""
    if config.tenant_parse_budget is not None:
        return config.tenant_parse_budget
    return default_budget_seconds()


@dataclass
class ParseBudget:
    """Seconds one tenant's specs may spend loading and building in one parse of its DAG file."""

    tenant: str
    seconds: float
    clock: Callable[[], float] | None = None  # default: time.perf_counter (wall time, like the import timeout)
    started: float = field(default=0.0)
    spent: float | None = None  # seconds when the budget ran out; None while inside it
    stand_ins: int = 0
    dropped: int = 0  # specs past MAX_STAND_INS: no DAG at all

    def __post_init__(self) -> None:
        self.clock = self.clock or _now
        self.started = self.clock()

    @classmethod
    def for_tenant(cls, tenant: str, config: PlatformConfig) -> ParseBudget | None:
        """The tenant's budget, or None when the platform turned budgets off."""
        seconds = budget_seconds(config)
        return cls(tenant, seconds) if seconds > 0 else None

    def exceeded(self) -> bool:
        """True once the budget is spent (and from then on, for the rest of the parse)."""
        if self.spent is None:
            elapsed = self.clock() - self.started
            if elapsed <= self.seconds:
                return False
            self.spent = elapsed
        return True

    def message(self) -> str:
        who = f"tenant {self.tenant!r}" if self.tenant else "the specs of folders without a tenant DAG file"
        return (f"parse budget exceeded: {who} spent its {self.seconds:g} s parse budget ({self.spent or 0:.1f} s) "
                "before this spec; split or simplify your specs, or ask the platform team for a larger "
                "MLPLATFORM_TENANT_PARSE_BUDGET")

    def stand_in(self, path: Path, display: str, tenant: str | None = None, name: str | None = None) -> BrokenSpec | None:
        """The stand-in of a spec left unbuilt, or None past ``MAX_STAND_INS`` (no DAG at all)."""
        if self.stand_ins >= MAX_STAND_INS:
            self.dropped += 1
            return None
        self.stand_ins += 1
        fallback_tenant, fallback_name = file_dag_id_parts(path)
        return BrokenSpec(path, display, tenant or fallback_tenant, name or fallback_name,
                          [Problem(display, 1, 1, "", self.message())])


def file_dag_id_parts(path: Path) -> tuple[str, str]:
    """(tenant, name) of the DAG id a broken spec of this file gets (as in ``spec.loader.load_spec``), so a
    stand-in made without reading the file replaces the DAG it would have built."""
    folder, stem = path.parent.name, path.stem
    name = stem if re.match(NAME_RE, stem) else re.sub(r"[^a-z0-9-]+", "-", stem.lower()).strip("-") or "invalid"
    return (folder if re.match(NAME_RE, folder) else "invalid"), name
