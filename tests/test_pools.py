"""``mlplatform sync-pools`` against a real Airflow metadata DB (migrated in a private AIRFLOW_HOME)."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from conftest import REPO

BIN = Path(sys.executable).parent


@pytest.fixture(scope="module")
def airflow_home(tmp_path_factory):
    from mlplatform.local_airflow import airflow, airflow_env, free_port

    home = tmp_path_factory.mktemp("airflow")
    tenants = home / "tenants"
    shutil.copytree(REPO / "include" / "tenants", tenants)
    env = airflow_env(home, free_port(), extra={"MLPLATFORM_TENANTS_DIR": str(tenants)})
    airflow(env, "db", "migrate")
    return env, tenants


def sync(env, *args):
    out = subprocess.run([str(BIN / "mlplatform"), "sync-pools", *args], env=env, capture_output=True, text=True)
    assert out.returncode == 0, out.stderr
    return sorted(line.split()[:2] for line in out.stdout.splitlines())


def pools(env):
    from mlplatform.local_airflow import airflow

    out = airflow(env, "pools", "list", "-o", "plain").stdout
    return {line.split()[0]: line.split()[1] for line in out.splitlines()[1:] if line.strip()}


def test_sync_is_idempotent_and_removes_only_managed_pools(airflow_home):
    env, tenants = airflow_home
    assert sync(env, "--dry-run") == [["create", p] for p in ("acme__cpu", "acme__gpu", "globex__cpu", "globex__gpu")]
    assert "acme__gpu" not in pools(env)
    assert [a for a, _ in sync(env)] == ["create"] * 4
    assert [a for a, _ in sync(env)] == ["unchanged"] * 4
    assert pools(env)["acme__gpu"] == "2"

    from mlplatform.local_airflow import airflow

    airflow(env, "pools", "set", "hand_made", "3", "made by a person")
    text = (tenants / "acme.yaml").read_text().replace("gpu_slots: 2", "gpu_slots: 4")
    (tenants / "acme.yaml").write_text(text)
    (tenants / "globex.yaml").unlink()
    changes = dict((p, a) for a, p in sync(env))
    assert changes == {"acme__gpu": "update", "acme__cpu": "unchanged", "globex__gpu": "delete", "globex__cpu": "delete"}
    now = pools(env)
    assert now["acme__gpu"] == "4" and "globex__gpu" not in now and now["hand_made"] == "3"


def test_sync_refuses_when_a_tenant_file_is_broken(airflow_home):
    env, tenants = airflow_home
    (tenants / "broken.yaml").write_text("apiVersion: mlplatform.io/v1\nkind: Tenant\nmetadata: {name: broken}\nspec: {}\n")
    out = subprocess.run([str(BIN / "mlplatform"), "sync-pools"], env=env, capture_output=True, text=True)
    assert out.returncode == 1
    assert "broken.yaml" in out.stderr and "refusing to sync pools" in out.stderr
    (tenants / "broken.yaml").unlink()
