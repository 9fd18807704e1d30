"""Shared fixtures. Tests never reach any address but loopback."""

from __future__ import annotations

import os
import shutil
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
ARTIFACTS = REPO / "test-artifacts"

os.environ.setdefault("MLFLOW_DISABLE_TELEMETRY", "true")
os.environ.setdefault("DO_NOT_TRACK", "true")
os.environ.setdefault("GIT_PYTHON_REFRESH", "quiet")


@pytest.fixture
def platform(tmp_path, monkeypatch):
    """A PlatformConfig on a private home and specs folder, with the repo's tenants and templates."""
    from mlplatform.config import get_config, load_config

    specs = tmp_path / "specs"
    specs.mkdir()
    monkeypatch.setenv("MLPLATFORM_HOME", str(tmp_path / "home"))
    monkeypatch.setenv("MLPLATFORM_SPECS_DIR", str(specs))
    monkeypatch.setenv("MLFLOW_TRACKING_URI", f"sqlite:///{tmp_path / 'home' / 'mlflow.db'}")
    get_config.cache_clear()
    yield load_config()
    get_config.cache_clear()


def write_spec(specs_dir: Path, tenant: str, name: str, text: str) -> Path:
    folder = specs_dir / tenant
    folder.mkdir(parents=True, exist_ok=True)
    path = folder / f"{name}.yaml"
    path.write_text(text)
    return path


def copy_example_specs(specs_dir: Path) -> None:
    shutil.copytree(REPO / "dags" / "specs", specs_dir, dirs_exist_ok=True)


PG_ADMIN_URL = "postgresql://postgres@127.0.0.1:5432/postgres"


@pytest.fixture
def new_postgres_db():
    """Factory: ``new_postgres_db(prefix)`` creates an empty database on 127.0.0.1:5432 and returns its
    ``postgresql://`` URL; every database made is dropped (connections forced off) after the test."""
    import uuid

    psycopg = pytest.importorskip("psycopg")
    try:
        admin = psycopg.connect(PG_ADMIN_URL, autocommit=True, connect_timeout=3)
    except psycopg.OperationalError as exc:
        pytest.skip(f"no PostgreSQL on 127.0.0.1:5432: {exc}")
    made: list[str] = []

    def make(prefix: str = "mlplatform_test") -> str:
        name = f"{prefix}_{uuid.uuid4().hex[:10]}"
        admin.execute(f'CREATE DATABASE "{name}"')
        made.append(name)
        return f"postgresql://postgres@127.0.0.1:5432/{name}"

    try:
        yield make
    finally:
        for name in made:
            admin.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')
        admin.close()


def set_platform_environ(env: dict[str, str]):
    """Put ``env`` into ``os.environ`` for a module-scoped stack (monkeypatch is function-scoped) and clear the
    cached platform config; returns the function that restores both."""
    from mlplatform.config import get_config

    saved = {k: os.environ.get(k) for k in env}
    os.environ.update(env)
    get_config.cache_clear()

    def restore() -> None:
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v
        get_config.cache_clear()

    return restore


_SESSION_REGISTRY_URI = os.environ.get("MLFLOW_REGISTRY_URI")


@pytest.fixture(autouse=True)
def reset_mlflow_uris():
    """MLflow's tracking and registry URIs are process-global (``mlflow.set_*_uri``, which the stages call,
    also export them as environment variables, and ``set_registry_uri(None)`` leaves its variable behind).
    After every test: both globals reset, ``MLFLOW_TRACKING_URI`` as it was before the test (module-scoped
    stacks set it on purpose), ``MLFLOW_REGISTRY_URI`` as it was when the session started (nothing sets it
    on purpose), so the next test resolves its own registry."""
    tracking = os.environ.get("MLFLOW_TRACKING_URI")
    yield
    import sys

    mlflow = sys.modules.get("mlflow")
    if mlflow is not None:
        mlflow.set_tracking_uri(None)
        mlflow.set_registry_uri(None)
    for name, value in (("MLFLOW_TRACKING_URI", tracking), ("MLFLOW_REGISTRY_URI", _SESSION_REGISTRY_URI)):
        if value is None:
            os.environ.pop(name, None)
        else:
            os.environ[name] = value
