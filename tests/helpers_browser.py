"""Shared by the browser tests of the Airflow UI (test_platform_page.py, test_ui_trigger.py).

A real Airflow (api-server, scheduler, dag-processor; LocalExecutor, SQLite) in multi-team mode set up the
way production is: ``mlplatform sync`` makes the teams, one DAG bundle per tenant, team pools and the
simple-auth-manager users of the tenant files (``admin``; ``acme-dev``, ``acme-viewer``, ``globex-dev``)
with their passwords. Playwright drives Debian's Chromium (/usr/bin/chromium, installed by
tests/setup_browser.sh when missing); Playwright never downloads a browser.
"""

from __future__ import annotations

import json
import shutil
import subprocess
from contextlib import contextmanager
from pathlib import Path

import httpx
import pytest

from conftest import REPO, set_platform_environ, write_spec

CHROMIUM = Path("/usr/bin/chromium")

BROKEN_GLOBEX = ("apiVersion: mlplatform.io/v1\nkind: Pipeline\nmetadata: {name: broken, tenant: globex}\n"
                 "spec:\n  data: {source: globex/accounts, entity: account_id, timestamp: event_timestamp, label: upgraded}\n"
                 "  training: {resources: {gpu: 5}}\n")
BROKEN_ACME = ("apiVersion: mlplatform.io/v1\nkind: Pipeline\nmetadata: {name: oops, tenant: acme}\n"
               "spec:\n  data: {source: acme/churn, entity: customer_id, timestamp: event_timestamp, label: churned}\n"
               "  trainig: {framework: sklearn}\n")


def ensure_chromium() -> Path:
    if not CHROMIUM.exists():
        proc = subprocess.run(["sh", str(REPO / "tests" / "setup_browser.sh")], capture_output=True, text=True,
                              timeout=1200)
        if proc.returncode == 2:
            pytest.skip(proc.stderr.strip())
        assert proc.returncode == 0, proc.stdout[-2000:] + proc.stderr[-2000:]
    assert CHROMIUM.exists()
    return CHROMIUM


def token(base_url: str, user: str, passwords: dict[str, str]) -> str:
    r = httpx.post(f"{base_url}/auth/token", json={"username": user, "password": passwords[user]}, timeout=30)
    r.raise_for_status()
    return r.json()["access_token"]


@contextmanager
def airflow_with_users(root: Path, broken: bool = True):
    """Example specs (plus two broken ones), ``mlplatform sync`` (teams, bundles, pools, users), Airflow up;
    yields a dict: env, api (admin's ApiClient), base_url, procs, config, passwords, root."""
    from mlplatform.config import load_config
    from mlplatform.local_airflow import BIN, AirflowProcesses, ApiClient, airflow, airflow_env, free_port
    from mlplatform.tenants.sync import read_env_file

    specs, tenancy = root / "specs", root / "tenancy"
    shutil.copytree(REPO / "dags" / "specs", specs)
    if broken:
        write_spec(specs, "globex", "broken", BROKEN_GLOBEX)
        write_spec(specs, "acme", "oops", BROKEN_ACME)
    platform = {"MLPLATFORM_HOME": str(root / "home"), "MLPLATFORM_SPECS_DIR": str(specs),
                "MLFLOW_TRACKING_URI": f"sqlite:///{root / 'home' / 'mlflow.db'}"}
    (root / "home").mkdir(parents=True, exist_ok=True)
    restore = set_platform_environ(platform)
    try:
        env = airflow_env(root / "airflow", free_port(), extra={
            **platform, "AIRFLOW__CORE__MULTI_TEAM": "True", "MLPLATFORM_TENANCY_DIR": str(tenancy)})
        airflow(env, "db", "migrate")
        sync = subprocess.run([str(BIN / "mlplatform"), "sync"], env=env, capture_output=True, text=True, timeout=300)
        assert sync.returncode == 0, sync.stdout + sync.stderr
        env.update(read_env_file(tenancy / "airflow.env"))
        assert env["AIRFLOW__CORE__SIMPLE_AUTH_MANAGER_ALL_ADMINS"].lower() == "false"
        passwords = json.loads((tenancy / "passwords.json").read_text())
        with AirflowProcesses(env) as procs:
            base = procs.base_url
            yield {"env": env, "api": ApiClient(base, token(base, "admin", passwords)), "base_url": base,
                   "procs": procs, "config": load_config(), "passwords": passwords, "root": root}
    finally:
        restore()


@contextmanager
def browser():
    from playwright.sync_api import sync_playwright

    ensure_chromium()
    with sync_playwright() as p:
        b = p.chromium.launch(executable_path=str(CHROMIUM),
                              args=["--no-sandbox", "--disable-dev-shm-usage", "--disable-gpu"])
        try:
            yield b
        finally:
            b.close()


def login(context, base_url: str, user: str, passwords: dict[str, str]):
    """Log in through the SimpleAuthManager's login page; returns the page, on the Airflow UI."""
    page = context.new_page()
    page.goto(f"{base_url}/")
    page.wait_for_url("**/auth/login**")
    page.locator("input[name=username]").fill(user)
    page.locator("input[name=password]").fill(passwords[user])
    page.locator("button[type=submit]").click()
    page.wait_for_url(lambda url: "/auth/login" not in url, timeout=60_000)
    return page
