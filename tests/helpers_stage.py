"""Helpers for the stage tests: a RunContext on a private platform home, and small churn-like data."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pandas as pd

from mlplatform.config import load_config
from mlplatform.spec.model import PipelineSpec, TenantFile
from mlplatform.stages.context import RunContext

ENTITY, TS, LABEL = "customer_id", "event_timestamp", "churned"
FEATURES = ["tenure_months", "monthly_charges", "support_calls", "plan"]


def pipeline_spec(**body) -> PipelineSpec:
    """A minimal acme/churn spec; ``body`` adds or replaces sections of ``spec`` (validation, monitoring...)."""
    return PipelineSpec.model_validate({
        "apiVersion": "mlplatform.io/v1",
        "kind": "Pipeline",
        "metadata": {"name": "churn", "tenant": "acme"},
        "spec": {"data": {"source": "acme/churn", "entity": ENTITY, "timestamp": TS, "label": LABEL}, **body},
    })


def tenant_file(name: str = "acme") -> TenantFile:
    return TenantFile.model_validate({
        "apiVersion": "mlplatform.io/v1",
        "kind": "Tenant",
        "metadata": {"name": name},
        "spec": {"owner": "team@example.com", "namespace": f"ml-{name}", "quotas": {"gpu_slots": 0, "cpu_slots": 2},
                 "data": {"allowed_prefixes": [f"{name}/"]}},
    })


def stage_context(tmp_path: Path, monkeypatch, **body) -> RunContext:
    """A RunContext whose platform home (and so its artifact folder) lives under ``tmp_path``."""
    monkeypatch.setenv("MLPLATFORM_HOME", str(tmp_path / "home"))
    for var in ("MLPLATFORM_DATA_ROOT", "MLPLATFORM_ARTIFACT_ROOT"):
        monkeypatch.delenv(var, raising=False)
    return RunContext(spec=pipeline_spec(**body), tenant=tenant_file(), config=load_config(),
                      run_id="manual__2026-11-22T03:00:00+00:00")


def churn_frame(rows: int = 2000, seed: int = 0, shift: float = 0.0, first_id: int = 1) -> pd.DataFrame:
    """Churn-like rows; ``shift`` moves monthly_charges and support_calls (two of the four features)."""
    rng = np.random.default_rng(seed)
    return pd.DataFrame({
        ENTITY: np.arange(first_id, first_id + rows, dtype="int64"),
        TS: pd.Timestamp("2026-11-01", tz="UTC") + pd.to_timedelta(rng.integers(0, 86_400, rows), unit="s"),
        "tenure_months": rng.integers(1, 72, rows),
        "monthly_charges": (rng.normal(70.0, 20.0, rows) + 40.0 * shift).clip(18.0, None).round(2),
        "support_calls": rng.poisson(1.0 + 3.0 * shift, rows),
        "plan": rng.choice(["basic", "plus", "pro"], rows, p=[0.5, 0.3, 0.2]),
        LABEL: rng.integers(0, 2, rows),
    })


def write_parquet(frame: pd.DataFrame, path: Path) -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    frame.to_parquet(path, index=False)
    return path
