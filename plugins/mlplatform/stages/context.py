"""What every stage function gets: the spec, its tenant, the platform config and the run's identity."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from mlplatform.config import PlatformConfig
from mlplatform.spec.model import PipelineSpec, TenantFile


class StageFailed(Exception):
    """A stage found a problem no retry can fix (bad data, bad spec); the message is shown to the tenant."""


def run_key(run_id: str) -> str:
    """A filesystem- and tag-safe form of an Airflow run id (a person may choose it: never ``..`` or hidden)."""
    key = re.sub(r"[^A-Za-z0-9_.-]+", "_", run_id)[:200]
    return "_" + key if key.startswith(".") or not key else key


@dataclass(frozen=True)
class RunContext:
    spec: PipelineSpec
    tenant: TenantFile
    config: PlatformConfig
    run_id: str
    spec_sha256: str = ""
    as_of: str | None = None
    params: dict[str, Any] = field(default_factory=dict)
    try_number: int = 1

    @property
    def dag_id(self) -> str:
        return self.spec.dag_id

    @property
    def run_key(self) -> str:
        return run_key(self.run_id)

    @property
    def artifact_dir(self) -> Path:
        """Per-run artifact folder (created on first use)."""
        path = self.config.artifact_dir(self.spec.metadata.tenant, self.spec.metadata.name, self.run_key)
        path.mkdir(parents=True, exist_ok=True)
        return path

    @property
    def feast_project(self) -> str:
        """One Feast project per tenant (Feast project names allow letters, digits and underscores)."""
        return self.spec.metadata.tenant.replace("-", "_")

    @property
    def experiment_name(self) -> str:
        return f"{self.spec.metadata.tenant}/{self.spec.metadata.name}"

    def hyperparameters(self) -> dict[str, Any]:
        """Spec hyperparameters with the trigger form's overrides, checked again here (spec/bounds.py): every
        value typed, finite, inside its tunable bounds and the platform's range. The Param schema of the
        trigger form is not enough: it lets NaN through, and a conf can reach a run without the form."""
        from mlplatform.spec.bounds import HyperparameterError, run_hyperparameters
        from mlplatform.spec.errors import SpecError

        try:
            return run_hyperparameters(self.spec, self.params)
        except HyperparameterError as exc:
            raise StageFailed(f"{self.dag_id}: {exc}") from None
        except SpecError as exc:
            raise StageFailed(f"platform bounds unavailable: {exc}") from None
