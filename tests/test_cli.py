"""``mlplatform`` CLI as a user runs it: lint output and exit codes, render, k8s."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

from conftest import REPO

CLI = str(Path(sys.executable).parent / "mlplatform")


def run(*args: str, env: dict | None = None) -> subprocess.CompletedProcess:
    return subprocess.run([CLI, *args], capture_output=True, text=True, cwd=REPO, env=env)


def test_lint_repo_specs_clean():
    out = run("lint")
    assert out.returncode == 0, out.stdout + out.stderr
    assert "3 spec(s) checked, 0 problem(s)" in out.stderr


def test_lint_broken_file_prints_file_line_field_and_fails(tmp_path):
    bad = tmp_path / "acme" / "oops.yaml"
    bad.parent.mkdir()
    bad.write_text("apiVersion: mlplatform.io/v1\nkind: Pipeline\nmetadata: {name: oops, tenant: acme}\nspec:\n"
                   "  data: {source: acme/churn, entity: id, timestamp: ts, label: y}\n"
                   "  training:\n    resources: {gpu: 9}\n")
    out = run("lint", str(bad))
    assert out.returncode == 1
    line = out.stdout.strip().splitlines()[0]
    assert line.endswith("oops.yaml:7:17: spec.training.resources.gpu: 9 GPUs requested but tenant 'acme' has a "
                         "quota of 2: ask for at most 2 or ask the platform team to raise the quota"), line


def test_render_shows_tasks_pools_and_params():
    out = run("render", "acme__churn-xgb")
    assert out.returncode == 0, out.stderr
    assert "schedule: cron 0 3 * * * OR asset acme__churn-xgb__drift" in out.stdout
    train = next(l for l in out.stdout.splitlines() if l.startswith("train "))
    assert "acme__gpu" in train and train.split()[3] == "1"
    assert "params: as_of, hp_max_depth, hp_n_estimators, skip_canary" in out.stdout


def test_render_unknown_dag_fails():
    out = run("render", "acme__nope")
    assert out.returncode == 1 and "no pipeline 'acme__nope'" in out.stderr


def test_render_pod_prints_gpu_pod():
    out = run("render", "acme__churn-xgb", "--pod")
    assert out.returncode == 0, out.stderr
    assert "nvidia.com/gpu: '1'" in out.stdout or 'nvidia.com/gpu: "1"' in out.stdout
    assert "namespace: ml-acme" in out.stdout and "readOnlyRootFilesystem: true" in out.stdout


def test_k8s_manifests_per_tenant():
    out = run("k8s", "globex")
    assert out.returncode == 0, out.stderr
    assert "kind: ResourceQuota" in out.stdout and "requests.nvidia.com/gpu: '1'" in out.stdout


def test_without_airflow_home_commands_use_the_project_home_and_write_nothing_outside(tmp_path):
    """Issue 12: `mlplatform sync-pools` without AIRFLOW_HOME crashed on ~/airflow/airflow.db; now the project's
    .airflow/ home is used (as by `make demo`), and an empty database gets a message saying what to set."""
    import os

    home = tmp_path / "home"
    home.mkdir()
    env = {k: v for k, v in os.environ.items() if k != "AIRFLOW_HOME" and not k.startswith("AIRFLOW__")}
    env.update(HOME=str(home), AIRFLOW__DATABASE__SQL_ALCHEMY_CONN=f"sqlite:///{tmp_path / 'empty.db'}")
    out = run("sync-pools", "--dry-run", env=env)
    assert out.returncode == 1
    assert "the Airflow metadata database is not set up: (sqlite3.OperationalError) no such table: slot_pool" in out.stderr
    assert "Airflow home: the project's .airflow/ (AIRFLOW_HOME is unset)" in out.stderr
    assert "set AIRFLOW_HOME" in out.stderr and "Traceback" not in out.stderr
    assert run("lint", env=env).returncode == 0
    assert list(home.iterdir()) == [], "nothing written under ~ (no ~/airflow)"


def test_airflow_env_puts_the_venv_first_on_path(tmp_path):
    """`airflow standalone` (make ui) starts its components as `airflow` from PATH."""
    import os

    from mlplatform.local_airflow import BIN, airflow_env

    path = airflow_env(tmp_path, 8080)["PATH"].split(os.pathsep)
    assert path[0] == str(BIN) and path.count(str(BIN)) == 1
