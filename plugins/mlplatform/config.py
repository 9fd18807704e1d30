"""Platform configuration: owned by the platform team, read from environment variables.

Tenants never choose a backend; every value here has an embedded default so a fresh clone runs.
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from functools import lru_cache
from pathlib import Path

REPO_ROOT = Path(__file__).resolve().parents[2]


def _env(name: str, default: str) -> str:
    value = os.environ.get(name, "").strip()
    return value or default


@dataclass(frozen=True)
class PlatformConfig:
    """Where things live and which backend each stage uses."""

    home: Path
    specs_dir: Path
    tenants_dir: Path
    templates_dir: Path
    data_root: Path
    artifact_root: str
    tracking_uri: str
    train_backend: str
    feast_online_store: str
    redis_url: str
    trainer_image: str
    git_commit: str
    gateway_url: str = ""  # the standalone gateway; set: canary bakes defer on its real traffic
    # seconds one tenant's specs may spend per parse (factory/budget.py); None: a third of dagbag_import_timeout
    tenant_parse_budget: float | None = None

    @property
    def feast_root(self) -> Path:
        return self.home / "feast"

    def artifact_dir(self, tenant: str, pipeline: str, run_key: str) -> Path:
        """Local artifact directory of one DAG run's stage outputs."""
        return Path(self.artifact_root) / tenant / pipeline / run_key


def load_config() -> PlatformConfig:
    """Read the platform configuration from the environment (uncached)."""
    home = Path(_env("MLPLATFORM_HOME", str(REPO_ROOT / ".mlplatform"))).resolve()
    return PlatformConfig(
        home=home,
        specs_dir=Path(_env("MLPLATFORM_SPECS_DIR", str(REPO_ROOT / "dags" / "specs"))),
        tenants_dir=Path(_env("MLPLATFORM_TENANTS_DIR", str(REPO_ROOT / "include" / "tenants"))),
        templates_dir=Path(_env("MLPLATFORM_TEMPLATES_DIR", str(REPO_ROOT / "dag_templates"))),
        data_root=Path(_env("MLPLATFORM_DATA_ROOT", str(home / "data"))),
        artifact_root=_env("MLPLATFORM_ARTIFACT_ROOT", str(home / "artifacts")),
        tracking_uri=_env("MLFLOW_TRACKING_URI", f"sqlite:///{home / 'mlflow.db'}"),
        train_backend=_env("MLPLATFORM_TRAIN_BACKEND", "local"),
        feast_online_store=_env("MLPLATFORM_FEAST_ONLINE_STORE", "sqlite"),
        redis_url=_env("MLPLATFORM_REDIS_URL", "127.0.0.1:6379"),
        trainer_image=_env("MLPLATFORM_TRAINER_IMAGE", "mlplatform/trainer:0.1.0"),
        git_commit=_env("MLPLATFORM_GIT_COMMIT", ""),
        gateway_url=_env("MLPLATFORM_GATEWAY_URL", "").rstrip("/"),
        tenant_parse_budget=_seconds(_env("MLPLATFORM_TENANT_PARSE_BUDGET", "")),
    )


def _seconds(value: str) -> float | None:
    """A number of seconds (0 or "off": no limit), or None for unset or unreadable (the default applies: a
    typo here must not stop every tenant's DAG file from parsing)."""
    if value.lower() == "off":
        return 0.0
    try:
        seconds = float(value)
    except ValueError:
        return None
    return seconds if seconds >= 0 and seconds == seconds and seconds != float("inf") else None


@lru_cache(maxsize=1)
def get_config() -> PlatformConfig:
    """The process-wide configuration (cached; tests call ``get_config.cache_clear()``)."""
    return load_config()
